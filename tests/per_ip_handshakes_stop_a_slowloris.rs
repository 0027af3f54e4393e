//! `max_handshakes_per_ip`: half-sent upgrades from one address fill its quota of upgrades
//! in progress, so its next socket is refused with 503 + Retry-After at once while another
//! address still upgrades; an upgrade that completes gives its place back.
//!
//! Clients bind their sockets to 127.0.0.2 and 127.0.0.3 before connecting, so the server
//! sees distinct source addresses over loopback.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::per_ip::{assert_refused_503, connect_from, upgrade_request};
use common::*;

fn send(stream: &mut TcpStream, bytes: &[u8], what: &str) {
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("sending {what}: {e}"));
}

fn answer(stream: &mut TcpStream, what: &str) -> http::HttpResponse {
    http::read_head(stream, Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no answer to {what}: {e}"))
        .0
}

#[test]
fn per_ip_handshakes_stop_a_slowloris() {
    const CAP: usize = 3;
    let _deadline = Deadline::new(
        "per_ip_handshakes_stop_a_slowloris",
        Duration::from_secs(60),
    );
    // A long handshake_timeout: nothing here waits for it.
    let server = Server::start(&[
        "--max-handshakes-per-ip",
        &CAP.to_string(),
        "--handshake-timeout",
        "60",
    ]);
    let addr = server.ws_addr();
    let upgrade = upgrade_request("slow");
    let half = &upgrade.as_bytes()[..upgrade.len() - 2];
    let mut slow: Vec<TcpStream> = (0..CAP)
        .map(|i| {
            let mut s = connect_from("127.0.0.2", addr);
            send(
                &mut s,
                half,
                &format!("half an upgrade ({i}) from 127.0.0.2"),
            );
            s
        })
        .collect();
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "the half-sent upgrades show in the gauge",
        Duration::from_secs(5),
        |v| v == CAP as f64,
    );

    // Past the quota: refused at once, before any byte of the request is needed.
    let mut extra = connect_from("127.0.0.2", addr);
    let refused = answer(&mut extra, "a socket from 127.0.0.2 past its upgrade quota");
    assert_refused_503(
        &refused,
        &format!("127.0.0.2 past --max-handshakes-per-ip {CAP}"),
    );
    let m = server.metrics();
    assert_eq!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "per_ip_handshakes")]
        ),
        1.0,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );

    // Another address is not held back by 127.0.0.2's upgrades.
    let mut other = connect_from("127.0.0.3", addr);
    send(&mut other, upgrade.as_bytes(), "an upgrade from 127.0.0.3");
    let head = answer(&mut other, "an upgrade from 127.0.0.3");
    assert_eq!(
        head.status, 101,
        "127.0.0.3 upgrades while 127.0.0.2 is at its quota"
    );

    // Finishing one half-sent upgrade frees its place (the connection stays open).
    send(
        &mut slow[0],
        b"\r\n",
        "the rest of an upgrade from 127.0.0.2",
    );
    let head = answer(&mut slow[0], "a completed upgrade from 127.0.0.2");
    assert_eq!(head.status, 101, "the completed upgrade is served");
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "the completed upgrade left the gauge",
        Duration::from_secs(5),
        |v| v == CAP as f64 - 1.0,
    );
    let mut again = connect_from("127.0.0.2", addr);
    send(
        &mut again,
        upgrade.as_bytes(),
        "a new upgrade from 127.0.0.2",
    );
    let head = answer(&mut again, "a new upgrade from 127.0.0.2");
    assert_eq!(
        head.status, 101,
        "127.0.0.2 has a free upgrade place again (its upgraded connection no longer counts)"
    );
    server.wait_for_connections(3, Duration::from_secs(5));
    drop(slow);
}
