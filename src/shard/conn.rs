//! A connection's life on its shard after the upgrade: input, and close.
//!
//! Once upgraded ([`crate::shard::handshake`]), the socket is adopted into the shard's
//! connection table and epoll set: from then on the connection is driven by readiness
//! events ([`on_ready`]) and by the fan-out path, with no task of its own.
//!
//! Closes are decided in many places (a protocol error, the fan-out's slow-consumer
//! policy, the heartbeat sweep, a drain) but carried out in one: [`Shard::settle`] sends
//! the close frame, shuts the write side and lingers until the peer's EOF (bounded), so
//! input still in flight does not turn the close into a reset that would destroy it.

use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::proto::command::{parse_command, Command, Reply};
use crate::proto::frame::{encode_close, encode_frame, opcode, Inbound};
use crate::shard::readiness::Ready;
use crate::shard::state::Shard;
use crate::shard::table::{token, untoken, Conn, ConnState};
use nix::sys::socket::{recv, shutdown, MsgFlags, Shutdown};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

/// Input read per readiness event before yielding to other connections; the socket is
/// re-armed so the rest is read on the next round.
const MAX_READ_PER_EVENT: usize = 1 << 20;

/// How long a closing connection may take to receive its close frame and answer with
/// EOF, in shard seconds; then its socket is closed regardless.
pub const LINGER_SECS: u32 = 5;

/// Registers an upgraded socket in the table, index and epoll set.
pub(crate) fn adopt(shard: &Shard, fd: OwnedFd, channels: &[String], mut leftover: Vec<u8>) {
    let now = shard.now_secs();
    let generation = shard.next_generation();
    let key = {
        let mut conns = shard.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let key = entry.key() as u32;
        if let Err(e) = shard.ready_set.add(&fd, token(key, generation)) {
            tracing::warn!(shard = shard.id, error = %e, "epoll registration failed (fs.epoll.max_user_watches?); dropping connection");
            shard.slots.release(); // admission: the slot reserved for this upgrade
            return;
        }
        entry.insert(Conn::new(
            fd,
            generation,
            shard.settings.max_message_size,
            now,
        ));
        key
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
        if let Some(conn) = conns.get_mut(key as usize) {
            consume(shard, key, conn, &mut leftover);
            shard.flush_or_close(key, conn);
        }
    }
}

/// Handles one readiness event from the shard's epoll set.
pub fn on_ready(shard: &Shard, ready: Ready) {
    let (key, generation) = untoken(ready.token);
    let mut conns = shard.conns.borrow_mut();
    let Some(conn) = conns
        .get_mut(key as usize)
        .filter(|c| c.generation == generation)
    else {
        return;
    };
    if ready.writable && !conn.backlog.is_empty() {
        match conn.state {
            ConnState::Open => shard.flush_or_close(key, conn),
            ConnState::Closing(_) => shard.flush_closing(conn),
            ConnState::Doomed => {}
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
                if let ConnState::Closing(_) = conn.state {
                    // Lingering: discard until EOF.
                } else if conn.state == ConnState::Open {
                    if conn.pending_input.is_empty() {
                        consume(shard, key, conn, &mut scratch[..n]);
                    } else {
                        let mut input = std::mem::take(&mut conn.pending_input);
                        input.extend_from_slice(&scratch[..n]);
                        consume(shard, key, conn, &mut input);
                    }
                    shard.flush_or_close(key, conn);
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

fn peer_gone(shard: &Shard, key: u32, conn: &mut Conn) {
    match conn.state {
        // Our close already went out and the peer finished: done.
        ConnState::Closing(_) => shard.schedule_finalize(key),
        _ => shard.schedule_close(key, conn, None, CloseCause::PeerGone),
    }
}

/// Decodes and handles every complete frame in `input`; keeps an incomplete tail.
fn consume(shard: &Shard, key: u32, conn: &mut Conn, input: &mut [u8]) {
    let now = shard.now_secs();
    conn.last_rx = now;
    conn.pinged = false;
    let mut at = 0;
    while at < input.len() && conn.is_open() {
        let (used, event) = match conn.decoder.decode(&mut input[at..]) {
            Ok(Some(step)) => step,
            Ok(None) => break,
            Err(e) => {
                return shard.schedule_close(
                    key,
                    conn,
                    Some(CloseReason::from(e)),
                    CloseCause::ProtocolError,
                )
            }
        };
        at += used;
        let Some(event) = event else { continue };
        if conn.inbound_window.0 != now {
            conn.inbound_window = (now, 0);
        }
        conn.inbound_window.1 += 1;
        if conn.inbound_window.1 > shard.settings.max_inbound_per_sec {
            let reason = CloseReason::new(CloseCode::Policy, "too many frames per second");
            return shard.schedule_close(key, conn, Some(reason), CloseCause::Policy);
        }
        let reply = match event {
            Inbound::Ping(payload) => Some(encode_frame(opcode::PONG, payload)),
            Inbound::Pong => None,
            Inbound::Close(_) => {
                // The decoder refused codes a client may not send; answer with 1000.
                let reason = CloseReason::new(CloseCode::Normal, "");
                return shard.schedule_close(key, conn, Some(reason), CloseCause::ClientClose);
            }
            Inbound::Text(text) => {
                shard.metrics.commands.fetch_add(1, Relaxed);
                Some(encode_frame(
                    opcode::TEXT,
                    run_command(shard, key, text).as_bytes(),
                ))
            }
        };
        if let Some(frame) = reply {
            shard.queue_control(key, conn, frame);
        }
    }
    if at < input.len() && conn.is_open() {
        conn.pending_input = input[at..].to_vec();
    }
}

/// Executes a command and renders its reply.
fn run_command(shard: &Shard, key: u32, text: &str) -> String {
    match parse_command(text) {
        Err(err) => Reply::Error(&err).to_json(),
        Ok(Command::Ping { id }) => Reply::Ok {
            kind: "pong",
            id: id.as_deref(),
            channel: None,
        }
        .to_json(),
        Ok(Command::Subscribe { id, channel }) => {
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
            index.subscribe(key, &channel);
            Reply::Ok {
                kind: "subscribe",
                id: id.as_deref(),
                channel: Some(&channel),
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
    reason: Option<CloseReason>,
    cause: CloseCause,
}

impl Shard {
    /// Decides that `conn` closes; carried out by [`Shard::settle`].
    pub fn schedule_close(
        &self,
        key: u32,
        conn: &mut Conn,
        reason: Option<CloseReason>,
        cause: CloseCause,
    ) {
        if conn.state != ConnState::Open {
            return;
        }
        conn.state = ConnState::Doomed;
        self.closes.borrow_mut().push(CloseOrder {
            key,
            generation: conn.generation,
            reason,
            cause,
        });
    }

    fn schedule_finalize(&self, key: u32) {
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
            reason,
            cause,
        } = order;
        self.index.borrow_mut().remove_conn(key);
        self.metrics.connections.fetch_sub(1, Relaxed);
        self.metrics.closed[cause as usize].fetch_add(1, Relaxed);
        let lingering = {
            let mut conns = self.conns.borrow_mut();
            let Some(conn) = conns
                .get_mut(key as usize)
                .filter(|c| c.generation == generation)
            else {
                return;
            };
            conn.decoder = crate::proto::frame::FrameDecoder::new(0);
            conn.pending_input = Vec::new();
            match reason {
                None => false,
                Some(reason) => {
                    let before = conn.backlog.bytes();
                    conn.backlog.discard_unstarted();
                    self.note_backlog_change(before, conn.backlog.bytes());
                    self.queue_control(key, conn, encode_close(reason.code.code(), &reason.reason));
                    conn.state = ConnState::Closing(self.now_secs());
                    self.flush_closing(conn);
                    true
                }
            }
        };
        if !lingering {
            self.finalize_close(key);
        }
    }

    /// Writes what is left before the close frame (a slow consumer may still have a
    /// partly sent frame), then shuts the write side once everything is out.
    fn flush_closing(&self, conn: &mut Conn) {
        if self.flush(conn) == crate::shard::send::Flush::Done {
            let _ = shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        }
    }

    /// Removes a connection from the table and closes its socket.
    pub fn finalize_close(&self, key: u32) {
        let Some(conn) = self.conns.borrow_mut().try_remove(key as usize) else {
            return;
        };
        self.slots.release(); // admission: one slot per table entry, released on removal
        self.ready_set.remove(&conn.fd);
        self.note_backlog_change(conn.backlog.bytes(), 0);
        if conn.state == ConnState::Open {
            // Finalized without a close order (should not happen): keep the gauge right.
            self.index.borrow_mut().remove_conn(key);
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
        drop(conn);
    }
}
