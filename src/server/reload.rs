//! What a SIGHUP does: reads the configuration again (the file, under the command line and
//! environment of the start), applies the keys that can change at runtime ([`crate::live`])
//! and the process-wide limits, and refuses a bad file without touching what runs.

use super::shared::Shared;
use crate::admission::per_ip::PerIpTable;
use crate::config::ConfigLayer;
use crate::metrics::Metrics;
use crate::shard::admission::ConnectionSlots;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a SIGHUP needs: the start's command line and environment, the file's keys as last
/// read, and the process-wide limits to change.
pub(super) struct Reloader {
    cli: ConfigLayer,
    table: toml::Table,
    slots: Arc<ConnectionSlots>,
    /// The per-address table, when a per-IP limit was on at start (its limits reload;
    /// without one, turning a limit on needs a restart).
    per_ip: Option<Arc<PerIpTable>>,
    /// Counts reloads applied and refused.
    metrics: &'static Metrics,
}

impl Reloader {
    /// What a reload needs: the start's command line and environment, the file's keys
    /// as read at start, and the shared limits it changes.
    pub(super) fn new(cli: ConfigLayer, table: toml::Table, shared: &Shared) -> Reloader {
        Reloader {
            cli,
            table,
            slots: shared.slots.clone(),
            per_ip: shared.per_ip.clone(),
            metrics: shared.metrics,
        }
    }

    /// Reads the configuration again and applies what can change at runtime; a bad file is
    /// refused (logged with the key at fault) and the running configuration stays.
    pub(super) fn reload(&mut self) {
        let counters = &self.metrics.config_reloads;
        match crate::live::reload(&self.cli, &self.table) {
            Err(e) => {
                counters[1].fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "config reload refused: {e}; the running configuration stays");
            }
            Ok(mut reloaded) => {
                if self.per_ip.is_none() {
                    // No table was kept at start (every per-IP limit off): there are no
                    // counts to check a new limit against.
                    let (later, now): (Vec<String>, Vec<String>) = reloaded
                        .applied
                        .drain(..)
                        .partition(|k| crate::live::PER_IP_KEYS.contains(&k.as_str()));
                    reloaded.applied = now;
                    reloaded.need_restart.extend(later);
                }
                for key in &reloaded.need_restart {
                    tracing::warn!(
                        key = %key,
                        "config reload: `{key}` changed but needs a restart; the running value stays"
                    );
                }
                self.slots.set_limit(reloaded.settings.live.max_connections);
                if let Some(table) = &self.per_ip {
                    table.set_limits(reloaded.settings.per_ip);
                }
                if let Some(tls) = &reloaded.settings.live.tls {
                    tracing::info!(
                        cert = %tls.cert_file.display(),
                        key = %tls.key_file.display(),
                        "TLS certificate and key re-read; new handshakes use them"
                    );
                }
                crate::live::install(reloaded.settings.live);
                self.table = reloaded.table;
                counters[0].fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    changed = ?reloaded.applied,
                    "config reloaded: {}",
                    if reloaded.applied.is_empty() {
                        "no runtime key changed".to_string()
                    } else {
                        format!("applied {}", reloaded.applied.join(", "))
                    }
                );
            }
        }
    }
}
