//! SIGHUP under load: 1,000 WebSocket subscribers (a Python `websockets` fleet, one
//! process) stay connected while the configuration file changes a per-IP limit and the
//! origin allowlist. After the reload new connections meet the new limit and the new
//! origin list; then a broken file is refused with the key's name in the log and the
//! previous configuration stays in force. None of the 1,000 is dropped: each receives,
//! in order and without a gap, the message published before the reloads, after the good
//! one and after the refused one.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::admin::http_publish_offset;
use crate::common::*;

const FLEET: usize = 1000;
const CHANNEL: &str = "hup1k";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Connects from `source`, sends an upgrade (with `Origin: origin` when given) and
/// returns the answer's status and the socket.
fn upgrade(addr: SocketAddr, source: &str, origin: Option<&str>) -> (u16, TcpStream) {
    let mut stream = per_ip::connect_from(source, addr);
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let request = format!(
        "GET /ws?channels={CHANNEL} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{origin}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending an upgrade from {source}: {e}"));
    let (head, _) = http::read_head(&mut stream, Instant::now() + TIMEOUT)
        .unwrap_or_else(|e| panic!("no answer to an upgrade from {source}: {e}"));
    (head.status, stream)
}

/// [`upgrade`]'s status; the socket is closed on return.
fn upgrade_status(addr: SocketAddr, source: &str, origin: Option<&str>) -> u16 {
    upgrade(addr, source, origin).0
}

/// The server still counts at least the fleet's connections (the fleet's own summary
/// at the end says which subscriber, if any, was closed).
fn fleet_still_connected(server: &Server, step: &str) {
    let m = server.metrics();
    assert!(
        m.sum("ringcast_connections") >= FLEET as f64,
        "{step}: ringcast_connections {} < {FLEET}\n{}",
        m.sum("ringcast_connections"),
        m.describe("ringcast_connections_closed_total")
    );
}

/// What the origin and per-IP rules answer right now, as (source, origin, status).
fn check_admission(server: &Server, expected: &[(&str, Option<&str>, u16)], step: &str) {
    for (source, origin, status) in expected {
        assert_eq!(
            upgrade_status(server.ws_addr(), source, *origin),
            *status,
            "{step}: an upgrade from {source} with Origin {origin:?}\n{}",
            server.log()
        );
    }
}

#[test]
fn sighup_reload_keeps_1k_clients() {
    let _deadline = Deadline::new("sighup_reload_keeps_1k_clients", Duration::from_secs(180));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ringcast.toml");
    write_file(
        &path,
        "max_connections_per_ip = 1100\nallowed_origins = [\"https://a.example\"]\n",
    );
    let mut server = Server::start(&["--config", path.to_str().expect("utf-8 path")]);

    // Three messages: before the reloads, after the applied one, after the refused one.
    let mut fleet = ExternalFleet::spawn(
        ClientKind::Python,
        &server.ws_url(&[CHANNEL]),
        FLEET,
        3,
        Duration::from_secs(120),
    );
    fleet.wait_ready(Duration::from_secs(60));
    server.wait_for_connections(FLEET, Duration::from_secs(30));
    let first = http_publish_offset(&server, CHANNEL, r#"{"step":"before"}"#);

    // The start's rules: 127.0.0.1 holds 1000 of its 1100; only origin a is allowed
    // (a client without Origin, like the fleet, is allowed by default).
    let before = [
        ("127.0.0.1", None, 101),
        ("127.0.0.3", Some("https://a.example"), 101),
        ("127.0.0.3", Some("https://b.example"), 403),
        ("127.0.0.3", Some("https://x.c.example"), 403),
    ];
    check_admission(&server, &before, "at start");

    // Lower the per-IP limit to what 127.0.0.1 holds and swap the origin list.
    write_file(
        &path,
        "max_connections_per_ip = 1000\n\
         allowed_origins = [\"https://b.example\", \"https://*.c.example\"]\n",
    );
    server.hup_and_wait("ok", 1.0, TIMEOUT);
    let log = server.log();
    assert!(
        log.contains("config reloaded: applied allowed_origins, max_connections_per_ip"),
        "the reload's log line names both keys:\n{log}"
    );
    let after = [
        ("127.0.0.1", None, 503),
        ("127.0.0.2", None, 101),
        ("127.0.0.3", Some("https://a.example"), 403),
        ("127.0.0.3", Some("https://b.example"), 101),
        ("127.0.0.3", Some("https://x.c.example"), 101),
    ];
    check_admission(&server, &after, "after the reload");
    let m = server.metrics();
    assert!(
        m.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "per_ip")]
        ) >= 1.0,
        "{}",
        m.describe("ringcast_connections_refused_total")
    );
    fleet_still_connected(&server, "after the reload");
    http_publish_offset(&server, CHANNEL, r#"{"step":"reloaded"}"#);

    // A broken file (one bad origin entry, and a per-IP limit that would change) is
    // refused as a whole, named by its key; the reloaded rules stay.
    write_file(
        &path,
        "max_connections_per_ip = 5000\n\
         allowed_origins = [\"https://a.example\", \"ftp:/nowhere\"]\n",
    );
    server.hup_and_wait("error", 1.0, TIMEOUT);
    assert!(server.is_running(), "a bad file must not stop the server");
    let log = server.log();
    assert!(
        log.contains("config reload refused")
            && log.contains("invalid value for `allowed_origins`")
            && log.contains("the running configuration stays"),
        "the refusal names the key:\n{log}"
    );
    check_admission(&server, &after, "after the refused reload");
    fleet_still_connected(&server, "after the refused reload");
    let last = http_publish_offset(&server, CHANNEL, r#"{"step":"refused"}"#);
    assert_eq!(last, first + 2, "three messages, consecutive offsets");

    let summary = fleet.finish(Duration::from_secs(60));
    summary.assert_every_subscriber_got(&[(CHANNEL, first, last)]);
    let m = server.metrics();
    assert_eq!(
        m.sum_where("ringcast_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    println!(
        "{FLEET} subscribers kept through one applied and one refused reload; \
         refused by reason: {}",
        m.describe("ringcast_connections_refused_total")
    );
}

/// With every per-IP limit off at start the process keeps no per-address counts: a reload
/// that turns one on says it needs a restart and applies the rest.
#[test]
fn per_ip_limit_off_at_start_needs_a_restart() {
    let _deadline = Deadline::new(
        "per_ip_limit_off_at_start_needs_a_restart",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ringcast.toml");
    write_file(&path, "max_connections = 100\n");
    let server = Server::start(&["--config", path.to_str().expect("utf-8 path")]);
    write_file(&path, "max_connections = 50\nmax_connections_per_ip = 1\n");
    server.hup_and_wait("ok", 1.0, TIMEOUT);
    let log = server.log();
    assert!(
        log.contains("`max_connections_per_ip` changed but needs a restart")
            && log.contains("config reloaded: applied max_connections"),
        "{log}"
    );
    let held: Vec<TcpStream> = (0..2)
        .map(|i| {
            let (status, stream) = upgrade(server.ws_addr(), "127.0.0.2", None);
            assert_eq!(status, 101, "connection {i}: the per-IP limit stays off");
            stream
        })
        .collect();
    server.wait_for_connections(held.len(), TIMEOUT);
}
