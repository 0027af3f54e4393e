//! A PROXY header on the TLS port: read on the plain socket before the TLS handshake,
//! even when the ClientHello arrives in the same segment (the bytes read past the header
//! go into the handshake), and the address it names is the one the per-IP limits count.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A Python stdlib client: sends `PROXY TCP4 <source> ...` with MSG_MORE so that the
/// ClientHello leaves in the same segment, then an SSE request over TLS; prints the
/// status line and keeps the stream open until killed.
const CLIENT: &str = r#"
import socket, ssl, sys
port, ca, source = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.send(("PROXY TCP4 %s 127.0.0.1 40000 443\r\n" % source).encode(), socket.MSG_MORE)
try:
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.sendall(b"GET /sse?channels=news HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = t.recv(4096).split(b"\r\n")[0].decode()
except (OSError, ssl.SSLError) as e:
    head = "closed: %s" % type(e).__name__
print(head or "closed: eof", flush=True)
sys.stdin.read()
"#;

/// Starts one client claiming `source`; returns it with the status line it printed.
fn client(port: u16, ca: &Path, source: &str) -> (Child, String) {
    let mut command = Command::new("python3");
    command
        .args(["-c", CLIENT, &port.to_string()])
        .arg(ca)
        .arg(source)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    server::die_with_parent(&mut command);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); scripts/test.sh installs it"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("reading the client's status line");
    (child, line.trim().to_string())
}

#[test]
fn a_proxy_header_before_tls_names_the_client() {
    let _deadline = Deadline::new(
        "a_proxy_header_before_tls_names_the_client",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = tls::self_signed(dir.path(), "c");
    let (server, port) = tls::start(
        &cert,
        &key,
        &[
            "--proxy-protocol",
            "v1",
            "--trusted-proxies",
            "127.0.0.0/8",
            "--max-connections-per-ip",
            "1",
        ],
    );

    let (mut first, status) = client(port, &cert, "192.0.2.7");
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", server.log());
    // The same claimed source again: over its per-IP limit (closed on the TLS port).
    let (mut again, status) = client(port, &cert, "192.0.2.7");
    assert!(
        status.starts_with("closed"),
        "a second 192.0.2.7 was served: {status}"
    );
    // Another claimed source from the same TCP peer is served.
    let (mut other, status) = client(port, &cert, "192.0.2.8");
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", server.log());

    let metrics = server.metrics();
    assert_eq!(metrics.sum("ringcast_proxy_header_errors_total"), 0.0);
    assert!(
        metrics.sum_where("ringcast_tls_handshakes_total", &[("result", "ok")]) >= 2.0,
        "{}",
        metrics.describe("ringcast_tls_handshakes_total")
    );
    for child in [&mut first, &mut again, &mut other] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
