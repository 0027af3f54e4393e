//! `max_connections_per_ip` and `max_new_connections_per_ip_per_sec` refuse one source
//! address with 503 + Retry-After before the upgrade, while other addresses are served;
//! a freed connection or a refilled bucket lets the address in again.
//!
//! Clients bind their sockets to 127.0.0.2, 127.0.0.3, … before connecting, so the server
//! sees distinct source addresses over loopback.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::per_ip::{assert_refused_503, connect_from, upgrade_request};
use crate::common::*;

/// Connects to `addr` from `source` (port chosen by the kernel) and sends an upgrade;
/// returns the answer and the socket (kept open by the caller to hold the connection).
fn upgrade_from(source: &str, addr: SocketAddr) -> (http::HttpResponse, TcpStream) {
    let mut stream = connect_from(source, addr);
    stream
        .write_all(upgrade_request("ip").as_bytes())
        .unwrap_or_else(|e| panic!("sending an upgrade from {source}: {e}"));
    let (head, _) = http::read_head(&mut stream, Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no answer to an upgrade from {source}: {e}"));
    (head, stream)
}

fn assert_refused(head: &http::HttpResponse, source: &str) {
    assert_refused_503(head, &format!("an upgrade from {source} past its limit"));
}

#[test]
fn per_ip_limits_refuse_one_address() {
    let _deadline = Deadline::new("per_ip_limits_refuse_one_address", Duration::from_secs(60));
    connections_are_capped_per_address();
    new_connections_are_rate_limited_per_address();
}

/// Three connections from 127.0.0.2 fill its quota; a fourth is refused while 127.0.0.3
/// connects three times; closing one of 127.0.0.2's lets it in again.
fn connections_are_capped_per_address() {
    let server = Server::start(&["--max-connections-per-ip", "3"]);
    let addr = server.ws_addr();
    let mut held: Vec<TcpStream> = (0..3)
        .map(|i| {
            let (head, stream) = upgrade_from("127.0.0.2", addr);
            assert_eq!(
                head.status, 101,
                "connection {i} of 127.0.0.2 is within its limit"
            );
            stream
        })
        .collect();
    let (head, _refused) = upgrade_from("127.0.0.2", addr);
    assert_refused(&head, "127.0.0.2");
    let others: Vec<TcpStream> = (0..3)
        .map(|i| {
            let (head, stream) = upgrade_from("127.0.0.3", addr);
            assert_eq!(
                head.status, 101,
                "127.0.0.3 (connection {i}) is not limited by 127.0.0.2's connections"
            );
            stream
        })
        .collect();
    let m = server.metrics();
    assert_eq!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "per_ip")]
        ),
        1.0,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );
    server.wait_for_connections(6, Duration::from_secs(5));

    held.pop();
    server.wait_for_connections(5, Duration::from_secs(10));
    let (head, _again) = upgrade_from("127.0.0.2", addr);
    assert_eq!(
        head.status, 101,
        "127.0.0.2 connects again once one of its connections closed"
    );
    drop(others);
}

/// With one new connection per second per address, back-to-back connects from 127.0.0.4
/// are refused (`per_ip_rate`) even though each closes at once, 127.0.0.5 is served, and
/// 127.0.0.4 gets in again once its bucket refilled.
fn new_connections_are_rate_limited_per_address() {
    let server = Server::start(&["--max-new-connections-per-ip-per-sec", "1"]);
    let addr = server.ws_addr();
    let statuses: Vec<u16> = (0..5)
        .map(|_| upgrade_from("127.0.0.4", addr).0.status)
        .collect();
    assert_eq!(statuses[0], 101, "the first connection fits the bucket");
    assert!(
        statuses.contains(&503),
        "five back-to-back connects at 1/s were all admitted: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 101 || s == 503),
        "{statuses:?}"
    );
    let (head, _other) = upgrade_from("127.0.0.5", addr);
    assert_eq!(head.status, 101, "127.0.0.5 has its own bucket");
    let m = server.metrics();
    let refused = m.sum_where(
        "ringcast_connections_refused_total",
        &[("reason", "per_ip_rate")],
    );
    assert_eq!(
        refused,
        statuses.iter().filter(|&&s| s == 503).count() as f64,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );
    wait_until(
        Duration::from_secs(10),
        "127.0.0.4 is admitted again after its bucket refills",
        || (upgrade_from("127.0.0.4", addr).0.status == 101).then_some(()),
    );
}
