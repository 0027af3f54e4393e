//! The conversation between the parent and its worker processes, one JSON object a line.
//!
//! The parent re-executes its own binary as `ringcast-load worker`, writes one
//! [`WorkerSpec`] line to the worker's stdin, then [`Command`] lines as the scenario moves
//! on. The worker answers on stdout with [`WorkerMsg`] lines: a [`Tick`] every 250 ms (and
//! at once when its connect phase or a reconnect completes), one [`WorkerFinal`] when told
//! to finish, or `Fatal` if it cannot go on. A worker whose stdin closes stops, so an
//! interrupted parent never leaves workers behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::stats::{GroupStats, HistPairs};

/// How slow subscribers misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlowMode {
    /// Stop reading entirely until the scenario ends.
    Stop,
    /// Read at most `--slow-read-rate` bytes per second.
    Trickle,
}

/// Slow-subscriber settings shared by all workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlowSpec {
    /// Fraction of subscribers that are slow, 0.0-1.0.
    pub fraction: f64,
    /// How they misbehave.
    pub mode: SlowMode,
    /// Trickle mode: bytes read per second per slow subscriber.
    pub read_bytes_per_sec: u64,
    /// SO_RCVBUF of slow sockets, so backpressure reaches the server quickly.
    pub rcvbuf: usize,
}

impl SlowSpec {
    /// Whether the subscriber with global index `i` is slow: spreads `fraction` evenly.
    pub fn is_slow(&self, i: u64) -> bool {
        let f = self.fraction.clamp(0.0, 1.0);
        ((i + 1) as f64 * f).floor() > (i as f64 * f).floor()
    }
}

/// Scenario `recover`: subscribers send `subscribe` (with `since` after a reconnect) on
/// channel `<prefix>-<global index mod channels>` instead of naming channels in the URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoverSpec {
    /// Channel name prefix.
    pub prefix: String,
    /// Number of channels.
    pub channels: u64,
}

impl RecoverSpec {
    /// Index and name of the channel of subscriber `i` (global index).
    pub fn channel_of(&self, i: u64) -> (u64, String) {
        let index = i % self.channels.max(1);
        (index, format!("{}-{index}", self.prefix))
    }
}

/// Everything a worker needs to know, sent as its first stdin line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Worker number, 0-based.
    pub id: usize,
    /// Address to connect to.
    pub target: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request path and query.
    pub path: String,
    /// Global index of this worker's first connection (for source IP and slow spreading).
    pub first_index: u64,
    /// Connections this worker opens.
    pub conns: u64,
    /// This worker's share of the ramp, connections per second; 0 means no pacing.
    pub rate: f64,
    /// Handshakes in flight at once, at most.
    pub max_pending: usize,
    /// Connect plus handshake budget, milliseconds.
    pub connect_timeout_ms: u64,
    /// Source addresses, used round-robin by global index; empty: let the kernel choose.
    pub source_ips: Vec<IpAddr>,
    /// Slow subscribers, if any.
    pub slow: Option<SlowSpec>,
    /// Reconnect whenever a connection ends or fails (server restart storms).
    pub reconnect: bool,
    /// Pace of reconnects after a `Drop`, connections per second; 0 means no pacing.
    pub reconnect_rate: f64,
    /// The worker exits on its own after this many milliseconds, whatever happens.
    pub lifetime_ms: u64,
    /// Subscribe by command and recover after reconnects (scenario `recover`).
    #[serde(default)]
    pub recover: Option<RecoverSpec>,
    /// Subscribe with `GET` on `path` and read Server-Sent Events instead of upgrading to
    /// a WebSocket.
    #[serde(default)]
    pub sse: bool,
}

/// Parent → worker instructions after the spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Close every open connection at once, then reconnect them all.
    Drop,
    /// Slow subscribers start reading everything (to collect their deliveries and closes).
    Resume,
    /// Report final numbers given `published` messages, then exit.
    Finish {
        /// Messages `1..=published` were published.
        published: u64,
    },
}

/// Worker → parent progress, deltas since the previous tick plus gauges.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tick {
    /// Connections open now.
    pub open: u64,
    /// Connects or handshakes in flight now.
    pub pending: u64,
    /// Connections still waiting for their turn (ramp, retry) now.
    pub queued: u64,
    /// Every connection of the initial ramp has opened or failed at least once.
    pub ramp_done: bool,
    /// Handshakes completed since the last tick.
    pub connects: u64,
    /// Failed attempts since the last tick.
    pub failures: u64,
    /// Connections ended by the server (close frame, EOF, reset) since the last tick.
    pub closes: u64,
    /// Deliveries to healthy subscribers since the last tick.
    pub deliveries: u64,
    /// Deliveries to slow subscribers since the last tick.
    pub slow_deliveries: u64,
    /// Latency of this tick's healthy deliveries, nanosecond buckets.
    pub latency: HistPairs,
    /// Unix ms when this worker first lost a connection after being fully connected.
    pub down_at_ms: Option<u64>,
    /// Unix ms when all its connections were open again after `down_at_ms`.
    pub back_at_ms: Option<u64>,
    /// `recover`: subscribers that have their first position now.
    #[serde(default)]
    pub subscribed: u64,
    /// `recover`: subscribers answered (recovered or not) since the last `Drop`.
    #[serde(default)]
    pub resubscribed: u64,
}

/// `recover` numbers of one worker.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RecoverFinal {
    /// Counts summed over its subscribers.
    pub counts: crate::recover::RecoverCounts,
    /// Offsets its subscribers had to receive, summed.
    pub expected: u64,
    /// Subscribers with any gap, duplicate, reordering or failed recovery.
    pub subscribers_with_problems: u64,
    /// Unix ms of the last `Drop`.
    pub drop_ms: Option<u64>,
    /// Unix ms of the latest `"recovered":true` reply after it.
    pub last_recovered_ms: Option<u64>,
    /// Unix ms of the latest catch-up (last replayed message) after it.
    pub last_caught_up_ms: Option<u64>,
    /// Drop to `"recovered":true` reply, per subscriber, nanosecond buckets.
    pub recovered: HistPairs,
    /// Drop to the last replayed message, per subscriber, nanosecond buckets.
    pub caught_up: HistPairs,
}

/// Worker → parent final report.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WorkerFinal {
    /// Handshake latency (socket creation to validated 101), nanosecond buckets.
    pub handshake: HistPairs,
    /// Time from a storm's start (drop or server loss) to being open again, per connection.
    pub reconnect: HistPairs,
    /// Failed attempts by cause (`refused`, `timeout`, `http_503`, …).
    pub failures: BTreeMap<String, u64>,
    /// Handshakes completed, reconnects included.
    pub connects: u64,
    /// Unix ms of the first connection attempt.
    pub ramp_start_ms: Option<u64>,
    /// Unix ms when the initial ramp was fully resolved (every slot open or failed).
    pub ramp_end_ms: Option<u64>,
    /// Connections open when the final report was made.
    pub open_at_end: u64,
    /// Healthy subscribers.
    pub healthy: GroupStats,
    /// Slow subscribers.
    pub slow: GroupStats,
    /// Pongs or closes that could not be written.
    pub write_errors: u64,
    /// Unix ns of the first and the latest healthy delivery.
    pub delivery_span_ns: Option<(u64, u64)>,
    /// CPU seconds this worker used (user + system).
    pub cpu_secs: f64,
    /// Scenario `recover` only.
    #[serde(default)]
    pub recover: Option<RecoverFinal>,
}

/// One line from a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum WorkerMsg {
    /// Periodic progress.
    Tick(Tick),
    /// The final report; the worker exits after it.
    Final(Box<WorkerFinal>),
    /// The worker cannot continue.
    Fatal {
        /// What went wrong.
        error: String,
    },
}

/// Writes `msg` as one line on stdout and flushes it.
///
/// # Errors
/// The parent went away (broken pipe) or the message could not be encoded.
pub fn emit(msg: &WorkerMsg) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    out.write_all(&line)?;
    out.flush()
}

/// Current unix time in milliseconds.
pub fn unix_ms() -> u64 {
    unix_nanos() / 1_000_000
}

/// Current unix time in nanoseconds.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_fraction_spreads_evenly() {
        let spec = SlowSpec {
            fraction: 0.25,
            mode: SlowMode::Stop,
            read_bytes_per_sec: 0,
            rcvbuf: 4096,
        };
        let slow = (0..100).filter(|&i| spec.is_slow(i)).count();
        assert_eq!(slow, 25);
        assert!(!spec.is_slow(0) && spec.is_slow(3));
    }

    #[test]
    fn final_reports_round_trip_with_close_codes() -> Result<(), serde_json::Error> {
        let mut report = WorkerFinal::default();
        report.slow.close_codes.insert("1013".into(), 3);
        report.failures.insert("refused".into(), 2);
        let line = serde_json::to_string(&WorkerMsg::Final(Box::new(report)))?;
        match serde_json::from_str::<WorkerMsg>(&line)? {
            WorkerMsg::Final(back) => {
                assert_eq!(back.slow.close_codes.get("1013"), Some(&3));
                assert_eq!(back.failures.get("refused"), Some(&2));
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    #[test]
    fn commands_round_trip() -> Result<(), serde_json::Error> {
        let line = serde_json::to_string(&Command::Finish { published: 7 })?;
        assert_eq!(line, r#"{"cmd":"finish","published":7}"#);
        assert!(matches!(
            serde_json::from_str::<Command>(r#"{"cmd":"drop"}"#)?,
            Command::Drop
        ));
        Ok(())
    }
}
