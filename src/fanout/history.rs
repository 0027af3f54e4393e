//! Channel history: the last messages of each channel, kept so a subscriber that was away
//! can be given what it missed (`subscribe` with `since`).
//!
//! A channel's [`Window`] holds its most recent frames in offset order, bounded by a
//! message count and an age; the frames are the same refcounted bytes the ring and every
//! subscriber share, so retaining a message costs its entry here, not a copy. All
//! histories together are bounded by a byte budget ([`Budget`]) that evicts the oldest
//! retained messages of the process first.
//!
//! # Why a recovery has no gap and no duplicate
//!
//! A publish inserts its frame into the history *before* it installs it in the ring, and
//! a shard's follower reads ring slots in sequence order, never past a slot not yet
//! installed. A connection subscribes on a shard whose follower reads ring sequence
//! `cursor` next; the subscription takes effect at once (the shard is single-threaded),
//! so every message of the channel at or after `cursor` reaches it live, and every one
//! before `cursor` is already in the history (unless evicted). Its position is the
//! channel's last offset minus its messages in the ring between `cursor` and the claim
//! counter ([`crate::fanout::publisher::Publisher::attach`] counts them), and a recovery
//! replays the retained offsets after the client's up to that position: no gap, no
//! duplicate, and no buffering of live messages.

use crate::fanout::spin::spin_lock;
use crate::proto::recovery::CatchUp;
use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// One retained message.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Channel offset.
    pub offset: u64,
    /// Ring sequence (global publish order).
    pub seq: u64,
    /// Publisher second it was published at.
    pub at: u64,
    /// The message's WebSocket frame, as every subscriber received it.
    pub frame: Bytes,
}

/// The bounds of one channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages kept (0: none).
    pub size: usize,
    /// Seconds a message is kept.
    pub ttl: u64,
}

/// Why a recovery cannot be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecoverable {
    /// The client's epoch is not the channel's: its offset means nothing here.
    EpochChanged,
    /// The history no longer reaches back to the client's offset.
    TooOld,
    /// More messages were missed than one recovery may replay.
    TooMany,
    /// The client claims an offset the channel has not reached.
    Ahead,
}

impl Unrecoverable {
    /// The reason as sent to the client and used as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Unrecoverable::EpochChanged => "epoch_changed",
            Unrecoverable::TooOld => "too_old",
            Unrecoverable::TooMany => "too_many",
            Unrecoverable::Ahead => "ahead",
        }
    }
}

/// One channel's retained messages, oldest first (sans-io: no locks, no clock).
#[derive(Debug, Default)]
pub struct Window {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl Window {
    /// Messages retained.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frame bytes retained.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The oldest retained offset.
    pub fn front_offset(&self) -> Option<u64> {
        self.entries.front().map(|e| e.offset)
    }

    /// Inserts `entry` in offset order (two publishers of one channel may insert out of
    /// order), then drops what `limits` no longer allow at `now`. Returns the
    /// (messages, bytes) dropped.
    pub fn insert(&mut self, entry: Entry, limits: Limits, now: u64) -> (usize, usize) {
        self.bytes += entry.frame.len();
        let at = self
            .entries
            .iter()
            .rposition(|e| e.offset < entry.offset)
            .map_or(0, |i| i + 1);
        self.entries.insert(at, entry);
        self.trim(limits, now)
    }

    /// Drops entries over the size limit or older than the TTL; returns the (messages,
    /// bytes) dropped.
    pub fn trim(&mut self, limits: Limits, now: u64) -> (usize, usize) {
        let mut dropped = (0, 0);
        while let Some(front) = self.entries.front() {
            let expired = now.saturating_sub(front.at) >= limits.ttl;
            if self.entries.len() <= limits.size && !expired {
                break;
            }
            dropped.0 += 1;
            dropped.1 += self.pop_front_bytes();
        }
        dropped
    }

    /// Drops the oldest entry if its offset is `offset`; returns its bytes.
    pub fn evict(&mut self, offset: u64) -> Option<usize> {
        (self.front_offset() == Some(offset)).then(|| self.pop_front_bytes())
    }

    fn pop_front_bytes(&mut self) -> usize {
        let n = self.entries.pop_front().map_or(0, |e| e.frame.len());
        self.bytes -= n;
        n
    }

    /// The offset a subscriber attaching now is at, from the history alone: the newest
    /// retained offset with a ring sequence below `cursor` (what it will *not* receive
    /// live). For when the ring cannot tell ([`crate::fanout::publisher`]); it errs low
    /// (0 when nothing retained is old enough), so the client sees a gap it can recover
    /// from, never an offset it would wrongly believe it holds.
    pub fn position(&self, cursor: u64) -> u64 {
        self.entries
            .iter()
            .rposition(|e| e.seq < cursor)
            .map_or(0, |i| self.entries[i].offset)
    }

    /// The frames of every offset after `since` up to `upto` (a [`Window::position`]),
    /// oldest first, if the history holds them all and there are at most `max`.
    ///
    /// # Errors
    /// Why the recovery would not be complete; nothing partial is returned.
    pub fn since(&self, since: u64, upto: u64, max: usize) -> Result<Vec<Bytes>, Unrecoverable> {
        if since > upto {
            return Err(Unrecoverable::Ahead);
        }
        let missed = upto - since;
        if missed == 0 {
            return Ok(Vec::new());
        }
        if missed > max as u64 {
            return Err(Unrecoverable::TooMany);
        }
        let first = match self.front_offset() {
            Some(front) if front <= since + 1 => (since + 1 - front) as usize,
            _ => return Err(Unrecoverable::TooOld),
        };
        let frames: Vec<Bytes> = self
            .entries
            .iter()
            .skip(first)
            .take_while(|e| e.offset <= upto)
            .map(|e| e.frame.clone())
            .collect();
        // Offsets are consecutive; a shortfall would mean a hole, never served as whole.
        if frames.len() as u64 != missed {
            return Err(Unrecoverable::TooOld);
        }
        Ok(frames)
    }
}

impl Window {
    /// The next part of a lagging subscriber's catch-up: the retained frames after
    /// `since` up to `upto` (a position), at most `max_bytes` of them (at least one), and
    /// the offsets before the oldest retained one as a gap.
    pub fn catch_up(&self, since: u64, upto: u64, max_bytes: usize) -> CatchUp {
        if since >= upto {
            // Never backwards: `upto` may be a low estimate (see Publisher::catch_up).
            return CatchUp {
                reached: since,
                done: true,
                ..CatchUp::default()
            };
        }
        let mut out = CatchUp {
            reached: since,
            ..CatchUp::default()
        };
        let front = self.front_offset().filter(|&f| f <= upto);
        match front {
            Some(front) if front > since + 1 => {
                out.gap = Some((since + 1, front - 1));
                out.reached = front - 1;
            }
            None => {
                out.gap = Some((since + 1, upto));
                out.reached = upto;
            }
            Some(_) => {}
        }
        let mut bytes = 0;
        // Offsets up to a position are consecutive: index arithmetic finds the start.
        let start = self
            .front_offset()
            .map_or(0, |f| (out.reached + 1).saturating_sub(f) as usize);
        for e in self.entries.iter().skip(start) {
            if e.offset > upto || (bytes >= max_bytes && !out.frames.is_empty()) {
                break;
            }
            bytes += e.frame.len();
            out.frames.push(e.frame.clone());
            out.reached = e.offset;
        }
        out.done = out.reached >= upto;
        out
    }
}

/// A channel's history, shared by its publishers and recovering subscribers.
#[derive(Debug)]
pub struct ChannelHistory {
    window: Mutex<Window>,
    limits: Limits,
}

impl ChannelHistory {
    /// An empty history with `limits`.
    pub fn new(limits: Limits) -> Self {
        ChannelHistory {
            window: Mutex::new(Window::default()),
            limits,
        }
    }

    /// Locks the window, spinning (the holders are executor threads; holds are short).
    pub fn lock(&self) -> MutexGuard<'_, Window> {
        spin_lock(&self.window)
    }

    /// This channel's bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// A retained message in publish order, for evicting the oldest first.
#[derive(Debug)]
struct Logged {
    history: Arc<ChannelHistory>,
    offset: u64,
}

/// Counters of all histories, shared with the metrics.
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// Frame bytes retained over all channels.
    pub bytes: AtomicU64,
    /// Messages retained over all channels.
    pub messages: AtomicU64,
    /// Messages evicted before their size or TTL said so, to stay in the byte budget.
    pub evicted: AtomicU64,
    /// Owner-written messages refused because their offset did not move forward
    /// ([`crate::fanout::publisher::Publisher::publish_at`]).
    pub refused_offsets: AtomicU64,
}

/// The byte budget of all histories: the oldest retained messages of the process go
/// first when it is exceeded.
///
/// Every retained message is logged in publish order. The log also holds entries that
/// their channel already dropped (size, TTL, expiry); those are skipped when met, and
/// the log is kept near the number of retained messages by looking at two front entries
/// per insert: a dropped one is discarded, a retained one moved to the back when the log
/// is more than twice the retained count (so one long-lived message cannot pin
/// everything logged after it).
#[derive(Debug)]
pub struct Budget {
    max_bytes: u64,
    log: Mutex<VecDeque<Logged>>,
    stats: Arc<HistoryStats>,
}

impl Budget {
    /// A budget of `max_bytes` over all histories.
    pub fn new(max_bytes: u64, stats: Arc<HistoryStats>) -> Self {
        Budget {
            max_bytes,
            log: Mutex::new(VecDeque::new()),
            stats,
        }
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<HistoryStats> {
        &self.stats
    }

    /// Retains `entry` in `history` at publisher second `now`, then enforces the budget.
    pub fn retain(&self, history: &Arc<ChannelHistory>, entry: Entry, now: u64) {
        let offset = entry.offset;
        let added = entry.frame.len() as u64;
        let (gone, gone_bytes) = history.lock().insert(entry, history.limits(), now);
        self.account(1, added, gone, gone_bytes);
        let mut log = spin_lock(&self.log);
        log.push_back(Logged {
            history: history.clone(),
            offset,
        });
        for _ in 0..2 {
            let Some(front) = log.pop_front() else { break };
            // Entries only ever leave a window from the front.
            let retained = front
                .history
                .lock()
                .front_offset()
                .is_some_and(|f| f <= front.offset);
            if !retained {
                continue;
            }
            let live = self.stats.messages.load(Relaxed) as usize;
            if log.len() > 2 * live + 64 {
                log.push_back(front);
            } else {
                log.push_front(front);
                break;
            }
        }
        while self.stats.bytes.load(Relaxed) > self.max_bytes {
            let Some(oldest) = log.pop_front() else { break };
            let evicted = oldest.history.lock().evict(oldest.offset);
            if let Some(bytes) = evicted {
                self.account(0, 0, 1, bytes);
                self.stats.evicted.fetch_add(1, Relaxed);
            }
        }
    }

    /// Drops what `history`'s TTL no longer allows at `now` (a quiet channel's messages
    /// age out without a publish to trim them).
    pub fn trim(&self, history: &ChannelHistory, now: u64) {
        let (gone, gone_bytes) = history.lock().trim(history.limits(), now);
        self.account(0, 0, gone, gone_bytes);
    }

    /// Empties a whole history (its channel expired).
    pub fn release(&self, history: &ChannelHistory) {
        let mut window = history.lock();
        self.account(0, 0, window.len(), window.bytes());
        *window = Window::default();
    }

    fn account(&self, added: u64, added_bytes: u64, gone: usize, gone_bytes: usize) {
        if added > 0 {
            self.stats.messages.fetch_add(added, Relaxed);
            self.stats.bytes.fetch_add(added_bytes, Relaxed);
        }
        if gone > 0 {
            self.stats.messages.fetch_sub(gone as u64, Relaxed);
            self.stats.bytes.fetch_sub(gone_bytes as u64, Relaxed);
        }
    }
}

#[cfg(test)]
#[path = "history_tests.rs"]
mod tests;
