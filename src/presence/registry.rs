//! The process-wide presence registry: channel → members, exact over every shard.
//!
//! # Shape
//!
//! 64 stripes, each a spin-locked map from channel name to that channel's members (a
//! [`Member`] and how many of its connections are subscribed). Shards touch it once per
//! subscribe or unsubscribe on a presence channel and once per such subscription of a
//! closing connection, never per message; a stripe is held for a hash lookup and a
//! counter update (plus, on first-in or last-out with join/leave on, one ring claim), so
//! shards working on different channels do not contend, and the lock is taken by spinning
//! like the publisher's (a shard thread must never park). A presence query copies the
//! channel's members out under the lock and renders them after.
//!
//! Memory is bounded by subscriptions: an entry per (channel, member) with at least one
//! subscribed connection, and a channel entry only while it has members (the last leave
//! removes it).
//!
//! # Events and ordering
//!
//! With `announce` (the namespace's `join_leave`), a member's first connection in sends a
//! join event and its last connection out a leave event, through the fan-out ring like a
//! published message: encoded once, read by every shard, delivered to the channel's
//! subscribers there. The ring slot is claimed while the stripe is held, so for one
//! channel the events are in the ring in the order the registry decided them (a leave
//! never overtakes the join before it, whichever shards the connections were on). An event
//! is a [`RingKind::Event`]: no offset, no history, not counted by
//! [`crate::fanout::publisher::Publisher::attach`].

use crate::fanout::ring::{Ring, RingKind, RingMessage};
use crate::fanout::spin::spin_lock;
use crate::fanout::wake::IdleFlags;
use crate::presence::member::Member;
use crate::proto::message::encode_presence_event;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

const STRIPES: usize = 64;

/// Process-wide presence counters (rendered by [`crate::metrics`]).
#[derive(Debug, Default)]
pub struct PresenceStats {
    /// Channels with at least one member (gauge).
    pub channels: AtomicU64,
    /// Members over all presence channels, a user counted once per channel (gauge).
    pub members: AtomicU64,
    /// Join events sent.
    pub joins: AtomicU64,
    /// Leave events sent.
    pub leaves: AtomicU64,
}

/// What one connection in or out did to its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Its first connection on the channel: the member joined.
    Joined,
    /// Its last connection left: the member left.
    Left,
    /// Only the member's connection count changed (or nothing was known to change).
    Unchanged,
}

/// A channel's members at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Distinct members.
    pub count: usize,
    /// Connections over all members.
    pub connections: u64,
    /// Each member and its connection count, in no particular order; `None` when there
    /// are more than the caller's limit.
    pub members: Option<Vec<(Member, u32)>>,
}

struct ChannelPresence {
    /// The map's key again, for the events' `RingMessage::channel`.
    name: Arc<str>,
    members: HashMap<Member, u32, ahash::RandomState>,
    connections: u64,
}

type Stripe = CachePadded<Mutex<HashMap<Arc<str>, ChannelPresence, ahash::RandomState>>>;

/// The presence registry shared by every shard.
pub struct Presence {
    stripes: Box<[Stripe]>,
    hasher: ahash::RandomState,
    ring: Arc<Ring>,
    idle: Arc<IdleFlags>,
    stats: Arc<PresenceStats>,
}

impl Presence {
    /// An empty registry whose join/leave events go into `ring`, waking the shards in
    /// `idle`.
    pub fn new(ring: Arc<Ring>, idle: Arc<IdleFlags>) -> Self {
        Presence {
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(Mutex::new(HashMap::default())))
                .collect(),
            hasher: ahash::RandomState::new(),
            ring,
            idle,
            stats: Arc::new(PresenceStats::default()),
        }
    }

    /// Counts into `stats` (the metrics' block) instead of a private one.
    pub fn with_stats(mut self, stats: Arc<PresenceStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The ring the events go into.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// The counters.
    pub fn stats(&self) -> &PresenceStats {
        &self.stats
    }

    fn stripe(&self, channel: &str) -> &Stripe {
        &self.stripes[(self.hasher.hash_one(channel) as usize) % STRIPES]
    }

    /// One connection of `member` subscribed to `channel`. On its first, and with
    /// `announce`, a join event goes to the channel's subscribers on every shard.
    pub fn join(&self, channel: &str, member: &Member, announce: bool) -> Change {
        let mut map = spin_lock(self.stripe(channel));
        if !map.contains_key(channel) {
            let name: Arc<str> = Arc::from(channel);
            self.stats.channels.fetch_add(1, Relaxed);
            map.insert(
                name.clone(),
                ChannelPresence {
                    name,
                    members: HashMap::default(),
                    connections: 0,
                },
            );
        }
        let Some(entry) = map.get_mut(channel) else {
            return Change::Unchanged; // just inserted: unreachable
        };
        entry.connections += 1;
        let count = entry.members.entry(member.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return Change::Unchanged;
        }
        self.stats.members.fetch_add(1, Relaxed);
        let name = entry.name.clone();
        let seq = announce.then(|| self.ring.claim());
        drop(map);
        if let Some(seq) = seq {
            self.stats.joins.fetch_add(1, Relaxed);
            self.send(seq, "join", name, member);
        }
        Change::Joined
    }

    /// One connection of `member` left `channel` (unsubscribed or closed). On its last,
    /// and with `announce`, a leave event goes to the channel's subscribers on every
    /// shard. A connection that was never counted changes nothing.
    pub fn leave(&self, channel: &str, member: &Member, announce: bool) -> Change {
        let mut map = spin_lock(self.stripe(channel));
        let Some(entry) = map.get_mut(channel) else {
            return Change::Unchanged;
        };
        let Some(count) = entry.members.get_mut(member) else {
            return Change::Unchanged;
        };
        entry.connections = entry.connections.saturating_sub(1);
        *count -= 1;
        if *count > 0 {
            return Change::Unchanged;
        }
        entry.members.remove(member);
        let name = entry.name.clone();
        self.stats.members.fetch_sub(1, Relaxed);
        if entry.members.is_empty() {
            map.remove(channel);
            self.stats.channels.fetch_sub(1, Relaxed);
        }
        let seq = announce.then(|| self.ring.claim());
        drop(map);
        if let Some(seq) = seq {
            self.stats.leaves.fetch_add(1, Relaxed);
            self.send(seq, "leave", name, member);
        }
        Change::Left
    }

    /// Encodes and installs an event in the slot claimed for it, then wakes idle shards.
    fn send(&self, seq: u64, kind: &str, channel: Arc<str>, member: &Member) {
        let mut json = String::with_capacity(48);
        member.write_json(&mut json, None);
        let frame = encode_presence_event(kind, &channel, &json);
        self.ring.install(
            seq,
            RingMessage {
                channel,
                frame,
                published_at: Instant::now(),
                offset: 0,
                kind: RingKind::Event,
            },
        );
        self.idle.wake_idle();
    }

    /// Puts a join/leave event decided on another node into the ring (from the NATS
    /// thread, which wakes the idle shards itself: [`IdleFlags::wake_idle`] only works on
    /// a shard executor). `member_json` is the member as [`Member::write_json`] writes it.
    pub fn inject_event(&self, kind: &str, channel: &str, member_json: &str) {
        let seq = self.ring.claim();
        let frame = encode_presence_event(kind, channel, member_json);
        self.ring.install(
            seq,
            RingMessage {
                channel: Arc::from(channel),
                frame,
                published_at: Instant::now(),
                offset: 0,
                kind: RingKind::Event,
            },
        );
    }

    /// `channel`'s members, listed when there are at most `max_members` of them.
    pub fn snapshot(&self, channel: &str, max_members: usize) -> Snapshot {
        let map = spin_lock(self.stripe(channel));
        let Some(entry) = map.get(channel) else {
            return Snapshot {
                count: 0,
                connections: 0,
                members: Some(Vec::new()),
            };
        };
        let count = entry.members.len();
        Snapshot {
            count,
            connections: entry.connections,
            members: (count <= max_members)
                .then(|| entry.members.iter().map(|(m, &n)| (m.clone(), n)).collect()),
        }
    }

    /// Channels with at least one member.
    pub fn channel_count(&self) -> u64 {
        self.stats.channels.load(Relaxed)
    }

    /// Members over all channels.
    pub fn member_count(&self) -> u64 {
        self.stats.members.load(Relaxed)
    }
}
