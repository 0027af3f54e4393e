//! A token bucket with the clock passed in: `rate` tokens per second, at most `burst`.

use std::time::Instant;

/// Tokens left and when they were last counted.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens at `now`.
    pub fn full(burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: u32, burst: u32) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.at = self.at.max(now);
    }

    /// Takes one token if there is one at `now`.
    pub fn try_take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Seconds until one token is there (0 when there is one now).
    pub fn wait_secs(&mut self, now: Instant, rate: u32, burst: u32) -> f64 {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 || rate == 0 {
            0.0
        } else {
            (1.0 - self.tokens) / f64::from(rate)
        }
    }

    /// True when the bucket has refilled to `burst` by `now`: it then remembers nothing
    /// a fresh bucket would not, and its owner may forget it.
    pub fn is_full(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        self.refill(now, rate, burst);
        self.tokens >= f64::from(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::full(3, t);
        assert!((0..3).all(|_| b.try_take(t, 10, 3)));
        assert!(!b.try_take(t, 10, 3));
        assert!((b.wait_secs(t, 10, 3) - 0.1).abs() < 1e-9);
        assert!(b.try_take(t + Duration::from_millis(100), 10, 3));
        assert!(!b.try_take(t + Duration::from_millis(100), 10, 3));
        assert!(!b.is_full(t + Duration::from_millis(200), 10, 3));
        assert!(b.is_full(t + Duration::from_secs(1), 10, 3));
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        let t = Instant::now() + Duration::from_secs(5);
        let mut b = TokenBucket::full(1, t);
        assert!(b.try_take(t, 1, 1));
        assert!(!b.try_take(t - Duration::from_secs(3), 1, 1));
    }
}
