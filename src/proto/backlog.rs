//! A connection's send backlog and the slow-consumer policy.
//!
//! The backlog exists only while there is something to send: an idle connection's
//! `VecDeque` has no allocation. Frames are refcounted [`Bytes`] shared with every other
//! subscriber, so queueing a message costs a pointer and a refcount, not a copy.
//!
//! Policy, per connection:
//! 1. while the queued bytes are under `max_bytes` (and frames under `max_frames`), a
//!    message is queued;
//! 2. over it, messages are skipped and counted: the subscriber sees a gap in offsets and
//!    can recover, and nobody else slows down;
//! 3. after `drop_limit` skips in a row (the backlog never drained meanwhile), the
//!    connection is to be closed with 1013.
//!
//! Control frames (replies, pongs, pings, close) are never skipped, but a connection whose
//! control frames alone pile up past twice `max_bytes` is flooding us and is cut.

use bytes::Bytes;
use std::collections::VecDeque;
use std::io::IoSlice;

/// Bounds of one connection's backlog.
#[derive(Debug, Clone, Copy)]
pub struct BacklogLimits {
    /// Queued bytes above which messages are skipped.
    pub max_bytes: usize,
    /// Queued frames above which messages are skipped.
    pub max_frames: usize,
    /// Consecutive skipped messages after which the connection is closed.
    pub drop_limit: u32,
}

/// What happened to an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued for sending.
    Queued,
    /// Skipped because the backlog is full; count it as dropped.
    Skipped,
    /// Skipped, and the connection has now skipped too many: close it with 1013.
    Disconnect,
}

/// The frames waiting to be written to one socket.
#[derive(Debug, Default)]
pub struct SendBacklog {
    frames: VecDeque<Bytes>,
    /// Bytes of the first frame already written (a partial write).
    written_of_first: usize,
    /// Unwritten bytes over all frames.
    bytes: usize,
    skipped_in_row: u32,
    /// Bytes of this backlog a gauge was last told of ([`SendBacklog::gauge_delta`]); a
    /// u32 to stay in the padding after `skipped_in_row` (a backlog is far below 4 GiB;
    /// larger values saturate, and the gauge is then only low).
    counted: u32,
}

impl SendBacklog {
    /// True when nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames queued (the first may be partly written).
    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// Unwritten bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True while a frame is partly written: nothing may be sent before its rest.
    pub fn mid_frame(&self) -> bool {
        self.written_of_first > 0
    }

    /// Offers a message frame, applying the slow-consumer policy.
    pub fn offer(&mut self, frame: &Bytes, limits: &BacklogLimits) -> Offer {
        let offer = self.admit(limits);
        if offer == Offer::Queued {
            self.push(frame.clone());
        }
        offer
    }

    /// The slow-consumer policy's verdict on one more message, counted as if offered:
    /// on [`Offer::Queued`] the caller pushes the message's bytes (one frame, or an HTTP
    /// transport's pieces with [`SendBacklog::push_piece`]).
    pub fn admit(&mut self, limits: &BacklogLimits) -> Offer {
        if self.bytes >= limits.max_bytes || self.frames.len() >= limits.max_frames {
            self.skipped_in_row += 1;
            return if self.skipped_in_row >= limits.drop_limit {
                Offer::Disconnect
            } else {
                Offer::Skipped
            };
        }
        self.skipped_in_row = 0;
        Offer::Queued
    }

    /// What a gauge summing backlogs must add (or, negative, subtract) to count this one
    /// as it is now; from then on it counts it so. A gauge changed only through this and
    /// [`SendBacklog::uncount`] equals the sum of its live backlogs and never goes
    /// below zero, whatever changed the backlog in between.
    pub fn gauge_delta(&mut self) -> i64 {
        let now = u32::try_from(self.bytes).unwrap_or(u32::MAX);
        let delta = i64::from(now) - i64::from(self.counted);
        self.counted = now;
        delta
    }

    /// What a gauge counts of this backlog, to subtract when the backlog goes away.
    pub fn uncount(&mut self) -> u64 {
        u64::from(std::mem::take(&mut self.counted))
    }

    /// Queues one piece of an admitted message; an empty piece is nothing.
    pub fn push_piece(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.push(piece);
        }
    }

    /// Queues a control frame or reply. Returns false when control traffic alone has
    /// exceeded twice `max_bytes`, i.e. the peer floods us with requests it does not read
    /// the answers to.
    pub fn push_control(&mut self, frame: Bytes, limits: &BacklogLimits) -> bool {
        self.push(frame);
        self.bytes <= limits.max_bytes.saturating_mul(2)
    }

    /// Queues `piece` before everything queued (a long poll's head, written with its
    /// answer). Only while nothing of the backlog was written: otherwise it goes last.
    pub fn push_front(&mut self, piece: Bytes) {
        if self.mid_frame() {
            self.push_piece(piece);
        } else if !piece.is_empty() {
            self.bytes += piece.len();
            self.frames.push_front(piece);
        }
    }

    /// Queues message frames a command replays (a recovery), whatever the backlog
    /// holds: the command bounds them, and skipping one would defeat the recovery.
    pub fn push_replay(&mut self, frames: Vec<Bytes>) {
        if !frames.is_empty() {
            // Progress: a lagging connection is not stuck.
            self.skipped_in_row = 0;
        }
        for frame in frames {
            self.push(frame);
        }
    }

    /// Queues the final close frame (never refused: it is the last frame).
    pub fn push_close(&mut self, frame: Bytes) {
        self.push(frame);
    }

    fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Fills `out` with the unwritten bytes, oldest first; returns how many slices.
    pub fn io_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, frame) in self.frames.iter().take(out.len()).enumerate() {
            let skip = if i == 0 { self.written_of_first } else { 0 };
            out[i] = IoSlice::new(&frame[skip..]);
            n += 1;
        }
        n
    }

    /// Records that the first `n` unwritten bytes went out.
    pub fn advance(&mut self, mut n: usize) {
        if n > 0 {
            // The peer is reading: skips so far do not make it a stuck consumer.
            self.skipped_in_row = 0;
        }
        self.bytes -= n.min(self.bytes);
        while n > 0 {
            let Some(first) = self.frames.front() else {
                break;
            };
            let rest = first.len() - self.written_of_first;
            if n < rest {
                self.written_of_first += n;
                return;
            }
            n -= rest;
            self.written_of_first = 0;
            self.frames.pop_front();
        }
        if self.frames.is_empty() {
            // Give the allocation back: idle connections hold no queue memory.
            self.frames = VecDeque::new();
        }
    }

    /// Drops every queued frame except the rest of a partly written one (which must be
    /// completed to keep the stream parseable); used before sending a final close frame.
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.mid_frame());
        self.truncate(keep);
    }

    /// [`SendBacklog::discard_unstarted`] for a stream whose messages are several pieces:
    /// a partly written message is kept up to and including its last piece, the first
    /// for which `ends_message` holds.
    pub fn discard_unstarted_messages(&mut self, ends_message: impl Fn(&[u8]) -> bool) {
        let keep = if self.mid_frame() {
            self.frames
                .iter()
                .position(|f| ends_message(f))
                .map_or(self.frames.len(), |i| i + 1)
        } else {
            0
        };
        self.truncate(keep);
    }

    fn truncate(&mut self, keep: usize) {
        while self.frames.len() > keep {
            if let Some(f) = self.frames.pop_back() {
                self.bytes -= f.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gauge fed only by `gauge_delta` and `uncount` equals what is queued, however the
    /// backlog changed in between (regression: replies queued without a gauge update
    /// made the removal subtract more than was added, and the gauge wrapped to 1.8e19).
    #[test]
    fn a_gauge_fed_by_deltas_counts_exactly_what_is_queued() {
        let mut gauge: i64 = 0;
        let mut b = SendBacklog::default();
        b.push_control(Bytes::from(vec![1; 10]), &LIMITS);
        b.push_replay(vec![Bytes::from(vec![2; 30])]);
        gauge += b.gauge_delta();
        assert_eq!(gauge, 40);
        b.advance(15);
        b.push_close(Bytes::from(vec![3; 4]));
        gauge += b.gauge_delta();
        assert_eq!(gauge, 29);
        b.discard_unstarted();
        b.push_piece(Bytes::from(vec![4; 7]));
        gauge -= b.uncount() as i64;
        assert_eq!(
            gauge, 0,
            "removal subtracts what was counted, not what is queued"
        );
        assert_eq!(b.gauge_delta(), b.bytes() as i64);
    }
    use proptest::prelude::*;

    const LIMITS: BacklogLimits = BacklogLimits {
        max_bytes: 100,
        max_frames: 1000,
        drop_limit: 3,
    };

    fn collect(b: &SendBacklog) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = b.io_slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn skips_then_disconnects_a_slow_consumer() {
        let mut b = SendBacklog::default();
        let frame = Bytes::from(vec![0u8; 60]);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Queued);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Queued);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Skipped);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Skipped);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Disconnect);
    }

    #[test]
    fn draining_resets_the_skip_count() {
        let mut b = SendBacklog::default();
        let frame = Bytes::from(vec![0u8; 100]);
        b.offer(&frame, &LIMITS);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Skipped);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Skipped);
        b.advance(100);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Queued);
        assert_eq!(b.offer(&frame, &LIMITS), Offer::Skipped);
    }

    #[test]
    fn discard_keeps_a_partly_written_frame() {
        let mut b = SendBacklog::default();
        for i in 0..3u8 {
            b.push_control(Bytes::from(vec![i; 10]), &LIMITS);
        }
        b.advance(4);
        b.discard_unstarted();
        assert_eq!(collect(&b), vec![0u8; 6]);
        assert_eq!(b.bytes(), 6);
    }

    proptest! {
        /// Whatever the write sizes, the bytes that go out are the frames in order.
        #[test]
        fn partial_writes_preserve_the_byte_stream(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..20),
            writes in proptest::collection::vec(1usize..50, 0..100),
        ) {
            let mut b = SendBacklog::default();
            let big = BacklogLimits { max_bytes: usize::MAX, max_frames: usize::MAX, drop_limit: 1 };
            let expected: Vec<u8> = frames.concat();
            for f in &frames {
                prop_assert_eq!(b.offer(&Bytes::from(f.clone()), &big), Offer::Queued);
            }
            let mut sent = Vec::new();
            for w in writes {
                let pending = collect(&b);
                let n = w.min(pending.len());
                sent.extend_from_slice(&pending[..n]);
                b.advance(n);
            }
            let rest = collect(&b);
            prop_assert_eq!(rest.len(), b.bytes());
            b.advance(rest.len());
            sent.extend(rest);
            prop_assert_eq!(sent, expected);
            prop_assert!(b.is_empty() && b.bytes() == 0);
        }
    }
}
