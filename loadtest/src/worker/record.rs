//! What a worker's connections observe, gathered in one place per worker process.
//!
//! [`Recorder`] holds the running delivery counters and latency histograms. The worker
//! drains its per-tick part into a [`Tick`] every 250 ms and, at the end, combines the
//! totals with every connection's [`SeqTracker`](crate::seq::SeqTracker) into a
//! [`WorkerFinal`].

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::conn::Conn;
use crate::ipc::{RecoverFinal, Tick, WorkerFinal};
use crate::recover::{Event, RecoverTracker};
use crate::stats::{self, CloseCodes, GroupStats};

/// What a worker's `recover` subscribers did after the last `Drop`.
pub struct RecoverRec {
    /// Subscribers that have their first position.
    pub subscribed: u64,
    /// Subscribers answered since the last drop.
    pub resubscribed: u64,
    /// Unix ns of the last drop.
    pub drop_ns: Option<u64>,
    /// Unix ns of the latest `"recovered":true` reply.
    pub last_recovered_ns: Option<u64>,
    /// Unix ns of the latest catch-up.
    pub last_caught_up_ns: Option<u64>,
    /// Drop to recovered reply.
    pub recovered: Histogram<u64>,
    /// Drop to last replayed message.
    pub caught_up: Histogram<u64>,
}

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
    /// Scenario `recover`.
    pub recover: RecoverRec,
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
            recover: RecoverRec {
                subscribed: 0,
                resubscribed: 0,
                drop_ns: None,
                last_recovered_ns: None,
                last_caught_up_ns: None,
                recovered: stats::new_hist(),
                caught_up: stats::new_hist(),
            },
        }
    }

    /// A `recover` subscriber's reply or catch-up: keeps the gauges and times it against
    /// the drop it is recovering from.
    pub fn recover_event(&mut self, t: &mut RecoverTracker, event: Event) {
        let now = self.now_ns;
        let rr = &mut self.recover;
        if event == Event::Subscribed {
            rr.subscribed += 1;
        }
        let Some(dropped) = t.dropped_at_ns else {
            return;
        };
        let since = now.saturating_sub(dropped);
        let first_answer = event != Event::CaughtUp && !t.answered;
        if first_answer {
            t.answered = true;
            rr.resubscribed += 1;
        }
        let caught_up = match event {
            Event::Recovered { caught_up } if first_answer => {
                stats::record(&mut rr.recovered, since);
                rr.last_recovered_ns = Some(rr.last_recovered_ns.map_or(now, |l| l.max(now)));
                caught_up
            }
            Event::CaughtUp => true,
            Event::Recovered { .. } | Event::Subscribed | Event::NotRecovered | Event::Failed => {
                t.dropped_at_ns = None;
                false
            }
        };
        if caught_up {
            t.dropped_at_ns = None;
            stats::record(&mut rr.caught_up, since);
            rr.last_caught_up_ns = Some(rr.last_caught_up_ns.map_or(now, |l| l.max(now)));
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
        let mut recover: Option<RecoverFinal> = None;
        for conn in conns {
            let Some(t) = conn.recover.as_deref() else {
                continue;
            };
            let out = recover.get_or_insert_with(RecoverFinal::default);
            out.counts.add(&t.counts);
            out.expected += t.expected(published);
            out.subscribers_with_problems += u64::from(t.has_problem(published));
        }
        if let Some(out) = recover.as_mut() {
            let rr = &self.recover;
            let ms = |ns: Option<u64>| ns.map(|ns| ns / 1_000_000);
            out.drop_ms = ms(rr.drop_ns);
            out.last_recovered_ms = ms(rr.last_recovered_ns);
            out.last_caught_up_ms = ms(rr.last_caught_up_ns);
            out.recovered = stats::to_pairs(&rr.recovered);
            out.caught_up = stats::to_pairs(&rr.caught_up);
        }
        for conn in conns.iter().filter(|c| c.ever_open) {
            let group = &mut groups[usize::from(conn.slow)];
            let summary = match conn.recover.as_deref() {
                Some(t) => t.summary(published),
                None => conn.tracker.summary(published),
            };
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
            recover,
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
