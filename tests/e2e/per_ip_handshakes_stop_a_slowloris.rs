//! `max_handshakes_per_ip`: half-sent upgrades from one address fill its quota of upgrades
//! in progress, so its next socket is refused with 503 + Retry-After at once while another
//! address still upgrades; an upgrade that completes gives its place back.
//!
//! `handshake_fair_share` (on by default, no per-IP limit set): one address that fills a
//! shard's whole `max_handshakes_per_shard` budget with one-byte upgrades no longer locks
//! other addresses out; a newcomer from another address takes the slow address's oldest
//! place, and that upgrade is answered 503.
//!
//! Clients bind their sockets to 127.0.0.2 and 127.0.0.3 before connecting, so the server
//! sees distinct source addresses over loopback.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::per_ip::{assert_refused_503, connect_from, upgrade_request};
use crate::common::*;

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

/// Regression for the default edge: 1,030 sockets from one address, one byte each, used
/// to hold all 1,024 upgrade places of a shard, and every other client got 503 until
/// `handshake_timeout` (10 s by default) cut them.
#[test]
fn one_address_cannot_lock_others_out_of_upgrades() {
    const DEFAULT_BUDGET: usize = 1024;
    const SLOW: usize = DEFAULT_BUDGET + 6;
    let _deadline = Deadline::new(
        "one_address_cannot_lock_others_out_of_upgrades",
        Duration::from_secs(60),
    );
    // Default limits on one shard; a long handshake_timeout, so nothing here waits for
    // it or races it.
    let server = Server::start(&["--shards", "1", "--handshake-timeout", "60"]);
    let addr = server.ws_addr();
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|i| {
            let mut s = connect_from("127.0.0.2", addr);
            send(&mut s, b"G", &format!("one byte ({i}) from 127.0.0.2"));
            s
        })
        .collect();
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "127.0.0.2 holds every upgrade place of the shard",
        Duration::from_secs(10),
        |v| v == DEFAULT_BUDGET as f64,
    );
    let m = server.metrics();
    assert_eq!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "handshakes_in_flight")]
        ),
        (SLOW - DEFAULT_BUDGET) as f64,
        "127.0.0.2's sockets past the budget are refused: it already holds the most\n{}",
        m.describe("ringcast_connections_refused_total")
    );

    let mut other = connect_from("127.0.0.3", addr);
    send(
        &mut other,
        upgrade_request("fair").as_bytes(),
        "an upgrade from 127.0.0.3",
    );
    let head = answer(
        &mut other,
        "an upgrade from 127.0.0.3 while 127.0.0.2 fills the shard",
    );
    assert_eq!(
        head.status, 101,
        "127.0.0.3 upgrades although 127.0.0.2 held every place"
    );
    server.wait_for_metric(
        "ringcast_connections_refused_total",
        "the evicted upgrade is counted",
        Duration::from_secs(5),
        |v| v >= (SLOW - DEFAULT_BUDGET + 1) as f64,
    );
    let m = server.metrics();
    assert_eq!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "handshake_share")]
        ),
        1.0,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );
    // The place came from 127.0.0.2's oldest upgrade, which was told so.
    let oldest = &mut slow[0];
    let head = answer(oldest, "127.0.0.2's oldest upgrade");
    assert_refused_503(
        &head,
        "127.0.0.2's oldest upgrade, whose place went to 127.0.0.3",
    );
    let mut rest = Vec::new();
    let _ = oldest.set_read_timeout(Some(Duration::from_secs(5)));
    match oldest.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the evicted upgrade was not closed after its 503: {e}"),
    }
    assert_eq!(
        server.metrics().sum("ringcast_handshakes_in_progress"),
        DEFAULT_BUDGET as f64 - 1.0,
        "127.0.0.3's upgrade took the place and finished"
    );
}

/// `handshake_fair_share = false` keeps the plain cap: past it, every address gets 503.
#[test]
fn without_fair_share_a_full_shard_refuses_everyone() {
    const CAP: usize = 4;
    let _deadline = Deadline::new(
        "without_fair_share_a_full_shard_refuses_everyone",
        Duration::from_secs(60),
    );
    let server = Server::start(&[
        "--shards",
        "1",
        "--max-handshakes-per-shard",
        &CAP.to_string(),
        "--handshake-fair-share",
        "false",
        "--handshake-timeout",
        "60",
    ]);
    let addr = server.ws_addr();
    let _slow: Vec<TcpStream> = (0..CAP)
        .map(|i| {
            let mut s = connect_from("127.0.0.2", addr);
            send(&mut s, b"G", &format!("one byte ({i}) from 127.0.0.2"));
            s
        })
        .collect();
    server.wait_for_metric(
        "ringcast_handshakes_in_progress",
        "127.0.0.2 holds every upgrade place",
        Duration::from_secs(5),
        |v| v == CAP as f64,
    );
    let mut other = connect_from("127.0.0.3", addr);
    let head = answer(&mut other, "a socket from 127.0.0.3 at the cap");
    assert_refused_503(&head, "127.0.0.3 with the fair share off");
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
}
