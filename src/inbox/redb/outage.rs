//! What the store thread remembers about failures: which errors it logged when (so a
//! failing disk writes one line per kind per 10 s, not one per request), and whether
//! the store is down (no write has succeeded since a failure), with the backoff of its
//! own checks for when it can write again.
//!
//! Pure bookkeeping: callers pass in `now`, and act (reopen, probe, log) on the answers.

use crate::inbox::{ErrorKind, StoreError};
use std::time::{Duration, Instant};

/// Least time between two log lines about the same kind of store error, and between two
/// lines saying the store writes again.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The first wait before the store checks by itself whether it can write again.
pub const PROBE_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between two such checks: each reopens (and so repairs) the file,
/// which takes time proportional to its size, so they back off while the cause lasts.
pub const PROBE_AT_MOST_EVERY: Duration = Duration::from_secs(30);

/// Rate-limits error logs: one line per kind per [`LOG_EVERY`], with how many were not
/// logged.
#[derive(Debug, Default)]
pub struct ErrorLog {
    last: [Option<Instant>; ErrorKind::LABELS.len()],
    suppressed: [u64; ErrorKind::LABELS.len()],
    recovered: Option<Instant>,
}

impl ErrorLog {
    /// Logs that `what` failed with `error`, unless a line of its kind was logged less
    /// than [`LOG_EVERY`] ago (then it is counted in the next line's `suppressed`).
    pub fn log(&mut self, error: &StoreError, what: &str) {
        let k = error.kind as usize;
        if self.last[k].is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.suppressed[k] += 1;
            return;
        }
        self.last[k] = Some(Instant::now());
        let suppressed = std::mem::take(&mut self.suppressed[k]);
        tracing::error!(kind = error.kind.label(), error = %error, suppressed, "inbox store: {what} failed; publishes to user channels get errors until it recovers (logged at most every 10 s per kind)");
    }

    /// True when a recovery may be logged at `now` (none was in the last
    /// [`LOG_EVERY`]): on a disk that stays full, a commit fits now and then in the pages
    /// a reopen's repair freed, and each would otherwise say so.
    pub fn recovery_due(&mut self, now: Instant) -> bool {
        if self
            .recovered
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return false;
        }
        self.recovered = Some(now);
        true
    }
}

/// The store has not written since a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the failure happened.
    pub since: Instant,
    next_probe: Instant,
    probe_every: Duration,
}

impl Outage {
    /// An outage starting at `now`.
    pub fn new(now: Instant) -> Outage {
        Outage {
            since: now,
            next_probe: now + PROBE_FIRST,
            probe_every: PROBE_FIRST,
        }
    }

    /// True when the store should check at `now` whether it can write again; the next
    /// check is then due twice as long after (at most [`PROBE_AT_MOST_EVERY`]).
    pub fn probe_due(&mut self, now: Instant) -> bool {
        if now < self.next_probe {
            return false;
        }
        self.probe_every = (self.probe_every * 2).min(PROBE_AT_MOST_EVERY);
        self.next_probe = now + self.probe_every;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_back_off_to_the_longest_wait() {
        let start = Instant::now();
        let mut outage = Outage::new(start);
        assert!(!outage.probe_due(start));
        let mut at = start + PROBE_FIRST;
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(outage.probe_due(at));
            assert!(!outage.probe_due(at + Duration::from_millis(999)));
            let next = outage.next_probe;
            waits.push((next - at).as_secs());
            at = next;
        }
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30, 30]);
    }

    #[test]
    fn recoveries_are_logged_at_most_every_ten_seconds() {
        let mut log = ErrorLog::default();
        let start = Instant::now();
        assert!(log.recovery_due(start));
        assert!(!log.recovery_due(start + Duration::from_secs(9)));
        assert!(log.recovery_due(start + LOG_EVERY));
    }
}
