//! Model-checks the idle-flag / ring-head wake-up handshake with loom.
//!
//! Runs only with `--features loom` (then `RingHead` and `IdleFlags` use loom's atomics):
//!
//! ```sh
//! cargo test --release -p ringcast --features loom --lib fanout::loom_wake
//! ```
//!
//! The property: once every thread is done, a consumer that parked with messages it has
//! not read always has a wake token pending. A lost wake-up (both sides reading the other's
//! old value) leaves a message unseen until some later publish; loom finds it if either
//! `fence(SeqCst)` in `src/fanout/wake.rs` is removed.

use crate::fanout::ring::RingHead;
use crate::fanout::wake::IdleFlags;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

const SHARD: usize = 0;

/// What the consumer ended with: its cursor and whether it parked.
struct ConsumerEnd {
    cursor: u64,
    parked: bool,
}

/// The follower's idle path: take everything claimed so far, announce idle, re-check,
/// park only when nothing new arrived. Loops at most `rounds` times (each producer makes
/// the re-check fail at most once), which keeps the model finite.
fn consumer(head: &RingHead, flags: &IdleFlags, rounds: usize) -> ConsumerEnd {
    let mut cursor = 0;
    for _ in 0..rounds {
        // Reading the ring: the slot contents are not part of this protocol.
        cursor = cursor.max(head.load());
        if flags.prepare_park(SHARD, head, cursor) {
            return ConsumerEnd {
                cursor,
                parked: true,
            };
        }
    }
    ConsumerEnd {
        cursor,
        parked: false,
    }
}

/// A publish: claim a sequence, then hand every idle shard a wake token.
fn producer(head: &RingHead, flags: &IdleFlags, token: &AtomicBool) {
    head.claim();
    flags.claim_idle(|shard| {
        assert_eq!(shard, SHARD);
        token.store(true, Ordering::SeqCst);
    });
}

fn check(producers: usize) {
    let mut builder = loom::model::Builder::new();
    // Bounded so the check stays in seconds; the lost wake-up needs no preemption at all
    // (it is a memory-ordering outcome), so a small bound loses nothing here.
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let head = Arc::new(RingHead::new());
        let flags = Arc::new(IdleFlags::new(1));
        let token = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..producers)
            .map(|_| {
                let (head, flags, token) = (head.clone(), flags.clone(), token.clone());
                thread::spawn(move || producer(&head, &flags, &token))
            })
            .collect();
        let end = consumer(&head, &flags, producers + 1);
        for h in handles {
            h.join().expect("producer panicked");
        }
        let published = head.load();
        if end.parked && end.cursor < published {
            assert!(
                token.load(Ordering::SeqCst),
                "consumer parked at {} with {} published and no wake pending",
                end.cursor,
                published
            );
        }
    });
}

#[test]
fn one_producer_never_leaves_a_parked_shard_unwoken() {
    check(1);
}

#[test]
fn two_producers_never_leave_a_parked_shard_unwoken() {
    check(2);
}
