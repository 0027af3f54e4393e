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
//! the connection from the index, queues the close frame after whatever was partly
//! written, shuts the write side once it is out and lingers until the peer's EOF
//! (bounded), so input still in flight does not turn the close into a reset.

use crate::metrics::CloseCause;
use crate::proto::close::CloseReason;
use crate::proto::command::{parse_command, Command, Reply};
use crate::proto::conn::{Answer, CloseDecision, Connection, Eof, Phase};
use crate::proto::frame::{encode_frame, opcode};
use crate::shard::readiness::Ready;
use crate::shard::send::Flush;
use crate::shard::state::Shard;
use crate::shard::table::{token, untoken, Conn};
use bytes::Bytes;
use nix::sys::socket::{recv, MsgFlags};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

/// Input read per readiness event before yielding to other connections; the socket is
/// re-armed so the rest is read on the next round.
const MAX_READ_PER_EVENT: usize = 1 << 20;

/// How long a closing connection may take to receive its close frame and answer with
/// EOF, in shard seconds; then its socket is closed regardless.
pub const LINGER_SECS: u32 = 5;

/// Registers an upgraded socket in the table, index and epoll set, then handles any
/// bytes the client sent after the request head.
pub(crate) fn adopt(shard: &Shard, fd: OwnedFd, channels: &[String], mut leftover: Vec<u8>) {
    let now = shard.now_secs();
    let generation = shard.next_generation();
    let key = {
        let mut conns = shard.conns.borrow_mut();
        if let Err(e) = shard
            .ready_set
            .add(&fd, token(conns.next_key(), generation))
        {
            tracing::warn!(shard = shard.id, error = %e, "epoll registration failed (fs.epoll.max_user_watches?); dropping connection");
            shard.slots.release(); // admission: the slot reserved for this upgrade
            return;
        }
        conns.insert(Conn {
            fd,
            generation,
            dirty: false,
            machine: Connection::new(now),
        })
    };
    {
        let mut index = shard.index.borrow_mut();
        // parse_upgrade refused lists over max_subscriptions_per_connection.
        for ch in channels {
            index.subscribe(key, ch);
        }
    }
    shard.metrics.connections.fetch_add(1, Relaxed);
    shard.metrics.accepted.fetch_add(1, Relaxed);
    if !leftover.is_empty() {
        let mut conns = shard.conns.borrow_mut();
        if let Some(conn) = conns.get_mut(key) {
            receive(shard, key, conn, &mut leftover);
        }
    }
}

/// Handles one readiness event from the shard's epoll set.
pub fn on_ready(shard: &Shard, ready: Ready) {
    let (key, generation) = untoken(ready.token);
    let mut conns = shard.conns.borrow_mut();
    let Some(conn) = conns.get_current(key, generation) else {
        return;
    };
    if ready.writable && !conn.machine.backlog().is_empty() {
        match conn.machine.phase() {
            Phase::Open => shard.flush_or_close(key, conn),
            Phase::Closing { .. } => {
                if shard.flush(conn) == Flush::Failed {
                    // The peer is gone: nothing left to linger for.
                    shard.schedule_finalize(key);
                }
            }
            Phase::Doomed => {}
        }
    }
    if ready.readable {
        read_input(shard, key, conn);
    }
}

/// Reads what the socket has (edge-triggered: until EAGAIN, or re-armed past the cap).
fn read_input(shard: &Shard, key: u32, conn: &mut Conn) {
    let mut scratch = shard.scratch.borrow_mut();
    let mut total = 0;
    loop {
        match recv(conn.fd.as_raw_fd(), &mut scratch, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return peer_gone(shard, key, conn),
            Ok(n) => {
                total += n;
                // A closing connection's input is read only to reach its EOF.
                receive(shard, key, conn, &mut scratch[..n]);
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
fn receive(shard: &Shard, key: u32, conn: &mut Conn, input: &mut [u8]) {
    if !conn.machine.is_open() {
        return;
    }
    let before = conn.machine.backlog().bytes();
    let now = shard.now_secs();
    let close = conn
        .machine
        .on_input(now, input, &shard.conn_config, &mut |text| {
            shard.metrics.commands.fetch_add(1, Relaxed);
            let mut replay = Vec::new();
            let reply = run_command(shard, key, text, &mut replay);
            Answer {
                reply: encode_frame(opcode::TEXT, reply.as_bytes()),
                replay,
            }
        });
    shard.note_backlog_change(before, conn.machine.backlog().bytes());
    if let Some(close) = close {
        shard.enqueue_close(key, conn.generation, close);
    }
    if conn.machine.is_open() {
        shard.flush_or_close(key, conn);
    }
}

fn peer_gone(shard: &Shard, key: u32, conn: &mut Conn) {
    match conn.machine.on_eof() {
        Eof::Finished => shard.schedule_finalize(key),
        Eof::Close(close) => shard.enqueue_close(key, conn.generation, close),
        Eof::Ignored => {}
    }
}

/// Executes a command and renders its reply; a recovery's missed messages go to
/// `replay`.
fn run_command(shard: &Shard, key: u32, text: &str, replay: &mut Vec<Bytes>) -> String {
    match parse_command(text) {
        Err(err) => Reply::Error(&err).to_json(),
        Ok(Command::Ping { id }) => Reply::Ok {
            kind: "pong",
            id: id.as_deref(),
            channel: None,
        }
        .to_json(),
        Ok(Command::Subscribe { id, channel, since }) => {
            let mut index = shard.index.borrow_mut();
            let limit = shard.settings.max_subscriptions_per_connection;
            if index.count_of(key) >= limit && !index.is_subscribed(key, &channel) {
                let error = format!("at most {limit} subscriptions per connection");
                return Reply::Refused {
                    kind: "subscribe",
                    id: id.as_deref(),
                    code: 413,
                    error: &error,
                }
                .to_json();
            }
            if since.is_some() && index.is_subscribed(key, &channel) {
                // Its missed messages may have come live: a replay could repeat them.
                let error =
                    format!("already subscribed to {channel}: unsubscribe first to recover");
                return Reply::Refused {
                    kind: "subscribe",
                    id: id.as_deref(),
                    code: 409,
                    error: &error,
                }
                .to_json();
            }
            // Attached at the follower's cursor and subscribed in the same step: what the
            // follower has not read yet reaches this connection live, the rest comes
            // from history (see crate::fanout::history).
            let attach = shard.publisher.attach(
                &channel,
                since,
                shard.ring_cursor.get(),
                shard.settings.max_recovery_messages,
            );
            index.subscribe(key, &channel);
            let recovered = attach.recovery.map(|result| match result {
                Ok(frames) => {
                    shard.metrics.recovered.fetch_add(1, Relaxed);
                    shard
                        .metrics
                        .replayed
                        .fetch_add(frames.len() as u64, Relaxed);
                    *replay = frames;
                    Ok(())
                }
                Err(why) => {
                    shard.metrics.not_recovered.fetch_add(1, Relaxed);
                    Err(why.label())
                }
            });
            Reply::Subscribed {
                id: id.as_deref(),
                channel: &channel,
                offset: attach.offset,
                epoch: attach.epoch,
                recovered,
            }
            .to_json()
        }
        Ok(Command::Unsubscribe { id, channel }) => {
            shard.index.borrow_mut().unsubscribe(key, &channel);
            Reply::Ok {
                kind: "unsubscribe",
                id: id.as_deref(),
                channel: Some(&channel),
            }
            .to_json()
        }
    }
}

/// A close decided but not yet carried out.
#[derive(Debug)]
pub struct CloseOrder {
    key: u32,
    generation: u32,
    decision: CloseDecision,
}

impl Shard {
    /// Decides that `conn` closes (unless a close was already decided); carried out by
    /// [`Shard::settle`].
    pub fn schedule_close(
        &self,
        key: u32,
        conn: &mut Conn,
        reason: Option<CloseReason>,
        cause: CloseCause,
    ) {
        if let Some(decision) = conn.machine.close(reason, cause) {
            self.enqueue_close(key, conn.generation, decision);
        }
    }

    /// Queues a close the connection's machine decided.
    pub(super) fn enqueue_close(&self, key: u32, generation: u32, decision: CloseDecision) {
        self.closes.borrow_mut().push(CloseOrder {
            key,
            generation,
            decision,
        });
    }

    pub(super) fn schedule_finalize(&self, key: u32) {
        self.finalize.borrow_mut().push(key);
    }

    /// Flushes what the fan-out round queued, then carries out pending closes.
    pub fn settle(&self) {
        self.flush_dirty();
        let orders = std::mem::take(&mut *self.closes.borrow_mut());
        for order in orders {
            self.begin_close(order);
        }
        let keys = std::mem::take(&mut *self.finalize.borrow_mut());
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
        self.index.borrow_mut().remove_conn(key);
        self.metrics.connections.fetch_sub(1, Relaxed);
        self.metrics.closed[decision.cause as usize].fetch_add(1, Relaxed);
        let lingering = {
            let mut conns = self.conns.borrow_mut();
            let Some(conn) = conns.get_current(key, generation) else {
                return;
            };
            let before = conn.machine.backlog().bytes();
            let lingering = conn
                .machine
                .start_close(self.now_secs(), decision.reason.as_ref());
            self.note_backlog_change(before, conn.machine.backlog().bytes());
            if lingering {
                // Writes what is left before the close frame (a slow consumer may still
                // have a partly sent frame), then shuts the write side once all is out.
                let _ = self.flush(conn);
            }
            lingering
        };
        if !lingering {
            self.finalize_close(key);
        }
    }

    /// Removes a connection from the table and closes its socket.
    pub fn finalize_close(&self, key: u32) {
        let Some(conn) = self.conns.borrow_mut().remove(key) else {
            return;
        };
        self.slots.release(); // admission: one slot per table entry, released on removal
        self.ready_set.remove(&conn.fd);
        self.note_backlog_change(conn.machine.backlog().bytes(), 0);
        if conn.machine.is_open() {
            // Finalized without a close order (should not happen): keep the gauge right.
            self.index.borrow_mut().remove_conn(key);
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
        drop(conn);
    }
}
