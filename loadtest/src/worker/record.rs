//! What a worker's connections observe, gathered in one place per worker process.
//!
//! [`Recorder`] holds the running delivery counters and latency histograms. The worker
//! drains its per-tick part into a [`Tick`] every 250 ms and, at the end, combines the
//! totals with every connection's [`SeqTracker`](crate::seq::SeqTracker) into a
//! [`WorkerFinal`].

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::conn::Conn;
use crate::ipc::{Tick, WorkerFinal};
use crate::stats::{self, CloseCodes, GroupStats};

/// Per-worker sink for deliveries, closes and failures.
pub struct Recorder {
    /// Unix nanoseconds of the read being processed (one clock read per `read()`).
    pub now_ns: u64,
    /// Counters since the last tick.
    pub tick: Tick,
    /// Healthy latency since the last tick.
    pub tick_latency: Histogram<u64>,
    /// Healthy latency over the whole run.
    pub healthy_latency: Histogram<u64>,
    /// Slow latency over the whole run.
    pub slow_latency: Histogram<u64>,
    /// Messages without a `seq`, [healthy, slow].
    pub unparsed: [u64; 2],
    /// Close codes received, [healthy, slow].
    pub close_codes: [CloseCodes; 2],
    /// Failed attempts by cause.
    pub failures: BTreeMap<String, u64>,
    /// Pongs or closes that could not be written.
    pub write_errors: u64,
    /// Unix ns of the first and the latest healthy delivery.
    pub delivery_span: Option<(u64, u64)>,
}

impl Recorder {
    /// Empty counters.
    pub fn new() -> Recorder {
        Recorder {
            now_ns: 0,
            tick: Tick::default(),
            tick_latency: stats::new_hist(),
            healthy_latency: stats::new_hist(),
            slow_latency: stats::new_hist(),
            unparsed: [0; 2],
            close_codes: [BTreeMap::new(), BTreeMap::new()],
            failures: BTreeMap::new(),
            write_errors: 0,
            delivery_span: None,
        }
    }

    /// One message with a `seq` arrived; `latency` in nanoseconds when it carried `ts`.
    pub fn delivery(&mut self, slow: bool, latency: Option<u64>) {
        if slow {
            self.tick.slow_deliveries += 1;
            if let Some(ns) = latency {
                stats::record(&mut self.slow_latency, ns);
            }
        } else {
            self.tick.deliveries += 1;
            let now = self.now_ns;
            let span = self.delivery_span.get_or_insert((now, now));
            span.1 = now;
            if let Some(ns) = latency {
                stats::record(&mut self.healthy_latency, ns);
                stats::record(&mut self.tick_latency, ns);
            }
        }
    }

    /// A message without a `seq` arrived.
    pub fn unparsed(&mut self, slow: bool) {
        self.unparsed[usize::from(slow)] += 1;
    }

    /// An attempt failed for `cause`.
    pub fn failure(&mut self, cause: &str) {
        self.tick.failures += 1;
        *self.failures.entry(cause.to_owned()).or_insert(0) += 1;
    }

    /// An open connection was ended by the server with `code`.
    pub fn closed(&mut self, slow: bool, code: u16) {
        self.tick.closes += 1;
        *self.close_codes[usize::from(slow)]
            .entry(code.to_string())
            .or_insert(0) += 1;
    }

    /// Takes the tick counters, leaving zeros; gauges are filled by the caller.
    pub fn take_tick(&mut self) -> Tick {
        let mut tick = std::mem::take(&mut self.tick);
        tick.latency = stats::to_pairs(&self.tick_latency);
        self.tick_latency.reset();
        tick
    }

    /// The final report: run totals plus every subscriber's accounting for `published`.
    pub fn finish(&self, conns: &[Conn], published: u64) -> WorkerFinal {
        let mut groups = [GroupStats::default(), GroupStats::default()];
        for conn in conns.iter().filter(|c| c.ever_open) {
            let group = &mut groups[usize::from(conn.slow)];
            let summary = conn.tracker.summary(published);
            group.subscribers += 1;
            group.max_lost_per_subscriber = group.max_lost_per_subscriber.max(summary.lost);
            group.seq.add(&summary);
        }
        for (i, group) in groups.iter_mut().enumerate() {
            group.unparsed = self.unparsed[i];
            group.close_codes = self.close_codes[i].clone();
        }
        groups[0].latency = stats::to_pairs(&self.healthy_latency);
        groups[1].latency = stats::to_pairs(&self.slow_latency);
        let [healthy, slow] = groups;
        WorkerFinal {
            failures: self.failures.clone(),
            healthy,
            slow,
            write_errors: self.write_errors,
            delivery_span_ns: self.delivery_span,
            cpu_secs: own_cpu_secs(),
            ..WorkerFinal::default()
        }
    }
}

/// CPU seconds (user + system) used by this process so far.
pub fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass; RUSAGE_SELF is valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
