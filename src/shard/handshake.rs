//! The upgrade: a short-lived glommio task per accepted stream reads the HTTP request,
//! answers `101` (or an HTTP error) and hands the socket to the connection table
//! ([`crate::shard::conn`]), after which no task exists for the connection.
//!
//! `handshake_timeout` is one deadline for the whole upgrade, from accept to the answer
//! written: a per-read timeout would let a client sending one byte every few seconds
//! (slowloris) hold the task for hours. Admission ([`crate::shard::admission`]) bounds
//! how many upgrades a shard runs at once and reserves the connection slot before `101`;
//! an upgrade whose place the shard gives to another address (`handshake_fair_share`) is
//! cancelled and answered `503`.
//!
//! The token is checked here, before the slot and the `101`: a bad, expired or forged
//! token, or none where anonymous connections are not allowed, is answered `401` with the
//! reason as the body ([`crate::auth::AuthSettings::admit`]).

use crate::auth::token::Claims;
use crate::metrics::RefuseCause;
use crate::proto::origin::OriginPolicy;
use crate::proto::position::Position;
use crate::proto::sse::{sse_head, HttpStream, Mode};
use crate::proto::upgrade::{accept_response, parse_upgrade_with_cookie, Endpoint, HttpReject};
use crate::shard::admission::{
    refusal_response_with, refuse_now, HandshakeTicket, SlotReservation,
};
use crate::shard::conn::{adopt, adopt_stream, Carried};
use crate::shard::proxy::admit_proxied;
use crate::shard::state::Shard;
use crate::tls::TlsSession;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// What a finished handshake hands to the connection table.
struct Upgraded {
    channels: Vec<String>,
    /// The verified token's claims; `None`: anonymous.
    claims: Option<Claims>,
    leftover: Vec<u8>,
    slot: SlotReservation,
    /// `/sse` and `/poll`: the transport's encoder, the position to resume from and a
    /// poll's deadline.
    stream: Option<(HttpStream, Option<Position>, Option<Instant>)>,
    /// `/ws`: the position the URL's `since` resumes its channels from.
    since: Option<Position>,
}

/// How an upgrade task's wait ended.
enum Ended<T> {
    /// The upgrade finished: upgraded, or answered with an error (`None`).
    Done(Option<T>),
    /// `handshake_timeout` passed first.
    TimedOut,
    /// The shard gave its place to another address (`handshake_fair_share`).
    Evicted,
}

/// Upgrades an accepted TCP connection and adopts it into the shard.
///
/// `ticket` holds the stream's place under `max_handshakes_per_shard` until this returns;
/// `accepted` is when the listener accepted the stream (the handshake duration's start).
pub async fn upgrade(
    shard: Rc<Shard>,
    stream: TcpStream,
    ticket: HandshakeTicket,
    accepted: Instant,
) {
    upgrade_over(shard, stream, ticket, accepted, None).await
}

/// Like [`upgrade`] for a connection to the TLS listener: the TLS handshake first (under
/// the same `handshake_timeout`, after a trusted proxy's PROXY header), then the same HTTP
/// upgrade over the decrypted bytes.
pub async fn upgrade_tls(
    shard: Rc<Shard>,
    stream: TcpStream,
    ticket: HandshakeTicket,
    accepted: Instant,
    config: Arc<rustls::ServerConfig>,
) {
    upgrade_over(shard, stream, ticket, accepted, Some(config)).await
}

async fn upgrade_over(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    mut ticket: HandshakeTicket,
    accepted: Instant,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let table_fd = ticket.take_table_fd();
    let mut ip_hold = ticket.take_ip_hold();
    let proxied = ticket.take_proxied();
    let eviction = ticket.eviction();
    let plain = tls.is_none();
    let deadline = shard.settings.handshake_timeout;
    let work = async {
        // Behind a trusted proxy: its PROXY header first, within the same deadline.
        let mut head = Vec::new();
        if let Some(proxied) = proxied {
            // Closed or refused (counted where it happened).
            let Some((hold, rest)) = admit_proxied(&shard, &mut stream, proxied).await else {
                return Ended::Done(None);
            };
            ip_hold = hold;
            head = rest;
        }
        Ended::Done(match tls {
            None => {
                let upgraded = handshake(&shard, &mut stream, head).await;
                // Frames are written whole, each as soon as it is due.
                let _ = stream.set_nodelay(true);
                upgraded.map(|u| (u, stream, None))
            }
            Some(config) => tls_handshake(&shard, stream, head, config).await,
        })
    };
    let timeout = async {
        glommio::timer::sleep(deadline).await;
        Ended::TimedOut
    };
    let evicted = async {
        eviction.wait().await;
        Ended::Evicted
    };
    let outcome = futures_lite::future::or(futures_lite::future::or(work, timeout), evicted).await;
    drop(ticket);
    let (mut upgraded, stream, tls) = match outcome {
        Ended::Done(Some(upgraded)) => {
            let micros = accepted.elapsed().as_micros();
            shard
                .all_metrics
                .record_handshake(shard.id, u64::try_from(micros).unwrap_or(u64::MAX));
            upgraded
        }
        // Answered with an HTTP error (or the peer went away): counted where it happened.
        Ended::Done(None) => return,
        Ended::TimedOut => {
            // Closed without an answer: a client this slow would not read one either.
            shard
                .engine
                .metrics
                .handshakes_timed_out
                .fetch_add(1, Relaxed);
            return;
        }
        Ended::Evicted => {
            // The stream went with the cancelled upgrade; the table's duplicate of its
            // descriptor still holds the socket. A TLS client would read a plain-text
            // 503 as a TLS error: it is only closed.
            match table_fd.as_ref().filter(|_| plain) {
                Some(fd) => refuse_now(
                    fd.as_raw_fd(),
                    RefuseCause::HandshakeShare,
                    shard.engine.metrics,
                ),
                None => {
                    shard.engine.metrics.refused[RefuseCause::HandshakeShare as usize]
                        .fetch_add(1, Relaxed);
                }
            }
            return;
        }
    };
    // The glommio stream would keep an io_uring poll armed and its own state alive; the
    // table keeps only a plain descriptor.
    // SAFETY: the descriptor is open for the duration of this borrow (the stream owns it
    // and is dropped only after the duplicate exists).
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let Some(fd) = table_fd.or_else(|| borrowed.try_clone_to_owned().ok()) else {
        // `upgraded.slot` drops here and gives the slot back.
        return;
    };
    drop(stream);
    let tls = tls.map(|(session, plain)| {
        // Plaintext decrypted past the request head is the connection's first input: no
        // epoll edge would report it.
        upgraded.leftover.extend_from_slice(&plain);
        Box::new(session)
    });
    // From here the table owns the slot and releases it when the connection leaves it.
    upgraded.slot.adopt();
    let mut channels = upgraded.channels;
    if let Some(claims) = upgraded
        .claims
        .as_ref()
        .filter(|_| shard.live().auth.subscribe_user_channel)
    {
        let own = format!("user:{}", claims.sub);
        // A `sub` that makes no valid channel name (over 123 bytes, or characters channel
        // names do not allow) gets no user channel.
        if crate::proto::channel::is_valid_channel(own.as_bytes()) && !channels.contains(&own) {
            channels.push(own);
        }
    }
    if let Some(hold) = ip_hold.as_mut() {
        hold.upgraded();
    }
    match upgraded.stream {
        None => adopt(
            &shard,
            fd,
            &channels,
            upgraded.claims,
            upgraded.since.as_ref(),
            upgraded.leftover,
            Carried {
                ip_hold,
                tls,
                poll_deadline: None,
            },
        ),
        Some((stream, since, poll_deadline)) => adopt_stream(
            &shard,
            fd,
            &channels,
            upgraded.claims,
            stream,
            since.as_ref(),
            Carried {
                ip_hold,
                tls,
                poll_deadline,
            },
        ),
    }
    shard.settle();
}

/// Reads and answers the upgrade request (`head`: bytes of it already read). Returns the
/// channels, any bytes the client sent after the request head and the reserved connection
/// slot, or `None` when the connection got an HTTP error or failed.
async fn handshake<S>(shard: &Shard, stream: &mut S, mut head: Vec<u8>) -> Option<Upgraded>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    head.reserve(512);
    let mut chunk = vec![0u8; 2048];
    // One snapshot for the whole upgrade, whatever a reload does meanwhile.
    let live = shard.live();
    let upgrade = loop {
        if head.is_empty() {
            let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            head.extend_from_slice(&chunk[..n]);
        }
        let cookie = live.auth.cookie.as_deref();
        match parse_upgrade_with_cookie(
            &head,
            shard.settings.max_subscriptions_per_connection,
            cookie,
        ) {
            Ok(Some(upgrade)) => break upgrade,
            Ok(None) => {
                let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
                head.extend_from_slice(&chunk[..n]);
            }
            Err(reject) => {
                shard
                    .engine
                    .metrics
                    .handshake_rejected
                    .fetch_add(1, Relaxed);
                let cors = match &reject.cors {
                    Some(origin) if live.origins.allows(origin.as_deref()) => {
                        live.origins.cors_headers(origin.as_deref())
                    }
                    _ => String::new(),
                };
                let _ = answer(stream, &reject.response_with(&cors)).await;
                return None;
            }
        }
    };
    let origin = upgrade.origin.as_deref();
    if !live.origins.allows(origin) {
        shard
            .engine
            .metrics
            .handshake_rejected
            .fetch_add(1, Relaxed);
        let reject = HttpReject::new(403, OriginPolicy::refusal(origin));
        let _ = answer(stream, &reject.response()).await;
        return None;
    }
    // The HTTP transports answer an allowed origin with CORS headers, errors included
    // (so a page's script can read why).
    let http = !matches!(upgrade.endpoint, Endpoint::WebSocket);
    let cors = if http {
        live.origins.cors_headers(origin)
    } else {
        String::new()
    };
    if upgrade.endpoint == Endpoint::Preflight {
        let _ = answer(stream, &live.origins.preflight_response(origin)).await;
        return None;
    }
    let claims = match live.auth.admit(upgrade.token.as_deref(), shard.unix_now()) {
        Ok(claims) => claims,
        Err(e) => {
            shard.engine.metrics.auth_failures[e.index()].fetch_add(1, Relaxed);
            shard
                .engine
                .metrics
                .handshake_rejected
                .fetch_add(1, Relaxed);
            let reject = HttpReject::new(401, format!("unauthorized: {e}"));
            let _ = answer(stream, &reject.response_with(&cors)).await;
            return None;
        }
    };
    let slot = if shard.draining.get() {
        Err(RefuseCause::Draining)
    } else {
        // Reserved before `101` is written: a storm over every shard cannot overshoot.
        shard.slots.try_reserve().ok_or(RefuseCause::MaxConnections)
    };
    let slot = match slot {
        Ok(slot) => slot,
        Err(cause) => {
            shard.engine.metrics.refused[cause as usize].fetch_add(1, Relaxed);
            let _ = answer(stream, &refusal_response_with(cause, &cors)).await;
            return None;
        }
    };
    let (response, http_stream) = match upgrade.endpoint {
        Endpoint::Sse => {
            // Reconnects spread over a second rather than all at once after a restart.
            let retry_ms =
                1000 + u64::from(std::process::id() ^ shard.engine.next_generation()) % 1000;
            let channels = &upgrade.channels;
            let encoder = HttpStream::new(Mode::Sse, channels, upgrade.since.as_ref());
            (sse_head(&cors, retry_ms), Some((encoder, None)))
        }
        Endpoint::Poll { timeout } => {
            // The answer (head included) is written once known. The heartbeat tick
            // answers at `at` (within its 100 ms); the shard-second deadline is a backstop
            // (whole seconds: +1 so it never comes before the timeout).
            let at = Instant::now() + Duration::from_secs(u64::from(timeout));
            let deadline = shard.now_secs().saturating_add(timeout + 1);
            let since = upgrade.since.as_ref();
            let encoder = HttpStream::poll(deadline, &upgrade.channels, since, &cors);
            (Vec::new(), Some((encoder, Some(at))))
        }
        Endpoint::WebSocket | Endpoint::Preflight => (accept_response(&upgrade.key), None),
    };
    // On failure `slot` drops and the slot is given back.
    answer(stream, &response).await.ok()?;
    let leftover = head.split_off(upgrade.head_len);
    let (stream, since) = match http_stream {
        Some((s, poll_deadline)) => (Some((s, upgrade.since, poll_deadline)), None),
        None => (None, upgrade.since),
    };
    Some(Upgraded {
        channels: upgrade.channels,
        claims,
        leftover,
        slot,
        stream,
        since,
    })
}

/// Writes an answer and flushes it (a TLS stream only encrypts on write).
async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The TLS handshake, then the HTTP upgrade over it; the plain stream and the rustls
/// connection come back for the table. `early`: bytes already read after a PROXY header
/// (the start of the ClientHello). Counts handshakes that succeeded and failed.
async fn tls_handshake(
    shard: &Shard,
    stream: TcpStream,
    early: Vec<u8>,
    config: Arc<rustls::ServerConfig>,
) -> Option<(Upgraded, TcpStream, Option<(TlsSession, Vec<u8>)>)> {
    // Handshake flights are small writes each waited for: no Nagle delay between them.
    let _ = stream.set_nodelay(true);
    let stream = Prefixed {
        early,
        at: 0,
        inner: stream,
    };
    let mut tls = match crate::tls::stream::accept(config, stream).await {
        Ok(tls) => {
            shard.engine.metrics.tls_handshakes[0].fetch_add(1, Relaxed);
            tls
        }
        Err(e) => {
            shard.engine.metrics.tls_handshakes[1].fetch_add(1, Relaxed);
            tracing::debug!(shard = shard.id, error = %e, "TLS handshake failed");
            return None;
        }
    };
    let upgraded = handshake(shard, &mut tls, Vec::new()).await?;
    let (stream, session, plain) = tls.into_parts();
    Some((upgraded, stream.inner, Some((session, plain))))
}

/// A stream whose first bytes were already read (after a PROXY header): they are read
/// again first, then the stream itself.
struct Prefixed {
    early: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let early = &this.early[this.at..];
        if !early.is_empty() {
            let n = early.len().min(buf.len());
            buf[..n].copy_from_slice(&early[..n]);
            this.at += n;
            if this.at == this.early.len() {
                this.early = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
