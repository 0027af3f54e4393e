//! Joining a channel: the first subscribe of a channel this node does not follow yet
//! waits until it does (docs/cluster.md, "Recovery on any node").
//!
//! A node follows a channel once (a) its live subject is subscribed and the server has
//! the SUB (a flush), (b) the stream's last message of the channel (offset `L`, epoch
//! `E`, stream sequence `S`) is read, (c) what local history needs is read from the
//! stream and given to the local publisher (`publish_at`): the offsets after the
//! publisher's own position when it is in `E`, or after a waiting subscriber's `since`
//! in `E` (at most its namespace's `max_recovery_messages` / history size), and (d)
//! `(L, E)` is adopted as the publisher's position. Only then are the waiting subscribes
//! answered (over per-shard flume channels, woken through glommio's cross-thread waker,
//! as the inbox store thread answers), and the shard subscribes each connection at its
//! follower's cursor exactly as an inbox subscribe does ([`crate::shard::inbox`]).
//!
//! Why nothing is lost: a message stored at offset `k` is published live after its
//! acknowledgement. Either that live publish reached the server after this node's SUB
//! (it arrives live, and offsets up to `L` are dropped as duplicates), or before it, and
//! then it was stored before the read of the last message, so `k <= L`. While the join
//! runs, cluster messages of the channel are buffered and applied in order after it.
//!
//! A join that finds the stream subject empty stores an epoch marker there first
//! (offset 0, a new epoch, no payload, expecting no message on the subject): one node
//! wins, the others are refused (10071) and read the winner's. The join then adopts
//! `(0, E)`, so subscribers before the first publish get the cluster epoch `E`, and the
//! first publish stores offset 1 in `E`. The marker is never delivered: it is not
//! published live, and reading back (offset 0) skips it.
//!
//! A subscribe is never held longer than [`LOCAL_AFTER`]: with NATS down, or a join not
//! done by then, it is answered from local state (a local epoch, as before joins).
//!
//! Sans-io pieces (unit- and property-tested): [`first_to_read`] (from which offset the
//! join reads) and [`SeqSearch`] (where that offset is in the stream).

use super::{Chan, Cluster, Node, Request, JS_TIMEOUT, LOCAL_AFTER};
use crate::cluster::stored;
use crate::proto::recovery::Since;
use bytes::Bytes;
use parking_lot::RwLock;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who waits for a join, and how its connection is to be subscribed when it is done.
#[derive(Debug, Clone)]
pub struct JoinTag {
    /// The connection's key on its shard.
    pub key: u32,
    /// Its generation (a reused key is another connection).
    pub generation: u32,
    /// The command's id.
    pub id: Option<String>,
    /// The subscribe's position to recover from.
    pub since: Option<Since>,
    /// Whether the subscribe gets a reply (a `subscribe` command, SSE/poll, an upgrade
    /// URL with a position); an upgrade URL's channel without one is subscribed quietly.
    pub reply: bool,
}

/// The NATS thread's answer to a shard: the channel is followed now (`joined`), or the
/// subscribe is answered from local state (NATS down, or the join took over 2 s).
#[derive(Debug)]
pub struct JoinAnswer {
    /// The channel.
    pub channel: Arc<str>,
    /// The waiting subscribe.
    pub tag: JoinTag,
    /// True when the node follows the channel with the stream's position.
    pub joined: bool,
}

/// A shard's join request.
pub(super) struct JoinRequest {
    channel: Arc<str>,
    shard: usize,
    tag: JoinTag,
    /// How many messages before `L` the subscriber's recovery may need.
    bound: usize,
}

/// Join counters (`ringcast_cluster_join*`).
#[derive(Debug, Default)]
pub struct JoinStats {
    /// Channels this node started following (joins done).
    pub joins: AtomicU64,
    /// Subscribes that waited for a join.
    pub waits: AtomicU64,
    /// Subscribes answered from local state: NATS down, or the join not done in 2 s.
    pub fallbacks: AtomicU64,
    /// Messages read from the stream by joins.
    pub fetched: AtomicU64,
}

impl JoinStats {
    /// Appends the `ringcast_cluster_join*` metrics.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let rows: [(&str, &str, &AtomicU64); 4] = [
            (
                "ringcast_cluster_joins_total",
                "Channels this node started following: live subject subscribed, the stream's position adopted.",
                &self.joins,
            ),
            (
                "ringcast_cluster_join_waits_total",
                "Subscribes that waited for this node to follow their channel.",
                &self.waits,
            ),
            (
                "ringcast_cluster_join_fallbacks_total",
                "Subscribes answered from local state because NATS was down or the join took over 2 s.",
                &self.fallbacks,
            ),
            (
                "ringcast_cluster_join_fetched_total",
                "Messages read from the stream by joins (recovery of a subscriber's since, or the node's own gap).",
                &self.fetched,
            ),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
    }
}

/// What shards and the NATS thread share about joins.
pub(super) struct JoinShared {
    /// Channels followed: live subscription established and position known.
    followed: RwLock<HashSet<Arc<str>, ahash::RandomState>>,
    /// Per-shard answer queues.
    answers: Vec<flume::Sender<JoinAnswer>>,
}

impl JoinShared {
    /// Shared state and each shard's answer receiver.
    pub(super) fn new(shards: usize) -> (Arc<JoinShared>, Vec<flume::Receiver<JoinAnswer>>) {
        let (answers, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| flume::unbounded()).unzip();
        let shared = JoinShared {
            followed: RwLock::new(HashSet::default()),
            answers,
        };
        (Arc::new(shared), receivers)
    }
}

impl Cluster {
    /// True when this node follows `channel` (a subscribe is answered at once).
    pub fn follows(&self, channel: &str) -> bool {
        self.join.followed.read().contains(channel)
    }

    /// Asks the NATS thread to follow `channel`; the answer goes to `shard`'s join queue
    /// within [`LOCAL_AFTER`]. `bound`: messages the subscriber may recover.
    ///
    /// # Errors
    /// 65,536 joins (`JOIN_QUEUE`) are queued already, or the NATS thread is gone:
    /// nothing was queued (the subscribe is answered from local state).
    pub fn join(
        &self,
        shard: usize,
        channel: Arc<str>,
        tag: JoinTag,
        bound: usize,
    ) -> Result<(), JoinTag> {
        let queued = &self.stats.join_queued;
        if queued.fetch_add(1, Relaxed) >= super::JOIN_QUEUE {
            queued.fetch_sub(1, Relaxed);
            return Err(tag);
        }
        let request = JoinRequest {
            channel,
            shard,
            tag,
            bound,
        };
        self.interest_tx.send(Request::Join(request)).map_err(|e| {
            queued.fetch_sub(1, Relaxed);
            match e.into_inner() {
                Request::Join(r) => r.tag,
                _ => unreachable!("a join request was sent"),
            }
        })
    }

    /// `shard`'s join answers.
    pub fn join_answers(&self, shard: usize) -> Option<flume::Receiver<JoinAnswer>> {
        self.join_answers.get(shard).cloned()
    }

    /// The join counters.
    pub fn join_stats(&self) -> &JoinStats {
        &self.stats.join
    }
}

struct Waiter {
    id: u64,
    shard: usize,
    tag: JoinTag,
    bound: usize,
}

/// A cluster message that arrived while its channel was joining.
struct Arrival {
    offset: u64,
    epoch: u64,
    seq: u64,
    payload: Bytes,
    own: bool,
}

#[derive(Default)]
struct Joining {
    waiters: Vec<Waiter>,
    buffer: Vec<Arrival>,
}

/// The NATS thread's join state.
pub(super) struct Joins {
    shared: Arc<JoinShared>,
    pending: RefCell<HashMap<Arc<str>, Joining>>,
    next_waiter: Cell<u64>,
}

impl Joins {
    pub(super) fn new(shared: Arc<JoinShared>) -> Joins {
        Joins {
            shared,
            pending: RefCell::new(HashMap::new()),
            next_waiter: Cell::new(0),
        }
    }
}

/// A message read from the stream: (offset, stream sequence, payload).
type Stored = (u64, u64, Bytes);

/// The first offset a join reads from the stream whose last message of the channel is
/// `last` in `epoch`; `last + 1` when it reads nothing.
///
/// - The local publisher is at `base` in `epoch`: the offsets after it (its own gap,
///   at most `keep`, the most the stream keeps per channel). Nothing below `base` can be
///   given to the publisher (its offsets only move forward).
/// - Otherwise: the earliest offset a waiting subscribe's `since` in `epoch` needs, at
///   most its `bound` messages before `last`.
pub fn first_to_read(
    last: u64,
    epoch: u64,
    base: Option<u64>,
    keep: usize,
    wants: impl IntoIterator<Item = (Option<Since>, usize)>,
) -> u64 {
    let floor = |n: usize| (last + 1).saturating_sub(n as u64).max(1);
    match base {
        Some(p) if p >= last => last + 1,
        Some(p) => (p + 1).max(floor(keep)),
        None => wants
            .into_iter()
            .filter(|(_, bound)| *bound > 0)
            .filter_map(|(since, bound)| {
                since
                    .filter(|s| s.epoch == epoch && s.offset < last)
                    .map(|s| (s.offset + 1).max(floor(bound)))
            })
            .min()
            .unwrap_or(last + 1),
    }
}

/// Finds where a channel's messages from offset `lo` start in the stream, by direct gets
/// "next message of the subject at or after sequence q" (sans-io: the caller probes).
///
/// With `f(q)` the offset of that message (non-decreasing in `q`), it keeps
/// `f(high) >= lo` and `f(q) < lo` for every `q < low`, and ends when a probe finds `lo`
/// itself or `low == high`: the messages from [`SeqSearch::start`] on are the ones from
/// `lo` (or, if `lo` is gone from the stream, the first after it). The first probe
/// guesses dense offsets (`lo` lies at most `known_offset - lo` sequences before the
/// known message), which is exact when the channel had the stream to itself.
#[derive(Debug, Clone)]
pub struct SeqSearch {
    lo: u64,
    low: u64,
    high: u64,
    guess: Option<u64>,
    found: Option<u64>,
}

impl SeqSearch {
    /// A search for `lo`, knowing the message at `known_seq` has offset
    /// `known_offset >= lo`.
    pub fn new(lo: u64, known_seq: u64, known_offset: u64) -> SeqSearch {
        let known_seq = known_seq.max(1);
        let guess = known_seq
            .saturating_sub(known_offset.saturating_sub(lo))
            .max(1);
        SeqSearch {
            lo,
            low: 1,
            high: known_seq,
            guess: Some(guess),
            found: (known_offset == lo).then_some(known_seq),
        }
    }

    /// The sequence to probe next, or `None` when done (read from [`SeqSearch::start`]).
    pub fn probe(&self) -> Option<u64> {
        if self.found.is_some() || self.low >= self.high {
            return None;
        }
        let mid = self.low + (self.high - self.low) / 2;
        Some(
            self.guess
                .filter(|g| (self.low..self.high).contains(g))
                .unwrap_or(mid),
        )
    }

    /// What the probe at `probed` found: the next message's (sequence, offset), or
    /// nothing at or after it (a message discarded meanwhile).
    pub fn observe(&mut self, probed: u64, next: Option<(u64, u64)>) {
        self.guess = None;
        match next {
            Some((seq, offset)) if offset == self.lo => self.found = Some(seq),
            Some((seq, offset)) if offset < self.lo => {
                self.low = self.low.max(seq.saturating_add(1)).min(self.high);
            }
            _ => self.high = self.high.min(probed).max(self.low),
        }
    }

    /// The sequence to read the channel's messages from.
    pub fn start(&self) -> u64 {
        self.found.unwrap_or(self.low)
    }
}

impl Node {
    /// A shard's subscribe waits for this node to follow `request.channel`.
    pub(super) fn on_join(self: Rc<Self>, request: JoinRequest) {
        let JoinRequest {
            channel,
            shard,
            tag,
            bound,
        } = request;
        let waiter = Waiter {
            id: self.joins.next_waiter.get(),
            shard,
            tag,
            bound,
        };
        self.joins.next_waiter.set(waiter.id + 1);
        if self.joins.shared.followed.read().contains(&channel) {
            // Followed since the shard looked.
            return self.answer_join(&channel, waiter, true);
        }
        if !self.up() {
            self.stats.join.fallbacks.fetch_add(1, Relaxed);
            return self.answer_join(&channel, waiter, false);
        }
        let id = waiter.id;
        self.joins
            .pending
            .borrow_mut()
            .entry(channel.clone())
            .or_default()
            .waiters
            .push(waiter);
        let node = self.clone();
        let name = channel.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(LOCAL_AFTER).await;
            node.join_timeout(&name, id);
        });
        self.start_follow(channel);
    }

    fn answer_join(&self, channel: &Arc<str>, waiter: Waiter, joined: bool) {
        if let Some(tx) = self.joins.shared.answers.get(waiter.shard) {
            let _ = tx.send(JoinAnswer {
                channel: channel.clone(),
                tag: waiter.tag,
                joined,
            });
        }
    }

    /// A waiter not answered within [`LOCAL_AFTER`] is answered from local state.
    fn join_timeout(&self, channel: &Arc<str>, id: u64) {
        let waiter = {
            let mut pending = self.joins.pending.borrow_mut();
            let Some(joining) = pending.get_mut(channel) else {
                return;
            };
            let Some(i) = joining.waiters.iter().position(|w| w.id == id) else {
                return;
            };
            joining.waiters.swap_remove(i)
        };
        self.stats.join.fallbacks.fetch_add(1, Relaxed);
        tracing::debug!(channel = %channel, "cluster: join not done in time; a subscribe is answered from local state");
        self.answer_join(channel, waiter, false);
    }

    /// Starts following `channel` (live subscription, then the join) unless it is.
    pub(super) fn start_follow(self: &Rc<Self>, channel: Arc<str>) {
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        if c.sub.is_some() {
            return;
        }
        if c.interest == 0 && c.linger_until.is_none() {
            // Joined for a subscribe whose connection may never subscribe after all.
            c.linger_until = Some(Instant::now() + self.settings.interest_linger);
        }
        self.joins
            .pending
            .borrow_mut()
            .entry(channel.clone())
            .or_default();
        self.stats.subscriptions.fetch_add(1, Relaxed);
        let task = tokio::task::spawn_local(self.clone().follow(channel));
        c.sub = Some(task.abort_handle());
    }

    /// True while `channel`'s join runs (its live subscription must stay).
    pub(super) fn joining(&self, channel: &str) -> bool {
        self.joins.pending.borrow().contains_key(channel)
    }

    /// The live subscription of `channel` ended: it is no longer followed.
    pub(super) fn unfollowed(&self, channel: &str) {
        self.joins.shared.followed.write().remove(channel);
    }

    /// Called first by `deliver`: true when the message was buffered because the
    /// channel is joining.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn join_intercept(
        &self,
        channel: &Arc<str>,
        offset: u64,
        epoch: u64,
        seq: u64,
        payload: &Bytes,
        own: bool,
    ) -> bool {
        if let Some(joining) = self.joins.pending.borrow_mut().get_mut(channel) {
            joining.buffer.push(Arrival {
                offset,
                epoch,
                seq,
                payload: payload.clone(),
                own,
            });
            return true;
        }
        false
    }

    /// The live subscription task: subscribe, join, then deliver live messages.
    async fn follow(self: Rc<Self>, name: Arc<str>) {
        let mut sub = loop {
            match self.client.subscribe(self.live_subject(&name)).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!(error = %e, "cluster: subscribing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        self.join_phase(&name).await;
        use futures_lite::StreamExt;
        while let Some(m) = sub.next().await {
            if let Some((offset, epoch, seq)) = stored::live_position(m.headers.as_ref()) {
                self.deliver(&name, offset, epoch, seq, m.payload, false);
            }
        }
    }

    /// Steps (a) to (d) of the module docs; retried until done (waiters time out meanwhile).
    async fn join_phase(self: &Rc<Self>, name: &Arc<str>) {
        let pause = Duration::from_millis(100);
        loop {
            if !self.up() {
                tokio::time::sleep(pause).await;
                continue;
            }
            // The server has the SUB: every live publish from now on reaches us.
            match tokio::time::timeout(JS_TIMEOUT, self.client.flush()).await {
                Ok(Ok(())) => {}
                _ => {
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            let (last, epoch, seq) = match self.read_last(name).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!(error = %e, channel = %name, "cluster: joining");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let seq = if seq == 0 {
                // The stream has nothing of the channel: fix its epoch with a marker.
                match self.write_marker(name, epoch).await {
                    Ok(Some(s)) => s,
                    // Another node stored first (a marker or a message): read it.
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, channel = %name, "cluster: joining: storing the epoch marker");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                }
            } else {
                seq
            };
            let mut got: Vec<Stored> = Vec::new();
            let mut from = last + 1;
            let mut failed = false;
            // Again while waiters that arrived during a read need more.
            loop {
                let lo = self.join_plan(name, last, epoch);
                if lo >= from {
                    break;
                }
                let known = got.first().map_or((seq, last), |(o, s, _)| (*s, *o));
                match self.read_range(name, lo, from - 1, known, epoch).await {
                    Ok(mut part) => {
                        part.append(&mut got);
                        got = part;
                        from = lo;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, channel = %name, "cluster: joining: reading back");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                tokio::time::sleep(pause).await;
                continue;
            }
            return self.complete_join(name, (last, epoch, seq), got);
        }
    }

    /// Stores the epoch marker of a channel whose stream subject is empty: offset 0 in
    /// `epoch`, no payload, expecting no message on the subject, so one node wins and
    /// the channel's epoch exists before its first publish. `Some(sequence)` when stored;
    /// `None` when the subject is not empty any more (refused with 10071).
    async fn write_marker(&self, name: &Arc<str>, epoch: u64) -> Result<Option<u64>, String> {
        let headers = stored::headers(0, epoch, None);
        stored::store_expecting(
            &self.js,
            self.stream_subject(name),
            headers,
            Bytes::new(),
            0,
        )
        .await
        .map_err(|e| format!("cluster: storing the epoch marker: {e}"))
    }

    fn join_plan(&self, name: &Arc<str>, last: u64, epoch: u64) -> u64 {
        let base = self
            .publisher
            .position(name)
            .filter(|(_, e)| *e == epoch)
            .map(|(p, _)| p);
        let pending = self.joins.pending.borrow();
        let wants = pending
            .get(name)
            .map(|j| {
                j.waiters
                    .iter()
                    .map(|w| (w.tag.since, w.bound))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        first_to_read(last, epoch, base, self.settings.history_size, wants)
    }

    /// The channel's messages with offsets `lo..=until` in `epoch` from the stream;
    /// `known` is (sequence, offset) of a message with offset > `until`, or `until`.
    async fn read_range(
        &self,
        name: &Arc<str>,
        lo: u64,
        until: u64,
        known: (u64, u64),
        epoch: u64,
    ) -> Result<Vec<Stored>, String> {
        let stream = self
            .stream
            .borrow()
            .clone()
            .ok_or("cluster: no stream yet")?;
        let subject = self.stream_subject(name);
        let mut search = SeqSearch::new(lo, known.0, known.1);
        let read = |e| format!("cluster: reading the stream: {e}");
        while let Some(q) = search.probe() {
            let m = stored::next(&stream, &subject, q).await.map_err(read)?;
            search.observe(q, m.map(|m| (m.seq, m.offset.unwrap_or(0))));
        }
        let mut out = Vec::new();
        let mut cursor = search.start();
        while let Some(m) = stored::next(&stream, &subject, cursor)
            .await
            .map_err(read)?
        {
            cursor = m.seq + 1;
            let Some((offset, e)) = m.position() else {
                continue;
            };
            if offset > until {
                break;
            }
            if e == epoch && offset >= lo {
                out.push((offset, m.seq, m.payload));
            }
            if offset == until || m.seq >= known.0 {
                break;
            }
        }
        self.stats.join.fetched.fetch_add(out.len() as u64, Relaxed);
        Ok(out)
    }

    /// Gives the read messages to the publisher, adopts the stream's position, applies
    /// what arrived meanwhile, then answers the waiters. No await: nothing interleaves.
    fn complete_join(
        self: &Rc<Self>,
        name: &Arc<str>,
        (last, epoch, seq): (u64, u64, u64),
        got: Vec<Stored>,
    ) {
        let mut at = self
            .publisher
            .position(name)
            .filter(|(_, e)| *e == epoch)
            .map(|(p, _)| p);
        for (offset, _, payload) in got {
            if at.is_some_and(|a| offset <= a) {
                continue;
            }
            if let Some(a) = at.filter(|a| offset > a + 1) {
                // Gone from the stream: subscribers here see the jump.
                self.stats.gap_offsets.fetch_add(offset - a - 1, Relaxed);
            }
            self.publisher.publish_at(name, offset, epoch, &payload);
            at = Some(offset);
        }
        self.publisher.adopt_position(name, last, epoch);
        {
            let mut chans = self.chans.borrow_mut();
            let c = chans.entry(name.clone()).or_default();
            if c.epoch != epoch {
                c.pending.clear();
            }
            c.epoch = epoch;
            c.applied = last.max(at.unwrap_or(0));
            c.applied_seq = c.applied_seq.max(seq);
            c.local = false;
            self.drain(name, c);
            relinger(c, self.settings.interest_linger);
        }
        self.joins.shared.followed.write().insert(name.clone());
        let joining = self.joins.pending.borrow_mut().remove(name);
        let Joining { waiters, buffer } = joining.unwrap_or_default();
        for a in buffer {
            self.deliver(name, a.offset, a.epoch, a.seq, a.payload, a.own);
        }
        self.wake();
        self.stats.join.joins.fetch_add(1, Relaxed);
        for w in waiters {
            self.answer_join(name, w, true);
        }
    }
}

/// A channel followed only for waiting subscribes keeps its subscription a full linger
/// from now, so their interest arrives before the sweep.
fn relinger(c: &mut Chan, linger: Duration) {
    if c.interest == 0 {
        c.linger_until = Some(Instant::now() + linger);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn since(offset: u64, epoch: u64) -> Option<Since> {
        Some(Since { offset, epoch })
    }

    #[test]
    fn reads_after_the_publisher_or_after_the_earliest_since_within_bounds() {
        // Nothing to read: no base, no since.
        assert_eq!(first_to_read(10, 7, None, 100, []), 11);
        // The publisher is behind in the stream's epoch: from its position.
        assert_eq!(first_to_read(10, 7, Some(4), 100, [(since(1, 7), 100)]), 5);
        // ... at most `keep` messages.
        assert_eq!(first_to_read(10, 7, Some(0), 3, []), 8);
        // Ahead or level: nothing.
        assert_eq!(
            first_to_read(10, 7, Some(12), 100, [(since(1, 7), 100)]),
            11
        );
        // No base: the earliest since in the epoch, within its bound.
        let wants = [(since(6, 7), 100), (since(2, 7), 100), (since(0, 9), 100)];
        assert_eq!(first_to_read(10, 7, None, 100, wants), 3);
        assert_eq!(first_to_read(10, 7, None, 100, [(since(2, 7), 4)]), 7);
        // A since at or past last, another epoch, a zero bound: nothing.
        assert_eq!(first_to_read(10, 7, None, 100, [(since(10, 7), 100)]), 11);
        assert_eq!(first_to_read(10, 7, None, 100, [(since(2, 7), 0)]), 11);
        assert_eq!(first_to_read(10, 7, None, 100, [(None, 100)]), 11);
    }

    /// A stream: sequences 1..=n, some holding the channel's offsets (increasing).
    fn next_of(stream: &[(u64, u64)], q: u64) -> Option<(u64, u64)> {
        stream.iter().copied().find(|(seq, _)| *seq >= q)
    }

    fn run(stream: &[(u64, u64)], lo: u64) -> (u64, usize) {
        let (ks, ko) = *stream.last().expect("one message");
        let mut s = SeqSearch::new(lo, ks, ko);
        let mut probes = 0;
        while let Some(q) = s.probe() {
            probes += 1;
            assert!(probes < 200, "the search must end");
            s.observe(q, next_of(stream, q));
        }
        (s.start(), probes)
    }

    #[test]
    fn a_dense_channel_is_found_with_one_probe() {
        let stream: Vec<(u64, u64)> = (1..=50).map(|i| (i + 100, i)).collect();
        let (start, probes) = run(&stream, 40);
        assert_eq!((start, probes), (140, 1));
    }

    proptest! {
        #[test]
        fn the_search_starts_at_the_first_message_from_lo(
            gaps in proptest::collection::vec((1u64..20, 1u64..3), 1..200),
            pick in any::<proptest::sample::Index>(),
            lo_shift in 0u64..3,
        ) {
            // Sequences grow by random gaps (other channels), offsets by 1 or 2 (holes).
            let mut stream = Vec::new();
            let (mut seq, mut offset) = (0, 0);
            for (ds, doff) in gaps {
                seq += ds;
                offset += doff;
                stream.push((seq, offset));
            }
            let last = stream.last().unwrap().1;
            let lo = (stream[pick.index(stream.len())].1 + lo_shift).min(last).max(1);
            let (start, probes) = run(&stream, lo);
            let expect = stream.iter().find(|(_, o)| *o >= lo).unwrap();
            prop_assert_eq!(next_of(&stream, start), Some(*expect));
            prop_assert!(probes <= 2 + 64 - stream.last().unwrap().0.leading_zeros() as usize);
        }
    }
}
