//! The send ring's accounting against real sockets: every entry is written once, reported
//! untouched, or failed, whatever the kernel entry did.

use super::*;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

fn socket_pairs(n: usize) -> Vec<(UnixStream, UnixStream)> {
    (0..n)
        .map(|_| {
            let (tx, rx) = UnixStream::pair().expect("socketpair");
            rx.set_nonblocking(true).expect("nonblocking");
            (tx, rx)
        })
        .collect()
}

/// Everything readable from `rx` right now.
fn drain(rx: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

/// Sends `frames[i]` (one slice each) to `pairs[i]` in one batch.
fn send(
    ring: &mut SendRing,
    pairs: &[(UnixStream, UnixStream)],
    frames: &[Vec<u8>],
) -> Vec<SendOutcome> {
    let slices: Vec<Vec<IoSlice<'_>>> = frames.iter().map(|f| vec![IoSlice::new(f)]).collect();
    send_slices(ring, pairs, &slices)
}

/// Sends `slices[i]` (several iovecs each) to `pairs[i]` in one batch.
fn send_slices(
    ring: &mut SendRing,
    pairs: &[(UnixStream, UnixStream)],
    slices: &[Vec<IoSlice<'_>>],
) -> Vec<SendOutcome> {
    let entries: Vec<BatchEntry<'_>> = pairs
        .iter()
        .zip(slices)
        .map(|((tx, _), s)| BatchEntry {
            fd: tx.as_raw_fd(),
            slices: s,
        })
        .collect();
    let mut results = Vec::new();
    ring.send_all(&entries, &mut results);
    results
}

fn frames(tag: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| vec![tag; 10 + i]).collect()
}

#[test]
fn one_submission_writes_every_socket_in_order() {
    let mut ring = SendRing::new().expect("io_uring available");
    let pairs = socket_pairs(3);
    let frames: Vec<Vec<Vec<u8>>> = (0..3u8)
        .map(|i| (0..=i).map(|j| vec![b'a' + i, b'0' + j]).collect())
        .collect();
    let slices: Vec<Vec<IoSlice<'_>>> = frames
        .iter()
        .map(|fs| fs.iter().map(|f| IoSlice::new(f)).collect())
        .collect();
    let results = send_slices(&mut ring, &pairs, &slices);
    for (i, (_, mut rx)) in pairs.into_iter().enumerate() {
        let want: Vec<u8> = frames[i].concat();
        assert_eq!(results[i], SendOutcome::Written(want.len()));
        assert_eq!(drain(&mut rx), want);
    }
}

#[test]
fn a_full_socket_answers_eagain_keeps_its_bytes_and_completes_in_order() {
    let mut ring = SendRing::new().expect("io_uring available");
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    tx.set_nonblocking(true).expect("nonblocking");
    rx.set_nonblocking(true).expect("nonblocking");
    // Fill the socket buffer with a known pattern.
    let mut expected = Vec::new();
    let chunk = [b'f'; 4096];
    loop {
        match tx.write(&chunk) {
            Ok(n) => expected.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    // A backlog of two frames, larger together than what one read frees.
    let backlog: Vec<Vec<u8>> = vec![vec![b'x'; 3000], vec![b'y'; 70_000]];
    let flat: Vec<u8> = backlog.concat();
    expected.extend_from_slice(&flat);
    let pair = [(tx, rx)];

    let first = send(&mut ring, &pair, std::slice::from_ref(&flat));
    assert_eq!(first, vec![SendOutcome::Err(libc::EAGAIN)]);

    let (_, rx) = &pair[0];
    let mut rx = rx.try_clone().expect("clone");
    let mut received = Vec::new();
    let mut sent = 0;
    for _ in 0..10_000 {
        if sent == flat.len() {
            break;
        }
        received.extend(drain(&mut rx));
        match send(&mut ring, &pair, &[flat[sent..].to_vec()])[0] {
            SendOutcome::Written(n) => sent += n,
            SendOutcome::Err(e) if e == libc::EAGAIN => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent, flat.len(), "the flush never completed");
    received.extend(drain(&mut rx));
    assert_eq!(received.len(), expected.len());
    assert!(received == expected, "bytes reordered or duplicated");
}

#[test]
fn a_submit_failing_before_the_kernel_saw_anything_leaves_nothing_queued() {
    let mut ring = SendRing::new().expect("io_uring available");
    let mut pairs = socket_pairs(3);
    ring.inject(Fault::BeforeSubmit {
        errno: libc::EINVAL,
        times: 1,
    });
    let stale = frames(b'A', 3);
    let results = send(&mut ring, &pairs, &stale);
    assert_eq!(results, vec![SendOutcome::NotSubmitted; 3]);
    assert_eq!(ring.pending_sqes(), 0, "unconsumed entries left in the SQ");
    drop(stale);
    for (_, rx) in &mut pairs {
        assert!(drain(rx).is_empty());
    }
    // The next batch (new storage) must send its own bytes once and nothing else: an
    // entry left from the failed batch would be consumed here, pointing at headers
    // that now describe this batch.
    let fresh = frames(b'B', 3);
    let results = send(&mut ring, &pairs, &fresh);
    for (i, (_, rx)) in pairs.iter_mut().enumerate() {
        assert_eq!(results[i], SendOutcome::Written(fresh[i].len()));
        assert_eq!(drain(rx), fresh[i]);
    }
}

#[test]
fn an_interrupted_or_busy_submit_is_retried_without_duplicates() {
    let mut ring = SendRing::new().expect("io_uring available");
    let mut pairs = socket_pairs(4);
    for fault in [
        Fault::AfterConsuming {
            consume: 2,
            errno: libc::EINTR,
        },
        Fault::BeforeSubmit {
            errno: libc::EBUSY,
            times: 3,
        },
    ] {
        ring.inject(fault);
        let batch = frames(b'r', 4);
        let results = send(&mut ring, &pairs, &batch);
        for (i, (_, rx)) in pairs.iter_mut().enumerate() {
            assert_eq!(
                results[i],
                SendOutcome::Written(batch[i].len()),
                "{fault:?}"
            );
            assert_eq!(drain(rx), batch[i], "{fault:?}");
        }
        assert_eq!(ring.pending_sqes(), 0);
    }
}

#[test]
fn a_submit_failing_after_partial_consumption_accounts_for_each_entry() {
    let mut ring = SendRing::new().expect("io_uring available");
    let mut pairs = socket_pairs(4);
    ring.inject(Fault::AfterConsuming {
        consume: 2,
        errno: libc::EINVAL,
    });
    let batch = frames(b'p', 4);
    let results = send(&mut ring, &pairs, &batch);
    assert_eq!(
        results,
        vec![
            SendOutcome::Written(batch[0].len()),
            SendOutcome::Written(batch[1].len()),
            SendOutcome::NotSubmitted,
            SendOutcome::NotSubmitted,
        ]
    );
    assert_eq!(ring.pending_sqes(), 0, "unconsumed entries left in the SQ");
    // The caller's plain path sends what was not submitted, as flush_batch does.
    for (i, outcome) in results.iter().enumerate() {
        if *outcome == SendOutcome::NotSubmitted {
            (&pairs[i].0).write_all(&batch[i]).expect("plain send");
        }
    }
    // Then the ring keeps working, and each socket got every byte exactly once.
    let next = frames(b'q', 4);
    let results = send(&mut ring, &pairs, &next);
    for (i, (_, rx)) in pairs.iter_mut().enumerate() {
        assert_eq!(results[i], SendOutcome::Written(next[i].len()));
        assert_eq!(drain(rx), [batch[i].clone(), next[i].clone()].concat());
    }
}

#[test]
fn a_batch_larger_than_depth_is_chunked() {
    let n = DEPTH as usize + 100;
    let (done, outcome) = mpsc::channel();
    // On a worker thread so that a hang (waiting for completions that were never
    // submitted) fails the test instead of stalling it.
    std::thread::spawn(move || {
        let mut ring = SendRing::new().expect("io_uring available");
        let mut pairs = socket_pairs(n);
        let batch: Vec<Vec<u8>> = (0..n).map(|i| i.to_le_bytes().to_vec()).collect();
        let results = send(&mut ring, &pairs, &batch);
        let ok = results
            .iter()
            .zip(&batch)
            .all(|(r, b)| *r == SendOutcome::Written(b.len()))
            && pairs
                .iter_mut()
                .zip(&batch)
                .all(|((_, rx), b)| drain(rx) == *b);
        let _ = done.send(ok);
    });
    let ok = outcome
        .recv_timeout(Duration::from_secs(20))
        .expect("send_all hung on a batch larger than the ring");
    assert!(
        ok,
        "an entry of the oversized batch was not written exactly once"
    );
}
