//! The sans-io core of a shard: its connection table, subscription index and the policy
//! of a fan-out round, driven by events and answering with decisions.
//!
//! An [`Engine`] takes ring messages, writability, time and command results, and decides:
//! which connections have frames to write (the dirty list), which lag and catch up from
//! history, which close and with what code (the close orders), which long polls are
//! answered. It makes no syscall and owns no descriptor; the one thing it asks of its
//! driver is to write a connection's backlog to its socket ([`Wire`]), in place (the
//! backlog's frames go out as iovecs, never copied), and to report how far that went.
//!
//! The driver ([`crate::shard`]) owns sockets, the epoll set, the io_uring batch and TLS
//! sessions, and turns readiness into calls here; the seeded simulations
//! ([`sim`](self)) drive the same code against simulated sockets and clients.
//!
//! A shard is single-threaded, so the state sits in cells shared by its tasks; borrows
//! never cross an `.await`.

pub mod lag;
pub mod round;
pub mod table;

#[cfg(test)]
mod sim;

use crate::fanout::index::{InterestSink, SubscriptionIndex};
use crate::fanout::publisher::Publisher;
use crate::metrics::{CloseCause, ShardMetrics};
use crate::proto::close::CloseReason;
use crate::proto::conn::{CloseDecision, CommandHandler, ConnConfig, Tick};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use table::{Conn, ConnTable, Driver};

/// (connection generation, first offset it was told it missed) of an inbox channel.
pub type InboxGap = (u32, u64);

/// How a write of a connection's backlog ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The backlog is empty.
    Done,
    /// The socket buffer is full; the driver reports when it drains.
    Blocked,
    /// The socket failed (peer reset, ...): close the connection.
    Failed,
}

/// What the engine asks of its driver: write `conn`'s backlog to its socket, as much as
/// it takes now, and say how it went (the gauge of what is left is the engine's:
/// [`Engine::count_backlog`]).
pub trait Wire<S: Driver> {
    /// Writes what the socket of `conn` takes now.
    fn flush(&self, key: u32, conn: &mut Conn<S>) -> Flush;

    /// Writes every connection of `keys` (the round's dirty list), clearing their dirty
    /// marks: [`Engine::flush_each`], or all of them submitted at once.
    fn flush_listed(&self, keys: &[u32]);
}

/// A close decided but not yet carried out: the driver takes them with
/// [`Engine::take_closes`] at the end of a round.
#[derive(Debug)]
pub struct CloseOrder {
    /// The connection's slot.
    pub key: u32,
    /// The connection's generation when the close was decided.
    pub generation: u32,
    /// What its machine decided.
    pub decision: CloseDecision,
}

/// One shard's connections, channels and round policy (see the module doc).
pub struct Engine<S: Driver> {
    /// Shard number (0-based), for logs.
    pub id: usize,
    /// Connection table.
    pub conns: RefCell<ConnTable<S>>,
    /// Channel -> subscribers on this shard.
    pub index: RefCell<SubscriptionIndex>,
    /// Offsets, history and the ring.
    pub publisher: Arc<Publisher>,
    /// This shard's counters.
    pub metrics: &'static ShardMetrics,
    /// Per-connection bounds and timers; the backlog and inbound limits follow reloads.
    pub conn_config: Cell<ConnConfig>,
    /// The ring sequence the follower reads next: messages before it reached (or were
    /// lost to) this shard's subscribers; from it on, a new subscriber gets them live.
    pub ring_cursor: Cell<u64>,
    /// Connections with frames queued in this fan-out round.
    pub(crate) dirty: RefCell<Vec<u32>>,
    /// Connections catching up from history (see [`Engine::catch_up`]).
    pub(crate) lagging: RefCell<Vec<u32>>,
    /// Closes decided but not yet carried out.
    pub(crate) closes: RefCell<Vec<CloseOrder>>,
    /// Messages whose fan-out paused part-way (see [`Engine::deliver_start`]): while any
    /// is, no idle SSE stream releases its position, which the index (at the message's
    /// channel's position before it until its fan-out ends) would rebuild before the
    /// message for a stream already given it.
    pub(crate) partial_deliveries: Cell<u32>,
    /// Channels the command being run attached at an estimated position (see
    /// [`crate::fanout::publisher::Attach::exact`]): its connection lags on them from
    /// there once the command is done.
    pub(crate) inexact_attaches: RefCell<Vec<(Arc<str>, u64)>>,
    /// Open long polls by deadline: (deadline, key, generation), the earliest first. The
    /// heartbeat sweep's 100 ms tick answers the due ones (see
    /// [`Engine::answer_due_polls`]); an entry of a poll answered earlier is dropped when
    /// its deadline comes.
    pub(crate) poll_deadlines: RefCell<BinaryHeap<Reverse<(Instant, u32, u32)>>>,
    /// Long polls with an answer queued: (key, generation), closed (answered) at the end
    /// of the round that queued it, so the answer holds all that round had for them.
    pub(crate) due_polls: RefCell<Vec<(u32, u32)>>,
    /// Inbox channels on which a connection was sent a gap notice since it subscribed:
    /// (connection, channel) -> (generation, first offset it missed). Its cumulative
    /// acks must stay below that offset: they would remove messages it never got.
    pub(crate) inbox_gaps: RefCell<HashMap<(u32, Arc<str>), InboxGap>>,
    /// Subscribes waiting for the cluster to follow their channel, keyed by (connection,
    /// channel) -> connection generation. An unsubscribe meanwhile removes the entry, and
    /// the answer is then dropped.
    pub(crate) cluster_pending: RefCell<HashMap<(u32, Arc<str>), u32>>,
    /// Inbox subscribes waiting for the store's answer: (connection, channel) ->
    /// connection generation. An unsubscribe meanwhile removes the entry, and the answer
    /// is then dropped.
    pub(crate) inbox_pending: RefCell<HashMap<(u32, Arc<str>), u32>>,
    /// Set while a long poll's channels are subscribed: no presence membership.
    pub(crate) quiet_presence: Cell<bool>,
    /// Lingering closes whose peer finished: the driver removes them at the round's end.
    pub(crate) finalize: RefCell<Vec<u32>>,
    /// The last generation given to a table slot.
    generation: Cell<u32>,
    /// True when `user:` channels are the inbox's (gaps on them are remembered).
    inbox_on: bool,
}

impl<S: Driver> Engine<S> {
    /// An engine with empty tables, room for `capacity` connections, reading the ring
    /// from its current head; `interest` hears each channel's first subscriber here and
    /// its last leaving (the cluster follows those channels).
    pub fn new(
        id: usize,
        publisher: Arc<Publisher>,
        metrics: &'static ShardMetrics,
        conn_config: ConnConfig,
        capacity: usize,
        inbox_on: bool,
        interest: Option<InterestSink>,
    ) -> Self {
        let cursor = publisher.ring().head();
        Engine {
            id,
            conns: RefCell::new(ConnTable::with_capacity(capacity)),
            index: RefCell::new(SubscriptionIndex::holding_for(publisher.clone(), interest)),
            publisher,
            metrics,
            conn_config: Cell::new(conn_config),
            ring_cursor: Cell::new(cursor),
            dirty: RefCell::default(),
            lagging: RefCell::default(),
            closes: RefCell::default(),
            partial_deliveries: Cell::new(0),
            inexact_attaches: RefCell::default(),
            poll_deadlines: RefCell::default(),
            due_polls: RefCell::default(),
            inbox_gaps: RefCell::default(),
            cluster_pending: RefCell::default(),
            inbox_pending: RefCell::default(),
            quiet_presence: Cell::new(false),
            finalize: RefCell::default(),
            generation: Cell::new(0),
            inbox_on,
        }
    }

    /// A new generation number for a table slot.
    pub fn next_generation(&self) -> u32 {
        let g = self.generation.get().wrapping_add(1);
        self.generation.set(g);
        g
    }

    /// Brings the backlog gauge in step with `conn`'s backlog. The one place besides
    /// [`Engine::uncount_backlog`] that changes the gauge: it adds only the difference
    /// from what it counted of this connection before, so a change it was not told of
    /// is caught up at the next call and the gauge cannot go below zero.
    pub fn count_backlog(&self, conn: &mut Conn<S>) {
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
    pub fn uncount_backlog(&self, conn: &mut Conn<S>) {
        let counted = conn.machine.backlog_uncount();
        self.metrics.backlog_bytes.fetch_sub(counted, Relaxed);
    }

    /// Counts `queued` deliveries: once per chunk of offers, not per offer (two atomic
    /// increments per delivery were a quarter of a burst's CPU). The backlog gauge is not
    /// touched here: the write at the end of the round counts what is left
    /// ([`Engine::count_backlog`]), and adding the frames here too counted every
    /// delivered byte twice, forever.
    pub fn count_deliveries(&self, queued: u64) {
        if queued > 0 {
            self.metrics.deliveries.fetch_add(queued, Relaxed);
        }
    }

    /// Decides that `conn` closes (unless a close was already decided); carried out by
    /// the driver from [`Engine::take_closes`]. Returns false when a close was already
    /// decided.
    pub fn schedule_close(
        &self,
        key: u32,
        conn: &mut Conn<S>,
        reason: Option<CloseReason>,
        cause: CloseCause,
    ) -> bool {
        match conn.machine.close(reason, cause) {
            Some(decision) => {
                self.enqueue_close(key, conn.generation, decision);
                true
            }
            None => false,
        }
    }

    /// Queues a close the connection's machine decided.
    pub fn enqueue_close(&self, key: u32, generation: u32, decision: CloseDecision) {
        self.closes.borrow_mut().push(CloseOrder {
            key,
            generation,
            decision,
        });
    }

    /// Decides that each connection of `connections` (key, generation) still in the
    /// table closes with `reason`; returns how many were not closing already.
    pub fn close_each(
        &self,
        connections: impl IntoIterator<Item = (u32, u32)>,
        reason: &CloseReason,
        cause: CloseCause,
    ) -> usize {
        let mut conns = self.conns.borrow_mut();
        let mut closed = 0;
        for (key, generation) in connections {
            if let Some(conn) = conns.get_current(key, generation) {
                closed += usize::from(self.schedule_close(key, conn, Some(reason.clone()), cause));
            }
        }
        closed
    }

    /// The closes decided since the last call, in order.
    pub fn take_closes(&self) -> Vec<CloseOrder> {
        std::mem::take(&mut *self.closes.borrow_mut())
    }

    /// Writes `conn`'s backlog through `wire`; a failed socket is scheduled for closing.
    pub fn flush_or_close(&self, wire: &impl Wire<S>, key: u32, conn: &mut Conn<S>) -> Flush {
        let flush = wire.flush(key, conn);
        if flush == Flush::Failed {
            self.schedule_close(key, conn, None, CloseCause::IoError);
        }
        flush
    }

    /// Feeds bytes a client sent to its machine (`command` runs each command it sends),
    /// then writes the answers: replies, pongs, a close it decided.
    pub fn receive(
        &self,
        wire: &impl Wire<S>,
        key: u32,
        conn: &mut Conn<S>,
        now: u32,
        input: &mut [u8],
        command: &mut CommandHandler<'_>,
    ) {
        if !conn.machine.is_open() {
            return;
        }
        let close = conn
            .machine
            .on_input(now, input, &self.conn_config.get(), command);
        self.count_backlog(conn);
        self.lag_inexact_attaches(key, conn);
        if let Some(close) = close {
            self.enqueue_close(key, conn.generation, close);
        }
        if conn.machine.is_open() {
            self.flush_or_close(wire, key, conn);
        }
    }

    /// Starts carrying out a close the driver took from [`Engine::take_closes`] (it has
    /// taken the connection out of the index and presence): the close frame is queued
    /// behind a partly written one and what is left is written. Returns true when the
    /// connection lingers for its peer's end; false when it can go now.
    pub fn begin_close(
        &self,
        wire: &impl Wire<S>,
        key: u32,
        conn: &mut Conn<S>,
        reason: Option<&CloseReason>,
        now: u32,
    ) -> bool {
        let lingering = conn.machine.start_close(now, reason);
        self.count_backlog(conn);
        if lingering {
            // Writes what is left before the close frame (a slow consumer may still have
            // a partly sent frame); the write side is shut once all is out.
            let _ = wire.flush(key, conn);
        }
        lingering
    }

    /// Queues a control frame or reply (not flushed); a control flood closes with 1008.
    pub fn queue_control(&self, key: u32, conn: &mut Conn<S>, frame: Bytes) {
        let flood = conn.machine.queue_control(frame, &self.conn_config.get());
        self.count_backlog(conn);
        if let Err(close) = flood {
            self.enqueue_close(key, conn.generation, close);
        }
    }

    /// Marks `conn` to be written with the rest of this round.
    pub fn mark_dirty(&self, key: u32, conn: &mut Conn<S>) {
        if !conn.machine.driver.dirty {
            conn.machine.driver.dirty = true;
            self.dirty.borrow_mut().push(key);
        }
    }

    /// The connections to write next; `None` once none is dirty. Each keeps its mark
    /// until the driver writes it, so an offer meanwhile does not list it twice.
    pub fn take_dirty(&self) -> Option<Vec<u32>> {
        let keys = std::mem::take(&mut *self.dirty.borrow_mut());
        if keys.is_empty() {
            self.recycle_dirty(keys);
            return None;
        }
        Some(keys)
    }

    /// Hands a list from [`Engine::take_dirty`] back, to keep its capacity.
    pub fn recycle_dirty(&self, mut keys: Vec<u32>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            keys.clear();
            *dirty = keys;
        }
    }

    /// Writes each connection of `keys` through `wire`, one after the other, clearing its
    /// dirty mark (what [`Wire::flush_listed`] does without a batch).
    pub fn flush_each(&self, wire: &impl Wire<S>, keys: &[u32]) {
        let mut conns = self.conns.borrow_mut();
        for &key in keys {
            if let Some(conn) = conns.get_mut(key) {
                conn.machine.driver.dirty = false;
                if conn.machine.is_open() {
                    self.flush_or_close(wire, key, conn);
                }
            }
        }
    }

    /// Ends a round: answers the long polls it completed, writes every connection it
    /// queued frames to, feeds the laggers from history; returns the closes decided
    /// (in order) for the driver to carry out.
    pub fn end_round(&self, wire: &impl Wire<S>) -> Vec<CloseOrder> {
        self.answer_noted_polls();
        while let Some(keys) = self.take_dirty() {
            wire.flush_listed(&keys);
            self.recycle_dirty(keys);
        }
        self.catch_up_lagging(wire);
        self.take_closes()
    }

    /// One heartbeat tick over the connections of `keys` (a slice of the table: the
    /// driver sweeps it in parts): idle SSE streams release their position, due pings
    /// are queued, dead peers and stalled readers are closed. Returns the pings queued
    /// and the connections whose lingering close is over (the driver removes them).
    pub fn tick(&self, now: u32, keys: std::ops::Range<u32>) -> (u64, Vec<u32>) {
        let mut conns = self.conns.borrow_mut();
        let config = self.conn_config.get();
        let mut pings = 0;
        let mut lingered = Vec::new();
        for key in keys {
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            match conn.machine.on_tick(now, &config) {
                Tick::Idle => self.release_idle_stream(key, conn),
                Tick::Ping => {
                    pings += 1;
                    self.count_backlog(conn);
                    self.mark_dirty(key, conn);
                }
                Tick::Close(close) => self.enqueue_close(key, conn.generation, close),
                Tick::LingerOver => lingered.push(key),
            }
        }
        (pings, lingered)
    }

    /// Subscribes of connection `key` waiting for the cluster to follow their channel.
    pub fn cluster_waiting(&self, key: u32) -> usize {
        self.cluster_pending
            .borrow()
            .keys()
            .filter(|(k, _)| *k == key)
            .count()
    }

    /// Drops a waiting subscribe of `channel` by connection `key` (it unsubscribed).
    pub fn cluster_forget(&self, key: u32, channel: &str) {
        self.cluster_pending
            .borrow_mut()
            .remove(&(key, Arc::from(channel)));
    }

    /// Remembers that connection `key` (generation `generation`) was told it missed
    /// `channel`'s messages from `from` on, when the channel is an inbox's.
    pub fn note_inbox_gap(&self, key: u32, generation: u32, channel: &Arc<str>, from: u64) {
        if !self.inbox_on || !crate::inbox::is_user_channel(channel) {
            return;
        }
        let mut gaps = self.inbox_gaps.borrow_mut();
        let entry = gaps
            .entry((key, channel.clone()))
            .or_insert((generation, from));
        if entry.0 != generation {
            *entry = (generation, from);
        }
        entry.1 = entry.1.min(from);
    }

    /// Forgets connection `key`'s gap on `channel` (`None`: on every channel).
    pub fn forget_inbox_gap(&self, key: u32, channel: Option<&str>) {
        let mut gaps = self.inbox_gaps.borrow_mut();
        if gaps.is_empty() {
            return;
        }
        match channel {
            Some(channel) => {
                gaps.remove(&(key, Arc::from(channel)));
            }
            None => gaps.retain(|(k, _), _| *k != key),
        }
    }
}
