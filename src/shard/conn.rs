//! A connection's life on its shard after the upgrade: the driver around its state
//! machine.
//!
//! Once upgraded ([`crate::shard::handshake`]), the socket is adopted into the shard's
//! connection table and epoll set: from then on the connection is driven by readiness
//! events ([`on_ready`]), the fan-out path and the heartbeat sweep, with no task of its
//! own. Every decision (what to answer, when to close, what a frame violates) is made by
//! the connection's sans-io [`crate::proto::conn::Connection`]; this module only moves
//! bytes between it and the socket and carries its decisions out.
//!
//! Closes are decided in many places (a protocol error, the fan-out's slow-consumer
//! policy, the heartbeat sweep, a drain) but carried out in one: [`Shard::settle`] removes
//! the connection from the index and from presence (sending leave events), queues the
//! close frame after whatever was partly written, shuts the write side once it is out and
//! lingers until the peer's EOF (bounded), so input still in flight does not turn the
//! close into a reset.

use crate::admission::per_ip::PerIpHold;
use crate::auth::registry::ConnRecord;
use crate::auth::session::{expiry_second, Session};
use crate::auth::token::Claims;
use crate::engine::CloseOrder;
use crate::proto::command::Reply;
use crate::proto::conn::{Answer, Connection, Eof, Phase};
use crate::proto::frame::{encode_frame, opcode};
use crate::proto::position::Position;
use crate::proto::sse::HttpStream;
use crate::shard::join::Joining;
use crate::shard::readiness::Ready;
use crate::shard::send::Flush;
use crate::shard::state::Shard;
use crate::shard::table::{token, untoken, Conn};
use crate::tls::TlsSession;
use nix::sys::socket::{recv, MsgFlags};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Input read per readiness event before yielding to other connections; the socket is
/// re-armed so the rest is read on the next round.
pub(super) const MAX_READ_PER_EVENT: usize = 1 << 20;

/// How long a closing connection may take to receive its close frame and answer with
/// EOF, in shard seconds; then its socket is closed regardless.
pub const LINGER_SECS: u32 = 5;

/// While it lives, subscriptions on this shard do not make their connection a presence
/// member (see [`Shard::presence_in`]).
struct QuietPresence<'a>(&'a Shard);

impl<'a> QuietPresence<'a> {
    fn new(shard: &'a Shard) -> Self {
        shard.engine.quiet_presence.set(true);
        QuietPresence(shard)
    }
}

impl Drop for QuietPresence<'_> {
    fn drop(&mut self) {
        self.0.engine.quiet_presence.set(false);
    }
}

/// What a connection brings to the table besides its socket: its place under the per-IP
/// limits, from the TLS listener its rustls session, and for a long poll its deadline.
#[derive(Default)]
pub(crate) struct Carried {
    pub ip_hold: Option<PerIpHold>,
    pub tls: Option<Box<TlsSession>>,
    pub poll_deadline: Option<Instant>,
}

/// Registers an upgraded socket in the table, index, registry and epoll set, subscribes
/// the upgrade's channels (a channel the identity may not use gets a 403 reply instead),
/// then handles any bytes the client sent after the request head.
pub(crate) fn adopt(
    shard: &Shard,
    fd: OwnedFd,
    channels: &[String],
    claims: Option<Claims>,
    since: Option<&Position>,
    mut leftover: Vec<u8>,
    carried: Carried,
) {
    let Some(key) = insert(shard, fd, claims, None, carried) else {
        return;
    };
    let mut conns = shard.engine.conns.borrow_mut();
    let Some(conn) = conns.get_mut(key) else {
        return;
    };
    let generation = conn.generation;
    // Something was queued for the client (a refusal, a recovery's reply): write it.
    let mut answered = false;
    for ch in channels {
        let at = since.and_then(|p| p.get(ch));
        // parse_upgrade refused lists over max_subscriptions_per_connection.
        match shard.may_subscribe(conn.machine.session(), ch) {
            Ok(()) if shard.inbox_for(ch).is_some() => {
                // Live messages only once the unacked ones are in (see shard::inbox).
                if let Some(inbox) = &shard.routes.inbox {
                    if let Err(reply) =
                        shard.inbox_subscribe(inbox, key, generation, ch, None, at, 0)
                    {
                        answered = true;
                        let frame = encode_frame(opcode::TEXT, reply.as_bytes());
                        shard.engine.queue_control(key, conn, frame);
                    }
                }
            }
            Ok(())
                if matches!(
                    shard.cluster_join(shard.conn_id(key, generation), ch, None, at, at.is_some()),
                    Joining::Waiting
                ) =>
            {
                // Cluster: subscribed once this node follows the channel (shard::join).
            }
            Ok(()) if at.is_some() => {
                // Resumed from the URL's position: answered like `subscribe` with `since`.
                let id = shard.conn_id(key, generation);
                let mut replay = Vec::new();
                let session = conn.machine.session();
                let reply = shard.subscribe_at(id, session, ch, None, at, &mut replay);
                shard
                    .engine
                    .queue_control(key, conn, encode_frame(opcode::TEXT, reply.as_bytes()));
                conn.machine.queue_replay(replay);
                answered = true;
            }
            Ok(()) => {
                let mut index = shard.engine.index.borrow_mut();
                // The first subscriber here: where the channel is, for an overrun heal
                // (later ones are at the position the follower keeps).
                let first = index.members(ch).is_empty();
                let at = first.then(|| {
                    shard
                        .engine
                        .publisher
                        .attach(ch, None, shard.engine.ring_cursor.get(), 0)
                        .offset
                });
                let added = index.subscribe(key, ch);
                if let Some(at) = at {
                    index.note_position(ch, at);
                }
                drop(index);
                if added {
                    let id = shard.conn_id(key, generation);
                    shard.presence_in(id, conn.machine.session(), ch);
                }
            }
            Err((code, reason)) => {
                answered = true;
                let reply = Reply::Refused {
                    kind: "subscribe",
                    id: None,
                    channel: Some(ch),
                    code,
                    error: &reason,
                };
                let frame = encode_frame(opcode::TEXT, reply.to_json().as_bytes());
                shard.engine.queue_control(key, conn, frame);
            }
        }
    }
    shard.engine.lag_inexact_attaches(key, conn);
    if !leftover.is_empty() {
        receive(shard, key, conn, &mut leftover);
    } else if answered && conn.machine.is_open() {
        shard.flush_or_close(key, conn);
    }
}

/// Registers an HTTP-transport connection (`/sse`, `/poll`; its `200` head already
/// written) like [`adopt`], then subscribes its channels the way a `subscribe` command
/// with `since` does: a reply per channel (403 for a channel it may not use), each
/// followed by the messages it missed since its entry in `since`, all re-encoded by
/// `stream`. A poll with something to say answers at once.
pub(crate) fn adopt_stream(
    shard: &Shard,
    fd: OwnedFd,
    channels: &[String],
    claims: Option<Claims>,
    stream: HttpStream,
    since: Option<&Position>,
    carried: Carried,
) {
    let poll_deadline = carried.poll_deadline;
    let Some(key) = insert(shard, fd, claims, Some(stream), carried) else {
        return;
    };
    let mut conns = shard.engine.conns.borrow_mut();
    let Some(conn) = conns.get_mut(key) else {
        return;
    };
    let generation = conn.generation;
    let id = shard.conn_id(key, generation);
    if let Some(at) = poll_deadline {
        shard.engine.poll_deadline(at, key, generation);
    }
    // A long poll is a connection per request: as a presence member it would join and
    // leave at every poll (and its own join would answer it at once). Polls read
    // presence events but are not members.
    let _quiet = conn.machine.is_poll().then(|| QuietPresence::new(shard));
    for ch in channels {
        let at = since.and_then(|p| p.get(ch));
        let session = conn.machine.session();
        let mut replay = Vec::new();
        let reply = match shard.may_subscribe(session, ch) {
            Ok(()) => match shard.inbox_for(ch).zip(shard.routes.inbox.as_ref()) {
                // Answered when the store has the unacked messages (see shard::inbox).
                Some((_, inbox)) => {
                    // The index holds no position for an inbox channel: the stream keeps
                    // its encoder (and position) for as long as it lives.
                    conn.machine.keep_position();
                    shard
                        .inbox_subscribe(inbox, key, generation, ch, None, at, 0)
                        .err()
                        .unwrap_or_default()
                }
                // Cluster: answered once this node follows the channel (shard::join).
                None => match shard.cluster_join(id, ch, None, at, true) {
                    Joining::Waiting => String::new(),
                    Joining::Refused(reply) => reply,
                    Joining::Local => shard.subscribe_at(id, session, ch, None, at, &mut replay),
                },
            },
            Err((code, reason)) => Reply::Refused {
                kind: "subscribe",
                id: None,
                channel: Some(ch),
                code,
                error: &reason,
            }
            .to_json(),
        };
        if !reply.is_empty() {
            shard
                .engine
                .queue_control(key, conn, encode_frame(opcode::TEXT, reply.as_bytes()));
        }
        // Under the backlog bound: what does not fit comes from history, after the
        // other channels' replies.
        shard.engine.queue_recovery(key, conn, ch, at, replay);
    }
    shard.engine.lag_inexact_attaches(key, conn);
    shard.engine.answer_poll_if_due(key, conn);
    if conn.machine.is_open() {
        shard.flush_or_close(key, conn);
        // The socket took it all: the next part from history now, not at the next round.
        shard.engine.catch_up(shard, key, conn);
        // Everything out and keeping up: an idle stream holds no encoder.
        shard.engine.release_idle_stream(key, conn);
    }
}

/// Puts a new connection into the table, registry and epoll set; its key, or `None` when
/// it was dropped (its slot and its per-address place given back).
///
/// `ip_hold` (the socket's place under the per-address limits) is filed under the
/// descriptor only once the connection is in the table, so exactly one owner releases
/// it: the table's removal ([`Shard::finalize_close`]) or, if adoption fails, its drop
/// here.
fn insert(
    shard: &Shard,
    fd: OwnedFd,
    claims: Option<Claims>,
    stream: Option<HttpStream>,
    carried: Carried,
) -> Option<u32> {
    let Carried { ip_hold, tls, .. } = carried;
    let now = shard.now_secs();
    let generation = shard.engine.next_generation();
    let key = {
        let mut conns = shard.engine.conns.borrow_mut();
        let key = conns.next_key();
        let session = match claims {
            None => None,
            Some(claims) => match open_session(shard, key, generation, now, claims) {
                Some(session) => Some(Box::new(session)),
                None => {
                    tracing::error!(
                        shard = shard.id,
                        "connection registry is out of ids; dropping connection"
                    );
                    shard.slots.release(); // admission: the slot reserved for this upgrade
                    return None;
                }
            },
        };
        if let Err(e) = shard.ready_set.add(&fd, token(key, generation)) {
            tracing::warn!(shard = shard.id, error = %e, "epoll registration failed (fs.epoll.max_user_watches?); dropping connection");
            if let Some(session) = session {
                shard.registry.unregister(&session);
            }
            shard.slots.release(); // admission: the slot reserved for this upgrade
            return None;
        }
        let machine = Connection::with_session(now, session);
        if let Some(hold) = ip_hold {
            shard.ip_holds.borrow_mut().insert(fd.as_raw_fd(), hold);
        }
        conns.insert(Conn {
            fd,
            generation,
            machine: match stream {
                None => machine,
                Some(stream) => machine.with_stream(stream),
            },
            tls,
        })
    };
    shard.engine.metrics.connections.fetch_add(1, Relaxed);
    shard.engine.metrics.accepted.fetch_add(1, Relaxed);
    Some(key)
}

/// Registers an authenticated connection; `None` when the registry is out of ids.
fn open_session(
    shard: &Shard,
    key: u32,
    generation: u32,
    now: u32,
    claims: Claims,
) -> Option<Session> {
    let leeway = shard
        .live()
        .auth
        .verifier
        .as_ref()
        .map_or(0, |v| v.leeway());
    let expires_at = expiry_second(now, shard.unix_now(), claims.exp, leeway);
    let record = ConnRecord {
        shard: shard.id as u32,
        key,
        generation,
    };
    shard
        .registry
        .register(&claims.sub, claims.channels, record, expires_at)
}

/// Handles one readiness event from the shard's epoll set.
pub fn on_ready(shard: &Shard, ready: Ready) {
    let (key, generation) = untoken(ready.token);
    let mut conns = shard.engine.conns.borrow_mut();
    let Some(conn) = conns.get_current(key, generation) else {
        return;
    };
    // A TLS connection may have ciphertext left in rustls with its backlog empty.
    let pending =
        !conn.machine.backlog().is_empty() || conn.tls.as_deref().is_some_and(|t| t.wants_write());
    if ready.writable && pending {
        match conn.machine.phase() {
            Phase::Open => {
                shard.flush_or_close(key, conn);
                // Drained: a lagging connection takes its next part from history.
                shard.engine.catch_up(shard, key, conn);
            }
            Phase::Closing { .. } => {
                if shard.flush(conn) == Flush::Failed {
                    // The peer is gone: nothing left to linger for.
                    shard.schedule_finalize(key);
                }
            }
            Phase::Doomed { .. } => {}
        }
    }
    if ready.readable {
        read_input(shard, key, conn);
    }
}

/// Reads what the socket has; a TLS connection's reads are decrypted first.
fn read_input(shard: &Shard, key: u32, conn: &mut Conn) {
    if conn.tls.is_some() {
        return read_socket(shard, key, conn, crate::shard::tls_io::decrypt_input);
    }
    read_socket(shard, key, conn, |shard, key, conn, input| {
        // A closing connection's input is read only to reach its EOF.
        receive(shard, key, conn, input);
        true
    });
}

/// The read loop of every connection (edge-triggered): reads the socket into the shard's
/// scratch buffer until EAGAIN, or re-arms it past [`MAX_READ_PER_EVENT`] so the rest is
/// read on the next round, and hands each read to `take` (false: stop reading for this
/// event). EOF and socket errors are the peer's end.
pub(super) fn read_socket(
    shard: &Shard,
    key: u32,
    conn: &mut Conn,
    mut take: impl FnMut(&Shard, u32, &mut Conn, &mut [u8]) -> bool,
) {
    let mut scratch = shard.scratch.borrow_mut();
    let mut total = 0;
    loop {
        match recv(conn.fd.as_raw_fd(), &mut scratch, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return peer_gone(shard, key, conn),
            Ok(n) => {
                total += n;
                if !take(shard, key, conn, &mut scratch[..n]) {
                    return;
                }
                if total >= MAX_READ_PER_EVENT {
                    // Re-registering re-reports pending input as a new edge.
                    shard.ready_set.remove(&conn.fd);
                    let _ = shard.ready_set.add(&conn.fd, token(key, conn.generation));
                    return;
                }
            }
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return peer_gone(shard, key, conn),
        }
    }
}

/// Feeds client bytes to the machine, then writes its answers.
pub(super) fn receive(shard: &Shard, key: u32, conn: &mut Conn, input: &mut [u8]) {
    let now = shard.now_secs();
    let id = shard.conn_id(key, conn.generation);
    shard
        .engine
        .receive(shard, key, conn, now, input, &mut |text, session| {
            shard.engine.metrics.commands.fetch_add(1, Relaxed);
            let mut replay = Vec::new();
            let reply = shard.run_command(id, text, session, &mut replay);
            Answer {
                // Empty: answered later, when the inbox store answers.
                reply: if reply.is_empty() {
                    bytes::Bytes::new()
                } else {
                    encode_frame(opcode::TEXT, reply.as_bytes())
                },
                replay,
            }
        });
}

pub(super) fn peer_gone(shard: &Shard, key: u32, conn: &mut Conn) {
    match conn.machine.on_eof() {
        Eof::Finished => shard.schedule_finalize(key),
        Eof::Close(close) => shard.engine.enqueue_close(key, conn.generation, close),
        Eof::Ignored => {}
    }
}

impl Shard {
    pub(super) fn schedule_finalize(&self, key: u32) {
        self.engine.finalize.borrow_mut().push(key);
    }

    /// Flushes what the fan-out round queued, then carries out pending closes.
    pub fn settle(&self) {
        for order in self.engine.end_round(self) {
            self.begin_close(order);
        }
        let keys = std::mem::take(&mut *self.engine.finalize.borrow_mut());
        for key in keys {
            self.finalize_close(key);
        }
    }

    fn begin_close(&self, order: CloseOrder) {
        let CloseOrder {
            key,
            generation,
            decision,
        } = order;
        // Out of the index and presence (a leave event, if any, goes out now: a dead peer
        // found by the heartbeat leaves within the heartbeat window, not after lingering).
        self.drop_subscriptions(key, self.engine.conns.borrow().get(key));
        self.engine.metrics.connections.fetch_sub(1, Relaxed);
        self.engine.metrics.closed[decision.cause as usize].fetch_add(1, Relaxed);
        let lingering = {
            let mut conns = self.engine.conns.borrow_mut();
            let Some(conn) = conns.get_current(key, generation) else {
                return;
            };
            // A closing connection is no longer connected for the registry (an admin
            // disconnect neither counts nor waits for it).
            if let Some(session) = conn.machine.take_session() {
                self.registry.unregister(&session);
            }
            self.engine
                .begin_close(self, key, conn, decision.reason.as_ref(), self.now_secs())
        };
        if !lingering {
            self.finalize_close(key);
        }
    }

    /// Removes a connection from the table and closes its socket.
    pub fn finalize_close(&self, key: u32) {
        let Some(conn) = self.engine.conns.borrow_mut().remove(key) else {
            return;
        };
        self.slots.release(); // admission: one slot per table entry, released on removal
        self.ready_set.remove(&conn.fd);
        // admission: the per-address count, while the descriptor is still this connection's
        self.ip_holds.borrow_mut().remove(&conn.fd.as_raw_fd());
        let mut conn = conn;
        if conn.machine.is_open() {
            // Finalized without a close order (should not happen): keep the index,
            // presence and the gauge right.
            self.drop_subscriptions(key, Some(&conn));
            self.engine.metrics.connections.fetch_sub(1, Relaxed);
        }
        if let Some(session) = conn.machine.take_session() {
            self.registry.unregister(&session);
        }
        self.engine.forget_inbox_gap(key, None);
        self.engine.uncount_backlog(&mut conn);
        drop(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::per_ip::{PerIpLimits, PerIpTable};
    use std::net::IpAddr;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// The per-address place of a connection is released exactly when it leaves the
    /// table, and at once when adoption fails (not when its descriptor number is reused).
    #[test]
    fn per_address_places_are_released_exactly_once() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let settings = crate::config::resolve(Default::default(), Default::default())
                .expect("default settings");
            let shard = Shard::for_tests(settings, 8);
            let table = PerIpTable::new(PerIpLimits {
                max_connections: 1,
                max_new_per_sec: 0,
                max_handshakes: 0,
                ipv6_prefix_len: 64,
            });
            let ip: IpAddr = "192.0.2.1".parse().expect("ip");
            let hold = || {
                let mut hold = table.admit(ip, Instant::now()).expect("admitted");
                hold.upgraded();
                shard.slots.try_reserve().expect("slot").adopt();
                Some(hold)
            };

            let (ours, _theirs) = UnixStream::pair().expect("socketpair");
            let key = shard.engine.conns.borrow().next_key();
            adopt(
                &shard,
                OwnedFd::from(ours),
                &[],
                None,
                None,
                Vec::new(),
                Carried {
                    ip_hold: hold(),
                    ..Carried::default()
                },
            );
            assert!(
                table.admit(ip, Instant::now()).is_err(),
                "the adopted connection holds the address's only place"
            );
            shard.finalize_close(key);
            assert!(
                table.is_empty(),
                "released when the connection left the table"
            );

            // epoll refuses a regular file (EPERM): the adoption fails.
            let file = std::fs::File::open(std::env::current_exe().expect("exe")).expect("open");
            let in_use = shard.slots.in_use();
            adopt(
                &shard,
                OwnedFd::from(file),
                &[],
                None,
                None,
                Vec::new(),
                Carried {
                    ip_hold: hold(),
                    ..Carried::default()
                },
            );
            assert_eq!(shard.engine.conns.borrow().len(), 0, "not adopted");
            assert!(shard.ip_holds.borrow().is_empty());
            assert!(table.is_empty(), "released with the failed adoption");
            // `hold()` reserved one more slot; the failed adoption gave it back.
            assert_eq!(shard.slots.in_use(), in_use, "its slot too");
        });
    }
}

#[cfg(test)]
#[path = "stream_replay_tests.rs"]
mod stream_replay_tests;
