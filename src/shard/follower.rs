//! The shard's ring follower: takes every new message from the shared ring and hands its
//! frame to this shard's subscribers of the channel.
//!
//! A round takes up to [`ROUND`] messages, queues each to its subscribers' backlogs, then
//! flushes every touched connection once: in a burst a subscriber receives many frames in
//! one `sendmsg`; when paced, a round is one message and one write per subscriber.
//!
//! It also hosts shard 0's periodic sweep of idle channels ([`expire_idle_channels`]),
//! the publisher-side housekeeping that belongs to no connection.

use crate::fanout::ring::Poll as RingPoll;
use crate::shard::state::Shard;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Poll, Waker};
use std::time::Instant;

/// Most messages per fan-out round: bounds the frames queued per connection before a
/// flush and keeps the executor responsive (other tasks run between rounds).
pub const ROUND: usize = 256;

/// A one-slot wake-up for a task on the same executor.
#[derive(Default)]
pub struct LocalEvent {
    set: Cell<bool>,
    waiter: RefCell<Option<Waker>>,
}

impl LocalEvent {
    /// Sets the event and wakes the waiter.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits until the event is set, then clears it.
    pub async fn wait(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Follows the ring forever, starting at its current head.
pub async fn follow_ring(shard: Rc<Shard>, wake: Rc<LocalEvent>) {
    let ring = shard.publisher.ring().clone();
    let idle = shard.publisher.idle_flags().clone();
    let mut cursor = ring.head();
    let mut latencies: Vec<Instant> = Vec::with_capacity(ROUND);
    loop {
        let mut taken = 0;
        while taken < ROUND {
            match ring.poll(&mut cursor) {
                RingPoll::Message(msg) => {
                    taken += 1;
                    let index = shard.index.borrow();
                    let members = index.members(&msg.channel);
                    if members.is_empty() {
                        continue;
                    }
                    latencies.push(msg.published_at);
                    let mut conns = shard.conns.borrow_mut();
                    for &key in members {
                        if let Some(conn) = conns.get_mut(key) {
                            shard.offer_message(key, conn, &msg.frame);
                        }
                    }
                }
                RingPoll::Overrun { lost } => {
                    // The messages are gone for this shard's subscribers; they see the
                    // gap in offsets. Counted so an operator can size the ring.
                    shard.metrics.ring_overrun_lost.fetch_add(lost, Relaxed);
                }
                RingPoll::Empty => break,
            }
        }
        if taken > 0 {
            shard.settle();
            let now = Instant::now();
            for t in latencies.drain(..) {
                shard
                    .all_metrics
                    .record_latency(shard.id, now.duration_since(t).as_micros() as u64);
            }
        }
        shard
            .metrics
            .ring_lag
            .store(ring.head().saturating_sub(cursor), Relaxed);
        if taken == ROUND {
            glommio::yield_if_needed().await;
            continue;
        }
        if !idle.prepare_park(shard.id, ring.head_counter(), cursor) {
            // A producer claimed a slot but may not have filled it yet: let it finish.
            glommio::yield_if_needed().await;
            continue;
        }
        wake.wait().await;
    }
}
