//! Lagging connections: a subscriber whose backlog had no room for a message takes it
//! later from history, in steps bounded by its backlog, or is told what it missed (a gap
//! notice), or is closed when it falls too far behind.

use crate::engine::table::{Conn, Driver};
use crate::engine::{Engine, Flush, Wire};
use crate::proto::recovery::{CatchUp, Since};
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

impl<S: Driver> Engine<S> {
    /// Puts a connection that started lagging on the list [`Engine::catch_up_lagging`]
    /// serves.
    pub fn mark_lagging(&self, key: u32, conn: &mut Conn<S>) {
        if !conn.machine.driver.lagging && conn.machine.is_lagging() {
            conn.machine.driver.lagging = true;
            self.lagging.borrow_mut().push(key);
        }
    }

    /// Feeds a lagging connection from history while its backlog has room, writing
    /// through `wire` as it goes; stops when it is live again, its socket is full (the
    /// writable edge brings it back) or history cannot tell its position yet (the next
    /// round retries).
    pub fn catch_up(&self, wire: &impl Wire<S>, key: u32, conn: &mut Conn<S>) {
        while conn.machine.wants_catch_up(&self.conn_config.get()) {
            let Some((channel, since)) = conn.machine.catch_up_next() else {
                break;
            };
            let step = if self.index.borrow().is_subscribed(key, &channel) {
                self.publisher.catch_up(
                    &channel,
                    since,
                    self.ring_cursor.get(),
                    self.conn_config.get().backlog.max_bytes / 2,
                )
            } else {
                // Unsubscribed meanwhile: nothing more to catch up on.
                CatchUp {
                    done: true,
                    ..CatchUp::default()
                }
            };
            let progressed = step.done || step.gap.is_some() || !step.frames.is_empty();
            if step.done {
                // Live again from here: an overrun heal must not take it back before it.
                self.index.borrow().note_position(&channel, step.reached);
            }
            if let Some((from, to)) = step.gap {
                self.metrics.dropped_slow.fetch_add(to + 1 - from, Relaxed);
                self.note_inbox_gap(key, conn.generation, &channel, from);
            }
            self.metrics
                .caught_up
                .fetch_add(step.frames.len() as u64, Relaxed);
            if conn.machine.needs_position() {
                self.restore_position(key, conn);
            }
            let close = conn
                .machine
                .apply_catch_up(&channel, step, &self.conn_config.get());
            self.count_backlog(conn);
            self.answer_poll_if_due(key, conn);
            if let Some(close) = close {
                self.enqueue_close(key, conn.generation, close);
                break;
            }
            if !progressed || self.flush_or_close(wire, key, conn) != Flush::Done {
                break;
            }
        }
    }

    /// Runs [`Engine::catch_up`] for every lagging connection (after each fan-out round).
    pub fn catch_up_lagging(&self, wire: &impl Wire<S>) {
        let keys = std::mem::take(&mut *self.lagging.borrow_mut());
        let mut still = Vec::new();
        {
            let mut conns = self.conns.borrow_mut();
            for key in keys {
                let Some(conn) = conns.get_mut(key) else {
                    continue;
                };
                if !conn.machine.driver.lagging {
                    continue;
                }
                self.catch_up(wire, key, conn);
                if conn.machine.is_lagging() {
                    still.push(key);
                } else {
                    conn.machine.driver.lagging = false;
                }
            }
        }
        self.lagging.borrow_mut().extend(still);
    }

    /// Queues a recovery's `replay` of `channel` (the messages after `since`) to `conn`:
    /// an HTTP transport takes what its backlog bound allows and catches up on the rest
    /// from history ([`crate::proto::conn::Connection::queue_recovery`]).
    pub fn queue_recovery(
        &self,
        key: u32,
        conn: &mut Conn<S>,
        channel: &str,
        since: Option<Since>,
        replay: Vec<Bytes>,
    ) {
        match since {
            Some(since) if !replay.is_empty() => {
                let channel: Arc<str> = Arc::from(channel);
                let config = self.conn_config.get();
                conn.machine
                    .queue_recovery(&channel, since.offset, replay, &config);
                self.mark_lagging(key, conn);
            }
            _ => conn.machine.queue_replay(replay),
        }
    }

    /// Notes that the command being run attached `channel` at an estimated position
    /// `offset` (see [`Engine::lag_inexact_attaches`]).
    pub fn note_inexact_attach(&self, channel: Arc<str>, offset: u64) {
        self.inexact_attaches.borrow_mut().push((channel, offset));
    }

    /// Makes `conn` catch up through history on the channels its last command attached
    /// at an estimated position, so what lies between the estimate and its live position
    /// reaches it (or a gap notice does) instead of being skipped silently.
    pub fn lag_inexact_attaches(&self, key: u32, conn: &mut Conn<S>) {
        let pending = std::mem::take(&mut *self.inexact_attaches.borrow_mut());
        if pending.is_empty() {
            return;
        }
        for (channel, offset) in &pending {
            conn.machine.lag_from(channel, *offset);
        }
        self.mark_lagging(key, conn);
    }
}
