//! Named samples of the server's CPU time and RSS (`--server-pid`), and the ratios built
//! from them: RSS per connection and deliveries per server CPU second.
//!
//! Marks used by the scenarios: `before` (no connection yet), `connected`, `publish`
//! (just before the first message) and `drained` (after the last delivery); `recover`
//! adds `drop` and `answered` around its recovery storm.

use crate::procstat::{self, ProcError, ProcSample};
use crate::report::ServerResults;

/// The server sampler; does nothing without a pid. With several pids (the nodes of a
/// `--targets` run) every sample is their sum: CPU seconds and RSS of all together.
pub struct Probe {
    pids: Vec<u32>,
    marks: Vec<(&'static str, ProcSample)>,
    /// Marks that could not be taken (the process went away, e.g. during a restart).
    pub missed: Vec<&'static str>,
}

impl Probe {
    /// Checks that `pid` can be sampled.
    ///
    /// # Errors
    /// The process does not exist or its /proc files are unreadable.
    pub fn new(pids: &[u32]) -> Result<Probe, ProcError> {
        for &pid in pids {
            procstat::sample(pid)?;
        }
        Ok(Probe {
            pids: pids.to_vec(),
            marks: Vec::new(),
            missed: Vec::new(),
        })
    }

    /// Takes a sample named `name`.
    pub fn mark(&mut self, name: &'static str) {
        let Some((&first, rest)) = self.pids.split_first() else {
            return;
        };
        match sample_all(first, rest) {
            Ok(sample) => self.marks.push((name, sample)),
            Err(_) => self.missed.push(name),
        }
    }

    fn get(&self, name: &str) -> Option<ProcSample> {
        self.marks
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }

    /// Server CPU seconds between marks `from` and `to`, when both were taken.
    pub fn cpu_between(&self, from: &str, to: &str) -> Option<f64> {
        Some(self.get(to)?.cpu_secs - self.get(from)?.cpu_secs)
    }

    /// The ratios, given the subscribers connected and the deliveries made between the
    /// `publish` and `drained` marks.
    pub fn results(&self, connected: u64, deliveries: u64) -> Option<ServerResults> {
        let pid = *self.pids.first()?;
        let before = self.get("before");
        let conn = self.get("connected");
        let publish = self.get("publish");
        let drained = self.get("drained");
        let end = drained.or(publish).or(conn)?;
        let mut out = ServerResults {
            pid,
            pids: self.pids.clone(),
            rss_end_bytes: end.rss_bytes,
            ..ServerResults::default()
        };
        if let (Some(b), Some(c)) = (before, conn) {
            out.rss_before_bytes = b.rss_bytes;
            out.rss_connected_bytes = c.rss_bytes;
            out.cpu_connect_secs = c.cpu_secs - b.cpu_secs;
            if connected > 0 {
                out.rss_per_connection_bytes =
                    (c.rss_bytes as f64 - b.rss_bytes as f64) / connected as f64;
            }
        }
        if let (Some(p), Some(d)) = (publish, drained) {
            out.cpu_delivery_secs = d.cpu_secs - p.cpu_secs;
            let wall = d.at.duration_since(p.at).as_secs_f64();
            if wall > 0.0 {
                out.cpu_percent_during_delivery = 100.0 * out.cpu_delivery_secs / wall;
            }
            if out.cpu_delivery_secs > 0.0 {
                out.deliveries_per_cpu_sec = Some(deliveries as f64 / out.cpu_delivery_secs);
            }
        }
        Some(out)
    }
}

/// One sample of `first` and every process in `rest`, summed (taken when the first was).
fn sample_all(first: u32, rest: &[u32]) -> Result<ProcSample, ProcError> {
    let mut total = procstat::sample(first)?;
    for &pid in rest {
        let s = procstat::sample(pid)?;
        total.cpu_secs += s.cpu_secs;
        total.rss_bytes += s.rss_bytes;
    }
    Ok(total)
}
