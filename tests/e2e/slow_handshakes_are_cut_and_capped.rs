//! `handshake_timeout` bounds the whole upgrade, and `max_handshakes_per_shard` bounds how
//! many upgrades a shard serves at once.
//!
//! Regression for the slowloris hole: the timeout used to apply to each read, so a client
//! sending one byte every second (under the timeout) held its upgrade task for as long as
//! it liked, and any number of such clients could pile up.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

const REQUEST: &str = "GET /ws?channels=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
     Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
     Sec-WebSocket-Version: 13\r\n\r\n";

/// Connects and starts a thread that sends [`REQUEST`] one byte per second until the
/// server closes the socket or `stop` is set.
fn slowloris(addr: SocketAddr, stop: Arc<AtomicBool>) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let mut writer = stream.try_clone().expect("cloning the slowloris socket");
    thread::spawn(move || {
        for byte in REQUEST.as_bytes() {
            if stop.load(Ordering::Relaxed) || writer.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_secs(1));
        }
    });
    stream
}

/// Reads until the server closes the socket (EOF or reset); how long that took, or `None`
/// if it is still open after `bound`. Anything the server sends (it should send nothing)
/// is returned too.
fn wait_closed(stream: &mut TcpStream, bound: Duration) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = bound.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (None, got);
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return (Some(start.elapsed()), got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (Some(start.elapsed()), got),
        }
    }
}

#[test]
fn slow_handshakes_are_cut_and_capped() {
    let _deadline = Deadline::new(
        "slow_handshakes_are_cut_and_capped",
        Duration::from_secs(60),
    );
    deadline_covers_the_whole_upgrade();
    handshakes_in_flight_are_capped();
}

/// One byte per second with `--handshake-timeout 2`: closed after ~2 s, not after the
/// ~150 s the request would take.
fn deadline_covers_the_whole_upgrade() {
    let server = Server::start(&["--handshake-timeout", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = slowloris(server.ws_addr(), stop.clone());
    let (closed_after, got) = wait_closed(&mut client, Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let closed_after = closed_after.unwrap_or_else(|| {
        panic!("a client sending one request byte per second was still connected 5 s after accept with --handshake-timeout 2")
    });
    eprintln!("slowloris closed after {closed_after:?}");
    assert!(
        got.is_empty(),
        "a timed-out upgrade is closed without an answer, got {:?}",
        String::from_utf8_lossy(&got)
    );
    server.wait_for_metric(
        "ringcast_handshakes_timed_out_total",
        "the timed-out upgrade is counted",
        Duration::from_secs(2),
        |v| v == 1.0,
    );
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "no upgrade is in progress",
        Duration::from_secs(2),
        |v| v == 0.0,
    );
    // A normal client is not affected.
    drop(server.raw_ws(&["after"]));
}

/// With one shard and a cap of 3: three slowloris sockets fill the gauge, the fourth
/// socket gets 503 + Retry-After at once; after the timeout the gauge is back to 0 and
/// all three are counted as timed out.
fn handshakes_in_flight_are_capped() {
    const CAP: usize = 3;
    let server = Server::start(&[
        "--shards",
        "1",
        "--max-handshakes-per-shard",
        &CAP.to_string(),
        "--handshake-timeout",
        "3",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow: Vec<TcpStream> = (0..CAP)
        .map(|_| slowloris(server.ws_addr(), stop.clone()))
        .collect();
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "the slowloris sockets show in the gauge",
        Duration::from_secs(2),
        |v| v == CAP as f64,
    );

    let refused = http::send_raw(server.ws_addr(), REQUEST.as_bytes())
        .unwrap_or_else(|e| panic!("no answer to an upgrade at the handshake cap: {e}"));
    assert_eq!(
        refused.status,
        503,
        "an upgrade beyond --max-handshakes-per-shard {CAP}: {} {:?}",
        refused.reason,
        refused.text()
    );
    assert!(
        refused.header("retry-after").is_some(),
        "503 without Retry-After: {:?}",
        refused.headers
    );
    let m = server.metrics();
    assert_eq!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "handshakes_in_flight")]
        ),
        1.0,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );
    assert_eq!(m.sum("ringcast_handshakes_in_progress"), CAP as f64);

    for stream in &mut slow {
        let (closed, _) = wait_closed(stream, Duration::from_secs(6));
        assert!(
            closed.is_some(),
            "a slowloris socket outlived --handshake-timeout 3 by 3 s"
        );
    }
    stop.store(true, Ordering::Relaxed);
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "the gauge returns to 0 after the timeout",
        Duration::from_secs(2),
        |v| v == 0.0,
    );
    server.wait_for_metric(
        "ringcast_handshakes_timed_out_total",
        "every slowloris is counted as timed out",
        Duration::from_secs(2),
        |v| v == CAP as f64,
    );
    // Room again: a normal upgrade goes through.
    drop(server.raw_ws(&["after"]));
}
