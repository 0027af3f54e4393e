//! The accept loop's answer to resource exhaustion: `EMFILE`, `ENFILE`, `ENOBUFS` and
//! `ENOMEM` from `accept` are states the server lives through, not failures.
//!
//! Retrying at once would spin a core (the queued connection stays queued: the kernel
//! fails before it dequeues it), and logging each failure would flood the log at the
//! worst moment. [`AcceptBackoff`] answers each error with a pause that doubles from
//! [`MIN_PAUSE`] to [`MAX_PAUSE`] while errors continue and resets on the next successful
//! accept, and allows one log line per [`LOG_INTERVAL`] carrying how many errors it
//! stands for.

use std::time::{Duration, Instant};

/// First pause after an accept error.
pub const MIN_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause: an exhausted shard still retries every second.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per shard per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why `accept` failed (metric label `reason` of `ringcast_accept_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AcceptError {
    /// The process ran out of descriptors (RLIMIT_NOFILE).
    Emfile = 0,
    /// The system ran out of descriptors (fs.file-max).
    Enfile,
    /// The kernel ran out of socket buffer memory.
    Enobufs,
    /// The kernel ran out of memory.
    Enomem,
    /// Anything else (a connection reset while queued, a bug).
    Other,
}

impl AcceptError {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 5] = ["emfile", "enfile", "enobufs", "enomem", "other"];

    /// Classifies an `accept` errno (`None`: no errno).
    pub fn from_errno(errno: Option<i32>) -> AcceptError {
        match errno {
            Some(libc::EMFILE) => AcceptError::Emfile,
            Some(libc::ENFILE) => AcceptError::Enfile,
            Some(libc::ENOBUFS) => AcceptError::Enobufs,
            Some(libc::ENOMEM) => AcceptError::Enomem,
            _ => AcceptError::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }

    /// What an operator should change, for the log line.
    pub fn fix(self) -> &'static str {
        match self {
            AcceptError::Emfile => {
                "out of file descriptors (RLIMIT_NOFILE): raise LimitNOFILE in the systemd unit \
                 or `ulimit -n`, or lower max_connections; see kernel-tuning/"
            }
            AcceptError::Enfile => {
                "the system is out of file descriptors: raise fs.file-max; see kernel-tuning/"
            }
            AcceptError::Enobufs | AcceptError::Enomem => {
                "the kernel is out of socket memory: check net.ipv4.tcp_mem and free memory; \
                 see kernel-tuning/"
            }
            AcceptError::Other => "accept failed",
        }
    }
}

/// What to do after one accept error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// How long to stop accepting.
    pub sleep: Duration,
    /// `Some(n)`: log now, standing for `n` errors (this one and those not logged since
    /// the last line); `None`: stay quiet.
    pub log: Option<u64>,
}

/// One shard's accept error state.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// A loop that has not failed yet.
    pub fn new() -> AcceptBackoff {
        AcceptBackoff::default()
    }

    /// Records an error at `now` and says how long to pause and whether to log.
    pub fn on_error(&mut self, now: Instant) -> Pause {
        let sleep = self.next.clamp(MIN_PAUSE, MAX_PAUSE);
        self.next = (sleep * 2).min(MAX_PAUSE);
        self.unlogged += 1;
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_INTERVAL);
        let log = due.then(|| {
            self.last_log = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        Pause { sleep, log }
    }

    /// Records a successful accept: the next error starts again at [`MIN_PAUSE`].
    pub fn on_success(&mut self) {
        self.next = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_the_cap_and_reset_on_success() {
        let mut b = AcceptBackoff::new();
        let t = Instant::now();
        let sleeps: Vec<u64> = (0..6)
            .map(|_| b.on_error(t).sleep.as_millis() as u64)
            .collect();
        assert_eq!(sleeps, [100, 200, 400, 800, 1000, 1000]);
        b.on_success();
        assert_eq!(b.on_error(t).sleep, MIN_PAUSE);
    }

    #[test]
    fn one_log_line_per_interval_counts_the_quiet_errors() {
        let mut b = AcceptBackoff::new();
        let t = Instant::now();
        assert_eq!(b.on_error(t).log, Some(1));
        for i in 1..50 {
            assert_eq!(b.on_error(t + Duration::from_millis(100 * i)).log, None);
        }
        // 49 quiet errors, then this one.
        assert_eq!(b.on_error(t + LOG_INTERVAL).log, Some(50));
        // A success does not reset the log interval: a flapping limit still logs rarely.
        b.on_success();
        assert_eq!(b.on_error(t + LOG_INTERVAL + MIN_PAUSE).log, None);
    }

    #[test]
    fn errnos_map_to_their_labels() {
        for (errno, label) in [
            (libc::EMFILE, "emfile"),
            (libc::ENFILE, "enfile"),
            (libc::ENOBUFS, "enobufs"),
            (libc::ENOMEM, "enomem"),
            (libc::ECONNABORTED, "other"),
        ] {
            assert_eq!(AcceptError::from_errno(Some(errno)).label(), label);
        }
        assert_eq!(AcceptError::from_errno(None), AcceptError::Other);
    }
}
