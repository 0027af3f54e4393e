//! Process-wide counters, rendered in the Prometheus text format by the admin server.
//!
//! Counters live per shard in cache-padded blocks: a shard only ever writes its own block
//! (relaxed atomics, no sharing on the hot path), and a scrape sums the blocks.

use crate::ingest::line::IngestError;
use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

/// Why a connection closed (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseCause {
    /// The client sent a close frame.
    ClientClose = 0,
    /// The peer vanished (EOF or reset).
    PeerGone,
    /// No traffic within ping interval + pong timeout.
    Dead,
    /// Slow consumer past its drop limit (1013).
    SlowConsumer,
    /// A framing violation (1002/1003/1007/1009).
    ProtocolError,
    /// Inbound flood (1008).
    Policy,
    /// Drained on shutdown (1001).
    Drain,
    /// I/O error on the socket.
    IoError,
}

impl CloseCause {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 8] = [
        "client_close",
        "peer_gone",
        "dead",
        "slow_consumer",
        "protocol_error",
        "policy",
        "drain",
        "io_error",
    ];
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
}

impl Source {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 3] = ["udp", "tcp", "http"];
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
    /// Connections refused at the connection limit (503).
    pub refused_full: AtomicU64,
    /// Connections closed, by [`CloseCause`].
    pub closed: [AtomicU64; 8],
    /// Messages lost to ring overrun.
    pub ring_overrun_lost: AtomicU64,
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
    pub messages_in: [AtomicU64; 3],
    /// Ingest messages rejected, by source and [`IngestError`] label.
    pub ingest_rejected: [[AtomicU64; 4]; 3],
    /// Client commands handled.
    pub commands: AtomicU64,
    /// Pings sent by the server.
    pub pings_sent: AtomicU64,
}

/// All shards' counters plus the delivery latency histograms.
pub struct Metrics {
    shards: Box<[CachePadded<ShardMetrics>]>,
    latency: Box<[Mutex<Histogram<u64>>]>,
    /// Channels with offset state in the publisher (gauge; process-wide, not per shard).
    pub channels: AtomicU64,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Initializes the metrics for `shards` shards; later calls keep the first.
pub fn init(shards: usize) -> &'static Metrics {
    METRICS.get_or_init(|| Metrics {
        shards: (0..shards)
            .map(|_| CachePadded::new(ShardMetrics::default()))
            .collect(),
        latency: (0..shards)
            .map(|_| {
                // Three significant figures up to one minute, in microseconds: fixed ~40 KB.
                // The bounds are constants within hdrhistogram's limits: cannot fail.
                Mutex::new(
                    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid constant bounds"),
                )
            })
            .collect(),
        channels: AtomicU64::new(0),
    })
}

/// The global metrics (initialized with one shard if `init` was never called).
pub fn get() -> &'static Metrics {
    init(1)
}

impl Metrics {
    /// The counters of `shard`.
    pub fn shard(&self, shard: usize) -> &ShardMetrics {
        &self.shards[shard % self.shards.len()]
    }

    /// Records one message's ingest-to-send latency on `shard`.
    pub fn record_latency(&self, shard: usize, micros: u64) {
        if let Some(h) = self.latency.get(shard) {
            let _ = h.lock().record(micros.clamp(1, 60_000_000));
        }
    }

    /// Sum of a counter over all shards.
    pub fn sum(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self, draining: bool) -> String {
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
            "ringcast_connections_refused_total",
            "counter",
            "Connections refused at the connection limit (503).",
            &|s| &s.refused_full,
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
        let _ = writeln!(out, "# HELP ringcast_channels Channels with offset state (published within channel_idle_timeout).\n# TYPE ringcast_channels gauge\nringcast_channels {}", self.channels.load(Relaxed));
        self.render_latency(&mut out);
        let _ = writeln!(out, "# HELP ringcast_draining 1 while a drain is in progress.\n# TYPE ringcast_draining gauge\nringcast_draining {}", u8::from(draining));
        out
    }

    fn render_latency(&self, out: &mut String) {
        let mut merged = Histogram::<u64>::new(3).expect("histogram with 3 sigfigs");
        for h in self.latency.iter() {
            let _ = merged.add(&*h.lock());
        }
        let _ = writeln!(
            out,
            "# HELP ringcast_delivery_latency_seconds Ingest-to-send latency per message per shard.\n\
             # TYPE ringcast_delivery_latency_seconds summary"
        );
        for q in [0.5, 0.9, 0.99, 0.999] {
            let v = merged.value_at_quantile(q) as f64 / 1e6;
            let _ = writeln!(
                out,
                "ringcast_delivery_latency_seconds{{quantile=\"{q}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "ringcast_delivery_latency_seconds_count {}",
            merged.len()
        );
    }
}
