//! A subscriber that stops reading is disconnected with 1013, while the healthy
//! subscribers on the same channel receive every message and the server keeps serving.
//!
//! The slow peer shrinks its receive buffer and never reads. The kernel still absorbs a
//! few MiB on the server side (loopback's 64 KiB MSS makes the initial send buffer
//! large), then ringcast's per-connection backlog (`--max-backlog-bytes 65536`) fills and
//! the connection lags; once it has taken no byte for `--slow-consumer-timeout 2`
//! seconds, the server must close it. The publisher therefore keeps going until the
//! close is counted, rather than guessing how much the kernel buffers. A healthy
//! subscriber that falls behind for a moment (a loaded test machine) is caught up from
//! history, so it must still see every offset.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::admin::slow_consumer_closes;
use crate::common::server::wait_for_messages_in;
use crate::common::*;
use serde_json::json;
use socket2::{Domain, Socket, Type};

const CHANNEL: &str = "bulk";
const PAYLOAD_PAD: usize = 16 * 1024;
/// Upper bound on what it may take to fill the kernel buffers, the backlog and the
/// drop limit (each message is ~16 KiB).
const MAX_MESSAGES: u64 = 3000;
/// Published after the drop limit is reached: healthy subscribers get these too.
const AFTER_DROP: u64 = 25;
const HEALTHY: usize = 4;

/// A WebSocket whose receive buffer is as small as the kernel allows and which never
/// reads.
fn connect_slow_consumer(server: &Server) -> RawWs {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    // Set before connect so the advertised window is small from the first segment.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .connect_timeout(&server.ws_addr().into(), Duration::from_secs(5))
        .expect("connecting the slow consumer");
    RawWs::upgrade(TcpStream::from(socket), &format!("/ws?channels={CHANNEL}"))
}

/// Reads messages until `target` (set once publishing is over) have arrived.
fn read_all(mut sub: Subscriber, target: Arc<AtomicU64>) -> (Subscriber, Vec<Delivery>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    loop {
        let want = target.load(Ordering::Acquire);
        if want != 0 && got.len() as u64 >= want {
            return (sub, got);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.next_delivery(left.min(Duration::from_millis(500))) {
            Some(d) => got.push(d),
            None if left.is_zero() => panic!(
                "received {} of {} messages within 60 s; missing {:?} last offset {:?}",
                got.len(),
                want,
                (1..=want)
                    .filter(|o| !got.iter().any(|d: &Delivery| d.offset == *o))
                    .collect::<Vec<_>>(),
                got.last().map(|d: &Delivery| d.offset)
            ),
            None => {}
        }
    }
}

#[test]
fn slow_consumer_is_dropped() {
    let _deadline = Deadline::new("slow_consumer_is_dropped", Duration::from_secs(120));
    let server = Server::start(&[
        "--max-backlog-bytes",
        "65536",
        "--slow-consumer-timeout",
        "2",
        "--max-message-size",
        "65536",
    ]);
    let target = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..HEALTHY)
        .map(|_| server.subscribe(&[CHANNEL]))
        .map(|sub| {
            let target = Arc::clone(&target);
            thread::spawn(move || read_all(sub, target))
        })
        .collect();
    let mut slow = connect_slow_consumer(&server);
    server.wait_for_connections(HEALTHY + 1, Duration::from_secs(10));

    let pad = "x".repeat(PAYLOAD_PAD);
    let mut tcp = server.tcp_ingest();
    let mut published = 0u64;
    let mut publish = |tcp: &mut TcpIngest| {
        published += 1;
        tcp.publish(
            CHANNEL,
            json!({ "n": published, "pad": pad }).to_string().as_bytes(),
        );
        // ~8 MB/s: easy for a reading subscriber on loopback, far more than a 4 KiB
        // window that is never opened.
        thread::sleep(Duration::from_millis(2));
        published
    };
    loop {
        let n = publish(&mut tcp);
        if n % 25 == 0 && slow_consumer_closes(&server) >= 1.0 {
            break;
        }
        assert!(
            n < MAX_MESSAGES,
            "{n} messages of {PAYLOAD_PAD} B and the slow consumer is still not closed \
             (2 s without progress should do it):\n{}",
            server
                .metrics()
                .describe("ringcast_connections_closed_total")
        );
    }
    for _ in 0..AFTER_DROP {
        publish(&mut tcp);
    }
    let total = published;
    eprintln!("published {total} messages");
    target.store(total, Ordering::Release);
    wait_for_messages_in(&server, total as usize, Duration::from_secs(15));

    // Kept open: the healthy subscribers must still be connected at the end.
    let mut healthy = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let who = format!("healthy subscriber {i}");
        let (sub, got) = reader
            .join()
            .unwrap_or_else(|_| panic!("{who} failed (see its panic above)"));
        let mut log = OffsetLog::default();
        log.observe_all(&got);
        log.assert_exactly(&who, CHANNEL, 1, total);
        healthy.push(sub);
    }

    // Now read what the slow peer was sent: some messages, then the close.
    let (end, frames) = slow.read_close_counting(Duration::from_secs(15));
    eprintln!(
        "slow consumer read {} message frames before {end:?}",
        frames.len()
    );
    assert!(
        (frames.len() as u64) < total,
        "the slow consumer received all {total} messages; nothing was skipped"
    );

    server.wait_for_connections(HEALTHY, Duration::from_secs(10));
    let metrics = server.metrics();
    let slow_closes: f64 = metrics
        .series("ringcast_connections_closed_total")
        .filter(|s| s.label("reason").is_some_and(|r| r.contains("slow")))
        .map(|s| s.value)
        .sum();
    assert!(
        slow_closes >= 1.0,
        "no ringcast_connections_closed_total series with a slow-consumer reason:\n{}",
        metrics.describe("ringcast_connections_closed_total")
    );

    // The server keeps serving: a newcomer and the healthy subscribers get the next one.
    let mut newcomer = server.subscribe(&[CHANNEL]);
    server.wait_for_connections(HEALTHY + 1, Duration::from_secs(10));
    let response = server.http_publish(Some(CHANNEL), b"{\"after\":true}");
    assert_eq!(response.status, 200, "{}", response.text());
    let d = newcomer
        .next_delivery(Duration::from_secs(10))
        .expect("a subscriber connected after the drop receives new messages");
    assert_eq!((d.offset, d.data), (total + 1, json!({ "after": true })));
    for (i, sub) in healthy.iter_mut().enumerate() {
        let d = sub
            .next_delivery(Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!("healthy subscriber {i} did not get the message after the drop")
            });
        assert_eq!(d.offset, total + 1, "healthy subscriber {i}");
    }

    // Checked last so that a failure here comes after everything else has been seen.
    // 1013 is what docs/protocol.md promises; a reset is tolerated because a server may
    // have to abort a socket whose send buffer never drains.
    assert!(
        end.code() == Some(1013) || matches!(end, CloseSeen::Reset(_)),
        "the slow consumer should be closed with 1013 (or reset), but after reading {} \
         message frames it saw {end:?}",
        frames.len()
    );
}
