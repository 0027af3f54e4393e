//! The send path: frames go from a connection's backlog to its socket.
//!
//! Writes are non-blocking `sendmsg`s with every queued frame as one iovec, so a burst of N
//! frames for one subscriber costs one write, not N. The fan-out round queues a message to
//! every subscriber first, then flushes each dirty connection once, all of them submitted
//! together through the shard's io_uring ([`crate::shard::batch`]); a single connection
//! (a reply, a pong) is written with a direct `sendmsg`. When the kernel's send buffer is full the rest stays queued; the
//! shard's epoll set reports the socket writable again (edge-triggered) and the flush
//! resumes from there.

use crate::fanout::backlog::Offer;
use crate::fanout::history::{CatchUp, Since};
use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::proto::conn::Written;
use crate::proto::position::Position;
use crate::shard::batch::{BatchEntry, SendOutcome, SendRing};
use crate::shard::follower::ROUND;
use crate::shard::state::Shard;
use crate::shard::table::{Conn, ConnTable};
use bytes::Bytes;
use nix::sys::socket::{sendmsg, shutdown, MsgFlags, Shutdown, SockaddrStorage};
use std::cell::Cell;
use std::cmp::Reverse;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most iovecs per `sendmsg` (IOV_MAX is 1024). One fan-out round queues at most
/// [`ROUND`] frames per connection, so a round's burst goes out in one call. Measured on the
/// 2000-message burst (docs/benchmarks.md): 64 iovecs per call gave 3.9M deliveries per
/// server-CPU-second, 256 gave 7M: the kernel's per-call and per-segment costs dominate.
const MAX_IOV: usize = ROUND;

/// Sends (connections flushed, or subscribers offered a message) between two looks at the
/// clock: after each chunk the fan-out yields to the executor if it has held the core for
/// [`FAIR_SLICE`].
pub const FAIR_CHUNK: usize = 4096;

/// How long the fan-out may hold the core before it lets accepts, heartbeats and ingest
/// run. Yielding after every chunk regardless cost the 2000-message burst to 5k
/// subscribers ~15% of its deliveries per CPU-second (docs/benchmarks.md): a yield polls
/// for I/O, and a burst round is hundreds of chunks.
pub const FAIR_SLICE: Duration = Duration::from_millis(1);

/// When the fan-out last gave the core away.
#[derive(Debug)]
pub struct FairSlice {
    since: Cell<Instant>,
    slice: Cell<Duration>,
}

impl Default for FairSlice {
    fn default() -> Self {
        FairSlice {
            since: Cell::new(Instant::now()),
            slice: Cell::new(FAIR_SLICE),
        }
    }
}

impl FairSlice {
    /// True once the fan-out has held the core for its slice.
    pub fn used(&self) -> bool {
        self.since.get().elapsed() >= self.slice.get()
    }

    /// Lets every other task of the shard (and the reactor) run, and starts a new slice.
    pub async fn yield_now(&self) {
        // Not `yield_if_needed`: glommio's preemption timer is far coarser than the slice,
        // and yielding the task queue (not only the task) lets glommio poll for I/O, so a
        // pending accept is served.
        glommio::executor().yield_task_queue_now().await;
        self.since.set(Instant::now());
    }

    /// Yields if the slice is used up.
    pub async fn yield_if_used(&self) {
        if self.used() {
            self.yield_now().await;
        }
    }

    /// Sets the slice (tests: zero yields after every chunk).
    pub fn set_slice(&self, slice: Duration) {
        self.slice.set(slice);
    }
}

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The backlog is empty.
    Done,
    /// The socket buffer is full; the epoll set reports when it drains.
    Blocked,
    /// The socket failed (peer reset, ...): close the connection.
    Failed,
}

impl Shard {
    /// Writes as much of `conn`'s backlog as the socket takes right now, and counts
    /// what is left in the backlog gauge (whatever queued it).
    pub fn flush(&self, conn: &mut Conn) -> Flush {
        let result = self.write_out(conn);
        self.count_backlog(conn);
        result
    }

    fn write_out(&self, conn: &mut Conn) -> Flush {
        if conn.machine.holds_output() {
            // A long poll's answer goes out whole once it ends.
            return Flush::Done;
        }
        if conn.tls.is_some() {
            return self.flush_tls(conn);
        }
        loop {
            if conn.machine.backlog().is_empty() {
                break Flush::Done;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = conn.machine.backlog().io_slices(&mut slices);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            self.metrics.send_calls.fetch_add(1, Relaxed);
            match sendmsg::<SockaddrStorage>(conn.fd.as_raw_fd(), &slices[..n], &[], flags, None) {
                Ok(written) => {
                    let asked: usize = slices[..n].iter().map(|s| s.len()).sum();
                    self.wrote(conn, written);
                    if written < asked {
                        break Flush::Blocked;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break Flush::Blocked,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break Flush::Failed,
            }
        }
    }

    /// Tells `conn`'s machine that the socket took `n` bytes, and shuts the write side
    /// once a close frame is out.
    fn wrote(&self, conn: &mut Conn, n: usize) {
        self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
        if conn.machine.on_written(n) == Written::ShutWrite {
            let _ = shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        }
    }

    /// Brings the backlog gauge in step with `conn`'s backlog. The one place besides
    /// [`Shard::uncount_backlog`] that changes the gauge: it adds only the difference
    /// from what it counted of this connection before, so a change it was not told of
    /// is caught up at the next call and the gauge cannot go below zero.
    pub fn count_backlog(&self, conn: &mut Conn) {
        let delta = conn.machine.backlog_gauge_delta();
        // Every flush comes here: most leave the backlog as counted (empty before and
        // after), and need no atomic read-modify-write.
        if delta > 0 {
            self.metrics.backlog_bytes.fetch_add(delta as u64, Relaxed);
        } else if delta < 0 {
            self.metrics
                .backlog_bytes
                .fetch_sub(delta.unsigned_abs(), Relaxed);
        }
    }

    /// Takes a connection that goes away out of the backlog gauge.
    pub fn uncount_backlog(&self, conn: &mut Conn) {
        let counted = conn.machine.backlog_uncount();
        self.metrics.backlog_bytes.fetch_sub(counted, Relaxed);
    }

    /// Flushes now; a failed socket is scheduled for closing.
    pub fn flush_or_close(&self, key: u32, conn: &mut Conn) {
        if self.flush(conn) == Flush::Failed {
            self.schedule_close(key, conn, None, CloseCause::IoError);
        }
    }

    /// Queues a control frame or reply (not flushed); a control flood closes with 1008.
    pub fn queue_control(&self, key: u32, conn: &mut Conn, frame: Bytes) {
        let flood = conn.machine.queue_control(frame, &self.conn_config.get());
        self.count_backlog(conn);
        if let Err(close) = flood {
            self.enqueue_close(key, conn.generation, close);
        }
    }

    /// Marks `conn` to be flushed with the rest of this round.
    pub(super) fn mark_dirty(&self, key: u32, conn: &mut Conn) {
        if !conn.machine.driver.dirty {
            conn.machine.driver.dirty = true;
            self.dirty.borrow_mut().push(key);
        }
    }

    /// Offers message `offset` of `channel` to `key` under the slow-consumer policy; the
    /// write happens in [`Shard::flush_dirty`] at the end of the fan-out round. A message
    /// the backlog has no room for makes the connection lag: it gets it later from history
    /// ([`Shard::catch_up`]). `offset` is `None` for a presence event, which is only
    /// queued when there is room. Returns true when queued: the caller counts it with
    /// [`Shard::count_deliveries`].
    pub fn offer_message(
        &self,
        key: u32,
        conn: &mut Conn,
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
        let offer = match offset {
            Some(offset) => conn
                .machine
                .offer_on(channel, offset, frame, &self.conn_config.get()),
            None => conn
                .machine
                .offer_event(channel, frame, &self.conn_config.get()),
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

    /// Notes a long poll that has its answer queued: [`Shard::settle`] closes it (the
    /// close completes the answer) at the end of this round, so what the rest of the round
    /// brings it is in the same answer. Nothing for any other connection.
    #[inline]
    pub(super) fn answer_poll_if_due(&self, key: u32, conn: &mut Conn) {
        if conn.machine.poll_answer_due() {
            // Listed once per message queued in the round at most (a poll not answered
            // yet is listed again, harmlessly).
            self.due_polls.borrow_mut().push((key, conn.generation));
        }
    }

    /// Answers (closes) the polls [`Shard::answer_poll_if_due`] noted.
    pub(super) fn answer_noted_polls(&self) {
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

    /// Answers every long poll whose deadline passed by `now` (empty, or with what it
    /// has), from the deadline heap; called on every heartbeat tick (100 ms).
    pub(super) fn answer_due_polls(&self, now: Instant) {
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
    pub(super) fn restore_position(&self, key: u32, conn: &mut Conn) {
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
    pub(super) fn release_idle_stream(&self, key: u32, conn: &mut Conn) {
        if self.partial_deliveries.get() == 0 && self.cluster_waiting(key) == 0 {
            conn.machine.release_position();
        }
    }

    /// Counts `queued` deliveries of a `frame_len`-byte frame: once per chunk of offers,
    /// not per offer (two atomic increments per delivery were a quarter of a burst's CPU).
    pub fn count_deliveries(&self, queued: u64, frame_len: usize) {
        if queued > 0 {
            self.metrics.deliveries.fetch_add(queued, Relaxed);
            self.metrics
                .backlog_bytes
                .fetch_add(queued * frame_len as u64, Relaxed);
        }
    }

    /// Feeds a lagging connection from history while its backlog has room, writing as it
    /// goes; stops when it is live again, its socket is full (the writable edge brings it
    /// back) or history cannot tell its position yet (the next round retries).
    pub fn catch_up(&self, key: u32, conn: &mut Conn) {
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
            if !progressed {
                break;
            }
            match self.flush(conn) {
                Flush::Done => {}
                Flush::Blocked => break,
                Flush::Failed => {
                    self.schedule_close(key, conn, None, CloseCause::IoError);
                    break;
                }
            }
        }
    }

    /// Queues a recovery's `replay` of `channel` (the messages after `since`) to `conn`:
    /// an HTTP transport takes what its backlog bound allows and catches up on the rest
    /// from history ([`crate::proto::conn::Connection::queue_recovery`]).
    pub(super) fn queue_recovery(
        &self,
        key: u32,
        conn: &mut Conn,
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

    /// Makes `conn` catch up through history on the channels its last command attached
    /// at an estimated position, so what lies between the estimate and its live position
    /// reaches it (or a gap notice does) instead of being skipped silently.
    pub(super) fn lag_inexact_attaches(&self, key: u32, conn: &mut Conn) {
        let pending = std::mem::take(&mut *self.inexact_attaches.borrow_mut());
        if pending.is_empty() {
            return;
        }
        for (channel, offset) in &pending {
            conn.machine.lag_from(channel, *offset);
        }
        self.mark_lagging(key, conn);
    }

    /// Puts a connection that started lagging on the list [`Shard::catch_up_lagging`] serves.
    pub(super) fn mark_lagging(&self, key: u32, conn: &mut Conn) {
        if !conn.machine.driver.lagging && conn.machine.is_lagging() {
            conn.machine.driver.lagging = true;
            self.lagging.borrow_mut().push(key);
        }
    }

    /// After a ring overrun: every subscriber of every channel here catches up from the
    /// position its channel was given up to, through history (what the overrun took
    /// is still there, or becomes a gap notice). O(subscriptions), on a rare event.
    pub(super) fn heal_overrun(&self) {
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

    /// Runs [`Shard::catch_up`] for every lagging connection (after each fan-out round).
    pub(super) fn catch_up_lagging(&self) {
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
                self.catch_up(key, conn);
                if conn.machine.is_lagging() {
                    still.push(key);
                } else {
                    conn.machine.driver.lagging = false;
                }
            }
        }
        self.lagging.borrow_mut().extend(still);
    }

    /// Flushes every connection that got frames this round, one `sendmsg` each, all
    /// submitted to the kernel at once through the shard's send ring when it has one.
    pub fn flush_dirty(&self) {
        while let Some(keys) = self.take_dirty() {
            for chunk in keys.chunks(FAIR_CHUNK) {
                self.flush_keys(chunk);
            }
            self.recycle_dirty(keys);
        }
    }

    /// [`Shard::flush_dirty`] for the fan-out task: after every [`FAIR_CHUNK`] connections
    /// it yields to the executor once the fan-out has held the core for [`FAIR_SLICE`], so
    /// a round to 500k subscribers does not hold off accepts, heartbeats and ingest until
    /// its last write. Connections made dirty while it is yielded are flushed before it
    /// returns.
    pub async fn flush_dirty_yielding(&self) {
        while let Some(keys) = self.take_dirty() {
            for chunk in keys.chunks(FAIR_CHUNK) {
                // Keys not yet flushed keep their `dirty` flag across the yield, so an
                // offer in between does not list them twice; a key whose slot was freed
                // and reused meanwhile flushes the new occupant's own backlog, harmless.
                self.flush_keys(chunk);
                if keys.len() > FAIR_CHUNK {
                    self.fair.yield_if_used().await;
                }
            }
            self.recycle_dirty(keys);
        }
    }

    /// The connections to flush next; `None` once none is dirty.
    fn take_dirty(&self) -> Option<Vec<u32>> {
        let keys = std::mem::take(&mut *self.dirty.borrow_mut());
        if keys.is_empty() {
            self.recycle_dirty(keys);
            return None;
        }
        Some(keys)
    }

    /// Hands the (emptied) list back to keep its capacity for the next round.
    fn recycle_dirty(&self, mut keys: Vec<u32>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            keys.clear();
            *dirty = keys;
        }
    }

    fn flush_keys(&self, keys: &[u32]) {
        let mut conns = self.conns.borrow_mut();
        let mut ring = self.send_ring.borrow_mut();
        match ring.as_mut() {
            Some(send_ring) if keys.len() > 1 => {
                self.flush_batch(send_ring, &mut conns, keys);
                if send_ring.is_broken() {
                    *ring = None;
                }
            }
            _ => {
                for &key in keys {
                    if let Some(conn) = conns.get_mut(key) {
                        conn.machine.driver.dirty = false;
                        if conn.machine.is_open() {
                            self.flush_or_close(key, conn);
                        }
                    }
                }
            }
        }
    }

    fn flush_batch(&self, ring: &mut SendRing, conns: &mut ConnTable, keys: &[u32]) {
        let mut selected = Vec::with_capacity(keys.len());
        let mut total = 0;
        for &key in keys {
            if let Some(conn) = conns.get_mut(key) {
                conn.machine.driver.dirty = false;
                if conn.tls.is_some() {
                    // rustls writes its own ciphertext: the plain path, now.
                    if conn.machine.is_open() {
                        self.flush_or_close(key, conn);
                    }
                    continue;
                }
                if conn.machine.is_open()
                    && !conn.machine.backlog().is_empty()
                    && !conn.machine.holds_output()
                {
                    total += conn.machine.backlog().frame_count().min(MAX_IOV);
                    selected.push(key);
                }
            }
        }
        let mut store = vec![IoSlice::new(&[]); total];
        let mut entries = Vec::with_capacity(selected.len());
        let mut asked = Vec::with_capacity(selected.len());
        {
            let chosen: Vec<&Conn> = selected.iter().filter_map(|&k| conns.get(k)).collect();
            let mut rest: &mut [IoSlice<'_>] = &mut store;
            let mut lengths = Vec::with_capacity(chosen.len());
            for conn in &chosen {
                let n = conn.machine.backlog().frame_count().min(MAX_IOV);
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                conn.machine.backlog().io_slices(head);
                lengths.push(n);
                rest = tail;
            }
            let mut at = 0;
            for (conn, &n) in chosen.iter().zip(&lengths) {
                let slices = &store[at..at + n];
                at += n;
                asked.push(slices.iter().map(|s| s.len()).sum::<usize>());
                entries.push(BatchEntry {
                    fd: conn.fd.as_raw_fd(),
                    slices,
                });
            }
        }
        let mut results = Vec::new();
        ring.send_all(&entries, &mut results);
        drop(entries);
        drop(store);
        for (i, &key) in selected.iter().enumerate() {
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            match results.get(i).copied().unwrap_or(SendOutcome::NotSubmitted) {
                SendOutcome::Written(written) => {
                    self.metrics.send_calls.fetch_add(1, Relaxed);
                    self.wrote(conn, written);
                    self.count_backlog(conn);
                    if written == asked[i] && !conn.machine.backlog().is_empty() {
                        // More than one call's worth was queued and the socket took it
                        // all: no writable edge will come, so continue directly.
                        self.flush_or_close(key, conn);
                    }
                }
                // Full: the epoll set reports the socket writable again.
                SendOutcome::Err(libc::EAGAIN) => {
                    self.metrics.send_calls.fetch_add(1, Relaxed);
                }
                // Nothing was written: the plain path may send the same bytes.
                SendOutcome::Err(libc::EINTR) | SendOutcome::NotSubmitted => {
                    self.flush_or_close(key, conn)
                }
                SendOutcome::Err(_) => {
                    self.metrics.send_calls.fetch_add(1, Relaxed);
                    self.schedule_close(key, conn, None, CloseCause::IoError);
                }
                SendOutcome::Unknown => {
                    // Some of these bytes may be on the wire and the kernel may still read
                    // them: sending anything more would corrupt the stream, and freeing
                    // them could hand the kernel reused memory. Keep them (leaked, at most
                    // one backlog; this needs a failing io_uring) and close without a
                    // close frame.
                    let mut lost = conn.machine.take_backlog();
                    self.metrics
                        .backlog_bytes
                        .fetch_sub(lost.uncount(), Relaxed);
                    std::mem::forget(lost);
                    self.schedule_close(key, conn, None, CloseCause::IoError);
                }
            }
        }
    }
}
