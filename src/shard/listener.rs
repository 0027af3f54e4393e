//! Listening sockets, built by hand so every shard gets its own SO_REUSEPORT socket with
//! the accept queue we ask for (glommio's own `TcpListener::bind` hard-codes 1024).

use crate::admission::accept_backoff::{AcceptBackoff, AcceptError};
use crate::config::Settings;
use glommio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

/// A bind failure with the context an operator needs.
#[derive(Debug, thiserror::Error)]
#[error("binding {what} on {addr}: {source}{hint}")]
pub struct BindError {
    /// Which listener.
    pub what: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: io::Error,
    /// What to change, when we can tell.
    pub hint: &'static str,
}

fn bind_error(what: &'static str, addr: SocketAddr, source: io::Error) -> BindError {
    let hint = match source.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            " (another process holds this port: stop it or choose another address)"
        }
        Some(libc::EACCES) => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
        Some(libc::EADDRNOTAVAIL) => " (no local interface has this address)",
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            " (out of file descriptors: raise LimitNOFILE, see kernel-tuning/)"
        }
        _ => "",
    };
    BindError {
        what,
        addr,
        source,
        hint,
    }
}

fn socket_for(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

/// Fails with EADDRINUSE when another socket already holds `addr`.
///
/// SO_REUSEPORT lets any process of the same user bind the same port and silently take
/// half the traffic; a second ringcast started by mistake must fail instead. A probe
/// bound without SO_REUSEPORT conflicts with every existing holder of the port.
fn ensure_free(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(false)?;
    }
    probe.bind(&SockAddr::from(addr))
}

/// Binds one socket per shard on `addr`, after checking no other process holds it.
///
/// # Errors
/// [`BindError`] with the address and a hint.
pub fn tcp_listeners(
    what: &'static str,
    addr: SocketAddr,
    backlog: u32,
    count: usize,
) -> Result<Vec<Socket>, BindError> {
    ensure_free(addr, Type::STREAM, Protocol::TCP).map_err(|e| bind_error(what, addr, e))?;
    (0..count)
        .map(|_| tcp_listener(what, addr, backlog))
        .collect()
}

/// Binds one UDP socket per shard on `addr`, after checking no other process holds it.
///
/// # Errors
/// [`BindError`] with the address and a hint.
pub fn udp_sockets(
    what: &'static str,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<Socket>, BindError> {
    ensure_free(addr, Type::DGRAM, Protocol::UDP).map_err(|e| bind_error(what, addr, e))?;
    (0..count).map(|_| udp_socket(what, addr)).collect()
}

/// A TCP listener with SO_REUSEPORT and an accept queue of `backlog`.
///
/// # Errors
/// [`BindError`] with the address and a hint.
fn tcp_listener(what: &'static str, addr: SocketAddr, backlog: u32) -> Result<Socket, BindError> {
    (|| {
        let socket = socket_for(addr, Type::STREAM, Protocol::TCP)?;
        socket.bind(&SockAddr::from(addr))?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        Ok(socket)
    })()
    .map_err(|e| bind_error(what, addr, e))
}

/// A UDP socket with SO_REUSEPORT (the kernel spreads senders over shards).
///
/// # Errors
/// [`BindError`] with the address and a hint.
fn udp_socket(what: &'static str, addr: SocketAddr) -> Result<Socket, BindError> {
    (|| {
        let socket = socket_for(addr, Type::DGRAM, Protocol::UDP)?;
        // Bursts of datagrams land here while the shard is busy fanning out: give the
        // kernel room (capped by net.core.rmem_max, see kernel-tuning/).
        let _ = socket.set_recv_buffer_size(4 << 20);
        socket.bind(&SockAddr::from(addr))?;
        Ok(socket)
    })()
    .map_err(|e| bind_error(what, addr, e))
}

/// Accepts on `listener` forever and spawns `handle` for every connection whose source
/// may use ingest/admin ports (loopback or `ingest_allow`, as of the last reload); others
/// are closed at once.
pub async fn accept_allowed<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    settings: &Settings,
    handle: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut live = crate::live::Cached::new(settings);
    let mut backoff = AcceptBackoff::new();
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff.on_success();
                let live = live.get();
                if stream
                    .peer_addr()
                    .is_ok_and(|a| live.ingest_allowed(a.ip()))
                {
                    glommio::spawn_local(handle(stream)).detach();
                }
            }
            Err(e) => {
                // Same pause and log budget as the WebSocket listener: out of descriptors
                // this loop would otherwise log ten lines a second.
                let kind = AcceptError::from_errno(e.raw_os_error());
                let pause = backoff.on_error(Instant::now());
                if let Some(errors) = pause.log {
                    tracing::warn!(error = %e, errors, "{what} accept failed; retrying: {}", kind.fix());
                }
                glommio::timer::sleep(pause.sleep).await;
            }
        }
    }
}
