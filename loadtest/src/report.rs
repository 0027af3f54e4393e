//! Results of a run: the JSON document written by `--json` (schema `ringcast-load/1`,
//! documented in docs/loadtest.md) and the summary table printed at the end.
//!
//! All latencies are microseconds; all sizes bytes; all rates per second. A section that
//! does not apply to the scenario is `null`.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::fleet::Live;
use crate::ipc::WorkerFinal;
use crate::publish::PublishReport;
use crate::stats::{self, CloseCodes, GroupStats, Percentiles};

/// The whole result document.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// Always `ringcast-load/1`.
    pub schema: &'static str,
    /// connect, fanout, latency, storm, slow or recover.
    pub scenario: String,
    /// Subscriber URL.
    pub url: String,
    /// Unix ms at the start.
    pub started_unix_ms: u64,
    /// Wall-clock seconds of the run.
    pub elapsed_secs: f64,
    /// False when `--timeout` cut the run short.
    pub completed: bool,
    /// Connection numbers.
    pub connections: ConnResults,
    /// Publisher numbers (scenarios that publish).
    pub publishing: Option<PubResults>,
    /// Deliveries to (healthy) subscribers.
    pub delivery: Option<DeliveryResults>,
    /// Deliveries to slow subscribers (scenario `slow`).
    pub slow: Option<DeliveryResults>,
    /// Reconnect storm numbers (scenario `storm`).
    pub storm: Option<StormResults>,
    /// Recovery numbers (scenario `recover`).
    pub recover: Option<RecoverResults>,
    /// Server cost ratios (`--server-pid`).
    pub server: Option<ServerResults>,
    /// The harness's own cost.
    pub client: ClientResults,
    /// One point per second of the run.
    pub timeline: Vec<TimelinePoint>,
    /// Per node of a `--targets` run (null otherwise).
    pub targets: Option<Vec<TargetResults>>,
    /// Seconds the timeline covers (from the workers' start to their last report); the
    /// last point is a partial second when this is below its `t + 1`.
    pub timeline_secs: f64,
    /// Findings that mean the server (or the run) misbehaved: losses, failures, timeouts.
    pub problems: Vec<String>,
    /// Things worth knowing that are not failures (system limits, sampling gaps).
    pub warnings: Vec<String>,
}

/// One node of a `--targets` run.
#[derive(Debug, Default, Serialize)]
pub struct TargetResults {
    /// Its subscriber URL.
    pub url: String,
    /// Subscribers asked for there.
    pub requested: u64,
    /// Subscribers there that completed a handshake at least once.
    pub connected: u64,
    /// Open there when the run ended.
    pub open_at_end: u64,
    /// Failed attempts there.
    pub failed: u64,
    /// Deliveries received there (healthy and slow subscribers).
    pub received: u64,
    /// Worker processes assigned to it.
    pub workers: usize,
    /// Source addresses its connections were bound to (empty: the kernel's choice).
    pub source_ips: Vec<String>,
}

/// Connection numbers.
#[derive(Debug, Default, Serialize)]
pub struct ConnResults {
    /// Subscribers asked for.
    pub requested: u64,
    /// Subscribers that completed a handshake at least once.
    pub connected: u64,
    /// Handshakes completed, reconnects included.
    pub handshakes: u64,
    /// Open when the run ended.
    pub open_at_end: u64,
    /// Failed attempts, all causes.
    pub failed: u64,
    /// Failed attempts by cause.
    pub failures: BTreeMap<String, u64>,
    /// Close codes received from the server, all subscribers.
    pub close_codes: CloseCodes,
    /// Worker processes.
    pub workers: usize,
    /// Source addresses used.
    pub source_ips: usize,
    /// Seconds from the first attempt to the last one resolved.
    pub ramp_secs: f64,
    /// Subscribers connected per second of ramp.
    pub connect_rate: f64,
    /// Handshake latency (socket creation to validated 101).
    pub handshake_us: Percentiles,
}

/// Publisher numbers.
#[derive(Debug, Default, Serialize)]
pub struct PubResults {
    /// Endpoint URL.
    pub endpoint: String,
    /// Channel.
    pub channel: String,
    /// Messages accepted.
    pub messages: u64,
    /// Messages refused or not sent.
    pub errors: u64,
    /// Requested rate (0: burst).
    pub target_rate: f64,
    /// Achieved rate.
    pub achieved_rate: f64,
    /// Seconds spent publishing.
    pub secs: f64,
    /// Payload size asked for.
    pub size: usize,
}

/// Delivery accounting of a group of subscribers.
#[derive(Debug, Default, Serialize)]
pub struct DeliveryResults {
    /// Subscribers in the group.
    pub subscribers: u64,
    /// subscribers × published.
    pub expected: u64,
    /// Deliveries, duplicates included.
    pub received: u64,
    /// Distinct (subscriber, message) deliveries.
    pub unique: u64,
    /// expected − unique.
    pub lost: u64,
    /// Repeated deliveries.
    pub duplicates: u64,
    /// Deliveries older than one already seen.
    pub out_of_order: u64,
    /// Forward jumps in seq.
    pub gap_events: u64,
    /// Offsets the server skipped and said so (backpressure).
    pub offset_skipped: u64,
    /// Offsets that did not grow: a server bug.
    pub offset_regressions: u64,
    /// Messages without a usable seq.
    pub unparsed: u64,
    /// Most messages lost by one subscriber.
    pub max_lost_per_subscriber: u64,
    /// received / delivery window.
    pub deliveries_per_sec: f64,
    /// From the first publish to the last delivery, seconds.
    pub window_secs: f64,
    /// Publish-to-receive latency.
    pub latency_us: Percentiles,
    /// Close codes received by the group.
    pub close_codes: CloseCodes,
}

impl PubResults {
    /// Publisher numbers from its final report.
    pub fn new(
        endpoint: &str,
        channel: String,
        sent: &PublishReport,
        target_rate: f64,
        size: usize,
    ) -> PubResults {
        PubResults {
            endpoint: endpoint.to_owned(),
            channel,
            messages: sent.sent,
            errors: sent.errors,
            target_rate,
            achieved_rate: if sent.secs > 0.0 {
                sent.sent as f64 / sent.secs
            } else {
                0.0
            },
            secs: sent.secs,
            size,
        }
    }
}

impl DeliveryResults {
    /// Builds the group's numbers for `published` messages delivered within `window_secs`.
    pub fn of(group: &GroupStats, published: u64, window_secs: f64) -> DeliveryResults {
        DeliveryResults {
            subscribers: group.subscribers,
            expected: group.subscribers * published,
            received: group.seq.received,
            unique: group.seq.unique,
            lost: group.seq.lost,
            duplicates: group.seq.duplicates,
            out_of_order: group.seq.out_of_order,
            gap_events: group.seq.gap_events,
            offset_skipped: group.seq.offset_skipped,
            offset_regressions: group.seq.offset_regressions,
            unparsed: group.unparsed + group.seq.invalid,
            max_lost_per_subscriber: group.max_lost_per_subscriber,
            deliveries_per_sec: if window_secs > 0.0 {
                group.seq.received as f64 / window_secs
            } else {
                0.0
            },
            window_secs,
            latency_us: group.percentiles(),
            close_codes: group.close_codes.clone(),
        }
    }
}

/// Reconnect storm numbers.
#[derive(Debug, Default, Serialize)]
pub struct StormResults {
    /// drop or server-restart.
    pub mode: String,
    /// Whether every subscriber was back before the wait ran out.
    pub all_back: bool,
    /// From the first connection lost to the last one back, milliseconds.
    pub time_to_all_back_ms: Option<f64>,
    /// Per-subscriber time from the storm's start to being open again.
    pub reconnect_us: Percentiles,
    /// Messages lost by subscribers over the run (mostly while disconnected).
    pub lost: u64,
}

/// Recovery storm numbers (scenario `recover`).
#[derive(Debug, Default, Serialize)]
pub struct RecoverResults {
    /// Channels the subscribers were spread over.
    pub channels: u64,
    /// Subscribers that got their first position (subscribe reply).
    pub subscribed: u64,
    /// Subscribers that got an answer to their subscribe with `since` after the drop.
    pub resubscribed: u64,
    /// `"recovered":true` replies.
    pub recovered: u64,
    /// `"recovered":false` replies.
    pub not_recovered: u64,
    /// `"recovered":false` replies by `reason`.
    pub not_recovered_reasons: BTreeMap<String, u64>,
    /// Subscribe replies that failed, by code.
    pub reply_errors: BTreeMap<String, u64>,
    /// Every subscriber got `"recovered":true` after the drop.
    pub all_recovered: bool,
    /// From the drop to the last subscriber's `"recovered":true` reply, milliseconds.
    pub time_to_all_recovered_ms: Option<f64>,
    /// Per subscriber: drop to its `"recovered":true` reply.
    pub time_to_recovered_us: Percentiles,
    /// From the drop to the last subscriber's last replayed message, milliseconds.
    pub time_to_all_caught_up_ms: Option<f64>,
    /// Per subscriber: drop to its last replayed message.
    pub time_to_caught_up_us: Percentiles,
    /// The bound asked for (`--within`), seconds.
    pub within_secs: f64,
    /// Messages delivered as replay after a recovered reply.
    pub replayed: u64,
    /// Messages delivered live.
    pub live: u64,
    /// Gap notices received (the server skipped offsets for a slow subscriber).
    pub gap_notices: u64,
    /// Messages at or below a subscriber's first position.
    pub below_position: u64,
    /// Messages that arrived before any subscribe reply.
    pub before_subscribe: u64,
    /// Replies whose epoch differed from the subscriber's first one.
    pub epoch_changes: u64,
    /// Subscribers with any gap, duplicate, reordering or failed recovery.
    pub subscribers_with_problems: u64,
    /// Server CPU seconds from the drop until every subscriber had its answer.
    pub server_cpu_recovery_secs: Option<f64>,
}

/// Server cost ratios from /proc sampling.
#[derive(Debug, Default, Serialize)]
pub struct ServerResults {
    /// The sampled pid (the first one when several were given).
    pub pid: u32,
    /// Every sampled pid; the figures below are their sums.
    pub pids: Vec<u32>,
    /// RSS before any connection.
    pub rss_before_bytes: u64,
    /// RSS with all subscribers connected.
    pub rss_connected_bytes: u64,
    /// RSS at the end.
    pub rss_end_bytes: u64,
    /// (rss_connected − rss_before) / connected subscribers.
    pub rss_per_connection_bytes: f64,
    /// Server CPU seconds spent during the connect phase.
    pub cpu_connect_secs: f64,
    /// Server CPU seconds from the first publish to the end of the drain.
    pub cpu_delivery_secs: f64,
    /// Deliveries (all subscribers) / cpu_delivery_secs.
    pub deliveries_per_cpu_sec: Option<f64>,
    /// Server CPU use during delivery, percent of one core.
    pub cpu_percent_during_delivery: f64,
}

/// The harness's own cost.
#[derive(Debug, Default, Serialize)]
pub struct ClientResults {
    /// CPU seconds used by the worker processes.
    pub worker_cpu_secs: f64,
}

/// One second of the run.
#[derive(Debug, Default, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the workers started.
    pub t: u64,
    /// Connections open.
    pub open: u64,
    /// Handshakes completed.
    pub connects: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Server-side endings.
    pub closes: u64,
    /// Healthy deliveries.
    pub deliveries: u64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// Maximum latency.
    pub max_us: f64,
    /// Latency samples in this second (0: the percentiles mean nothing).
    pub latency_samples: u64,
    /// Worker reports in this second (0: no sample at all, the counts mean nothing).
    pub reports: u64,
}

/// Per-second points from the fleet's timeline.
pub fn timeline(live: &Live) -> Vec<TimelinePoint> {
    live.timeline
        .iter()
        .enumerate()
        .map(|(t, b)| {
            let p = Percentiles::of(&b.latency);
            TimelinePoint {
                t: t as u64,
                open: b.open,
                connects: b.connects,
                failures: b.failures,
                closes: b.closes,
                deliveries: b.deliveries,
                p50_us: p.p50,
                p99_us: p.p99,
                max_us: p.max,
                latency_samples: p.count,
                reports: b.reports,
            }
        })
        .collect()
}

/// Connection numbers from the workers' final reports.
pub fn connections(finals: &[WorkerFinal], requested: u64, sources: usize) -> ConnResults {
    let mut out = ConnResults {
        requested,
        workers: finals.len(),
        source_ips: sources,
        ..ConnResults::default()
    };
    let mut handshake = stats::new_hist();
    for f in finals {
        out.connected += f.healthy.subscribers + f.slow.subscribers;
        out.handshakes += f.connects;
        out.open_at_end += f.open_at_end;
        stats::add_counts(&mut out.failures, &f.failures);
        stats::add_counts(&mut out.close_codes, &f.healthy.close_codes);
        stats::add_counts(&mut out.close_codes, &f.slow.close_codes);
        stats::merge_pairs(&mut handshake, &f.handshake);
    }
    out.failed = out.failures.values().sum();
    out.handshake_us = Percentiles::of(&handshake);
    let start = finals.iter().filter_map(|f| f.ramp_start_ms).min();
    let end = finals.iter().filter_map(|f| f.ramp_end_ms).max();
    if let (Some(start), Some(end)) = (start, end) {
        out.ramp_secs = end.saturating_sub(start) as f64 / 1000.0;
        out.connect_rate = out.connected as f64 / out.ramp_secs.max(0.001);
    }
    out
}
