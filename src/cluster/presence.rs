//! Presence across nodes, on the NATS thread (docs/cluster.md, *Presence*).
//!
//! - **Query.** A shard hands a `presence` query to the NATS thread ([`query`], a
//!   `try_send`, never a wait) and answers the client later. The NATS thread sends a
//!   NATS request on `<prefix>.presence.q.<enc>` and gathers the answers that arrive
//!   within `presence_window_ms`; every node subscribes once to `<prefix>.presence.q.>` and
//!   answers with its local members. The asker adds its own registry's members (read at
//!   the end of the window, not over NATS), merges by member and sends the result to the
//!   shard's answer queue, whose receive is woken cross-thread (the inbox's pattern).
//!   NATS down: the local members at once, marked partial.
//! - **Events.** A join or leave decided by this node's registry (its local first-in or
//!   last-out) is published on `<prefix>.presence.ev.<enc>`. A node subscribes to that
//!   subject while it has local subscribers of a channel whose namespace has
//!   `join_leave` (the interest the subscription index already reports), and puts other
//!   nodes' events into its ring as [`RingKind::Event`]s, then wakes idle shards.
//!
//! [`RingKind::Event`]: crate::fanout::ring::RingKind

use crate::auth::namespace::Namespaces;
use crate::cluster::presence_wire::{Answer, Event, Merge, Merged, Query, WireMember};
use crate::cluster::subject::{decode_channel, encode_channel};
use crate::cluster::ClusterStats;
use crate::fanout::publisher::Publisher;
use crate::presence::{Member, Presence};
use async_nats::Client;
use futures_lite::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Queries and events waiting for the NATS thread before new ones are refused (a query is
/// then answered from local state, an event is not sent to other nodes).
const QUEUE: usize = 16_384;

/// Cross-node presence counters (`ringcast_cluster_presence_*`).
#[derive(Debug, Default)]
pub struct PresenceClusterStats {
    /// Queries this node asked the cluster.
    pub queries: AtomicU64,
    /// Answers received from other nodes.
    pub answers: AtomicU64,
    /// Queries answered from this node's members only (NATS down, queue full).
    pub partial: AtomicU64,
    /// Queries from other nodes this node answered.
    pub served: AtomicU64,
    /// Join/leave events published for other nodes.
    pub events_out: AtomicU64,
    /// Join/leave events from other nodes given to local subscribers.
    pub events_in: AtomicU64,
    /// Events not sent to other nodes (queue full, NATS down).
    pub events_dropped: AtomicU64,
    /// Channels whose events this node follows.
    pub followed: AtomicU64,
}

/// Which connection, on the asking shard, waits for a query's answer.
#[derive(Debug, Clone)]
pub struct QueryTag {
    /// Connection-table key.
    pub key: u32,
    /// The slot's generation (a reused slot is another connection: its answer is dropped).
    pub generation: u32,
    /// The request id, rendered JSON.
    pub id: Option<String>,
}

/// A merged answer for a shard.
#[derive(Debug)]
pub struct ShardAnswer {
    /// Who asked.
    pub tag: QueryTag,
    /// The channel.
    pub channel: Arc<str>,
    /// The members over the nodes that answered.
    pub merged: Merged,
    /// Only this node's members (NATS was down).
    pub partial: bool,
}

enum Job {
    Query {
        channel: Arc<str>,
        shard: usize,
        tag: QueryTag,
        max: usize,
    },
    Event {
        channel: Arc<str>,
        event: Event,
    },
    Interest {
        channel: Arc<str>,
        on: bool,
    },
}

struct Bridge {
    node: String,
    prefix: String,
    window: Duration,
    tx: flume::Sender<Job>,
    rx: Mutex<Option<flume::Receiver<Job>>>,
    answer_txs: Vec<flume::Sender<ShardAnswer>>,
    answer_rxs: Vec<flume::Receiver<ShardAnswer>>,
    stats: Arc<PresenceClusterStats>,
    /// The NATS link's state, once the cluster started.
    link: OnceLock<Arc<ClusterStats>>,
}

impl Bridge {
    /// True when the cluster's NATS connection is down.
    fn link_down(&self) -> bool {
        self.link.get().is_some_and(|s| s.is_down())
    }
}

struct Local {
    presence: Arc<Presence>,
    namespaces: Namespaces,
}

static BRIDGE: OnceLock<Bridge> = OnceLock::new();
static LOCAL: OnceLock<Local> = OnceLock::new();

/// A short tag naming this node among the cluster's for as long as it runs: 8 hex digits
/// from the start time and process id (a restarted node is a new one).
fn node_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

/// Sets cross-node presence up for `shards` shards (cluster on, before the NATS thread
/// starts): names the node (anonymous connection ids take the tag as their first part, so
/// they are unique over the cluster) and makes the queues.
pub fn init(shards: usize, prefix: &str, window: Duration) {
    let node = node_tag();
    crate::presence::member::set_node_tag(&node);
    let (tx, rx) = flume::bounded(QUEUE);
    let (answer_txs, answer_rxs) = (0..shards).map(|_| flume::unbounded()).unzip();
    let _ = BRIDGE.set(Bridge {
        node,
        prefix: prefix.to_string(),
        window,
        tx,
        rx: Mutex::new(Some(rx)),
        answer_txs,
        answer_rxs,
        stats: Arc::new(PresenceClusterStats::default()),
        link: OnceLock::new(),
    });
}

/// Gives cross-node presence the cluster's link state (once, when the cluster started):
/// while NATS is down, queries are answered from local state and events are dropped.
pub fn watch_link(stats: Arc<ClusterStats>) {
    if let Some(b) = BRIDGE.get() {
        let _ = b.link.set(stats);
    }
}

/// Gives the NATS thread the registry to answer from and the namespace rules that say
/// which channels' events to follow (once, after the registry is made).
pub fn install_registry(presence: Arc<Presence>, namespaces: Namespaces) {
    let _ = LOCAL.set(Local {
        presence,
        namespaces,
    });
}

/// True when presence queries and events go through the cluster.
pub fn enabled() -> bool {
    BRIDGE.get().is_some()
}

/// `shard`'s answer queue.
pub fn shard_answers(shard: usize) -> Option<flume::Receiver<ShardAnswer>> {
    BRIDGE.get().and_then(|b| b.answer_rxs.get(shard).cloned())
}

/// Asks the cluster for `channel`'s members; the answer comes on `shard`'s queue.
///
/// # Errors
/// The queue is full or the cluster is off or down: answer from local state.
pub fn query(channel: &str, shard: usize, tag: QueryTag, max: usize) -> Result<(), QueryTag> {
    let Some(b) = BRIDGE.get() else {
        return Err(tag);
    };
    if b.link_down() {
        b.stats.partial.fetch_add(1, Relaxed);
        return Err(tag);
    }
    b.tx.try_send(Job::Query {
        channel: Arc::from(channel),
        shard,
        tag,
        max,
    })
    .map_err(|e| {
        b.stats.partial.fetch_add(1, Relaxed);
        match e.into_inner() {
            Job::Query { tag, .. } => tag,
            _ => unreachable_tag(),
        }
    })
}

fn unreachable_tag() -> QueryTag {
    QueryTag {
        key: u32::MAX,
        generation: u32::MAX,
        id: None,
    }
}

/// The member as other nodes see it.
pub fn wire_member(member: &Member) -> WireMember {
    match member {
        Member::User(u) => WireMember::User(u.id().to_string()),
        Member::Conn(c) => WireMember::Conn(c.to_string()),
    }
}

/// This node's registry decided a join (`join`) or leave of `member` on `channel` (a
/// join_leave channel): tells the other nodes. Never waits; dropped (and counted) when
/// the queue is full.
pub fn event(channel: &str, member: &Member, join: bool) {
    let Some(b) = BRIDGE.get() else { return };
    let event = Event {
        node: b.node.clone(),
        join,
        member: wire_member(member),
    };
    if b.tx
        .try_send(Job::Event {
            channel: Arc::from(channel),
            event,
        })
        .is_err()
    {
        b.stats.events_dropped.fetch_add(1, Relaxed);
    }
}

/// A shard gained (`on`) or lost every subscriber of `channel`: follow its events while
/// any shard has one, when its namespace sends join/leave events.
pub fn interest(channel: &str, on: bool) {
    let (Some(b), Some(local)) = (BRIDGE.get(), LOCAL.get()) else {
        return;
    };
    let rules = local.namespaces.rules_for(channel);
    if !(rules.presence && rules.join_leave) {
        return;
    }
    // Unbounded in effect: interest changes are few, and a lost "off" would leak a
    // subscription. The bounded queue refusing one is logged.
    if b.tx
        .try_send(Job::Interest {
            channel: Arc::from(channel),
            on,
        })
        .is_err()
    {
        tracing::warn!(
            channel,
            on,
            "cluster presence: queue full; the channel's event subscription is not updated"
        );
    }
}

/// This node's local members of `channel`, as an answer.
fn local_answer(node: &str, channel: &str, max: usize) -> Answer {
    let Some(local) = LOCAL.get() else {
        return Answer {
            node: node.to_string(),
            count: 0,
            connections: 0,
            members: Some(Vec::new()),
        };
    };
    let snap = local.presence.snapshot(channel, max);
    Answer {
        node: node.to_string(),
        count: snap.count as u64,
        connections: snap.connections,
        members: snap
            .members
            .map(|list| list.iter().map(|(m, n)| (wire_member(m), *n)).collect()),
    }
}

/// The merged answer from local state only.
pub fn local_only(channel: &str, max: usize) -> Merged {
    let node = BRIDGE.get().map_or("", |b| b.node.as_str());
    let mut merge = Merge::default();
    merge.add(local_answer(node, channel, max));
    merge.finish(max)
}

/// Runs on the NATS thread (spawned once, on its `LocalSet`): answers other nodes'
/// queries, asks for this node's, publishes and follows events.
pub async fn serve(client: Client, publisher: Arc<Publisher>, wakes: Vec<flume::Sender<()>>) {
    let Some(b) = BRIDGE.get() else { return };
    let rx = match b.rx.lock() {
        Ok(mut rx) => rx.take(),
        Err(_) => None,
    };
    let Some(rx) = rx else { return };
    tokio::task::spawn_local(answer_queries(client.clone(), b));
    // Per channel: local interest count, the follower task, and whether its subscription
    // is in place (counted in the gauge).
    type Follow = (usize, tokio::task::AbortHandle, Rc<Cell<bool>>);
    let follows: Rc<RefCell<HashMap<Arc<str>, Follow>>> = Rc::default();
    let wake: Rc<dyn Fn()> = Rc::new(move || {
        publisher.idle_flags().claim_idle(|shard| {
            if let Some(tx) = wakes.get(shard) {
                let _ = tx.try_send(());
            }
        });
    });
    while let Ok(job) = rx.recv_async().await {
        match job {
            Job::Query {
                channel,
                shard,
                tag,
                max,
            } => {
                b.stats.queries.fetch_add(1, Relaxed);
                tokio::task::spawn_local(gather(client.clone(), b, channel, shard, tag, max));
            }
            Job::Event { channel, event } => {
                let subject = format!("{}.presence.ev.{}", b.prefix, encode_channel(&channel));
                if b.link_down() {
                    b.stats.events_dropped.fetch_add(1, Relaxed);
                } else if client.publish(subject, event.encode().into()).await.is_ok() {
                    b.stats.events_out.fetch_add(1, Relaxed);
                } else {
                    b.stats.events_dropped.fetch_add(1, Relaxed);
                }
            }
            Job::Interest { channel, on } => {
                let mut follows = follows.borrow_mut();
                if on {
                    if let Some((n, _, _)) = follows.get_mut(&channel) {
                        *n += 1;
                        continue;
                    }
                    let ready = Rc::new(Cell::new(false));
                    let task = tokio::task::spawn_local(follow_events(
                        client.clone(),
                        b,
                        channel.clone(),
                        wake.clone(),
                        ready.clone(),
                    ));
                    follows.insert(channel, (1, task.abort_handle(), ready));
                } else if let Some((n, _, _)) = follows.get_mut(&channel) {
                    *n -= 1;
                    if *n == 0 {
                        if let Some((_, task, ready)) = follows.remove(&channel) {
                            task.abort();
                            if ready.get() {
                                b.stats.followed.fetch_sub(1, Relaxed);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Answers every other node's query with this node's members.
async fn answer_queries(client: Client, b: &'static Bridge) {
    let subject = format!("{}.presence.q.>", b.prefix);
    let skip = b.prefix.len() + ".presence.q.".len();
    let mut sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::debug!(error = %e, "cluster presence: subscribing to queries");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    while let Some(m) = sub.next().await {
        let (Some(reply), Some(query)) = (m.reply, Query::decode(&m.payload)) else {
            continue;
        };
        if query.node == b.node {
            continue; // our own: the asker reads its registry directly
        }
        let Some(channel) = m.subject.get(skip..).and_then(decode_channel) else {
            continue;
        };
        let max = usize::try_from(query.max).unwrap_or(usize::MAX);
        let answer = local_answer(&b.node, &channel, max);
        b.stats.served.fetch_add(1, Relaxed);
        let _ = client.publish(reply, answer.encode().into()).await;
    }
}

/// Asks the other nodes, gathers their answers for the window, adds ours, answers the
/// shard.
async fn gather(
    client: Client,
    b: &'static Bridge,
    channel: Arc<str>,
    shard: usize,
    tag: QueryTag,
    max: usize,
) {
    let mut merge = Merge::default();
    let mut partial = false;
    let inbox = client.new_inbox();
    match client.subscribe(inbox.clone()).await {
        Ok(mut sub) => {
            let subject = format!("{}.presence.q.{}", b.prefix, encode_channel(&channel));
            let query = Query {
                node: b.node.clone(),
                max: max as u64,
            };
            if client
                .publish_with_reply(subject, inbox, query.encode().into())
                .await
                .is_err()
            {
                partial = true;
            }
            let deadline = tokio::time::Instant::now() + b.window;
            // Not sent (partial): no answer will come.
            let mut gathering = !partial;
            while gathering {
                match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(m)) => {
                        if let Some(answer) = Answer::decode(&m.payload) {
                            b.stats.answers.fetch_add(1, Relaxed);
                            merge.add(answer);
                        }
                    }
                    Ok(None) | Err(_) => gathering = false,
                }
            }
            let _ = sub.unsubscribe().await;
        }
        Err(_) => partial = true,
    }
    if partial {
        b.stats.partial.fetch_add(1, Relaxed);
    }
    merge.add(local_answer(&b.node, &channel, max));
    let merged = merge.finish(max);
    if let Some(tx) = b.answer_txs.get(shard) {
        let _ = tx.send(ShardAnswer {
            tag,
            channel,
            merged,
            partial,
        });
    }
}

/// Puts other nodes' join/leave events on `channel` into the local ring.
async fn follow_events(
    client: Client,
    b: &'static Bridge,
    channel: Arc<str>,
    wake: Rc<dyn Fn()>,
    ready: Rc<Cell<bool>>,
) {
    let subject = format!("{}.presence.ev.{}", b.prefix, encode_channel(&channel));
    let mut sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::debug!(error = %e, "cluster presence: subscribing to events");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Counted once the server has the subscription (a flush is a round trip): from then
    // on, events other nodes publish reach this node.
    let _ = client.flush().await;
    ready.set(true);
    b.stats.followed.fetch_add(1, Relaxed);
    while let Some(m) = sub.next().await {
        let Some(event) = Event::decode(&m.payload) else {
            continue;
        };
        if event.node == b.node {
            continue; // ours went into the ring when the registry decided it
        }
        let Some(local) = LOCAL.get() else { continue };
        let kind = if event.join { "join" } else { "leave" };
        local
            .presence
            .inject_event(kind, &channel, &event.member.to_json(None));
        b.stats.events_in.fetch_add(1, Relaxed);
        wake();
    }
}

/// Appends the `ringcast_cluster_presence_*` metrics (nothing when the cluster is off).
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write;
    let Some(b) = BRIDGE.get() else { return };
    let s = &b.stats;
    let rows: [(&str, &str, &str, &AtomicU64); 8] = [
        (
            "ringcast_cluster_presence_queries_total",
            "counter",
            "Presence queries this node asked the other nodes.",
            &s.queries,
        ),
        (
            "ringcast_cluster_presence_answers_total",
            "counter",
            "Presence answers received from other nodes.",
            &s.answers,
        ),
        (
            "ringcast_cluster_presence_partial_total",
            "counter",
            "Presence queries answered from this node's members only (NATS down or queue full).",
            &s.partial,
        ),
        (
            "ringcast_cluster_presence_served_total",
            "counter",
            "Presence queries from other nodes this node answered.",
            &s.served,
        ),
        (
            "ringcast_cluster_presence_events_sent_total",
            "counter",
            "Join/leave events published for the other nodes.",
            &s.events_out,
        ),
        (
            "ringcast_cluster_presence_events_received_total",
            "counter",
            "Join/leave events from other nodes given to this node's subscribers.",
            &s.events_in,
        ),
        (
            "ringcast_cluster_presence_events_dropped_total",
            "counter",
            "Join/leave events not sent to the other nodes (NATS down or queue full).",
            &s.events_dropped,
        ),
        (
            "ringcast_cluster_presence_followed_channels",
            "gauge",
            "Channels whose join/leave events this node receives from the other nodes (local subscribers, join_leave on).",
            &s.followed,
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Relaxed)
        );
    }
}
