//! Waiting, bounded: idling while workers report, following the publisher, draining
//! deliveries until they are all in or stop arriving; and the delivery arithmetic the
//! scenarios share once the workers' final reports are in.

use std::time::{Duration, Instant};

use super::{Run, ScenarioError};
use crate::fleet::{Fleet, Live};
use crate::ipc::WorkerFinal;
use crate::publish::Publisher;
use crate::report;
use crate::stats;

impl Run {
    /// Processes worker messages for `secs` (bounded by the deadline).
    ///
    /// # Errors
    /// A worker failed.
    pub fn idle(&mut self, fleet: &mut Fleet, secs: f64) -> Result<(), ScenarioError> {
        let until = (Instant::now() + Duration::from_secs_f64(secs.max(0.0))).min(self.deadline);
        fleet.wait_until(until, |_| false)?;
        Ok(())
    }

    /// Waits for the publisher to finish, showing its progress.
    ///
    /// # Errors
    /// A worker failed.
    pub fn await_publisher(
        &mut self,
        fleet: &mut Fleet,
        publisher: &Publisher,
        total: u64,
    ) -> Result<(), ScenarioError> {
        while !publisher.is_done() {
            if Instant::now() >= self.deadline {
                publisher.stop();
                self.timeout("publishing");
            }
            fleet.status = format!(
                "published {}/{total} (errors {})",
                publisher.sent(),
                publisher.errors()
            );
            let until = (Instant::now() + Duration::from_millis(100))
                .min(self.deadline + Duration::from_secs(1));
            fleet.wait_until(until, |_| false)?;
        }
        fleet.status = format!("published {}", publisher.sent());
        Ok(())
    }

    /// Waits until `count` reaches `target`, or stays unchanged for `idle`, or `max_secs`
    /// pass. Returns whether the target was reached.
    ///
    /// # Errors
    /// A worker failed.
    pub fn drain(
        &mut self,
        fleet: &mut Fleet,
        count: fn(&Live) -> u64,
        target: u64,
        idle: Duration,
        max_secs: f64,
    ) -> Result<bool, ScenarioError> {
        let until =
            (Instant::now() + Duration::from_secs_f64(max_secs.max(0.0))).min(self.deadline);
        let mut last = u64::MAX;
        let mut since = Instant::now();
        fleet.wait_until(until, |live| {
            let now = count(live);
            if now != last {
                last = now;
                since = Instant::now();
            }
            now >= target || since.elapsed() >= idle
        })?;
        Ok(count(&fleet.live) >= target)
    }
}

/// Merges the healthy and slow groups of all workers.
pub fn merge_groups(finals: &[WorkerFinal]) -> (stats::GroupStats, stats::GroupStats) {
    let mut healthy = stats::GroupStats::default();
    let mut slow = stats::GroupStats::default();
    for f in finals {
        healthy.merge(&f.healthy);
        slow.merge(&f.slow);
    }
    (healthy, slow)
}

/// Seconds from `start_ns` to the latest healthy delivery of any worker.
pub fn delivery_window(finals: &[WorkerFinal], start_ns: u64) -> f64 {
    let last = finals
        .iter()
        .filter_map(|f| f.delivery_span_ns)
        .map(|(_, last)| last)
        .max();
    last.map_or(0.0, |last| last.saturating_sub(start_ns) as f64 / 1e9)
}

/// Adds the usual delivery problems of a group to `problems`.
pub fn delivery_problems(problems: &mut Vec<String>, who: &str, d: &report::DeliveryResults) {
    if d.lost > 0 {
        problems.push(format!(
            "{who}: {} of {} expected deliveries lost (worst subscriber lost {})",
            d.lost, d.expected, d.max_lost_per_subscriber
        ));
    }
    if d.duplicates > 0 {
        problems.push(format!("{who}: {} duplicate deliveries", d.duplicates));
    }
    if d.out_of_order > 0 {
        problems.push(format!("{who}: {} deliveries out of order", d.out_of_order));
    }
    if d.offset_regressions > 0 {
        problems.push(format!(
            "{who}: {} offsets did not increase",
            d.offset_regressions
        ));
    }
}
