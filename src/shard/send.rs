//! The send path: frames go from a connection's backlog to its socket.
//!
//! Writes are direct non-blocking `sendmsg` calls on the socket with every queued frame as
//! one iovec each, so a burst of N frames for one subscriber costs one syscall, not N.
//! The fan-out round queues a message to every subscriber first and flushes each dirty
//! connection once at the end of the round. Only when the kernel's send buffer is full
//! does the connection task get involved: it waits for writability through glommio and
//! flushes the rest.

use crate::fanout::backlog::Offer;
use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::shard::state::Shard;
use crate::shard::table::Conn;
use bytes::Bytes;
use nix::sys::socket::{sendmsg, MsgFlags, SockaddrStorage};
use std::io::IoSlice;
use std::sync::atomic::Ordering::Relaxed;

/// Most iovecs per `sendmsg` (well under IOV_MAX = 1024).
const MAX_IOV: usize = 64;

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The backlog is empty.
    Done,
    /// The socket buffer is full; wait for writability.
    Blocked,
    /// The socket failed (peer reset, ...): close the connection.
    Failed,
}

impl Shard {
    /// Writes as much of `conn`'s backlog as the socket takes right now.
    pub fn flush(&self, conn: &mut Conn) -> Flush {
        let before = conn.backlog.bytes();
        let result = loop {
            if conn.backlog.is_empty() {
                break Flush::Done;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = conn.backlog.io_slices(&mut slices);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            self.metrics.send_calls.fetch_add(1, Relaxed);
            match sendmsg::<SockaddrStorage>(conn.fd, &slices[..n], &[], flags, None) {
                Ok(written) => {
                    let asked: usize = slices[..n].iter().map(|s| s.len()).sum();
                    conn.backlog.advance(written);
                    self.metrics.bytes_out.fetch_add(written as u64, Relaxed);
                    if written < asked {
                        break Flush::Blocked;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break Flush::Blocked,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break Flush::Failed,
            }
        };
        let after = conn.backlog.bytes();
        if after != before {
            // The gauge follows the backlog; relaxed add of a wrapping difference.
            self.metrics
                .backlog_bytes
                .fetch_add(after.wrapping_sub(before) as u64, Relaxed);
        }
        result
    }

    /// Flushes now and reacts to the outcome (used for replies and control frames).
    pub fn flush_and_react(&self, conn: &mut Conn) {
        match self.flush(conn) {
            Flush::Done => {}
            Flush::Blocked => conn.wake(),
            Flush::Failed => conn.request_close(None, CloseCause::PeerGone),
        }
    }

    /// Queues a control frame or reply for `key` and writes it out.
    pub fn send_control(&self, key: u32, frame: Bytes) {
        let mut conns = self.conns.borrow_mut();
        let Some(conn) = conns.get_mut(key as usize) else {
            return;
        };
        self.queue_control(conn, frame);
        self.flush_and_react(conn);
    }

    /// Queues a control frame without flushing; a control flood closes with 1008.
    pub fn queue_control(&self, conn: &mut Conn, frame: Bytes) {
        let len = frame.len() as u64;
        if !conn.backlog.push_control(frame, &self.limits) {
            let reason = CloseReason::new(
                CloseCode::Policy,
                "requests faster than their replies are read",
            );
            conn.request_close(Some(reason), CloseCause::Policy);
        }
        self.metrics.backlog_bytes.fetch_add(len, Relaxed);
    }

    /// Offers a message frame to `key` under the slow-consumer policy; the write happens
    /// in [`Shard::flush_dirty`] at the end of the fan-out round.
    pub fn offer_message(&self, conn_key: u32, conn: &mut Conn, frame: &Bytes) {
        if conn.close.is_some() {
            return;
        }
        match conn.backlog.offer(frame, &self.limits) {
            Offer::Queued => {
                self.metrics.deliveries.fetch_add(1, Relaxed);
                self.metrics
                    .backlog_bytes
                    .fetch_add(frame.len() as u64, Relaxed);
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.borrow_mut().push(conn_key);
                }
            }
            Offer::Skipped => {
                self.metrics.dropped_slow.fetch_add(1, Relaxed);
            }
            Offer::Disconnect => {
                self.metrics.dropped_slow.fetch_add(1, Relaxed);
                let reason = CloseReason::new(
                    CloseCode::TryAgainLater,
                    "slow consumer: send backlog stayed full",
                );
                conn.request_close(Some(reason), CloseCause::SlowConsumer);
            }
        }
    }

    /// Flushes every connection that got frames this round, one `sendmsg` each.
    pub fn flush_dirty(&self) {
        let mut dirty = self.dirty.borrow_mut();
        let mut conns = self.conns.borrow_mut();
        for key in dirty.drain(..) {
            if let Some(conn) = conns.get_mut(key as usize) {
                conn.dirty = false;
                self.flush_and_react(conn);
            }
        }
    }
}
