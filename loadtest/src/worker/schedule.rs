//! When each connection of a worker may start: ramp pacing, retries and timeouts.
//!
//! Pacing is a token bucket at the configured rate (at most 50 ms worth of burst), so a
//! ramp of 2,000 connections/s starts about two connections per millisecond instead of
//! all at once, and never more than `max_pending` handshakes are in flight. Timeouts are
//! kept in start order; since every attempt has the same budget they expire in that order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// Start queue, retry timers and attempt deadlines of one worker.
pub struct Schedule {
    queue: VecDeque<usize>,
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    deadlines: VecDeque<(Instant, usize, u32)>,
    rate: f64,
    tokens: f64,
    last: Instant,
    max_pending: usize,
}

impl Schedule {
    /// Connections `0..n` queued, paced at `rate` per second (0: unpaced).
    pub fn new(n: usize, rate: f64, max_pending: usize, now: Instant) -> Schedule {
        Schedule {
            queue: (0..n).collect(),
            retries: BinaryHeap::new(),
            deadlines: VecDeque::new(),
            rate,
            tokens: 1.0,
            last: now,
            max_pending: max_pending.max(1),
        }
    }

    /// Changes the pace (used when a reconnect storm starts).
    pub fn reset_rate(&mut self, rate: f64, now: Instant) {
        self.rate = rate;
        self.tokens = 1.0;
        self.last = now;
    }

    /// Queues connection `i` to start as soon as pacing allows.
    pub fn enqueue(&mut self, i: usize) {
        self.queue.push_back(i);
    }

    /// Queues connection `i` to start at `at` or later.
    pub fn retry(&mut self, i: usize, at: Instant) {
        self.retries.push(Reverse((at, i)));
    }

    /// Connections waiting to start (queued or retrying).
    pub fn queued(&self) -> usize {
        self.queue.len() + self.retries.len()
    }

    /// Remembers that attempt `generation` of connection `i` must be done by `deadline`.
    pub fn watch(&mut self, i: usize, generation: u32, deadline: Instant) {
        self.deadlines.push_back((deadline, i, generation));
    }

    /// Attempts whose deadline has passed (the caller checks they are still in flight).
    pub fn expired(&mut self, now: Instant) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        while let Some(&(deadline, i, generation)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            out.push((i, generation));
        }
        out
    }

    /// The next connection to start now, if pacing and the in-flight cap allow one.
    pub fn next_start(&mut self, now: Instant, pending: u64) -> Option<usize> {
        while let Some(&Reverse((at, i))) = self.retries.peek() {
            if at > now {
                break;
            }
            self.retries.pop();
            self.queue.push_back(i);
        }
        if self.queue.is_empty() || pending >= self.max_pending as u64 {
            return None;
        }
        if self.rate > 0.0 {
            let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
            self.last = now;
            let burst = (self.rate * 0.05).max(1.0);
            self.tokens = (self.tokens + elapsed * self.rate).min(burst);
            if self.tokens < 1.0 {
                return None;
            }
            self.tokens -= 1.0;
        }
        self.queue.pop_front()
    }

    /// The earliest moment something here needs attention, if any.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let retry = self.retries.peek().map(|Reverse((at, _))| *at);
        let deadline = self.deadlines.front().map(|(at, _, _)| *at);
        let pace = (!self.queue.is_empty() && self.rate > 0.0 && self.tokens < 1.0)
            .then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate));
        [retry, deadline, pace].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_and_caps_in_flight() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100, 1000.0, 10, t0);
        let mut started = 0;
        while s.next_start(t0, 0).is_some() {
            started += 1;
        }
        assert_eq!(started, 1, "one token at t0");
        let t1 = t0 + Duration::from_millis(20);
        while s.next_start(t1, 0).is_some() {
            started += 1;
        }
        assert_eq!(started, 21, "20 ms at 1000/s adds 20");
        assert_eq!(
            s.next_start(t1 + Duration::from_secs(1), 10),
            None,
            "in-flight cap"
        );
    }

    #[test]
    fn retries_and_deadlines_come_due() {
        let t0 = Instant::now();
        let mut s = Schedule::new(0, 0.0, 10, t0);
        s.retry(3, t0 + Duration::from_millis(5));
        assert_eq!(s.next_start(t0, 0), None);
        assert_eq!(s.next_start(t0 + Duration::from_millis(5), 0), Some(3));
        s.watch(3, 1, t0 + Duration::from_millis(7));
        assert!(s.expired(t0).is_empty());
        assert_eq!(s.expired(t0 + Duration::from_millis(8)), vec![(3, 1)]);
    }
}
