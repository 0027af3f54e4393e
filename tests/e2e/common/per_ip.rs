//! Clients from chosen loopback source addresses (127.0.0.2, 127.0.0.3, …), so the server
//! sees distinct addresses for its per-address limits and PROXY checks, and the 503 these
//! limits answer with.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use super::http::HttpResponse;

/// A WebSocket upgrade request for `channel` (a fixed key; nothing after the head).
pub fn upgrade_request(channel: &str) -> String {
    format!(
        "GET /ws?channels={channel} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A socket connected from `source` (port chosen by the kernel) to `addr`, TCP_NODELAY.
pub fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let local: SocketAddr = format!("{source}:0").parse().expect("source address");
    socket
        .bind(&SockAddr::from(local))
        .unwrap_or_else(|e| panic!("binding a client socket to {local}: {e}"));
    socket
        .connect_timeout(&SockAddr::from(addr), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting from {source} to {addr}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// Asserts `head` is a refusal for a limit: 503 with a Retry-After header.
pub fn assert_refused_503(head: &HttpResponse, what: &str) {
    assert_eq!(head.status, 503, "{what}: {} {}", head.status, head.reason);
    assert!(
        head.header("retry-after").is_some(),
        "{what}: 503 without Retry-After: {:?}",
        head.headers
    );
}
