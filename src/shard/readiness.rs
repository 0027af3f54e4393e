//! Readiness of idle sockets: one epoll set per shard instead of one io_uring poll and one
//! task per connection.
//!
//! glommio keeps an armed poll request, its `Source` and a task per socket it reads from:
//! about 1.6 KB of user-space memory per idle connection as measured here, over three
//! times the budget. Mostly idle connections are the product, so they wait in an
//! edge-triggered epoll set instead, costing the kernel an `epitem` and us nothing. One job
//! on the shard's glommio blocking-pool thread sleeps in `epoll_wait` and hands the ready
//! tokens back to the shard in batches; the shard then reads, decodes and answers on its
//! own thread. Inbound traffic is rare here (commands, pongs), so the one cross-thread
//! hop per batch is cheap; the hot path (fan-out writes) never goes through it.

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

/// Readiness bits a connection cares about: input, peer hang-up, and (edge-triggered,
/// so only after a full send buffer drains) writability.
const INTEREST: EpollFlags = EpollFlags::EPOLLIN
    .union(EpollFlags::EPOLLOUT)
    .union(EpollFlags::EPOLLRDHUP)
    .union(EpollFlags::EPOLLET);

/// Most events taken per wait.
const BATCH: usize = 1024;

/// One ready socket: its token and what it is ready for.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// Token given at registration.
    pub token: u64,
    /// Readable, or hung up / errored (read to find out).
    pub readable: bool,
    /// Writable again.
    pub writable: bool,
}

/// A shard's epoll set.
#[derive(Clone)]
pub struct ReadySet {
    epoll: Arc<Epoll>,
}

impl ReadySet {
    /// A new, empty set.
    ///
    /// # Errors
    /// `epoll_create1` failures (EMFILE, ENOMEM).
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        Ok(ReadySet {
            epoll: Arc::new(epoll),
        })
    }

    /// Adds a socket under `token`.
    ///
    /// # Errors
    /// `epoll_ctl` failures (ENOMEM, ENOSPC at fs.epoll.max_user_watches).
    pub fn add(&self, fd: impl AsFd, token: u64) -> io::Result<()> {
        Ok(self.epoll.add(fd, EpollEvent::new(INTEREST, token))?)
    }

    /// Removes a socket (also implied by closing its last descriptor).
    pub fn remove(&self, fd: impl AsFd) {
        let _ = self.epoll.delete(fd);
    }

    /// Blocks up to `timeout_ms` for ready sockets (run on a blocking-pool thread).
    pub fn wait(&self, timeout_ms: u16) -> Vec<Ready> {
        let mut events = vec![EpollEvent::empty(); BATCH];
        let n = self
            .epoll
            .wait(&mut events, EpollTimeout::from(timeout_ms))
            .unwrap_or(0);
        events[..n]
            .iter()
            .map(|e| {
                let f = e.events();
                Ready {
                    token: e.data(),
                    readable: f.intersects(
                        EpollFlags::EPOLLIN
                            | EpollFlags::EPOLLRDHUP
                            | EpollFlags::EPOLLHUP
                            | EpollFlags::EPOLLERR,
                    ),
                    writable: f.contains(EpollFlags::EPOLLOUT),
                }
            })
            .collect()
    }
}
