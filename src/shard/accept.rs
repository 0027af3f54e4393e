//! The accept loop of one shard's WebSocket (or TLS) listener: the accept rate limit, the
//! per-address admission, the handshake gate, then an upgrade task per admitted socket;
//! accept errors (out of descriptors, kernel memory) pause accepting instead of failing.

use crate::admission::accept_backoff::{AcceptBackoff, AcceptError};
use crate::admission::per_ip::PerIpTable;
use crate::admission::token_bucket::TokenBucket;
use crate::metrics::RefuseCause;
use crate::shard::admission::{per_ip_cause, refuse_now, HandshakeGate, ProxiedPeer};
use crate::shard::follower::LocalEvent;
use crate::shard::handshake;
use crate::shard::state::Shard;
use glommio::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Accepts on `listener` until `stop` fires (the drain), then closes it; `tls` sends each
/// admitted socket to the TLS upgrade instead of the plain one.
pub(super) async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    gate: Rc<HandshakeGate>,
    per_ip: Option<Arc<PerIpTable>>,
    stop: Rc<LocalEvent>,
    tls: bool,
) {
    // A refusal on the TLS port is counted and closed: a plain-text 503 would only be a
    // TLS error to the client.
    let refuse = |fd, cause: RefuseCause| {
        if tls {
            shard.engine.metrics.refused[cause as usize].fetch_add(1, Ordering::Relaxed);
        } else {
            refuse_now(fd, cause, shard.engine.metrics);
        }
    };
    let accept = async {
        let mut live = crate::live::Cached::new(&shard.settings);
        let mut backoff = AcceptBackoff::new();
        let rate = shard.settings.accept_rate_per_shard;
        let burst = (rate / 10).max(1);
        let mut bucket = TokenBucket::full(burst, Instant::now());
        loop {
            if rate > 0 {
                // Not accepting is the limit: the rest stay in the kernel's accept queue.
                let wait = bucket.wait_secs(Instant::now(), rate, burst);
                if wait > 0.0 {
                    glommio::timer::sleep(Duration::from_secs_f64(wait)).await;
                }
                let _ = bucket.try_take(Instant::now(), rate, burst);
            }
            match listener.accept().await {
                Ok(stream) => {
                    // The handshake duration runs from here to the answer written.
                    let accepted = Instant::now();
                    if live.refresh() {
                        gate.set_limit(live.get().max_handshakes_per_shard);
                        gate.set_fair_share(live.get().handshake_fair_share);
                    }
                    // The table's own descriptor, taken now: out of descriptors, this
                    // client waits here (and the rest in the kernel's accept queue)
                    // rather than getting `101` and then losing the connection.
                    let table_fd = loop {
                        // SAFETY: the stream owns the descriptor for this whole borrow.
                        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
                        match borrowed.try_clone_to_owned() {
                            Ok(fd) => break Some(fd),
                            Err(e) => {
                                let kind = AcceptError::from_errno(e.raw_os_error());
                                if kind == AcceptError::Other {
                                    break None;
                                }
                                pause_accepting(&shard, &mut backoff, kind, &e).await;
                            }
                        }
                    };
                    let peer = stream.peer_addr().ok();
                    // A trusted proxy's client is known only after its PROXY header:
                    // admitted by that address in the upgrade task instead.
                    let proxied = peer.and_then(|peer| {
                        let versions = shard.settings.proxy_header_from(peer.ip())?;
                        Some(ProxiedPeer {
                            versions,
                            peer,
                            per_ip: per_ip.clone(),
                        })
                    });
                    let ip_hold = match (&per_ip, peer) {
                        (Some(table), Some(peer)) if proxied.is_none() => {
                            match table.admit(peer.ip(), Instant::now()) {
                                Ok(hold) => Some(hold),
                                Err(refusal) => {
                                    refuse(stream.as_raw_fd(), per_ip_cause(refusal));
                                    backoff.on_success();
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    // The address the fair share counts: a trusted proxy's sockets stand
                    // for many clients and are never counted against one.
                    let source = match (&proxied, peer) {
                        (None, Some(peer)) => Some(shard.settings.per_ip.key(peer.ip())),
                        _ => None,
                    };
                    match (gate.try_enter(source), table_fd) {
                        (Some(ticket), Some(fd)) => {
                            let mut ticket = ticket.with_table_fd(fd);
                            if let Some(hold) = ip_hold {
                                ticket = ticket.with_ip_hold(hold);
                            }
                            if let Some(proxied) = proxied {
                                ticket = ticket.with_proxied(proxied);
                            }
                            if tls {
                                // The newest certificate (SIGHUP), else the start's.
                                let config = live
                                    .get()
                                    .tls
                                    .as_ref()
                                    .or(shard.settings.live.tls.as_ref())
                                    .map(|t| t.server_config.clone());
                                if let Some(config) = config {
                                    let upgrade = handshake::upgrade_tls(
                                        shard.clone(),
                                        stream,
                                        ticket,
                                        accepted,
                                        config,
                                    );
                                    glommio::spawn_local(upgrade).detach();
                                }
                            } else {
                                glommio::spawn_local(handshake::upgrade(
                                    shard.clone(),
                                    stream,
                                    ticket,
                                    accepted,
                                ))
                                .detach();
                            }
                        }
                        (Some(_), None) => {} // closed: the socket is already unusable
                        (None, _) => refuse(stream.as_raw_fd(), RefuseCause::HandshakesInFlight),
                    }
                }
                Err(e) => {
                    // Out of descriptors or kernel memory: the queued connection stays in
                    // the kernel's accept queue; open connections are not touched.
                    let kind = AcceptError::from_errno(e.raw_os_error());
                    pause_accepting(&shard, &mut backoff, kind, &e).await;
                    continue;
                }
            }
            backoff.on_success();
        }
    };
    futures_lite::future::or(accept, stop.wait()).await;
    drop(listener);
}

/// Counts an accept-side resource error, logs it if this interval has no line yet, and
/// sleeps for the backoff's pause.
async fn pause_accepting(
    shard: &Shard,
    backoff: &mut AcceptBackoff,
    kind: AcceptError,
    error: &dyn std::fmt::Display,
) {
    shard.engine.metrics.accept_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    let pause = backoff.on_error(Instant::now());
    if let Some(errors) = pause.log {
        tracing::warn!(
            shard = shard.id,
            error = %error,
            reason = kind.label(),
            errors,
            pause_ms = pause.sleep.as_millis() as u64,
            "accept failed; not accepting for a while, open connections are kept: {}",
            kind.fix()
        );
    }
    glommio::timer::sleep(pause.sleep).await;
}
