//! The wait after the start: SIGHUP reloads, SIGTERM/SIGINT starts the shutdown
//! (`/readyz` 503, then the drain after `drain_grace`), a second signal exits at once;
//! returns when every shard finished its drain or the window ran out.

use super::reload::Reloader;
use super::StartError;
use crate::config::Settings;
use crate::sd_notify::{self, Event, Notifier};
use crate::shard::lifecycle::Lifecycle;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Blocks until SIGTERM/SIGINT starts a shutdown and every shard finished its drain (or
/// the window plus a grace period passed). The first signal turns `/readyz` 503 at once;
/// the listeners keep accepting for `drain_grace` (a load balancer's health check takes
/// the node out meanwhile), then the drain stops accepting and closes connections. A
/// second signal exits at once.
pub(super) fn wait_for_drain(
    settings: &Settings,
    lifecycle: &Lifecycle,
    done: mpsc::Receiver<usize>,
    mut reloader: Reloader,
    notifier: &Notifier,
) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(StartError::Signals)?;
    let first = loop {
        match signals.forever().next() {
            Some(SIGHUP) => {
                tracing::info!("SIGHUP: reloading the configuration");
                notifier.send(&Event::Reloading {
                    monotonic_usec: sd_notify::monotonic_usec(),
                });
                reloader.reload();
                notifier.send(&Event::Reloaded {
                    status: &super::serving_status(settings),
                });
            }
            other => break other,
        }
    };
    lifecycle.stop();
    notifier.send(&Event::Stopping {
        status: &format!(
            "shutting down: /readyz 503, draining in {} s over {} s",
            settings.drain_grace.as_secs(),
            settings.drain_window.as_secs()
        ),
    });
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGHUP {
                tracing::warn!("SIGHUP during shutdown: not reloading");
                continue;
            }
            tracing::warn!(
                signal = sig,
                "second signal: exiting without finishing the drain"
            );
            std::process::exit(1);
        }
    });
    if !settings.drain_grace.is_zero() {
        tracing::info!(signal = ?first, grace_secs = settings.drain_grace.as_secs(), "shutting down: /readyz answers 503, still accepting until the drain starts; send the signal again to exit at once");
        std::thread::sleep(settings.drain_grace);
    }
    tracing::info!(signal = ?first, window_secs = settings.drain_window.as_secs(), "draining: no new connections; send the signal again to exit at once");
    lifecycle.drain();
    notifier.send(&Event::Status(&format!(
        "draining: closing connections with 1001 over {} s",
        settings.drain_window.as_secs()
    )));
    let deadline = Instant::now() + settings.drain_window + Duration::from_secs(5);
    for _ in 0..settings.shards {
        let left = deadline.saturating_duration_since(Instant::now());
        if done.recv_timeout(left).is_err() {
            tracing::warn!("drain window passed with connections still open; exiting");
            break;
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}
