//! Settings that change while the server runs: a process-wide snapshot that SIGHUP swaps.
//!
//! [`Live`] holds the keys a reload may change (see [`RELOADABLE`]): limits checked once
//! per upgrade or per tick, the ingest/admin allowlist and the token keys. It is the
//! reloadable part of [`Settings`] (its field `live`, not a copy of it), resolved
//! with every other key by [`crate::config::resolve`]. A reload publishes the new one
//! behind a lock and a generation counter; readers keep a [`Cached`] copy and compare one
//! relaxed atomic load against the counter, so nothing on a per-message path ever takes
//! the lock. Every other key is read once at start and needs a restart; a reload that
//! changes one says so in the log and keeps the running value.
//!
//! [`reload`] is pure apart from reading the file: it resolves the file under the
//! command line and environment of the start (which still override it), exactly as at
//! start, and names the keys whose values changed.

use crate::auth::AuthSettings;
use crate::config::{resolve, Cidr, ConfigError, ConfigLayer, Settings, TlsSettings};
use crate::ingest::key::IngestKey;
use crate::proto::origin::OriginPolicy;
use parking_lot::RwLock;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Keys a SIGHUP applies to the running process; every other key needs a restart.
pub const RELOADABLE: &[&str] = &[
    "max_connections",
    "max_handshakes_per_shard",
    "handshake_fair_share",
    "max_tcp_ingest_connections",
    "max_admin_connections",
    "max_backlog_bytes",
    "max_backlog_frames",
    "slow_consumer_drop_limit",
    "slow_consumer_timeout",
    "max_inbound_per_sec",
    "ingest_allow",
    "ingest_key",
    "jwt_secret",
    "jwt_public_key_file",
    "jwt_algorithm",
    "jwt_leeway",
    "jwt_cookie",
    "jwt_channels_claim",
    "allow_anonymous",
    "subscribe_user_channel",
    "allowed_origins",
    "allow_missing_origin",
    "tls_cert_file",
    "tls_key_file",
    "max_connections_per_ip",
    "max_new_connections_per_ip_per_sec",
    "max_handshakes_per_ip",
];

/// The per-IP limits among [`RELOADABLE`]: they reload only when one of them was on at
/// start (the process keeps no per-address counts otherwise), else they need a restart.
pub const PER_IP_KEYS: &[&str] = &[
    "max_connections_per_ip",
    "max_new_connections_per_ip_per_sec",
    "max_handshakes_per_ip",
];

/// Keys whose values are secret: a reload names them, never their values.
pub const SECRET_KEYS: &[&str] = &["jwt_secret", "ingest_key"];

/// The settings a reload may change: the part of [`Settings`] swapped while serving
/// ([`Settings::live`]). The per-IP limits among [`RELOADABLE`] are not here: they reload
/// into the per-address table's atomics ([`crate::admission::per_ip::PerIpTable`]).
#[derive(Debug, Clone)]
pub struct Live {
    /// Connection limit over all shards.
    pub max_connections: usize,
    /// Upgrades in flight per shard.
    pub max_handshakes_per_shard: usize,
    /// Whether a full shard's upgrade places are shared fairly between addresses.
    pub handshake_fair_share: bool,
    /// Open TCP ingest connections over the process.
    pub max_tcp_ingest_connections: usize,
    /// Open admin-port connections.
    pub max_admin_connections: usize,
    /// Backlog bytes before a connection lags.
    pub max_backlog_bytes: usize,
    /// Backlog frames before a connection lags.
    pub max_backlog_frames: usize,
    /// Messages a lagging connection may lose before 1013.
    pub slow_consumer_drop_limit: u32,
    /// Time a lagging connection may take nothing before 1013.
    pub slow_consumer_timeout: Duration,
    /// Client frames per second before 1008.
    pub max_inbound_per_sec: u32,
    /// Sources allowed on non-loopback ingest/admin ports.
    pub ingest_allow: Vec<Cidr>,
    /// Key TCP/HTTP publishers must present; `None`: none asked.
    pub ingest_key: Option<IngestKey>,
    /// Token verification and anonymous access.
    pub auth: AuthSettings,
    /// Browser origins allowed on the WebSocket port (upgrade, SSE, long-poll).
    pub origins: OriginPolicy,
    /// The TLS listener, when `tls_listen` is set. Its certificate and key are re-read
    /// from the files on every reload, so a renewed certificate at the same path is picked
    /// up: new handshakes use the newest, open connections keep theirs. Its `listen`
    /// address is bound once at start.
    pub tls: Option<TlsSettings>,
}

impl Live {
    /// True when `ip` may use ingest/admin: loopback always, others by allowlist.
    pub fn ingest_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_loopback() || self.ingest_allow.iter().any(|c| c.contains(ip))
    }
}

static CURRENT: RwLock<Option<Arc<Live>>> = RwLock::new(None);
/// Bumped after every [`install`]; 0 while nothing was installed.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Publishes `live` as the process's current snapshot.
pub fn install(live: Live) {
    *CURRENT.write() = Some(Arc::new(live));
    GENERATION.fetch_add(1, Ordering::Release);
}

/// The current snapshot, if one was installed.
pub fn current() -> Option<Arc<Live>> {
    CURRENT.read().clone()
}

/// A reader's copy of the snapshot, refreshed when a reload installed a newer one.
#[derive(Debug, Clone)]
pub struct Cached {
    generation: u64,
    live: Arc<Live>,
    /// Never refreshed (a shard built for a unit test keeps its own settings).
    pinned: bool,
}

impl Cached {
    /// The current snapshot, or `fallback`'s values while none is installed (unit tests
    /// that build a shard without starting a server).
    pub fn new(fallback: &Settings) -> Cached {
        let generation = GENERATION.load(Ordering::Acquire);
        let live = current().unwrap_or_else(|| Arc::new(fallback.live.clone()));
        Cached {
            generation,
            live,
            pinned: false,
        }
    }

    /// `live`, never refreshed by installs.
    pub fn pinned(live: Live) -> Cached {
        Cached {
            generation: 0,
            live: Arc::new(live),
            pinned: true,
        }
    }

    /// The snapshot, re-read first if a newer one was installed: one atomic load when not.
    pub fn get(&mut self) -> &Arc<Live> {
        self.refresh();
        &self.live
    }

    /// Re-reads the snapshot if a newer one was installed; true when it did.
    pub fn refresh(&mut self) -> bool {
        let generation = GENERATION.load(Ordering::Acquire);
        if self.pinned || generation == self.generation {
            return false;
        }
        if let Some(live) = current() {
            self.live = live;
        }
        self.generation = generation;
        true
    }
}

/// A configuration file read again, resolved and compared with the previous one.
#[derive(Debug)]
pub struct Reloaded {
    /// The new settings, validated as at start.
    pub settings: Settings,
    /// The file's keys as TOML, to compare the next reload against.
    pub table: toml::Table,
    /// Reloadable keys whose values changed (applied).
    pub applied: Vec<String>,
    /// Keys that changed but need a restart (the running values stay).
    pub need_restart: Vec<String>,
}

/// Reads the file at `path` as TOML, both as raw keys (to compare) and as a layer.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`] naming the file and key.
pub fn read_file(path: &Path) -> Result<(toml::Table, ConfigLayer), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let layer = crate::config::parse_layer(&text).map_err(parse)?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| parse(e.to_string()))?;
    Ok((table, layer))
}

/// Reads `cli.config` again and resolves it under `cli`, as at start; `previous` is the
/// file's keys as last read, to say what changed.
///
/// # Errors
/// The [`ConfigError`] naming the key at fault; the caller keeps the running settings.
pub fn reload(cli: &ConfigLayer, previous: &toml::Table) -> Result<Reloaded, ConfigError> {
    let (table, layer) = match &cli.config {
        Some(path) => read_file(path)?,
        None => (toml::Table::new(), ConfigLayer::default()),
    };
    let settings = resolve(cli.clone(), layer)?;
    let (applied, need_restart) = changed_keys(previous, &table);
    Ok(Reloaded {
        settings,
        table,
        applied,
        need_restart,
    })
}

/// The top-level keys whose values differ between `old` and `new` (added, removed or
/// changed; a changed `[namespaces.NAME]` table counts as its top-level key), split into
/// reloadable and restart-only, each sorted.
pub fn changed_keys(old: &toml::Table, new: &toml::Table) -> (Vec<String>, Vec<String>) {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let (mut applied, mut restart) = (Vec::new(), Vec::new());
    for key in keys {
        if old.get(key) == new.get(key) {
            continue;
        }
        if RELOADABLE.contains(&key.as_str()) {
            applied.push(key.clone());
        } else {
            restart.push(key.clone());
        }
    }
    (applied, restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn changed_keys_are_split_into_reloadable_and_restart_only() {
        let old = table("max_connections = 10\nlisten = \"127.0.0.1:1\"\nping_interval = 5\n[namespaces.a]\nanonymous = true\n");
        let new = table("max_connections = 20\nlisten = \"127.0.0.1:2\"\nping_interval = 5\njwt_leeway = 3\n[namespaces.a]\nanonymous = false\n");
        let (applied, restart) = changed_keys(&old, &new);
        assert_eq!(applied, vec!["jwt_leeway", "max_connections"]);
        assert_eq!(restart, vec!["listen", "namespaces"]);
        assert_eq!(changed_keys(&old, &old), (vec![], vec![]));
    }

    #[test]
    fn every_reloadable_key_is_a_config_key() {
        for key in RELOADABLE {
            let flag = format!("--{}", key.replace('_', "-"));
            let help = <ConfigLayer as clap::CommandFactory>::command()
                .get_arguments()
                .any(|a| a.get_long() == Some(&flag[2..]));
            assert!(help, "{key} is not a flag of the server");
        }
    }

    #[test]
    fn a_cached_copy_follows_installs() {
        let defaults = crate::config::resolve(ConfigLayer::default(), ConfigLayer::default())
            .expect("defaults resolve");
        let mut cached = Cached::new(&defaults);
        let mut pinned = Cached::pinned(defaults.live.clone());
        let mut next = defaults.live.clone();
        next.max_connections = 7;
        install(next);
        assert!(cached.refresh());
        assert_eq!(cached.get().max_connections, 7);
        assert!(!cached.refresh(), "no newer snapshot");
        assert!(!pinned.refresh());
        assert_eq!(pinned.get().max_connections, defaults.live.max_connections);
    }
}
