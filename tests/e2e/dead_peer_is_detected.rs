//! A peer that completes the handshake and then goes silent (never answers a ping) is
//! closed within `ping_interval + pong_timeout` plus jitter, while a peer that answers
//! the server's pings stays connected and keeps receiving messages.
//!
//! The silent peer's kernel still ACKs every segment, so only ringcast's own liveness
//! check can find it: exactly the half-dead mobile client seen in production.

use std::thread;
use std::time::{Duration, Instant};

use crate::common::subscriber::Event;
use crate::common::*;
use serde_json::json;

const CHANNEL: &str = "pulse";
/// `--ping-interval 1 --pong-timeout 1` makes the nominal bound 2 s; the rest is room
/// for per-shard jitter and a loaded CI machine.
const DETECTION_BOUND: Duration = Duration::from_secs(8);
/// How long the responsive peer is watched; several ping rounds.
const WATCH: Duration = Duration::from_secs(6);

#[test]
fn dead_peer_is_detected() {
    let _deadline = Deadline::new("dead_peer_is_detected", Duration::from_secs(60));
    let server = Server::start(&["--ping-interval", "1", "--pong-timeout", "1"]);

    let alive = server.subscribe(&[CHANNEL]);
    let mut silent = server.raw_ws(&[CHANNEL]);
    server.wait_for_connections(2, Duration::from_secs(10));
    let silent_since = Instant::now();

    // The responsive peer reads continuously; tungstenite answers each ping with a pong
    // on its next read.
    let watcher = thread::spawn(move || {
        let mut alive = alive;
        let until = Instant::now() + WATCH;
        while Instant::now() < until {
            if let Event::Closed(frame) = alive.next_event(Duration::from_millis(200)) {
                panic!("the peer that answers pings was closed: {frame:?}");
            }
        }
        alive
    });

    server.wait_for_connections(1, DETECTION_BOUND);
    let detected_after = silent_since.elapsed();
    eprintln!("silent peer dropped after {detected_after:?}");

    let end = silent.read_close(Duration::from_secs(5));
    assert_ne!(
        end,
        CloseSeen::TimedOut,
        "ringcast_connections went down but the silent peer's socket is still open"
    );
    eprintln!("silent peer saw {end:?}");

    let mut alive = watcher
        .join()
        .unwrap_or_else(|_| panic!("the responsive peer failed (see its panic above)"));
    assert!(
        alive.pings >= 1,
        "the server never pinged a connection idle for {WATCH:?} with --ping-interval 1"
    );
    server.wait_for_connections(1, Duration::from_secs(1));

    let pong = alive.request(&json!({ "cmd": "ping", "id": 3 }), Duration::from_secs(5));
    assert_eq!(pong, json!({ "reply": "pong", "id": 3, "code": 200 }));
    let response = server.http_publish(Some(CHANNEL), b"still here");
    assert_eq!(response.status, 200, "{}", response.text());
    let d = alive
        .next_delivery(Duration::from_secs(5))
        .expect("the responsive peer still receives messages");
    assert_eq!((d.channel.as_str(), d.offset), (CHANNEL, 1));
    assert_eq!(d.data, json!("still here"));

    let closed = server.metrics().sum("ringcast_connections_closed_total");
    assert!(
        closed >= 1.0,
        "ringcast_connections_closed_total does not count the dead peer: {}",
        server
            .metrics()
            .describe("ringcast_connections_closed_total")
    );
}
