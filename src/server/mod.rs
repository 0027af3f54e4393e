//! The process: builds what every shard shares, binds every socket, starts one pinned
//! shard thread per core, then waits: SIGHUP reloads the configuration, SIGTERM/SIGINT
//! drains.
//!
//! [`run`] binds every socket first (so a bad address fails before any shard starts),
//! then starts the shards and waits until every one reports that it serves (only then is
//! "ringcast started" logged, `/readyz` answers 200 and systemd hears `READY=1`; a shard
//! that cannot start makes `run` fail), then waits for a drain to finish.
//!
//! - `shared`: the process-wide state handed to every shard (publisher, inbox, cluster,
//!   registries, connection counts).
//! - `sockets`: every listener, bound up front.
//! - `shard_threads`: the executors, their wake-up and control channels, the wait
//!   until each serves.
//! - `reload`: what a SIGHUP changes; `drain`: the signal wait and the drain.
//! - `limits`: process limits set at start (RLIMIT_NOFILE, transparent huge pages).
//! - [`startup_log`]: the effective configuration as the startup log states it.

mod drain;
mod limits;
mod reload;
mod shard_threads;
mod shared;
mod sockets;
pub mod startup_log;

use crate::config::{ConfigLayer, Settings};
use crate::metrics::Metrics;
use crate::sd_notify::{Event, Notifier};
use crate::shard::listener::BindError;
use crate::shard::ShardError;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Why the server could not start or run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A shard could not start serving.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// Signal handling could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// The inbox is on but its database cannot be used.
    #[error("inbox: {0}; fix it, point inbox_path (or data_dir) at a writable place, or set inbox = false to run without durable user inboxes")]
    Inbox(crate::inbox::StoreError),
}

/// Runs the server until a drain completes; SIGHUP re-resolves the command line and
/// environment alone (no file to read again).
///
/// # Errors
/// [`StartError`] when a socket cannot be bound or a shard cannot start.
pub fn run(settings: Settings) -> Result<(), StartError> {
    run_reloadable(settings, ConfigLayer::default())
}

/// Runs the server until a drain completes; SIGHUP reads `cli.config` again and applies
/// the keys that can change at runtime ([`crate::live`]), with `cli` (the command line and
/// environment of the start) still overriding the file.
///
/// # Errors
/// [`StartError`] when a socket cannot be bound or a shard cannot start.
pub fn run_reloadable(settings: Settings, cli: ConfigLayer) -> Result<(), StartError> {
    let table = match &cli.config {
        Some(path) => crate::live::read_file(path).map_or_else(|_| toml::Table::new(), |(t, _)| t),
        None => toml::Table::new(),
    };
    crate::live::install(settings.live.clone());
    let settings = Arc::new(settings);
    let metrics = Metrics::leak(settings.shards);
    limits::apply(&settings);
    let (shared, inbox_queues) = shared::Shared::start(settings.clone(), metrics)?;
    let reloader = reload::Reloader::new(cli, table, &shared);
    let sockets = sockets::bind(&settings)?;
    let done = shard_threads::start(&shared, inbox_queues, sockets)?;
    let n = settings.shards;
    tracing::info!(
        shards = n,
        ws = %settings.listen,
        tls = ?settings.live.tls.as_ref().map(|t| t.listen),
        udp = ?settings.udp_ingest,
        tcp = ?settings.tcp_ingest,
        admin = %settings.admin,
        "ringcast started"
    );
    // /readyz answers 200 from here, after the line above, never before.
    shared.lifecycle.serving(n);
    // systemd (Type=notify) hears READY=1 at the same moment, never before.
    let notifier = Notifier::from_env();
    notifier.send(&Event::Ready {
        status: &serving_status(&settings),
    });
    let drained = drain::wait_for_drain(&settings, &shared.lifecycle, done, reloader, &notifier);
    if let Some(inbox) = &shared.inbox {
        // After the drain: nothing is published any more.
        if !inbox.close(INBOX_CLOSE_WAIT) {
            tracing::warn!("the inbox store did not close in time: the next start repairs it");
        }
    }
    drained
}

/// How long the exit waits for the inbox store to close its file.
const INBOX_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The `STATUS=` line while serving: shards and listening addresses.
fn serving_status(settings: &Settings) -> String {
    format!(
        "serving: {} shards, ws {}, admin {}",
        settings.shards, settings.listen, settings.admin
    )
}
