//! Configuration: a TOML file, command-line flags and `RINGCAST_*` environment variables,
//! merged (flag/env over file over built-in default) and validated into [`Settings`].
//!
//! One struct, [`ConfigLayer`], describes every key for both the file and the command
//! line, so `--help`, the TOML keys and the docs cannot drift apart.

use crate::admission::per_ip::PerIpLimits;
use crate::auth::namespace::{NamespaceTable, Namespaces};
use crate::auth::token::{JwtAlgorithm, KeyMaterial, Verifier};
use crate::auth::AuthSettings;
pub use crate::inbox::InboxConfig;
use crate::ingest::key::IngestKey;
use crate::live::Live;
use crate::proto::origin::OriginPolicy;
use crate::proto::proxy::Versions;
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// A configuration problem, naming the key at fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrongly typed value.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, including the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The key (TOML name; the flag is the same with dashes).
        key: &'static str,
        /// Why.
        message: String,
    },
    /// A key of a `[namespaces.NAME]` or `[channel_defaults]` table has a bad value.
    #[error("invalid value for `{key}`: {message}")]
    InvalidTable {
        /// The full key, e.g. `namespaces.news.history_size`.
        key: String,
        /// Why.
        message: String,
    },
}

/// Every setting, optional, as read from one source (file or command line + environment).
#[derive(Debug, Default, Clone, Deserialize, Parser)]
#[serde(default, deny_unknown_fields)]
#[command(
    name = "ringcast",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("RINGCAST_GIT_REVISION"), ")"),
    about = "Thread-per-core io_uring WebSocket fan-out server"
)]
pub struct ConfigLayer {
    /// TOML configuration file; flags and environment override its values.
    #[arg(long, env = "RINGCAST_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// WebSocket listen address. Default: 0.0.0.0:8080.
    #[arg(long, env = "RINGCAST_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// UDP ingest address (`off` disables). Default: 127.0.0.1:9000.
    #[arg(long, env = "RINGCAST_UDP_INGEST", value_name = "ADDR|off")]
    pub udp_ingest: Option<String>,
    /// TCP ingest address (`off` disables). Default: 127.0.0.1:9001.
    #[arg(long, env = "RINGCAST_TCP_INGEST", value_name = "ADDR|off")]
    pub tcp_ingest: Option<String>,
    /// Admin HTTP address: /metrics, /healthz, /readyz, /publish. Default: 127.0.0.1:9090.
    #[arg(long, env = "RINGCAST_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Source addresses (CIDRs) allowed to use a non-loopback ingest or admin port.
    /// Required when one of them binds a non-loopback address. Default: none.
    #[arg(
        long,
        env = "RINGCAST_INGEST_ALLOW",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub ingest_allow: Option<Vec<String>>,
    /// Shared secret TCP and HTTP publishers must present (TCP: a first line
    /// `AUTH <key>`; HTTP `POST /publish` and `/admin/disconnect`: `Authorization: Bearer
    /// <key>`); 16-256 bytes of visible ASCII. UDP ingest takes no key (allowlist only).
    /// Prefer the environment variable or the file to the flag: a flag shows in `ps`.
    /// Default: none (no key asked).
    #[arg(
        long,
        env = "RINGCAST_INGEST_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub ingest_key: Option<String>,
    /// Seconds a TCP ingest connection has, from accept, to send its `AUTH <key>` line
    /// when `ingest_key` is set; then it is answered `ERR auth timeout` and closed. Before
    /// that line at most 512 bytes are read (an `AUTH` line is at most 263). Default: 10.
    #[arg(long, env = "RINGCAST_INGEST_AUTH_TIMEOUT", value_name = "SECS")]
    pub ingest_auth_timeout: Option<u64>,
    /// Open TCP ingest connections over the whole process (authorized or not); beyond
    /// it a new one is answered `ERR too many ingest connections` and closed.
    /// Default: 1024.
    #[arg(long, env = "RINGCAST_MAX_TCP_INGEST_CONNECTIONS", value_name = "N")]
    pub max_tcp_ingest_connections: Option<usize>,
    /// Seconds the admin port gives a client to send one whole request (head and body),
    /// counted from the accept or the previous answer, and to take an answer: an idle
    /// kept-alive connection is then closed, a half-sent request answered 408. Default: 10.
    #[arg(long, env = "RINGCAST_ADMIN_REQUEST_TIMEOUT", value_name = "SECS")]
    pub admin_request_timeout: Option<u64>,
    /// Open admin-port connections; beyond it a new one is answered 503 with Retry-After
    /// and closed. Default: 1024.
    #[arg(long, env = "RINGCAST_MAX_ADMIN_CONNECTIONS", value_name = "N")]
    pub max_admin_connections: Option<usize>,
    /// Log line format on stderr: `text` (coloured only when stderr is a terminal) or
    /// `json` (one object per line). Default: text.
    #[arg(long, env = "RINGCAST_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<String>,
    /// Number of shards (pinned executors, one per core); 0 means one per online CPU.
    /// Default: 0.
    #[arg(long, env = "RINGCAST_SHARDS", value_name = "N")]
    pub shards: Option<usize>,
    /// Maximum open WebSocket connections, over the whole process (not per shard); beyond
    /// it upgrades are answered 503 with Retry-After. Default: 1000000.
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Kernel accept queue length for each shard's listener (capped by
    /// net.core.somaxconn). Default: 65535.
    #[arg(long, env = "RINGCAST_LISTEN_BACKLOG", value_name = "N")]
    pub listen_backlog: Option<u32>,
    /// TLS listen address for `wss://` (and `https://` for /sse and /poll); empty: no TLS
    /// listener. Needs tls_cert_file and tls_key_file. Default: none (off).
    #[arg(long, env = "RINGCAST_TLS_LISTEN", value_name = "ADDR")]
    pub tls_listen: Option<String>,
    /// PEM certificate chain for the TLS listener, leaf first (reloaded on SIGHUP).
    /// Default: none.
    #[arg(long, env = "RINGCAST_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of tls_cert_file's certificate (reloaded on
    /// SIGHUP). Default: none.
    #[arg(long, env = "RINGCAST_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Largest frame or message accepted from a client, and largest published payload,
    /// in bytes. Default: 65536.
    #[arg(long, env = "RINGCAST_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// Per-connection send backlog in bytes above which messages are skipped for that
    /// connection. Default: 262144.
    #[arg(long, env = "RINGCAST_MAX_BACKLOG_BYTES", value_name = "BYTES")]
    pub max_backlog_bytes: Option<usize>,
    /// Per-connection send backlog in frames above which messages are skipped. Default: 4096.
    #[arg(long, env = "RINGCAST_MAX_BACKLOG_FRAMES", value_name = "N")]
    pub max_backlog_frames: Option<usize>,
    /// Messages a lagging connection may lose for good (reported to it as gaps: it fell
    /// behind the channel's history) before it is closed with 1013. Default: 1000.
    #[arg(long, env = "RINGCAST_SLOW_CONSUMER_DROP_LIMIT", value_name = "N")]
    pub slow_consumer_drop_limit: Option<u32>,
    /// Seconds a lagging connection (its backlog full), or an SSE stream with anything
    /// queued, may take no bytes at all before it is closed with 1013: it is not reading.
    /// Default: 10.
    #[arg(long, env = "RINGCAST_SLOW_CONSUMER_TIMEOUT", value_name = "SECS")]
    pub slow_consumer_timeout: Option<u64>,
    /// Channels one connection may subscribe to. Default: 64.
    #[arg(
        long,
        env = "RINGCAST_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        value_name = "N"
    )]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Channels with state over the whole process before a subscribe that would create
    /// one more is refused with 503. Default: 2000000.
    #[arg(long, env = "RINGCAST_MAX_CHANNELS", value_name = "N")]
    pub max_channels: Option<u64>,
    /// Client frames per second above which a connection is closed with 1008. Default: 200.
    #[arg(long, env = "RINGCAST_MAX_INBOUND_PER_SEC", value_name = "N")]
    pub max_inbound_per_sec: Option<u32>,
    /// Seconds of silence after which the server pings a connection. Default: 25.
    #[arg(long, env = "RINGCAST_PING_INTERVAL", value_name = "SECS")]
    pub ping_interval: Option<u64>,
    /// Seconds after a ping without any traffic before the connection is closed as dead.
    /// Default: 20.
    #[arg(long, env = "RINGCAST_PONG_TIMEOUT", value_name = "SECS")]
    pub pong_timeout: Option<u64>,
    /// Seconds a client has, from accept, to send the whole upgrade request and receive
    /// the answer; a deadline for the whole upgrade, not per read. Default: 10.
    #[arg(long, env = "RINGCAST_HANDSHAKE_TIMEOUT", value_name = "SECS")]
    pub handshake_timeout: Option<u64>,
    /// Upgrades one shard serves at once (accepted, not yet answered); beyond it new
    /// sockets are answered 503 with Retry-After at once. A healthy client finishes in
    /// about one round trip, so 1024 in flight still admits thousands of upgrades per
    /// second per shard at mobile round-trip times, while a slowloris can hold at most
    /// 1024 tasks of ~3 KiB per shard for `handshake_timeout`. Default: 1024.
    #[arg(long, env = "RINGCAST_MAX_HANDSHAKES_PER_SHARD", value_name = "N")]
    pub max_handshakes_per_shard: Option<usize>,
    /// Share a shard's `max_handshakes_per_shard` places fairly between source addresses:
    /// once all are taken, a socket from an address holding fewer places than the address
    /// holding the most takes that address's oldest place (that upgrade is answered 503
    /// with Retry-After). One address can then use every free place (a NAT, a balancer)
    /// but never lock other addresses out. `false`: past the cap every new socket gets
    /// 503. Default: true.
    #[arg(long, env = "RINGCAST_HANDSHAKE_FAIR_SHARE", value_name = "BOOL")]
    pub handshake_fair_share: Option<bool>,
    /// Browser origins allowed on the WebSocket port (upgrade, /sse, /poll): `*`, exact
    /// origins (`https://app.example.com`) or `https://*.example.com`. Default: ["*"].
    #[arg(
        long,
        env = "RINGCAST_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN,..."
    )]
    pub allowed_origins: Option<Vec<String>>,
    /// Whether requests without an `Origin` header (non-browser clients) are allowed.
    /// Default: true.
    #[arg(long, env = "RINGCAST_ALLOW_MISSING_ORIGIN", value_name = "BOOL")]
    pub allow_missing_origin: Option<bool>,
    /// Open WebSocket connections (upgrades in progress included) from one source address
    /// (IPv6: one `ipv6_prefix_len` prefix); beyond it new sockets get 503 with
    /// Retry-After. 0 = off: carrier-grade NAT and corporate proxies put thousands of users
    /// behind one address, and load generators run from a handful. Default: 0.
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// New connections per second from one source address (token bucket, burst = rate);
    /// beyond it 503 with Retry-After. 0 = off. Default: 0.
    #[arg(
        long,
        env = "RINGCAST_MAX_NEW_CONNECTIONS_PER_IP_PER_SEC",
        value_name = "N"
    )]
    pub max_new_connections_per_ip_per_sec: Option<u32>,
    /// Upgrades in progress (accepted, not yet answered) from one source address, so one
    /// address cannot hold a shard's whole `max_handshakes_per_shard` budget; beyond it
    /// 503 with Retry-After. 0 = off. Default: 0.
    #[arg(long, env = "RINGCAST_MAX_HANDSHAKES_PER_IP", value_name = "N")]
    pub max_handshakes_per_ip: Option<u32>,
    /// Leading bits of an IPv6 source address the per-IP limits count by (1-128).
    /// Default: 64.
    #[arg(long, env = "RINGCAST_IPV6_PREFIX_LEN", value_name = "BITS")]
    pub ipv6_prefix_len: Option<u8>,
    /// PROXY protocol header expected first on the WebSocket port from `trusted_proxies`
    /// (an L4 balancer: HAProxy `send-proxy` is v1, `send-proxy-v2` and AWS NLB are v2;
    /// `any` takes either): its source address is the client's for the per-IP limits. A
    /// trusted peer without a valid header is closed; other peers are served as plain
    /// clients (a header from them is not honoured). Needs a restart. Default: off.
    #[arg(long, env = "RINGCAST_PROXY_PROTOCOL", value_name = "off|v1|v2|any")]
    pub proxy_protocol: Option<String>,
    /// Peer addresses (CIDRs) of the balancers that send the PROXY header; required when
    /// `proxy_protocol` is on. Needs a restart. Default: none.
    #[arg(
        long,
        env = "RINGCAST_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub trusted_proxies: Option<Vec<String>>,
    /// New connections each shard accepts per second (token bucket, 100 ms of burst);
    /// the rest wait in the kernel's accept queue (`listen_backlog`, capped by
    /// net.core.somaxconn) instead of being refused. 0 = off. Default: 0.
    #[arg(long, env = "RINGCAST_ACCEPT_RATE_PER_SHARD", value_name = "N")]
    pub accept_rate_per_shard: Option<u32>,
    /// Seconds over which a drain (SIGTERM) closes connections in batches. Default: 30.
    #[arg(long, env = "RINGCAST_DRAIN_WINDOW", value_name = "SECS")]
    pub drain_window: Option<u64>,
    /// Seconds between a SIGTERM and the start of the drain: `/readyz` answers 503 at once
    /// while the listeners keep accepting, so a load balancer's health check takes the
    /// node out before connections are refused and closed. Default: 5.
    #[arg(long, env = "RINGCAST_DRAIN_GRACE", value_name = "SECS")]
    pub drain_grace: Option<u64>,
    /// Slots in the shared fan-out ring (power of two); it holds the last N messages.
    /// Default: 16384.
    #[arg(long, env = "RINGCAST_RING_CAPACITY", value_name = "N")]
    pub ring_capacity: Option<usize>,
    /// Seconds without a publish after which a channel's offset state is forgotten (its
    /// next message starts at offset 1 with a new epoch); 0 keeps every channel forever.
    /// Default: 3600.
    #[arg(long, env = "RINGCAST_CHANNEL_IDLE_TIMEOUT", value_name = "SECS")]
    pub channel_idle_timeout: Option<u64>,
    /// Messages of history kept per channel for recovery (`subscribe` with `since`);
    /// 0 keeps none. Default: 100.
    #[arg(long, env = "RINGCAST_HISTORY_SIZE", value_name = "N")]
    pub history_size: Option<usize>,
    /// Seconds a message stays in its channel's history. Default: 300.
    #[arg(long, env = "RINGCAST_HISTORY_TTL", value_name = "SECS")]
    pub history_ttl: Option<u64>,
    /// Frame bytes of history over all channels; past it the oldest retained messages
    /// of the process are evicted first. Default: 268435456 (256 MiB).
    #[arg(long, env = "RINGCAST_HISTORY_MAX_BYTES", value_name = "BYTES")]
    pub history_max_bytes: Option<u64>,
    /// Most messages one recovery replays; a client that missed more is told
    /// `recovered: false`. Default: 1000.
    #[arg(long, env = "RINGCAST_MAX_RECOVERY_MESSAGES", value_name = "N")]
    pub max_recovery_messages: Option<usize>,
    /// Keep messages to `user:<id>` channels durably until the user acks them (the
    /// per-user inbox, written to `inbox_path`). Off by default: a ringcast started
    /// without configuration writes nothing to disk. Default: false.
    #[arg(long, env = "RINGCAST_INBOX", value_name = "BOOL")]
    pub inbox: Option<bool>,
    /// Directory for ringcast's durable state (the inbox file), created if missing; a
    /// relative path is relative to the working directory. Default: ringcast-data.
    #[arg(long, env = "RINGCAST_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The inbox database file. Default: `<data_dir>/inbox.redb`.
    #[arg(long, env = "RINGCAST_INBOX_PATH", value_name = "FILE")]
    pub inbox_path: Option<PathBuf>,
    /// Seconds an unacked inbox message is kept; a sweep deletes older ones.
    /// Default: 604800 (7 days).
    #[arg(long, env = "RINGCAST_INBOX_RETENTION", value_name = "SECS")]
    pub inbox_retention: Option<u64>,
    /// Most inbox requests (messages, acks, reads) per group commit. Default: 1024.
    #[arg(long, env = "RINGCAST_INBOX_MAX_BATCH", value_name = "N")]
    pub inbox_max_batch: Option<usize>,
    /// Inbox requests queued for the store thread before publishes to user channels are
    /// refused (HTTP 503, TCP `ERR`). Default: 65536.
    #[arg(long, env = "RINGCAST_INBOX_QUEUE", value_name = "N")]
    pub inbox_queue: Option<usize>,
    /// Most members a `presence` reply lists (0-10000); a channel with more gets the count
    /// only. Default: 1000.
    #[arg(long, env = "RINGCAST_PRESENCE_MAX_MEMBERS", value_name = "N")]
    pub presence_max_members: Option<usize>,
    /// Bytes of io_uring registered buffer memory per shard (locked memory: counts
    /// against RLIMIT_MEMLOCK). ringcast does not use registered buffers for sockets.
    /// Default: 262144.
    #[arg(long, env = "RINGCAST_IO_MEMORY", value_name = "BYTES")]
    pub io_memory: Option<usize>,
    /// Allow transparent huge pages for the heap. Off by default: with THP the kernel
    /// backs the heap in 2 MiB pages, which at tens of thousands of connections inflates
    /// RSS far beyond the bytes in use and adds compaction stalls (the advice Redis and
    /// MongoDB give too). Default: false.
    #[arg(long, env = "RINGCAST_TRANSPARENT_HUGE_PAGES", value_name = "BOOL")]
    pub transparent_huge_pages: Option<bool>,
    /// HMAC secret (at least 32 bytes) for HS256/HS384/HS512 tokens. Setting it, or
    /// `jwt_public_key_file`, turns authentication on. Prefer the environment variable or
    /// the file to the flag: a flag shows in `ps`. Default: none.
    #[arg(
        long,
        env = "RINGCAST_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS256, ES256 or EdDSA tokens (set `jwt_algorithm` to
    /// match). Default: none.
    #[arg(long, env = "RINGCAST_JWT_PUBLIC_KEY_FILE", value_name = "FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// The one algorithm tokens must be signed with: HS256, HS384, HS512 (with
    /// `jwt_secret`), RS256, ES256, EdDSA (with `jwt_public_key_file`). Default: HS256
    /// with a secret; required with a key file.
    #[arg(long, env = "RINGCAST_JWT_ALGORITHM", value_name = "ALG")]
    pub jwt_algorithm: Option<String>,
    /// Seconds of clock skew allowed when checking a token's `exp` and `nbf`. Default: 5.
    #[arg(long, env = "RINGCAST_JWT_LEEWAY", value_name = "SECS")]
    pub jwt_leeway: Option<u64>,
    /// Cookie the upgrade request may carry the token in (besides `?token=` and
    /// `Authorization: Bearer`). Default: none (cookies are not read).
    #[arg(long, env = "RINGCAST_JWT_COOKIE", value_name = "NAME")]
    pub jwt_cookie: Option<String>,
    /// Token claim listing the channel patterns (`news:*`, exact names) the token may
    /// subscribe and publish to; a token without it is not restricted by channel.
    /// Default: channels.
    #[arg(long, env = "RINGCAST_JWT_CHANNELS_CLAIM", value_name = "CLAIM")]
    pub jwt_channels_claim: Option<String>,
    /// Accept connections without a token (as anonymous; namespace rules still apply).
    /// Default: true without a JWT key, false with one.
    #[arg(long, env = "RINGCAST_ALLOW_ANONYMOUS", value_name = "BOOL")]
    pub allow_anonymous: Option<bool>,
    /// Subscribe every connection with a token to its own `user:<sub>` channel at
    /// connect, as if the upgrade URL named it (with the inbox on: its unacked messages
    /// follow at once). Default: false.
    #[arg(long, env = "RINGCAST_SUBSCRIBE_USER_CHANNEL", value_name = "BOOL")]
    pub subscribe_user_channel: Option<bool>,
    /// Rules for channels outside any configured namespace (TOML `[channel_defaults]`
    /// table only). Default: anonymous allowed, no client publish, no presence, no history.
    #[arg(skip)]
    pub channel_defaults: Option<NamespaceTable>,
    /// Per-namespace rules, `[namespaces.NAME]` tables for channels `NAME:...` (TOML
    /// only; keys they leave out come from `[channel_defaults]`). Default: none.
    #[arg(skip)]
    pub namespaces: Option<BTreeMap<String, NamespaceTable>>,
    /// The NATS cluster (`[cluster]` table, TOML only; see docs/cluster.md). Default: none
    /// (the node runs alone).
    #[arg(skip)]
    pub cluster: Option<crate::cluster::ClusterTable>,
    /// A tool to run instead of the server; without one, `ringcast` serves.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,
}

/// A tool `ringcast` runs instead of the server.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Read this host's limits and sysctls and print what to change for a connection
    /// count, with the memory math and each fix. Exit code 0: nothing blocks the count
    /// (warnings allowed), 1: something blocks it, 3: the host could not be read.
    CheckHost {
        /// Connections the host should hold. Default: 1000000.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 1_000_000,
            hide_default_value = true,
            value_parser = clap::value_parser!(u64).range(1..=100_000_000)
        )]
        connections: u64,
    },
    /// Configuration tools: check a file, print every key with its default.
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `ringcast config ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigAction {
    /// Validate FILE as the server would at start (without flags or environment): prints
    /// `ok` and exits 0, or names the key and the reason and exits 1.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print every key with its default as commented TOML (a valid config file).
    Defaults,
}

/// Validated settings the server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The settings a SIGHUP may change ([`crate::live`]): swapped while serving, so
    /// shards read them through [`crate::live::Cached`]; these are their values at start.
    pub live: Live,
    /// WebSocket listen address.
    pub listen: SocketAddr,
    /// UDP ingest address, if enabled.
    pub udp_ingest: Option<SocketAddr>,
    /// TCP ingest address, if enabled.
    pub tcp_ingest: Option<SocketAddr>,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// Deadline for a TCP ingest connection's `AUTH` line (with `ingest_key`).
    pub ingest_auth_timeout: Duration,
    /// Deadline for one whole admin request (and for writing its answer).
    pub admin_request_timeout: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Shard count (resolved, >= 1).
    pub shards: usize,
    /// Listener accept queue length.
    pub listen_backlog: u32,
    /// Frame/message/payload size limit.
    pub max_message_size: usize,
    /// Subscriptions per connection.
    pub max_subscriptions_per_connection: usize,
    /// Channels with state, process-wide, beyond which subscribes to new ones are refused.
    pub max_channels: u64,
    /// Silence before a ping.
    pub ping_interval: Duration,
    /// Silence after a ping before the connection is dead.
    pub pong_timeout: Duration,
    /// Deadline for the whole upgrade, from accept to the answer written.
    pub handshake_timeout: Duration,
    /// Per source address limits ([`crate::admission::per_ip`]). A reload applies the
    /// three limits to the per-address table (when one was on at start), not through
    /// [`Settings::live`]; `ipv6_prefix_len` needs a restart.
    pub per_ip: PerIpLimits,
    /// The PROXY header expected on the WebSocket port from `trusted_proxies`; `None`: off.
    pub proxy_protocol: Option<Versions>,
    /// Peers whose PROXY header is read (and required) when `proxy_protocol` is on.
    pub trusted_proxies: Vec<Cidr>,
    /// New connections accepted per second per shard (0: unlimited).
    pub accept_rate_per_shard: u32,
    /// Drain window.
    pub drain_window: Duration,
    /// Time between SIGTERM (readiness fails) and the drain (accepting stops).
    pub drain_grace: Duration,
    /// Ring slots.
    pub ring_capacity: usize,
    /// Idle time after which a channel's offset state is dropped; `None`: never.
    pub channel_idle_timeout: Option<Duration>,
    /// History messages kept per channel (0: none).
    pub history_size: usize,
    /// History retention.
    pub history_ttl: Duration,
    /// History frame bytes over all channels.
    pub history_max_bytes: u64,
    /// Most messages replayed per recovery.
    pub max_recovery_messages: usize,
    /// Most members a presence reply lists.
    pub presence_max_members: usize,
    /// glommio io memory per shard.
    pub io_memory: usize,
    /// The durable per-user inbox; `None` when off.
    pub inbox: Option<InboxConfig>,
    /// Directory of durable state (where the inbox file is by default).
    pub data_dir: PathBuf,
    /// Whether transparent huge pages stay enabled for the process.
    pub transparent_huge_pages: bool,
    /// Namespace rules, looked up per channel with [`Namespaces::rules_for`].
    pub namespaces: Namespaces,
    /// The NATS cluster; `None`: this node runs alone.
    pub cluster: Option<crate::cluster::ClusterSettings>,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Largest `presence_max_members`: a reply listing 10,000 members with long user ids is
/// already a few MB on one connection's send path.
pub const MAX_PRESENCE_MEMBERS: usize = 10_000;

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (ip, prefix) = s
            .trim()
            .split_once('/')
            .map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = ip.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    /// True when `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    /// `10.0.0.0/8`, `::1/128`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Settings {
    /// The PROXY header versions to read first from a WebSocket-port peer at `peer`, or
    /// `None` when that peer is served as a plain client (protocol off, or not trusted).
    pub fn proxy_header_from(&self, peer: IpAddr) -> Option<Versions> {
        self.proxy_protocol
            .filter(|_| self.trusted_proxies.iter().any(|c| c.contains(peer)))
    }
}

/// Reads the file named by `cli.config` (if any) and merges it under `cli`.
///
/// # Errors
/// A [`ConfigError`] naming the file or key at fault.
pub fn load(cli: ConfigLayer) -> Result<Settings, ConfigError> {
    let file = match &cli.config {
        None => ConfigLayer::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            parse_layer(&text).map_err(|message| ConfigError::Parse {
                path: path.clone(),
                message,
            })?
        }
    };
    resolve(cli, file)
}

/// Parses a config file's text. A wrongly typed or out-of-range value is named by its
/// full key (`namespaces.news.history_size`), not only by the line toml quotes.
/// Public for the fuzz targets (`fuzz/`) only.
#[doc(hidden)]
pub fn parse_layer(text: &str) -> Result<ConfigLayer, String> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let key = e.path().to_string();
        if key.is_empty() || key == "." {
            e.inner().to_string()
        } else {
            format!("`{key}`: {}", e.inner())
        }
    })
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    key: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        return Err(invalid(
            key,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

/// `ring_capacity` must be a power of two (the ring indexes with a mask): refused with
/// the nearest ones rather than silently rounded, so the memory is what was asked for.
fn power_of_two(n: usize) -> Result<usize, ConfigError> {
    if n.is_power_of_two() {
        return Ok(n);
    }
    let above = n.next_power_of_two();
    Err(invalid(
        "ring_capacity",
        format!(
            "must be a power of two, got {n}: use {} or {above}",
            above / 2
        ),
    ))
}

fn optional_addr(key: &'static str, v: String) -> Result<Option<SocketAddr>, ConfigError> {
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| invalid(key, format!("expected ADDR:PORT or `off`, got {v:?}")))
}

/// Merges `cli` over `file` over the defaults, then validates.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the first bad key.
pub fn resolve(cli: ConfigLayer, file: ConfigLayer) -> Result<Settings, ConfigError> {
    macro_rules! pick {
        ($field:ident, $default:expr) => {
            cli.$field
                .clone()
                .or(file.$field.clone())
                .unwrap_or_else(|| $default)
        };
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let shards = match pick!(shards, 0) {
        0 => cpus,
        n => in_range("shards", n, 1, 1024)?,
    };
    let ingest_allow = pick!(ingest_allow, Vec::new())
        .iter()
        .map(|s| {
            Cidr::parse(s).ok_or_else(|| invalid("ingest_allow", format!("not a CIDR: {s:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let auth = resolve_auth(&cli, &file)?;
    let trusted_proxies = pick!(trusted_proxies, Vec::new())
        .iter()
        .map(|s| {
            Cidr::parse(s).ok_or_else(|| invalid("trusted_proxies", format!("not a CIDR: {s:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let history_size = in_range("history_size", pick!(history_size, 100), 0, 1 << 20)?;
    let history_ttl = in_range("history_ttl", pick!(history_ttl, 300), 1, 30 * 24 * 3600)?;
    let builtin = NamespaceTable {
        history_size: Some(history_size as u64),
        history_ttl: Some(history_ttl),
        ..NamespaceTable::default()
    };
    let namespaces = Namespaces::resolve(
        &builtin,
        cli.channel_defaults
            .as_ref()
            .or(file.channel_defaults.as_ref()),
        cli.namespaces.as_ref().or(file.namespaces.as_ref()),
    )
    .map_err(|e| ConfigError::InvalidTable {
        key: e.key,
        message: e.message,
    })?;
    let s = Settings {
        live: Live {
            ingest_allow,
            ingest_key: match pick!(ingest_key, String::new()) {
                k if k.is_empty() => None,
                k => Some(IngestKey::new(&k).map_err(|m| invalid("ingest_key", m))?),
            },
            max_tcp_ingest_connections: in_range(
                "max_tcp_ingest_connections",
                pick!(max_tcp_ingest_connections, 1024),
                1,
                1 << 20,
            )?,
            max_admin_connections: in_range(
                "max_admin_connections",
                pick!(max_admin_connections, 1024),
                1,
                1 << 20,
            )?,
            max_connections: in_range(
                "max_connections",
                pick!(max_connections, 1_000_000),
                1,
                100_000_000,
            )?,
            tls: resolve_tls(&cli, &file)?,
            max_backlog_bytes: in_range(
                "max_backlog_bytes",
                pick!(max_backlog_bytes, 256 << 10),
                1024,
                1 << 30,
            )?,
            max_backlog_frames: in_range(
                "max_backlog_frames",
                pick!(max_backlog_frames, 4096),
                1,
                1 << 20,
            )?,
            slow_consumer_drop_limit: in_range(
                "slow_consumer_drop_limit",
                pick!(slow_consumer_drop_limit, 1000),
                1,
                u32::MAX,
            )?,
            slow_consumer_timeout: Duration::from_secs(in_range(
                "slow_consumer_timeout",
                pick!(slow_consumer_timeout, 10),
                1,
                3600,
            )?),
            max_inbound_per_sec: in_range(
                "max_inbound_per_sec",
                pick!(max_inbound_per_sec, 200),
                1,
                u32::MAX,
            )?,
            max_handshakes_per_shard: in_range(
                "max_handshakes_per_shard",
                pick!(max_handshakes_per_shard, 1024),
                1,
                1 << 20,
            )?,
            handshake_fair_share: pick!(handshake_fair_share, true),
            origins: OriginPolicy::new(
                &pick!(allowed_origins, vec!["*".to_string()]),
                pick!(allow_missing_origin, true),
            )
            .map_err(|e| invalid("allowed_origins", e))?,
            auth,
        },
        listen: pick!(listen, SocketAddr::from(([0, 0, 0, 0], 8080))),
        udp_ingest: optional_addr("udp_ingest", pick!(udp_ingest, "127.0.0.1:9000".into()))?,
        tcp_ingest: optional_addr("tcp_ingest", pick!(tcp_ingest, "127.0.0.1:9001".into()))?,
        admin: pick!(admin, SocketAddr::from(([127, 0, 0, 1], 9090))),
        log_format: match pick!(log_format, "text".into()).as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("expected `text` or `json`, got {other:?}"),
                ))
            }
        },
        ingest_auth_timeout: Duration::from_secs(in_range(
            "ingest_auth_timeout",
            pick!(ingest_auth_timeout, 10),
            1,
            600,
        )?),
        admin_request_timeout: Duration::from_secs(in_range(
            "admin_request_timeout",
            pick!(admin_request_timeout, 10),
            1,
            600,
        )?),
        shards,
        listen_backlog: in_range("listen_backlog", pick!(listen_backlog, 65_535), 1, 1 << 20)?,
        max_message_size: in_range(
            "max_message_size",
            pick!(max_message_size, 65_536),
            125,
            16 << 20,
        )?,
        max_subscriptions_per_connection: in_range(
            "max_subscriptions_per_connection",
            pick!(max_subscriptions_per_connection, 64),
            1,
            65_536,
        )?,
        max_channels: in_range("max_channels", pick!(max_channels, 2_000_000), 1, 1 << 40)?,
        ping_interval: Duration::from_secs(in_range(
            "ping_interval",
            pick!(ping_interval, 25),
            1,
            3600,
        )?),
        pong_timeout: Duration::from_secs(in_range(
            "pong_timeout",
            pick!(pong_timeout, 20),
            1,
            3600,
        )?),
        handshake_timeout: Duration::from_secs(in_range(
            "handshake_timeout",
            pick!(handshake_timeout, 10),
            1,
            600,
        )?),
        per_ip: PerIpLimits {
            max_connections: pick!(max_connections_per_ip, 0),
            max_new_per_sec: pick!(max_new_connections_per_ip_per_sec, 0),
            max_handshakes: pick!(max_handshakes_per_ip, 0),
            ipv6_prefix_len: in_range("ipv6_prefix_len", pick!(ipv6_prefix_len, 64), 1, 128)?,
        },
        proxy_protocol: match pick!(proxy_protocol, "off".into()).as_str() {
            "off" => None,
            "v1" => Some(Versions::V1),
            "v2" => Some(Versions::V2),
            "any" => Some(Versions::Any),
            other => {
                return Err(invalid(
                    "proxy_protocol",
                    format!("{other:?}: expected off, v1, v2 or any"),
                ))
            }
        },
        trusted_proxies,
        accept_rate_per_shard: pick!(accept_rate_per_shard, 0),
        drain_window: Duration::from_secs(in_range(
            "drain_window",
            pick!(drain_window, 30),
            0,
            3600,
        )?),
        drain_grace: Duration::from_secs(in_range("drain_grace", pick!(drain_grace, 5), 0, 3600)?),
        ring_capacity: power_of_two(in_range(
            "ring_capacity",
            pick!(ring_capacity, 16_384),
            16,
            1 << 24,
        )?)?,
        channel_idle_timeout: match in_range(
            "channel_idle_timeout",
            pick!(channel_idle_timeout, 3600),
            0,
            365 * 24 * 3600,
        )? {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
        history_size,
        history_ttl: Duration::from_secs(history_ttl),
        history_max_bytes: in_range(
            "history_max_bytes",
            pick!(history_max_bytes, 256 << 20),
            0,
            1 << 40,
        )?,
        max_recovery_messages: in_range(
            "max_recovery_messages",
            pick!(max_recovery_messages, 1000),
            0,
            1 << 20,
        )?,
        presence_max_members: in_range(
            "presence_max_members",
            pick!(presence_max_members, 1000),
            0,
            MAX_PRESENCE_MEMBERS,
        )?,
        io_memory: in_range("io_memory", pick!(io_memory, 256 << 10), 64 << 10, 1 << 30)?,
        inbox: resolve_inbox(&cli, &file)?,
        data_dir: pick!(data_dir, PathBuf::from("ringcast-data")),
        transparent_huge_pages: pick!(transparent_huge_pages, false),
        cluster: cli
            .cluster
            .as_ref()
            .or(file.cluster.as_ref())
            .map(|t| t.resolve(namespaces.max_history_size()))
            .transpose()
            .map_err(|(key, message)| ConfigError::InvalidTable {
                key: key.into(),
                message,
            })?
            .flatten(),
        namespaces,
    };
    let exposed = |key: &'static str, addr: Option<SocketAddr>| match addr {
        Some(a) if !a.ip().is_loopback() && s.live.ingest_allow.is_empty() => Err(invalid(
            key,
            format!("{a} is not loopback: set ingest_allow (CIDRs of the publishers) to expose it"),
        )),
        _ => Ok(()),
    };
    if s.proxy_protocol.is_some() && s.trusted_proxies.is_empty() {
        return Err(invalid(
            "trusted_proxies",
            "proxy_protocol is on but no peer is trusted to send the header: list the balancers' CIDRs",
        ));
    }
    if s.live.auth.cookie.is_some() && s.live.origins.allows_any() {
        // With "*", any web site could open a WebSocket, SSE stream or poll that the
        // browser sends the visitor's cookie with, and read their channels.
        return Err(invalid(
            "allowed_origins",
            "is [\"*\"] (the default) while jwt_cookie is set: list the origins of your \
             pages, or unset jwt_cookie, so that no other web site can use a visitor's cookie",
        ));
    }
    exposed("udp_ingest", s.udp_ingest)?;
    exposed("tcp_ingest", s.tcp_ingest)?;
    exposed("admin", Some(s.admin))?;
    Ok(s)
}

/// The TLS listener's address, certificate and key (files read and checked now, so a bad
/// pair stops the start or is refused by a reload, naming the key).
#[derive(Clone)]
pub struct TlsSettings {
    /// Where the TLS listener binds.
    pub listen: SocketAddr,
    /// `tls_cert_file`.
    pub cert_file: PathBuf,
    /// `tls_key_file`.
    pub key_file: PathBuf,
    /// The certificate and key, loaded.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSettings {
    /// The files, not the loaded chain (the startup log prints the settings).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("listen", &self.listen)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

fn resolve_tls(cli: &ConfigLayer, file: &ConfigLayer) -> Result<Option<TlsSettings>, ConfigError> {
    let pick = |c: &Option<PathBuf>, f: &Option<PathBuf>| c.clone().or_else(|| f.clone());
    let listen = cli.tls_listen.clone().or_else(|| file.tls_listen.clone());
    let cert = pick(&cli.tls_cert_file, &file.tls_cert_file);
    let key = pick(&cli.tls_key_file, &file.tls_key_file);
    let listen = match listen.as_deref().map(str::trim) {
        None | Some("") => return Ok(None),
        Some(v) => v.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "tls_listen",
                format!("expected ADDR:PORT or empty, got {v:?}"),
            )
        })?,
    };
    let cert_file = cert.ok_or_else(|| {
        invalid(
            "tls_cert_file",
            "tls_listen is set: name the PEM certificate chain",
        )
    })?;
    let key_file = key.ok_or_else(|| {
        invalid(
            "tls_key_file",
            "tls_listen is set: name the PEM private key",
        )
    })?;
    let server_config = crate::tls::load_server_config(&cert_file, &key_file).map_err(|e| {
        ConfigError::Invalid {
            key: e.key,
            message: format!("{}: {}", e.path, e.message),
        }
    })?;
    Ok(Some(TlsSettings {
        listen,
        cert_file,
        key_file,
        server_config,
    }))
}

/// The `inbox*` and `data_dir` keys, checked (bounds and that paths are not empty; the
/// file itself is opened at startup, with a precise error if that fails).
fn resolve_inbox(
    cli: &ConfigLayer,
    file: &ConfigLayer,
) -> Result<Option<InboxConfig>, ConfigError> {
    macro_rules! pick {
        ($field:ident) => {
            cli.$field.clone().or(file.$field.clone())
        };
    }
    let retention = in_range(
        "inbox_retention",
        pick!(inbox_retention).unwrap_or(7 * 24 * 3600),
        1,
        10 * 365 * 24 * 3600,
    )?;
    let max_batch = in_range(
        "inbox_max_batch",
        pick!(inbox_max_batch).unwrap_or(1024),
        1,
        1 << 16,
    )?;
    let queue = in_range(
        "inbox_queue",
        pick!(inbox_queue).unwrap_or(1 << 16),
        1,
        1 << 24,
    )?;
    let data_dir = pick!(data_dir).unwrap_or_else(|| PathBuf::from("ringcast-data"));
    if data_dir.as_os_str().is_empty() {
        return Err(invalid("data_dir", "must not be empty"));
    }
    let path = pick!(inbox_path).unwrap_or_else(|| data_dir.join("inbox.redb"));
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err(invalid(
            "inbox_path",
            format!("{} is not a file path", path.display()),
        ));
    }
    if !pick!(inbox).unwrap_or(false) {
        return Ok(None);
    }
    Ok(Some(InboxConfig {
        path,
        retention: Duration::from_secs(retention),
        max_batch,
        queue,
    }))
}

/// Shortest HMAC secret accepted: 256 bits, the HS256 output size (RFC 7518 3.2).
pub const MIN_JWT_SECRET_LEN: usize = 32;

/// The `jwt_*` and `allow_anonymous` keys, checked; reads the public key file.
fn resolve_auth(cli: &ConfigLayer, file: &ConfigLayer) -> Result<AuthSettings, ConfigError> {
    macro_rules! pick {
        ($field:ident) => {
            cli.$field.clone().or(file.$field.clone())
        };
    }
    let leeway = in_range("jwt_leeway", pick!(jwt_leeway).unwrap_or(5), 0, 300)?;
    let claim = pick!(jwt_channels_claim).unwrap_or_else(|| "channels".into());
    if claim.is_empty() || claim.len() > 64 {
        return Err(invalid("jwt_channels_claim", "must be 1-64 bytes"));
    }
    let cookie = pick!(jwt_cookie);
    if let Some(c) = &cookie {
        let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if c.is_empty() || !c.bytes().all(token_char) {
            return Err(invalid(
                "jwt_cookie",
                format!("{c:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"),
            ));
        }
    }
    let algorithm = match pick!(jwt_algorithm) {
        None => None,
        Some(name) => Some(JwtAlgorithm::parse(&name).ok_or_else(|| {
            invalid(
                "jwt_algorithm",
                format!(
                    "unknown algorithm {name:?}: expected one of {}",
                    JwtAlgorithm::NAMES
                ),
            )
        })?),
    };
    let public_key_file = pick!(jwt_public_key_file);
    let (key_name, key, algorithm) = match (pick!(jwt_secret), public_key_file.clone()) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "jwt_secret",
                "set either jwt_secret or jwt_public_key_file, not both",
            ))
        }
        (Some(secret), None) => {
            if secret.len() < MIN_JWT_SECRET_LEN {
                return Err(invalid(
                    "jwt_secret",
                    format!(
                        "must be at least {MIN_JWT_SECRET_LEN} bytes (256 bits), got {}",
                        secret.len()
                    ),
                ));
            }
            let algorithm = algorithm.unwrap_or(JwtAlgorithm::Hs256);
            (
                "jwt_secret",
                Some(KeyMaterial::Secret(secret.into_bytes())),
                algorithm,
            )
        }
        (None, Some(path)) => {
            let pem = std::fs::read(&path).map_err(|e| {
                invalid(
                    "jwt_public_key_file",
                    format!("reading {}: {e}", path.display()),
                )
            })?;
            let algorithm = algorithm.ok_or_else(|| {
                invalid(
                    "jwt_algorithm",
                    "set RS256, ES256 or EdDSA to say what jwt_public_key_file holds",
                )
            })?;
            (
                "jwt_public_key_file",
                Some(KeyMaterial::PublicKeyPem(pem)),
                algorithm,
            )
        }
        (None, None) if algorithm.is_some() => {
            return Err(invalid(
                "jwt_algorithm",
                "set jwt_secret or jwt_public_key_file too: an algorithm needs a key",
            ))
        }
        (None, None) => ("", None, JwtAlgorithm::Hs256),
    };
    let verifier = match key {
        None => None,
        Some(key) => Some(Arc::new(
            Verifier::new(algorithm, &key, leeway, &claim).map_err(|m| invalid(key_name, m))?,
        )),
    };
    let allow_anonymous = pick!(allow_anonymous).unwrap_or(verifier.is_none());
    if !allow_anonymous && verifier.is_none() {
        return Err(invalid(
            "allow_anonymous",
            "false needs jwt_secret or jwt_public_key_file: without a key no connection \
             could ever be admitted",
        ));
    }
    let subscribe_user_channel = pick!(subscribe_user_channel).unwrap_or(false);
    if subscribe_user_channel && verifier.is_none() {
        return Err(invalid(
            "subscribe_user_channel",
            "true needs jwt_secret or jwt_public_key_file: without a key no connection has a user",
        ));
    }
    Ok(AuthSettings {
        verifier,
        public_key_file,
        allow_anonymous,
        cookie,
        subscribe_user_channel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, ConfigError> {
        let mut argv = vec!["ringcast"];
        argv.extend_from_slice(args);
        resolve(
            ConfigLayer::try_parse_from(argv).unwrap(),
            ConfigLayer::default(),
        )
    }

    #[test]
    fn subscribe_user_channel_needs_a_key() {
        let err = parse(&["--subscribe-user-channel", "true"]).unwrap_err();
        assert!(err.to_string().contains("subscribe_user_channel"), "{err}");
        let ok = parse(&[
            "--subscribe-user-channel",
            "true",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
        ])
        .unwrap();
        assert!(ok.live.auth.subscribe_user_channel);
    }

    #[test]
    fn defaults_match_the_docs() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.udp_ingest.unwrap().to_string(), "127.0.0.1:9000");
        assert_eq!(s.tcp_ingest.unwrap().to_string(), "127.0.0.1:9001");
        assert_eq!(s.admin.to_string(), "127.0.0.1:9090");
        assert_eq!(s.ping_interval, Duration::from_secs(25));
        assert_eq!(s.live.max_handshakes_per_shard, 1024);
        assert!(s.live.handshake_fair_share);
        assert_eq!(s.ingest_auth_timeout, Duration::from_secs(10));
        assert_eq!(s.admin_request_timeout, Duration::from_secs(10));
        assert_eq!(
            (
                s.live.max_tcp_ingest_connections,
                s.live.max_admin_connections
            ),
            (1024, 1024)
        );
        for key in ["--ingest-auth-timeout", "--admin-request-timeout"] {
            let err = parse(&[key, "0"]).unwrap_err().to_string();
            assert!(err.contains(&key[2..].replace('-', "_")), "{err}");
        }
        let err = parse(&["--max-admin-connections", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`max_admin_connections`"), "{err}");
        assert_eq!(s.channel_idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(s.presence_max_members, 1000);
        assert_eq!(s.drain_grace, Duration::from_secs(5));
        assert_eq!(
            parse(&["--drain-grace", "0"]).unwrap().drain_grace,
            Duration::ZERO
        );
        let err = parse(&["--ring-capacity", "1000"]).unwrap_err().to_string();
        assert!(
            err.contains("`ring_capacity`") && err.contains("512 or 1024"),
            "{err}"
        );
        assert_eq!(
            parse(&["--ring-capacity", "1024"]).unwrap().ring_capacity,
            1024
        );
        let err = parse(&["--drain-grace", "3601"]).unwrap_err().to_string();
        assert!(err.contains("`drain_grace`"), "{err}");
    }

    #[test]
    fn per_ip_limits_are_off_by_default_and_bounded() {
        let s = parse(&[]).unwrap();
        assert!(!s.per_ip.any());
        assert_eq!(s.accept_rate_per_shard, 0);
        assert_eq!(s.per_ip.ipv6_prefix_len, 64);
        let s = parse(&[
            "--max-connections-per-ip",
            "5",
            "--max-new-connections-per-ip-per-sec",
            "2",
            "--max-handshakes-per-ip",
            "3",
        ])
        .unwrap();
        assert_eq!(
            (
                s.per_ip.max_connections,
                s.per_ip.max_new_per_sec,
                s.per_ip.max_handshakes
            ),
            (5, 2, 3)
        );
        let err = parse(&["--ipv6-prefix-len", "0"]).unwrap_err().to_string();
        assert!(err.contains("ipv6_prefix_len"), "{err}");
    }

    #[test]
    fn presence_max_members_is_bounded() {
        let s = parse(&["--presence-max-members", "0"]).unwrap();
        assert_eq!(s.presence_max_members, 0);
        let err = parse(&["--presence-max-members", "10001"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("presence_max_members"), "{err}");
    }

    #[test]
    fn inbox_is_off_by_default_and_its_path_follows_data_dir() {
        assert!(parse(&[]).unwrap().inbox.is_none());
        let on = parse(&["--inbox", "true"]).unwrap().inbox.unwrap();
        assert_eq!(on.path, PathBuf::from("ringcast-data/inbox.redb"));
        assert_eq!(on.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!((on.max_batch, on.queue), (1024, 65536));
        let file: ConfigLayer =
            toml::from_str("inbox = true\ndata_dir = \"/var/lib/rc\"\ninbox_retention = 60")
                .unwrap();
        let s = resolve(ConfigLayer::default(), file)
            .unwrap()
            .inbox
            .unwrap();
        assert_eq!(s.path, PathBuf::from("/var/lib/rc/inbox.redb"));
        assert_eq!(s.retention, Duration::from_secs(60));
        let explicit = parse(&["--inbox", "true", "--inbox-path", "/x/y.redb"]).unwrap();
        assert_eq!(explicit.inbox.unwrap().path, PathBuf::from("/x/y.redb"));
        let err = parse(&["--inbox-max-batch", "0"]).unwrap_err().to_string();
        assert!(err.contains("inbox_max_batch"), "{err}");
        let err = parse(&["--inbox-path", "/"]).unwrap_err().to_string();
        assert!(err.contains("inbox_path"), "{err}");
    }

    #[test]
    fn channel_idle_timeout_zero_means_never_and_bounds_name_the_key() {
        let s = parse(&["--channel-idle-timeout", "0"]).unwrap();
        assert_eq!(s.channel_idle_timeout, None);
        let file: ConfigLayer = toml::from_str("channel_idle_timeout = 60").unwrap();
        let s = resolve(ConfigLayer::default(), file).unwrap();
        assert_eq!(s.channel_idle_timeout, Some(Duration::from_secs(60)));
        let err = parse(&["--channel-idle-timeout", "99999999999"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("channel_idle_timeout"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file: ConfigLayer =
            toml::from_str("max_message_size = 1000\nping_interval = 5").unwrap();
        let cli = ConfigLayer::try_parse_from(["ringcast", "--ping-interval", "7"]).unwrap();
        let s = resolve(cli, file).unwrap();
        assert_eq!((s.max_message_size, s.ping_interval.as_secs()), (1000, 7));
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = parse(&["--max-message-size", "3"]).unwrap_err().to_string();
        assert!(err.contains("max_message_size"), "{err}");
        let err = parse(&["--udp-ingest", "0.0.0.0:9000"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("udp_ingest") && err.contains("ingest_allow"),
            "{err}"
        );
        assert!(parse(&[
            "--udp-ingest",
            "0.0.0.0:9000",
            "--ingest-allow",
            "10.0.0.0/8"
        ])
        .is_ok());
        let err = parse(&["--max-handshakes-per-shard", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_handshakes_per_shard"), "{err}");
        let file: ConfigLayer = toml::from_str("max_handshakes_per_shard = 7").unwrap();
        let s = resolve(ConfigLayer::default(), file).unwrap();
        assert_eq!(s.live.max_handshakes_per_shard, 7);
        let err = toml::from_str::<ConfigLayer>("max_mesage_size = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_mesage_size"), "{err}");
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn the_ingest_key_is_optional_and_checked() {
        assert!(parse(&[]).unwrap().live.ingest_key.is_none());
        let s = parse(&["--ingest-key", SECRET]).unwrap();
        assert!(s.live.ingest_key.unwrap().matches(SECRET.as_bytes()));
        for bad in ["short", "with a space 0123456789"] {
            let err = parse(&["--ingest-key", bad]).unwrap_err().to_string();
            assert!(err.contains("`ingest_key`"), "{err}");
            assert!(!err.contains(bad), "the key is not echoed: {err}");
        }
    }

    #[test]
    fn no_auth_keys_means_everyone_is_anonymous() {
        let s = parse(&[]).unwrap();
        assert!(!s.live.auth.enabled());
        assert!(s.live.auth.allow_anonymous);
        assert!(s.namespaces.rules_for("news:x").anonymous);
    }

    #[test]
    fn auth_keys_are_checked_and_name_their_key() {
        let s = parse(&["--jwt-secret", SECRET]).unwrap();
        assert!(s.live.auth.enabled());
        assert!(
            !s.live.auth.allow_anonymous,
            "a key turns anonymous access off by default"
        );
        let s = parse(&["--jwt-secret", SECRET, "--allow-anonymous", "true"]).unwrap();
        assert!(s.live.auth.allow_anonymous);
        for (args, key) in [
            (&["--jwt-secret", "short"][..], "jwt_secret"),
            (
                &["--jwt-secret", SECRET, "--jwt-algorithm", "RS256"][..],
                "jwt_secret",
            ),
            (
                &["--jwt-secret", SECRET, "--jwt-algorithm", "XX1"][..],
                "jwt_algorithm",
            ),
            (&["--jwt-algorithm", "HS256"][..], "jwt_algorithm"),
            (
                &[
                    "--jwt-public-key-file",
                    "/nonexistent/key.pem",
                    "--jwt-algorithm",
                    "RS256",
                ][..],
                "jwt_public_key_file",
            ),
            (
                &[
                    "--jwt-public-key-file",
                    "/nonexistent",
                    "--jwt-secret",
                    SECRET,
                ][..],
                "jwt_secret",
            ),
            (&["--allow-anonymous", "false"][..], "allow_anonymous"),
            (
                &["--jwt-secret", SECRET, "--jwt-leeway", "9999"][..],
                "jwt_leeway",
            ),
            (
                &[
                    "--jwt-secret",
                    SECRET,
                    "--jwt-cookie",
                    "a b",
                    "--allowed-origins",
                    "https://a.b",
                ][..],
                "jwt_cookie",
            ),
            // Regression: a cookie with every origin allowed let any site read a
            // logged-in visitor's channels.
            (
                &["--jwt-secret", SECRET, "--jwt-cookie", "rc"][..],
                "allowed_origins",
            ),
            (
                &["--jwt-secret", SECRET, "--jwt-channels-claim", ""][..],
                "jwt_channels_claim",
            ),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{args:?}: {err}");
        }
    }

    #[test]
    fn a_public_key_file_needs_its_algorithm() {
        let path =
            std::env::temp_dir().join(format!("ringcast-config-test-{}.pem", std::process::id()));
        std::fs::write(&path, include_str!("auth/testdata/ed25519.pub.pem")).unwrap();
        let file = path.to_str().unwrap();
        let err = parse(&["--jwt-public-key-file", file])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`jwt_algorithm`"), "{err}");
        assert!(parse(&["--jwt-public-key-file", file, "--jwt-algorithm", "EdDSA"]).is_ok());
        let err = parse(&["--jwt-public-key-file", file, "--jwt-algorithm", "RS256"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`jwt_public_key_file`"), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn namespace_tables_come_from_the_file() {
        let file: ConfigLayer = toml::from_str(
            "[channel_defaults]\nhistory_size = 5\n[namespaces.news]\nallow_publish = true\n",
        )
        .unwrap();
        let s = resolve(ConfigLayer::default(), file).unwrap();
        assert!(s.namespaces.rules_for("news:eu").allow_publish);
        assert_eq!(s.namespaces.rules_for("news:eu").history_size, 5);
        assert_eq!(s.namespaces.rules_for("other").history_size, 5);
        // Behind both tables: the top-level keys (defaults 100 messages, 300 s).
        let s = resolve(ConfigLayer::default(), ConfigLayer::default()).unwrap();
        let rules = s.namespaces.rules_for("news:eu");
        assert_eq!(rules.history_size, 100);
        assert_eq!(rules.history_ttl, Some(Duration::from_secs(300)));
        let file: ConfigLayer = toml::from_str(
            "history_size = 7
[namespaces.news]
history_ttl = 9
",
        )
        .unwrap();
        let s = resolve(ConfigLayer::default(), file).unwrap();
        let rules = s.namespaces.rules_for("news:eu");
        assert_eq!(rules.history_size, 7);
        assert_eq!(rules.history_ttl, Some(Duration::from_secs(9)));
        let file: ConfigLayer = toml::from_str(
            "[namespaces.quiet]
history_size = 0
",
        )
        .unwrap();
        let s = resolve(ConfigLayer::default(), file).unwrap();
        assert_eq!(
            s.namespaces.rules_for("quiet:x").history_size,
            0,
            "inherited TTL is fine"
        );
        let err = parse_layer("[namespaces.news]\nhistory_size = -1\n").unwrap_err();
        assert!(err.starts_with("`namespaces.news.history_size`: "), "{err}");
        let err = parse_layer("max_connections_per_ip = -5\n").unwrap_err();
        assert!(err.starts_with("`max_connections_per_ip`: "), "{err}");
        assert!(err.contains("line 1"), "the line is still quoted: {err}");
        let err = toml::from_str::<ConfigLayer>("[namespaces.news]\nhistroy_size = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("histroy_size"), "{err}");
        let file: ConfigLayer = toml::from_str("[namespaces.news]\njoin_leave = true\n").unwrap();
        let err = resolve(ConfigLayer::default(), file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`namespaces.news.join_leave`"), "{err}");
    }

    #[test]
    fn cidrs_match() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
    }
}
