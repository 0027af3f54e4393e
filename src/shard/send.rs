//! The send path: frames go from a connection's backlog to its socket.
//!
//! Writes are non-blocking `sendmsg`s with every queued frame as one iovec, so a burst of N
//! frames for one subscriber costs one write, not N. The fan-out round queues a message to
//! every subscriber first, then flushes each dirty connection once, all of them submitted
//! together through the shard's io_uring ([`crate::shard::batch`]); a single connection
//! (a reply, a pong) is written with a direct `sendmsg`. When the kernel's send buffer is full the rest stays queued; the
//! shard's epoll set reports the socket writable again (edge-triggered) and the flush
//! resumes from there.

use crate::engine::round::ROUND;
use crate::engine::Wire;
use crate::metrics::CloseCause;
use crate::proto::conn::Written;
use crate::shard::batch::{BatchEntry, SendOutcome, SendRing};
use crate::shard::state::Shard;
use crate::shard::table::{Conn, ConnTable, Socket};
use nix::sys::socket::{sendmsg, shutdown, MsgFlags, Shutdown, SockaddrStorage};
use std::cell::Cell;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Most iovecs per `sendmsg` (IOV_MAX is 1024). One fan-out round queues at most
/// [`ROUND`] frames per connection, so a round's burst goes out in one call. Measured on the
/// 2000-message burst (docs/benchmarks.md): 64 iovecs per call gave 3.9M deliveries per
/// server-CPU-second, 256 gave 7M: the kernel's per-call and per-segment costs dominate.
const MAX_IOV: usize = ROUND;

/// Sends (connections flushed, or subscribers offered a message) between two looks at the
/// clock: after each chunk the fan-out yields to the executor if it has held the core for
/// [`FAIR_SLICE`].
pub const FAIR_CHUNK: usize = 4096;

/// How long the fan-out may hold the core before it lets accepts, heartbeats and ingest
/// run. Yielding after every chunk regardless cost the 2000-message burst to 5k
/// subscribers ~15% of its deliveries per CPU-second (docs/benchmarks.md): a yield polls
/// for I/O, and a burst round is hundreds of chunks.
pub const FAIR_SLICE: Duration = Duration::from_millis(1);

/// When the fan-out last gave the core away.
#[derive(Debug)]
pub struct FairSlice {
    since: Cell<Instant>,
    slice: Cell<Duration>,
}

impl Default for FairSlice {
    fn default() -> Self {
        FairSlice {
            since: Cell::new(Instant::now()),
            slice: Cell::new(FAIR_SLICE),
        }
    }
}

impl FairSlice {
    /// True once the fan-out has held the core for its slice.
    pub fn used(&self) -> bool {
        self.since.get().elapsed() >= self.slice.get()
    }

    /// Lets every other task of the shard (and the reactor) run, and starts a new slice.
    pub async fn yield_now(&self) {
        // Not `yield_if_needed`: glommio's preemption timer is far coarser than the slice,
        // and yielding the task queue (not only the task) lets glommio poll for I/O, so a
        // pending accept is served.
        glommio::executor().yield_task_queue_now().await;
        self.since.set(Instant::now());
    }

    /// Yields if the slice is used up.
    pub async fn yield_if_used(&self) {
        if self.used() {
            self.yield_now().await;
        }
    }

    /// Sets the slice (tests: zero yields after every chunk).
    pub fn set_slice(&self, slice: Duration) {
        self.slice.set(slice);
    }
}

pub use crate::engine::Flush;

impl Wire<Socket> for Shard {
    fn flush(&self, _key: u32, conn: &mut Conn) -> Flush {
        Shard::flush(self, conn)
    }

    fn flush_listed(&self, keys: &[u32]) {
        for chunk in keys.chunks(FAIR_CHUNK) {
            self.flush_keys(chunk);
        }
    }
}

impl Shard {
    /// Writes as much of `conn`'s backlog as the socket takes right now, and counts
    /// what is left in the backlog gauge (whatever queued it).
    pub fn flush(&self, conn: &mut Conn) -> Flush {
        let result = self.write_out(conn);
        self.engine.count_backlog(conn);
        result
    }

    fn write_out(&self, conn: &mut Conn) -> Flush {
        if conn.machine.holds_output() {
            // A long poll's answer goes out whole once it ends.
            return Flush::Done;
        }
        if conn.tls.is_some() {
            return crate::shard::tls_io::flush(self, conn);
        }
        loop {
            if conn.machine.backlog().is_empty() {
                break Flush::Done;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = conn.machine.backlog().io_slices(&mut slices);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            self.engine.metrics.send_calls.fetch_add(1, Relaxed);
            match sendmsg::<SockaddrStorage>(conn.fd.as_raw_fd(), &slices[..n], &[], flags, None) {
                Ok(written) => {
                    let asked: usize = slices[..n].iter().map(|s| s.len()).sum();
                    self.wrote(conn, written);
                    if written < asked {
                        break Flush::Blocked;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break Flush::Blocked,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break Flush::Failed,
            }
        }
    }

    /// Tells `conn`'s machine that the socket took `n` bytes, and shuts the write side
    /// once a close frame is out.
    fn wrote(&self, conn: &mut Conn, n: usize) {
        self.engine.metrics.bytes_out.fetch_add(n as u64, Relaxed);
        if conn.machine.on_written(n) == Written::ShutWrite {
            let _ = shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        }
    }

    /// Flushes now; a failed socket is scheduled for closing.
    pub fn flush_or_close(&self, key: u32, conn: &mut Conn) {
        self.engine.flush_or_close(self, key, conn);
    }

    /// Flushes every connection that got frames this round, one `sendmsg` each, all
    /// submitted to the kernel at once through the shard's send ring when it has one.
    pub fn flush_dirty(&self) {
        while let Some(keys) = self.engine.take_dirty() {
            self.flush_listed(&keys);
            self.engine.recycle_dirty(keys);
        }
    }

    /// [`Shard::flush_dirty`] for the fan-out task: after every [`FAIR_CHUNK`] connections
    /// it yields to the executor once the fan-out has held the core for [`FAIR_SLICE`], so
    /// a round to 500k subscribers does not hold off accepts, heartbeats and ingest until
    /// its last write. Connections made dirty while it is yielded are flushed before it
    /// returns.
    pub async fn flush_dirty_yielding(&self) {
        while let Some(keys) = self.engine.take_dirty() {
            for chunk in keys.chunks(FAIR_CHUNK) {
                // Keys not yet flushed keep their `dirty` flag across the yield, so an
                // offer in between does not list them twice; a key whose slot was freed
                // and reused meanwhile flushes the new occupant's own backlog, harmless.
                self.flush_keys(chunk);
                if keys.len() > FAIR_CHUNK {
                    self.fair.yield_if_used().await;
                }
            }
            self.engine.recycle_dirty(keys);
        }
    }

    fn flush_keys(&self, keys: &[u32]) {
        let mut conns = self.engine.conns.borrow_mut();
        let mut ring = self.send_ring.borrow_mut();
        match ring.as_mut() {
            Some(send_ring) if keys.len() > 1 => {
                self.flush_batch(send_ring, &mut conns, keys);
                if send_ring.is_broken() {
                    *ring = None;
                }
            }
            _ => {
                drop(conns);
                self.engine.flush_each(self, keys);
            }
        }
    }

    fn flush_batch(&self, ring: &mut SendRing, conns: &mut ConnTable, keys: &[u32]) {
        let mut selected = Vec::with_capacity(keys.len());
        let mut total = 0;
        for &key in keys {
            if let Some(conn) = conns.get_mut(key) {
                conn.machine.driver.dirty = false;
                if conn.tls.is_some() {
                    // rustls writes its own ciphertext: the plain path, now.
                    if conn.machine.is_open() {
                        self.flush_or_close(key, conn);
                    }
                    continue;
                }
                if conn.machine.is_open()
                    && !conn.machine.backlog().is_empty()
                    && !conn.machine.holds_output()
                {
                    total += conn.machine.backlog().frame_count().min(MAX_IOV);
                    selected.push(key);
                }
            }
        }
        let mut store = vec![IoSlice::new(&[]); total];
        let mut entries = Vec::with_capacity(selected.len());
        let mut asked = Vec::with_capacity(selected.len());
        {
            let chosen: Vec<&Conn> = selected.iter().filter_map(|&k| conns.get(k)).collect();
            let mut rest: &mut [IoSlice<'_>] = &mut store;
            let mut lengths = Vec::with_capacity(chosen.len());
            for conn in &chosen {
                let n = conn.machine.backlog().frame_count().min(MAX_IOV);
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                conn.machine.backlog().io_slices(head);
                lengths.push(n);
                rest = tail;
            }
            let mut at = 0;
            for (conn, &n) in chosen.iter().zip(&lengths) {
                let slices = &store[at..at + n];
                at += n;
                asked.push(slices.iter().map(|s| s.len()).sum::<usize>());
                entries.push(BatchEntry {
                    fd: conn.fd.as_raw_fd(),
                    slices,
                });
            }
        }
        let mut results = Vec::new();
        ring.send_all(&entries, &mut results);
        drop(entries);
        drop(store);
        for (i, &key) in selected.iter().enumerate() {
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            match results.get(i).copied().unwrap_or(SendOutcome::NotSubmitted) {
                SendOutcome::Written(written) => {
                    self.engine.metrics.send_calls.fetch_add(1, Relaxed);
                    self.wrote(conn, written);
                    self.engine.count_backlog(conn);
                    if written == asked[i] && !conn.machine.backlog().is_empty() {
                        // More than one call's worth was queued and the socket took it
                        // all: no writable edge will come, so continue directly.
                        self.flush_or_close(key, conn);
                    }
                }
                // Full: the epoll set reports the socket writable again.
                SendOutcome::Err(libc::EAGAIN) => {
                    self.engine.metrics.send_calls.fetch_add(1, Relaxed);
                }
                // Nothing was written: the plain path may send the same bytes.
                SendOutcome::Err(libc::EINTR) | SendOutcome::NotSubmitted => {
                    self.flush_or_close(key, conn)
                }
                SendOutcome::Err(_) => {
                    self.engine.metrics.send_calls.fetch_add(1, Relaxed);
                    self.engine
                        .schedule_close(key, conn, None, CloseCause::IoError);
                }
                SendOutcome::Unknown => {
                    // Some of these bytes may be on the wire and the kernel may still read
                    // them: sending anything more would corrupt the stream, and freeing
                    // them could hand the kernel reused memory. Keep them (leaked, at most
                    // one backlog; this needs a failing io_uring) and close without a
                    // close frame.
                    let mut lost = conn.machine.take_backlog();
                    self.engine
                        .metrics
                        .backlog_bytes
                        .fetch_sub(lost.uncount(), Relaxed);
                    std::mem::forget(lost);
                    self.engine
                        .schedule_close(key, conn, None, CloseCause::IoError);
                }
            }
        }
    }
}
