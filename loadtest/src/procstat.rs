//! The server's own cost, read from `/proc/<pid>` when the server runs on this host.
//!
//! `/proc/PID/stat` fields 14 and 15 (utime, stime) already sum every thread of the
//! process, in clock ticks; `/proc/PID/status` gives `VmRSS`. Samples are taken around
//! each phase so results can be stated as ratios that hold across machines: deliveries per
//! server CPU second, resident bytes per connection.

use std::time::Instant;

/// The server process could not be sampled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// `/proc/PID/...` could not be read (no such process, or not ours to read).
    #[error("cannot read /proc/{pid}/{file} (is --server-pid right and the server local?)")]
    Read {
        /// The pid.
        pid: u32,
        /// stat or status.
        file: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The file did not have the expected shape.
    #[error("unexpected format of /proc/{pid}/{file}")]
    Format {
        /// The pid.
        pid: u32,
        /// stat or status.
        file: &'static str,
    },
}

/// One reading of the server's CPU time and memory.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// User plus system CPU seconds over all threads since the process started.
    pub cpu_secs: f64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// Reads CPU time and RSS of `pid`.
///
/// # Errors
/// The process does not exist or `/proc` is not readable.
pub fn sample(pid: u32) -> Result<ProcSample, ProcError> {
    let read =
        |file: &'static str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}"))
                .map_err(|source| ProcError::Read { pid, file, source })
        };
    let stat = read("stat")?;
    let cpu_ticks = cpu_ticks(&stat).ok_or(ProcError::Format { pid, file: "stat" })?;
    let status = read("status")?;
    let rss_kb = vm_rss_kb(&status).ok_or(ProcError::Format {
        pid,
        file: "status",
    })?;
    Ok(ProcSample {
        at: Instant::now(),
        cpu_secs: cpu_ticks as f64 / clock_ticks_per_sec(),
        rss_bytes: rss_kb * 1024,
    })
}

/// utime + stime from a `/proc/PID/stat` line. The command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn vm_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects; it only returns a value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "1234 (ring cast) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(vm_rss_kb("Name:\tx\nVmRSS:\t   2048 kB\n"), Some(2048));
    }

    #[test]
    fn samples_this_process() -> Result<(), ProcError> {
        let s = sample(std::process::id())?;
        assert!(s.rss_bytes > 0);
        Ok(())
    }
}
