//! Command line: one subcommand per scenario, sharing connection, publishing and output
//! options. `docs/loadtest.md` explains each flag with examples.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ipc::SlowMode;

/// The subscriber URL when `--url` is not given.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws?channels=bench";

/// Load harness for ringcast and other WebSocket broadcast servers.
#[derive(Parser, Debug)]
#[command(name = "ringcast-load", version, about, long_about = None)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Scenarios.
#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Ramp to N connections at --rate and hold them for --hold seconds.
    Connect(ConnectArgs),
    /// N subscribers on one channel; publish --messages at --msg-rate; count every delivery.
    Fanout(FanoutArgs),
    /// Few subscribers, a fixed low publish rate, many latency samples.
    Latency(LatencyArgs),
    /// Connect N, then drop them all at once (or restart the server) and time the recovery.
    Storm(StormArgs),
    /// A fraction of subscribers read slowly or not at all; healthy ones must not notice.
    Slow(SlowArgs),
    /// Subscribers over K channels drop at once while publishing goes on, come back with
    /// `since`, and must end with every message exactly once, in order.
    Recover(RecoverArgs),
    /// Internal: one worker process (started by the harness itself).
    #[command(hide = true)]
    Worker,
}

/// Options shared by every scenario.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Subscriber URL; for ringcast the channel is in the query. Default: ws://127.0.0.1:8080/ws?channels=bench
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Several subscriber URLs (one per node), comma separated or repeated, and/or files listing one URL per line (optionally followed by that node's source addresses); connections and workers are spread evenly over them, and they replace --url.
    #[arg(long)]
    pub targets: Vec<String>,
    /// Subscriber connections. Default depends on the scenario (connect/fanout/storm 1000, latency 100, slow 200, recover 10000).
    #[arg(short = 'n', long)]
    pub connections: Option<u64>,
    /// Connection ramp, new connections per second over all workers; 0 = as fast as possible. Default: 2000
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Connects/handshakes in flight per worker, at most. Default: 1000
    #[arg(long, default_value_t = 1000)]
    pub max_pending: usize,
    /// Seconds a connect plus handshake may take before it counts as failed. Default: 5
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout: f64,
    /// Source addresses to connect from, round-robin (comma separated). Default: 127.0.0.1..127.0.0.<source-count> for a 127.x target.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// How many 127.0.0.x source addresses to use for a loopback target. Default: 16
    #[arg(long, default_value_t = 16)]
    pub source_count: u8,
    /// Connections per worker process, at most (also capped by RLIMIT_NOFILE). Default: 15000
    #[arg(long, default_value_t = 15_000)]
    pub conns_per_worker: u64,
    /// Worker processes to use (default: as few as the per-worker cap allows).
    #[arg(long)]
    pub workers: Option<u64>,
    /// Refuse runs that would need more worker processes than this. Default: 64
    #[arg(long, default_value_t = 64)]
    pub max_workers: u64,
    /// Hard limit on the whole run, seconds; the run stops and reports when it is reached. Default: 300
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// PID of the server (same host): sample its CPU time and RSS around each phase. Several (comma separated, e.g. the nodes of --targets) are sampled together and summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Write results as JSON to this file (schema in docs/loadtest.md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot (latency percentiles and delivery rate per second) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Allow targets outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_remote: bool,
    /// Exit 0 even when the run found problems (by default such a run exits 3).
    #[arg(long)]
    pub exit_zero: bool,
    /// How subscribers receive: ws (the WebSocket --url) or sse (ringcast's GET /sse with
    /// the query of --url, its path ignored; not for `recover`). Default: ws
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
}

/// The subscribers' transport.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// WebSocket.
    #[default]
    Ws,
    /// Server-Sent Events (`GET /sse`).
    Sse,
}

/// How messages are published.
#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// Publish endpoint: udp://host:port, tcp://host:port, http://host:port/publish, or ws (a publisher WebSocket on --url). Default: udp://127.0.0.1:9000
    #[arg(long, default_value = "udp://127.0.0.1:9000")]
    pub publish: String,
    /// Channel to publish to. Default: first of `channels=` in --url, else "bench".
    #[arg(long)]
    pub channel: Option<String>,
    /// Pad each payload to this many bytes (0: about 40 bytes). Default: 0
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Seconds to wait after connecting before publishing. Default: 0.2
    #[arg(long, default_value_t = 0.2)]
    pub settle: f64,
    /// Seconds to wait at most for deliveries after the last publish. Default: 10
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
}

/// `connect` options.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Seconds to hold the connections once the ramp is done. Default: 10
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
}

/// `fanout` options.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishArgs,
    /// Messages to publish. Default: 1000
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Messages per second; 0 publishes all of them as one burst. Default: 0
    #[arg(long, default_value_t = 0.0)]
    pub msg_rate: f64,
}

/// `latency` options.
#[derive(Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishArgs,
    /// Messages per second (keep it low: this measures latency, not throughput). Default: 100
    #[arg(long, default_value_t = 100.0)]
    pub msg_rate: f64,
    /// Seconds of publishing. Default: 10
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

/// How the storm is caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StormMode {
    /// The harness closes every connection at once and reconnects them all.
    Drop,
    /// Wait for the server to go away (restart it yourself) and reconnect until all are back.
    ServerRestart,
}

/// `storm` options.
#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishArgs,
    /// How the storm is caused. Default: drop
    #[arg(long, value_enum, default_value_t = StormMode::Drop)]
    pub mode: StormMode,
    /// Seconds connected (and receiving) before the storm. Default: 2
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    /// Messages per second published throughout. Default: 100
    #[arg(long, default_value_t = 100.0)]
    pub msg_rate: f64,
    /// Reconnect pace after a drop, connections per second; 0 = all at once. Default: 0
    #[arg(long, default_value_t = 0.0)]
    pub reconnect_rate: f64,
    /// Seconds to wait for the outage (server-restart) and for everyone to be back. Default: 60
    #[arg(long, default_value_t = 60.0)]
    pub restart_wait: f64,
    /// Seconds to keep publishing once all are back. Default: 1
    #[arg(long, default_value_t = 1.0)]
    pub after: f64,
}

/// `slow` options.
#[derive(Args, Debug, Clone)]
pub struct SlowArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishArgs,
    /// Fraction of subscribers that are slow, 0-1. Default: 0.1
    #[arg(long, default_value_t = 0.1)]
    pub slow_fraction: f64,
    /// stop: never read until the end; trickle: read --slow-read-rate bytes/s. Default: stop
    #[arg(long, value_enum, default_value_t = SlowMode::Stop)]
    pub slow_mode: SlowMode,
    /// Trickle mode: bytes per second each slow subscriber reads. Default: 16384
    #[arg(long, default_value_t = 16_384)]
    pub slow_read_rate: u64,
    /// Receive buffer of slow sockets, bytes, so backpressure reaches the server fast. Default: 4096
    #[arg(long, default_value_t = 4096)]
    pub slow_rcvbuf: usize,
    /// Messages to publish. Default: 5000
    #[arg(long, default_value_t = 5000)]
    pub messages: u64,
    /// Messages per second; 0 = one burst. Default: 1000
    #[arg(long, default_value_t = 1000.0)]
    pub msg_rate: f64,
}

/// `recover` options.
#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishArgs,
    /// Channels: subscriber i uses `<--channel>-<i mod K>` (prefix default "recover"); messages go round-robin over them. Default: 100
    #[arg(long, default_value_t = 100)]
    pub channels: u64,
    /// Messages per second over all channels together. Default: 1000
    #[arg(long, default_value_t = 1000.0)]
    pub msg_rate: f64,
    /// Seconds of publishing before every connection is dropped. Default: 5
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Reconnect pace after the drop, connections per second; 0 = all at once. Default: 0
    #[arg(long, default_value_t = 0.0)]
    pub reconnect_rate: f64,
    /// Seconds to keep publishing once every subscriber has its recovery answer. Default: 3
    #[arg(long, default_value_t = 3.0)]
    pub after: f64,
    /// Every subscriber must have its recovered reply within this many seconds of the drop; later is a problem. Default: 10
    #[arg(long, default_value_t = 10.0)]
    pub within: f64,
    /// Seconds to wait at most for every subscriber's answer after the drop. Default: 60
    #[arg(long, default_value_t = 60.0)]
    pub recover_wait: f64,
}
