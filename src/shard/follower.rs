//! The shard's ring follower: takes every new message from the shared ring and hands its
//! frame to this shard's subscribers of the channel.
//!
//! A round takes up to [`ROUND`] messages, queues each to its subscribers' backlogs, then
//! flushes every touched connection once: in a burst a subscriber receives many frames in
//! one `sendmsg`; when paced, a round is one message and one write per subscriber.
//!
//! Fairness: after every [`FAIR_CHUNK`] offers or flushed connections, also inside one
//! message to a huge channel, the follower yields to the executor if it has held the core
//! for [`crate::shard::send::FAIR_SLICE`], so accepts, heartbeats and ingest keep running
//! while a message reaches 500k local subscribers. What is left of a channel's members at
//! a yield is delivered from a snapshot of (key, generation) pairs, because the member
//! list can change while the follower is yielded (see [`deliver`]).

use crate::fanout::ring::{Poll as RingPoll, RingKind, RingMessage};
use crate::shard::send::FAIR_CHUNK;
use crate::shard::state::Shard;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Poll, Waker};
use std::time::Instant;

/// Most messages per fan-out round: bounds the frames queued per connection before a
/// flush and keeps the executor responsive (other tasks run between rounds).
pub const ROUND: usize = 256;

/// Subscribers from which a message's frame is copied into a shard-local `Bytes` before
/// it is queued to them. Every queued clone and every write's release touch the frame's
/// refcount; on the ring's shared `Bytes` that is one cache line bounced between every
/// core for every delivery, on a local copy it stays in this core's cache. (A copy is one
/// small allocation per message per shard; docs/benchmarks.md has the measurement.)
const LOCAL_COPY_MIN: usize = 4;

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
    // Where Shard::new placed it: a subscriber attached before this task first ran was
    // told its position from this cursor.
    let mut cursor = shard.ring_cursor.get();
    let mut latencies: Vec<Instant> = Vec::with_capacity(ROUND);
    // (key, generation) of a large channel's members, reused from message to message.
    let mut snapshot: Vec<(u32, u32)> = Vec::new();
    loop {
        let mut taken = 0;
        // Offers since the last yield to the executor.
        let mut offers = 0;
        while taken < ROUND {
            let polled = ring.poll(&mut cursor);
            shard.ring_cursor.set(cursor);
            match polled {
                RingPoll::Message(msg) => {
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
                RingPoll::Overrun { lost } => {
                    // The messages are gone from the ring, not from history: every
                    // subscriber here catches up from where its channel was. Counted so
                    // an operator can size the ring.
                    shard.metrics.ring_overrun_lost.fetch_add(lost, Relaxed);
                    shard.heal_overrun();
                }
                RingPoll::Empty => break,
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

/// This shard's frame for a message going to `subscribers` connections.
fn local_frame(frame: &Bytes, subscribers: usize) -> Bytes {
    if subscribers >= LOCAL_COPY_MIN {
        Bytes::copy_from_slice(frame)
    } else {
        frame.clone()
    }
}

/// Ends a paused fan-out's hold on SSE position releases, however `deliver` ends (it is
/// a future: it may be dropped at a yield).
struct Resumed<'a>(&'a Shard);

impl Drop for Resumed<'_> {
    fn drop(&mut self) {
        let held = &self.0.partial_deliveries;
        held.set(held.get().saturating_sub(1));
    }
}

/// Offers `frame` to every subscriber of `channel` on this shard; returns how many
/// subscribers the channel had.
///
/// Members are served straight from the index, `chunk` ([`FAIR_CHUNK`]) at a time, while
/// the shard's fair slice lasts. Once it is used up, the members not yet served are copied
/// into `snapshot` (slot key and generation) and served after a yield, chunk by chunk, a
/// member only if its slot still holds the same connection (a closed connection's slot may
/// have been reused by one that never subscribed) and that connection is still subscribed.
/// So each member that stayed subscribed gets the frame exactly once, whatever
/// `swap_remove`s reordered the live member list meanwhile, and one who joined meanwhile
/// does not (it subscribed after this message was published).
async fn deliver(
    shard: &Shard,
    msg: &RingMessage,
    snapshot: &mut Vec<(u32, u32)>,
    chunk: usize,
) -> usize {
    let channel = &msg.channel;
    // Presence events have no offset: they neither move the channel's position nor make
    // a subscriber lag.
    let offset = (msg.kind == RingKind::Message).then_some(msg.offset);
    // Straight from the index, chunk by chunk, while the slice lasts: no copy and no
    // re-check, because nothing can change while the core is held.
    let (count, frame) = {
        let index = shard.index.borrow();
        let members = index.members(channel);
        if members.is_empty() {
            return 0;
        }
        let frame = local_frame(&msg.frame, members.len());
        let mut conns = shard.conns.borrow_mut();
        let mut at = 0;
        loop {
            let end = (at + chunk).min(members.len());
            let mut queued = 0;
            for &key in &members[at..end] {
                if let Some(conn) = conns.get_mut(key) {
                    queued += u64::from(shard.offer_message(key, conn, channel, offset, &frame));
                }
            }
            shard.count_deliveries(queued, frame.len());
            at = end;
            if at == members.len() {
                if let Some(offset) = offset {
                    index.delivered(channel, offset);
                }
                return members.len();
            }
            if shard.fair.used() {
                break;
            }
        }
        // The rest is served after a yield, from a copy: the live list may be reordered
        // by then. A member catching up on the channel is left out: it gets the message
        // from history, which the follower's cursor is already past (a catch-up that ends
        // while the fan-out is paused has given it the message).
        snapshot.clear();
        snapshot.extend(members[at..].iter().filter_map(|&key| {
            let conn = conns.get(key)?;
            let from_history = offset.is_some() && conn.machine.lags_on(channel);
            (!from_history).then_some((key, conn.generation))
        }));
        (members.len(), frame)
    };
    // Until the last member is offered the message, the index keeps the channel's
    // position before it (where a released stream still waiting for it rebuilds its
    // position), and no stream releases its own (one already given it would rebuild it
    // before the message: see `Shard::release_idle_stream`).
    shard
        .partial_deliveries
        .set(shard.partial_deliveries.get() + 1);
    let _resumed = Resumed(shard);
    for part in snapshot.chunks(chunk) {
        shard.fair.yield_if_used().await;
        let index = shard.index.borrow();
        // Resolved again after every yield: the channel may have emptied and its id gone
        // to another channel.
        let Some(id) = index.channel_id(channel) else {
            break;
        };
        let mut conns = shard.conns.borrow_mut();
        let mut queued = 0;
        for &(key, generation) in part {
            let Some(conn) = conns.get_current(key, generation) else {
                continue;
            };
            if index.is_member(key, id) {
                queued += u64::from(shard.offer_message(key, conn, channel, offset, &frame));
            }
        }
        shard.count_deliveries(queued, frame.len());
    }
    if let Some(offset) = offset {
        shard.index.borrow().delivered(channel, offset);
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::position::Position;
    use crate::proto::sse::{HttpStream, Mode};
    use crate::shard::conn::{adopt, adopt_stream, Carried};
    use crate::shard::send::Flush;
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
        let key = shard.conns.borrow().next_key();
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
                    shard.index.borrow_mut().unsubscribe(9, "big");
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
        let key = shard.conns.borrow().next_key();
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
        let mut conns = shard.conns.borrow_mut();
        let conn = conns.get_mut(key).expect("open stream");
        if conn.machine.needs_position() {
            shard.restore_position(key, conn);
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
                let conns = shard.conns.borrow();
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
                        let mut conns = shard.conns.borrow_mut();
                        for &key in &keys {
                            let conn = conns.get_mut(key).expect("open");
                            // A writable edge writes what is queued; the sweep finds the
                            // stream idle.
                            assert_eq!(shard.flush(conn), Flush::Done);
                            shard.release_idle_stream(key, conn);
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

    /// Measures what [`local_frame`] saves: `threads` cores each queue one clone of a
    /// frame per "subscriber" and release them, on one shared `Bytes` or on a per-thread
    /// copy. Run: `cargo test --release -p ringcast frame_refcount -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn frame_refcount_cost() {
        const PER_THREAD: usize = 2_000_000;
        let shared = Bytes::copy_from_slice(&[b'x'; 80]);
        for local in [false, true] {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    let shared = &shared;
                    s.spawn(move || {
                        let frame = if local {
                            local_frame(shared, LOCAL_COPY_MIN)
                        } else {
                            shared.clone()
                        };
                        let mut queued = Vec::with_capacity(4096);
                        for _ in 0..PER_THREAD / 4096 {
                            queued.extend((0..4096).map(|_| frame.clone()));
                            queued.clear();
                        }
                    });
                }
            });
            let per = start.elapsed().as_nanos() as f64 / (PER_THREAD as f64);
            println!(
                "{threads} threads, {}: {per:.1} ns per clone+release per thread",
                if local {
                    "shard-local copy"
                } else {
                    "one shared Bytes"
                }
            );
        }
    }
}
