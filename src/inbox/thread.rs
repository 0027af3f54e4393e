//! The store thread: a plain OS thread (not a glommio executor) that owns the inbox
//! database, so no shard ever waits on disk.
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
//! Answers go back to a shard over its own unbounded queue ([`InboxAnswer`]) whose
//! receiver is awaited by a task on the shard: glommio wakes that task from this thread
//! through its cross-thread waker (eventfd), exactly like a shard-to-shard wake-up. The
//! queue needs no bound of its own: every answer is for a request that passed the
//! bounded request queue.

use crate::fanout::history::Since;
use crate::fanout::publisher::Publisher;
use crate::inbox::outage::{ErrorLog, Outage};
use crate::inbox::store::{Done, InboxStore, Op};
use crate::inbox::{ErrorKind, InboxStats, StoreError};
use crate::proto::message::{encode_message, EncodedData};
use bytes::Bytes;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Unacked messages sent to one subscriber at once; past it the reply says how many more
/// wait (ack, then subscribe again).
pub const MAX_DELIVERY: usize = 10_000;

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

/// How the store thread runs (from [`crate::config::Settings`]).
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The database file.
    pub path: PathBuf,
    /// How long an unacked message is kept.
    pub retention: Duration,
    /// Most requests per group commit.
    pub max_batch: usize,
    /// Requests the queue holds before publishes to inboxes are refused.
    pub queue: usize,
}

/// Who is told the outcome of a request.
#[derive(Debug)]
pub enum InboxReply {
    /// Nobody (UDP, TCP without ack mode): failures are counted and logged.
    None,
    /// A waiting task (HTTP `?ack=1`, TCP ack mode): the offset, or why not.
    Wait(flume::Sender<Result<u64, StoreError>>),
    /// A connection on a shard: answered through that shard's answer queue.
    Shard {
        /// The shard.
        shard: usize,
        /// What the shard needs to find the connection and render the reply.
        tag: ShardTag,
    },
}

/// Identifies the connection and command an answer is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTag {
    /// Connection slot.
    pub key: u32,
    /// Its generation (the slot may have been reused by then).
    pub generation: u32,
    /// The command's id, rendered JSON.
    pub id: Option<String>,
    /// `since` of a subscribe.
    pub since: Option<Since>,
    /// How many times this subscribe was tried.
    pub attempt: u8,
}

/// The unacked messages of a channel as frames, up to its last offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// The channel's last offset when read.
    pub last: u64,
    /// The store's epoch.
    pub epoch: u64,
    /// (offset, frame), oldest first.
    pub frames: Vec<(u64, Bytes)>,
    /// Unacked messages not included ([`MAX_DELIVERY`]).
    pub more: u64,
}

/// What the store answers a shard.
#[derive(Debug)]
pub enum AnswerKind {
    /// A client publish to a user channel was committed at this offset.
    Published(Result<u64, StoreError>),
    /// An ack up to `upto` was applied: messages removed, or the channel's last offset
    /// when the ack was ahead of it.
    Acked {
        /// The acked offset.
        upto: u64,
        /// `Ok(Ok(removed))`, `Ok(Err(last))` when ahead, or the store error.
        result: Result<Result<u64, u64>, StoreError>,
    },
    /// A subscriber's unacked messages.
    Unacked(Result<Backlog, StoreError>),
}

/// An answer for a connection on a shard.
#[derive(Debug)]
pub struct InboxAnswer {
    /// The connection and command.
    pub tag: ShardTag,
    /// The channel.
    pub channel: Arc<str>,
    /// The outcome.
    pub kind: AnswerKind,
}

/// One request to the inbox backend (the redb store thread, or the JetStream backend of
/// [`crate::cluster::inbox`] when the cluster is on).
#[derive(Debug)]
pub(crate) enum Request {
    Publish {
        channel: Arc<str>,
        payload: Bytes,
        reply: InboxReply,
    },
    Ack {
        channel: Arc<str>,
        upto: u64,
        reply: InboxReply,
    },
    Read {
        channel: Arc<str>,
        reply: InboxReply,
    },
}

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxRequestError {
    /// The queue is full: the store is behind.
    Full,
    /// The store thread is gone.
    Gone,
}

impl InboxRequestError {
    /// As a store error (for replies and metrics).
    pub fn to_store_error(self) -> StoreError {
        match self {
            InboxRequestError::Full => StoreError::new(
                ErrorKind::Overloaded,
                "inbox store is behind (its queue is full): retry later",
            ),
            InboxRequestError::Gone => {
                StoreError::new(ErrorKind::Unavailable, "inbox store thread is not running")
            }
        }
    }
}

/// The handle shards and ingest use to reach the store thread.
#[derive(Clone)]
pub struct Inbox {
    tx: flume::Sender<Request>,
    stats: Arc<InboxStats>,
    path: Arc<PathBuf>,
    /// Closes the store thread's database at shutdown (`None` for other backends).
    closer: Option<Arc<StoreCloser>>,
}

/// Stops the store thread and waits for it to close the database: a redb file that is
/// not closed (its allocator state written) is repaired at the next open, which takes
/// time proportional to the file and says the last run ended badly when it did not.
#[derive(Debug)]
struct StoreCloser {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("path", &self.path).finish()
    }
}

/// What [`Inbox::start`] hands each shard: its wake-up and answer queues.
pub struct ShardQueues {
    /// A token whenever the store published while the shard was idle.
    pub wake: flume::Receiver<()>,
    /// Answers for this shard's connections.
    pub answers: flume::Receiver<InboxAnswer>,
}

impl ShardQueues {
    /// One wake queue (a token at most) and one answer queue per shard: the senders for
    /// the store thread, the receivers for the shards.
    pub(crate) fn for_shards(
        shards: usize,
    ) -> (
        Vec<flume::Sender<()>>,
        Vec<flume::Sender<InboxAnswer>>,
        Vec<ShardQueues>,
    ) {
        let mut wakes = Vec::with_capacity(shards);
        let mut answers = Vec::with_capacity(shards);
        let mut queues = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (wake_tx, wake_rx) = flume::bounded(1);
            let (answer_tx, answer_rx) = flume::unbounded();
            wakes.push(wake_tx);
            answers.push(answer_tx);
            queues.push(ShardQueues {
                wake: wake_rx,
                answers: answer_rx,
            });
        }
        (wakes, answers, queues)
    }
}

impl Inbox {
    /// Opens the database (on the calling thread, so a bad path fails startup with a
    /// clear error) and starts the store thread publishing through `publisher` to
    /// `shards` shards.
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
        let (wakes, answers, queues) = ShardQueues::for_shards(shards);
        let path = Arc::new(config.path.clone());
        let worker = StoreThread {
            store: Some(store),
            config,
            publisher,
            stats: stats.clone(),
            wakes,
            answers,
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
        let closer = StoreCloser {
            stop,
            thread: Mutex::new(Some(thread)),
        };
        Ok((
            Inbox {
                tx,
                stats,
                path,
                closer: Some(Arc::new(closer)),
            },
            queues,
        ))
    }

    /// At shutdown, after the shards stopped: the store thread finishes the batch in
    /// hand and closes the database cleanly. Waits at most `timeout`; false when the
    /// thread did not finish in time (the next start then repairs the file).
    pub fn close(&self, timeout: Duration) -> bool {
        let Some(closer) = &self.closer else {
            return true;
        };
        closer.stop.store(true, Relaxed);
        let Some(thread) = closer.thread.lock().take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.join().is_ok()
    }

    /// A handle on another backend that takes the same requests and answers on the same
    /// queues (the cluster's JetStream inbox); `path` names it in logs.
    pub(crate) fn from_parts(
        tx: flume::Sender<Request>,
        stats: Arc<InboxStats>,
        path: PathBuf,
    ) -> Inbox {
        Inbox {
            tx,
            stats,
            path: Arc::new(path),
            closer: None,
        }
    }

    /// The database file.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<InboxStats> {
        &self.stats
    }

    fn send(&self, request: Request) -> Result<(), InboxRequestError> {
        // Counted before it can be taken, so the gauge never goes below zero.
        self.stats.queued.fetch_add(1, Relaxed);
        self.tx.try_send(request).map_err(|e| {
            self.refused(match e {
                flume::TrySendError::Full(_) => InboxRequestError::Full,
                flume::TrySendError::Disconnected(_) => InboxRequestError::Gone,
            })
        })
    }

    fn refused(&self, err: InboxRequestError) -> InboxRequestError {
        self.stats.queued.fetch_sub(1, Relaxed);
        self.stats.errors[err.to_store_error().kind as usize].fetch_add(1, Relaxed);
        err
    }

    /// [`Inbox::publish`] that waits while the queue is full (TCP ingest: the
    /// connection stops being read, and its sender is held back by TCP).
    ///
    /// # Errors
    /// The store thread is gone: nothing was queued.
    pub async fn publish_waiting(
        &self,
        channel: &str,
        payload: &[u8],
        reply: InboxReply,
    ) -> Result<(), InboxRequestError> {
        self.stats.queued.fetch_add(1, Relaxed);
        let request = Request::Publish {
            channel: Arc::from(channel),
            payload: Bytes::copy_from_slice(payload),
            reply,
        };
        let request = match self.tx.try_send(request) {
            Ok(()) => return Ok(()),
            Err(flume::TrySendError::Full(request)) => request,
            Err(flume::TrySendError::Disconnected(_)) => {
                return Err(self.refused(InboxRequestError::Gone))
            }
        };
        self.stats.waits.fetch_add(1, Relaxed);
        self.tx
            .send_async(request)
            .await
            .map_err(|_| self.refused(InboxRequestError::Gone))
    }

    /// Queues a message for `channel` (a user channel); `reply` learns its offset once
    /// committed and published.
    ///
    /// # Errors
    /// The queue is full or the store thread is gone: nothing was queued.
    pub fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        reply: InboxReply,
    ) -> Result<(), InboxRequestError> {
        self.send(Request::Publish {
            channel: Arc::from(channel),
            payload: Bytes::copy_from_slice(payload),
            reply,
        })
    }

    /// Queues a cumulative ack of `channel` up to `upto`.
    ///
    /// # Errors
    /// The queue is full or the store thread is gone.
    pub fn ack(
        &self,
        channel: &str,
        upto: u64,
        reply: InboxReply,
    ) -> Result<(), InboxRequestError> {
        self.send(Request::Ack {
            channel: Arc::from(channel),
            upto,
            reply,
        })
    }

    /// Queues a read of `channel`'s unacked messages.
    ///
    /// # Errors
    /// The queue is full or the store thread is gone.
    pub fn read(&self, channel: &str, reply: InboxReply) -> Result<(), InboxRequestError> {
        self.send(Request::Read {
            channel: Arc::from(channel),
            reply,
        })
    }
}

struct StoreThread {
    store: Option<InboxStore>,
    config: InboxConfig,
    publisher: Arc<Publisher>,
    stats: Arc<InboxStats>,
    wakes: Vec<flume::Sender<()>>,
    answers: Vec<flume::Sender<InboxAnswer>>,
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
        let wakes = &self.wakes;
        self.publisher.idle_flags().claim_idle(|shard| {
            if let Some(tx) = wakes.get(shard) {
                // Full: a token is already pending.
                let _ = tx.try_send(());
            }
        });
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
        match request {
            Request::Publish { channel, reply, .. } => {
                let offset = match result {
                    Some(Done::Appended(offset)) => Ok(offset),
                    _ => Err(StoreError::new(ErrorKind::Io, "inbox: append lost (bug)")),
                };
                match reply {
                    InboxReply::None => {}
                    InboxReply::Wait(tx) => {
                        let _ = tx.send(offset);
                    }
                    InboxReply::Shard { shard, tag } => {
                        self.to_shard(shard, tag, channel, AnswerKind::Published(offset))
                    }
                }
            }
            Request::Ack {
                channel,
                upto,
                reply,
            } => {
                let result = match result {
                    Some(Done::Acked(n)) => {
                        self.stats.acks.fetch_add(1, Relaxed);
                        self.stats.acked.fetch_add(n, Relaxed);
                        Ok(Ok(n))
                    }
                    Some(Done::AckAhead(last)) => Ok(Err(last)),
                    _ => Err(StoreError::new(ErrorKind::Io, "inbox: ack lost (bug)")),
                };
                if let InboxReply::Shard { shard, tag } = reply {
                    self.to_shard(shard, tag, channel, AnswerKind::Acked { upto, result });
                }
            }
            Request::Read { channel, reply } => {
                let backlog = self.read(&channel, epoch);
                if let InboxReply::Shard { shard, tag } = reply {
                    self.to_shard(shard, tag, channel, AnswerKind::Unacked(backlog));
                }
            }
        }
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
        match request {
            Request::Publish { channel, reply, .. } => match reply {
                InboxReply::None => {}
                InboxReply::Wait(tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
                InboxReply::Shard { shard, tag } => {
                    self.to_shard(shard, tag, channel, AnswerKind::Published(Err(e.clone())))
                }
            },
            Request::Ack {
                channel,
                upto,
                reply,
            } => {
                if let InboxReply::Shard { shard, tag } = reply {
                    let kind = AnswerKind::Acked {
                        upto,
                        result: Err(e.clone()),
                    };
                    self.to_shard(shard, tag, channel, kind);
                }
            }
            Request::Read { channel, reply } => {
                if let InboxReply::Shard { shard, tag } = reply {
                    self.to_shard(shard, tag, channel, AnswerKind::Unacked(Err(e.clone())));
                }
            }
        }
    }

    fn to_shard(&self, shard: usize, tag: ShardTag, channel: Arc<str>, kind: AnswerKind) {
        if let Some(tx) = self.answers.get(shard) {
            // Fails only when the shard is gone (process exit).
            let _ = tx.send(InboxAnswer { tag, channel, kind });
        }
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
        let (inbox, queues) = Inbox::start(config, publisher.clone(), shards, stats).unwrap();
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
            match Inbox::start(config, publisher.clone(), 1, Arc::default()) {
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
