//! The I/O driver of a TLS connection after the upgrade: the same table entry, epoll set,
//! read loop and state machine as a plain connection, with its [`TlsSession`] between
//! them and the socket.
//!
//! Input: the shared read loop ([`crate::shard::conn::read_socket`]) reads ciphertext into
//! the shard's scratch buffer; [`decrypt_input`] decrypts it there, in place, into the
//! shard's plaintext buffer and hands that to the machine exactly as a plain read would
//! be; the peer's close_notify is its EOF. Output: [`flush`] writes what the
//! session holds, then encrypts more of the backlog (into a per-shard buffer, written at
//! once) only once everything earlier is out, so the backlog bounds and the
//! slow-consumer policy apply unchanged; the session keeps only what the socket refused.
//! TLS connections take the plain `send` path, never the batched io_uring one (the
//! session owns the ciphertext).

use crate::metrics::CloseCause;
use crate::proto::conn::Written;
use crate::shard::conn::{peer_gone, receive};
use crate::shard::send::Flush;
use crate::shard::state::Shard;
use crate::shard::table::Conn;
use crate::tls::session::Input;
use nix::errno::Errno;
use nix::sys::socket::{send, shutdown, MsgFlags, Shutdown};
use std::cell::RefCell;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;

/// Backlog slices offered per feed (the session takes up to its 64 KiB feed).
const FEED_SLICES: usize = 64;

thread_local! {
    /// Per-shard encryption buffers (each shard is a thread): plaintext gathered from the
    /// backlog into full records, and the ciphertext made of it.
    static SEAL: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Decrypts one read of a TLS connection (in the scratch buffer) and hands its plaintext
/// to the machine; false when reading should stop (the peer's close_notify, a TLS error).
pub(super) fn decrypt_input(shard: &Shard, key: u32, conn: &mut Conn, cipher: &mut [u8]) -> bool {
    let mut plain = shard.tls_plain.borrow_mut();
    plain.clear();
    let Some(tls) = conn.tls.as_deref_mut() else {
        return false;
    };
    let result = tls.receive(cipher, &mut plain);
    if !plain.is_empty() {
        // Authenticated records before any error: the peer's input all the same.
        receive(shard, key, conn, &mut plain);
    }
    match result {
        Ok(Input::Drained) => {
            // The session may have something to say by itself (an alert).
            if conn.tls.as_deref().is_some_and(|t| t.wants_write()) && conn.machine.is_open() {
                shard.flush_or_close(key, conn);
            }
            true
        }
        Ok(Input::PeerClosed) => {
            peer_gone(shard, key, conn);
            false
        }
        Err(e) => {
            tracing::debug!(shard = shard.id, error = %e, "TLS error on an open connection; closing it");
            // The alert the session queued, if the socket takes it.
            let _ = flush(shard, conn);
            shard
                .engine
                .schedule_close(key, conn, None, CloseCause::IoError);
            false
        }
    }
}

/// One non-blocking `send` (`MSG_DONTWAIT | MSG_NOSIGNAL`).
fn send_some(fd: RawFd, bytes: &[u8]) -> Result<usize, Errno> {
    send(fd, bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
}

/// [`Shard::flush`] for a TLS connection: the session's unsent ciphertext first, then
/// the backlog, encrypted a feed at a time; close_notify after the close frame, and
/// the write side shut once that is out.
pub(super) fn flush(shard: &Shard, conn: &mut Conn) -> Flush {
    let fd = conn.fd.as_raw_fd();
    let result = SEAL.with(|seal| {
        let (stage, out) = &mut *seal.borrow_mut();
        loop {
            let Some(tls) = conn.tls.as_deref_mut() else {
                return Flush::Failed;
            };
            while tls.wants_write() {
                shard.engine.metrics.send_calls.fetch_add(1, Relaxed);
                match send_some(fd, tls.unsent()) {
                    Ok(n) => {
                        shard.engine.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                        tls.sent(n);
                    }
                    Err(Errno::EAGAIN) => return Flush::Blocked,
                    Err(Errno::EINTR) => {}
                    Err(_) => return Flush::Failed,
                }
            }
            if tls.take_shutdown() {
                let _ = shutdown(fd, Shutdown::Write);
            }
            if conn.machine.backlog().is_empty() {
                return Flush::Done;
            }
            let mut slices = [IoSlice::new(&[]); FEED_SLICES];
            let n = conn.machine.backlog().io_slices(&mut slices);
            let taken = match tls.encrypt(&slices[..n], stage, out) {
                Ok(taken @ 1..) => taken,
                // Nothing is unsent here: no plaintext taken means a failed session.
                _ => return Flush::Failed,
            };
            // Straight to the socket; the session keeps what it does not take.
            let mut at = 0;
            while at < out.len() {
                shard.engine.metrics.send_calls.fetch_add(1, Relaxed);
                match send_some(fd, &out[at..]) {
                    Ok(n) => {
                        shard.engine.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                        at += n;
                    }
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(_) => return Flush::Failed,
                }
            }
            tls.keep_unsent(&out[at..]);
            if conn.machine.on_written(taken) == Written::ShutWrite {
                if let Some(tls) = conn.tls.as_deref_mut() {
                    tls.close();
                }
            }
        }
    });
    shard.engine.count_backlog(conn);
    result
}
