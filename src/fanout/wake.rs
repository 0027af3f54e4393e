//! Cross-core wake-ups for shards idle on the ring, coalesced.
//!
//! Each shard has a cache-padded `idle` flag. A shard that drained the ring announces
//! itself idle, re-checks the ring head, and only then parks ([`IdleFlags::prepare_park`]).
//! A producer that claimed a slot checks every shard's flag ([`IdleFlags::wake_idle`]);
//! only the producer that flips a flag from set to clear sends that shard a wake token, so
//! a burst of 10,000 publishes costs each idle shard one wake-up, not 10,000. Tokens travel
//! over glommio shared channels (one per producer/consumer shard pair: they are
//! single-producer), which wake a sleeping executor through its eventfd.
//!
//! # Ordering: why both sides fence
//!
//! Each side stores one location and then loads the other (the Dekker / store-buffering
//! shape):
//!
//! ```text
//! producer: head.fetch_add(1)   fence(SeqCst)   flag.load() -> set? swap(false), wake
//! consumer: flag.store(true)    fence(SeqCst)   head.load() -> moved? don't park
//! ```
//!
//! Without the fences nothing forbids both loads from reading the old values (the claim is
//! `AcqRel` and the head load `Acquire`; even `SeqCst` on the flag accesses alone does not
//! order them against the head): the consumer parks on a stale head while the producer
//! sees no idle flag, and a published message waits until some later publish wakes the
//! shard. With a `SeqCst` fence between the store and the load on each side, the two
//! fences are totally ordered: if the producer's comes first the consumer's head load sees
//! the claim and it does not park; if the consumer's comes first the producer's flag load
//! sees the flag (or a later clear by another producer, which then sends the token).
//!
//! `src/fanout/loom_wake.rs` model-checks exactly this code with loom (the atomics come from
//! [`crate::fanout::sync`]); with the two fences removed it finds the lost wake-up. Loom
//! treats `SeqCst` accesses like `AcqRel` but models `SeqCst` fences, which is one more
//! reason the fences, not the access orderings, carry the argument. On x86 each fence is an
//! `mfence` (tens of cycles): once per publish, once per shard park.

use crate::fanout::ring::RingHead;
use crate::fanout::sync::{fence, AtomicBool, Ordering};
use crossbeam_utils::CachePadded;
use glommio::channels::shared_channel::ConnectedSender;
use std::cell::RefCell;

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

    /// Consumer side: announces `shard` idle, then re-checks `head` against `cursor` (the
    /// next sequence this shard would read). Returns true when the shard may park until a
    /// wake token arrives; false when the ring moved, in which case the flag is cleared
    /// again and the caller must poll the ring instead of parking.
    pub fn prepare_park(&self, shard: usize, head: &RingHead, cursor: u64) -> bool {
        // A swap, not a store: the same `xchg` on x86 (a SeqCst store is one), and an RMW
        // is ordered after every earlier clear in loom's modification order, which it
        // tracks only partially for plain stores (it would report a lost wake-up that the
        // memory model forbids).
        self.flags[shard].swap(true, Ordering::SeqCst);
        // Orders the flag write before the head load; pairs with the fence in `claim_idle`.
        fence(Ordering::SeqCst);
        if head.load() > cursor {
            self.clear(shard);
            return false;
        }
        true
    }

    /// Clears `shard`'s flag; returns true when it was set (no producer claimed it).
    pub fn clear(&self, shard: usize) -> bool {
        self.flags[shard].swap(false, Ordering::SeqCst)
    }

    /// Producer side, after [`RingHead::claim`]: calls `wake(shard)` for every shard whose
    /// idle flag this call cleared (each idle shard is handed to exactly one producer).
    pub fn claim_idle(&self, mut wake: impl FnMut(usize)) {
        // Orders the caller's head claim before the flag loads; pairs with the fence in
        // `prepare_park`.
        fence(Ordering::SeqCst);
        for (shard, flag) in self.flags.iter().enumerate() {
            // The plain load first keeps a busy shard's line shared instead of bouncing it
            // with a swap on every publish.
            if flag.load(Ordering::SeqCst) && flag.swap(false, Ordering::SeqCst) {
                wake(shard);
            }
        }
    }

    /// Wakes every idle shard once, from a producer running on a shard executor.
    pub fn wake_idle(&self) {
        self.claim_idle(|shard| {
            WAKE_SENDERS.with(|senders| {
                if let Some(tx) = senders.borrow().get(shard) {
                    // Full means a token is already pending: that is the coalescing.
                    let _ = tx.try_send(());
                }
            });
        });
    }
}

/// Installs this executor's connected wake senders (one per shard, in shard order).
pub fn install_senders(senders: Vec<ConnectedSender<()>>) {
    WAKE_SENDERS.with(|s| *s.borrow_mut() = senders);
}
