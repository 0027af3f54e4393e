//! A fan-out round: a ring message offered to every subscriber of its channel under the
//! slow-consumer policy, overruns healed through history, long polls answered.
//!
//! A round takes up to [`ROUND`] messages, queues each to its subscribers' backlogs
//! (marking them dirty), and the driver then writes every dirty connection once: in a
//! burst a subscriber receives many frames in one write; when paced, a round is one
//! message and one write per subscriber.
//!
//! A fan-out may pause part-way (the driver's fair slice is used up): what is left of the
//! channel's members is kept as (key, generation) pairs and served after the pause, a
//! member only if its slot still holds the same connection and it is still subscribed
//! (see [`Engine::deliver_start`]).

use crate::engine::table::{Conn, Driver};
use crate::engine::Engine;
use crate::fanout::ring::{Poll as RingPoll, RingKind, RingMessage};
use crate::metrics::CloseCause;
use crate::proto::backlog::Offer;
use crate::proto::close::{CloseCode, CloseReason};
use crate::proto::position::Position;
use crate::proto::recovery::Since;
use bytes::Bytes;
use std::cmp::Reverse;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Most messages per fan-out round: bounds the frames queued per connection before a
/// flush and keeps the executor responsive (other tasks run between rounds).
pub const ROUND: usize = 256;

/// Subscribers from which a message's frame is copied into a shard-local `Bytes` before
/// it is queued to them. Every queued clone and every write's release touch the frame's
/// refcount; on the ring's shared `Bytes` that is one cache line bounced between every
/// core for every delivery, on a local copy it stays in this core's cache. (A copy is one
/// small allocation per message per shard; docs/benchmarks.md has the measurement.)
const LOCAL_COPY_MIN: usize = 4;

/// What the ring had next.
#[derive(Debug)]
pub enum Next {
    /// A message (or presence event) to deliver.
    Message(RingMessage),
    /// Messages were overwritten before this shard read them: every subscriber here now
    /// catches up from its channel's position through history.
    Healed,
    /// Nothing new.
    Empty,
}

/// How the start of a message's fan-out went.
#[derive(Debug)]
pub enum Delivery {
    /// Every member was offered it; the channel had this many.
    Done(usize),
    /// Paused part-way: the members not yet offered it are in the snapshot, to be served
    /// with [`Engine::deliver_part`], then ended with [`Engine::deliver_end`].
    Paused {
        /// Members the channel had.
        count: usize,
        /// The frame to offer them.
        frame: Bytes,
    },
}

/// This shard's frame for a message going to `subscribers` connections.
fn local_frame(frame: &Bytes, subscribers: usize) -> Bytes {
    if subscribers >= LOCAL_COPY_MIN {
        Bytes::copy_from_slice(frame)
    } else {
        frame.clone()
    }
}

/// The offset a ring message moves its channel to (presence events have none: they
/// neither move the channel's position nor make a subscriber lag).
pub fn offset_of(msg: &RingMessage) -> Option<u64> {
    (msg.kind == RingKind::Message).then_some(msg.offset)
}

impl<S: Driver> Engine<S> {
    /// Takes the next ring message at the cursor. An overrun is counted and healed here.
    pub fn next_from_ring(&self) -> Next {
        let mut cursor = self.ring_cursor.get();
        let polled = self.publisher.ring().poll(&mut cursor);
        self.ring_cursor.set(cursor);
        match polled {
            RingPoll::Message(msg) => Next::Message(msg),
            RingPoll::Overrun { lost } => {
                // The messages are gone from the ring, not from history. Counted so an
                // operator can size the ring.
                self.metrics.ring_overrun_lost.fetch_add(lost, Relaxed);
                self.heal_overrun();
                Next::Healed
            }
            RingPoll::Empty => Next::Empty,
        }
    }

    /// Offers message `offset` of `channel` to `key` under the slow-consumer policy; the
    /// write happens when the driver flushes the dirty list at the end of the round. A
    /// message the backlog has no room for makes the connection lag: it gets it later
    /// from history ([`Engine::catch_up`]). `offset` is `None` for a presence event, which
    /// is only queued when there is room. Returns true when queued: the caller counts it
    /// with [`Engine::count_deliveries`].
    pub fn offer_message(
        &self,
        key: u32,
        conn: &mut Conn<S>,
        channel: &Arc<str>,
        offset: Option<u64>,
        frame: &Bytes,
    ) -> bool {
        if !conn.machine.is_open() {
            return false;
        }
        if conn.machine.needs_position() {
            self.restore_position(key, conn);
        }
        let config = self.conn_config.get();
        let offer = match offset {
            Some(offset) => conn.machine.offer_on(channel, offset, frame, &config),
            None => conn.machine.offer_event(channel, frame, &config),
        };
        match offer {
            Offer::Queued => {
                self.mark_dirty(key, conn);
                self.answer_poll_if_due(key, conn);
                return true;
            }
            Offer::Skipped if offset.is_some() => {
                self.metrics.lagged.fetch_add(1, Relaxed);
                self.mark_lagging(key, conn);
            }
            Offer::Skipped => {}
            Offer::Disconnect => {
                if let Some(close) = conn.machine.close_slow_consumer() {
                    self.enqueue_close(key, conn.generation, close);
                }
            }
        }
        false
    }

    /// Offers `msg` to every subscriber of its channel on this shard, straight from the
    /// index, `chunk` members at a time, until `pause()` says the core was held long
    /// enough (asked after every chunk). Nothing can change between chunks, so no copy
    /// and no re-check is needed.
    ///
    /// When it pauses, the members not yet offered it are copied into `snapshot` (slot
    /// key and generation): the live member list may be reordered or changed before the
    /// rest is served. A member catching up on the channel is left out: it gets the
    /// message from history, which the cursor is already past. Until
    /// [`Engine::deliver_end`], the index keeps the channel's position before the message
    /// and no SSE stream releases its position ([`Engine::release_idle_stream`]).
    pub fn deliver_start(
        &self,
        msg: &RingMessage,
        snapshot: &mut Vec<(u32, u32)>,
        chunk: usize,
        mut pause: impl FnMut() -> bool,
    ) -> Delivery {
        let channel = &msg.channel;
        let offset = offset_of(msg);
        let index = self.index.borrow();
        let members = index.members(channel);
        if members.is_empty() {
            return Delivery::Done(0);
        }
        let frame = local_frame(&msg.frame, members.len());
        let mut conns = self.conns.borrow_mut();
        let mut at = 0;
        loop {
            let end = (at + chunk).min(members.len());
            let mut queued = 0;
            for &key in &members[at..end] {
                if let Some(conn) = conns.get_mut(key) {
                    queued += u64::from(self.offer_message(key, conn, channel, offset, &frame));
                }
            }
            self.count_deliveries(queued);
            at = end;
            if at == members.len() {
                if let Some(offset) = offset {
                    index.delivered(channel, offset);
                }
                return Delivery::Done(members.len());
            }
            if pause() {
                break;
            }
        }
        snapshot.clear();
        snapshot.extend(members[at..].iter().filter_map(|&key| {
            let conn = conns.get(key)?;
            let from_history = offset.is_some() && conn.machine.lags_on(channel);
            (!from_history).then_some((key, conn.generation))
        }));
        self.partial_deliveries
            .set(self.partial_deliveries.get() + 1);
        Delivery::Paused {
            count: members.len(),
            frame,
        }
    }

    /// Serves part of a paused fan-out's snapshot: each member whose slot still holds the
    /// same connection and is still subscribed. So each member that stayed subscribed
    /// gets the frame exactly once, and one who joined meanwhile does not (it subscribed
    /// after the message was published). Returns false when the channel is gone from
    /// this shard (nothing more to serve).
    pub fn deliver_part(&self, msg: &RingMessage, frame: &Bytes, part: &[(u32, u32)]) -> bool {
        let index = self.index.borrow();
        // Resolved again after every pause: the channel may have emptied and its id gone
        // to another channel.
        let Some(id) = index.channel_id(&msg.channel) else {
            return false;
        };
        let offset = offset_of(msg);
        let mut conns = self.conns.borrow_mut();
        let mut queued = 0;
        for &(key, generation) in part {
            let Some(conn) = conns.get_current(key, generation) else {
                continue;
            };
            if index.is_member(key, id) {
                queued += u64::from(self.offer_message(key, conn, &msg.channel, offset, frame));
            }
        }
        self.count_deliveries(queued);
        true
    }

    /// Ends a paused fan-out: the channel's position is now the message, and SSE streams
    /// may release theirs again. Called exactly once per [`Delivery::Paused`], also when
    /// the fan-out is abandoned.
    pub fn deliver_end(&self, msg: &RingMessage) {
        if let Some(offset) = offset_of(msg) {
            self.index.borrow().delivered(&msg.channel, offset);
        }
        self.release_pause();
    }

    /// Ends a paused fan-out's hold on SSE position releases, without touching the index
    /// (a fan-out dropped at a pause: the index then keeps the earlier position).
    pub fn release_pause(&self) {
        let held = &self.partial_deliveries;
        held.set(held.get().saturating_sub(1));
    }

    /// After a ring overrun: every subscriber of every channel here catches up from the
    /// position its channel was given up to, through history (what the overrun took
    /// is still there, or becomes a gap notice). O(subscriptions), on a rare event.
    pub fn heal_overrun(&self) {
        let index = self.index.borrow();
        let mut conns = self.conns.borrow_mut();
        let mut lagging = self.lagging.borrow_mut();
        for (channel, position, members) in index.positions() {
            for &key in members {
                let Some(conn) = conns.get_mut(key) else {
                    continue;
                };
                conn.machine.lag_from(channel, position);
                if !conn.machine.driver.lagging && conn.machine.is_lagging() {
                    conn.machine.driver.lagging = true;
                    lagging.push(key);
                }
            }
        }
    }

    /// Notes a long poll that has its answer queued: [`Engine::answer_noted_polls`]
    /// closes it (the close completes the answer) at the end of this round, so what the
    /// rest of the round brings it is in the same answer. Nothing for any other
    /// connection.
    #[inline]
    pub fn answer_poll_if_due(&self, key: u32, conn: &mut Conn<S>) {
        if conn.machine.poll_answer_due() {
            // Listed once per message queued in the round at most (a poll not answered
            // yet is listed again, harmlessly).
            self.due_polls.borrow_mut().push((key, conn.generation));
        }
    }

    /// Answers (closes) the polls [`Engine::answer_poll_if_due`] noted.
    pub fn answer_noted_polls(&self) {
        let due = std::mem::take(&mut *self.due_polls.borrow_mut());
        if due.is_empty() {
            return;
        }
        let mut conns = self.conns.borrow_mut();
        for (key, generation) in due {
            if let Some(conn) = conns.get_current(key, generation) {
                let reason = CloseReason::new(CloseCode::Normal, "");
                self.schedule_close(key, conn, Some(reason), CloseCause::PollAnswered);
            }
        }
    }

    /// Remembers when long poll `key` (generation `generation`) must be answered.
    pub fn poll_deadline(&self, at: Instant, key: u32, generation: u32) {
        self.poll_deadlines
            .borrow_mut()
            .push(Reverse((at, key, generation)));
    }

    /// Answers every long poll whose deadline passed by `now` (empty, or with what it
    /// has), from the deadline heap; called on every heartbeat tick (100 ms).
    pub fn answer_due_polls(&self, now: Instant) {
        let mut due = Vec::new();
        {
            let mut deadlines = self.poll_deadlines.borrow_mut();
            while let Some(Reverse((at, key, generation))) = deadlines.peek().copied() {
                if at > now {
                    break;
                }
                deadlines.pop();
                due.push((key, generation));
            }
        }
        if due.is_empty() {
            return;
        }
        let mut conns = self.conns.borrow_mut();
        for (key, generation) in due {
            if let Some(conn) = conns.get_current(key, generation) {
                if conn.machine.is_poll() {
                    let reason = CloseReason::new(CloseCode::Normal, "");
                    self.schedule_close(key, conn, Some(reason), CloseCause::PollAnswered);
                }
            }
        }
    }

    /// Gives a released SSE stream its position back: each of its channels where the
    /// subscription index says its subscribers are (its own lag aside, see
    /// [`crate::proto::conn::Connection::restore_position`]).
    pub fn restore_position(&self, key: u32, conn: &mut Conn<S>) {
        let mut position = Position::default();
        match self.index.try_borrow() {
            Ok(index) => {
                for (channel, offset, epoch) in index.subscriptions_of(key) {
                    position.set(channel, Since { offset, epoch });
                }
            }
            // Not reached (no event is queued while the index is being changed); the
            // stream's events then name only the channels they are about.
            Err(_) => tracing::debug!(shard = self.id, "index busy: SSE position not restored"),
        }
        conn.machine.restore_position(position);
    }

    /// Releases the encoder of an SSE stream that is idle (see
    /// [`crate::proto::conn::Connection::release_position`]), unless a fan-out is paused
    /// part-way: the index then still has that message's channel before it, and a stream
    /// already given it would rebuild its position there (a resume would repeat it); or
    /// a subscribe of the stream waits for a cluster join: the index cannot rebuild the
    /// position it asked for (its `since`), which the reply's `id:` must carry.
    pub fn release_idle_stream(&self, key: u32, conn: &mut Conn<S>) {
        if self.partial_deliveries.get() == 0 && self.cluster_waiting(key) == 0 {
            conn.machine.release_position();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Measures what [`local_frame`] saves: `threads` cores each queue one clone of a
    /// frame per "subscriber" and release them, on one shared `Bytes` or on a per-thread
    /// copy. Run: `cargo test --release -p ringcast frame_refcount -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn frame_refcount_cost() {
        const PER_THREAD: usize = 2_000_000;
        let shared = Bytes::copy_from_slice(&[b'x'; 80]);
        for local in [false, true] {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    let shared = &shared;
                    s.spawn(move || {
                        let frame = if local {
                            local_frame(shared, LOCAL_COPY_MIN)
                        } else {
                            shared.clone()
                        };
                        let mut queued = Vec::with_capacity(4096);
                        for _ in 0..PER_THREAD / 4096 {
                            queued.extend((0..4096).map(|_| frame.clone()));
                            queued.clear();
                        }
                    });
                }
            });
            let per = start.elapsed().as_nanos() as f64 / (PER_THREAD as f64);
            println!(
                "{threads} threads, {}: {per:.1} ns per clone+release per thread",
                if local {
                    "shard-local copy"
                } else {
                    "one shared Bytes"
                }
            );
        }
    }
}
