//! Process-wide counters, rendered in the Prometheus text format by the admin server.
//!
//! Counters live per shard in cache-padded blocks: a shard only ever writes its own block
//! (relaxed atomics, no sharing on the hot path), and a scrape sums the blocks.

use crate::admission::accept_backoff::AcceptError;
use crate::auth::token::AuthError;
use crate::fanout::history::HistoryStats;
use crate::inbox::{ErrorKind as InboxErrorKind, InboxStats};
use crate::ingest::line::IngestError;
use crate::presence::PresenceStats;
use crate::proto::proxy::ProxyError;
use crossbeam_utils::CachePadded;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

pub use crate::proto::close::CloseCause;

/// Why an accepted socket was answered `503` (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum RefuseCause {
    /// Every `max_connections` slot is taken (process-wide).
    MaxConnections = 0,
    /// A drain is in progress.
    Draining,
    /// The shard has `max_handshakes_per_shard` upgrades in flight.
    HandshakesInFlight,
    /// The source address has `max_connections_per_ip` connections.
    PerIp,
    /// The source address used up `max_new_connections_per_ip_per_sec`.
    PerIpRate,
    /// The source address has `max_handshakes_per_ip` upgrades in progress.
    PerIpHandshakes,
    /// The shard's upgrade places were all taken and this upgrade's address held the
    /// most: its place went to an address holding fewer (`handshake_fair_share`).
    HandshakeShare,
}

impl RefuseCause {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 7] = [
        "max_connections",
        "draining",
        "handshakes_in_flight",
        "per_ip",
        "per_ip_rate",
        "per_ip_handshakes",
        "handshake_share",
    ];
}

/// Why a TCP ingest connection was closed before it could publish (metric label
/// `reason`; a wrong or missing key counts in `ringcast_ingest_unauthorized_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum TcpIngestRefusal {
    /// `max_tcp_ingest_connections` were open.
    MaxConnections = 0,
    /// No `AUTH` line within `ingest_auth_timeout`.
    AuthTimeout,
}

impl TcpIngestRefusal {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 2] = ["max_connections", "auth_timeout"];
}

/// Why the admin port refused a connection or a request (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AdminRefusal {
    /// `max_admin_connections` were open.
    MaxConnections = 0,
    /// A request was not whole within `admin_request_timeout`.
    RequestTimeout,
}

impl AdminRefusal {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 2] = ["max_connections", "request_timeout"];
}

/// Where a published message came from (metric label `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Source {
    /// UDP datagram.
    Udp = 0,
    /// TCP line.
    Tcp,
    /// HTTP POST /publish.
    Http,
    /// A WebSocket client's `{"cmd":"publish"}`.
    Client,
}

impl Source {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 4] = ["udp", "tcp", "http", "ws"];
}

/// Counters owned by one shard.
#[derive(Default)]
pub struct ShardMetrics {
    /// Open WebSocket connections (gauge).
    pub connections: AtomicU64,
    /// Upgrades completed.
    pub accepted: AtomicU64,
    /// Handshakes refused with an HTTP error.
    pub handshake_rejected: AtomicU64,
    /// Sockets answered 503, by [`RefuseCause`].
    pub refused: [AtomicU64; RefuseCause::LABELS.len()],
    /// Upgrades accepted but not yet answered (gauge).
    pub handshakes_in_progress: AtomicU64,
    /// Upgrades closed because `handshake_timeout` passed before the answer was written.
    pub handshakes_timed_out: AtomicU64,
    /// Connections from a trusted proxy closed for a bad or missing PROXY header, by
    /// [`ProxyError`] label.
    pub proxy_header_errors: [AtomicU64; ProxyError::LABELS.len()],
    /// `accept` failures on the WebSocket listener, by [`AcceptError`].
    pub accept_errors: [AtomicU64; AcceptError::LABELS.len()],
    /// Connections closed, by [`CloseCause`].
    pub closed: [AtomicU64; CloseCause::LABELS.len()],
    /// Messages lost to ring overrun.
    pub ring_overrun_lost: AtomicU64,
    /// Subscribes with `since` answered `recovered: true`.
    pub recovered: AtomicU64,
    /// Subscribes with `since` answered `recovered: false`.
    pub not_recovered: AtomicU64,
    /// Frames replayed from history by recoveries.
    pub replayed: AtomicU64,
    /// Live messages not queued to a lagging connection (it gets them from history).
    pub lagged: AtomicU64,
    /// Frames queued from history to lagging connections.
    pub caught_up: AtomicU64,
    /// Messages published but not yet consumed by this shard (gauge).
    pub ring_lag: AtomicU64,
    /// Frames queued to subscribers.
    pub deliveries: AtomicU64,
    /// Messages skipped for slow consumers.
    pub dropped_slow: AtomicU64,
    /// Write syscalls on the send path.
    pub send_calls: AtomicU64,
    /// Bytes written to subscribers.
    pub bytes_out: AtomicU64,
    /// Bytes queued in send backlogs (gauge).
    pub backlog_bytes: AtomicU64,
    /// Messages published via each [`Source`].
    pub messages_in: [AtomicU64; 4],
    /// Ingest messages rejected, by source and [`IngestError`] label.
    pub ingest_rejected: [[AtomicU64; IngestError::LABELS.len()]; 4],
    /// Tokens refused (upgrade 401s and failed refreshes), by [`AuthError`] label.
    pub auth_failures: [AtomicU64; AuthError::LABELS.len()],
    /// Subscribes and publishes refused with 403.
    pub forbidden: AtomicU64,
    /// Subscribes refused because the process holds `max_channels` channels.
    pub channels_refused: AtomicU64,
    /// Client commands handled.
    pub commands: AtomicU64,
    /// Pings sent by the server.
    pub pings_sent: AtomicU64,
    /// TLS handshakes on the `tls_listen` port: `[succeeded, failed]`.
    pub tls_handshakes: [AtomicU64; 2],
    /// Open TCP ingest connections (gauge).
    pub tcp_ingest_connections: AtomicU64,
    /// TCP ingest connections refused, by [`TcpIngestRefusal`].
    pub tcp_ingest_refused: [AtomicU64; TcpIngestRefusal::LABELS.len()],
    /// Open admin-port connections (gauge).
    pub admin_connections: AtomicU64,
    /// Admin connections and requests refused, by [`AdminRefusal`].
    pub admin_refused: [AtomicU64; AdminRefusal::LABELS.len()],
}

/// Upper bounds (seconds) of the delivery latency histogram's buckets: from 100 µs (a
/// paced message on an idle shard) to 10 s (a shard that fell far behind).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// [`LATENCY_BUCKETS`] in whole microseconds (every bound is a whole number of them).
const LATENCY_BUCKETS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// The bucket an observation of `micros` falls in: the first whose bound is at least
/// `micros`, or the `+Inf` one.
fn bucket_index(micros: u64) -> usize {
    LATENCY_BUCKETS_MICROS.partition_point(|&b| b < micros)
}

/// Escapes a label value for the text exposition format (`\`, `"` and newline).
pub fn escape_label_value(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One shard's delivery latency histogram: cumulative-on-render bucket counts, a sum and
/// a count, all written only by that shard (relaxed atomics, no lock).
#[derive(Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Renders this one histogram as `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Relaxed);
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum}\n{name}_count {cumulative}"
        );
    }

    /// Records one observation: two relaxed increments on counters only this shard
    /// writes, no lock, no allocation.
    pub fn record(&self, micros: u64) {
        let i = bucket_index(micros);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
    }
}

/// All shards' counters plus the delivery latency histograms.
pub struct Metrics {
    shards: Box<[CachePadded<ShardMetrics>]>,
    latency: Box<[CachePadded<LatencyHistogram>]>,
    /// Accept → `101`/`200` written, per shard.
    handshake: Box<[CachePadded<LatencyHistogram>]>,
    /// When the metrics were initialized (process start, for `process_start_time_seconds`).
    started_unix: f64,
    /// Channels with offset state in the publisher (gauge; process-wide, not per shard).
    pub channels: AtomicU64,
    /// Channel history sizes and evictions (process-wide).
    pub history: Arc<HistoryStats>,
    /// Users with at least one authenticated connection (gauge; process-wide).
    pub users: AtomicU64,
    /// The durable inbox's counters (process-wide; all zero while it is off).
    pub inbox: Arc<InboxStats>,
    /// Presence channels, members and join/leave events (process-wide).
    pub presence: Arc<PresenceStats>,
    /// Configuration reloads (SIGHUP): `[ok, error]`.
    pub config_reloads: [AtomicU64; 2],
    /// Publishers refused for a missing or wrong `ingest_key`: `[tcp, http]`.
    pub ingest_unauthorized: [AtomicU64; 2],
}

impl Metrics {
    /// Zeroed metrics for `shards` shards that live as long as the process: a server
    /// makes them once at start and hands them to every part that counts (its shards,
    /// threads and ports hold plain references, no reference count on the hot path).
    pub fn leak(shards: usize) -> &'static Metrics {
        Box::leak(Box::new(Metrics::new(shards)))
    }

    /// Zeroed metrics for `shards` shards.
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards)
                .map(|_| CachePadded::new(ShardMetrics::default()))
                .collect(),
            latency: (0..shards)
                .map(|_| CachePadded::new(LatencyHistogram::default()))
                .collect(),
            handshake: (0..shards)
                .map(|_| CachePadded::new(LatencyHistogram::default()))
                .collect(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            channels: AtomicU64::new(0),
            history: Arc::new(HistoryStats::default()),
            users: AtomicU64::new(0),
            inbox: Arc::new(InboxStats::default()),
            presence: Arc::new(PresenceStats::default()),
            config_reloads: Default::default(),
            ingest_unauthorized: Default::default(),
        }
    }
}

impl Metrics {
    /// The counters of `shard`.
    pub fn shard(&self, shard: usize) -> &ShardMetrics {
        &self.shards[shard % self.shards.len()]
    }

    /// Records one message's ingest-to-send latency on `shard` (only messages that had a
    /// subscriber on that shard).
    pub fn record_latency(&self, shard: usize, micros: u64) {
        if let Some(h) = self.latency.get(shard) {
            h.record(micros);
        }
    }

    /// Records one upgrade's duration on `shard`, from accept to its `101` (or the SSE /
    /// long-poll `200`) written.
    pub fn record_handshake(&self, shard: usize, micros: u64) {
        if let Some(h) = self.handshake.get(shard) {
            h.record(micros);
        }
    }

    /// Sum of a counter over all shards.
    pub fn sum(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self, draining: bool, cluster: Option<&crate::cluster::Cluster>) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let mut scalar =
            |name: &str, kind: &str, help: &str, f: &dyn Fn(&ShardMetrics) -> &AtomicU64| {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                    self.sum(f)
                );
            };
        scalar(
            "ringcast_connections",
            "gauge",
            "Open WebSocket connections.",
            &|s| &s.connections,
        );
        scalar(
            "ringcast_connections_accepted_total",
            "counter",
            "WebSocket upgrades completed.",
            &|s| &s.accepted,
        );
        scalar(
            "ringcast_handshakes_rejected_total",
            "counter",
            "Upgrade requests answered with an HTTP error.",
            &|s| &s.handshake_rejected,
        );
        scalar(
            "ringcast_handshakes_in_progress",
            "gauge",
            "Upgrades accepted and not yet answered.",
            &|s| &s.handshakes_in_progress,
        );
        scalar(
            "ringcast_handshakes_timed_out_total",
            "counter",
            "Upgrades closed unanswered when handshake_timeout passed.",
            &|s| &s.handshakes_timed_out,
        );
        scalar(
            "ringcast_deliveries_total",
            "counter",
            "Message frames queued to subscribers.",
            &|s| &s.deliveries,
        );
        scalar(
            "ringcast_ring_overrun_lost_total",
            "counter",
            "Messages a shard lost because the ring lapped it.",
            &|s| &s.ring_overrun_lost,
        );
        scalar(
            "ringcast_history_replayed_total",
            "counter",
            "Message frames replayed from channel history to recovering subscribers.",
            &|s| &s.replayed,
        );
        scalar(
            "ringcast_lagged_total",
            "counter",
            "Live messages a lagging subscriber was sent from history instead.",
            &|s| &s.lagged,
        );
        scalar(
            "ringcast_caught_up_total",
            "counter",
            "Message frames sent from history to subscribers catching up.",
            &|s| &s.caught_up,
        );
        scalar(
            "ringcast_send_calls_total",
            "counter",
            "Write syscalls on the send path (one carries every queued frame).",
            &|s| &s.send_calls,
        );
        scalar(
            "ringcast_bytes_out_total",
            "counter",
            "Bytes written to WebSocket clients.",
            &|s| &s.bytes_out,
        );
        scalar(
            "ringcast_send_backlog_bytes",
            "gauge",
            "Bytes waiting in per-connection send backlogs.",
            &|s| &s.backlog_bytes,
        );
        scalar(
            "ringcast_commands_total",
            "counter",
            "Client commands handled.",
            &|s| &s.commands,
        );
        scalar(
            "ringcast_pings_sent_total",
            "counter",
            "Heartbeat pings sent.",
            &|s| &s.pings_sent,
        );
        let _ = writeln!(out, "# HELP ringcast_dropped_total Messages not delivered, by reason.\n# TYPE ringcast_dropped_total counter");
        let _ = writeln!(
            out,
            "ringcast_dropped_total{{reason=\"slow_consumer\"}} {}",
            self.sum(|s| &s.dropped_slow)
        );
        let _ = writeln!(
            out,
            "ringcast_dropped_total{{reason=\"ring_overrun\"}} {}",
            self.sum(|s| &s.ring_overrun_lost)
        );
        let _ = writeln!(out, "# HELP ringcast_connections_refused_total Sockets answered 503 with Retry-After, by reason.\n# TYPE ringcast_connections_refused_total counter");
        for (i, label) in RefuseCause::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_connections_refused_total{{reason=\"{label}\"}} {}",
                self.sum(|s| &s.refused[i])
            );
        }
        let _ = writeln!(out, "# HELP ringcast_proxy_header_errors_total Connections from a trusted_proxies peer closed because their PROXY header was missing, of the wrong version, malformed, too long or cut short.\n# TYPE ringcast_proxy_header_errors_total counter");
        for (i, label) in ProxyError::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_proxy_header_errors_total{{reason=\"{label}\"}} {}",
                self.sum(|s| &s.proxy_header_errors[i])
            );
        }
        let _ = writeln!(out, "# HELP ringcast_accept_errors_total accept() failures on the WebSocket listener, by errno; each pauses that shard's accepting (100 ms doubling to 1 s).\n# TYPE ringcast_accept_errors_total counter");
        for (i, label) in AcceptError::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_accept_errors_total{{reason=\"{label}\"}} {}",
                self.sum(|s| &s.accept_errors[i])
            );
        }
        let _ = writeln!(out, "# HELP ringcast_connections_closed_total Connections closed, by reason.\n# TYPE ringcast_connections_closed_total counter");
        for (i, label) in CloseCause::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_connections_closed_total{{reason=\"{label}\"}} {}",
                self.sum(|s| &s.closed[i])
            );
        }
        let _ = writeln!(out, "# HELP ringcast_messages_in_total Messages published, by source.\n# TYPE ringcast_messages_in_total counter");
        for (i, label) in Source::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_messages_in_total{{source=\"{label}\"}} {}",
                self.sum(|s| &s.messages_in[i])
            );
        }
        let _ = writeln!(out, "# HELP ringcast_ingest_rejected_total Malformed ingest messages, by source and reason.\n# TYPE ringcast_ingest_rejected_total counter");
        for (si, source) in Source::LABELS.iter().enumerate() {
            for (ri, reason) in IngestError::LABELS.iter().enumerate() {
                let n = self.sum(|s| &s.ingest_rejected[si][ri]);
                let _ = writeln!(
                    out,
                    "ringcast_ingest_rejected_total{{source=\"{source}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP ringcast_auth_failures_total Tokens refused at the upgrade (401) or on refresh, by reason.\n# TYPE ringcast_auth_failures_total counter");
        for (i, label) in AuthError::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_auth_failures_total{{reason=\"{label}\"}} {}",
                self.sum(|s| &s.auth_failures[i])
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringcast_forbidden_total Subscribes and publishes refused with 403.\n# TYPE ringcast_forbidden_total counter\nringcast_forbidden_total {}",
            self.sum(|s| &s.forbidden)
        );
        let _ = writeln!(
            out,
            "# HELP ringcast_channels_refused_total Subscribes and publishes refused because they would create a channel past max_channels.\n# TYPE ringcast_channels_refused_total counter\nringcast_channels_refused_total {}",
            self.sum(|s| &s.channels_refused)
        );
        let _ = writeln!(out, "# HELP ringcast_users_connected Users with at least one authenticated connection.\n# TYPE ringcast_users_connected gauge\nringcast_users_connected {}", self.users.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_ring_lag Messages published but not yet consumed, per shard.\n# TYPE ringcast_ring_lag gauge");
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_ring_lag{{shard=\"{i}\"}} {}",
                s.ring_lag.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP ringcast_shard_connections Open connections per shard.\n# TYPE ringcast_shard_connections gauge");
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_shard_connections{{shard=\"{i}\"}} {}",
                s.connections.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP ringcast_channels Channels with offset state (published within channel_idle_timeout, or subscribed).\n# TYPE ringcast_channels gauge\nringcast_channels {}", self.channels.load(Relaxed));
        let h = &self.history;
        let _ = writeln!(out, "# HELP ringcast_history_messages Messages retained in channel history.\n# TYPE ringcast_history_messages gauge\nringcast_history_messages {}", h.messages.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_history_bytes Frame bytes retained in channel history (bounded by history_max_bytes).\n# TYPE ringcast_history_bytes gauge\nringcast_history_bytes {}", h.bytes.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_history_evicted_total Messages evicted from history early to stay within history_max_bytes.\n# TYPE ringcast_history_evicted_total counter\nringcast_history_evicted_total {}", h.evicted.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_owner_offsets_refused_total Messages of a store-written channel (inbox, cluster) refused because their offset did not follow the channel's last one.\n# TYPE ringcast_owner_offsets_refused_total counter\nringcast_owner_offsets_refused_total {}", h.refused_offsets.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_recoveries_total Subscribes with since, by result.\n# TYPE ringcast_recoveries_total counter");
        let _ = writeln!(
            out,
            "ringcast_recoveries_total{{result=\"recovered\"}} {}",
            self.sum(|s| &s.recovered)
        );
        let _ = writeln!(
            out,
            "ringcast_recoveries_total{{result=\"not_recovered\"}} {}",
            self.sum(|s| &s.not_recovered)
        );
        let p = &self.presence;
        let _ = writeln!(out, "# HELP ringcast_presence_channels Channels with presence kept and at least one member.\n# TYPE ringcast_presence_channels gauge\nringcast_presence_channels {}", p.channels.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_presence_members Presence members over all channels (a user once per channel, each anonymous connection once).\n# TYPE ringcast_presence_members gauge\nringcast_presence_members {}", p.members.load(Relaxed));
        let _ = writeln!(out, "# HELP ringcast_presence_events_total Join and leave events sent into the fan-out ring (once per event, not per subscriber).\n# TYPE ringcast_presence_events_total counter");
        let _ = writeln!(
            out,
            "ringcast_presence_events_total{{type=\"join\"}} {}",
            p.joins.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "ringcast_presence_events_total{{type=\"leave\"}} {}",
            p.leaves.load(Relaxed)
        );
        self.render_latency(&mut out);
        self.render_per_shard(&mut out);
        crate::procstat::render(&mut out, self.started_unix);
        self.render_inbox(&mut out);
        if let Some(cluster) = cluster {
            crate::cluster::render_metrics(cluster, &mut out);
        }
        self.render_tls(&mut out);
        let _ = writeln!(
            out,
            "# HELP ringcast_config_reloads_total Configuration reloads (SIGHUP) applied (ok) or refused (error).\n# TYPE ringcast_config_reloads_total counter\nringcast_config_reloads_total{{result=\"ok\"}} {}\nringcast_config_reloads_total{{result=\"error\"}} {}",
            self.config_reloads[0].load(Relaxed),
            self.config_reloads[1].load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringcast_ingest_unauthorized_total Publishers refused for a missing or wrong ingest_key.\n# TYPE ringcast_ingest_unauthorized_total counter\nringcast_ingest_unauthorized_total{{source=\"tcp\"}} {}\nringcast_ingest_unauthorized_total{{source=\"http\"}} {}",
            self.ingest_unauthorized[0].load(Relaxed),
            self.ingest_unauthorized[1].load(Relaxed)
        );
        self.render_ports(&mut out);
        let _ = writeln!(out, "# HELP ringcast_draining 1 from the first SIGTERM or SIGINT on (drain_grace and drain).\n# TYPE ringcast_draining gauge\nringcast_draining {}", u8::from(draining));
        out
    }

    /// The TCP ingest and admin ports' connections and refusals.
    fn render_ports(&self, out: &mut String) {
        let mut gauge = |name: &str, help: &str, f: &dyn Fn(&ShardMetrics) -> &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                self.sum(f)
            );
        };
        gauge(
            "ringcast_tcp_ingest_connections",
            "Open TCP ingest connections (bounded by max_tcp_ingest_connections).",
            &|s| &s.tcp_ingest_connections,
        );
        gauge(
            "ringcast_admin_connections",
            "Open admin-port connections (bounded by max_admin_connections).",
            &|s| &s.admin_connections,
        );
        let _ = writeln!(out, "# HELP ringcast_tcp_ingest_refused_total TCP ingest connections closed before publishing: at max_tcp_ingest_connections, or no AUTH line within ingest_auth_timeout.\n# TYPE ringcast_tcp_ingest_refused_total counter");
        for (i, label) in TcpIngestRefusal::LABELS.iter().enumerate() {
            let n = self.sum(|s| &s.tcp_ingest_refused[i]);
            let _ = writeln!(
                out,
                "ringcast_tcp_ingest_refused_total{{reason=\"{label}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP ringcast_admin_refused_total Admin connections answered 503 at max_admin_connections, and requests answered 408 when not whole within admin_request_timeout.\n# TYPE ringcast_admin_refused_total counter");
        for (i, label) in AdminRefusal::LABELS.iter().enumerate() {
            let n = self.sum(|s| &s.admin_refused[i]);
            let _ = writeln!(
                out,
                "ringcast_admin_refused_total{{reason=\"{label}\"}} {n}"
            );
        }
    }

    fn render_tls(&self, out: &mut String) {
        out.push_str("# HELP ringcast_tls_handshakes_total TLS handshakes on the tls_listen port, by result (failed: not TLS, bad ClientHello, no common version or cipher, peer gone).\n# TYPE ringcast_tls_handshakes_total counter\n");
        for (i, result) in ["ok", "failed"].into_iter().enumerate() {
            let n = self.sum(|s| &s.tls_handshakes[i]);
            let _ = writeln!(
                out,
                "ringcast_tls_handshakes_total{{result=\"{result}\"}} {n}"
            );
        }
    }

    fn render_latency(&self, out: &mut String) {
        render_histogram(
            out,
            "ringcast_delivery_latency_seconds",
            "Publish-to-written latency: per message and shard that had subscribers for it, observed when the fan-out round that wrote it has every write accepted by the kernel.",
            &self.latency,
        );
        render_histogram(
            out,
            "ringcast_handshake_duration_seconds",
            "Accept to 101 (WebSocket) or 200 (SSE, long poll) written, per completed upgrade.",
            &self.handshake,
        );
    }

    /// Per-shard gauges and counters labelled `shard="N"` (the unlabelled families are
    /// their process-wide sums).
    fn render_per_shard(&self, out: &mut String) {
        let mut family =
            |name: &str, kind: &str, help: &str, f: &dyn Fn(&ShardMetrics) -> &AtomicU64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (i, s) in self.shards.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", f(s).load(Relaxed));
                }
            };
        family(
            "ringcast_shard_send_backlog_bytes",
            "gauge",
            "Bytes waiting in per-connection send backlogs, per shard.",
            &|s| &s.backlog_bytes,
        );
        family(
            "ringcast_shard_deliveries_total",
            "counter",
            "Message frames queued to subscribers, per shard.",
            &|s| &s.deliveries,
        );
        family(
            "ringcast_shard_connections_accepted_total",
            "counter",
            "WebSocket, SSE and long-poll upgrades completed, per shard.",
            &|s| &s.accepted,
        );
    }

    fn render_inbox(&self, out: &mut String) {
        let i = &self.inbox;
        let mut counter = |name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        };
        counter(
            "ringcast_inbox_up",
            "gauge",
            "1 while the inbox store is open and writable (0 also when the inbox is off).",
            &i.up,
        );
        counter(
            "ringcast_inbox_stored_total",
            "counter",
            "Messages to user channels committed to the inbox store.",
            &i.stored,
        );
        counter(
            "ringcast_inbox_commits_total",
            "counter",
            "Inbox write transactions committed (one fsync each).",
            &i.commits,
        );
        counter(
            "ringcast_inbox_acks_total",
            "counter",
            "Client ack commands applied.",
            &i.acks,
        );
        counter(
            "ringcast_inbox_acked_messages_total",
            "counter",
            "Inbox messages removed by client acks.",
            &i.acked,
        );
        counter(
            "ringcast_inbox_expired_total",
            "counter",
            "Inbox messages deleted by the retention sweep (inbox_retention).",
            &i.expired,
        );
        counter(
            "ringcast_inbox_delivered_total",
            "counter",
            "Unacked inbox messages sent to subscribers on subscribe.",
            &i.delivered,
        );
        counter(
            "ringcast_inbox_subscribe_waits_total",
            "counter",
            "Inbox subscribes that waited for their shard's ring follower to catch up.",
            &i.subscribe_waits,
        );
        counter(
            "ringcast_inbox_acks_past_gap_total",
            "counter",
            "Inbox acks refused because they reached past a gap notice the connection got.",
            &i.acks_past_gap,
        );
        counter(
            "ringcast_inbox_publish_resent_total",
            "counter",
            "Cluster inbox publishes sent again with the same Nats-Msg-Id after an unknown outcome (0 with the redb store).",
            &i.resent,
        );
        counter(
            "ringcast_inbox_publish_deduped_total",
            "counter",
            "Re-sent cluster inbox publishes JetStream had already stored: stored and delivered once (0 with the redb store).",
            &i.deduped,
        );
        counter(
            "ringcast_inbox_offset_skips_total",
            "counter",
            "Cluster inbox publishes whose offset skipped past unacked messages retention removed (0 with the redb store).",
            &i.offset_skips,
        );
        counter(
            "ringcast_inbox_queued",
            "gauge",
            "Inbox requests queued for the store, or taken by it and not yet answered.",
            &i.queued,
        );
        counter(
            "ringcast_inbox_queue_waits_total",
            "counter",
            "TCP ingest publishes to user channels that waited for room in the full inbox queue (the connection was not read meanwhile).",
            &i.waits,
        );
        let _ = writeln!(out, "# HELP ringcast_inbox_errors_total Inbox store failures, by kind.\n# TYPE ringcast_inbox_errors_total counter");
        for (k, label) in InboxErrorKind::LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringcast_inbox_errors_total{{kind=\"{label}\"}} {}",
                i.errors[k].load(Relaxed)
            );
        }
        i.commit_latency.render(
            out,
            "ringcast_inbox_commit_seconds",
            "Duration of each inbox commit (write and fsync).",
        );
    }
}

/// Renders the sum of per-shard histograms `set` as one histogram family `name`.
fn render_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    set: &[CachePadded<LatencyHistogram>],
) {
    let total = |f: &dyn Fn(&LatencyHistogram) -> &AtomicU64| -> u64 {
        set.iter().map(|h| f(h).load(Relaxed)).sum()
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += total(&|h| &h.buckets[i]);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += total(&|h| &h.buckets[LATENCY_BUCKETS.len()]);
    let sum = total(&|h| &h.sum_micros) as f64 / 1e6;
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum}\n{name}_count {cumulative}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn observations_fall_in_the_first_bucket_that_holds_them() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(100), 0);
        assert_eq!(bucket_index(101), 1);
        assert_eq!(bucket_index(1_000), 3);
        assert_eq!(bucket_index(10_000_000), 15);
        assert_eq!(bucket_index(10_000_001), 16);
        assert_eq!(bucket_index(u64::MAX), 16);
        for (micros, seconds) in LATENCY_BUCKETS_MICROS.iter().zip(LATENCY_BUCKETS) {
            assert_eq!(*micros as f64 / 1e6, seconds);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("plain"), "plain");
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    /// Checks what `promtool check metrics` checks that a typo here could break: one HELP
    /// and one TYPE per family before its samples, `_total` on counters (and only there),
    /// histogram suffixes, no sample twice, label values without raw quotes or newlines.
    fn lint(text: &str) -> Result<(), String> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps = HashSet::new();
        let mut series = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or("");
                if !helps.insert(name.to_string()) {
                    return Err(format!("HELP twice for {name}"));
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or("TYPE without kind")?;
                if types.insert(name.to_string(), kind.to_string()).is_some() {
                    return Err(format!("TYPE twice for {name}"));
                }
                if !helps.contains(name) {
                    return Err(format!("{name}: TYPE before HELP"));
                }
                if (kind == "counter") != name.ends_with("_total") {
                    return Err(format!("{name}: {kind} and _total disagree"));
                }
            } else {
                let (id, value) = line.rsplit_once(' ').ok_or("sample without value")?;
                value
                    .parse::<f64>()
                    .map_err(|_| format!("{line}: bad value"))?;
                let name = id.split('{').next().unwrap_or("");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        let base = name.strip_suffix(s)?;
                        (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                    })
                    .unwrap_or(name);
                if !types.contains_key(family) {
                    return Err(format!("{line}: no TYPE for {family}"));
                }
                if let Some(labels) = id.strip_prefix(name) {
                    let inner = labels.trim_start_matches('{').trim_end_matches('}');
                    for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                        let (_, v) = pair.split_once("=\"").ok_or("label without value")?;
                        let v = v.trim_end_matches('"');
                        if v.contains('"') || v.contains('\n') {
                            return Err(format!("{line}: unescaped label value"));
                        }
                    }
                }
                if !series.insert(id.to_string()) {
                    return Err(format!("{id} twice"));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_exposition_passes_the_lint() {
        let metrics = Metrics::new(3);
        metrics.record_latency(0, 150);
        metrics.record_handshake(2, 20_000_000);
        metrics.shard(1).backlog_bytes.store(7, Relaxed);
        let text = metrics.render(false, None);
        lint(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(text.contains("ringcast_delivery_latency_seconds_bucket{le=\"0.00025\"} 1\n"));
        assert!(text.contains("ringcast_handshake_duration_seconds_bucket{le=\"10\"} 0\n"));
        assert!(text.contains("ringcast_handshake_duration_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("ringcast_handshake_duration_seconds_sum 20\n"));
        assert!(text.contains("ringcast_shard_send_backlog_bytes{shard=\"1\"} 7\n"));
        assert!(text.contains("ringcast_shard_send_backlog_bytes{shard=\"2\"} 0\n"));
        assert!(text.contains("process_resident_memory_bytes "));
    }

    #[test]
    fn the_lint_catches_what_it_is_for() {
        assert!(lint("# HELP a_total x\n# TYPE a_total counter\na_total 1\n").is_ok());
        assert!(lint("# HELP a x\n# TYPE a counter\na 1\n").is_err());
        assert!(lint("a 1\n").is_err());
        assert!(lint("# HELP a x\n# TYPE a gauge\na 1\na 2\n").is_err());
    }

    proptest! {
        #[test]
        fn escaped_values_hold_no_raw_quote_or_newline(value in ".*") {
            let escaped = escape_label_value(&value);
            prop_assert!(!escaped.contains('\n'));
            // Every quote is preceded by an odd run of backslashes.
            let bytes = escaped.as_bytes();
            for (i, &b) in bytes.iter().enumerate() {
                if b == b'"' {
                    let run = bytes[..i].iter().rev().take_while(|&&c| c == b'\\').count();
                    prop_assert!(run % 2 == 1);
                }
            }
        }

        #[test]
        fn any_observation_lands_in_one_bucket(micros in any::<u64>()) {
            let h = LatencyHistogram::default();
            h.record(micros);
            let counted: u64 = h.buckets.iter().map(|b| b.load(Relaxed)).sum();
            prop_assert_eq!(counted, 1);
        }
    }
}
