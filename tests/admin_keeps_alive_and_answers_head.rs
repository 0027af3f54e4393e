//! The admin port keeps HTTP/1.1 connections alive (several requests, publishes
//! included, on one socket, until `Connection: close`) and answers `HEAD` on its
//! read-only endpoints with the headers `GET` would get and no body.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

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
