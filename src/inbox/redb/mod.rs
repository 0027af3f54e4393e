//! The redb backend of the inbox (the node's own file, when the cluster is off): the
//! store thread, a plain OS thread (not a glommio executor) that owns the database, so
//! no shard ever waits on disk.
//!
//! - [`store`] is the database logic (sans threads): group commits of appends and acks,
//!   the unacked messages of a channel, the retention sweep.
//! - [`outage`] is what the store thread remembers about failures: rate-limited error
//!   logs, and whether it is down (no write since a failure) and when to check again.
//!
//! Requests arrive on one bounded queue ([`Inbox`] is its cheap, cloneable handle). The
//! thread takes everything queued (up to `inbox_max_batch`), applies the appends and
//! acks in one transaction and commits it with one fsync (group commit: under load a
//! commit carries hundreds of messages, when idle a message waits for no one). Only
//! after the commit does it publish each appended message into the ring, with the offset
//! the store gave it and the store's epoch
//! ([`crate::fanout::publisher::Publisher::publish_at`]), wake idle shards, and answer
//! each requester. Reads (a subscriber's unacked messages) are answered after the writes
//! of their batch, so "the unacked messages up to last offset L" is consistent with what
//! the ring has seen: every offset up to L is already published.
//!
//! Answers and wake-ups go back through [`ReplyPath`], as the JetStream backend's do.

pub mod outage;
pub mod store;

use crate::fanout::publisher::Publisher;
use crate::inbox::handle::{Inbox, InboxConfig, Request, StoreCloser};
use crate::inbox::reply::{Backlog, Outcome, ReplyPath, ShardQueues, MAX_DELIVERY};
use crate::inbox::{ErrorKind, InboxStats, StoreError};
use crate::proto::message::{encode_message, EncodedData};
use outage::{ErrorLog, Outage};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use store::{Done, InboxStore, Op};

/// How often the retention sweep runs, and messages it deletes per transaction.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_BUDGET: usize = 10_000;

/// Least time between two attempts to reopen the database after an error.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Bytes a check for space writes (and then deletes): room for a message of the default
/// `max_message_size`.
const PROBE_BYTES: usize = 64 * 1024;

/// Longest the store thread waits for a request before it looks whether it must stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Opens the database (on the calling thread, so a bad path fails startup with a clear
/// error) and starts the store thread publishing through `publisher` to `shards` shards.
///
/// # Errors
/// The database cannot be opened, or the thread cannot be spawned.
pub fn start(
    config: InboxConfig,
    publisher: Arc<Publisher>,
    shards: usize,
    stats: Arc<InboxStats>,
) -> Result<(Inbox, Vec<ShardQueues>), StoreError> {
    let store = InboxStore::open(&config.path)?;
    warn_if_repaired(&store);
    stats.up.store(1, Relaxed);
    let (tx, rx) = flume::bounded(config.queue);
    let (replies, queues) = ReplyPath::new(shards);
    let path = config.path.clone();
    let worker = StoreThread {
        store: Some(store),
        config,
        publisher,
        stats: stats.clone(),
        replies,
        log: ErrorLog::default(),
        last_reopen: None,
        last_error: None,
        suspect: Vec::new(),
        down: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("ringcast-inbox".into())
        .spawn(move || worker.run(rx, &stopping))
        .map_err(|e| StoreError::from_io(&e).context("spawning the inbox store thread"))?;
    let closer = StoreCloser::new(stop, thread);
    Ok((Inbox::new(tx, stats, path, Some(closer)), queues))
}

struct StoreThread {
    store: Option<InboxStore>,
    config: InboxConfig,
    publisher: Arc<Publisher>,
    stats: Arc<InboxStats>,
    /// Where answers and wake-ups go.
    replies: ReplyPath,
    log: ErrorLog,
    last_reopen: Option<Instant>,
    /// Channels with publishes in a commit that failed: the file may hold them anyway
    /// (a failed fsync says nothing of what reached the disk or the page cache), so they
    /// are reconciled with live delivery when the store reopens.
    suspect: Vec<Arc<str>>,
    /// The failure that closed the store, answered while it waits to reopen.
    last_error: Option<StoreError>,
    /// Set by a failure, cleared by the next write that succeeds: while it is set,
    /// `ringcast_inbox_up` is 0 and the store checks by itself whether it can write.
    down: Option<Outage>,
}

fn warn_if_repaired(store: &InboxStore) {
    if store.was_repaired() {
        tracing::warn!(
            path = %store.path().display(),
            "inbox store repaired at open: it was not closed cleanly (a crash, kill -9, or a failed write)"
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl StoreThread {
    fn run(mut self, rx: flume::Receiver<Request>, stop: &AtomicBool) {
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut batch: Vec<Request> = Vec::with_capacity(self.config.max_batch);
        loop {
            if stop.load(Relaxed) {
                // What was queued before the stop is still committed and answered.
                batch.extend(rx.try_iter());
                if !batch.is_empty() {
                    let taken = batch.len() as u64;
                    self.process(&mut batch);
                    self.stats.queued.fetch_sub(taken, Relaxed);
                }
                // Dropping the database writes its allocator state: a clean close.
                self.store = None;
                tracing::info!(path = %self.config.path.display(), "inbox store closed");
                return;
            }
            // Woken at least every STOP_CHECK to see a stop.
            let wait = next_sweep
                .saturating_duration_since(Instant::now())
                .min(STOP_CHECK);
            match rx.recv_timeout(wait) {
                Ok(first) => batch.push(first),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let taken = batch.len() as u64;
                self.process(&mut batch);
                self.stats.queued.fetch_sub(taken, Relaxed);
            }
            self.probe_if_due();
            if Instant::now() >= next_sweep {
                // A full budget means more is due: come back soon, between batches.
                let more = self.sweep();
                next_sweep = Instant::now()
                    + if more {
                        Duration::from_millis(100)
                    } else {
                        SWEEP_EVERY
                    };
            }
        }
    }

    /// The open store, reopening it (at most once per second) after a failure.
    fn store(&mut self) -> Result<&InboxStore, StoreError> {
        if self.store.is_none() {
            if self.last_reopen.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                // The cause (disk full, permission...), not "unavailable": what to fix.
                return Err(self.last_error.clone().unwrap_or_else(|| {
                    StoreError::new(ErrorKind::Unavailable, "inbox store is not open")
                }));
            }
            self.last_reopen = Some(Instant::now());
            match InboxStore::open(&self.config.path) {
                Ok(store) => {
                    // After a failed write the repair is expected: the error was logged,
                    // and the line that matters is the one saying writes work again.
                    tracing::debug!(path = %self.config.path.display(), repaired = store.was_repaired(), "inbox store reopened");
                    self.reconcile(&store);
                    self.store = Some(store);
                }
                Err(e) => {
                    // Counted by the caller, once per request it refuses.
                    self.close(&e, "reopening the database");
                    return Err(e);
                }
            }
        }
        self.store
            .as_ref()
            .ok_or_else(|| StoreError::new(ErrorKind::Unavailable, "inbox store is not open"))
    }

    /// Counts `e` (it refused a request) and closes the store ([`StoreThread::close`]).
    fn fail(&mut self, e: &StoreError, what: &str) {
        self.stats.errors[e.kind as usize].fetch_add(1, Relaxed);
        self.close(e, what);
    }

    /// Logs `e`; a failed write leaves redb refusing further ones until the file is
    /// reopened (which also repairs it), so the store is dropped for a reopen, and is
    /// down until a write succeeds.
    fn close(&mut self, e: &StoreError, what: &str) {
        self.log.log(e, what);
        if e.kind != ErrorKind::Overloaded {
            self.store = None;
            self.stats.up.store(0, Relaxed);
            if self.down.is_none() {
                self.down = Some(Outage::new(Instant::now()));
            }
            const RETRYING: &str = " (the file is reopened every second until it works)";
            if !e.message.ends_with(RETRYING) {
                self.last_error = Some(StoreError {
                    kind: e.kind,
                    message: format!("{}{RETRYING}", e.message),
                });
            }
        }
    }

    /// A write succeeded: the store is up again, and says so after an outage (at most
    /// every 10 s, [`ErrorLog::recovery_due`]).
    fn writable(&mut self) {
        let Some(outage) = self.down.take() else {
            return;
        };
        self.last_error = None;
        self.stats.up.store(1, Relaxed);
        let down_secs = outage.since.elapsed().as_secs();
        if !self.log.recovery_due(Instant::now()) {
            tracing::debug!(down_secs, "inbox store: writes succeed again");
            return;
        }
        tracing::info!(
            path = %self.config.path.display(),
            down_secs,
            "inbox store: writes succeed again; publishes to user channels are stored"
        );
    }

    /// While the store is down, checks now and then that it can write again (reopening
    /// it, then writing and deleting [`PROBE_BYTES`]), so that `ringcast_inbox_up` comes
    /// back once the cause is fixed (space freed) even when no request tries the store.
    fn probe_if_due(&mut self) {
        if !self
            .down
            .as_mut()
            .is_some_and(|outage| outage.probe_due(Instant::now()))
        {
            return;
        }
        // Not a request: failures here are logged, not counted.
        let result = match self.store.as_ref() {
            Some(store) => store.probe(PROBE_BYTES),
            None => match self.store() {
                Ok(store) => store.probe(PROBE_BYTES),
                // Reopening failed (logged), or is not due yet.
                Err(_) => return,
            },
        };
        match result {
            Ok(()) => self.writable(),
            Err(e) => self.close(&e, "checking that the store can write again"),
        }
    }

    /// After a failed commit, the reopened file may hold messages whose publishers were
    /// answered 503: they are stored, so they are published now at their offsets (their
    /// publishers may send them again: at least once), instead of staying undelivered
    /// until a later cumulative ack removed them unseen.
    fn reconcile(&mut self, store: &InboxStore) {
        let epoch = store.epoch();
        let mut found = 0;
        for channel in std::mem::take(&mut self.suspect) {
            // Only what live delivery has not reached: the publisher's position is the
            // last offset published live in the store's epoch.
            let after = match self.publisher.position(&channel) {
                Some((last, e)) if e == epoch => last,
                _ => continue,
            };
            let stored = match store.messages_after(&channel, after, MAX_DELIVERY) {
                Ok(m) => m,
                Err(e) => {
                    self.log.log(&e, "reading back a failed commit");
                    continue;
                }
            };
            for (offset, payload) in stored {
                self.publisher.publish_at(&channel, offset, epoch, &payload);
                found += 1;
            }
        }
        if found > 0 {
            self.wake_shards();
            tracing::warn!(
                messages = found,
                "inbox: messages of a commit reported failed were in the file after reopening: \
                 delivered now (their publishers got 503 and may send them again)"
            );
        }
    }

    fn wake_shards(&self) {
        self.replies.wake_idle(&self.publisher);
    }

    fn process(&mut self, batch: &mut Vec<Request>) {
        let ops: Vec<Op<'_>> = batch
            .iter()
            .filter_map(|r| match r {
                Request::Publish {
                    channel, payload, ..
                } => Some(Op::Append { channel, payload }),
                Request::Ack { channel, upto, .. } => Some(Op::Ack {
                    channel,
                    upto: *upto,
                }),
                Request::Read { .. } => None,
            })
            .collect();
        let outcome = if ops.is_empty() {
            Ok((Vec::new(), 0))
        } else {
            let started = Instant::now();
            let result = self
                .store()
                .and_then(|store| Ok((store.commit(&ops, unix_now())?, store.epoch())));
            match &result {
                Ok((done, _)) => {
                    self.writable();
                    self.stats
                        .commit_latency
                        .record(started.elapsed().as_micros() as u64);
                    self.stats.commits.fetch_add(1, Relaxed);
                    let stored = done
                        .iter()
                        .filter(|d| matches!(d, Done::Appended(_)))
                        .count();
                    self.stats.stored.fetch_add(stored as u64, Relaxed);
                }
                Err(e) => {
                    let e = e.clone();
                    for request in batch.iter() {
                        if let Request::Publish { channel, .. } = request {
                            if !self.suspect.contains(channel) {
                                self.suspect.push(channel.clone());
                            }
                        }
                    }
                    // Every request of the batch is refused: each is counted.
                    self.stats.errors[e.kind as usize].fetch_add(batch.len() as u64, Relaxed);
                    self.close(&e, "committing a batch");
                }
            }
            result
        };
        drop(ops);
        let (done, epoch) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                for request in batch.drain(..) {
                    self.answer_error(request, &e);
                }
                return;
            }
        };
        // Publish in offset order (the batch's order), then wake, then answer.
        let mut results = done.into_iter();
        let mut published = false;
        let mut answered: Vec<(Request, Option<Done>)> = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            let result = match &request {
                Request::Read { .. } => None,
                _ => results.next(),
            };
            if let (
                Request::Publish {
                    channel, payload, ..
                },
                Some(Done::Appended(offset)),
            ) = (&request, result)
            {
                self.publisher.publish_at(channel, offset, epoch, payload);
                published = true;
            }
            answered.push((request, result));
        }
        if published {
            self.wake_shards();
        }
        for (request, result) in answered {
            self.answer(request, result, epoch);
        }
    }

    fn answer(&mut self, request: Request, result: Option<Done>, epoch: u64) {
        let outcome = match (&request, result) {
            (Request::Publish { .. }, Some(Done::Appended(offset))) => {
                Ok(Outcome::Published(offset))
            }
            (Request::Ack { .. }, Some(Done::Acked(n))) => {
                self.stats.acks.fetch_add(1, Relaxed);
                self.stats.acked.fetch_add(n, Relaxed);
                Ok(Outcome::Acked(Ok(n)))
            }
            (Request::Ack { .. }, Some(Done::AckAhead(last))) => Ok(Outcome::Acked(Err(last))),
            (Request::Read { channel, .. }, _) => {
                let channel = channel.clone();
                self.read(&channel, epoch).map(Outcome::Read)
            }
            // The commit gave this request no result (or another's): `ReplyPath`
            // answers it as lost.
            _ => Err(StoreError::new(ErrorKind::Io, "inbox: result lost (bug)")),
        };
        self.replies.answer(request, outcome);
    }

    fn read(&mut self, channel: &Arc<str>, epoch: u64) -> Result<Backlog, StoreError> {
        let result = self
            .store()
            .and_then(|store| Ok((store.unacked(channel, MAX_DELIVERY)?, store.epoch())));
        let (unacked, store_epoch) = match result {
            Ok(ok) => ok,
            Err(e) => {
                self.fail(&e, "reading a user's inbox");
                return Err(e);
            }
        };
        debug_assert!(epoch == 0 || epoch == store_epoch);
        Ok(Backlog {
            last: unacked.last,
            epoch: store_epoch,
            // The same bytes the live frame of that offset had.
            frames: unacked
                .messages
                .into_iter()
                .map(|(offset, payload)| {
                    (
                        offset,
                        encode_message(channel, offset, &EncodedData::new(&payload)),
                    )
                })
                .collect(),
            more: unacked.more,
        })
    }

    fn answer_error(&mut self, request: Request, e: &StoreError) {
        self.replies.answer(request, Err(e.clone()));
    }

    /// Deletes messages past the retention, one transaction of at most
    /// [`SWEEP_BUDGET`]; true when there may be more.
    fn sweep(&mut self) -> bool {
        let cutoff = unix_now().saturating_sub(self.config.retention.as_secs());
        match self.store().and_then(|s| s.expire(cutoff, SWEEP_BUDGET)) {
            Ok(n) => {
                self.stats.expired.fetch_add(n, Relaxed);
                if n > 0 {
                    tracing::debug!(expired = n, "inbox retention sweep");
                }
                n as usize >= SWEEP_BUDGET
            }
            Err(e) => {
                // Not a request: logged, not counted.
                if e.kind != ErrorKind::Unavailable {
                    self.close(&e, "the retention sweep");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::ring::{Poll, Ring};
    use crate::fanout::wake::IdleFlags;
    use crate::inbox::{AnswerKind, InboxReply, ShardTag};

    fn start(dir: &std::path::Path, shards: usize) -> (Inbox, Vec<ShardQueues>, Arc<Publisher>) {
        let publisher = Arc::new(Publisher::new(
            Arc::new(Ring::new(1 << 12)),
            Arc::new(IdleFlags::new(shards)),
        ));
        let config = InboxConfig {
            path: dir.join("inbox.redb"),
            retention: Duration::from_secs(3600),
            max_batch: 64,
            queue: 1024,
        };
        let stats = Arc::new(InboxStats::default());
        let (inbox, queues) = super::start(config, publisher.clone(), shards, stats).unwrap();
        (inbox, queues, publisher)
    }

    fn offset_in(frame: &[u8]) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
        v["offset"].as_u64().unwrap()
    }

    /// Many publishes queued at once share commits, are acknowledged with consecutive
    /// offsets, and reach the ring in offset order only after their commit; a read then
    /// sees them all as unacked, and an ack (through a shard's answer queue) removes them.
    #[test]
    fn group_commits_publish_in_offset_order_and_answer_every_requester() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, queues, publisher) = start(dir.path(), 1);
        let waits: Vec<_> = (0..200)
            .map(|i| {
                let (tx, rx) = flume::bounded(1);
                inbox
                    .publish("user:1", format!("{i}").as_bytes(), InboxReply::Wait(tx))
                    .unwrap();
                rx
            })
            .collect();
        let offsets: Vec<u64> = waits.iter().map(|rx| rx.recv().unwrap().unwrap()).collect();
        assert_eq!(offsets, (1..=200).collect::<Vec<_>>());
        let stats = inbox.stats();
        assert_eq!(stats.stored.load(Relaxed), 200);
        assert!(
            stats.commits.load(Relaxed) < 200,
            "no group commit happened"
        );
        let mut cursor = 0;
        let mut seen = Vec::new();
        while let Poll::Message(m) = publisher.ring().poll(&mut cursor) {
            seen.push(offset_in(&m.frame));
        }
        assert_eq!(seen, offsets, "ring order is offset order");
        let tag = ShardTag {
            key: 3,
            generation: 9,
            id: None,
            since: None,
            attempt: 0,
        };
        let shard = |tag: &ShardTag| InboxReply::Shard {
            shard: 0,
            tag: tag.clone(),
        };
        inbox.read("user:1", shard(&tag)).unwrap();
        let answer = queues[0].answers.recv().unwrap();
        assert_eq!(answer.tag, tag);
        let AnswerKind::Unacked(Ok(backlog)) = answer.kind else {
            panic!("{answer:?}")
        };
        assert_eq!((backlog.last, backlog.frames.len()), (200, 200));
        assert_eq!(offset_in(&backlog.frames[5].1), 6);
        inbox.ack("user:1", 150, shard(&tag)).unwrap();
        let answer = queues[0].answers.recv().unwrap();
        assert!(matches!(
            answer.kind,
            AnswerKind::Acked {
                upto: 150,
                result: Ok(Ok(150))
            }
        ));
        inbox.read("user:1", shard(&tag)).unwrap();
        let AnswerKind::Unacked(Ok(left)) = queues[0].answers.recv().unwrap().kind else {
            panic!("no backlog")
        };
        assert_eq!(left.frames.first().map(|f| f.0), Some(151));
        assert_eq!(left.epoch, backlog.epoch);
    }

    /// A restart (a new thread on the same file) continues offsets in the same epoch.
    #[test]
    fn a_restarted_store_continues_offsets_and_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let publish = |inbox: &Inbox| {
            let (tx, rx) = flume::bounded(1);
            inbox.publish("user:2", b"x", InboxReply::Wait(tx)).unwrap();
            rx.recv().unwrap().unwrap()
        };
        let first_epoch;
        {
            let (inbox, _queues, publisher) = start(dir.path(), 1);
            assert_eq!(publish(&inbox), 1);
            assert_eq!(publish(&inbox), 2);
            first_epoch = publisher.position("user:2").map(|p| p.1);
        }
        // The first thread still holds the file until its queue is dropped; wait for it.
        let mut attempt = 0;
        let (inbox, _queues, publisher) = loop {
            let publisher = Arc::new(Publisher::new(
                Arc::new(Ring::new(16)),
                Arc::new(IdleFlags::new(1)),
            ));
            let config = InboxConfig {
                path: dir.path().join("inbox.redb"),
                retention: Duration::from_secs(3600),
                max_batch: 64,
                queue: 16,
            };
            match super::start(config, publisher.clone(), 1, Arc::default()) {
                Ok((inbox, queues)) => break (inbox, queues, publisher),
                Err(e) if e.kind == ErrorKind::Locked && attempt < 100 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(publish(&inbox), 3);
        assert_eq!(publisher.position("user:2").map(|p| p.1), first_epoch);
    }
}
