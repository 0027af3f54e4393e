//! The admin port keeps HTTP/1.1 connections alive (several requests, publishes
//! included, on one socket, until `Connection: close`) and answers `HEAD` on its
//! read-only endpoints with the headers `GET` would get and no body.
//!
//! It also bounds what a client can hold: a request must be whole within
//! `admin_request_timeout` (408 otherwise, and an idle connection is closed quietly), a
//! publish without the key is refused before its body is read, and past
//! `max_admin_connections` a new connection gets 503. Regression: the timeout applied to
//! each read, so a client sending a byte every few seconds held its connection for ever,
//! and any number of connections could be open.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn send(stream: &mut TcpStream, request: &str) {
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending {request:?}: {e}"));
}

#[test]
fn admin_keeps_alive_and_answers_head() {
    let _deadline = Deadline::new(
        "admin_keeps_alive_and_answers_head",
        Duration::from_secs(60),
    );
    let key = "admin-key-0123456789abcdef";
    let server = Server::start(&["--ingest-key", key]);
    let mut sub = server.subscribe(&["alive"]);
    server.wait_for_connections(1, TIMEOUT);
    let mut stream = TcpStream::connect_timeout(&server.admin_addr(), TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to the admin port: {e}"));

    send(&mut stream, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = http::read_response(&mut stream, Instant::now() + TIMEOUT).expect("GET /healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    assert_eq!(
        r.header("connection"),
        Some("keep-alive"),
        "{:?}",
        r.headers
    );

    for path in ["/metrics", "/healthz", "/readyz"] {
        send(
            &mut stream,
            &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        let (head, rest) =
            http::read_head(&mut stream, Instant::now() + TIMEOUT).expect("HEAD answer");
        assert_eq!(head.status, 200, "HEAD {path}: {:?}", head.headers);
        let length: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path} without Content-Length: {:?}", head.headers));
        assert!(length > 0, "HEAD {path} announces the GET body's length");
        assert!(rest.is_empty(), "HEAD {path} sent a body: {rest:?}");
    }

    // Two publishes on the same connection (no scrape key grants this: the Bearer does).
    for n in 1..=2 {
        let body = format!("{{\"n\":{n}}}");
        send(
            &mut stream,
            &format!(
                "POST /publish?channel=alive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        let r = http::read_response(&mut stream, Instant::now() + TIMEOUT).expect("publish");
        assert_eq!(
            r.status,
            200,
            "publish {n} on a kept-alive connection: {}",
            r.text()
        );
    }
    let got = sub.collect(2, TIMEOUT);
    assert_eq!(got[0].data["n"], 1);
    assert_eq!(got[1].data["n"], 2);

    // Connection: close ends it after the answer.
    send(
        &mut stream,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let r = http::read_response(&mut stream, Instant::now() + TIMEOUT).expect("GET /readyz");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut tail = Vec::new();
    let n = stream
        .read_to_end(&mut tail)
        .expect("the server closes after Connection: close");
    assert_eq!(n, 0, "bytes after the last answer: {tail:?}");
}

/// Reads until the server closes `stream`; how long that took and what it sent, or
/// `None` when it is still open after `bound`.
fn closed_within(stream: &mut TcpStream, bound: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while start.elapsed() < bound {
        let left = bound
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return Some((start.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some((start.elapsed(), got)),
        }
    }
    None
}

fn connect_admin(server: &Server) -> TcpStream {
    let stream = TcpStream::connect_timeout(&server.admin_addr(), TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to the admin port: {e}"));
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// The metrics, or `None` when the scrape is not answered 200; scrapes answered 503 are
/// counted in `refused`: until the server has seen the test's connections close, a
/// scrape can be the one past `max_admin_connections`, and is refused (and counted) like
/// any other.
fn scrape_counting(server: &Server, refused: &mut f64) -> Option<Metrics> {
    let r = server.admin_get("/metrics").ok()?;
    if r.status == 503 {
        *refused += 1.0;
    }
    (r.status == 200).then(|| Metrics::parse(&r.text()))
}

#[test]
fn admin_bounds_slow_requests_and_connections() {
    let _deadline = Deadline::new(
        "admin_bounds_slow_requests_and_connections",
        Duration::from_secs(60),
    );
    let key = "admin-key-0123456789abcdef";
    let server = Server::start(&[
        "--admin-request-timeout",
        "2",
        "--max-admin-connections",
        "3",
        "--ingest-key",
        key,
    ]);

    // A request sent one byte every 300 ms never finishes: 408 two seconds after accept,
    // not a fresh 2 s per byte.
    let mut trickle = connect_admin(&server);
    let mut writer = trickle.try_clone().expect("cloning the socket");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let sender = thread::spawn(move || {
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" {
            if stopped.load(Ordering::Relaxed) || writer.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    let r = http::read_response(&mut trickle, Instant::now() + Duration::from_secs(6))
        .expect("a 408 for a request trickling in one byte every 300 ms");
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("admin_request_timeout")),
        "{}",
        r.text()
    );

    // A connection that sends nothing is closed quietly at the deadline.
    let mut idle = connect_admin(&server);
    let (after, got) = closed_within(&mut idle, Duration::from_secs(6))
        .expect("an idle admin connection outlived --admin-request-timeout 2 by 4 s");
    assert!(
        got.is_empty(),
        "an idle connection is closed without an answer: {got:?}"
    );
    assert!(
        after >= Duration::from_millis(1500),
        "closed after {after:?}"
    );

    // A publish without the key is answered 401 at its head: its 60,000-byte body is
    // neither waited for nor buffered.
    let mut unkeyed = connect_admin(&server);
    send(
        &mut unkeyed,
        "POST /publish?channel=x HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{",
    );
    let r = http::read_response(&mut unkeyed, Instant::now() + Duration::from_secs(1))
        .expect("a 401 before the body");
    assert_eq!(r.status, 401, "{}", r.text());
    drop((trickle, idle, unkeyed));
    let mut refused_scrapes = 0.0;
    wait_until(TIMEOUT, "only the scrape itself is open", || {
        scrape_counting(&server, &mut refused_scrapes)
            .filter(|m| m.sum("ringcast_admin_connections") == 1.0)
    });

    // Three open connections fill --max-admin-connections 3: the fourth gets 503 with a
    // JSON reason and Retry-After, at once.
    let held: Vec<TcpStream> = (0..3).map(|_| connect_admin(&server)).collect();
    let mut fourth = connect_admin(&server);
    let r = http::read_response(&mut fourth, Instant::now() + TIMEOUT)
        .expect("an answer past max_admin_connections");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_admin_connections")),
        "{}",
        r.text()
    );
    drop(held);
    let m = wait_until(TIMEOUT, "the admin port serves again", || {
        scrape_counting(&server, &mut refused_scrapes)
            .filter(|m| m.sum("ringcast_admin_connections") == 1.0)
    });
    // The fourth connection, and any scrape of the waits above that came too early.
    let past_max = 1.0 + refused_scrapes;
    for (reason, n) in [("max_connections", past_max), ("request_timeout", 1.0)] {
        assert_eq!(
            m.sum_where("ringcast_admin_refused_total", &[("reason", reason)]),
            n,
            "{}",
            m.describe("ringcast_admin_refused_total")
        );
    }
}
