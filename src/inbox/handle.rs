//! The handle shards and ingest use to reach the inbox backend, whichever runs: the
//! redb store thread ([`crate::inbox::redb`]) or the JetStream one
//! ([`crate::inbox::jetstream`]). Requests (publish / ack / read) go over one bounded
//! queue, `try_send` (nothing on a shard waits), counted in `ringcast_inbox_queued` until
//! the backend answers them ([`crate::inbox::reply`]).

use crate::inbox::reply::InboxReply;
use crate::inbox::{ErrorKind, InboxStats, StoreError};
use bytes::Bytes;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the inbox backend runs (from [`crate::config::Settings`]); `path` and `max_batch`
/// are the redb store's.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The database file.
    pub path: PathBuf,
    /// How long an unacked message is kept.
    pub retention: Duration,
    /// Most requests per group commit.
    pub max_batch: usize,
    /// Requests the queue holds before publishes to inboxes are refused.
    pub queue: usize,
}

/// One request to the inbox backend (the redb store thread, or the JetStream backend
/// when the cluster is on).
#[derive(Debug)]
pub(crate) enum Request {
    Publish {
        channel: Arc<str>,
        payload: Bytes,
        reply: InboxReply,
    },
    Ack {
        channel: Arc<str>,
        upto: u64,
        reply: InboxReply,
    },
    Read {
        channel: Arc<str>,
        reply: InboxReply,
    },
}

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxRequestError {
    /// The queue is full: the store is behind.
    Full,
    /// The store thread is gone.
    Gone,
}

impl InboxRequestError {
    /// As a store error (for replies and metrics).
    pub fn to_store_error(self) -> StoreError {
        match self {
            InboxRequestError::Full => StoreError::new(
                ErrorKind::Overloaded,
                "inbox store is behind (its queue is full): retry later",
            ),
            InboxRequestError::Gone => {
                StoreError::new(ErrorKind::Unavailable, "inbox store thread is not running")
            }
        }
    }
}

/// The handle shards and ingest use to reach the store thread.
#[derive(Clone)]
pub struct Inbox {
    tx: flume::Sender<Request>,
    stats: Arc<InboxStats>,
    path: Arc<PathBuf>,
    /// Closes the store thread's database at shutdown (`None` for other backends).
    closer: Option<Arc<StoreCloser>>,
}

/// Stops the store thread and waits for it to close the database: a redb file that is
/// not closed (its allocator state written) is repaired at the next open, which takes
/// time proportional to the file and says the last run ended badly when it did not.
#[derive(Debug)]
pub(crate) struct StoreCloser {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl StoreCloser {
    /// Sets `stop` at shutdown, then waits for `thread` to end.
    pub(crate) fn new(stop: Arc<AtomicBool>, thread: std::thread::JoinHandle<()>) -> Self {
        StoreCloser {
            stop,
            thread: Mutex::new(Some(thread)),
        }
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("path", &self.path).finish()
    }
}

impl Inbox {
    /// At shutdown, after the shards stopped: the store thread finishes the batch in
    /// hand and closes the database cleanly. Waits at most `timeout`; false when the
    /// thread did not finish in time (the next start then repairs the file).
    pub fn close(&self, timeout: Duration) -> bool {
        let Some(closer) = &self.closer else {
            return true;
        };
        closer.stop.store(true, Relaxed);
        let Some(thread) = closer.thread.lock().take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.join().is_ok()
    }

    /// A handle on a backend's request queue `tx`; `path` names the backend in logs (the
    /// database file, or the JetStream stream), and `closer` stops its thread at
    /// shutdown (`None`: nothing to close).
    pub(crate) fn new(
        tx: flume::Sender<Request>,
        stats: Arc<InboxStats>,
        path: PathBuf,
        closer: Option<StoreCloser>,
    ) -> Inbox {
        Inbox {
            tx,
            stats,
            path: Arc::new(path),
            closer: closer.map(Arc::new),
        }
    }

    /// The database file (or, for JetStream, the stream's name).
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<InboxStats> {
        &self.stats
    }

    fn send(&self, request: Request) -> Result<(), InboxRequestError> {
        // Counted before it can be taken, so the gauge never goes below zero.
        self.stats.queued.fetch_add(1, Relaxed);
        self.tx.try_send(request).map_err(|e| {
            self.refused(match e {
                flume::TrySendError::Full(_) => InboxRequestError::Full,
                flume::TrySendError::Disconnected(_) => InboxRequestError::Gone,
            })
        })
    }

    fn refused(&self, err: InboxRequestError) -> InboxRequestError {
        self.stats.queued.fetch_sub(1, Relaxed);
        self.stats.errors[err.to_store_error().kind as usize].fetch_add(1, Relaxed);
        err
    }

    /// [`Inbox::publish`] that waits while the queue is full (TCP ingest: the
    /// connection stops being read, and its sender is held back by TCP).
    ///
    /// # Errors
    /// The store thread is gone: nothing was queued.
    pub async fn publish_waiting(
        &self,
        channel: &str,
        payload: &[u8],
        reply: InboxReply,
    ) -> Result<(), InboxRequestError> {
        self.stats.queued.fetch_add(1, Relaxed);
        let request = Request::Publish {
            channel: Arc::from(channel),
            payload: Bytes::copy_from_slice(payload),
            reply,
        };
        let request = match self.tx.try_send(request) {
            Ok(()) => return Ok(()),
            Err(flume::TrySendError::Full(request)) => request,
            Err(flume::TrySendError::Disconnected(_)) => {
                return Err(self.refused(InboxRequestError::Gone))
            }
        };
        self.stats.waits.fetch_add(1, Relaxed);
        self.tx
            .send_async(request)
            .await
            .map_err(|_| self.refused(InboxRequestError::Gone))
    }

    /// Queues a message for `channel` (a user channel); `reply` learns its offset once
    /// committed and published.
    ///
    /// # Errors
    /// The queue is full or the store thread is gone: nothing was queued.
    pub fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        reply: InboxReply,
    ) -> Result<(), InboxRequestError> {
        self.send(Request::Publish {
            channel: Arc::from(channel),
            payload: Bytes::copy_from_slice(payload),
            reply,
        })
    }

    /// Queues a cumulative ack of `channel` up to `upto`.
    ///
    /// # Errors
    /// The queue is full or the store thread is gone.
    pub fn ack(
        &self,
        channel: &str,
        upto: u64,
        reply: InboxReply,
    ) -> Result<(), InboxRequestError> {
        self.send(Request::Ack {
            channel: Arc::from(channel),
            upto,
            reply,
        })
    }

    /// Queues a read of `channel`'s unacked messages.
    ///
    /// # Errors
    /// The queue is full or the store thread is gone.
    pub fn read(&self, channel: &str, reply: InboxReply) -> Result<(), InboxRequestError> {
        self.send(Request::Read {
            channel: Arc::from(channel),
            reply,
        })
    }
}
