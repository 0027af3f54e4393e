//! Every listener of the process, bound before any shard starts, so a bad address or a
//! port held by another process fails the start with its name and nothing half-runs.
//! Each shard gets its own SO_REUSEPORT socket of every listener; the admin port is
//! shard 0's alone.

use crate::config::Settings;
use crate::shard::listener::{tcp_listeners, udp_sockets, BindError};
use crate::shard::ShardSockets;
use socket2::Socket;

/// Accept queue of the ingest and admin listeners (the WebSocket one uses
/// `listen_backlog`).
const SMALL_BACKLOG: u32 = 1024;

/// Binds every configured listener once per shard.
///
/// # Errors
/// The first [`BindError`], naming the listener and address.
pub(super) fn bind(settings: &Settings) -> Result<Vec<ShardSockets>, BindError> {
    let n = settings.shards;
    let mut ws = tcp_listeners(
        "WebSocket listener",
        settings.listen,
        settings.listen_backlog,
        n,
    )?
    .into_iter();
    let mut tls = optional(settings.live.tls.as_ref().map(|t| t.listen), n, |a| {
        tcp_listeners("TLS listener", a, settings.listen_backlog, n)
    })?;
    let mut udp = optional(settings.udp_ingest, n, |a| udp_sockets("UDP ingest", a, n))?;
    let mut tcp = optional(settings.tcp_ingest, n, |a| {
        tcp_listeners("TCP ingest", a, SMALL_BACKLOG, n)
    })?;
    let mut admin = tcp_listeners("admin HTTP", settings.admin, SMALL_BACKLOG, 1)?.into_iter();
    Ok((0..n)
        .map(|_| ShardSockets {
            ws: ws.next(),
            tls: tls.next().flatten(),
            udp: udp.next().flatten(),
            tcp: tcp.next().flatten(),
            admin: admin.next(),
        })
        .collect())
}

/// One socket per shard from `bind` when the listener is configured, else `None` for
/// every shard.
fn optional(
    addr: Option<std::net::SocketAddr>,
    n: usize,
    bind: impl FnOnce(std::net::SocketAddr) -> Result<Vec<Socket>, BindError>,
) -> Result<std::vec::IntoIter<Option<Socket>>, BindError> {
    let sockets: Vec<Option<Socket>> = match addr {
        Some(a) => bind(a)?.into_iter().map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    };
    Ok(sockets.into_iter())
}
