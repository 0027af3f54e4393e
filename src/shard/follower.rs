//! The shard's ring follower: takes every new message from the shared ring and hands its
//! frame to this shard's subscribers of the channel.
//!
//! The round's policy is the engine's ([`crate::engine::round`]); this task is its
//! driver: it takes up to [`ROUND`] messages a round, yields to the executor after every
//! [`FAIR_CHUNK`] offers or flushed connections (also inside one message to a huge
//! channel) once it has held the core for [`crate::shard::send::FAIR_SLICE`], so
//! accepts, heartbeats and ingest keep running while a message reaches 500k local
//! subscribers, then writes every dirty connection once and settles the round.

use crate::engine::round::{Delivery, Next, ROUND};
use crate::fanout::ring::{RingKind, RingMessage};
use crate::shard::send::FAIR_CHUNK;
use crate::shard::state::Shard;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Poll, Waker};
use std::time::Instant;

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

/// Follows the ring forever, starting where the engine's cursor was placed (a subscriber
/// attached before this task first ran was told its position from it).
pub async fn follow_ring(shard: Rc<Shard>, wake: Rc<LocalEvent>) {
    let engine = &shard.engine;
    let ring = engine.publisher.ring().clone();
    let idle = engine.publisher.idle_flags().clone();
    let mut latencies: Vec<Instant> = Vec::with_capacity(ROUND);
    // (key, generation) of a large channel's members, reused from message to message.
    let mut snapshot: Vec<(u32, u32)> = Vec::new();
    loop {
        let mut taken = 0;
        // Offers since the last yield to the executor.
        let mut offers = 0;
        while taken < ROUND {
            match engine.next_from_ring() {
                Next::Message(msg) => {
                    taken += 1;
                    let offered = deliver(&shard, &msg, &mut snapshot, FAIR_CHUNK).await;
                    if offered > 0 && msg.kind == RingKind::Message {
                        // Latency counts only messages (not presence events) this shard
                        // had subscribers for.
                        latencies.push(msg.published_at);
                    }
                    offers += offered;
                    if offers >= FAIR_CHUNK {
                        offers = 0;
                        shard.fair.yield_if_used().await;
                    }
                }
                Next::Healed => {}
                Next::Empty => break,
            }
        }
        if taken > 0 {
            shard.flush_dirty_yielding().await;
            shard.settle();
            let now = Instant::now();
            for t in latencies.drain(..) {
                shard
                    .all_metrics
                    .record_latency(shard.id, now.duration_since(t).as_micros() as u64);
            }
        }
        let cursor = engine.ring_cursor.get();
        shard
            .engine
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

/// Ends a paused fan-out's hold on SSE position releases if `deliver` is dropped at a
/// yield (it is a future) before it ends the fan-out itself.
struct Resumed<'a>(Option<&'a Shard>);

impl Drop for Resumed<'_> {
    fn drop(&mut self) {
        if let Some(shard) = self.0 {
            shard.engine.release_pause();
        }
    }
}

/// Offers the message to every subscriber of its channel on this shard; returns how many
/// subscribers the channel had. Served `chunk` ([`FAIR_CHUNK`]) at a time while the
/// shard's fair slice lasts; the rest after a yield, from the engine's snapshot (see
/// [`crate::engine::Engine::deliver_start`]).
async fn deliver(
    shard: &Shard,
    msg: &RingMessage,
    snapshot: &mut Vec<(u32, u32)>,
    chunk: usize,
) -> usize {
    let engine = &shard.engine;
    let (count, frame) = match engine.deliver_start(msg, snapshot, chunk, || shard.fair.used()) {
        Delivery::Done(count) => return count,
        Delivery::Paused { count, frame } => (count, frame),
    };
    let mut resumed = Resumed(Some(shard));
    for part in snapshot.chunks(chunk) {
        shard.fair.yield_if_used().await;
        if !engine.deliver_part(msg, &frame, part) {
            break;
        }
    }
    resumed.0 = None;
    engine.deliver_end(msg);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::position::Position;
    use crate::proto::sse::{HttpStream, Mode};
    use crate::shard::conn::{adopt, adopt_stream, Carried};
    use crate::shard::send::Flush;
    use bytes::Bytes;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn test_shard() -> Shard {
        let settings = crate::config::resolve(Default::default(), Default::default())
            .expect("default settings");
        Shard::for_tests(settings, 8)
    }

    /// A test shard whose fan-out yields after every chunk.
    fn yielding_shard() -> Rc<Shard> {
        let shard = Rc::new(test_shard());
        shard.fair.set_slice(std::time::Duration::ZERO);
        shard
    }

    /// A connection whose peer end is kept in `peers` (so its socket stays open).
    fn connect(shard: &Shard, channels: &[String], peers: &mut Vec<UnixStream>) -> u32 {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        peers.push(theirs);
        let key = shard.engine.conns.borrow().next_key();
        adopt(
            shard,
            OwnedFd::from(ours),
            channels,
            None,
            None,
            Vec::new(),
            Carried::default(),
        );
        key
    }

    fn queued(shard: &Shard, key: u32) -> usize {
        shard
            .engine
            .conns
            .borrow()
            .get(key)
            .map_or(0, |c| c.machine.backlog().frame_count())
    }

    /// Regression: a huge channel's member list changes while the delivery is yielded
    /// (unsubscribe swap_removes, a closed connection's slot goes to a new connection).
    #[test]
    fn members_changing_during_a_yield_get_the_message_exactly_once() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let shard = yielding_shard();
            let chan = vec!["big".to_string()];
            let mut peers = Vec::new();
            let keys: Vec<u32> = (0..12)
                .map(|_| connect(&shard, &chan, &mut peers))
                .collect();
            assert_eq!(keys, (0..12).collect::<Vec<u32>>());
            // Runs at the first yield, after chunk 0 (keys 0..4) was served.
            let mutator = {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    // The spawned task may start at once: wait for the delivery's yield.
                    futures_lite::future::yield_now().await;
                    let mut peers = Vec::new();
                    // Leaves before being served; its removal moves key 11 to its place.
                    shard.engine.index.borrow_mut().unsubscribe(9, "big");
                    // Closed, and its slot reused by a connection that never subscribed.
                    shard.finalize_close(6);
                    let reused = connect(&shard, &[], &mut peers);
                    // Joins after the message was published.
                    let joined = connect(&shard, &chan, &mut peers);
                    (reused, joined, peers)
                })
            };
            let msg = RingMessage {
                channel: std::sync::Arc::from("big"),
                offset: 1,
                frame: Bytes::from_static(b"frame"),
                published_at: Instant::now(),
                kind: RingKind::Message,
            };
            let mut snapshot = Vec::new();
            let n = deliver(&shard, &msg, &mut snapshot, 4).await;
            assert_eq!(n, 12);
            let (reused, joined, _more) = mutator.await;
            assert_eq!(reused, 6, "the test expects the freed slot to be reused");
            for key in [0, 1, 2, 3, 4, 5, 7, 8, 10, 11] {
                assert_eq!(queued(&shard, key), 1, "member {key} stayed subscribed");
            }
            assert_eq!(queued(&shard, 6), 0, "new occupant of a reused slot");
            assert_eq!(queued(&shard, 9), 0, "unsubscribed before being served");
            assert_eq!(queued(&shard, joined), 0, "subscribed after the publish");
            drop(peers);
        });
    }

    /// An SSE stream on a socketpair (its peer end kept in `peers`), subscribed to
    /// `channels`; idle once its subscribe replies are written, so it holds no encoder.
    fn connect_sse(shard: &Shard, channels: &[String], peers: &mut Vec<UnixStream>) -> u32 {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        theirs.set_nonblocking(true).expect("nonblocking peer");
        peers.push(theirs);
        let key = shard.engine.conns.borrow().next_key();
        let stream = HttpStream::new(Mode::Sse, channels, None);
        adopt_stream(
            shard,
            OwnedFd::from(ours),
            channels,
            None,
            stream,
            None,
            Carried::default(),
        );
        key
    }

    /// The offset of `channel` in the `id:` the next event of SSE stream `key` would
    /// carry: its encoder's position, rebuilt from the index first if it released it
    /// (as the driver does before queuing any event).
    fn next_id_offset(shard: &Shard, key: u32, channel: &str) -> u64 {
        let mut conns = shard.engine.conns.borrow_mut();
        let conn = conns.get_mut(key).expect("open stream");
        if conn.machine.needs_position() {
            shard.engine.restore_position(key, conn);
        }
        let token = conn.machine.http_stream().expect("an encoder").token();
        Position::parse(&token)
            .expect("position token")
            .get(channel)
            .expect("the channel in the position")
            .offset
    }

    /// Everything the peer of a socketpair has been sent so far.
    fn drain_peer(peer: &mut UnixStream, into: &mut Vec<u8>) {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => into.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the peer: {e}"),
            }
        }
    }

    /// Regression: a fan-out that pauses part-way. While it is yielded, streams it
    /// reached write everything and go idle, and the heartbeat sweep comes by; then every
    /// stream is asked for the `id:` its next event would carry. A stream already given
    /// the message must not fall back before it (a resume would get it twice), and one
    /// still waiting for it must not be put past it (a resume would skip it). Once the
    /// fan-out ends, every stream's last `id:` on the wire names the message.
    #[test]
    fn sse_ids_stay_exact_while_a_fan_out_is_paused() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let shard = yielding_shard();
            let chan = vec!["big".to_string()];
            let mut peers = Vec::new();
            let keys: Vec<u32> = (0..8)
                .map(|_| connect_sse(&shard, &chan, &mut peers))
                .collect();
            for &key in &keys {
                let conns = shard.engine.conns.borrow();
                let conn = conns.get(key).expect("adopted");
                assert!(conn.machine.needs_position(), "stream {key} is idle");
            }
            // Runs at the yield after chunk 0 (keys 0..4) was served.
            let paused = {
                let shard = shard.clone();
                let keys = keys.clone();
                glommio::spawn_local(async move {
                    futures_lite::future::yield_now().await;
                    {
                        let mut conns = shard.engine.conns.borrow_mut();
                        for &key in &keys {
                            let conn = conns.get_mut(key).expect("open");
                            // A writable edge writes what is queued; the sweep finds the
                            // stream idle.
                            assert_eq!(shard.flush(conn), Flush::Done);
                            shard.engine.release_idle_stream(key, conn);
                        }
                    }
                    keys.iter()
                        .map(|&key| next_id_offset(&shard, key, "big"))
                        .collect::<Vec<u64>>()
                })
            };
            let msg = RingMessage {
                channel: std::sync::Arc::from("big"),
                offset: 1,
                frame: crate::proto::frame::encode_frame(
                    crate::proto::frame::opcode::TEXT,
                    br#"{"channel":"big","offset":1,"data":{}}"#,
                ),
                published_at: Instant::now(),
                kind: RingKind::Message,
            };
            let mut snapshot = Vec::new();
            assert_eq!(deliver(&shard, &msg, &mut snapshot, 4).await, 8);
            let during = paused.await;
            assert_eq!(
                during,
                vec![1, 1, 1, 1, 0, 0, 0, 0],
                "ids during the pause: given the message, at it; waiting for it, before it"
            );
            shard.flush_dirty();
            for (i, peer) in peers.iter_mut().enumerate() {
                let mut wire = Vec::new();
                drain_peer(peer, &mut wire);
                let text = String::from_utf8(wire).expect("UTF-8 event stream");
                let ids: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("id: "))
                    .collect();
                let last = ids.last().expect("an event with an id");
                let at = Position::parse_for(last, &chan)
                    .expect("token")
                    .get("big")
                    .expect("big");
                assert_eq!(at.offset, 1, "stream {i}: last id {last} in {text:?}");
                let events = text.matches(r#""offset":1"#).count();
                assert_eq!(events, 1, "stream {i} got the message once: {text:?}");
            }
            for &key in &keys {
                assert_eq!(next_id_offset(&shard, key, "big"), 1, "after the fan-out");
            }
        });
    }
}
