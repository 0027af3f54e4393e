//! The NATS thread: a plain OS thread running the NATS client on a current-thread tokio
//! runtime (a `LocalSet`, so its state is `Rc<RefCell<..>>` and needs no locks).
//!
//! Shards and ingest reach it through [`Cluster`] (bounded queue, `try_send`: nothing on
//! a shard waits). It answers publishers over flume channels whose async receive is
//! woken from this thread through glommio's cross-thread waker, and wakes idle shards
//! after giving messages to the publisher through per-shard wake queues (the inbox's
//! pattern, [`crate::inbox::reply`]).
//!
//! Per channel it keeps two things: what it knows of the stream's last message (offset,
//! epoch, subject sequence) to publish the next one, and what it has given the local
//! publisher (`applied`), with out-of-order arrivals buffered until the hole before them
//! is filled from the stream, or skipped after [`FILL_BOUND`].

mod failover;
pub(crate) use failover::{DUPLICATE_WINDOW, RESEND_FOR};

use crate::cluster::interest::{apply as apply_interest, InterestBoard};
use crate::cluster::nats::{connect, next_job, spawn_runtime_thread, JS_TIMEOUT};
use crate::cluster::stored;
use crate::cluster::subject::encode_channel;
use crate::cluster::{ClusterSettings, ClusterStats};
use crate::fanout::publisher::Publisher;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, Stream as JsStream};
use async_nats::{Client, Event};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "join.rs"]
mod join;
pub use join::{first_to_read, JoinAnswer, JoinStats, JoinTag, SeqSearch};
use join::{JoinRequest, JoinShared, Joins};

/// Attempts of one publish when other nodes keep taking the offset (error 10071).
const MAX_TRIES: usize = 16;
/// How long a hole before buffered messages may take to fill from the stream before the
/// missing offsets are skipped (counted in `ringcast_cluster_gap_offsets_total`).
pub const FILL_BOUND: Duration = Duration::from_secs(2);
/// Joins queued for the NATS thread before subscribes are answered from local state.
const JOIN_QUEUE: u64 = 65_536;
/// How long publishes wait for NATS to come back before they are served locally: a NATS
/// server failing over (the client reconnects to another in ~100 ms) must not fork the
/// channel into a local epoch.
pub const LOCAL_AFTER: Duration = Duration::from_secs(2);

/// Who learns a publish's offset, and what the offset promises.
pub enum ClusterReply {
    /// Nobody (UDP, TCP without acks).
    None,
    /// A waiting task that takes a local-epoch offset while NATS is unreachable (HTTP
    /// without `ack=1`): the offset, or why not.
    Wait(flume::Sender<Result<u64, String>>),
    /// A waiting task told an offset only once the stream stored the message (HTTP
    /// `ack=1`, TCP `ACK ON`, a client `publish`): refused while the cluster cannot
    /// store, never served locally.
    Stored(flume::Sender<Result<u64, String>>),
}

impl ClusterReply {
    /// Nobody was promised "stored": the message may be served in a local epoch.
    fn may_serve_locally(&self) -> bool {
        !matches!(self, ClusterReply::Stored(_))
    }
}

enum Request {
    Publish {
        channel: Arc<str>,
        payload: Bytes,
        reply: ClusterReply,
        /// One of `publish_queue`: held until the publish is answered, whichever queue or
        /// worker holds it meanwhile (`ringcast_cluster_publish_queued` counts them).
        permit: Permit,
    },
    /// A subscribe waits until this node follows the channel (join.rs).
    Join(JoinRequest),
}

/// A publish's place among the `publish_queue` accepted and not yet answered.
type Permit = tokio::sync::OwnedSemaphorePermit;

/// The handle shards and ingest use to reach the NATS thread.
#[derive(Clone)]
pub struct Cluster {
    tx: flume::Sender<Request>,
    /// `publish_queue` permits: every publish holds one from acceptance to its answer.
    permits: Arc<tokio::sync::Semaphore>,
    /// `publish_queue`.
    capacity: usize,
    /// Joins (bounded by `JOIN_QUEUE`).
    interest_tx: flume::Sender<Request>,
    /// Shards' interest, coalesced per channel.
    board: Arc<InterestBoard>,
    stats: Arc<ClusterStats>,
    wakes: Vec<flume::Receiver<()>>,
    join: Arc<JoinShared>,
    join_answers: Vec<flume::Receiver<JoinAnswer>>,
}

impl Cluster {
    /// Starts the NATS thread for `shards` shards publishing through `publisher`. It
    /// connects (and keeps reconnecting) in the background: until it is connected, local
    /// publishes are served in a local epoch.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(
        settings: ClusterSettings,
        publisher: Arc<Publisher>,
        shards: usize,
    ) -> std::io::Result<Cluster> {
        let stats = Arc::new(ClusterStats::default());
        let settings_queue = settings.publish_queue;
        let permits = Arc::new(tokio::sync::Semaphore::new(settings_queue));
        // Bounded by the permits: nothing is sent here without one.
        let (tx, rx) = flume::unbounded();
        let (interest_tx, interest_rx) = flume::unbounded();
        let board = Arc::new(InterestBoard::new());
        let thread_board = board.clone();
        let (wake_txs, wakes): (Vec<_>, Vec<_>) = (0..shards).map(|_| flume::bounded(1)).unzip();
        let thread_stats = stats.clone();
        let (join, join_answers) = JoinShared::new(shards);
        let thread_join = join.clone();
        spawn_runtime_thread(
            "ringcast-nats",
            "cluster: cannot build the NATS thread's runtime; running alone",
            move || {
                run(
                    settings,
                    publisher,
                    thread_stats,
                    wake_txs,
                    Inputs {
                        requests: rx,
                        joins: interest_rx,
                        board: thread_board,
                    },
                    thread_join,
                )
            },
        )?;
        Ok(Cluster {
            tx,
            permits,
            capacity: settings_queue,
            interest_tx,
            board,
            stats,
            wakes,
            join,
            join_answers,
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.stats
    }

    /// `shard`'s wake queue: a token whenever the NATS thread published while it was idle.
    pub fn shard_wake(&self, shard: usize) -> Option<flume::Receiver<()>> {
        self.wakes.get(shard).cloned()
    }

    /// Queues a message for `channel` (validated); `reply` learns its offset.
    ///
    /// # Errors
    /// `publish_queue` publishes are waiting for JetStream, or the NATS thread is gone:
    /// nothing was queued.
    pub fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        reply: ClusterReply,
    ) -> Result<(), &'static str> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.stats.publish_refused.fetch_add(1, Relaxed);
            return Err(QUEUE_FULL);
        };
        self.send(channel, payload, reply, permit)
    }

    /// [`Cluster::publish`] that waits while `publish_queue` publishes are waiting (TCP
    /// ingest: the connection stops being read, and its sender is held back by TCP).
    ///
    /// # Errors
    /// The NATS thread is gone: nothing was queued.
    pub async fn publish_waiting(
        &self,
        channel: &str,
        payload: &[u8],
        reply: ClusterReply,
    ) -> Result<(), &'static str> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.stats.publish_refused.fetch_add(1, Relaxed);
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| NOT_RUNNING)?
            }
        };
        self.send(channel, payload, reply, permit)
    }

    fn send(
        &self,
        channel: &str,
        payload: &[u8],
        reply: ClusterReply,
        permit: Permit,
    ) -> Result<(), &'static str> {
        self.tx
            .send(Request::Publish {
                channel: Arc::from(channel),
                payload: Bytes::copy_from_slice(payload),
                reply,
                permit,
            })
            .map_err(|_| NOT_RUNNING)
    }

    /// Publishes accepted and not yet answered: the permits taken.
    pub fn publish_queued(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// A shard gained (`on`) or lost every subscriber of `channel`.
    pub fn interest(&self, channel: &str, on: bool) {
        self.board.note(channel, on);
    }
}

/// Why a publish was refused while `publish_queue` publishes wait.
const QUEUE_FULL: &str =
    "cluster: the NATS thread is behind (publish_queue publishes waiting for JetStream); retry";
/// Why a publish was refused when the NATS thread is gone.
const NOT_RUNNING: &str = "cluster: the NATS thread is not running";

/// What the thread knows about one channel.
#[derive(Default)]
struct Chan {
    /// The stream's last message as far as publishing knows: (offset, epoch, subject seq).
    stream_last: Option<(u64, u64, u64)>,
    /// Last offset given to the local publisher, and its epoch (0: none yet).
    applied: u64,
    epoch: u64,
    /// Stream sequence of the last cluster message applied (0: unknown).
    applied_seq: u64,
    /// Arrivals ahead of `applied + 1`: offset -> (seq, payload), in `epoch`.
    pending: BTreeMap<u64, (u64, Bytes)>,
    /// A fill task is running.
    filling: bool,
    /// The fill task should also read everything newer than `applied_seq` (resync).
    catch_up: bool,
    /// Published here in a local epoch while NATS was down.
    local: bool,
    /// Shards with subscribers here.
    interest: usize,
    /// When the live subscription goes, once `interest` is 0.
    linger_until: Option<Instant>,
    /// The live subscription task.
    sub: Option<tokio::task::AbortHandle>,
}

/// A channel's publish worker queue (bounded by the jobs' permits).
type JobSender = tokio::sync::mpsc::UnboundedSender<(Bytes, ClusterReply, Permit)>;

struct Node {
    settings: ClusterSettings,
    publisher: Arc<Publisher>,
    stats: Arc<ClusterStats>,
    wakes: Vec<flume::Sender<()>>,
    client: Client,
    js: async_nats::jetstream::Context,
    stream: RefCell<Option<JsStream>>,
    chans: RefCell<HashMap<Arc<str>, Chan>>,
    workers: RefCell<HashMap<Arc<str>, JobSender>>,
    /// When the connection was last lost (or the thread started, before the first one).
    down_since: Cell<Instant>,
    /// Subscribes waiting for channels to be followed (join.rs).
    joins: Joins,
    /// When the connection last came up.
    connected_since: Cell<Instant>,
    /// Counts connects: a stream-ensuring task belongs to one.
    conn_generation: Cell<u64>,
    /// Why the stream is not usable yet (empty when it is).
    ensure_error: RefCell<String>,
    /// Publish message ids (`Nats-Msg-Id`).
    msg_ids: stored::MsgIds,
}

/// What reaches the NATS thread from the shards and ingest.
struct Inputs {
    /// Publishes (each holding a `publish_queue` permit).
    requests: flume::Receiver<Request>,
    /// Joins (at most `JOIN_QUEUE`).
    joins: flume::Receiver<Request>,
    /// Interest, coalesced per channel.
    board: Arc<InterestBoard>,
}

async fn run(
    settings: ClusterSettings,
    publisher: Arc<Publisher>,
    stats: Arc<ClusterStats>,
    wakes: Vec<flume::Sender<()>>,
    inputs: Inputs,
    join: Arc<JoinShared>,
) {
    let Inputs {
        requests,
        joins,
        board,
    } = inputs;
    let (client, js, mut events) = match connect(&settings, "ringcast", "cluster").await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}; running alone");
            return;
        }
    };
    let node = Rc::new(Node {
        settings,
        publisher,
        stats,
        wakes,
        client,
        js,
        stream: RefCell::new(None),
        chans: RefCell::new(HashMap::new()),
        workers: RefCell::new(HashMap::new()),
        down_since: Cell::new(Instant::now()),
        joins: Joins::new(join),
        connected_since: Cell::new(Instant::now()),
        conn_generation: Cell::new(0),
        ensure_error: RefCell::new("not connected yet".into()),
        msg_ids: stored::MsgIds::new(),
    });
    // Presence across nodes (src/cluster/presence.rs): its own task and queue.
    tokio::task::spawn_local(crate::cluster::presence::serve(
        node.client.clone(),
        node.publisher.clone(),
        node.wakes.clone(),
    ));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut was_up = false;
    loop {
        tokio::select! {
            r = requests.recv_async() => match r {
                Ok(r) => node.clone().handle(r),
                Err(_) => return,
            },
            r = joins.recv_async() => if let Ok(r) = r { node.clone().handle(r) },
            changes = board.changes() => {
                for (channel, net) in changes {
                    node.clone().on_interest(channel, net);
                }
            }
            Some(event) = events.recv() => node.clone().on_event(event, &mut was_up).await,
            _ = tick.tick() => node.sweep_interest(),
        }
    }
}

impl Node {
    fn new_epoch(&self) -> u64 {
        self.publisher.new_epoch()
    }

    fn up(&self) -> bool {
        self.stats.up.load(Relaxed) == 1
    }

    fn stream_subject(&self, channel: &str) -> String {
        format!(
            "{}.ch.{}",
            self.settings.subject_prefix,
            encode_channel(channel)
        )
    }

    fn live_subject(&self, channel: &str) -> String {
        format!(
            "{}.live.{}",
            self.settings.subject_prefix,
            encode_channel(channel)
        )
    }

    fn handle(self: Rc<Self>, request: Request) {
        match request {
            Request::Publish {
                channel,
                payload,
                reply,
                permit,
            } => {
                let mut workers = self.workers.borrow_mut();
                let tx = workers.entry(channel.clone()).or_insert_with(|| {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::task::spawn_local(self.clone().worker(channel.clone(), rx));
                    tx
                });
                let _ = tx.send((payload, reply, permit));
            }
            Request::Join(request) => {
                self.stats.join_queued.fetch_sub(1, Relaxed);
                self.on_join(request)
            }
        }
    }

    async fn on_event(self: Rc<Self>, event: Event, was_up: &mut bool) {
        match event {
            Event::Connected => {
                // Never waits here: the stream is ensured by a task of its own, so the
                // thread keeps taking requests (publishes wait, bounded, in their worker).
                self.conn_generation.set(self.conn_generation.get() + 1);
                self.connected_since.set(Instant::now());
                self.stats.connected.store(1, Relaxed);
                let known = self.stream.borrow().is_some();
                if *was_up {
                    self.stats.reconnects.fetch_add(1, Relaxed);
                }
                *was_up = true;
                if known {
                    // The stream was ensured on an earlier connection: it is used at
                    // once (publishes ride out a leader move by re-sending, see
                    // `failover`); it is ensured again in the background.
                    self.stats.up.store(1, Relaxed);
                    tracing::info!("cluster: reconnected to NATS; cross-node delivery up");
                    self.resync();
                } else {
                    tracing::info!("cluster: connected to NATS; ensuring the stream");
                }
                tokio::task::spawn_local(
                    self.clone()
                        .ensure_until_ready(self.conn_generation.get(), !known),
                );
            }
            Event::Disconnected | Event::Closed => {
                self.conn_generation.set(self.conn_generation.get() + 1);
                self.stats.up.store(0, Relaxed);
                if self.stats.connected.swap(0, Relaxed) == 1 {
                    self.down_since.set(Instant::now());
                    tracing::warn!("cluster: NATS connection lost; local publishes are served locally (local epoch) if it stays lost for 2 s");
                }
            }
            other => tracing::debug!(event = %other, "cluster: NATS event"),
        }
    }

    /// Creates or updates the stream once (the caller retries).
    async fn ensure_stream(&self) -> Result<(), String> {
        let s = &self.settings;
        let config = StreamConfig {
            name: s.stream_name.clone(),
            subjects: vec![format!("{}.ch.>", s.subject_prefix)],
            max_messages_per_subject: i64::try_from(s.history_size).unwrap_or(i64::MAX),
            discard: DiscardPolicy::Old,
            num_replicas: s.stream_replicas,
            allow_direct: true,
            duplicate_window: failover::DUPLICATE_WINDOW,
            ..StreamConfig::default()
        };
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|e| format!("creating the stream: {e}"))?;
        let stream = self
            .js
            .get_stream(&s.stream_name)
            .await
            .map_err(|e| format!("reading the stream: {e}"))?;
        *self.stream.borrow_mut() = Some(stream);
        Ok(())
    }

    /// After a (re)connect: publishing knowledge is stale; channels with interest or
    /// local-epoch messages read what they missed from the stream.
    fn resync(self: &Rc<Self>) {
        let mut chans = self.chans.borrow_mut();
        let mut start = Vec::new();
        for (name, c) in chans.iter_mut() {
            c.stream_last = None;
            // A joining channel reads the stream itself when its join goes on.
            if (c.sub.is_some() || c.local) && !self.joining(name) {
                c.catch_up = true;
                if !c.filling {
                    c.filling = true;
                    start.push(name.clone());
                }
            }
        }
        drop(chans);
        for name in start {
            tokio::task::spawn_local(self.clone().fill(name));
        }
    }

    async fn worker(
        self: Rc<Self>,
        channel: Arc<str>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(Bytes, ClusterReply, Permit)>,
    ) {
        while let Some((payload, reply, permit)) = next_job(&mut rx, &self.workers, &channel).await
        {
            let result = self
                .publish_one(&channel, payload, reply.may_serve_locally())
                .await;
            if let ClusterReply::Wait(tx) | ClusterReply::Stored(tx) = reply {
                let _ = tx.send(result);
            }
            drop(permit);
        }
    }

    /// The stream's last message of `channel`: (offset, epoch, seq); a new epoch at 0
    /// when the subject has none.
    async fn read_last(&self, channel: &str) -> Result<(u64, u64, u64), String> {
        let stream = self
            .stream
            .borrow()
            .clone()
            .ok_or("cluster: no stream yet")?;
        let last = stored::last(&stream, &self.stream_subject(channel))
            .await
            .map_err(|e| format!("cluster: reading the channel's last message: {e}"))?;
        let Some(m) = last else {
            return Ok((0, self.new_epoch(), 0));
        };
        match m.position() {
            Some((o, e)) => Ok((o, e, m.seq)),
            None => Err(format!(
                "cluster: message {} of the stream has no ringcast offset/epoch headers",
                m.seq
            )),
        }
    }

    /// NATS is down: the message is served on this node only, in a local epoch.
    fn publish_local(&self, channel: &Arc<str>, payload: &[u8]) -> u64 {
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        if !c.local {
            c.local = true;
            c.epoch = self.new_epoch();
            c.applied = 0;
            c.pending.clear();
        }
        c.stream_last = None;
        let offset = c.applied + 1;
        self.publisher.publish_at(channel, offset, c.epoch, payload);
        c.applied = offset;
        drop(chans);
        self.stats.local_only.fetch_add(1, Relaxed);
        self.wake();
        offset
    }

    fn wake(&self) {
        let wakes = &self.wakes;
        self.publisher.idle_flags().claim_idle(|shard| {
            if let Some(tx) = wakes.get(shard) {
                let _ = tx.try_send(());
            }
        });
    }

    /// Gives one cluster message to the local publisher in offset order, once.
    fn deliver(
        self: &Rc<Self>,
        channel: &Arc<str>,
        offset: u64,
        epoch: u64,
        seq: u64,
        payload: Bytes,
        own: bool,
    ) {
        if offset == 0 {
            // An epoch marker is never a message (it is not published live either).
            return;
        }
        if self.join_intercept(channel, offset, epoch, seq, &payload, own) {
            return;
        }
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        if c.epoch != epoch {
            // First message here, a new incarnation of the channel, or the end of a
            // local epoch: start at this one.
            c.epoch = epoch;
            c.applied = offset.saturating_sub(1);
            c.pending.clear();
            c.local = false;
        }
        if offset <= c.applied {
            self.stats.duplicates.fetch_add(1, Relaxed);
            return;
        }
        if offset > c.applied + 1 {
            if c.sub.is_none() && !c.catch_up {
                // Nobody here follows the channel: no hole to fill, only the position.
                c.applied = offset - 1;
            } else {
                c.pending.insert(offset, (seq, payload));
                if !c.filling {
                    c.filling = true;
                    tokio::task::spawn_local(self.clone().fill(channel.clone()));
                }
                return;
            }
        }
        self.apply(channel, c, offset, seq, &payload, own);
        self.drain(channel, c);
        drop(chans);
        self.wake();
    }

    fn apply(&self, channel: &str, c: &mut Chan, offset: u64, seq: u64, payload: &[u8], own: bool) {
        self.publisher.publish_at(channel, offset, c.epoch, payload);
        c.applied = offset;
        c.applied_seq = c.applied_seq.max(seq);
        if !own {
            self.stats.received.fetch_add(1, Relaxed);
        }
    }

    /// Applies buffered messages that are next in order.
    fn drain(&self, channel: &str, c: &mut Chan) {
        while let Some((&offset, _)) = c.pending.first_key_value() {
            if offset > c.applied + 1 {
                break;
            }
            let Some((seq, payload)) = c.pending.remove(&offset) else {
                break;
            };
            if offset <= c.applied {
                self.stats.duplicates.fetch_add(1, Relaxed);
                continue;
            }
            self.apply(channel, c, offset, seq, &payload, false);
        }
    }

    /// Skips the hole before the first buffered message (it cannot be read back).
    fn skip_hole(&self, channel: &str, c: &mut Chan) {
        if let Some((&first, _)) = c.pending.first_key_value() {
            if first > c.applied + 1 {
                let missing = first - c.applied - 1;
                self.stats.gap_offsets.fetch_add(missing, Relaxed);
                tracing::warn!(channel, from = c.applied + 1, count = missing, "cluster: offsets could not be read back from the stream; subscribers see the jump");
                c.applied = first - 1;
            }
            self.drain(channel, c);
        }
    }

    /// Reads `channel`'s messages after the last applied one from the stream until the
    /// buffered ones follow on (and, for a resync, until the stream has no newer one).
    async fn fill(self: Rc<Self>, channel: Arc<str>) {
        let started = Instant::now();
        let subject = self.stream_subject(&channel);
        let mut cursor = {
            let chans = self.chans.borrow();
            chans.get(&channel).map_or(1, |c| c.applied_seq + 1)
        };
        loop {
            {
                let mut chans = self.chans.borrow_mut();
                let Some(c) = chans.get_mut(&channel) else {
                    return;
                };
                if c.pending.is_empty() && !c.catch_up {
                    c.filling = false;
                    return;
                }
                if started.elapsed() > FILL_BOUND && !c.pending.is_empty() {
                    self.skip_hole(&channel, c);
                    drop(chans);
                    self.wake();
                    continue;
                }
            }
            if !self.up() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let stream = self.stream.borrow().clone();
            let Some(stream) = stream else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match stored::next(&stream, &subject, cursor).await {
                Ok(Some(m)) => {
                    cursor = m.seq + 1;
                    self.stats.fetched.fetch_add(1, Relaxed);
                    let Some((offset, epoch)) = m.position() else {
                        continue;
                    };
                    if offset == 0 {
                        // An epoch marker (join.rs): not a message.
                        continue;
                    }
                    let mut chans = self.chans.borrow_mut();
                    let Some(c) = chans.get_mut(&channel) else {
                        return;
                    };
                    if c.epoch != epoch || offset > c.applied + 1 {
                        if c.epoch == epoch && !c.local {
                            // The messages between were discarded from the stream.
                            c.pending.insert(offset, (m.seq, m.payload));
                            self.skip_hole(&channel, c);
                            drop(chans);
                            self.wake();
                            continue;
                        }
                        drop(chans);
                        self.deliver(&channel, offset, epoch, m.seq, m.payload, false);
                        continue;
                    }
                    if offset <= c.applied {
                        continue;
                    }
                    self.apply(&channel, c, offset, m.seq, &m.payload, false);
                    self.drain(&channel, c);
                    drop(chans);
                    self.wake();
                }
                Ok(None) => {
                    let mut chans = self.chans.borrow_mut();
                    let Some(c) = chans.get_mut(&channel) else {
                        return;
                    };
                    c.catch_up = false;
                    // Nothing newer in the stream: what is buffered is ahead of it.
                    self.skip_hole(&channel, c);
                    drop(chans);
                    self.wake();
                }
                Err(e) => {
                    tracing::debug!(error = %e, channel = %channel, "cluster: reading back from the stream");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// `net`: how many more (or fewer) shards have subscribers of `channel`.
    fn on_interest(self: Rc<Self>, channel: Arc<str>, net: i64) {
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        c.interest = apply_interest(c.interest, net);
        if c.interest == 0 {
            if net < 0 {
                c.linger_until = Some(Instant::now() + self.settings.interest_linger);
            }
            return;
        }
        c.linger_until = None;
        if c.sub.is_some() {
            return;
        }
        drop(chans);
        // Subscribed, then joined (join.rs): the position is the stream's, nothing lost.
        self.start_follow(channel);
    }

    /// Ends live subscriptions whose linger passed; forgets idle channel state.
    fn sweep_interest(&self) {
        let now = Instant::now();
        let workers = self.workers.borrow();
        self.chans.borrow_mut().retain(|name, c| {
            if c.interest == 0 && c.linger_until.is_some_and(|t| t <= now) && !self.joining(name) {
                c.linger_until = None;
                if let Some(sub) = c.sub.take() {
                    sub.abort();
                    self.stats.subscriptions.fetch_sub(1, Relaxed);
                    self.unfollowed(name);
                }
            }
            c.sub.is_some()
                || c.interest > 0
                || c.filling
                || c.local
                || !c.pending.is_empty()
                || workers.contains_key(name)
        });
    }
}
