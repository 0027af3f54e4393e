//! The inbox across the cluster (docs/cluster.md, "Inbox"): with `[cluster]` and
//! `inbox = true`, `user:<id>` channels are stored in JetStream instead of the node's
//! redb file, so any node can take a user's publishes, subscribes and acks.
//!
//! It is the second backend behind the shard-facing [`Inbox`] handle: the same requests
//! (publish / ack / read), the same answers on the same per-shard queues, so the shards
//! do not know which backend runs. It runs on its own OS thread (`ringcast-inbox-js`)
//! with its own `async-nats` client on a current-thread tokio runtime, beside the
//! cluster's NATS thread (which it does not touch).
//!
//! Storage (two streams):
//! - `<stream_name>_INBOX` over `<prefix>.inbox.<enc>`: the messages, with the
//!   `Ringcast-Offset` and `Ringcast-Epoch` headers, written with
//!   `Nats-Expected-Last-Subject-Sequence` (retried on 10071) exactly as channel
//!   messages are, so offsets are one order for every node. `max_age` = `inbox_retention`.
//! - `<stream_name>_INACK` over `<prefix>.inack.<enc>`, one message per subject, no age
//!   limit: the user's ack record (`Ringcast-Acked`, plus the channel's last offset and
//!   epoch when it was written). Acked messages are purged from the inbox stream (purge
//!   with a subject filter and a sequence bound); when every message is acked (or
//!   expired) the subject is empty and the next offset continues from the ack record.
//!
//! Per channel, requests run one at a time in arrival order (a worker task per channel),
//! so one node's publishes, acks and reads of a user keep their order.
//!
//! Live delivery: after JetStream acknowledged a message, the storing node gives it to
//! its own publisher and publishes it on core NATS `<prefix>.inlive.<enc>`. Nodes with
//! local subscribers of the user's channel (the shards' interest, routed here by
//! [`crate::cluster::interest`]) subscribe to that subject and give messages to their publisher in offset
//! order, once; a hole is read back from the stream (acked, purged messages are skipped:
//! they are acked). A read (a subscribe) gives the local publisher every unacked message
//! it has not seen before answering, so the shard's attach (src/shard/inbox.rs) finds
//! every offset up to the answer's last one already in the ring, as with the redb store.

mod live;
pub mod record;

use record::AckRecord;
mod write;

use crate::cluster::interest::{self, InterestBoard};
use crate::cluster::nats::{connect, next_job, spawn_runtime_thread};
use crate::cluster::stored;
use crate::cluster::subject::encode_channel;
use crate::cluster::thread::DUPLICATE_WINDOW;
use crate::cluster::ClusterSettings;
use crate::fanout::publisher::Publisher;
use crate::inbox::handle::{Inbox, InboxConfig, Request};
use crate::inbox::reply::{Outcome, ReplyPath, ShardQueues};
use crate::inbox::{ErrorKind, InboxStats, StoreError, USER_PREFIX};
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, Stream as JsStream};
use async_nats::{Client, Event};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Attempts of one write when another node wrote the subject first (error 10071).
const MAX_TRIES: usize = 16;

/// Builds the JetStream backend: the [`Inbox`] handle and each shard's queues. Nothing
/// connects here; the thread connects (and reconnects) in the background and answers
/// `inbox: ...` errors (503) while NATS is unreachable.
///
/// # Errors
/// The thread cannot be spawned.
pub fn start(
    settings: ClusterSettings,
    config: InboxConfig,
    publisher: Arc<Publisher>,
    shards: usize,
    stats: Arc<InboxStats>,
) -> Result<(Inbox, Vec<ShardQueues>), StoreError> {
    let (tx, rx) = flume::bounded(config.queue);
    let (replies, queues) = ReplyPath::new(shards);
    let board = Arc::new(InterestBoard::new());
    interest::route_prefix(USER_PREFIX, board.clone());
    let name = PathBuf::from(format!("jetstream:{}_INBOX", settings.stream_name));
    let thread_stats = stats.clone();
    spawn_runtime_thread(
        "ringcast-inbox-js",
        "cluster inbox: cannot build its runtime; user channels get errors",
        move || {
            let parts = Parts {
                settings,
                retention: config.retention,
                queue: config.queue,
                publisher,
                stats: thread_stats,
                replies,
            };
            run(parts, rx, board)
        },
    )
    .map_err(|e| StoreError::from_io(&e).context("spawning the cluster inbox thread"))?;
    Ok((Inbox::new(tx, stats, name, None), queues))
}

struct Parts {
    settings: ClusterSettings,
    retention: Duration,
    /// `inbox_queue`: requests taken from the queue and not yet answered, at most (so
    /// the queue, not the per-channel workers, holds the rest, and fills).
    queue: usize,
    publisher: Arc<Publisher>,
    stats: Arc<InboxStats>,
    /// Where answers and wake-ups go.
    replies: ReplyPath,
}

/// What this node knows of one user channel.
#[derive(Default)]
struct Chan {
    /// Last offset given to the local publisher, its epoch and stream sequence.
    applied: u64,
    epoch: u64,
    applied_seq: u64,
    /// The stream's last message as far as publishing knows: (offset, epoch, seq).
    stream_last: Option<(u64, u64, u64)>,
    /// Shards with subscribers here.
    interest: usize,
    linger_until: Option<Instant>,
    /// The live subscription task.
    sub: Option<tokio::task::AbortHandle>,
}

struct Node {
    parts: Parts,
    client: Client,
    js: async_nats::jetstream::Context,
    streams: RefCell<Option<(JsStream, JsStream)>>,
    chans: RefCell<HashMap<Arc<str>, Chan>>,
    workers: RefCell<HashMap<Arc<str>, tokio::sync::mpsc::UnboundedSender<Request>>>,
    /// Publish message ids (`Nats-Msg-Id`).
    msg_ids: stored::MsgIds,
    /// The highest inbox stream sequence this node has seen (a floor for records, see
    /// [`reopen`]).
    observed: Cell<u64>,
    /// Requests taken from the queue and not yet answered (at most `Parts::queue`).
    taken: Cell<usize>,
    /// Signalled when a taken request is answered.
    answered: tokio::sync::Notify,
}

/// Where a publish goes, as read from the streams.
enum Position {
    /// After the subject's last message (or the cached one): (offset, epoch, seq).
    After(u64, u64, u64),
    /// The subject is empty: the ack record and its subject sequence, if any.
    Empty(Option<(AckRecord, u64)>),
}

fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::new(ErrorKind::Unavailable, what.to_string())
}

fn js_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::new(ErrorKind::Io, format!("JetStream: {what}: {e}"))
}

fn record_races() -> StoreError {
    StoreError::new(
        ErrorKind::Overloaded,
        format!("other nodes wrote the ack record {MAX_TRIES} times in a row; retry"),
    )
}

fn offset_races() -> StoreError {
    StoreError::new(
        ErrorKind::Overloaded,
        format!("other nodes took the next offset {MAX_TRIES} times in a row; retry"),
    )
}

async fn run(parts: Parts, requests: flume::Receiver<Request>, board: Arc<InterestBoard>) {
    let (client, js, mut events) =
        match connect(&parts.settings, "ringcast-inbox", "cluster inbox").await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}; user channels get errors");
                return fail_forever(&parts, requests).await;
            }
        };
    let node = Rc::new(Node {
        parts,
        client,
        js,
        streams: RefCell::new(None),
        chans: RefCell::new(HashMap::new()),
        workers: RefCell::new(HashMap::new()),
        msg_ids: stored::MsgIds::new(),
        observed: Cell::new(0),
        taken: Cell::new(0),
        answered: tokio::sync::Notify::new(),
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // Requests stay in the bounded queue while `queue` are being worked on: the
        // queue fills and new ones are refused (or wait, on TCP ingest).
        let room = node.taken.get() < node.parts.queue;
        tokio::select! {
            r = requests.recv_async(), if room => match r {
                Ok(r) => {
                    node.taken.set(node.taken.get() + 1);
                    node.clone().dispatch(r);
                }
                Err(_) => return,
            },
            _ = node.answered.notified(), if !room => {}
            changes = board.changes() => {
                for (channel, net) in changes {
                    node.clone().on_interest(channel, net);
                }
            }
            Some(event) = events.recv() => node.on_event(event).await,
            _ = tick.tick() => node.sweep(),
        }
    }
}

/// Answers every request with an error (the backend cannot start).
async fn fail_forever(parts: &Parts, requests: flume::Receiver<Request>) {
    let e = unavailable("the cluster inbox cannot connect to NATS (see the log)");
    while let Ok(r) = requests.recv_async().await {
        parts.stats.queued.fetch_sub(1, Relaxed);
        parts.stats.errors[e.kind as usize].fetch_add(1, Relaxed);
        parts.replies.answer(r, Err(e.clone()));
    }
}

fn channel_of(r: &Request) -> Arc<str> {
    match r {
        Request::Publish { channel, .. }
        | Request::Ack { channel, .. }
        | Request::Read { channel, .. } => channel.clone(),
    }
}

impl Node {
    fn up(&self) -> bool {
        self.parts.stats.up.load(Relaxed) == 1
    }

    fn new_epoch(&self) -> u64 {
        self.parts.publisher.new_epoch()
    }

    /// Notes an inbox stream sequence seen.
    fn observe(&self, seq: u64) {
        self.observed.set(self.observed.get().max(seq));
    }

    fn subject(&self, kind: &str, channel: &str) -> String {
        format!(
            "{}.{kind}.{}",
            self.parts.settings.subject_prefix,
            encode_channel(channel)
        )
    }

    fn streams(&self) -> Result<(JsStream, JsStream), StoreError> {
        if !self.up() {
            return Err(unavailable(
                "NATS is unreachable: the cluster inbox cannot be reached; retry later",
            ));
        }
        self.streams
            .borrow()
            .clone()
            .ok_or_else(|| unavailable("the inbox streams are not ready yet; retry later"))
    }

    async fn on_event(&self, event: Event) {
        match event {
            Event::Connected => {
                if self.ensure_streams().await {
                    self.parts.stats.up.store(1, Relaxed);
                    tracing::info!("cluster inbox: connected; user inboxes are in JetStream");
                    for c in self.chans.borrow_mut().values_mut() {
                        c.stream_last = None;
                    }
                }
            }
            Event::Disconnected | Event::Closed => {
                if self.parts.stats.up.swap(0, Relaxed) == 1 {
                    tracing::warn!("cluster inbox: NATS connection lost; user channel publishes, subscribes and acks get 503 until it returns");
                }
            }
            other => tracing::debug!(event = %other, "cluster inbox: NATS event"),
        }
    }

    async fn ensure_streams(&self) -> bool {
        let s = &self.parts.settings;
        let inbox = StreamConfig {
            name: format!("{}_INBOX", s.stream_name),
            subjects: vec![format!("{}.inbox.>", s.subject_prefix)],
            max_age: self.parts.retention,
            discard: DiscardPolicy::Old,
            num_replicas: s.stream_replicas,
            allow_direct: true,
            // JetStream refuses a duplicate window longer than the age limit.
            duplicate_window: DUPLICATE_WINDOW.min(self.parts.retention),
            ..StreamConfig::default()
        };
        let acks = StreamConfig {
            name: format!("{}_INACK", s.stream_name),
            subjects: vec![format!("{}.inack.>", s.subject_prefix)],
            max_messages_per_subject: 1,
            discard: DiscardPolicy::Old,
            num_replicas: s.stream_replicas,
            allow_direct: true,
            ..StreamConfig::default()
        };
        // A clustered JetStream may still be electing its meta leader: ~30 s of tries.
        for _ in 0..60 {
            let mut got = Vec::new();
            for config in [&inbox, &acks] {
                match self.js.create_or_update_stream(config.clone()).await {
                    Ok(_) => match self.js.get_stream(&config.name).await {
                        Ok(stream) => got.push(stream),
                        Err(e) => tracing::warn!(error = %e, "cluster inbox: reading a stream"),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, stream = %config.name, "cluster inbox: creating the stream")
                    }
                }
            }
            if let (Some(a), Some(b)) = (got.first(), got.get(1)) {
                self.observe(a.cached_info().state.last_sequence);
                *self.streams.borrow_mut() = Some((a.clone(), b.clone()));
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    fn dispatch(self: Rc<Self>, request: Request) {
        let channel = channel_of(&request);
        let mut workers = self.workers.borrow_mut();
        let tx = workers.entry(channel.clone()).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::task::spawn_local(self.clone().worker(channel.clone(), rx));
            tx
        });
        let _ = tx.send(request);
    }

    async fn worker(
        self: Rc<Self>,
        channel: Arc<str>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Request>,
    ) {
        while let Some(request) = next_job(&mut rx, &self.workers, &channel).await {
            let outcome = match &request {
                Request::Publish { payload, .. } => {
                    let started = Instant::now();
                    let r = self.publish(&channel, payload.clone()).await;
                    if r.is_ok() {
                        self.parts
                            .stats
                            .commit_latency
                            .record(started.elapsed().as_micros() as u64);
                        self.parts.stats.commits.fetch_add(1, Relaxed);
                        self.parts.stats.stored.fetch_add(1, Relaxed);
                    }
                    r.map(Outcome::Published)
                }
                Request::Ack { upto, .. } => self.ack(&channel, *upto).await.map(Outcome::Acked),
                Request::Read { .. } => self.read(&channel).await.map(Outcome::Read),
            };
            if let Err(e) = &outcome {
                self.parts.stats.errors[e.kind as usize].fetch_add(1, Relaxed);
                tracing::debug!(error = %e, channel = %channel, "cluster inbox: request failed");
            }
            self.parts.replies.answer(request, outcome);
            self.parts.stats.queued.fetch_sub(1, Relaxed);
            self.taken.set(self.taken.get() - 1);
            self.answered.notify_one();
        }
    }
}
