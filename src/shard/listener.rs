//! Listening sockets, built by hand so every shard gets its own SO_REUSEPORT socket with
//! the accept queue we ask for (glommio's own `TcpListener::bind` hard-codes 1024), and
//! the accept loop of the ingest and admin ports with its connection cap.

use crate::admission::accept_backoff::{AcceptBackoff, AcceptError, LOG_INTERVAL};
use crate::admission::log_budget::LogBudget;
use crate::config::Settings;
use crate::live::Live;
use crate::shard::admission::{answer_now, ConnectionSlots, SlotReservation};
use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The cap on one ingest or admin port's open connections (`max_tcp_ingest_connections`,
/// `max_admin_connections`), and what a connection past it is told.
pub struct PortCap {
    /// The port's open connections (process-wide for TCP ingest, which every shard
    /// serves).
    pub slots: Arc<ConnectionSlots>,
    /// The limit in force, read from the live settings (a reload changes it).
    pub limit: fn(&Live) -> usize,
    /// The answer a connection past the cap gets before it is closed.
    pub refusal: Vec<u8>,
    /// Counts refusals.
    pub refused: &'static AtomicU64,
    /// Open connections (gauge).
    pub open: &'static AtomicU64,
    /// The configuration key that sets the limit, for the log line.
    pub setting: &'static str,
}

/// One connection's place under a [`PortCap`]; given back when the connection ends.
pub struct PortSlot {
    _slot: SlotReservation,
    open: &'static AtomicU64,
}

impl Drop for PortSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends a connection whose peer may still be sending (a refused publisher, an unframed
/// request): shuts the write side (the answer is already written), then reads and
/// discards input for at most `linger` and 1 MiB in all, however it trickles in. Closing
/// with unread input makes the kernel reset the connection, which can destroy the answer
/// before the peer reads it.
pub async fn linger_close(stream: &mut TcpStream, linger: Duration) {
    let drain = async {
        let _ = stream.shutdown(std::net::Shutdown::Write).await;
        // On the heap: a buffer in the future would size every connection's task by it.
        let mut sink = vec![0u8; 4096];
        let mut left: usize = 1 << 20;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    };
    futures_lite::future::or(drain, glommio::timer::sleep(linger)).await;
}

/// Accepts on `listener` forever and spawns `handle` for every connection whose source
/// may use ingest/admin ports (loopback or `ingest_allow`, as of the last reload); others
/// are closed at once. Past `cap`, a connection is answered `cap.refusal` and closed
/// without a task; a warning says so at most every 10 s.
pub async fn accept_allowed<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    settings: &Settings,
    cap: PortCap,
    handle: F,
) where
    F: Fn(TcpStream, PortSlot) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut live = crate::live::Cached::new(settings);
    let mut backoff = AcceptBackoff::new();
    let mut refusals = LogBudget::new(LOG_INTERVAL);
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff.on_success();
                if live.refresh() {
                    cap.slots.set_limit((cap.limit)(live.get()));
                }
                if !stream
                    .peer_addr()
                    .is_ok_and(|a| live.get().ingest_allowed(a.ip()))
                {
                    continue;
                }
                match cap.slots.try_reserve() {
                    Some(slot) => {
                        cap.open.fetch_add(1, Ordering::Relaxed);
                        let slot = PortSlot {
                            _slot: slot,
                            open: cap.open,
                        };
                        glommio::spawn_local(handle(stream, slot)).detach();
                    }
                    None => {
                        cap.refused.fetch_add(1, Ordering::Relaxed);
                        answer_now(stream.as_raw_fd(), &cap.refusal);
                        if let Some(refused) = refusals.event(Instant::now()) {
                            let (setting, limit) = (cap.setting, cap.slots.limit());
                            tracing::warn!(refused, limit, "{what}: {limit} connections open ({setting}); refusing new ones until some close (logged at most every 10 s)");
                        }
                    }
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
