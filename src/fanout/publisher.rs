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

use crate::fanout::ring::{Ring, RingMessage};
use crate::fanout::wake::IdleFlags;
use crate::proto::message::{encode_message, EncodedData};
use crossbeam_utils::{Backoff, CachePadded};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STRIPES: usize = 64;

/// The last offset given out, per channel, for the channels hashing to one stripe.
type OffsetStripe = CachePadded<Mutex<HashMap<Arc<str>, u64>>>;

/// Channel offsets, the ring, and the shards to wake: shared by every producer.
pub struct Publisher {
    ring: Arc<Ring>,
    idle: Arc<IdleFlags>,
    stripes: Box<[OffsetStripe]>,
    hasher: ahash::RandomState,
}

/// Where a published message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The channel offset it was given (starts at 1).
    pub offset: u64,
    /// Its ring sequence.
    pub seq: u64,
}

/// Takes a stripe lock by spinning: test, try, back off; never parks the thread.
fn lock_stripe<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    let backoff = Backoff::new();
    loop {
        // Read first so waiters spin on a shared cache line instead of bouncing it.
        if !m.is_locked() {
            if let Some(guard) = m.try_lock() {
                return guard;
            }
        }
        backoff.snooze();
    }
}

impl Publisher {
    /// A publisher over `ring` that wakes the shards in `idle`.
    pub fn new(ring: Arc<Ring>, idle: Arc<IdleFlags>) -> Self {
        let stripes = (0..STRIPES)
            .map(|_| CachePadded::new(Mutex::new(HashMap::new())))
            .collect();
        Publisher {
            ring,
            idle,
            stripes,
            hasher: ahash::RandomState::new(),
        }
    }

    /// The ring this publisher feeds.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// The shards' idle flags.
    pub fn idle_flags(&self) -> &Arc<IdleFlags> {
        &self.idle
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

    /// [`Publisher::publish_quiet`], also returning how long it waited for the stripe lock
    /// (for `examples/publish_contention.rs`).
    #[doc(hidden)]
    pub fn publish_timed(&self, channel: &str, payload: &[u8]) -> (Published, Duration) {
        let mut wait = Duration::ZERO;
        let published = self.publish_inner(channel, payload, Some(&mut wait));
        (published, wait)
    }

    fn publish_inner(
        &self,
        channel: &str,
        payload: &[u8],
        lock_wait: Option<&mut Duration>,
    ) -> Published {
        let data = EncodedData::new(payload);
        let published_at = Instant::now();
        let stripe = (self.hasher.hash_one(channel) as usize) % STRIPES;
        let before = lock_wait.is_some().then(Instant::now);
        let mut offsets = lock_stripe(&self.stripes[stripe]);
        if let (Some(wait), Some(before)) = (lock_wait, before) {
            *wait = before.elapsed();
        }
        let (name, offset) = match offsets.get_key_value(channel) {
            Some((name, &last)) => (name.clone(), last + 1),
            None => (Arc::<str>::from(channel), 1),
        };
        offsets.insert(name.clone(), offset);
        // Claimed under the lock: this channel's next offset cannot claim an earlier slot.
        let seq = self.ring.claim();
        drop(offsets);
        let frame = encode_message(channel, offset, &data);
        self.ring.install(
            seq,
            RingMessage {
                channel: name,
                frame,
                published_at,
            },
        );
        Published { offset, seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::ring::Poll;

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
}
