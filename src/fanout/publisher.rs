//! Publishing: one message in, offset taken, frame encoded once, pushed into the ring.
//!
//! Per-channel order is the invariant that matters: a subscriber must never see offset 5
//! before 4, even when UDP, TCP and HTTP ingest on different cores publish to one channel
//! at once. Taking an offset and claiming a ring slot are two steps, so they happen
//! together under the channel's stripe lock: for one channel, offset order is claim order,
//! and consumers read the ring in claim order (they never skip a claimed slot that is not
//! filled yet). Nothing else needs the lock: payload classification happens before it,
//! and the frame is encoded and installed in the claimed slot after it.
//!
//! # The stripe lock
//!
//! Producers are shard executors (one thread per core), so a lock that parks would stall a
//! whole core's connections. The stripes are spin locks with exponential backoff
//! (`crossbeam_utils::Backoff`, which ends in `yield_now` so a preempted holder gets its
//! core back), and the critical section is a hash lookup, two increments and, for a new
//! channel, one small allocation: tens of nanoseconds. 64 stripes keep publishes to
//! different channels apart. `examples/publish_contention.rs` measures it
//! (docs/benchmarks.md, "Publisher stripe lock").
//!
//! # Channel state and expiry
//!
//! Each channel with state has its last offset, an epoch and its last publish time. A
//! channel not published for `channel_idle_timeout` is forgotten by
//! [`Publisher::expire_idle`], which scans a bounded number of entries per call, a few
//! hundred per lock hold, so that a host with millions of `user:<id>` channels neither
//! grows without bound nor stalls the shard that sweeps. A forgotten channel published
//! again starts at offset 1 with a new epoch, so a client holding `(offset, epoch)` from
//! the old incarnation can tell its position no longer means anything.
//!
//! State that subscribers made and nobody published goes with them: each shard tells
//! the publisher when a channel gets its first subscriber there and when its last one
//! leaves ([`Publisher::occupy`], [`Publisher::vacate`]), and a channel that was never
//! published and has no subscribers on any shard is forgotten by the sweep once
//! [`VACANT_GRACE`] has passed (the grace covers a subscribe between its attach and its
//! shard's occupy). Without it, clients subscribing to ever new names would grow the
//! map for `channel_idle_timeout`, without bound.
//!
//! Epochs are the process start time in nanoseconds since the Unix epoch plus a counter:
//! distinct for every incarnation in this process, and distinct from a previous process's
//! unless it created channels faster than one per nanosecond over its whole life (or the
//! wall clock was stepped back across the restart).

use crate::fanout::history::{
    Budget, ChannelHistory, Entry as HistoryEntry, HistoryStats, Limits, Unrecoverable, Window,
};
use crate::fanout::ring::{Peek, Ring, RingKind, RingMessage};
use crate::fanout::spin::spin_lock;
use crate::fanout::wake::IdleFlags;
use crate::proto::message::{encode_message, EncodedData};
use crate::proto::recovery::{CatchUp, Since};
use bytes::Bytes;
use crossbeam_utils::{Backoff, CachePadded};
use indexmap::IndexMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STRIPES: usize = 64;

/// Seconds a never-published channel without subscribers is kept before the sweep
/// forgets it.
pub const VACANT_GRACE: u64 = 2;

/// Entries [`Publisher::expire_idle`] examines per call, over all stripes.
pub const SWEEP_BUDGET: usize = 4096;

/// Entries examined per stripe lock hold while sweeping: bounds how long a producer can
/// spin behind the sweeper (a few microseconds).
const SWEEP_CHUNK: usize = 256;

/// Ring slots [`Publisher::attach`] looks at to place a subscriber; a follower further
/// behind than this is placed from the history instead (a subscribe storm on a lagging
/// shard must not cost a ring scan each).
const MAX_UNREAD_SCAN: u64 = 4096;

/// What the publisher remembers about one channel.
struct ChannelState {
    /// The map's key again, so a publish clones it with a single lookup.
    name: Arc<str>,
    /// The last offset given out.
    last: u64,
    /// This incarnation's epoch.
    epoch: u64,
    /// Seconds since the publisher started, at the last publish.
    last_publish: u64,
    /// Its retained messages; `None` when its history size is 0.
    history: Option<Arc<ChannelHistory>>,
    /// Shards with subscribers of it ([`Publisher::occupy`], [`Publisher::vacate`]).
    holders: u32,
}

/// The channels hashing to one stripe. An `IndexMap` so the sweeper can resume at an
/// index between calls and remove in place (`swap_remove_index`).
type OffsetStripe = CachePadded<Mutex<IndexMap<Arc<str>, ChannelState, ahash::RandomState>>>;

/// Where the sweeper stopped: stripe, then index inside it.
#[derive(Default)]
struct SweepCursor {
    stripe: usize,
    index: usize,
}

/// Channel offsets, the ring, and the shards to wake: shared by every producer.
pub struct Publisher {
    ring: Arc<Ring>,
    idle: Arc<IdleFlags>,
    stripes: Box<[OffsetStripe]>,
    hasher: ahash::RandomState,
    started: Instant,
    epoch_base: u64,
    epoch_next: AtomicU64,
    idle_timeout: Option<Duration>,
    sweep: Mutex<SweepCursor>,
    channels: AtomicU64,
    gauge: Option<&'static AtomicU64>,
    history: HistoryPolicy,
}

/// How channels keep history.
struct HistoryPolicy {
    /// The bounds of a channel's history (size 0: none).
    limits: Box<dyn Fn(&str) -> Limits + Send + Sync>,
    budget: Budget,
}

/// What a subscriber attaching to a channel is told, and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The offset it is at: live delivery starts after it.
    pub offset: u64,
    /// False when the ring could not tell the position and `offset` is the history's
    /// estimate, which errs low: the subscriber must then catch up from `offset` through
    /// history (lag on the channel) rather than follow live from it, or it would skip
    /// silently what lies between the estimate and its live position.
    pub exact: bool,
    /// The channel's epoch.
    pub epoch: u64,
    /// With `since`: the missed frames to send before live ones, or why it cannot be
    /// recovered (the client then knows it has a gap); `None` without `since`.
    pub recovery: Option<Result<Vec<Bytes>, Unrecoverable>>,
}

/// Why a subscribe or publish that would create a channel past `max_channels` is refused.
pub fn channels_full(max: u64) -> String {
    format!("too many channels on this server (max_channels = {max}): try again later")
}

/// Where a published message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The channel offset it was given (starts at 1).
    pub offset: u64,
    /// The channel incarnation's epoch.
    pub epoch: u64,
    /// Its ring sequence.
    pub seq: u64,
}

/// What one [`Publisher::expire_idle`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Channel entries examined (at most [`SWEEP_BUDGET`]).
    pub scanned: usize,
    /// Channel entries removed.
    pub expired: usize,
}

impl Publisher {
    /// An epoch no other channel of this process has (the cluster's threads take theirs
    /// here too, so a local epoch never equals one they chose).
    pub fn new_epoch(&self) -> u64 {
        self.epoch_base + self.epoch_next.fetch_add(1, Relaxed)
    }

    /// A publisher over `ring` that wakes the shards in `idle`; channels never expire.
    pub fn new(ring: Arc<Ring>, idle: Arc<IdleFlags>) -> Self {
        let stripes = (0..STRIPES)
            .map(|_| CachePadded::new(Mutex::new(IndexMap::default())))
            .collect();
        let epoch_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2));
        Publisher {
            ring,
            idle,
            stripes,
            hasher: ahash::RandomState::new(),
            started: Instant::now(),
            epoch_base,
            epoch_next: AtomicU64::new(0),
            idle_timeout: None,
            sweep: Mutex::new(SweepCursor::default()),
            channels: AtomicU64::new(0),
            gauge: None,
            history: HistoryPolicy {
                limits: Box::new(|_| Limits { size: 0, ttl: 0 }),
                budget: Budget::new(0, Arc::new(HistoryStats::default())),
            },
        }
    }

    /// Keeps history for channels per `limits`, all of it within `max_bytes`, counted in
    /// `stats`.
    pub fn with_history(
        mut self,
        limits: impl Fn(&str) -> Limits + Send + Sync + 'static,
        max_bytes: u64,
        stats: Arc<HistoryStats>,
    ) -> Self {
        self.history = HistoryPolicy {
            limits: Box::new(limits),
            budget: Budget::new(max_bytes, stats),
        };
        self
    }

    /// The history counters (bytes, messages, evictions).
    pub fn history_stats(&self) -> &Arc<HistoryStats> {
        self.history.budget.stats()
    }

    /// Forgets channels not published for `timeout` (see [`Publisher::expire_idle`]);
    /// `None` keeps them forever.
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Mirrors the number of channels with state into `gauge` (`ringcast_channels`).
    pub fn with_channel_gauge(mut self, gauge: &'static AtomicU64) -> Self {
        gauge.store(self.channels.load(Relaxed), Relaxed);
        self.gauge = Some(gauge);
        self
    }

    /// The ring this publisher feeds.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// The shards' idle flags.
    pub fn idle_flags(&self) -> &Arc<IdleFlags> {
        &self.idle
    }

    /// Channels with offset state.
    pub fn channel_count(&self) -> u64 {
        self.channels.load(Relaxed)
    }

    /// `channel`'s last offset and epoch; `None` when it has no state (never published,
    /// or expired: its next publish starts a new epoch at offset 1).
    pub fn position(&self, channel: &str) -> Option<(u64, u64)> {
        let map = spin_lock(self.stripe(channel));
        map.get(channel).map(|s| (s.last, s.epoch))
    }

    /// A shard has its first subscriber of `channel`: the channel is kept while any
    /// shard has one (its state is created if absent).
    pub fn occupy(&self, channel: &str) {
        let now = self.started.elapsed().as_secs();
        let mut map = spin_lock(self.stripe(channel));
        let state = self.state_mut(&mut map, channel, now);
        state.holders += 1;
    }

    /// True when `channel` has state, or there is room for it under `max` channels: a
    /// subscribe or local publish that would create the `max + 1`st channel is refused
    /// with [`channels_full`].
    pub fn has_room_for(&self, channel: &str, max: u64) -> bool {
        // The lookup only at the limit: below it, a new channel has room.
        self.channel_count() < max || self.position(channel).is_some()
    }

    /// A shard's last subscriber of `channel` left. A channel never published is
    /// forgotten by the sweep [`VACANT_GRACE`] seconds after no shard holds it.
    pub fn vacate(&self, channel: &str) {
        let now = self.started.elapsed().as_secs();
        let mut map = spin_lock(self.stripe(channel));
        if let Some(state) = map.get_mut(channel) {
            state.holders = state.holders.saturating_sub(1);
            if state.last == 0 {
                // Only for the grace: `last_publish` of an unpublished channel is when
                // it last changed hands.
                state.last_publish = now;
            }
        }
    }

    /// Publishes `payload` to `channel` (already validated) and wakes idle shards.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> Published {
        let published = self.publish_quiet(channel, payload);
        self.idle.wake_idle();
        published
    }

    /// Publishes without waking anyone (for callers that batch, and for tests).
    pub fn publish_quiet(&self, channel: &str, payload: &[u8]) -> Published {
        self.publish_inner(channel, payload, None)
    }

    /// Publishes `payload` to `channel` at an `offset` and `epoch` chosen by the
    /// channel's owner, without waking anyone: the durable inbox
    /// ([`crate::inbox::redb`]) is the single writer of `user:` channels and gives
    /// them offsets that survive restarts. The owner must call it with offsets +1 at a
    /// time in one epoch, from one thread; a different epoch than the channel's state
    /// replaces that state (and empties its history, whose offsets meant another
    /// incarnation). History is kept exactly as for [`Publisher::publish`]: the frame
    /// is retained before it is installed in the ring.
    ///
    /// An offset at or behind the channel's last one in the same epoch would hand
    /// subscribers a second message under an offset they already hold: it is refused
    /// (`None`), counted in `ringcast_owner_offsets_refused_total` and logged, in every
    /// build.
    pub fn publish_at(
        &self,
        channel: &str,
        offset: u64,
        epoch: u64,
        payload: &[u8],
    ) -> Option<Published> {
        self.publish_checked(channel, payload, None, Some((offset, epoch)))
    }

    /// Makes `channel`'s state say (`last`, `epoch`) when its owner knows better: when
    /// the channel has no state (never published in this process, or expired) or another
    /// epoch, or is behind `last`. For an owner-written channel whose subscriber is
    /// about to [`Publisher::attach`] with a position the owner gave.
    pub fn adopt_position(&self, channel: &str, last: u64, epoch: u64) {
        let now = self.started.elapsed().as_secs();
        let mut map = spin_lock(self.stripe(channel));
        let state = self.owned_state_mut(&mut map, channel, now, last, epoch);
        state.last = state.last.max(last);
    }

    /// [`Publisher::publish_quiet`], also returning how long it waited for the stripe lock
    /// (for `examples/publish_contention.rs`).
    #[doc(hidden)]
    pub fn publish_timed(&self, channel: &str, payload: &[u8]) -> (Published, Duration) {
        let mut wait = Duration::ZERO;
        let published = self.publish_inner(channel, payload, Some(&mut wait));
        (published, wait)
    }

    fn stripe(&self, channel: &str) -> &OffsetStripe {
        &self.stripes[(self.hasher.hash_one(channel) as usize) % STRIPES]
    }

    fn publish_inner(
        &self,
        channel: &str,
        payload: &[u8],
        lock_wait: Option<&mut Duration>,
    ) -> Published {
        self.publish_checked(channel, payload, lock_wait, None)
            .expect("only an owner's offset is refused, and there is none here")
    }

    fn publish_checked(
        &self,
        channel: &str,
        payload: &[u8],
        lock_wait: Option<&mut Duration>,
        owned: Option<(u64, u64)>,
    ) -> Option<Published> {
        let data = EncodedData::new(payload);
        if data.replaced_invalid_utf8() {
            // Ingest refuses such payloads; only a foreign writer gets here (see
            // EncodedData), so one line each is not a flood a client can cause.
            tracing::warn!(
                channel,
                bytes = payload.len(),
                "payload is not UTF-8: invalid sequences sent as U+FFFD"
            );
        }
        let published_at = Instant::now();
        let now = published_at
            .saturating_duration_since(self.started)
            .as_secs();
        let stripe = self.stripe(channel);
        let before = lock_wait.is_some().then(Instant::now);
        let mut map = spin_lock(stripe);
        if let (Some(wait), Some(before)) = (lock_wait, before) {
            *wait = before.elapsed();
        }
        let state = match owned {
            None => {
                let state = self.state_mut(&mut map, channel, now);
                state.last += 1;
                state
            }
            Some((offset, epoch)) => {
                let state =
                    self.owned_state_mut(&mut map, channel, now, offset.saturating_sub(1), epoch);
                if offset <= state.last {
                    let last = state.last;
                    drop(map);
                    self.history
                        .budget
                        .stats()
                        .refused_offsets
                        .fetch_add(1, Relaxed);
                    tracing::error!(
                        channel,
                        offset,
                        last,
                        epoch,
                        "message refused: its offset does not follow the channel's last one \
                         (the channel's writer reused an offset)"
                    );
                    return None;
                }
                state.last = offset;
                state
            }
        };
        state.last_publish = now;
        let (name, offset, epoch) = (state.name.clone(), state.last, state.epoch);
        let history = state.history.clone();
        // Claimed under the lock: this channel's next offset cannot claim an earlier slot.
        let seq = self.ring.claim();
        drop(map);
        let frame = encode_message(channel, offset, &data);
        if let Some(history) = history {
            // Retained before it is installed: see crate::fanout::history.
            let entry = HistoryEntry {
                offset,
                seq,
                at: now,
                frame: frame.clone(),
            };
            self.history.budget.retain(&history, entry, now);
        }
        self.ring.install(
            seq,
            RingMessage {
                channel: name,
                offset,
                frame,
                published_at,
                kind: RingKind::Message,
            },
        );
        Some(Published { offset, epoch, seq })
    }

    /// `channel`'s state, created (offset 0, a new epoch) if it has none.
    fn state_mut<'m>(
        &self,
        map: &'m mut IndexMap<Arc<str>, ChannelState, ahash::RandomState>,
        channel: &str,
        now: u64,
    ) -> &'m mut ChannelState {
        if !map.contains_key(channel) {
            let name: Arc<str> = Arc::from(channel);
            let limits = (self.history.limits)(channel);
            let state = ChannelState {
                name: name.clone(),
                last: 0,
                epoch: self.new_epoch(),
                last_publish: now,
                history: (limits.size > 0).then(|| Arc::new(ChannelHistory::new(limits))),
                holders: 0,
            };
            map.insert(name, state);
            self.count_channels(1, 0);
        }
        // Just ensured present.
        map.get_mut(channel).expect("channel state present")
    }

    /// `channel`'s state for an owner that says its last offset is `last` in `epoch`:
    /// created with them if absent, reset to them (history emptied) if its epoch differs.
    fn owned_state_mut<'m>(
        &self,
        map: &'m mut IndexMap<Arc<str>, ChannelState, ahash::RandomState>,
        channel: &str,
        now: u64,
        last: u64,
        epoch: u64,
    ) -> &'m mut ChannelState {
        let state = self.state_mut(map, channel, now);
        if state.epoch != epoch {
            if let Some(history) = &state.history {
                self.history.budget.release(history);
            }
            state.epoch = epoch;
            state.last = last;
        }
        state
    }

    /// Attaches a subscriber on a shard whose ring follower reads sequence `cursor` next:
    /// the offset it is at and, with `since`, the frames it missed (at most `max_replay`)
    /// or why they cannot all be given. Creates the channel's state (and epoch) if it has
    /// none, so the answer is a position the client can resume from.
    pub fn attach(
        &self,
        channel: &str,
        since: Option<Since>,
        cursor: u64,
        max_replay: usize,
    ) -> Attach {
        let now = self.started.elapsed().as_secs();
        let mut map = spin_lock(self.stripe(channel));
        let state = self.state_mut(&mut map, channel, now);
        let (name, last, epoch, history) = (
            state.name.clone(),
            state.last,
            state.epoch,
            state.history.clone(),
        );
        // Read under the lock: every offset up to `last` claimed a sequence below it.
        let claimed = self.ring.head();
        drop(map);
        let window = history.as_ref().map(|h| h.lock());
        let (offset, exact) = match self.unread(&name, cursor, claimed) {
            Some(unread) => (last - unread, true),
            // The ring cannot tell: the history can, erring low (never an offset the
            // client would wrongly think it has); the caller makes it catch up from there.
            None => (window.as_ref().map_or(0, |w| w.position(cursor)), false),
        };
        let recovery = since.map(|since| {
            if since.epoch != epoch {
                return Err(Unrecoverable::EpochChanged);
            }
            match &window {
                Some(w) => w.since(since.offset, offset, max_replay),
                None if since.offset == offset => Ok(Vec::new()),
                None if since.offset > offset => Err(Unrecoverable::Ahead),
                None => Err(Unrecoverable::TooOld),
            }
        });
        Attach {
            offset,
            exact,
            epoch,
            recovery,
        }
    }

    /// The next part of a lagging subscriber's catch-up on `channel` (see
    /// [`Window::catch_up`]): it has everything up to `since`, its shard's follower reads
    /// `cursor` next. `done` only when its live position is known exactly: stopping
    /// early would lose what the follower already passed.
    pub fn catch_up(&self, channel: &str, since: u64, cursor: u64, max_bytes: usize) -> CatchUp {
        let now = self.started.elapsed().as_secs();
        let mut map = spin_lock(self.stripe(channel));
        let state = self.state_mut(&mut map, channel, now);
        let (name, last, history) = (state.name.clone(), state.last, state.history.clone());
        let claimed = self.ring.head();
        drop(map);
        let exact = self
            .unread(&name, cursor, claimed)
            .map(|unread| last - unread);
        let Some(history) = history else {
            // Nothing retained: whatever it missed is a gap.
            return match exact {
                Some(upto) => Window::default().catch_up(since, upto, max_bytes),
                None => CatchUp {
                    reached: since,
                    ..CatchUp::default()
                },
            };
        };
        let window = history.lock();
        let upto = exact.unwrap_or_else(|| window.position(cursor));
        let mut out = window.catch_up(since, upto, max_bytes);
        out.done &= exact.is_some();
        out
    }

    /// How many of `channel`'s messages lie between a follower's `cursor` and the claim
    /// counter `claimed`: published, but not read by that follower yet. Presence events
    /// hold ring slots too but no offset, so they are not counted. `None` when the ring
    /// cannot tell (the follower was lapped, or a producer is slow to install).
    fn unread(&self, channel: &Arc<str>, cursor: u64, claimed: u64) -> Option<u64> {
        if claimed.saturating_sub(cursor) > MAX_UNREAD_SCAN.min(self.ring.capacity()) {
            return None;
        }
        let mut unread = 0;
        for seq in cursor..claimed {
            let backoff = Backoff::new();
            loop {
                match self.ring.peek_channel(seq) {
                    Peek::Message(c) => {
                        if Arc::ptr_eq(&c, channel) || *c == **channel {
                            unread += 1;
                        }
                        break;
                    }
                    Peek::Event(_) => break,
                    Peek::Gone => return None,
                    // Claimed: the producer installs it right after encoding.
                    Peek::NotYet if !backoff.is_completed() => backoff.snooze(),
                    Peek::NotYet => return None,
                }
            }
        }
        Some(unread)
    }

    fn count_channels(&self, added: u64, removed: u64) {
        let now = if removed > 0 {
            self.channels.fetch_sub(removed, Relaxed) - removed
        } else {
            self.channels.fetch_add(added, Relaxed) + added
        };
        if let Some(gauge) = self.gauge {
            // Two updates racing may store out of order; the next change corrects it.
            gauge.store(now, Relaxed);
        }
    }

    /// Forgets channels not published for the idle timeout and ages out history past its
    /// TTL, examining at most [`SWEEP_BUDGET`] entries (at most 256 per stripe lock hold)
    /// and resuming where the previous call stopped. Meant to be called periodically from
    /// one shard; does nothing while another sweep is running.
    pub fn expire_idle(&self, now: Instant) -> Sweep {
        let mut done = Sweep::default();
        let Some(mut cursor) = self.sweep.try_lock() else {
            return done;
        };
        let now = now.saturating_duration_since(self.started).as_secs();
        let timeout = self.idle_timeout.map(|t| t.as_secs());
        // At most one lock hold per stripe's worth of steps: an empty map ends quickly.
        for _ in 0..STRIPES {
            if done.scanned >= SWEEP_BUDGET {
                break;
            }
            // Spins like a producer: their holds are tens of nanoseconds.
            let mut map = spin_lock(&self.stripes[cursor.stripe]);
            let limit = SWEEP_CHUNK.min(SWEEP_BUDGET - done.scanned);
            let mut seen = 0;
            while seen < limit && cursor.index < map.len() {
                seen += 1;
                let idle = map.get_index(cursor.index).is_some_and(|(_, s)| {
                    let quiet = now.saturating_sub(s.last_publish);
                    timeout.is_some_and(|t| quiet >= t)
                        || (s.last == 0 && s.holders == 0 && quiet >= VACANT_GRACE)
                });
                if idle {
                    // The last entry moves into this index: look at it next.
                    if let Some((_, gone)) = map.swap_remove_index(cursor.index) {
                        if let Some(history) = gone.history {
                            self.history.budget.release(&history);
                        }
                    }
                    done.expired += 1;
                } else {
                    if let Some(history) = map
                        .get_index(cursor.index)
                        .and_then(|(_, s)| s.history.as_ref())
                    {
                        // A quiet channel's messages age out here.
                        self.history.budget.trim(history, now);
                    }
                    cursor.index += 1;
                }
            }
            done.scanned += seen;
            if cursor.index >= map.len() {
                cursor.stripe = (cursor.stripe + 1) % STRIPES;
                cursor.index = 0;
            }
        }
        if done.expired > 0 {
            self.count_channels(0, done.expired as u64);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::ring::Poll;
    use std::collections::HashMap;

    #[test]
    fn offsets_follow_ring_order_per_channel_under_contention() {
        let ring = Arc::new(Ring::new(1 << 16));
        let publisher = Arc::new(Publisher::new(ring.clone(), Arc::new(IdleFlags::new(1))));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = publisher.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let ch = if i % 2 == 0 {
                            "shared"
                        } else {
                            ["a", "b", "c", "d"][t]
                        };
                        p.publish_quiet(ch, b"{}");
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let mut cursor = 0;
        let mut last: HashMap<String, u64> = HashMap::new();
        while let Poll::Message(m) = ring.poll(&mut cursor) {
            let v: serde_json::Value = serde_json::from_slice(&m.frame[2..]).unwrap();
            let offset = v["offset"].as_u64().unwrap();
            let prev = last.insert(m.channel.to_string(), offset).unwrap_or(0);
            assert_eq!(offset, prev + 1, "channel {} jumped", m.channel);
        }
        assert_eq!(last["shared"], 4000);
        assert_eq!(cursor, 8000);
    }

    fn publisher(timeout_secs: u64) -> Publisher {
        Publisher::new(Arc::new(Ring::new(1 << 10)), Arc::new(IdleFlags::new(1)))
            .with_idle_timeout(Some(Duration::from_secs(timeout_secs)))
    }

    #[test]
    fn offsets_continue_while_a_channel_is_published() {
        let p = publisher(10);
        let first = p.publish_quiet("user:1", b"{}");
        assert_eq!(first.offset, 1);
        // Idle for less than the timeout: kept.
        let sweep = p.expire_idle(Instant::now() + Duration::from_secs(5));
        assert_eq!((sweep.scanned, sweep.expired), (1, 0));
        let second = p.publish_quiet("user:1", b"{}");
        assert_eq!((second.offset, second.epoch), (2, first.epoch));
        assert_eq!(p.position("user:1"), Some((2, first.epoch)));
        assert_eq!(p.channel_count(), 1);
    }

    /// Regression: every subscribe of a new name left channel state (and a history) for
    /// `channel_idle_timeout` after its subscribers left, so clients subscribing to ever
    /// new names grew the map without bound.
    #[test]
    fn state_made_by_subscribers_goes_with_them() {
        let p = publisher(3600);
        for name in ["a", "b", "kept"] {
            p.attach(name, None, 0, 0);
            p.occupy(name);
        }
        p.occupy("b"); // a second shard
        p.publish_quiet("kept", b"{}");
        for name in ["a", "b", "kept"] {
            p.vacate(name);
        }
        let later = Instant::now() + Duration::from_secs(VACANT_GRACE + 1);
        let sweep = p.expire_idle(later);
        assert_eq!(
            sweep.expired, 1,
            "only a: b still has a shard, kept was published"
        );
        assert_eq!(p.position("a"), None);
        assert!(p.position("b").is_some());
        assert_eq!(p.position("kept").map(|(last, _)| last), Some(1));
        p.vacate("b");
        let sweep = p.expire_idle(later + Duration::from_secs(VACANT_GRACE + 1));
        assert_eq!(sweep.expired, 1);
        assert_eq!(p.channel_count(), 1);
        // Within the grace (an attach not yet followed by its shard's occupy): kept.
        p.attach("fresh", None, 0, 0);
        assert_eq!(p.expire_idle(Instant::now()).expired, 0);
    }

    #[test]
    fn an_expired_channel_restarts_at_one_with_a_new_epoch() {
        static GAUGE: AtomicU64 = AtomicU64::new(0);
        let p = publisher(10).with_channel_gauge(&GAUGE);
        let old = p.publish_quiet("user:2", b"{}");
        p.publish_quiet("user:2", b"{}");
        p.publish_quiet("other", b"{}");
        assert_eq!(GAUGE.load(Relaxed), 2);
        let sweep = p.expire_idle(Instant::now() + Duration::from_secs(11));
        assert_eq!(sweep.expired, 2);
        assert_eq!(p.position("user:2"), None);
        assert_eq!((p.channel_count(), GAUGE.load(Relaxed)), (0, 0));
        let new = p.publish_quiet("user:2", b"{}");
        assert_eq!(new.offset, 1);
        assert_ne!(new.epoch, old.epoch);
        assert_eq!(p.position("user:2"), Some((1, new.epoch)));
    }

    #[test]
    fn expiry_work_per_call_is_bounded_and_resumes() {
        let p = publisher(1);
        let channels = 3 * SWEEP_BUDGET + 100;
        for i in 0..channels {
            p.publish_quiet(&format!("user:{i}"), b"{}");
        }
        let later = Instant::now() + Duration::from_secs(2);
        let mut calls = 0;
        let mut expired = 0;
        while p.channel_count() > 0 {
            let sweep = p.expire_idle(later);
            assert!(sweep.scanned <= SWEEP_BUDGET, "{sweep:?}");
            expired += sweep.expired;
            calls += 1;
            assert!(
                calls <= 2 * channels / SWEEP_BUDGET + STRIPES,
                "sweep makes no progress"
            );
        }
        assert_eq!(expired, channels);
        assert!(calls >= channels.div_ceil(SWEEP_BUDGET));
    }

    fn with_history(size: usize) -> Publisher {
        Publisher::new(Arc::new(Ring::new(64)), Arc::new(IdleFlags::new(1))).with_history(
            move |_| Limits { size, ttl: 3600 },
            1 << 20,
            Arc::new(HistoryStats::default()),
        )
    }

    #[test]
    fn attach_replays_what_the_follower_passed_and_leaves_the_rest_live() {
        let p = with_history(100);
        let published: Vec<Published> = (0..6).map(|_| p.publish_quiet("c", b"1")).collect();
        let epoch = published[0].epoch;
        // The follower has read the first four: offsets 5 and 6 will come live.
        let cursor = published[4].seq;
        let since = Some(Since { offset: 1, epoch });
        let a = p.attach("c", since, cursor, 100);
        assert_eq!((a.offset, a.epoch), (4, epoch));
        let frames = a.recovery.unwrap().unwrap();
        let offsets: Vec<bool> = frames
            .iter()
            .zip(2..=4)
            .map(|(f, o)| String::from_utf8_lossy(f).contains(&format!("\"offset\":{o},")))
            .collect();
        assert_eq!(offsets, [true, true, true]);
        let other_epoch = Some(Since {
            offset: 1,
            epoch: epoch + 1,
        });
        let b = p.attach("c", other_epoch, cursor, 100);
        assert_eq!(b.recovery, Some(Err(Unrecoverable::EpochChanged)));
        assert_eq!(
            p.attach("c", since, cursor, 2).recovery,
            Some(Err(Unrecoverable::TooMany))
        );
    }

    /// Presence events share the ring with messages but have no offset: a subscriber's
    /// position must not count them as unread messages of the channel.
    #[test]
    fn attach_does_not_count_presence_events_as_unread() {
        let p = with_history(0);
        let event = |p: &Publisher| {
            p.ring().push(RingMessage {
                channel: Arc::from("c"),
                frame: Bytes::from_static(b"event"),
                published_at: Instant::now(),
                offset: 0,
                kind: RingKind::Event,
            })
        };
        let first = p.publish_quiet("c", b"1").seq;
        p.publish_quiet("c", b"2");
        let after_two = event(&p);
        p.publish_quiet("c", b"3");
        event(&p);
        p.publish_quiet("other", b"x");
        assert_eq!(p.attach("c", None, first, 0).offset, 0, "nothing read yet");
        assert_eq!(p.attach("c", None, after_two, 0).offset, 2);
        assert_eq!(p.attach("c", None, p.ring().head(), 0).offset, 3);
        assert_eq!(p.position("c").map(|(offset, _)| offset), Some(3));
    }

    #[test]
    fn attach_without_history_or_state() {
        let p = with_history(0);
        let fresh = p.attach("new", None, 0, 100);
        assert_eq!(fresh.offset, 0, "a channel never published starts at 0");
        assert_eq!(
            p.publish_quiet("new", b"1").epoch,
            fresh.epoch,
            "and keeps its epoch"
        );
        let since = Some(Since {
            offset: 0,
            epoch: fresh.epoch,
        });
        let r = p.attach("new", since, u64::MAX, 100);
        assert_eq!(r.offset, 1);
        assert_eq!(r.recovery, Some(Err(Unrecoverable::TooOld)));
        let at_end = Some(Since {
            offset: 1,
            epoch: fresh.epoch,
        });
        assert_eq!(
            p.attach("new", at_end, u64::MAX, 100).recovery,
            Some(Ok(Vec::new()))
        );
    }

    fn offset_of(frame: &[u8]) -> u64 {
        let text = String::from_utf8_lossy(frame);
        let at = text.find("\"offset\":").expect("offset field") + 9;
        text[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("offset number")
    }

    /// Two producer threads publish to one channel while a follower (this thread) reads
    /// the ring and keeps attaching subscribers that "reconnect" with `since`: each one's
    /// replay plus what it then reads live is exactly the offsets after its position,
    /// once each, in order. Catches a frame installed before it is retained, or a
    /// position that counts what the follower has not read.
    #[test]
    fn replay_then_live_is_exact_while_two_threads_publish() {
        const EACH: u64 = 20_000;
        let p = Arc::new(
            Publisher::new(Arc::new(Ring::new(1 << 17)), Arc::new(IdleFlags::new(1))).with_history(
                |_| Limits {
                    size: 1 << 17,
                    ttl: 3600,
                },
                1 << 30,
                Arc::new(HistoryStats::default()),
            ),
        );
        let epoch = p.attach("c", None, 0, 0).epoch;
        let mut cursor = p.ring().head();
        let producers: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..EACH {
                        p.publish_quiet("c", b"1");
                    }
                })
            })
            .collect();
        // (offsets received so far) per subscriber; the last one is the live one.
        let mut current: Vec<u64> = Vec::new();
        let mut position = 0;
        let mut attaches = 0;
        let mut polls = 0u64;
        loop {
            match p.ring().poll(&mut cursor) {
                Poll::Message(msg) => {
                    current.push(offset_of(&msg.frame));
                    polls += 1;
                }
                Poll::Overrun { .. } => panic!("ring too small for the test"),
                Poll::Empty if cursor >= 2 * EACH => break,
                Poll::Empty => std::hint::spin_loop(),
            }
            if polls % 97 == 0 || matches!(current.len(), 1..=3) && polls % 5 == 0 {
                // This subscriber leaves; the next attaches at the follower's cursor.
                let want: Vec<u64> = (position + 1..=position + current.len() as u64).collect();
                assert_eq!(current, want, "subscriber {attaches}");
                position = current.last().copied().unwrap_or(position);
                let a = p.attach(
                    "c",
                    Some(Since {
                        offset: position,
                        epoch,
                    }),
                    cursor,
                    1 << 20,
                );
                let replay = a.recovery.expect("since given").expect("recoverable");
                current = replay.iter().map(|f| offset_of(f)).collect();
                attaches += 1;
            }
        }
        for t in producers {
            t.join().expect("producer");
        }
        let want: Vec<u64> = (position + 1..=2 * EACH).collect();
        assert_eq!(current, want);
        assert!(attaches > 100, "{attaches} attaches");
    }

    /// The inbox's path: an owner gives offsets and a fixed epoch; history and attach
    /// agree with them, and a position adopted from the owner survives expiry.
    #[test]
    fn owner_offsets_keep_history_and_attach_consistent() {
        let p = with_history(100);
        // A subscriber attached before the owner published: the owner's epoch replaces it.
        let early = p.attach("user:7", None, 0, 100);
        let epoch = 42;
        assert_ne!(early.epoch, epoch);
        for offset in 1..=3 {
            let at = p
                .publish_at("user:7", offset, epoch, b"1")
                .expect("moves forward");
            assert_eq!((at.offset, at.epoch), (offset, epoch));
        }
        assert_eq!(p.position("user:7"), Some((3, epoch)));
        // A follower that read nothing yet: the three will come live, none replayed.
        let a = p.attach("user:7", Some(Since { offset: 3, epoch }), 0, 100);
        assert_eq!(a.offset, 0, "all unread by this follower");
        // A follower past them all: replay from 1.
        let end = p.ring().head();
        let b = p.attach("user:7", Some(Since { offset: 1, epoch }), end, 100);
        assert_eq!(b.offset, 3);
        let frames = b.recovery.unwrap().unwrap();
        assert_eq!(
            frames.iter().map(|f| offset_of(f)).collect::<Vec<_>>(),
            [2, 3]
        );
        // Expired, then adopted from the owner: the position and epoch come back.
        let later = publisher(1);
        later.publish_at("user:8", 5, epoch, b"1");
        later.expire_idle(Instant::now() + Duration::from_secs(2));
        assert_eq!(later.position("user:8"), None);
        later.adopt_position("user:8", 5, epoch);
        assert_eq!(later.position("user:8"), Some((5, epoch)));
        assert_eq!(
            later.publish_at("user:8", 6, epoch, b"1").map(|p| p.offset),
            Some(6)
        );
    }

    /// An owner that gives an offset twice (or one behind) in the same epoch is refused
    /// in every build: subscribers would get two messages under one offset.
    #[test]
    fn owner_offsets_that_do_not_move_forward_are_refused() {
        let p = with_history(100);
        let epoch = 9;
        assert!(p.publish_at("user:1", 4, epoch, b"1").is_some());
        let head = p.ring().head();
        assert_eq!(p.publish_at("user:1", 4, epoch, b"2"), None, "same offset");
        assert_eq!(p.publish_at("user:1", 2, epoch, b"3"), None, "behind");
        assert_eq!(p.ring().head(), head, "nothing reached the ring");
        assert_eq!(p.position("user:1"), Some((4, epoch)));
        assert_eq!(p.history.budget.stats().refused_offsets.load(Relaxed), 2);
        // Another epoch starts the channel over: its offsets may be lower.
        assert_eq!(
            p.publish_at("user:1", 1, epoch + 1, b"4")
                .map(|p| (p.offset, p.epoch)),
            Some((1, epoch + 1))
        );
    }

    #[test]
    fn channels_never_expire_without_a_timeout() {
        let p = Publisher::new(Arc::new(Ring::new(16)), Arc::new(IdleFlags::new(1)));
        p.publish_quiet("news", b"{}");
        let sweep = p.expire_idle(Instant::now() + Duration::from_secs(1 << 30));
        assert_eq!(sweep.expired, 0);
        assert_eq!(p.position("news").map(|(offset, _)| offset), Some(1));
    }

    #[test]
    fn epochs_differ_across_publishers_and_incarnations() {
        let a = Publisher::new(Arc::new(Ring::new(16)), Arc::new(IdleFlags::new(1)));
        let x = a.publish_quiet("x", b"1").epoch;
        let y = a.publish_quiet("y", b"1").epoch;
        std::thread::sleep(Duration::from_millis(2));
        let b = Publisher::new(Arc::new(Ring::new(16)), Arc::new(IdleFlags::new(1)));
        let z = b.publish_quiet("x", b"1").epoch;
        assert!(x != y && z > y, "{x} {y} {z}");
    }
}
