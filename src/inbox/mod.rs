//! The durable per-user inbox: messages to `user:<id>` channels are written to a redb
//! file before they are published, and kept until the user acknowledges them.
//!
//! One interface, two backends side by side:
//!
//! - [`handle`] is what shards and ingest hold: the [`Inbox`] handle that queues
//!   publish / ack / read requests (bounded, never waiting on a shard).
//! - [`reply`] is the way back, shared by both backends: the answers ([`InboxAnswer`],
//!   tagged for the connection that asked) on each shard's queue, and wake-ups.
//! - [`redb`] is the node's own store: a thread that owns a redb file, the single writer
//!   of every user channel. It assigns offsets, commits a whole batch with one fsync,
//!   publishes the committed messages into the ring with those offsets and the store's
//!   epoch, then answers each requester.
//! - [`jetstream`] keeps user channels in JetStream when the cluster is on
//!   (docs/cluster.md, "Inbox"), so any node can serve a user.
//!
//! The shards do not know which backend runs. docs/architecture.md ("The durable inbox")
//! says why redb and why this shape.

pub mod handle;
pub mod jetstream;
pub mod redb;
pub mod reply;

use crate::metrics::LatencyHistogram;
use std::sync::atomic::AtomicU64;
use thiserror::Error;

pub use handle::{Inbox, InboxConfig, InboxRequestError};
pub use reply::{AnswerKind, Backlog, InboxAnswer, InboxReply, ShardQueues, ShardTag};

/// The channel prefix the inbox keeps.
pub const USER_PREFIX: &str = "user:";

/// True for a `user:<id>` channel (one the inbox keeps when it is on).
pub fn is_user_channel(channel: &str) -> bool {
    channel.len() > USER_PREFIX.len() && channel.starts_with(USER_PREFIX)
}

/// What kind of failure a store error is (metric label `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No space left on the device (or quota exceeded).
    DiskFull = 0,
    /// Permission denied, or a read-only file system.
    Permission,
    /// The file is not a redb database, is corrupt or needs an upgrade.
    Corrupt,
    /// Another process has the file open.
    Locked,
    /// Any other I/O or database error.
    Io,
    /// The store thread's queue is full: it is behind on commits.
    Overloaded,
    /// The store thread is gone or the inbox is off.
    Unavailable,
}

impl ErrorKind {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 7] = [
        "disk_full",
        "permission",
        "corrupt",
        "locked",
        "io",
        "overloaded",
        "unavailable",
    ];

    /// This kind's metric label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

/// A store failure with the context an operator needs.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct StoreError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What failed, for logs and replies.
    pub message: String,
}

impl StoreError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            kind,
            message: message.into(),
        }
    }

    /// Classifies an I/O error by errno.
    pub fn from_io(e: &std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::DiskFull,
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorKind::Permission,
            _ => ErrorKind::Io,
        };
        StoreError::new(kind, e.to_string())
    }

    /// Classifies a redb error.
    pub fn from_redb(e: &::redb::Error) -> Self {
        match e {
            ::redb::Error::Io(io) => StoreError::from_io(io),
            ::redb::Error::Corrupted(_)
            | ::redb::Error::UpgradeRequired(_)
            | ::redb::Error::TypeDefinitionChanged { .. }
            | ::redb::Error::TableTypeMismatch { .. } => {
                StoreError::new(ErrorKind::Corrupt, format!("{e} (the inbox file is damaged or not an inbox: restore it from a backup or move it away)"))
            }
            ::redb::Error::DatabaseAlreadyOpen => StoreError::new(
                ErrorKind::Locked,
                format!("{e} (is another ringcast using the same inbox_path?)"),
            ),
            other => StoreError::new(ErrorKind::Io, other.to_string()),
        }
    }

    /// The same error with `what` in front ("opening /var/lib/...: permission denied").
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// The inbox counters, shared by the store thread and the metrics.
#[derive(Default)]
pub struct InboxStats {
    /// Messages committed to the store.
    pub stored: AtomicU64,
    /// Write transactions committed (each one fsync).
    pub commits: AtomicU64,
    /// Messages removed by client acks.
    pub acked: AtomicU64,
    /// Ack commands applied.
    pub acks: AtomicU64,
    /// Messages removed by the retention sweep.
    pub expired: AtomicU64,
    /// Unacked messages sent to subscribers on subscribe.
    pub delivered: AtomicU64,
    /// Times an inbox subscribe waited because its shard's ring follower was too far
    /// behind to place it exactly (see crate::shard::inbox).
    pub subscribe_waits: AtomicU64,
    /// Acks refused because they reached past a gap notice the connection was sent.
    pub acks_past_gap: AtomicU64,
    /// Failures by [`ErrorKind`].
    pub errors: [AtomicU64; ErrorKind::LABELS.len()],
    /// Requests waiting for the store (gauge): queued, or taken and not yet answered.
    pub queued: AtomicU64,
    /// TCP ingest publishes that waited for room in a full queue.
    pub waits: AtomicU64,
    /// Duration of each commit (write + fsync).
    pub commit_latency: LatencyHistogram,
    /// 1 while the store is open and writable (gauge).
    pub up: AtomicU64,
    /// Cluster inbox: publishes sent again with the same `Nats-Msg-Id` after an unknown
    /// outcome.
    pub resent: AtomicU64,
    /// Cluster inbox: re-sent publishes the stream had already stored (duplicate ack).
    pub deduped: AtomicU64,
    /// Cluster inbox: publishes into a user subject that retention had emptied of
    /// unacked messages, whose offset skipped past every offset those may have had.
    pub offset_skips: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_channels_and_error_kinds() {
        assert!(is_user_channel("user:42"));
        assert!(!is_user_channel("user:"));
        assert!(!is_user_channel("users:1"));
        let full = StoreError::from_io(&std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.kind.label(), "disk_full");
        let denied = StoreError::from_io(&std::io::Error::from_raw_os_error(libc::EACCES))
            .context("opening /x/inbox.redb");
        assert_eq!(denied.kind, ErrorKind::Permission);
        assert!(denied.to_string().starts_with("opening /x/inbox.redb: "));
    }
}
