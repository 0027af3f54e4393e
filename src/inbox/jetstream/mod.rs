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

use crate::cluster::interest::{self, apply as apply_interest, InterestBoard};
use crate::cluster::nats::{connect, next_job, spawn_runtime_thread};
use crate::cluster::stored;
use crate::cluster::subject::{encode_channel, parse_u64, EPOCH_HEADER, OFFSET_HEADER};
use crate::cluster::thread::{DUPLICATE_WINDOW, RESEND_FOR};
use crate::cluster::ClusterSettings;
use crate::fanout::publisher::Publisher;
use crate::inbox::handle::{Inbox, InboxConfig, Request};
use crate::inbox::reply::{Backlog, Outcome, ReplyPath, ShardQueues, MAX_DELIVERY};
use crate::inbox::{ErrorKind, InboxStats, StoreError, USER_PREFIX};
use crate::proto::message::{encode_message, EncodedData};
use async_nats::jetstream::stream::{
    Config as StreamConfig, DirectGetErrorKind, DiscardPolicy, Stream as JsStream,
};
use async_nats::{Client, Event, HeaderMap};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Header of an ack record: the user acked every offset up to this one.
pub const ACKED_HEADER: &str = "Ringcast-Acked";

/// Header of an ack record: a stream sequence below every message stored past the
/// record's last offset (see [`AckRecord::floor`]).
pub const FLOOR_HEADER: &str = "Ringcast-Floor";

/// Attempts of one write when another node wrote the subject first (error 10071).
const MAX_TRIES: usize = 16;

/// An ack record as stored: acked up to `acked`; the channel's last offset and epoch
/// when it was written.
///
/// The record is what a user channel's offsets continue from once its inbox subject is
/// empty (everything acked, or expired by `inbox_retention`). Two cases differ:
/// - `acked == last`: everything up to `last` was acked and nothing was stored past it
///   (a publish into an empty subject raises `last` first, see [`reopen`]), so the next
///   offset is `last + 1`;
/// - `acked < last`: messages past `acked` were stored and are gone unacked (expired);
///   how far they reached is not known, but each took a stream sequence above `floor`,
///   so the next offset skips past `last + (stream's last sequence - floor)`. Offsets
///   never repeat, and a client resuming from one of the expired offsets is told it
///   missed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRecord {
    /// Every offset up to this one is acked.
    pub acked: u64,
    /// The channel's last offset then.
    pub last: u64,
    /// The channel's epoch.
    pub epoch: u64,
    /// A stream sequence of the inbox stream below every message of this channel with an
    /// offset past `last` (0 in records written before it existed: then a skip is as
    /// long as the stream).
    pub floor: u64,
}

impl AckRecord {
    /// The record's headers.
    pub fn to_headers(self) -> [(&'static str, String); 4] {
        [
            (ACKED_HEADER, self.acked.to_string()),
            (OFFSET_HEADER, self.last.to_string()),
            (EPOCH_HEADER, self.epoch.to_string()),
            (FLOOR_HEADER, self.floor.to_string()),
        ]
    }

    /// Parses a record from header values; `None` when one is missing or malformed, or
    /// the record is inconsistent (acked past the last offset, epoch 0). A missing floor
    /// is 0.
    pub fn parse(
        acked: Option<&str>,
        last: Option<&str>,
        epoch: Option<&str>,
        floor: Option<&str>,
    ) -> Option<Self> {
        let r = AckRecord {
            acked: parse_u64(acked)?,
            last: parse_u64(last)?,
            epoch: parse_u64(epoch)?,
            floor: match floor {
                None => 0,
                some => parse_u64(some)?,
            },
        };
        (r.acked <= r.last && r.epoch != 0).then_some(r)
    }

    /// True when nothing was stored past `last`: an empty subject then continues at
    /// `last + 1`.
    pub fn complete(self) -> bool {
        self.acked == self.last
    }
}

/// What an ack of `upto` does, given the ack record's `acked` and the channel's `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPlan {
    /// Beyond the channel's last offset: refused with it.
    Ahead(u64),
    /// Already acked: nothing removed.
    Nothing,
    /// Removes the messages in `(from, upto]`.
    Remove {
        /// The previous ack position.
        from: u64,
        /// The new one.
        upto: u64,
    },
}

/// Decides an ack (sans-io).
pub fn plan_ack(acked: u64, last: u64, upto: u64) -> AckPlan {
    if upto > last {
        AckPlan::Ahead(last)
    } else if upto <= acked {
        AckPlan::Nothing
    } else {
        AckPlan::Remove { from: acked, upto }
    }
}

/// Decides an ack when the inbox subject is empty (sans-io): nothing is left to
/// remove, so nothing is written. With a complete record an offset past its last is
/// refused as usual; with an incomplete one (messages expired unacked) the client may
/// have seen offsets past it, so the ack removes nothing instead.
pub fn plan_ack_on_empty(record: Option<AckRecord>, upto: u64) -> AckPlan {
    match record {
        Some(r) if r.complete() && upto > r.last => AckPlan::Ahead(r.last),
        None if upto > 0 => AckPlan::Ahead(0),
        _ => AckPlan::Nothing,
    }
}

/// Where the next message of a channel goes: the last message in the stream if any, else
/// the ack record's position (the subject was emptied by acks or retention), else a new
/// channel (offset 0, epoch to choose). Returns (last offset, epoch or 0, expected
/// subject sequence).
pub fn next_position(last: Option<(u64, u64, u64)>, record: Option<AckRecord>) -> (u64, u64, u64) {
    match (last, record) {
        (Some((o, e, s)), Some(r)) if r.epoch == e => (o.max(r.last), e, s),
        (Some(l), _) => l,
        (None, Some(r)) => (r.last, r.epoch, 0),
        (None, None) => (0, 0, 0),
    }
}

/// The record a publish into an empty inbox subject writes before its message, whose
/// offset is the new record's `last` (sans-io).
///
/// - No record: a channel never written; offset 1 in `new_epoch`.
/// - A complete record: offset `last + 1`.
/// - An incomplete one (messages past `acked` expired unacked): every offset they may
///   have had is skipped, at most one per stream sequence since the record's floor
///   (`stream_last` is the inbox stream's last sequence now); the skipped offsets count
///   as acked.
///
/// `observed` is a stream sequence already seen: the message to come, and every later
/// one of the channel, will be stored above it, so it is the new record's floor.
pub fn reopen(
    record: Option<AckRecord>,
    stream_last: u64,
    observed: u64,
    new_epoch: u64,
) -> AckRecord {
    match record {
        None => AckRecord {
            acked: 0,
            last: 1,
            epoch: new_epoch,
            floor: observed,
        },
        Some(r) if r.complete() => AckRecord {
            acked: r.acked,
            last: r.last + 1,
            epoch: r.epoch,
            floor: observed.max(r.floor),
        },
        Some(r) => {
            let next = r.last + stream_last.saturating_sub(r.floor) + 1;
            AckRecord {
                acked: next - 1,
                last: next,
                epoch: r.epoch,
                floor: observed.max(stream_last),
            }
        }
    }
}

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

    /// The channel's last stored message: (offset, epoch, seq).
    async fn read_last(
        &self,
        inbox: &JsStream,
        channel: &str,
    ) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let last = stored::last(inbox, &self.subject("inbox", channel))
            .await
            .map_err(|e| js_error("reading the inbox's last message", e))?;
        let Some(m) = last else {
            return Ok(None);
        };
        self.observe(m.seq);
        match m.position() {
            Some((o, e)) => Ok(Some((o, e, m.seq))),
            None => Err(js_error(
                "reading the inbox",
                format!("message {} has no ringcast headers", m.seq),
            )),
        }
    }

    /// The ack record and its subject sequence.
    async fn read_record(
        &self,
        acks: &JsStream,
        channel: &str,
    ) -> Result<Option<(AckRecord, u64)>, StoreError> {
        match acks
            .direct_get_last_for_subject(self.subject("inack", channel))
            .await
        {
            Ok(m) => {
                let h = |k: &str| m.headers.get(k).map(|v| v.as_str().to_string());
                let (a, l, e, f) = (
                    h(ACKED_HEADER),
                    h(OFFSET_HEADER),
                    h(EPOCH_HEADER),
                    h(FLOOR_HEADER),
                );
                AckRecord::parse(a.as_deref(), l.as_deref(), e.as_deref(), f.as_deref())
                    .map(|r| Some((r, m.sequence)))
                    .ok_or_else(|| js_error("reading an ack record", "malformed headers"))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(js_error("reading the ack record", e)),
        }
    }

    /// Writes an ack record expecting the record subject at `seq`: the record's new
    /// subject sequence, or `None` when another node wrote it first (10071).
    async fn write_record(
        &self,
        channel: &str,
        record: AckRecord,
        seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut headers = HeaderMap::new();
        for (k, v) in record.to_headers() {
            headers.insert(k, v.as_str());
        }
        let subject = self.subject("inack", channel);
        stored::store_expecting(&self.js, subject, headers, Bytes::new(), seq)
            .await
            .map_err(|e| js_error("writing the ack record", e))
    }

    /// Where the next message of `channel` goes: after the subject's last message
    /// (cached from the last write, or read), or into an empty subject.
    async fn publish_position(
        &self,
        inbox: &JsStream,
        acks: &JsStream,
        channel: &Arc<str>,
    ) -> Result<Position, StoreError> {
        if let Some((o, e, s)) = self.chans.borrow().get(channel).and_then(|c| c.stream_last) {
            return Ok(Position::After(o, e, s));
        }
        let last = self.read_last(inbox, channel).await?;
        let record = self.read_record(acks, channel).await?;
        Ok(match last {
            Some(_) => {
                let (o, e, s) = next_position(last, record.map(|r| r.0));
                Position::After(o, e, s)
            }
            None => Position::Empty(record),
        })
    }

    /// Before the first message into an empty subject: writes the record [`reopen`]
    /// decides and returns where the message goes (last offset, epoch, expected subject
    /// sequence 0); `None` when another node wrote the record first.
    async fn reopen(
        &self,
        inbox: &JsStream,
        channel: &Arc<str>,
        record: Option<(AckRecord, u64)>,
    ) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let stream_last = match record {
            Some((r, _)) if !r.complete() => {
                let info = inbox
                    .get_info()
                    .await
                    .map_err(|e| js_error("reading the inbox stream's last sequence", e))?;
                info.state.last_sequence
            }
            _ => 0,
        };
        self.observe(stream_last);
        // An epoch is drawn only for a channel never written.
        let new_epoch = if record.is_none() {
            self.new_epoch()
        } else {
            0
        };
        let next = reopen(
            record.map(|r| r.0),
            stream_last,
            self.observed.get(),
            new_epoch,
        );
        let written = self
            .write_record(channel, next, record.map_or(0, |r| r.1))
            .await?;
        if written.is_none() {
            return Ok(None);
        }
        if let Some((r, _)) = record.filter(|(r, _)| !r.complete()) {
            self.parts.stats.offset_skips.fetch_add(1, Relaxed);
            tracing::info!(
                channel = %channel,
                expired_after = r.acked,
                next = next.last,
                "cluster inbox: unacked messages expired from an emptied user channel; its offsets continue past every offset they may have had"
            );
        }
        Ok(Some((next.last - 1, next.epoch, 0)))
    }

    fn forget_last(&self, channel: &Arc<str>) {
        if let Some(c) = self.chans.borrow_mut().get_mut(channel) {
            c.stream_last = None;
        }
    }

    /// Stores one message with the user channel's next offset and `Nats-Msg-Id`, then
    /// delivers it locally and publishes it live. Lost races (10071) read the last
    /// message again; an unknown outcome (ack timeout, no responders, the connection
    /// lost after the send) is sent again with the same id for up to [`RESEND_FOR`], and
    /// the stream answers a copy of a stored message `duplicate` with the stored copy's
    /// sequence: stored, answered and delivered once (docs/cluster.md, *Inbox*).
    async fn publish(
        self: &Rc<Self>,
        channel: &Arc<str>,
        payload: Bytes,
    ) -> Result<u64, StoreError> {
        let msg_id = self.msg_ids.next();
        let deadline = Instant::now() + RESEND_FOR;
        let mut sent = false;
        let mut races = 0;
        loop {
            let retry = sent && Instant::now() < deadline;
            let streams = match self.streams() {
                // A copy may be stored: wait for the connection, then send it again.
                Err(_) if retry => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) if sent => {
                    return Err(unavailable(
                        "NATS is unreachable: the connection was lost before JetStream \
                         acknowledged; the message may be stored: retry",
                    ))
                }
                other => other?,
            };
            let (inbox, acks) = streams;
            let position = match self.publish_position(&inbox, &acks, channel).await {
                Ok(Position::After(o, e, s)) => Ok(Some((o, e, s))),
                Ok(Position::Empty(record)) => self.reopen(&inbox, channel, record).await,
                Err(e) => Err(e),
            };
            let (last, epoch, seq) = match position {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Another node wrote the record first: read both again.
                    races += 1;
                    if races >= MAX_TRIES {
                        return Err(offset_races());
                    }
                    continue;
                }
                Err(e) if retry => {
                    tracing::debug!(error = %e, channel = %channel, "cluster inbox: reading the last message; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let epoch = if epoch == 0 { self.new_epoch() } else { epoch };
            let offset = last + 1;
            let subject = self.subject("inbox", channel);
            let headers = stored::headers(offset, epoch, None);
            sent = true;
            let ack = match stored::store_once(
                &self.js,
                subject,
                headers,
                payload.clone(),
                seq,
                &msg_id,
            )
            .await
            {
                Ok(Some(ack)) => ack,
                Ok(None) => {
                    // Another node took the offset, or an earlier copy of this message
                    // did: read the last one again (the copy then comes back duplicate).
                    self.forget_last(channel);
                    races += 1;
                    if races >= MAX_TRIES {
                        return Err(offset_races());
                    }
                    continue;
                }
                Err(e) if stored::transient(e.kind()) && Instant::now() < deadline => {
                    // Unknown outcome: the same message id again (the stream dedupes).
                    self.parts.stats.resent.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, channel = %channel, "cluster inbox: publish unacknowledged; sending it again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => {
                    self.forget_last(channel);
                    return Err(js_error("storing the message", e));
                }
            };
            let (offset, epoch) = if ack.duplicate {
                self.parts.stats.deduped.fetch_add(1, Relaxed);
                self.forget_last(channel);
                let read = (last, epoch, seq);
                stored::duplicate_position(&inbox, ack.sequence, read, (offset, epoch), races)
                    .await
                    .ok_or_else(|| {
                        js_error(
                            "reading back a stored message",
                            format!(
                                "stored at stream sequence {}, but its offset could not be read",
                                ack.sequence
                            ),
                        )
                    })?
            } else {
                self.observe(ack.sequence);
                self.chans
                    .borrow_mut()
                    .entry(channel.clone())
                    .or_default()
                    .stream_last = Some((offset, epoch, ack.sequence));
                (offset, epoch)
            };
            // At or below the applied offset (a copy already read back): dropped there.
            self.deliver(channel, offset, epoch, ack.sequence, payload.clone())
                .await;
            let headers = stored::headers(offset, epoch, Some(ack.sequence));
            // Live delivery to the other nodes is best effort: a node that misses it
            // reads the message back (hole fill, or the subscribe's read).
            let _ = self
                .client
                .publish_with_headers(self.subject("inlive", channel), headers, payload)
                .await;
            return Ok(offset);
        }
    }

    async fn ack(
        self: &Rc<Self>,
        channel: &Arc<str>,
        upto: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let subject = self.subject("inbox", channel);
        for _ in 0..MAX_TRIES {
            let (inbox, acks) = self.streams()?;
            let last = self.read_last(&inbox, channel).await?;
            let record = self.read_record(&acks, channel).await?;
            let Some((_, _, stored_seq)) = last else {
                // Nothing left to remove, and nothing to write (see plan_ack_on_empty).
                return match plan_ack_on_empty(record.map(|r| r.0), upto) {
                    AckPlan::Ahead(last) => Ok(Err(last)),
                    _ => {
                        self.parts.stats.acks.fetch_add(1, Relaxed);
                        Ok(Ok(0))
                    }
                };
            };
            let (last_offset, epoch, last_seq) = next_position(last, record.map(|r| r.0));
            let acked = record.map_or(0, |r| r.0.acked);
            let (from, upto) = match plan_ack(acked, last_offset, upto) {
                AckPlan::Ahead(last) => return Ok(Err(last)),
                AckPlan::Nothing => {
                    self.parts.stats.acks.fetch_add(1, Relaxed);
                    return Ok(Ok(0));
                }
                AckPlan::Remove { from, upto } => (from, upto),
            };
            // Count what goes and find the first sequence that stays.
            let mut removed = 0;
            let mut bound = last_seq + 1;
            let mut cursor = 1;
            while let Some(m) = stored::next(&inbox, &subject, cursor)
                .await
                .map_err(|e| js_error("reading the inbox", e))?
            {
                let offset = m.offset.unwrap_or(0);
                if offset > upto {
                    bound = m.seq;
                    break;
                }
                if offset > from {
                    removed += 1;
                }
                cursor = m.seq + 1;
            }
            let record_seq = record.map_or(0, |r| r.1);
            let new = AckRecord {
                acked: upto,
                last: last_offset,
                epoch: if epoch == 0 { self.new_epoch() } else { epoch },
                // Messages past the last one read are stored above it.
                floor: record.map_or(0, |r| r.0.floor).max(stored_seq),
            };
            let Some(written) = self.write_record(channel, new, record_seq).await? else {
                continue; // Another node acked (or created the record) meanwhile.
            };
            if bound > 1 {
                if let Err(e) = inbox.purge().filter(subject.clone()).sequence(bound).await {
                    // The ack is durable; the next ack purges these too.
                    tracing::warn!(error = %e, channel = %channel, "cluster inbox: purging acked messages");
                }
            }
            if new.complete() {
                self.recheck_complete(&inbox, &acks, channel, new, written)
                    .await?;
            }
            if let Some(c) = self.chans.borrow_mut().get_mut(channel) {
                c.stream_last = None;
            }
            self.parts.stats.acks.fetch_add(1, Relaxed);
            self.parts.stats.acked.fetch_add(removed, Relaxed);
            return Ok(Ok(removed));
        }
        Err(record_races())
    }

    /// A complete record (everything acked up to the last offset read) claims that
    /// nothing was stored past its last offset; a publish from another node may have
    /// landed after the read, above the purge bound. Reads the subject again and, when
    /// it holds such a message, rewrites the record as incomplete (its last offset that
    /// message's), so an expiry of it later cannot make its offset come back.
    async fn recheck_complete(
        &self,
        inbox: &JsStream,
        acks: &JsStream,
        channel: &Arc<str>,
        mut record: AckRecord,
        mut seq: u64,
    ) -> Result<(), StoreError> {
        for _ in 0..MAX_TRIES {
            let Some((o, e, s)) = self.read_last(inbox, channel).await? else {
                return Ok(()); // Empty: the next publish writes the record first.
            };
            if o <= record.last || e != record.epoch {
                return Ok(());
            }
            record.last = o;
            record.floor = record.floor.max(s);
            match self.write_record(channel, record, seq).await? {
                Some(_) => return Ok(()),
                // Written meanwhile by an ack or a reopen that read the subject after
                // this message: it accounts for it.
                None => match self.read_record(acks, channel).await? {
                    Some((r, _)) if r.last >= o || r.epoch != record.epoch => return Ok(()),
                    Some((r, s2)) => {
                        record = AckRecord { last: o, ..r };
                        record.floor = record.floor.max(s);
                        seq = s2;
                    }
                    None => return Ok(()),
                },
            }
        }
        Err(record_races())
    }

    async fn read(self: &Rc<Self>, channel: &Arc<str>) -> Result<Backlog, StoreError> {
        let subject = self.subject("inbox", channel);
        let (inbox, acks) = self.streams()?;
        let mut tries = 0;
        let (record, (last, epoch, last_seq)) = loop {
            let last = self.read_last(&inbox, channel).await?;
            let record = self.read_record(&acks, channel).await?;
            let position = next_position(last, record.map(|r| r.0));
            if position.1 != 0 {
                break (record.map(|r| r.0), position);
            }
            // A user channel never written: fix its epoch now, so this answer and every
            // later message agree (one record wins on every node).
            let fresh = AckRecord {
                acked: 0,
                last: 0,
                epoch: self.new_epoch(),
                floor: self.observed.get(),
            };
            self.write_record(channel, fresh, 0).await?;
            tries += 1;
            if tries >= MAX_TRIES {
                return Err(StoreError::new(
                    ErrorKind::Overloaded,
                    "the ack record keeps changing; retry",
                ));
            }
        };
        let acked = record.filter(|r| r.epoch == epoch).map_or(0, |r| r.acked);
        let mut messages: Vec<(u64, u64, Bytes)> = Vec::new();
        let mut cursor = 1;
        while messages.len() < MAX_DELIVERY {
            let Some(m) = stored::next(&inbox, &subject, cursor)
                .await
                .map_err(|e| js_error("reading the inbox", e))?
            else {
                break;
            };
            cursor = m.seq + 1;
            self.observe(m.seq);
            let offset = m.offset.unwrap_or(0);
            if offset > last {
                break;
            }
            if offset > acked && m.epoch == Some(epoch) {
                messages.push((offset, m.seq, m.payload));
            }
        }
        let more = match messages.last() {
            Some(&(o, _, _)) if messages.len() >= MAX_DELIVERY => last.saturating_sub(o),
            _ => 0,
        };
        // Every unacked offset up to `last` reaches the local publisher before the answer
        // (the shard's attach relies on it; see src/shard/inbox.rs).
        {
            let mut chans = self.chans.borrow_mut();
            let c = chans.entry(channel.clone()).or_default();
            if c.epoch != epoch {
                c.epoch = epoch;
                c.applied = 0;
                c.applied_seq = 0;
            }
            for (offset, seq, payload) in &messages {
                if *offset > c.applied {
                    self.publish_local(channel, *offset, epoch, payload);
                    c.applied = *offset;
                    c.applied_seq = *seq;
                }
            }
            if last > c.applied {
                c.applied = last;
                c.applied_seq = c.applied_seq.max(last_seq);
            }
        }
        self.wake();
        Ok(Backlog {
            last,
            epoch,
            frames: messages
                .into_iter()
                .map(|(offset, _, payload)| {
                    (
                        offset,
                        encode_message(channel, offset, &EncodedData::new(&payload)),
                    )
                })
                .collect(),
            more,
        })
    }

    /// Gives a message to the local publisher unless it is at or behind its position.
    fn publish_local(&self, channel: &str, offset: u64, epoch: u64, payload: &[u8]) {
        let publisher = &self.parts.publisher;
        match publisher.position(channel) {
            Some((last, e)) if e == epoch && last >= offset => {}
            _ => {
                publisher.publish_at(channel, offset, epoch, payload);
            }
        }
    }

    fn wake(&self) {
        self.parts.replies.wake_idle(&self.parts.publisher);
    }

    /// Gives one stored message to the local publisher in offset order, once: earlier
    /// missing offsets are read back from the stream first when the channel has local
    /// subscribers (acked ones are gone: skipped).
    async fn deliver(
        self: &Rc<Self>,
        channel: &Arc<str>,
        offset: u64,
        epoch: u64,
        seq: u64,
        payload: Bytes,
    ) {
        let (fill_from, followed) = {
            let mut chans = self.chans.borrow_mut();
            let c = chans.entry(channel.clone()).or_default();
            if c.epoch != epoch {
                c.epoch = epoch;
                c.applied = offset.saturating_sub(1);
                c.applied_seq = 0;
            }
            if offset <= c.applied {
                return;
            }
            (
                (offset > c.applied + 1).then_some(c.applied_seq + 1),
                c.sub.is_some() || c.interest > 0,
            )
        };
        if let (Some(cursor), true) = (fill_from, followed) {
            self.fill(channel, epoch, cursor, offset).await;
        }
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        if c.epoch == epoch && offset > c.applied {
            self.publish_local(channel, offset, epoch, &payload);
            c.applied = offset;
            c.applied_seq = c.applied_seq.max(seq);
            drop(chans);
            self.wake();
        }
    }

    /// Reads the channel's messages from stream sequence `cursor` on and applies those
    /// before `before`.
    async fn fill(&self, channel: &Arc<str>, epoch: u64, mut cursor: u64, before: u64) {
        let Ok((inbox, _)) = self.streams() else {
            return;
        };
        let subject = self.subject("inbox", channel);
        loop {
            let m = match stored::next(&inbox, &subject, cursor).await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, channel = %channel, "cluster inbox: reading back a hole");
                    return;
                }
            };
            cursor = m.seq + 1;
            let offset = m.offset.unwrap_or(0);
            if offset >= before {
                return;
            }
            let mut chans = self.chans.borrow_mut();
            let Some(c) = chans.get_mut(channel) else {
                return;
            };
            if m.epoch == Some(epoch) && c.epoch == epoch && offset > c.applied {
                self.publish_local(channel, offset, epoch, &m.payload);
                c.applied = offset;
                c.applied_seq = m.seq;
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
                c.linger_until = Some(Instant::now() + self.parts.settings.interest_linger);
            }
            return;
        }
        c.linger_until = None;
        if c.sub.is_some() {
            return;
        }
        let node = self.clone();
        let name = channel.clone();
        let task = tokio::task::spawn_local(async move {
            let mut sub = loop {
                match node.client.subscribe(node.subject("inlive", &name)).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster inbox: subscribing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            // Messages stored between the subscribe's read and this subscription: read
            // them back (twice: interest travels between NATS servers asynchronously).
            let _ = node.client.flush().await;
            node.catch_up(&name).await;
            {
                let (node, name) = (node.clone(), name.clone());
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    node.catch_up(&name).await;
                });
            }
            use futures_lite::StreamExt;
            while let Some(m) = sub.next().await {
                if let Some((offset, epoch, seq)) = stored::live_position(m.headers.as_ref()) {
                    node.deliver(&name, offset, epoch, seq, m.payload).await;
                }
            }
        });
        c.sub = Some(task.abort_handle());
    }

    /// Applies whatever the stream has after the last applied message.
    async fn catch_up(&self, channel: &Arc<str>) {
        let from = self
            .chans
            .borrow()
            .get(channel)
            .map(|c| (c.epoch, c.applied_seq + 1));
        if let Some((epoch, cursor)) = from.filter(|f| f.0 != 0) {
            self.fill(channel, epoch, cursor, u64::MAX).await;
            self.wake();
        }
    }

    /// Ends live subscriptions whose linger passed; forgets idle channels.
    fn sweep(&self) {
        let now = Instant::now();
        let workers = self.workers.borrow();
        self.chans.borrow_mut().retain(|name, c| {
            if c.interest == 0 && c.linger_until.is_some_and(|t| t <= now) {
                c.linger_until = None;
                if let Some(sub) = c.sub.take() {
                    sub.abort();
                }
            }
            c.sub.is_some() || c.interest > 0 || workers.contains_key(name)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acks_are_cumulative_and_bounded_by_the_last_offset() {
        assert_eq!(plan_ack(0, 10, 4), AckPlan::Remove { from: 0, upto: 4 });
        assert_eq!(plan_ack(4, 10, 4), AckPlan::Nothing);
        assert_eq!(plan_ack(4, 10, 2), AckPlan::Nothing);
        assert_eq!(plan_ack(4, 10, 11), AckPlan::Ahead(10));
        assert_eq!(plan_ack(0, 0, 1), AckPlan::Ahead(0));
    }

    #[test]
    fn an_emptied_subject_continues_from_the_ack_record() {
        let record = AckRecord {
            acked: 7,
            last: 7,
            epoch: 99,
            floor: 30,
        };
        assert_eq!(next_position(None, Some(record)), (7, 99, 0));
        assert_eq!(next_position(Some((9, 99, 40)), Some(record)), (9, 99, 40));
        assert_eq!(next_position(Some((3, 5, 2)), None), (3, 5, 2));
        assert_eq!(next_position(None, None), (0, 0, 0));
        // Complete: the next offset follows; the record says so before the message.
        assert_eq!(
            reopen(Some(record), 0, 50, 1),
            AckRecord {
                acked: 7,
                last: 8,
                epoch: 99,
                floor: 50
            }
        );
        assert_eq!(
            reopen(None, 0, 12, 5),
            AckRecord {
                acked: 0,
                last: 1,
                epoch: 5,
                floor: 12
            }
        );
    }

    /// Regression: with `inbox_retention = 2`, offsets 1-3 expired unacked and the next
    /// messages got 1 and 2 again; after an ack of 1 and the expiry of 4-6, the next
    /// message got 4 again. Expired offsets are skipped: at most one per stream sequence
    /// stored since the record's floor.
    #[test]
    fn expired_offsets_are_skipped_never_reused() {
        // Acked 1, offsets up to 6 were stored (5 and 6 without touching the record),
        // all expired; 4 stream sequences were used after the floor.
        let record = AckRecord {
            acked: 1,
            last: 4,
            epoch: 3,
            floor: 100,
        };
        assert!(!record.complete());
        let next = reopen(Some(record), 104, 90, 7);
        assert!(next.last > 6, "{next:?}");
        assert_eq!((next.acked, next.last, next.epoch), (8, 9, 3));
        assert_eq!(next.floor, 104);
        // An ack into the emptied subject removes nothing and is not refused for
        // offsets the client saw before they expired.
        assert_eq!(plan_ack_on_empty(Some(record), 6), AckPlan::Nothing);
        let done = AckRecord { acked: 4, ..record };
        assert_eq!(plan_ack_on_empty(Some(done), 6), AckPlan::Ahead(4));
        assert_eq!(plan_ack_on_empty(None, 1), AckPlan::Ahead(0));
        assert_eq!(plan_ack_on_empty(None, 0), AckPlan::Nothing);
    }

    /// One user channel, driven the way the node drives it (one request at a time):
    /// publishes, other users' publishes (stream sequences used elsewhere), acks and
    /// retention expiring the oldest messages. Every offset given out is above every
    /// earlier one, whatever expired.
    fn check_offsets_never_repeat(ops: &[(u8, u64)]) -> Result<(), TestCaseError> {
        let mut subject: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut record: Option<AckRecord> = None;
        let mut stream_last = 0u64;
        let mut highest = 0u64;
        for &(op, n) in ops {
            match op % 4 {
                0 => {
                    let offset = match subject.back() {
                        Some(&(o, _)) => next_position(Some((o, 3, 0)), record).0 + 1,
                        None => {
                            // Any sequence seen before is a valid floor.
                            let observed = n % (stream_last + 1);
                            let r = reopen(record, stream_last, observed, 3);
                            record = Some(r);
                            r.last
                        }
                    };
                    prop_assert!(offset > highest, "offset {offset} after {highest}");
                    highest = offset;
                    stream_last += 1;
                    subject.push_back((offset, stream_last));
                }
                1 => stream_last += n % 5,
                2 => {
                    let upto = n % (highest + 2);
                    let Some(&(o, s)) = subject.back() else {
                        let removes =
                            matches!(plan_ack_on_empty(record, upto), AckPlan::Remove { .. });
                        prop_assert!(!removes, "an ack of an empty subject removed something");
                        continue;
                    };
                    let (last, epoch, _) = next_position(Some((o, 3, s)), record);
                    let acked = record.map_or(0, |r| r.acked);
                    if let AckPlan::Remove { upto, .. } = plan_ack(acked, last, upto) {
                        record = Some(AckRecord {
                            acked: upto,
                            last,
                            epoch,
                            floor: record.map_or(0, |r| r.floor).max(s),
                        });
                        subject.retain(|&(offset, _)| offset > upto);
                    }
                }
                _ => {
                    for _ in 0..n % 4 {
                        subject.pop_front();
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn records_round_trip(acked in 0u64..1000, extra in 0u64..1000, epoch in 1u64.., floor in any::<u64>()) {
            let r = AckRecord { acked, last: acked + extra, epoch, floor };
            let h = r.to_headers();
            prop_assert_eq!(
                AckRecord::parse(Some(&h[0].1), Some(&h[1].1), Some(&h[2].1), Some(&h[3].1)),
                Some(r)
            );
            // Written before the floor existed: read as floor 0.
            prop_assert_eq!(
                AckRecord::parse(Some(&h[0].1), Some(&h[1].1), Some(&h[2].1), None),
                Some(AckRecord { floor: 0, ..r })
            );
        }

        #[test]
        fn arbitrary_header_values_never_panic(a in any::<String>(), l in any::<String>(), e in any::<String>(), f in any::<String>()) {
            if let Some(r) = AckRecord::parse(Some(&a), Some(&l), Some(&e), Some(&f)) {
                prop_assert!(r.acked <= r.last && r.epoch != 0);
            }
        }

        #[test]
        fn offsets_never_repeat_across_acks_and_expiry(ops in proptest::collection::vec((any::<u8>(), any::<u64>()), 0..300)) {
            check_offsets_never_repeat(&ops)?;
        }

        #[test]
        fn a_plan_never_removes_past_the_last_offset(acked in 0u64..100, last in 0u64..100, upto in 0u64..200) {
            match plan_ack(acked, last, upto) {
                AckPlan::Ahead(l) => prop_assert!(upto > l),
                AckPlan::Nothing => prop_assert!(upto <= acked),
                AckPlan::Remove { from, upto: u } => prop_assert!(from < u && u <= last),
            }
        }
    }
}
