//! One kernel entry per fan-out round: every dirty connection's `sendmsg` queued as an
//! io_uring submission and submitted together.
//!
//! The requests carry `MSG_DONTWAIT`, so the kernel executes each inline during the one
//! `io_uring_enter` (a full socket answers `-EAGAIN` instead of arming a poll), and every
//! completion is normally posted when the call returns. This is the shard's own small
//! ring, separate from glommio's, used only for these writes.
//!
//! # Contract: exactly what the kernel took
//!
//! [`SendRing::send_all`] gives every entry one [`SendOutcome`]. The accounting rests on
//! one fact: without SQPOLL the kernel consumes submission entries only inside
//! `io_uring_enter` on this ring, and how many it consumed is the ring's SQ head. So:
//!
//! - a batch is cut into chunks of at most [`DEPTH`], and the SQ is empty when a chunk
//!   starts, so pushing never fails;
//! - after each `io_uring_enter` the consumed count is read from the SQ head, never
//!   inferred from the return value (an error can follow a partial submission);
//! - interrupted or busy calls (`EINTR`, `EAGAIN`, `EBUSY`) are retried for the entries
//!   still pending, and a wait asks for at most the completions still owed by consumed
//!   entries, so it can never wait for a request the kernel never saw;
//! - when submission fails for good, the entries still in the SQ are
//!   [`SendOutcome::NotSubmitted`] and the ring is rebuilt before returning: the old SQ,
//!   whose entries point into header storage reused by the next batch, is closed with
//!   them unconsumed, so no later `io_uring_enter` can ever pick them up. (Rebuilding
//!   costs a few syscalls on a path that needs a failing kernel; keeping the storage alive
//!   until a later submit would tie every batch's lifetime to the previous one.)
//! - a consumed entry whose completion could not be collected is
//!   [`SendOutcome::Unknown`]: the kernel may still read its header and bytes. The old
//!   ring and its header storage are then leaked on purpose, and the caller must keep the
//!   entry's bytes alive and never send them again (see `Shard::flush_batch`).

use io_uring::{opcode, types, IoUring};
use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Submission queue depth: the most sends per kernel entry.
pub const DEPTH: u32 = 1024;

/// `IORING_ENTER_GETEVENTS`: reap (and, with `min_complete`, wait for) completions.
const ENTER_GETEVENTS: u32 = 1;

/// Retries of an interrupted or busy `io_uring_enter` before giving up on the batch.
const ENTER_RETRIES: u32 = 16;

/// What happened to one entry of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The kernel wrote this many bytes (possibly fewer than asked).
    Written(usize),
    /// The send failed with this errno (`EAGAIN`: the socket buffer is full).
    Err(i32),
    /// The kernel never saw the request: its bytes may be sent another way.
    NotSubmitted,
    /// The kernel took the request but its result was lost: some or all of the bytes may
    /// be on the wire, and the kernel may still read them. Close the connection.
    Unknown,
}

/// A shard's send ring and the scratch space for one batch.
pub struct SendRing {
    ring: Option<IoUring>,
    headers: Vec<libc::msghdr>,
    iovecs: Vec<libc::iovec>,
    fault: FaultSlot,
}

/// One connection's part of a batch.
pub struct BatchEntry<'a> {
    /// The socket.
    pub fd: RawFd,
    /// Its unwritten bytes, oldest first.
    pub slices: &'a [IoSlice<'a>],
}

/// A failure injected into the next `io_uring_enter` calls (tests only).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The next `times` submitting calls fail with `errno` before the kernel sees anything.
    BeforeSubmit {
        /// The error reported.
        errno: i32,
        /// How many calls fail.
        times: u32,
    },
    /// The next submitting call lets the kernel consume `consume` entries, then reports
    /// `errno` as if the call had failed.
    AfterConsuming {
        /// Entries the kernel really consumes (and executes).
        consume: u32,
        /// The error reported.
        errno: i32,
    },
}

fn build_ring() -> io::Result<IoUring> {
    IoUring::builder().setup_cqsize(DEPTH * 2).build(DEPTH)
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl SendRing {
    /// A ring of [`DEPTH`] entries (completion queue twice that).
    ///
    /// # Errors
    /// io_uring setup failures (ENOMEM under RLIMIT_MEMLOCK, EPERM when disabled).
    pub fn new() -> io::Result<Self> {
        Ok(SendRing {
            ring: Some(build_ring()?),
            headers: Vec::new(),
            iovecs: Vec::new(),
            fault: FaultSlot::default(),
        })
    }

    /// Makes the next `io_uring_enter` calls fail as `fault` says.
    #[cfg(test)]
    pub fn inject(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    /// Submission entries queued but not consumed by the kernel (always 0 between calls).
    #[cfg(test)]
    pub fn pending_sqes(&mut self) -> usize {
        self.ring.as_mut().map_or(0, |r| r.submission().len())
    }

    /// True once the ring could not be rebuilt after a failure: every later entry is
    /// [`SendOutcome::NotSubmitted`], and the caller should fall back to plain sends.
    pub fn is_broken(&self) -> bool {
        self.ring.is_none()
    }

    /// Sends every entry, one kernel entry per [`DEPTH`] entries; `results[i]` says what
    /// became of `entries[i]`.
    pub fn send_all(&mut self, entries: &[BatchEntry<'_>], results: &mut Vec<SendOutcome>) {
        results.clear();
        results.resize(entries.len(), SendOutcome::NotSubmitted);
        for (chunk, out) in entries
            .chunks(DEPTH as usize)
            .zip(results.chunks_mut(DEPTH as usize))
        {
            self.send_chunk(chunk, out);
        }
    }

    fn send_chunk(&mut self, entries: &[BatchEntry<'_>], results: &mut [SendOutcome]) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        debug_assert!(entries.len() <= DEPTH as usize);
        debug_assert!(ring.submission().is_empty(), "SQ left non-empty by a batch");
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
            let mut sq = ring.submission();
            for (i, entry) in entries.iter().enumerate() {
                let sqe = match entry.slices {
                    // One frame (the paced case): a plain send spares the kernel the
                    // msghdr copy and iovec import of sendmsg.
                    [one] if u32::try_from(one.len()).is_ok() => {
                        opcode::Send::new(types::Fd(entry.fd), one.as_ptr(), one.len() as u32)
                            .flags(flags as i32)
                            .build()
                    }
                    _ => opcode::SendMsg::new(
                        types::Fd(entry.fd),
                        &self.headers[i] as *const libc::msghdr,
                    )
                    .flags(flags)
                    .build(),
                }
                .user_data(i as u64);
                // SAFETY: the header, its iovecs and the bytes they point to outlive every
                // io_uring_enter that can consume this entry: on return each entry is
                // either completed, provably unconsumed (the ring is then rebuilt, see the
                // module docs) or Unknown (its storage is leaked and its bytes kept).
                let pushed = unsafe { sq.push(&sqe) };
                // The SQ is empty at the start and a chunk is at most DEPTH entries.
                assert!(pushed.is_ok(), "send ring SQ full within one chunk");
            }
        }
        let n = entries.len();
        let mut consumed = 0usize;
        let mut completed = 0usize;
        let mut failures = 0u32;
        // Submit until the kernel took everything, or failed for good.
        while consumed < n {
            let to_submit = (n - consumed) as u32;
            let r = enter(ring, to_submit, 0, &mut self.fault);
            let before = consumed;
            consumed = n - ring.submission().len();
            completed += reap(ring, results);
            match r {
                Ok(_) if consumed > before => {}
                Ok(_) if failures < ENTER_RETRIES => failures += 1,
                Ok(_) => break,
                Err(ref e) if retryable(e) && failures < ENTER_RETRIES => failures += 1,
                Err(e) => {
                    tracing::warn!(error = %e, pending = n - consumed, "io_uring submit failed; sending the rest directly");
                    break;
                }
            }
        }
        // Collect the completions still owed, never asking for more than were consumed.
        let mut failures = 0u32;
        while completed < consumed {
            let owed = (consumed - completed) as u32;
            let r = enter(ring, 0, owed, &mut self.fault);
            completed += reap(ring, results);
            match r {
                Ok(_) => {}
                Err(ref e) if retryable(e) && failures < ENTER_RETRIES => failures += 1,
                Err(e) => {
                    tracing::error!(error = %e, owed = consumed - completed, "io_uring completions lost; closing those connections");
                    break;
                }
            }
        }
        if consumed == n && completed == consumed {
            return;
        }
        // Consumed but not completed: `results` still says NotSubmitted for those entries
        // and for the unconsumed ones; tell them apart by the kernel's SQ head, which
        // consumes in order.
        for (i, slot) in results.iter_mut().enumerate() {
            if i < consumed && *slot == SendOutcome::NotSubmitted {
                *slot = SendOutcome::Unknown;
            }
        }
        self.retire(completed < consumed);
    }

    /// Replaces the ring after a failed batch. With requests possibly still in flight
    /// (`in_flight`), the old ring and the header storage they point to are leaked rather
    /// than freed: the kernel may still read the headers and post completions there.
    fn retire(&mut self, in_flight: bool) {
        let old = self.ring.take();
        if in_flight {
            std::mem::forget(old);
            std::mem::forget(std::mem::take(&mut self.headers));
            std::mem::forget(std::mem::take(&mut self.iovecs));
        } else {
            // Closing the ring drops its unconsumed entries unseen.
            drop(old);
        }
        match build_ring() {
            Ok(ring) => self.ring = Some(ring),
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding the send ring failed; plain sends from now on");
            }
        }
    }
}

/// Where a test's injected fault waits for the next `io_uring_enter` (nothing in builds
/// without tests).
#[cfg(not(test))]
type FaultSlot = ();
#[cfg(test)]
type FaultSlot = Option<Fault>;

/// One `io_uring_enter`: submit up to `to_submit` queued entries, then wait for
/// `min_complete` completions.
fn enter(
    ring: &mut IoUring,
    to_submit: u32,
    min_complete: u32,
    fault: &mut FaultSlot,
) -> io::Result<usize> {
    let flags = if min_complete > 0 { ENTER_GETEVENTS } else { 0 };
    #[cfg(test)]
    let (to_submit, injected) = apply_fault(fault, to_submit)?;
    #[cfg(not(test))]
    let _ = fault;
    // SAFETY: no argument struct is passed; the entries it may consume were pushed by
    // `send_chunk`, whose storage outlives the call (see there).
    let r = unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(to_submit, min_complete, flags, None)
    };
    #[cfg(test)]
    if let Some(errno) = injected {
        return Err(io::Error::from_raw_os_error(errno));
    }
    r
}

/// Applies an injected fault to a call submitting `to_submit` entries: the entries the
/// kernel may really consume, and the error to report afterwards.
#[cfg(test)]
fn apply_fault(fault: &mut FaultSlot, to_submit: u32) -> io::Result<(u32, Option<i32>)> {
    if to_submit == 0 {
        return Ok((0, None));
    }
    match fault.take() {
        Some(Fault::BeforeSubmit { errno, times }) => {
            if times > 1 {
                *fault = Some(Fault::BeforeSubmit {
                    errno,
                    times: times - 1,
                });
            }
            Err(io::Error::from_raw_os_error(errno))
        }
        Some(Fault::AfterConsuming { consume, errno }) => Ok((to_submit.min(consume), Some(errno))),
        None => Ok((to_submit, None)),
    }
}

/// Moves every posted completion into `results`; returns how many there were.
fn reap(ring: &mut IoUring, results: &mut [SendOutcome]) -> usize {
    let mut count = 0;
    for cqe in ring.completion() {
        count += 1;
        if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
            let r = cqe.result();
            *slot = if r >= 0 {
                SendOutcome::Written(r as usize)
            } else {
                SendOutcome::Err(-r)
            };
        }
    }
    count
}

#[cfg(test)]
mod tests;
