//! A shard's connection table and the per-connection state the fan-out path touches.
//!
//! The read side of a connection (frame decoder, partial input) lives in its task; only
//! what other tasks on the shard need is here: the socket fd for writes, the send backlog,
//! the waker of the connection task, liveness timestamps and a pending close. The entry
//! is small on purpose (idle memory per connection is the product).

use crate::fanout::backlog::SendBacklog;
use crate::metrics::CloseCause;
use crate::proto::close::CloseReason;
use std::os::fd::RawFd;
use std::task::Waker;

/// A close decided by someone other than the connection task (fan-out, heartbeat, drain).
#[derive(Debug)]
pub struct PendingClose {
    /// Close frame to send (none when the peer is gone).
    pub reason: Option<CloseReason>,
    /// Metric label.
    pub cause: CloseCause,
}

/// One WebSocket connection as the shard sees it.
#[derive(Debug)]
pub struct Conn {
    /// The socket, for direct non-blocking writes.
    pub fd: RawFd,
    /// Frames waiting to be written.
    pub backlog: SendBacklog,
    /// Wakes the connection task (to wait for writability or to close).
    pub waker: Option<Waker>,
    /// Shard clock second of the last byte received.
    pub last_rx: u32,
    /// A ping went out since `last_rx`.
    pub pinged: bool,
    /// In the shard's list of connections to flush after this fan-out round.
    pub dirty: bool,
    /// Set when the connection must close; the task acts on it.
    pub close: Option<Box<PendingClose>>,
}

impl Conn {
    /// A fresh connection entry for `fd`, alive as of `now`.
    pub fn new(fd: RawFd, now: u32) -> Self {
        Conn {
            fd,
            backlog: SendBacklog::default(),
            waker: None,
            last_rx: now,
            pinged: false,
            dirty: false,
            close: None,
        }
    }

    /// Asks the connection task to close with `reason` (first request wins).
    pub fn request_close(&mut self, reason: Option<CloseReason>, cause: CloseCause) {
        if self.close.is_none() {
            self.close = Some(Box::new(PendingClose { reason, cause }));
        }
        self.wake();
    }

    /// Wakes the connection task.
    pub fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}
