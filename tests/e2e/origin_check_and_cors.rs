//! The `Origin` check: `allowed_origins` (exact origins and `https://*.domain` patterns)
//! and `allow_missing_origin` decide who may upgrade; a refused origin gets 403 with the
//! documented body, on the WebSocket upgrade as on the HTTP transports.

use std::time::Duration;

use crate::common::*;

fn upgrade_request(server: &Server, origin: Option<&str>) -> http::HttpResponse {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let req = format!(
        "GET /ws?channels=news HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{origin}\r\n"
    );
    let mut stream = std::net::TcpStream::connect(server.ws_addr()).expect("connect");
    std::io::Write::write_all(&mut stream, req.as_bytes()).expect("send upgrade");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (mut resp, rest) = http::read_head(&mut stream, deadline).expect("upgrade answer");
    if resp.status != 101 {
        resp.body = rest;
        while let Ok(n) = http::read_some(&mut stream, &mut resp.body, deadline) {
            if n == 0 {
                break;
            }
        }
    }
    resp
}

#[test]
fn websocket_upgrades_follow_allowed_origins() {
    let _deadline = Deadline::new(
        "websocket_upgrades_follow_allowed_origins",
        Duration::from_secs(60),
    );
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.good.test",
        "--allow-missing-origin",
        "false",
    ]);
    for ok in ["https://app.example.com", "https://a.good.test"] {
        let resp = upgrade_request(&server, Some(ok));
        assert_eq!(resp.status, 101, "{ok}: {resp:?}");
    }
    let refused = upgrade_request(&server, Some("https://evil.test"));
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        refused.text(),
        "forbidden: origin https://evil.test is not allowed\n"
    );
    let missing = upgrade_request(&server, None);
    assert_eq!(missing.status, 403, "{missing:?}");
    assert!(missing.text().contains("without an Origin"), "{missing:?}");
}

#[test]
fn by_default_every_origin_and_none_may_upgrade() {
    let _deadline = Deadline::new(
        "by_default_every_origin_and_none_may_upgrade",
        Duration::from_secs(60),
    );
    let server = Server::start(&[]);
    assert_eq!(upgrade_request(&server, Some("https://x.test")).status, 101);
    assert_eq!(upgrade_request(&server, None).status, 101);
}

#[test]
fn a_malformed_allowed_origin_is_refused_at_startup() {
    let out = std::process::Command::new(Server::binary())
        .args(["--allowed-origins", "example.com", "--shards", "1"])
        .output()
        .expect("run ringcast");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allowed_origins"), "{err}");
}
