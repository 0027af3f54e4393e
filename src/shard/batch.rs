//! One kernel entry per fan-out round: every dirty connection's `sendmsg` queued as an
//! io_uring submission and submitted together.
//!
//! The requests carry `MSG_DONTWAIT`, so the kernel executes each inline during the one
//! `io_uring_enter` (a full socket answers `-EAGAIN` instead of arming a poll): the iovecs
//! and message headers only need to live until `submit` returns, and every completion is
//! ready when it does. This is the shard's own small ring, separate from glommio's, used
//! only for these writes.

use io_uring::{opcode, types, IoUring};
use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Submission queue depth: the most sends per kernel entry.
pub const DEPTH: u32 = 1024;

/// A shard's send ring and the scratch space for one batch.
pub struct SendRing {
    ring: IoUring,
    headers: Vec<libc::msghdr>,
    iovecs: Vec<libc::iovec>,
}

/// One connection's part of a batch.
pub struct BatchEntry<'a> {
    /// The socket.
    pub fd: RawFd,
    /// Its unwritten bytes, oldest first.
    pub slices: &'a [IoSlice<'a>],
}

impl SendRing {
    /// A ring of [`DEPTH`] entries (completion queue twice that).
    ///
    /// # Errors
    /// io_uring setup failures (ENOMEM under RLIMIT_MEMLOCK, EPERM when disabled).
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder().setup_cqsize(DEPTH * 2).build(DEPTH)?;
        Ok(SendRing {
            ring,
            headers: Vec::new(),
            iovecs: Vec::new(),
        })
    }

    /// Sends every entry with one kernel entry; `results[i]` is bytes written or `-errno`.
    ///
    /// At most [`DEPTH`] entries per call.
    pub fn send_all(
        &mut self,
        entries: &[BatchEntry<'_>],
        results: &mut Vec<i32>,
    ) -> io::Result<()> {
        debug_assert!(entries.len() <= DEPTH as usize);
        results.clear();
        results.resize(entries.len(), -libc::ECANCELED);
        let total_iov: usize = entries.iter().map(|e| e.slices.len()).sum();
        self.headers.clear();
        self.iovecs.clear();
        // Reserve first: the headers point into `iovecs` and the submissions into
        // `headers`, so neither may reallocate while the batch is built.
        self.headers.reserve(entries.len());
        self.iovecs.reserve(total_iov);
        for entry in entries {
            let start = self.iovecs.len();
            for s in entry.slices {
                self.iovecs.push(libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                });
            }
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            // SAFETY: `start` is within the reserved capacity (no reallocation happened).
            header.msg_iov = unsafe { self.iovecs.as_mut_ptr().add(start) };
            header.msg_iovlen = entry.slices.len() as _;
            self.headers.push(header);
        }
        let flags = (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32;
        {
            let mut sq = self.ring.submission();
            for (i, entry) in entries.iter().enumerate() {
                let sqe = opcode::SendMsg::new(
                    types::Fd(entry.fd),
                    &self.headers[i] as *const libc::msghdr,
                )
                .flags(flags)
                .build()
                .user_data(i as u64);
                // SAFETY: the header, its iovecs and the bytes they point to outlive the
                // submit below, and MSG_DONTWAIT makes the kernel finish with them inside it.
                if unsafe { sq.push(&sqe) }.is_err() {
                    break;
                }
            }
        }
        self.ring.submit_and_wait(entries.len())?;
        for cqe in self.ring.completion() {
            if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                *slot = cqe.result();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn one_submission_writes_every_socket_in_order() {
        let mut ring = SendRing::new().expect("io_uring available");
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let frames: Vec<Vec<Vec<u8>>> = (0..3u8)
            .map(|i| (0..=i).map(|j| vec![b'a' + i, b'0' + j]).collect())
            .collect();
        let slices: Vec<Vec<IoSlice<'_>>> = frames
            .iter()
            .map(|fs| fs.iter().map(|f| IoSlice::new(f)).collect())
            .collect();
        let entries: Vec<BatchEntry<'_>> = pairs
            .iter()
            .zip(&slices)
            .map(|((tx, _), s)| BatchEntry {
                fd: tx.as_raw_fd(),
                slices: s,
            })
            .collect();
        let mut results = Vec::new();
        ring.send_all(&entries, &mut results).unwrap();
        for (i, (_, mut rx)) in pairs.into_iter().enumerate() {
            let want: Vec<u8> = frames[i].concat();
            assert_eq!(results[i], want.len() as i32);
            let mut got = vec![0u8; want.len()];
            rx.read_exact(&mut got).unwrap();
            assert_eq!(got, want);
        }
    }
}
