//! The send path: frames go from a connection's backlog to its socket.
//!
//! Writes are non-blocking `sendmsg`s with every queued frame as one iovec, so a burst of N
//! frames for one subscriber costs one write, not N. The fan-out round queues a message to
//! every subscriber first, then flushes each dirty connection once, all of them submitted
//! together through the shard's io_uring ([`crate::shard::batch`]); a single connection
//! (a reply, a pong) is written with a direct `sendmsg`. When the kernel's send buffer is full the rest stays queued; the
//! shard's epoll set reports the socket writable again (edge-triggered) and the flush
//! resumes from there.

use crate::fanout::backlog::Offer;
use crate::metrics::CloseCause;
use crate::proto::conn::Written;
use crate::shard::batch::{BatchEntry, SendRing, DEPTH};
use crate::shard::follower::ROUND;
use crate::shard::state::Shard;
use crate::shard::table::{Conn, ConnTable};
use bytes::Bytes;
use nix::sys::socket::{sendmsg, shutdown, MsgFlags, Shutdown, SockaddrStorage};
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

/// Most iovecs per `sendmsg` (IOV_MAX is 1024). One fan-out round queues at most
/// [`ROUND`] frames per connection, so a round's burst goes out in one call. Measured on the
/// 2000-message burst (docs/benchmarks.md): 64 iovecs per call gave 3.9M deliveries per
/// server-CPU-second, 256 gave 7M: the kernel's per-call and per-segment costs dominate.
const MAX_IOV: usize = ROUND;

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The backlog is empty.
    Done,
    /// The socket buffer is full; the epoll set reports when it drains.
    Blocked,
    /// The socket failed (peer reset, ...): close the connection.
    Failed,
}

impl Shard {
    /// Writes as much of `conn`'s backlog as the socket takes right now.
    pub fn flush(&self, conn: &mut Conn) -> Flush {
        let before = conn.machine.backlog().bytes();
        let result = loop {
            if conn.machine.backlog().is_empty() {
                break Flush::Done;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = conn.machine.backlog().io_slices(&mut slices);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            self.metrics.send_calls.fetch_add(1, Relaxed);
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
        };
        self.note_backlog_change(before, conn.machine.backlog().bytes());
        result
    }

    /// Tells `conn`'s machine that the socket took `n` bytes, and shuts the write side
    /// once a close frame is out.
    fn wrote(&self, conn: &mut Conn, n: usize) {
        self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
        if conn.machine.on_written(n) == Written::ShutWrite {
            let _ = shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        }
    }

    /// Keeps the backlog gauge in step with a connection's backlog going from `before`
    /// to `after` bytes.
    pub fn note_backlog_change(&self, before: usize, after: usize) {
        if after >= before {
            self.metrics
                .backlog_bytes
                .fetch_add((after - before) as u64, Relaxed);
        } else {
            self.metrics
                .backlog_bytes
                .fetch_sub((before - after) as u64, Relaxed);
        }
    }

    /// Flushes now; a failed socket is scheduled for closing.
    pub fn flush_or_close(&self, key: u32, conn: &mut Conn) {
        if self.flush(conn) == Flush::Failed {
            self.schedule_close(key, conn, None, CloseCause::IoError);
        }
    }

    /// Queues a control frame or reply (not flushed); a control flood closes with 1008.
    pub fn queue_control(&self, key: u32, conn: &mut Conn, frame: Bytes) {
        let before = conn.machine.backlog().bytes();
        let flood = conn.machine.queue_control(frame, &self.conn_config);
        self.note_backlog_change(before, conn.machine.backlog().bytes());
        if let Err(close) = flood {
            self.enqueue_close(key, conn.generation, close);
        }
    }

    /// Marks `conn` to be flushed with the rest of this round.
    pub(super) fn mark_dirty(&self, key: u32, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.borrow_mut().push(key);
        }
    }

    /// Offers a message frame to `key` under the slow-consumer policy; the write happens
    /// in [`Shard::flush_dirty`] at the end of the fan-out round.
    pub fn offer_message(&self, key: u32, conn: &mut Conn, frame: &Bytes) {
        if !conn.machine.is_open() {
            return;
        }
        let (offer, close) = conn.machine.offer(frame, &self.conn_config);
        match offer {
            Offer::Queued => {
                self.metrics.deliveries.fetch_add(1, Relaxed);
                self.metrics
                    .backlog_bytes
                    .fetch_add(frame.len() as u64, Relaxed);
                self.mark_dirty(key, conn);
            }
            Offer::Skipped | Offer::Disconnect => {
                self.metrics.dropped_slow.fetch_add(1, Relaxed);
            }
        }
        if let Some(close) = close {
            self.enqueue_close(key, conn.generation, close);
        }
    }

    /// Flushes every connection that got frames this round, one `sendmsg` each, all
    /// submitted to the kernel at once through the shard's send ring when it has one.
    pub fn flush_dirty(&self) {
        let keys = std::mem::take(&mut *self.dirty.borrow_mut());
        let mut conns = self.conns.borrow_mut();
        let mut ring = self.send_ring.borrow_mut();
        match ring.as_mut() {
            Some(ring) if keys.len() > 1 => {
                for chunk in keys.chunks(DEPTH as usize) {
                    self.flush_batch(ring, &mut conns, chunk);
                }
            }
            _ => {
                for &key in &keys {
                    if let Some(conn) = conns.get_mut(key) {
                        conn.dirty = false;
                        if conn.machine.is_open() {
                            self.flush_or_close(key, conn);
                        }
                    }
                }
            }
        }
        drop(ring);
        drop(conns);
        // Hand the (emptied) list back to keep its capacity for the next round.
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            let mut keys = keys;
            keys.clear();
            *dirty = keys;
        }
    }

    fn flush_batch(&self, ring: &mut SendRing, conns: &mut ConnTable, keys: &[u32]) {
        let mut selected = Vec::with_capacity(keys.len());
        let mut total = 0;
        for &key in keys {
            if let Some(conn) = conns.get_mut(key) {
                conn.dirty = false;
                if conn.machine.is_open() && !conn.machine.backlog().is_empty() {
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
        let sent = ring.send_all(&entries, &mut results);
        drop(entries);
        drop(store);
        self.metrics
            .send_calls
            .fetch_add(selected.len() as u64, Relaxed);
        for (i, &key) in selected.iter().enumerate() {
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            let before = conn.machine.backlog().bytes();
            match results.get(i).copied() {
                Some(written) if written >= 0 && sent.is_ok() => {
                    self.wrote(conn, written as usize);
                    self.note_backlog_change(before, conn.machine.backlog().bytes());
                    if written as usize == asked[i] && !conn.machine.backlog().is_empty() {
                        // More than one call's worth was queued and the socket took it
                        // all: no writable edge will come, so continue directly.
                        self.flush_or_close(key, conn);
                    }
                }
                Some(e) if e == -libc::EAGAIN => {}
                Some(e) if e < 0 && e != -libc::ECANCELED => {
                    self.schedule_close(key, conn, None, CloseCause::IoError);
                }
                // Not submitted (ring full or setup error): the plain path takes it.
                _ => self.flush_or_close(key, conn),
            }
        }
    }
}
