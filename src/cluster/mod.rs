//! The cluster bridge: ringcast nodes joined over NATS (docs/cluster.md).
//!
//! Off unless `[cluster] nats_url` is set; a node without it runs alone. When on, one
//! plain OS thread ([`thread`]) runs the NATS client on a small current-thread tokio
//! runtime. It owns every channel's cluster offsets: local ingest hands it messages over
//! a bounded queue (never waiting), it publishes them to one JetStream stream with the
//! next offset and the channel's epoch (optimistic concurrency on the subject's last
//! sequence), and it gives each message, from this node or another, to the local
//! publisher with [`crate::fanout::publisher::Publisher::publish_at`] in offset order,
//! then wakes idle shards through their cross-thread wake queues (as the inbox does).
//!
//! - [`subject`]: channel names as subject tokens, header names (sans-io).
//! - [`thread`]: the NATS thread.
//! - [`presence_wire`], [`presence`]: presence queries and join/leave events across
//!   nodes (sans-io payloads; the NATS-thread side).
//! - [`nats`]: the NATS runtime both NATS threads run on (this bridge's, and the
//!   JetStream inbox's, [`crate::inbox::jetstream`]).
//! - [`interest`]: the shards' interest in channels, coalesced for those threads.

pub mod interest;
pub(crate) mod nats;
pub mod presence;
pub mod presence_wire;
pub(crate) mod stored;
pub mod subject;
pub mod thread;

use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

pub use thread::{Cluster, ClusterReply, JoinAnswer, JoinTag};

/// The `[cluster]` table as written in the file (TOML only).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterTable {
    /// NATS server URL(s), comma-separated; absent: no cluster.
    pub nats_url: Option<String>,
    /// A NATS credentials (.creds) file.
    pub nats_creds_file: Option<PathBuf>,
    /// User name (with `nats_password`).
    pub nats_user: Option<String>,
    /// Password (with `nats_user`).
    pub nats_password: Option<String>,
    /// Token authentication.
    pub nats_token: Option<String>,
    /// PEM CA file to verify the NATS server's certificate (turns TLS on).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// The JetStream stream holding channel messages.
    pub stream_name: Option<String>,
    /// Its replicas (1, 3 or 5 on a NATS cluster).
    pub stream_replicas: Option<usize>,
    /// The first token of every ringcast subject.
    pub subject_prefix: Option<String>,
    /// Seconds a channel's live subscription is kept after its last local subscriber left.
    pub interest_linger: Option<u64>,
    /// Milliseconds a presence query waits for the other nodes' answers.
    pub presence_window_ms: Option<u64>,
    /// Publishes accepted for the stream and not yet answered, at most.
    pub publish_queue: Option<usize>,
}

/// How a node joins the cluster (validated).
#[derive(Clone)]
pub struct ClusterSettings {
    /// NATS server URLs.
    pub nats_url: String,
    /// Credentials file.
    pub creds_file: Option<PathBuf>,
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// Token.
    pub token: Option<String>,
    /// CA file for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Stream name.
    pub stream_name: String,
    /// Stream replicas.
    pub stream_replicas: usize,
    /// Subject prefix.
    pub subject_prefix: String,
    /// Interest hysteresis.
    pub interest_linger: Duration,
    /// `max_msgs_per_subject` of the stream: the largest history size of any namespace.
    pub history_size: usize,
    /// How long a presence query gathers the other nodes' answers.
    pub presence_window: Duration,
    /// Publishes accepted for the stream and not yet answered, at most (every queue
    /// between ingest and JetStream together).
    pub publish_queue: usize,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("nats_url", &self.nats_url)
            .field("creds_file", &self.creds_file)
            .field("user", &self.user_password.as_ref().map(|(u, _)| u))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("stream_name", &self.stream_name)
            .field("stream_replicas", &self.stream_replicas)
            .field("subject_prefix", &self.subject_prefix)
            .field("interest_linger", &self.interest_linger)
            .field("history_size", &self.history_size)
            .field("presence_window", &self.presence_window)
            .field("publish_queue", &self.publish_queue)
            .finish()
    }
}

/// Default `[cluster] publish_queue`: about two seconds of a single JetStream stream's
/// publish rate on one node; at 64 KiB messages it bounds the memory they hold to 1 GiB.
pub const DEFAULT_PUBLISH_QUEUE: usize = 16_384;

fn token_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ClusterTable {
    /// Validates the table; `Ok(None)` when `nats_url` is absent (no cluster).
    ///
    /// # Errors
    /// `(key, why)` for the first bad key.
    pub fn resolve(
        &self,
        history_size: usize,
    ) -> Result<Option<ClusterSettings>, (&'static str, String)> {
        let Some(url) = self.nats_url.clone().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        for part in url.split(',') {
            let part = part.trim();
            let rest = part.split_once("://").map_or(part, |(scheme, rest)| {
                if matches!(scheme, "nats" | "tls") {
                    rest
                } else {
                    ""
                }
            });
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err((
                    "cluster.nats_url",
                    format!("expected nats://HOST:PORT (comma-separated), got {part:?}"),
                ));
            }
        }
        let user_password = match (&self.nats_user, &self.nats_password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => {
                return Err((
                    "cluster.nats_user",
                    "nats_user and nats_password go together".into(),
                ))
            }
        };
        let methods = [
            self.nats_creds_file.is_some(),
            user_password.is_some(),
            self.nats_token.is_some(),
        ];
        if methods.iter().filter(|&&m| m).count() > 1 {
            return Err((
                "cluster.nats_creds_file",
                "choose one of nats_creds_file, nats_user/nats_password, nats_token".into(),
            ));
        }
        for (key, path) in [
            ("cluster.nats_creds_file", &self.nats_creds_file),
            ("cluster.nats_tls_ca_file", &self.nats_tls_ca_file),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    return Err((key, format!("{}: {e}", path.display())));
                }
            }
        }
        let stream_name = self
            .stream_name
            .clone()
            .unwrap_or_else(|| "RINGCAST".into());
        if !token_ok(&stream_name) {
            return Err(("cluster.stream_name", "1-64 bytes of [A-Za-z0-9_-]".into()));
        }
        let subject_prefix = self.subject_prefix.clone().unwrap_or_else(|| "rc".into());
        if !token_ok(&subject_prefix) {
            return Err((
                "cluster.subject_prefix",
                "1-64 bytes of [A-Za-z0-9_-] (one subject token)".into(),
            ));
        }
        let stream_replicas = self.stream_replicas.unwrap_or(1);
        if !(1..=5).contains(&stream_replicas) {
            return Err((
                "cluster.stream_replicas",
                format!("must be between 1 and 5, got {stream_replicas}"),
            ));
        }
        let linger = self.interest_linger.unwrap_or(30);
        if linger > 3600 {
            return Err((
                "cluster.interest_linger",
                format!("must be between 0 and 3600, got {linger}"),
            ));
        }
        let window = self.presence_window_ms.unwrap_or(100);
        if !(1..=5000).contains(&window) {
            return Err((
                "cluster.presence_window_ms",
                format!("must be between 1 and 5000, got {window}"),
            ));
        }
        let publish_queue = self.publish_queue.unwrap_or(DEFAULT_PUBLISH_QUEUE);
        if !(1..=1 << 20).contains(&publish_queue) {
            return Err((
                "cluster.publish_queue",
                format!("must be between 1 and 1048576, got {publish_queue}"),
            ));
        }
        Ok(Some(ClusterSettings {
            nats_url: url,
            creds_file: self.nats_creds_file.clone(),
            user_password,
            token: self.nats_token.clone(),
            tls_ca_file: self.nats_tls_ca_file.clone(),
            stream_name,
            stream_replicas,
            subject_prefix,
            interest_linger: Duration::from_secs(linger),
            history_size: history_size.max(1),
            presence_window: Duration::from_millis(window),
            publish_queue,
        }))
    }
}

/// Cluster counters (`ringcast_cluster_*`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// 1 while the NATS connection is up.
    pub up: AtomicU64,
    /// Messages stored in the stream by this node.
    pub published: AtomicU64,
    /// Publishes retried after another node took the offset (error 10071).
    pub retries: AtomicU64,
    /// Messages published on this node while NATS was unreachable (local epoch).
    pub local_only: AtomicU64,
    /// Publishes that failed (refused to the publisher or served locally).
    pub publish_errors: AtomicU64,
    /// Messages from other nodes given to the local publisher.
    pub received: AtomicU64,
    /// Duplicates dropped (own echoes, refetched messages).
    pub duplicates: AtomicU64,
    /// Messages read back from the stream to fill a hole or resync.
    pub fetched: AtomicU64,
    /// Offsets skipped because they could not be read back.
    pub gap_offsets: AtomicU64,
    /// Channels with a live subscription on this node.
    pub subscriptions: AtomicU64,
    /// Reconnections to NATS.
    pub reconnects: AtomicU64,
    /// Joins: subscribes waiting until the node follows their channel.
    pub join: thread::JoinStats,
    /// 1 while the NATS connection is up, whether or not the stream is usable.
    pub connected: AtomicU64,
    /// Publishes sent again with the same message id after an unknown outcome.
    pub resent: AtomicU64,
    /// Re-sent publishes the stream had already stored (duplicate ack).
    pub deduped: AtomicU64,
    /// Publishes refused because `publish_queue` publishes were waiting.
    pub publish_refused: AtomicU64,
    /// Joins queued for the NATS thread (gauge).
    pub join_queued: AtomicU64,
}

impl ClusterStats {
    /// True when the NATS connection is down.
    pub fn is_down(&self) -> bool {
        self.up.load(Relaxed) == 0 && self.connected.load(Relaxed) == 0
    }

    /// True when connected to NATS but the stream is not usable yet (JetStream
    /// unavailable or refusing the stream): cluster publishes are refused.
    pub fn is_not_ready(&self) -> bool {
        self.up.load(Relaxed) == 0 && self.connected.load(Relaxed) == 1
    }
}

impl Cluster {
    /// A shard's subscription index gained (`true`) or lost its subscribers on `channel`:
    /// tells the NATS thread, which keeps the channel's live subscription while any shard
    /// has one (and `interest_linger` after). Never waits.
    pub fn note_interest(&self, channel: &str, on: bool) {
        if interest::note_routed(channel, on) {
            return; // A user channel kept by the JetStream inbox.
        }
        self.interest(channel, on);
        presence::interest(channel, on);
    }
}

/// Appends the `ringcast_cluster_*` metrics.
pub fn render_metrics(cluster: &Cluster, out: &mut String) {
    use std::fmt::Write;
    let s = cluster.stats();
    let rows: [(&str, &str, &str, &AtomicU64); 13] = [
        (
            "ringcast_cluster_publish_refused_total",
            "counter",
            "Publishes refused (or, for TCP ingest, waited for) because publish_queue publishes were waiting for JetStream.",
            &s.publish_refused,
        ),
        (
            "ringcast_cluster_join_queued",
            "gauge",
            "Subscribes' joins queued for the NATS thread (at most 65536; beyond, subscribes are answered from local state).",
            &s.join_queued,
        ),
        (
            "ringcast_cluster_up",
            "gauge",
            "1 while the NATS connection is up and the JetStream stream usable (cross-node delivery works), else 0.",
            &s.up,
        ),
        (
            "ringcast_cluster_published_total",
            "counter",
            "Messages this node stored in the JetStream stream.",
            &s.published,
        ),
        (
            "ringcast_cluster_publish_retries_total",
            "counter",
            "Publishes retried because another node took the offset first (JetStream error 10071).",
            &s.retries,
        ),
        (
            "ringcast_cluster_local_publishes_total",
            "counter",
            "Messages published on this node only, in a local epoch, while NATS was unreachable.",
            &s.local_only,
        ),
        (
            "ringcast_cluster_publish_errors_total",
            "counter",
            "Stream publishes that failed (then served locally or refused).",
            &s.publish_errors,
        ),
        (
            "ringcast_cluster_received_total",
            "counter",
            "Messages from other nodes given to this node's subscribers.",
            &s.received,
        ),
        (
            "ringcast_cluster_duplicates_total",
            "counter",
            "Cluster messages dropped as already delivered (own echoes, re-reads).",
            &s.duplicates,
        ),
        (
            "ringcast_cluster_fetched_total",
            "counter",
            "Messages read back from the stream to fill a hole or resync after an outage.",
            &s.fetched,
        ),
        (
            "ringcast_cluster_gap_offsets_total",
            "counter",
            "Offsets skipped because they could not be read back from the stream.",
            &s.gap_offsets,
        ),
        (
            "ringcast_cluster_subscriptions",
            "gauge",
            "Channels this node has a live NATS subscription for (local interest, plus linger).",
            &s.subscriptions,
        ),
        (
            "ringcast_cluster_reconnects_total",
            "counter",
            "Reconnections to NATS after a lost connection.",
            &s.reconnects,
        ),
    ];
    let failover: [(&str, &str, &str, &AtomicU64); 3] = [
        (
            "ringcast_cluster_connected",
            "gauge",
            "1 while the NATS connection is up, whether or not the JetStream stream is usable (up 0 with connected 1: JetStream not ready, publishes refused).",
            &s.connected,
        ),
        (
            "ringcast_cluster_publish_resent_total",
            "counter",
            "Stream publishes sent again with the same Nats-Msg-Id after an unknown outcome (ack timeout, no responders).",
            &s.resent,
        ),
        (
            "ringcast_cluster_publish_deduped_total",
            "counter",
            "Re-sent publishes the stream had already stored (JetStream duplicate ack): not stored twice.",
            &s.deduped,
        ),
    ];
    for (name, kind, help, v) in rows.into_iter().chain(failover) {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP ringcast_cluster_publish_queued Publishes accepted for the JetStream stream and not yet answered (at most [cluster] publish_queue).\n# TYPE ringcast_cluster_publish_queued gauge\nringcast_cluster_publish_queued {}",
        cluster.publish_queued()
    );
    s.join.render(out);
    presence::render_metrics(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_url_means_no_cluster_and_bad_keys_are_named() {
        assert!(ClusterTable::default().resolve(100).unwrap().is_none());
        let t = ClusterTable {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..ClusterTable::default()
        };
        let s = t.resolve(100).unwrap().unwrap();
        assert_eq!(
            (s.stream_name.as_str(), s.subject_prefix.as_str()),
            ("RINGCAST", "rc")
        );
        let bad = ClusterTable {
            stream_replicas: Some(7),
            ..t.clone()
        };
        assert_eq!(bad.resolve(100).unwrap_err().0, "cluster.stream_replicas");
        assert_eq!(s.publish_queue, DEFAULT_PUBLISH_QUEUE);
        let bad = ClusterTable {
            publish_queue: Some(0),
            ..t.clone()
        };
        assert_eq!(bad.resolve(100).unwrap_err().0, "cluster.publish_queue");
        let bad = ClusterTable {
            nats_user: Some("u".into()),
            ..t.clone()
        };
        assert_eq!(bad.resolve(100).unwrap_err().0, "cluster.nats_user");
        let bad = ClusterTable {
            nats_url: Some("http://x".into()),
            ..t
        };
        assert_eq!(bad.resolve(100).unwrap_err().0, "cluster.nats_url");
    }
}
