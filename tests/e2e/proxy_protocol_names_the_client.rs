//! `proxy_protocol` + `trusted_proxies`: behind an L4 balancer the PROXY header (v1 text
//! or v2 binary) names the client, and the per-IP limits count that address; a trusted
//! peer with a bad or missing header is closed and counted; an untrusted peer is served
//! as a plain client and cannot set its address with a header. The last part puts a real
//! HAProxy (`send-proxy-v2`) in front.
//!
//! Every server here runs with `max_connections_per_ip = 1`, so "admitted" and "refused"
//! show which address the server counted. Clients bind 127.0.0.2, 127.0.0.3, ... to be
//! told apart over loopback; the trusted proxy is 127.0.0.1.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::per_ip::connect_from;
use crate::common::*;

const UPGRADE: &str = "GET /ws?channels=px HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
     Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
     Sec-WebSocket-Version: 13\r\n\r\n";

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v1(source: &str, sport: u16) -> Vec<u8> {
    let family = if source.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if source.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {family} {source} {dst} {sport} 8080\r\n").into_bytes()
}

/// A v2 PROXY header for `source`, with one TLV (AWS's VPC endpoint id) to skip.
fn v2(source: &str, sport: u16) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let mut payload = Vec::new();
    let fam = match source.parse::<IpAddr>().expect("source ip") {
        IpAddr::V4(ip) => {
            payload.extend_from_slice(&ip.octets());
            payload.extend_from_slice(&[127, 0, 0, 1]);
            0x11
        }
        IpAddr::V6(ip) => {
            payload.extend_from_slice(&ip.octets());
            payload.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    payload.extend_from_slice(&sport.to_be_bytes());
    payload.extend_from_slice(&8080u16.to_be_bytes());
    let tlv = b"\x01vpce-08d2bf15fac5001c9";
    payload.push(0xea);
    payload.extend_from_slice(&(tlv.len() as u16).to_be_bytes());
    payload.extend_from_slice(tlv);
    out.extend_from_slice(&[0x21, fam]);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The v2 LOCAL command (a balancer's health check): no address.
fn v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

/// Sends `header` and the upgrade in one write from `source`; the answer's status and the
/// socket (kept open by the caller to hold the connection).
fn upgrade_with(source: &str, addr: SocketAddr, header: &[u8]) -> (u16, TcpStream) {
    let mut stream = connect_from(source, addr);
    let bytes = [header, UPGRADE.as_bytes()].concat();
    stream
        .write_all(&bytes)
        .unwrap_or_else(|e| panic!("sending a header and an upgrade from {source}: {e}"));
    let (head, _) = http::read_head(&mut stream, Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "no answer to {:?} + upgrade from {source}: {e}",
                String::from_utf8_lossy(header)
            )
        });
    (head.status, stream)
}

/// Reads until the server closes the socket (EOF or reset) and returns what it sent;
/// panics if it is still open after `bound`.
fn read_to_close(stream: &mut TcpStream, bound: Duration, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + bound;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: still open after {bound:?}");
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return got,
        }
    }
}

fn refused_per_ip(server: &Server) -> f64 {
    server.metrics().sum_where(
        "ringcast_connections_refused_total",
        &[("reason", "per_ip")],
    )
}

#[test]
fn proxy_protocol_names_the_client() {
    let _deadline = Deadline::new("proxy_protocol_names_the_client", Duration::from_secs(120));
    let server = Server::start(&[
        "--proxy-protocol",
        "any",
        "--trusted-proxies",
        "127.0.0.1/32",
        "--max-connections-per-ip",
        "1",
    ]);
    headers_name_the_client(&server);
    bad_headers_are_closed_and_counted(&server);
    untrusted_peers_are_plain_clients(&server);
    behind_haproxy_send_proxy_v2();
}

/// From the trusted 127.0.0.1: connections whose headers name different clients are all
/// admitted under a limit of one per address; a second one naming the same client is
/// refused (v1 or v2 alike). UNKNOWN and LOCAL count as the proxy's own address.
fn headers_name_the_client(server: &Server) {
    let addr = server.ws_addr();
    let mut held = Vec::new();
    for (header, what) in [
        (v1("203.0.113.1", 40001), "v1 for 203.0.113.1"),
        (v1("203.0.113.2", 40002), "v1 for 203.0.113.2"),
        (v2("203.0.113.3", 40003), "v2 for 203.0.113.3"),
        (v2("2001:db8:1::7", 40004), "v2 for 2001:db8:1::7"),
        (v1("2001:db8:2::7", 40005), "v1 for 2001:db8:2::7"),
        (
            b"PROXY UNKNOWN\r\n".to_vec(),
            "v1 UNKNOWN (the proxy's own address)",
        ),
    ] {
        let (status, stream) = upgrade_with("127.0.0.1", addr, &header);
        assert_eq!(status, 101, "{what}: its client has no other connection");
        held.push(stream);
    }
    server.wait_for_connections(held.len(), Duration::from_secs(5));
    for (header, what) in [
        (
            v2("203.0.113.1", 41001),
            "v2 for 203.0.113.1, already connected over v1",
        ),
        (
            v1("203.0.113.3", 41003),
            "v1 for 203.0.113.3, already connected over v2",
        ),
        // Same /64 as 2001:db8:1::7.
        (
            v1("2001:db8:1::8", 41004),
            "v1 for 2001:db8:1::8 (same /64)",
        ),
        (
            v2_local(),
            "v2 LOCAL: 127.0.0.1 already holds its place through UNKNOWN",
        ),
    ] {
        let (status, _) = upgrade_with("127.0.0.1", addr, &header);
        assert_eq!(status, 503, "{what}");
    }
    assert_eq!(
        refused_per_ip(server),
        4.0,
        "{}",
        server
            .metrics()
            .describe("ringcast_connections_refused_total")
    );

    // A header arriving in pieces, the request after it in another segment.
    let mut stream = connect_from("127.0.0.1", addr);
    let header = v2("203.0.113.50", 40050);
    for piece in [&header[..5], &header[5..14], &header[14..20], &header[20..]] {
        stream
            .write_all(piece)
            .expect("sending a piece of the header");
        std::thread::sleep(Duration::from_millis(20));
    }
    stream
        .write_all(UPGRADE.as_bytes())
        .expect("sending the upgrade");
    let (head, _) = http::read_head(&mut stream, Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no answer to a header sent in pieces: {e}"));
    assert_eq!(head.status, 101, "a header sent in pieces");
    held.push(stream);
    server.wait_for_connections(held.len(), Duration::from_secs(5));
    drop(held);
    server.wait_for_connections(0, Duration::from_secs(10));
}

/// Bad or missing headers from the trusted proxy: closed without an answer, counted by
/// reason; a good client right after is served.
fn bad_headers_are_closed_and_counted(server: &Server) {
    let addr = server.ws_addr();
    let mut bad_v2_version = v2("203.0.113.9", 1);
    bad_v2_version[12] = 0x31;
    let cases: [(Vec<u8>, &str); 5] = [
        (Vec::new(), "missing"),
        (
            b"PROXY TCP4 203.0.113.300 127.0.0.1 1 2\r\n".to_vec(),
            "malformed",
        ),
        (
            b"PROXY TCP4 203.0.113.1 127.0.0.1 01 2\r\n".to_vec(),
            "malformed",
        ),
        (
            [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 120]].concat(),
            "too_long",
        ),
        (bad_v2_version, "version"),
    ];
    for (header, reason) in &cases {
        let mut stream = connect_from("127.0.0.1", addr);
        let bytes = [header.as_slice(), UPGRADE.as_bytes()].concat();
        stream.write_all(&bytes).expect("sending a bad header");
        let got = read_to_close(
            &mut stream,
            Duration::from_secs(5),
            &format!("a {reason} header"),
        );
        assert!(
            got.is_empty(),
            "a {reason} header is closed without an answer, got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // Cut short: the header's first half, then the client leaves.
    let mut stream = connect_from("127.0.0.1", addr);
    stream
        .write_all(&v2("203.0.113.9", 1)[..20])
        .expect("half a header");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    read_to_close(&mut stream, Duration::from_secs(5), "a truncated header");

    let m = server.wait_for_metric(
        "ringcast_proxy_header_errors_total",
        "every bad header is counted",
        Duration::from_secs(5),
        |v| v == cases.len() as f64 + 1.0,
    );
    assert_eq!(m, 6.0);
    let m = server.metrics();
    for (reason, n) in [
        ("missing", 1.0),
        ("malformed", 2.0),
        ("too_long", 1.0),
        ("version", 1.0),
        ("truncated", 1.0),
    ] {
        assert_eq!(
            m.sum_where("ringcast_proxy_header_errors_total", &[("reason", reason)]),
            n,
            "{}",
            m.describe("ringcast_proxy_header_errors_total")
        );
    }
    // A health check that connects and leaves without a byte is not an error.
    drop(connect_from("127.0.0.1", addr));
    let (status, held) = upgrade_with("127.0.0.1", addr, &v1("203.0.113.20", 40020));
    assert_eq!(status, 101, "a good header after the bad ones");
    assert_eq!(
        server.metrics().sum("ringcast_proxy_header_errors_total"),
        6.0
    );
    drop(held);
    server.wait_for_connections(0, Duration::from_secs(10));
}

/// 127.0.0.2 is not in trusted_proxies: its plain upgrade is served and counted under its
/// own address (a second one is refused), and a PROXY header from it is not honoured (the
/// request is answered as bad HTTP, never as the address it claims).
fn untrusted_peers_are_plain_clients(server: &Server) {
    let addr = server.ws_addr();
    let before = refused_per_ip(server);
    let (status, held) = upgrade_with("127.0.0.2", addr, b"");
    assert_eq!(status, 101, "a plain upgrade from an untrusted peer");
    let (status, _) = upgrade_with("127.0.0.2", addr, b"");
    assert_eq!(
        status, 503,
        "a second plain upgrade from 127.0.0.2 (limit 1)"
    );
    assert_eq!(refused_per_ip(server), before + 1.0);
    for header in [v1("203.0.113.77", 1), v2("203.0.113.77", 1)] {
        let (status, _) = upgrade_with("127.0.0.3", addr, &header);
        assert!(
            (400..500).contains(&status),
            "a PROXY header from an untrusted peer is not a request: got {status}"
        );
    }
    assert_eq!(
        server.metrics().sum("ringcast_proxy_header_errors_total"),
        6.0,
        "untrusted peers are not counted as bad headers"
    );
    drop(held);
}

/// A real HAProxy with `send-proxy-v2` in front: clients at 127.0.0.2 and 127.0.0.3 all
/// reach ringcast from HAProxy's 127.0.0.1, yet the per-IP limit of one counts them
/// apart.
fn behind_haproxy_send_proxy_v2() {
    let server = Server::start(&[
        "--proxy-protocol",
        "v2",
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
    ]);
    let front = free_tcp_port();
    let dir = tempfile::tempdir().expect("creating a scratch directory");
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend ws\n  bind 127.0.0.1:{front}\n  default_backend ringcast\n\
             backend ringcast\n  server rc1 {} send-proxy-v2\n",
            server.ws_addr()
        ),
    )
    .expect("writing haproxy.cfg");
    let haproxy = HaProxy::start(&config);
    let front_addr: SocketAddr = format!("127.0.0.1:{front}").parse().expect("front address");
    wait_until(Duration::from_secs(10), "HAProxy listens", || {
        TcpStream::connect(front_addr).ok()
    });
    let (a, held_a) = upgrade_with("127.0.0.2", front_addr, b"");
    assert_eq!(a, 101, "127.0.0.2 through HAProxy");
    let (b, held_b) = upgrade_with("127.0.0.3", front_addr, b"");
    assert_eq!(b, 101, "127.0.0.3 through HAProxy: counted apart from 127.0.0.2 although both arrive from 127.0.0.1");
    let (c, _) = upgrade_with("127.0.0.2", front_addr, b"");
    assert_eq!(
        c, 503,
        "a second connection of 127.0.0.2 through HAProxy (limit 1)"
    );
    assert_eq!(refused_per_ip(&server), 1.0);
    assert_eq!(
        server.metrics().sum("ringcast_proxy_header_errors_total"),
        0.0,
        "HAProxy's headers all parse"
    );
    drop((held_a, held_b));
    drop(haproxy);
}

/// HAProxy in the foreground, killed (by its pid) on drop.
struct HaProxy(Child);

impl HaProxy {
    fn start(config: &std::path::Path) -> HaProxy {
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        crate::common::server::die_with_parent(&mut command);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("starting haproxy (install it: apt-get install haproxy, as scripts/test.sh does): {e}")
        });
        HaProxy(child)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
