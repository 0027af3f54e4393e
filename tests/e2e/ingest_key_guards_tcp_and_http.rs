//! With `ingest_key` set, TCP publishers must open with `AUTH <key>` (otherwise `ERR
//! unauthorized` and the connection ends, nothing published) and HTTP `POST /publish` and
//! `POST /admin/disconnect` need `Authorization: Bearer <key>` (401 otherwise); reads
//! such as `/metrics` need nothing. Subscribers see only what the right key published.
//!
//! Before its `AUTH` line a TCP connection is bounded: 512 bytes without a whole line are
//! refused at once, `ingest_auth_timeout` cuts one that sends nothing, and past
//! `max_tcp_ingest_connections` a new one is refused. Regression: 300 sockets that sent
//! 65,000 bytes and never `AUTH` each held their buffers (40 MB) for as long as they
//! liked.

use std::time::{Duration, Instant};

use crate::common::*;

const KEY: &str = "ingest-key-0123456789abcdef";
const TIMEOUT: Duration = Duration::from_secs(10);

fn post(
    server: &Server,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> http::HttpResponse {
    http::request(server.admin_addr(), "POST", target, headers, body)
        .unwrap_or_else(|e| panic!("POST {target}: {e}\n{}", server.describe()))
}

#[test]
fn ingest_key_guards_tcp_and_http() {
    let _deadline = Deadline::new("ingest_key_guards_tcp_and_http", Duration::from_secs(60));
    let server = Server::start(&["--ingest-key", KEY]);
    let mut sub = server.subscribe(&["keyed"]);
    server.wait_for_connections(1, TIMEOUT);

    // TCP: missing key (a message as the first line), wrong key, then the right one.
    for (what, first) in [
        ("missing", "keyed {\"by\":\"missing\"}\n".to_string()),
        ("wrong", "AUTH not-the-ingest-key-0000\n".to_string()),
        ("empty", "AUTH \n".to_string()),
    ] {
        let mut tcp = server.tcp_ingest();
        tcp.send_raw(first.as_bytes());
        tcp.send_raw(b"keyed {\"by\":\"after a refused key\"}\n");
        assert_eq!(
            tcp.read_line(TIMEOUT).as_deref(),
            Some("ERR unauthorized"),
            "TCP with the key {what}"
        );
        assert_eq!(
            tcp.read_line(TIMEOUT),
            None,
            "TCP with the key {what}: the connection ends after the refusal"
        );
    }
    let mut tcp = server.tcp_ingest();
    tcp.send_raw(format!("AUTH {KEY}\nACK ON\nkeyed {{\"by\":\"tcp\"}}\n").as_bytes());
    let ok = tcp
        .read_line(TIMEOUT)
        .expect("a reply to an authorized ack-mode publish");
    assert!(ok.starts_with("OK "), "TCP with the right key: {ok:?}");

    // HTTP: missing, wrong scheme, wrong key: 401 with WWW-Authenticate; right key: 200.
    let bearer_wrong = "Bearer not-the-ingest-key-0000";
    let basic = format!("Basic {KEY}");
    for (what, headers) in [
        ("missing", vec![]),
        ("wrong scheme", vec![("Authorization", basic.as_str())]),
        ("wrong key", vec![("Authorization", bearer_wrong)]),
    ] {
        let r = post(
            &server,
            "/publish?channel=keyed",
            &headers,
            b"{\"by\":\"bad http\"}",
        );
        assert_eq!(r.status, 401, "HTTP publish, key {what}: {}", r.text());
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{:?}",
            r.headers
        );
        let r = post(&server, "/admin/disconnect?user=alice", &headers, b"");
        assert_eq!(r.status, 401, "disconnect, key {what}: {}", r.text());
    }
    let bearer = format!("Bearer {KEY}");
    let auth = [("Authorization", bearer.as_str())];
    let r = post(
        &server,
        "/publish?channel=keyed",
        &auth,
        b"{\"by\":\"http\"}",
    );
    assert_eq!(
        r.status,
        200,
        "HTTP publish with the right key: {}",
        r.text()
    );
    let r = post(&server, "/admin/disconnect?user=alice", &auth, b"");
    assert_eq!(r.status, 200, "disconnect with the right key: {}", r.text());

    // Every refused attempt came before these two: had one been published, it would
    // arrive first.
    let got = sub.collect(2, TIMEOUT);
    let by: Vec<_> = got.iter().map(|d| d.data["by"].clone()).collect();
    assert_eq!(by, ["tcp", "http"], "{got:?}");

    // Reads need no key, and the refusals are counted.
    let m = server.metrics();
    assert_eq!(
        m.sum_where("ringcast_ingest_unauthorized_total", &[("source", "tcp")]),
        3.0
    );
    assert_eq!(
        m.sum_where("ringcast_ingest_unauthorized_total", &[("source", "http")]),
        6.0
    );
}

#[test]
fn without_a_key_nothing_is_asked() {
    let _deadline = Deadline::new("without_a_key_nothing_is_asked", Duration::from_secs(60));
    let server = Server::start(&[]);
    let mut tcp = server.tcp_ingest();
    tcp.send_raw(b"ACK ON\nopen {\"n\":1}\n");
    let ok = tcp.read_line(TIMEOUT).expect("a reply");
    assert!(ok.starts_with("OK "), "{ok:?}");
    let r = server.http_publish(Some("open"), b"{\"n\":2}");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Reads one line and then expects the server to close: the line, and how long after
/// `since` it came.
fn refusal(tcp: &mut TcpIngest, since: Instant, what: &str) -> (String, Duration) {
    let line = tcp
        .read_line(TIMEOUT)
        .unwrap_or_else(|| panic!("{what}: no answer within {TIMEOUT:?}"));
    let after = since.elapsed();
    assert_eq!(
        tcp.read_line(TIMEOUT),
        None,
        "{what}: closed after {line:?}"
    );
    (line, after)
}

#[test]
fn tcp_ingest_bounds_connections_before_auth() {
    let _deadline = Deadline::new(
        "tcp_ingest_bounds_connections_before_auth",
        Duration::from_secs(60),
    );
    let server = Server::start(&[
        "--ingest-key",
        KEY,
        "--ingest-auth-timeout",
        "2",
        "--max-tcp-ingest-connections",
        "2",
    ]);

    // 65,000 bytes and no newline: refused after the first 512, not held until a newline.
    let mut flood = server.tcp_ingest();
    let start = Instant::now();
    flood.send_raw(&vec![b'x'; 65_000]);
    let (line, after) = refusal(&mut flood, start, "65,000 bytes without AUTH");
    assert_eq!(line, "ERR unauthorized");
    assert!(
        after < Duration::from_secs(2),
        "refused after {after:?}, not at once"
    );

    // Nothing at all: cut at --ingest-auth-timeout 2.
    let mut silent = server.tcp_ingest();
    let (line, after) = refusal(&mut silent, Instant::now(), "a silent connection");
    assert_eq!(line, "ERR auth timeout");
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(5),
        "cut after {after:?}"
    );
    drop((flood, silent));
    server.wait_for_metric(
        "ringcast_tcp_ingest_connections",
        "the refused connections are gone",
        TIMEOUT,
        |v| v == 0.0,
    );

    // Two authorized publishers fill --max-tcp-ingest-connections 2; a third is refused
    // at once, and gets in once one of them left.
    let publisher = || {
        let mut tcp = server.tcp_ingest();
        tcp.send_raw(format!("AUTH {KEY}\nACK ON\nbounded {{}}\n").as_bytes());
        let ok = tcp.read_line(TIMEOUT).expect("a reply to a publish");
        assert!(ok.starts_with("OK "), "{ok:?}");
        tcp
    };
    let first = publisher();
    let _second = publisher();
    let mut third = server.tcp_ingest();
    let (line, _) = refusal(&mut third, Instant::now(), "a third connection");
    assert_eq!(line, "ERR too many ingest connections");
    drop(first);
    server.wait_for_metric(
        "ringcast_tcp_ingest_connections",
        "the first publisher left",
        TIMEOUT,
        |v| v == 1.0,
    );
    drop(publisher());

    let m = server.metrics();
    for (reason, n) in [("auth_timeout", 1.0), ("max_connections", 1.0)] {
        assert_eq!(
            m.sum_where("ringcast_tcp_ingest_refused_total", &[("reason", reason)]),
            n,
            "{}",
            m.describe("ringcast_tcp_ingest_refused_total")
        );
    }
    assert_eq!(
        m.sum_where("ringcast_ingest_unauthorized_total", &[("source", "tcp")]),
        1.0,
        "the flood counts as a missing key"
    );
}
