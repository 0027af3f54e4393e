//! The shared fan-out ring: bounded, multi-producer, every shard a consumer.
//!
//! The shape is the LMAX Disruptor's: a power-of-two array of sequence-stamped slots and a
//! cache-padded claim counter. A producer claims sequence `s` with one `fetch_add`, then
//! installs its entry in slot `s % capacity`. Each consumer keeps a private cursor and reads
//! slot `cursor % capacity`:
//!
//! - the entry's sequence equals the cursor: the message is there, take it;
//! - it is older (or the slot is empty): the producer has not finished; stop and wait for a
//!   wake-up (producers that claimed later may already have written later slots, but
//!   consumers never skip ahead, so a channel's messages stay in claim order);
//! - it is newer: producers lapped this consumer. It jumps to the oldest entry still held
//!   and reports how many it lost ([`Poll::Overrun`]) instead of slowing producers down.
//!
//! Producers never wait for consumers. Entries are reclaimed with epoch-based reclamation
//! (crossbeam-epoch), so a consumer cloning a frame never races its replacement. The ring
//! keeps the last `capacity` messages alive, which bounds its memory to
//! `capacity x average frame size`.

use crate::fanout::sync;
use bytes::Bytes;
use crossbeam_epoch::{self as epoch, Atomic, Owned};
use crossbeam_utils::CachePadded;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// What a ring entry is to its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingKind {
    /// A published message: it took the channel's next offset and may be in its history.
    Message,
    /// A presence event (join/leave): delivered to the channel's subscribers like a
    /// message and in the same ring order, but it has no offset, never enters history, and
    /// is not counted when a subscriber's position is computed.
    Event,
}

/// One published message (or presence event) as it travels the ring.
#[derive(Debug, Clone)]
pub struct RingMessage {
    /// The channel it was published to.
    pub channel: Arc<str>,
    /// Its offset in the channel (0 for a presence event, which has none).
    pub offset: u64,
    /// The complete WebSocket frame, shared by every subscriber.
    pub frame: Bytes,
    /// When it entered ringcast (for the delivery latency histogram).
    pub published_at: Instant,
    /// A channel message or a presence event.
    pub kind: RingKind,
}

struct Entry {
    seq: u64,
    msg: RingMessage,
}

/// The ring's claim counter: the next sequence a producer will take.
///
/// Its own type because it is half of the wake protocol ([`crate::fanout::wake`]) and is
/// model-checked with it: its atomic comes from [`crate::fanout::sync`].
pub struct RingHead(CachePadded<sync::AtomicU64>);

impl RingHead {
    /// A counter at sequence 0.
    pub fn new() -> Self {
        RingHead(CachePadded::new(sync::AtomicU64::new(0)))
    }

    /// Claims the next sequence. A producer must then call
    /// [`crate::fanout::wake::IdleFlags::wake_idle`], whose fence orders this claim before
    /// its reads of the idle flags.
    pub fn claim(&self) -> u64 {
        self.0.fetch_add(1, sync::Ordering::AcqRel)
    }

    /// The next sequence to be claimed.
    pub fn load(&self) -> u64 {
        self.0.load(sync::Ordering::Acquire)
    }
}

impl Default for RingHead {
    fn default() -> Self {
        Self::new()
    }
}

/// The bounded multi-producer broadcast ring.
pub struct Ring {
    slots: Box<[Atomic<Entry>]>,
    mask: u64,
    head: RingHead,
}

/// What a consumer found at its cursor.
#[derive(Debug)]
pub enum Poll {
    /// The next message; advance the cursor by one.
    Message(RingMessage),
    /// Nothing new yet.
    Empty,
    /// The consumer was lapped: `lost` messages are gone; the cursor was moved forward.
    Overrun {
        /// Messages skipped.
        lost: u64,
    },
}

/// What [`Ring::peek_channel`] found.
#[derive(Debug)]
pub enum Peek {
    /// The message at that sequence was published to this channel.
    Message(Arc<str>),
    /// A presence event for this channel: it holds a slot but no offset.
    Event(Arc<str>),
    /// Claimed (or not even that) but not installed yet.
    NotYet,
    /// Overwritten by a later lap.
    Gone,
}

impl Ring {
    /// A ring of `capacity` slots (rounded up to a power of two, at least 2).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(2).next_power_of_two();
        let slots = (0..capacity).map(|_| Atomic::null()).collect();
        Ring {
            slots,
            mask: capacity as u64 - 1,
            head: RingHead::new(),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// The next sequence a producer will claim; a new consumer starts here.
    pub fn head(&self) -> u64 {
        self.head.load()
    }

    /// The claim counter, for the idle shard's re-check in
    /// [`crate::fanout::wake::IdleFlags::prepare_park`].
    pub fn head_counter(&self) -> &RingHead {
        &self.head
    }

    /// Claims the next sequence and installs `msg` in its slot; returns the sequence.
    ///
    /// Callers that need per-channel order must make claim order match offset order (see
    /// [`crate::fanout::publisher`]).
    pub fn push(&self, msg: RingMessage) -> u64 {
        let seq = self.claim();
        self.install(seq, msg);
        seq
    }

    /// Claims the next sequence without filling it: [`Ring::push`] in two steps, so a
    /// producer can claim under a lock and build its message after releasing it.
    ///
    /// Every claimed sequence must be [`Ring::install`]ed promptly: consumers never skip
    /// a claimed slot, so until then every shard waits at it.
    pub fn claim(&self) -> u64 {
        self.head.claim()
    }

    /// Installs `msg` in the slot of `seq`, which the caller claimed with [`Ring::claim`].
    pub fn install(&self, seq: u64, msg: RingMessage) {
        let slot = &self.slots[(seq & self.mask) as usize];
        let guard = epoch::pin();
        let mut new = Owned::new(Entry { seq, msg });
        let mut current = slot.load(Ordering::Acquire, &guard);
        loop {
            // SAFETY: entries are only freed through `defer_destroy` after being unlinked,
            // and `guard` keeps this epoch pinned while we read it.
            if let Some(existing) = unsafe { current.as_ref() } {
                if existing.seq > seq {
                    // A producer one lap ahead already owns the slot; ours is lost to
                    // every consumer, which they see as an overrun.
                    return;
                }
            }
            match slot.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire, &guard) {
                Ok(_) => {
                    if !current.is_null() {
                        // SAFETY: `current` was just unlinked from the slot; no new reader
                        // can reach it, and readers already holding it are pinned.
                        unsafe { guard.defer_destroy(current) };
                    }
                    return;
                }
                Err(err) => {
                    current = err.current;
                    new = err.new;
                }
            }
        }
    }

    /// The channel of the message at `seq`, without consuming it.
    pub fn peek_channel(&self, seq: u64) -> Peek {
        let guard = epoch::pin();
        let slot = &self.slots[(seq & self.mask) as usize];
        // SAFETY: see `poll`.
        match unsafe { slot.load(Ordering::Acquire, &guard).as_ref() } {
            Some(entry) if entry.seq == seq => match entry.msg.kind {
                RingKind::Message => Peek::Message(entry.msg.channel.clone()),
                RingKind::Event => Peek::Event(entry.msg.channel.clone()),
            },
            Some(entry) if entry.seq > seq => Peek::Gone,
            _ => Peek::NotYet,
        }
    }

    /// Reads what is at `cursor`, advancing it past a message or an overrun.
    pub fn poll(&self, cursor: &mut u64) -> Poll {
        let guard = epoch::pin();
        let slot = &self.slots[(*cursor & self.mask) as usize];
        let shared = slot.load(Ordering::Acquire, &guard);
        // SAFETY: see `push`; the guard pins the epoch for the duration of the read.
        let Some(entry) = (unsafe { shared.as_ref() }) else {
            return Poll::Empty;
        };
        if entry.seq == *cursor {
            *cursor += 1;
            return Poll::Message(entry.msg.clone());
        }
        if entry.seq < *cursor {
            return Poll::Empty;
        }
        // Lapped. The oldest sequence that can still be in the ring is head - capacity;
        // moving there (not to the entry we saw) keeps as many messages as possible.
        let oldest = self.head().saturating_sub(self.capacity()).max(*cursor + 1);
        let lost = oldest - *cursor;
        *cursor = oldest;
        Poll::Overrun { lost }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `&mut self` means no producer or consumer is left; every entry is owned
        // by its slot alone.
        unsafe {
            let guard = epoch::unprotected();
            for slot in self.slots.iter() {
                let p = slot.load(Ordering::Relaxed, guard);
                if !p.is_null() {
                    drop(p.into_owned());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u64) -> RingMessage {
        RingMessage {
            channel: Arc::from("c"),
            offset: n,
            frame: Bytes::from(n.to_be_bytes().to_vec()),
            published_at: Instant::now(),
            kind: RingKind::Message,
        }
    }

    fn value(p: Poll) -> Option<u64> {
        match p {
            Poll::Message(m) => Some(u64::from_be_bytes(m.frame[..].try_into().unwrap())),
            _ => None,
        }
    }

    #[test]
    fn consumer_reads_in_order_then_waits() {
        let ring = Ring::new(8);
        let mut cursor = ring.head();
        for i in 0..5 {
            ring.push(msg(i));
        }
        for i in 0..5 {
            assert_eq!(value(ring.poll(&mut cursor)), Some(i));
        }
        assert!(matches!(ring.poll(&mut cursor), Poll::Empty));
    }

    #[test]
    fn lapped_consumer_sees_overrun_then_resumes() {
        let ring = Ring::new(4);
        let mut cursor = 0;
        for i in 0..10 {
            ring.push(msg(i));
        }
        match ring.poll(&mut cursor) {
            Poll::Overrun { lost } => assert_eq!(lost, 6),
            other => panic!("expected overrun, got {other:?}"),
        }
        for i in 6..10 {
            assert_eq!(value(ring.poll(&mut cursor)), Some(i));
        }
    }

    #[test]
    fn many_producers_many_consumers_see_everything_once_in_order() {
        let ring = Arc::new(Ring::new(1 << 16));
        let producers = 4u64;
        let per = 5_000u64;
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut cursor = 0;
                    let mut last = vec![None::<u64>; producers as usize];
                    let mut seen = 0;
                    while seen < producers * per {
                        match ring.poll(&mut cursor) {
                            Poll::Message(m) => {
                                let v = u64::from_be_bytes(m.frame[..].try_into().unwrap());
                                let (p, n) = ((v >> 32) as usize, v & 0xFFFF_FFFF);
                                assert_eq!(
                                    last[p].map_or(0, |l| l + 1),
                                    n,
                                    "producer {p} out of order"
                                );
                                last[p] = Some(n);
                                seen += 1;
                            }
                            Poll::Empty => std::hint::spin_loop(),
                            Poll::Overrun { lost } => {
                                panic!("overrun of {lost} in a ring that fits all")
                            }
                        }
                    }
                })
            })
            .collect();
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    for n in 0..per {
                        ring.push(msg((p << 32) | n));
                    }
                })
            })
            .collect();
        for h in handles.into_iter().chain(consumers) {
            h.join().unwrap();
        }
    }
}
