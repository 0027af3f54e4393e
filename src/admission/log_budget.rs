//! One log line per interval for an event that can repeat thousands of times a second
//! (a listener refusing connections at its cap), carrying how many events it stands for.
//! Pure: the caller passes the time.

use std::time::{Duration, Instant};

/// Rate limit for one kind of log line.
#[derive(Debug)]
pub struct LogBudget {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl LogBudget {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> LogBudget {
        LogBudget {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// One event at `now`: `Some(n)` when a line should be logged now, standing for `n`
    /// events (this one and those not logged since the last line); `None` otherwise.
    pub fn event(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counts_the_rest() {
        let mut log = LogBudget::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(log.event(t), Some(1));
        assert_eq!(log.event(t + Duration::from_secs(1)), None);
        assert_eq!(log.event(t + Duration::from_secs(9)), None);
        assert_eq!(log.event(t + Duration::from_secs(10)), Some(3));
        assert_eq!(log.event(t + Duration::from_secs(11)), None);
    }
}
