//! Counters and latency histograms, in the shapes workers send and the parent merges.
//!
//! Latencies are recorded in nanoseconds into HdrHistogram (3 significant digits). A
//! histogram crosses the process boundary as its non-empty buckets, `[[value, count], …]`,
//! which is compact for the latency spreads seen here and merges losslessly at that
//! precision. [`Percentiles`] is the reporting form, in microseconds.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::seq::SeqSummary;

/// Counts by close code. Keys are the codes as decimal strings: JSON object keys are
/// strings, and worker messages must round-trip through an internally tagged enum.
pub type CloseCodes = BTreeMap<String, u64>;

/// Non-empty buckets of a histogram: `(value, count)` pairs, values in nanoseconds.
pub type HistPairs = Vec<(u64, u64)>;

/// A fresh nanosecond histogram that grows as needed.
pub fn new_hist() -> Histogram<u64> {
    match Histogram::new(3) {
        Ok(hist) => hist,
        // Creation only fails for a precision above 5 significant digits.
        Err(err) => unreachable!("3-digit histogram: {err}"),
    }
}

/// Records `value` (nanoseconds), clamping to at least 1.
pub fn record(hist: &mut Histogram<u64>, value: u64) {
    // Auto-resizing histograms only refuse values beyond u64 range; nothing to report then.
    let _ = hist.record(value.max(1));
}

/// The non-empty buckets of `hist`.
pub fn to_pairs(hist: &Histogram<u64>) -> HistPairs {
    hist.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds buckets received from a worker into `hist`.
pub fn merge_pairs(hist: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        let _ = hist.record_n(value.max(1), count);
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Smallest sample.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Summarises a nanosecond histogram.
    pub fn of(hist: &Histogram<u64>) -> Percentiles {
        if hist.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: hist.len(),
            min: us(hist.min()),
            mean: hist.mean() / 1000.0,
            p50: us(hist.value_at_quantile(0.50)),
            p90: us(hist.value_at_quantile(0.90)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        }
    }
}

/// Everything about one group of subscribers (healthy or slow) from one worker.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct GroupStats {
    /// Subscribers in the group that completed a handshake at least once.
    pub subscribers: u64,
    /// Summed per-subscriber delivery accounting.
    pub seq: SeqSummary,
    /// The most messages any one subscriber of the group lost.
    pub max_lost_per_subscriber: u64,
    /// Text/binary messages that carried no `seq` (command replies, foreign traffic).
    pub unparsed: u64,
    /// Close frames received from the server, by close code (1006: closed without one).
    pub close_codes: CloseCodes,
    /// Delivery latency (receive time minus publish time), nanosecond buckets.
    pub latency: HistPairs,
}

impl GroupStats {
    /// Folds `other` into `self`.
    pub fn merge(&mut self, other: &GroupStats) {
        self.subscribers += other.subscribers;
        self.seq.add(&other.seq);
        self.max_lost_per_subscriber = self
            .max_lost_per_subscriber
            .max(other.max_lost_per_subscriber);
        self.unparsed += other.unparsed;
        add_counts(&mut self.close_codes, &other.close_codes);
        let mut hist = new_hist();
        merge_pairs(&mut hist, &self.latency);
        merge_pairs(&mut hist, &other.latency);
        self.latency = to_pairs(&hist);
    }

    /// Latency percentiles of the group.
    pub fn percentiles(&self) -> Percentiles {
        let mut hist = new_hist();
        merge_pairs(&mut hist, &self.latency);
        Percentiles::of(&hist)
    }
}

/// Adds every count of `from` into `into`.
pub fn add_counts<K: Ord + Clone>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (key, n) in from {
        *into.entry(key.clone()).or_insert(0) += n;
    }
}

/// Formats a microsecond value for humans: `850us`, `12.3ms`, `2.10s`.
pub fn human_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Formats a count with k/M suffixes.
pub fn human_count(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_merge() {
        let mut a = new_hist();
        (1..=1000u64).for_each(|v| record(&mut a, v * 1000));
        let mut b = new_hist();
        merge_pairs(&mut b, &to_pairs(&a));
        assert_eq!(a.len(), b.len());
        let p = Percentiles::of(&b);
        assert!((p.p50 - 500.0).abs() < 2.0, "{p:?}");
        assert!((p.max - 1000.0).abs() < 2.0, "{p:?}");
        let mut g = GroupStats {
            latency: to_pairs(&a),
            ..GroupStats::default()
        };
        g.close_codes.insert("1013".into(), 1);
        let other = g.clone();
        g.merge(&other);
        assert_eq!(g.percentiles().count, 2000);
        assert_eq!(g.close_codes.get("1013"), Some(&2));
    }

    #[test]
    fn humans_read_units() {
        assert_eq!(human_us(850.0), "850us");
        assert_eq!(human_us(12_300.0), "12.30ms");
        assert_eq!(human_count(45_100.0), "45.1k");
    }
}
