//! The I/O driver of a TLS connection after the upgrade: the same table entry, epoll set
//! and state machine as a plain connection, with its [`TlsSession`] between them and the
//! socket.
//!
//! Input: ciphertext is read into the shard's scratch buffer, decrypted into the shard's
//! plaintext buffer and handed to the machine exactly as a plain read would be; the peer's
//! close_notify is its EOF. Output: [`Shard::flush_tls`] writes what rustls holds, then
//! encrypts more of the backlog only once rustls has sent everything, so the backlog
//! bounds and the slow-consumer policy apply unchanged. TLS connections take the plain
//! `sendmsg` path, never the batched io_uring one (rustls owns the ciphertext and writes
//! it through [`SocketWriter`]).

use crate::metrics::CloseCause;
use crate::proto::conn::Written;
use crate::shard::conn::{peer_gone, receive, MAX_READ_PER_EVENT};
use crate::shard::send::Flush;
use crate::shard::state::Shard;
use crate::shard::table::{token, Conn};
use crate::tls::session::Input;
use nix::sys::socket::{recv, sendmsg, shutdown, MsgFlags, Shutdown, SockaddrStorage};
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;

/// The plaintext buffer: one TLS record's worth.
const PLAIN_SIZE: usize = 16 * 1024;

/// Backlog slices offered to rustls per feed (it takes up to its 64 KiB limit).
const FEED_SLICES: usize = 64;

/// A non-blocking socket as rustls' `Write` (`sendmsg`, `MSG_DONTWAIT | MSG_NOSIGNAL`).
pub struct SocketWriter(pub RawFd);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        sendmsg::<SockaddrStorage>(self.0, bufs, &[], flags, None).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a TLS connection's socket (edge-triggered: until EAGAIN, or re-armed past the
/// cap), decrypts and hands the plaintext to the machine.
pub(super) fn read_input(shard: &Shard, key: u32, conn: &mut Conn) {
    let mut scratch = shard.scratch.borrow_mut();
    let mut plain = shard.tls_plain.borrow_mut();
    if plain.is_empty() {
        plain.resize(PLAIN_SIZE, 0);
    }
    let mut total = 0;
    loop {
        let n = match recv(conn.fd.as_raw_fd(), &mut scratch, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return peer_gone(shard, key, conn),
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return peer_gone(shard, key, conn),
        };
        total += n;
        let mut cipher = &scratch[..n];
        loop {
            let Some(tls) = conn.tls.as_deref_mut() else {
                return;
            };
            match tls.receive(&mut cipher, &mut plain) {
                Ok(Input::Plain(m)) => receive(shard, key, conn, &mut plain[..m]),
                Ok(Input::Drained) => break,
                Ok(Input::PeerClosed) => return peer_gone(shard, key, conn),
                Err(e) => {
                    tracing::debug!(shard = shard.id, error = %e, "TLS error on an open connection; closing it");
                    // The alert rustls queued, if the socket takes it.
                    let _ = shard.flush_tls(conn);
                    shard.schedule_close(key, conn, None, CloseCause::IoError);
                    return;
                }
            }
        }
        // rustls may have something to say by itself (a key update).
        if conn.tls.as_deref().is_some_and(|t| t.wants_write()) && conn.machine.is_open() {
            shard.flush_or_close(key, conn);
        }
        if total >= MAX_READ_PER_EVENT {
            // Re-registering re-reports pending input as a new edge.
            shard.ready_set.remove(&conn.fd);
            let _ = shard.ready_set.add(&conn.fd, token(key, conn.generation));
            return;
        }
    }
}

impl Shard {
    /// [`Shard::flush`] for a TLS connection: rustls' pending ciphertext first, then the
    /// backlog, encrypted a feed at a time; close_notify after the close frame, and the
    /// write side shut once that is out.
    pub(super) fn flush_tls(&self, conn: &mut Conn) -> Flush {
        let before = conn.machine.backlog().bytes();
        let fd = conn.fd.as_raw_fd();
        let result = 'flush: loop {
            let Some(tls) = conn.tls.as_deref_mut() else {
                break Flush::Failed;
            };
            while tls.wants_write() {
                self.metrics.send_calls.fetch_add(1, Relaxed);
                match tls.write_tls(&mut SocketWriter(fd)) {
                    Ok(n) => {
                        self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 'flush Flush::Blocked,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break 'flush Flush::Failed,
                }
            }
            if tls.take_shutdown() {
                let _ = shutdown(fd, Shutdown::Write);
            }
            if conn.machine.backlog().is_empty() {
                break Flush::Done;
            }
            let mut slices = [IoSlice::new(&[]); FEED_SLICES];
            let n = conn.machine.backlog().io_slices(&mut slices);
            let taken = tls.encrypt(&slices[..n]);
            if taken == 0 {
                // rustls refuses plaintext only when the session failed.
                break Flush::Failed;
            }
            if conn.machine.on_written(taken) == Written::ShutWrite {
                tls.close();
            }
        };
        self.note_backlog_change(before, conn.machine.backlog().bytes());
        result
    }
}
