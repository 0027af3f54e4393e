//! Cross-core wake-ups for shards idle on the ring, coalesced.
//!
//! Each shard has a cache-padded `idle` flag. A shard that drained the ring sets its flag,
//! re-checks the ring head, and only then parks. A producer that pushed checks every
//! shard's flag; only the producer that flips a flag from set to clear sends that shard a
//! wake token, so a burst of 10,000 publishes costs each idle shard one wake-up, not
//! 10,000. Tokens travel over glommio shared channels (one per producer/consumer shard
//! pair: they are single-producer), which wake a sleeping executor through its eventfd.
//!
//! Ordering argument: the consumer's `store(idle)` precedes its `load(head)`; the
//! producer's `fetch_add(head)` precedes its `load(idle)` (all SeqCst). Either the consumer
//! sees the new head and does not park, or the producer sees the flag and wakes it.

use crossbeam_utils::CachePadded;
use glommio::channels::shared_channel::ConnectedSender;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// One idle flag per shard.
pub struct IdleFlags {
    flags: Box<[CachePadded<AtomicBool>]>,
}

thread_local! {
    /// This executor's senders to every shard's wake channel, indexed by shard.
    static WAKE_SENDERS: RefCell<Vec<ConnectedSender<()>>> = const { RefCell::new(Vec::new()) };
}

impl IdleFlags {
    /// Flags for `shards` shards, all busy.
    pub fn new(shards: usize) -> Self {
        IdleFlags {
            flags: (0..shards)
                .map(|_| CachePadded::new(AtomicBool::new(false)))
                .collect(),
        }
    }

    /// Marks `shard` as about to park; the caller must re-check the ring afterwards.
    pub fn set_idle(&self, shard: usize) {
        self.flags[shard].store(true, Ordering::SeqCst);
    }

    /// Clears `shard`'s flag; returns true when it was set (no producer claimed it).
    pub fn clear(&self, shard: usize) -> bool {
        self.flags[shard].swap(false, Ordering::SeqCst)
    }

    /// Wakes every idle shard once, from a producer running on a shard executor.
    pub fn wake_idle(&self) {
        for (shard, flag) in self.flags.iter().enumerate() {
            if flag.load(Ordering::SeqCst) && flag.swap(false, Ordering::SeqCst) {
                WAKE_SENDERS.with(|senders| {
                    if let Some(tx) = senders.borrow().get(shard) {
                        // Full means a token is already pending: that is the coalescing.
                        let _ = tx.try_send(());
                    }
                });
            }
        }
    }
}

/// Installs this executor's connected wake senders (one per shard, in shard order).
pub fn install_senders(senders: Vec<ConnectedSender<()>>) {
    WAKE_SENDERS.with(|s| *s.borrow_mut() = senders);
}
