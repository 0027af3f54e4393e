//! `max_connections` is one limit for the whole process, whichever shard the kernel's
//! SO_REUSEPORT hash hands each connection to, and it is exact: the slot is taken before
//! `101` is written and given back when a connection is gone.
//!
//! Regression: the limit used to be split evenly per shard (`div_ceil`), so 10 on two
//! shards refused some of the first 10 whenever the hash was uneven, and 11 on two shards
//! admitted 12.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::*;

/// What one upgrade attempt got.
enum Attempt {
    /// `101`: the socket, held open for as long as the test keeps it.
    Upgraded(TcpStream),
    /// `503` with `Retry-After`.
    Refused,
}

fn attempt_ws(addr: SocketAddr) -> Attempt {
    let request = format!(
        "GET /ws?channels=cap HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending the upgrade to {addr}: {e}"));
    let (head, _) = http::read_head(&mut stream, Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no answer to an upgrade: {e}"));
    match head.status {
        101 => Attempt::Upgraded(stream),
        503 => {
            assert!(
                head.header("retry-after").is_some(),
                "503 without Retry-After: {:?}",
                head.headers
            );
            Attempt::Refused
        }
        other => panic!("unexpected answer {other} {} to an upgrade", head.reason),
    }
}

/// Tries `tries` upgrades in a row; the upgraded sockets, and whether each try upgraded.
fn fill(addr: SocketAddr, tries: usize) -> (Vec<TcpStream>, Vec<bool>) {
    let mut open = Vec::new();
    let mut pattern = Vec::new();
    for _ in 0..tries {
        match attempt_ws(addr) {
            Attempt::Upgraded(ws) => {
                open.push(ws);
                pattern.push(true);
            }
            Attempt::Refused => pattern.push(false),
        }
    }
    (open, pattern)
}

#[test]
fn max_connections_is_process_wide() {
    let _deadline = Deadline::new("max_connections_is_process_wide", Duration::from_secs(60));

    // Ten on two shards: exactly the first ten upgrade, whatever the split.
    let server = Server::start(&["--max-connections", "10", "--shards", "2"]);
    let (mut open, pattern) = fill(server.ws_addr(), 14);
    let expected: Vec<bool> = (0..14).map(|i| i < 10).collect();
    assert_eq!(
        pattern, expected,
        "which of 14 upgrades got 101 with --max-connections 10"
    );
    server.wait_for_connections(10, Duration::from_secs(2));
    let m = server.metrics();
    assert_eq!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "max_connections")]
        ),
        4.0,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );

    // Closing one admits exactly one more (once the server has seen it go).
    drop(open.pop());
    server.wait_for_connections(9, Duration::from_secs(5));
    let admitted = wait_until(
        Duration::from_secs(5),
        "a freed slot admits a new upgrade",
        || match attempt_ws(server.ws_addr()) {
            Attempt::Upgraded(ws) => Some(ws),
            Attempt::Refused => None,
        },
    );
    open.push(admitted);
    assert!(
        matches!(attempt_ws(server.ws_addr()), Attempt::Refused),
        "one close admitted more than one new connection"
    );
    drop(open);
    drop(server);

    // Eleven on two shards: never twelve, however many try.
    let server = Server::start(&["--max-connections", "11", "--shards", "2"]);
    let (open, pattern) = fill(server.ws_addr(), 20);
    assert_eq!(
        pattern.iter().filter(|&&up| up).count(),
        11,
        "upgrades out of 20 tries with --max-connections 11: {pattern:?}"
    );
    assert!(
        pattern[..11].iter().all(|&up| up),
        "an upgrade was refused below the limit: {pattern:?}"
    );
    server.wait_for_connections(11, Duration::from_secs(2));
    drop(open);
}
