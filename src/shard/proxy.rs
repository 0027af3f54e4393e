//! Reading the PROXY header a trusted load balancer sends before the client's bytes, on
//! any WebSocket-port listener (it comes before TLS where there is TLS).
//!
//! The parsing is [`crate::proto::proxy`]; this is the loop that feeds it from a socket.
//! It runs inside the upgrade task, under the same `handshake_timeout` deadline, and the
//! bytes read past the header (usually the HTTP request, sent in the same segment) are
//! handed on, never lost.

use crate::admission::per_ip::PerIpHold;
use crate::metrics::ShardMetrics;
use crate::proto::proxy::{parse, Parsed, ProxyError, ProxyHeader, Versions};
use crate::shard::admission::{per_ip_cause, refuse_now, ProxiedPeer};
use crate::shard::state::Shard;
use futures_lite::{AsyncRead, AsyncReadExt};
use glommio::net::TcpStream;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Why no client address came out of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyReadError {
    /// The peer closed before sending anything: a TCP health check, not counted.
    Closed,
    /// The header was missing or bad (counted under its reason).
    Invalid(ProxyError),
}

/// Reads the header from `stream` (whose TCP peer is `peer`, a trusted proxy) and returns
/// the client's address (the peer's own for `PROXY UNKNOWN` and v2 LOCAL) and the bytes
/// read after the header.
///
/// # Errors
/// [`ProxyReadError`]; an invalid header is also counted in
/// `ringcast_proxy_header_errors_total` and logged at debug. The caller closes the
/// connection without an answer.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    versions: Versions,
    peer: SocketAddr,
    metrics: &ShardMetrics,
) -> Result<(SocketAddr, Vec<u8>), ProxyReadError> {
    let result = read_header(stream, versions, peer).await;
    if let Err(ProxyReadError::Invalid(e)) = result {
        metrics.proxy_header_errors[e as usize].fetch_add(1, Relaxed);
        tracing::debug!(%peer, reason = e.label(), "closing connection from a trusted proxy: {e}");
    }
    result
}

async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    versions: Versions,
    peer: SocketAddr,
) -> Result<(SocketAddr, Vec<u8>), ProxyReadError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(ProxyReadError::Closed),
            Ok(0) | Err(_) => return Err(ProxyReadError::Invalid(ProxyError::Truncated)),
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf, versions).map_err(ProxyReadError::Invalid)? {
            // The parser refuses anything longer than its bounds before asking for
            // more, so `buf` stays within 16 + V2_MAX_PAYLOAD + one chunk.
            Parsed::Incomplete => continue,
            Parsed::Complete { header, consumed } => {
                let client = match header {
                    ProxyHeader::Proxied { source, .. } => source,
                    ProxyHeader::Local => peer,
                };
                return Ok((client, buf.split_off(consumed)));
            }
        }
    }
}

/// For a socket from a trusted proxy: reads the header, then admits the client it names
/// under the per-address limits. Returns the client's place there (`None` when no limit
/// is on) and the bytes after the header, or `None` when the socket was closed or refused
/// (answered `503` like any per-address refusal).
pub(crate) async fn admit_proxied(
    shard: &Shard,
    stream: &mut TcpStream,
    proxied: ProxiedPeer,
) -> Option<(Option<PerIpHold>, Vec<u8>)> {
    let (client, rest) =
        read_proxy_header(stream, proxied.versions, proxied.peer, shard.engine.metrics)
            .await
            .ok()?;
    let hold = match &proxied.per_ip {
        None => None,
        Some(table) => match table.admit(client.ip(), Instant::now()) {
            Ok(hold) => Some(hold),
            Err(refusal) => {
                refuse_now(
                    stream.as_raw_fd(),
                    per_ip_cause(refusal),
                    shard.engine.metrics,
                );
                return None;
            }
        },
    };
    Some((hold, rest))
}
