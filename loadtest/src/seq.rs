//! Per-subscriber delivery accounting: which published messages arrived, how often, in
//! which order. Pure code, no clock and no I/O.
//!
//! The publisher numbers messages `seq = 1, 2, 3, …` and stamps each with its send time
//! (`{"seq":N,"ts":<unix nanos>}`). [`parse_sample`] pulls `seq`, `ts` and ringcast's
//! `offset` out of a received text frame without a JSON parser (this runs once per
//! delivery, hundreds of thousands of times a second). [`SeqTracker`] then classifies each
//! arrival as in order, after a gap, late (filling an earlier gap) or duplicate, and at the
//! end [`SeqTracker::summary`] turns that into lost/duplicate/out-of-order counts given how
//! many messages were published.
//!
//! Offsets are checked separately: ringcast promises they grow strictly, by exactly one
//! unless it skipped messages for this subscriber (backpressure). A skip is reported as
//! `offset_skipped`; going backwards or repeating is an `offset_regression` (a bug).

use serde::{Deserialize, Serialize};

/// Fields found in one delivered frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The publisher's sequence number.
    pub seq: Option<u64>,
    /// The publisher's send time, unix nanoseconds.
    pub ts_nanos: Option<u64>,
    /// ringcast's per-channel offset, when the server adds one.
    pub offset: Option<u64>,
}

/// Extracts `seq`, `ts` and `offset` from a delivered text frame.
pub fn parse_sample(text: &[u8]) -> Sample {
    Sample {
        seq: field_u64(text, b"\"seq\":"),
        ts_nanos: field_u64(text, b"\"ts\":"),
        offset: field_u64(text, b"\"offset\":"),
    }
}

/// The unsigned integer right after the first `key` in `text`.
fn field_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// How one arrival relates to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next expected message.
    InOrder,
    /// Newer than expected: `missed` messages in between have not arrived (yet).
    Gap {
        /// How many sequence numbers were jumped over.
        missed: u64,
    },
    /// Older than the newest seen, filling an earlier gap (reordering).
    Late,
    /// Seen before.
    Duplicate,
    /// `seq` 0 is never published.
    Invalid,
}

/// Upper bound on remembered gaps per subscriber; older gaps are forgotten past it (their
/// messages stay counted as lost, a late arrival for one then counts as a duplicate).
const MAX_GAPS: usize = 4096;

/// Delivery state of one subscriber across its whole life, reconnects included.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    next: u64,
    missing: Vec<(u64, u64)>,
    received: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    gap_events: u64,
    invalid: u64,
    last_offset: Option<u64>,
    offset_skipped: u64,
    offset_regressions: u64,
}

impl SeqTracker {
    /// A tracker expecting `seq` 1 first.
    pub fn new() -> Self {
        SeqTracker {
            next: 1,
            ..SeqTracker::default()
        }
    }

    /// Records the arrival of `seq`.
    pub fn observe(&mut self, seq: u64) -> Arrival {
        self.received += 1;
        if seq == 0 {
            self.invalid += 1;
            return Arrival::Invalid;
        }
        if seq >= self.next {
            let missed = seq - self.next;
            if missed > 0 {
                if self.missing.len() >= MAX_GAPS {
                    self.missing.remove(0);
                }
                self.missing.push((self.next, seq));
                self.gap_events += 1;
            }
            self.next = seq + 1;
            self.unique += 1;
            return if missed == 0 {
                Arrival::InOrder
            } else {
                Arrival::Gap { missed }
            };
        }
        // Older than the newest: either it fills a remembered gap or we saw it already.
        let Some(i) = self
            .missing
            .iter()
            .position(|&(lo, hi)| lo <= seq && seq < hi)
        else {
            self.duplicates += 1;
            return Arrival::Duplicate;
        };
        let (lo, hi) = self.missing[i];
        match (seq == lo, seq + 1 == hi) {
            (true, true) => {
                self.missing.remove(i);
            }
            (true, false) => self.missing[i].0 = seq + 1,
            (false, true) => self.missing[i].1 = seq,
            (false, false) => {
                self.missing[i].1 = seq;
                self.missing.insert(i + 1, (seq + 1, hi));
            }
        }
        self.unique += 1;
        self.out_of_order += 1;
        Arrival::Late
    }

    /// Starts a new connection: offsets are checked per connection, since a reconnect
    /// legitimately jumps forward (and a restarted server starts again at 1).
    pub fn new_connection(&mut self) {
        self.last_offset = None;
    }

    /// Records ringcast's `offset` of the same delivery.
    pub fn observe_offset(&mut self, offset: u64) {
        match self.last_offset {
            Some(last) if offset <= last => self.offset_regressions += 1,
            Some(last) => self.offset_skipped += offset - last - 1,
            None => {}
        }
        self.last_offset = Some(offset.max(self.last_offset.unwrap_or(0)));
    }

    /// Final counts, given that messages `1..=published` were published.
    pub fn summary(&self, published: u64) -> SeqSummary {
        SeqSummary {
            received: self.received,
            unique: self.unique,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            lost: published.saturating_sub(self.unique),
            gap_events: self.gap_events,
            invalid: self.invalid,
            offset_skipped: self.offset_skipped,
            offset_regressions: self.offset_regressions,
        }
    }
}

/// What one subscriber (or, summed, a group of them) got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSummary {
    /// Deliveries, duplicates included.
    pub received: u64,
    /// Distinct messages delivered.
    pub unique: u64,
    /// Deliveries of a message already delivered.
    pub duplicates: u64,
    /// Deliveries older than one already delivered (filled a gap late).
    pub out_of_order: u64,
    /// Published messages never delivered.
    pub lost: u64,
    /// Times the sequence jumped forward.
    pub gap_events: u64,
    /// Deliveries with an impossible sequence number.
    pub invalid: u64,
    /// Offsets the server skipped (it dropped messages for this subscriber and said so).
    pub offset_skipped: u64,
    /// Offsets that did not grow (a server bug).
    pub offset_regressions: u64,
}

impl SeqSummary {
    /// Adds another subscriber's counts to these.
    pub fn add(&mut self, other: &SeqSummary) {
        self.received += other.received;
        self.unique += other.unique;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.lost += other.lost;
        self.gap_events += other.gap_events;
        self.invalid += other.invalid;
        self.offset_skipped += other.offset_skipped;
        self.offset_regressions += other.offset_regressions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64], published: u64) -> SeqSummary {
        let mut t = SeqTracker::new();
        seqs.iter().for_each(|&s| {
            t.observe(s);
        });
        t.summary(published)
    }

    #[test]
    fn clean_run_counts_exactly() {
        let s = run(&(1..=100).collect::<Vec<_>>(), 100);
        assert_eq!(
            (s.received, s.unique, s.lost, s.duplicates),
            (100, 100, 0, 0)
        );
        assert_eq!((s.out_of_order, s.gap_events), (0, 0));
    }

    #[test]
    fn injected_gap_is_lost() {
        let s = run(&[1, 2, 5, 6], 6);
        assert_eq!((s.lost, s.gap_events, s.unique), (2, 1, 4));
        let tail = run(&[1, 2, 3], 5);
        assert_eq!((tail.lost, tail.gap_events), (2, 0));
    }

    #[test]
    fn injected_duplicate_is_counted() {
        let s = run(&[1, 2, 2, 3, 1], 3);
        assert_eq!((s.duplicates, s.lost, s.received, s.unique), (2, 0, 5, 3));
    }

    #[test]
    fn reordering_fills_gaps_without_loss() {
        let mut t = SeqTracker::new();
        assert_eq!(t.observe(1), Arrival::InOrder);
        assert_eq!(t.observe(4), Arrival::Gap { missed: 2 });
        assert_eq!(t.observe(3), Arrival::Late);
        assert_eq!(t.observe(2), Arrival::Late);
        assert_eq!(t.observe(3), Arrival::Duplicate);
        assert_eq!(t.observe(0), Arrival::Invalid);
        let s = t.summary(4);
        assert_eq!(
            (s.lost, s.out_of_order, s.duplicates, s.invalid),
            (0, 2, 1, 1)
        );
        // A seq in the middle of a gap splits it in two.
        let s = run(&[1, 10, 5, 9, 2], 10);
        assert_eq!((s.lost, s.out_of_order), (5, 3));
    }

    #[test]
    fn offsets_are_validated() {
        let mut t = SeqTracker::new();
        [7, 8, 11, 11, 10, 12]
            .iter()
            .for_each(|&o| t.observe_offset(o));
        let s = t.summary(0);
        assert_eq!((s.offset_skipped, s.offset_regressions), (2, 2));
        t.new_connection();
        [1, 2].iter().for_each(|&o| t.observe_offset(o));
        assert_eq!(
            t.summary(0).offset_regressions,
            2,
            "a new connection may start anywhere"
        );
    }

    #[test]
    fn samples_parse_from_ringcast_and_raw_frames() {
        let ring = br#"{"channel":"bench","offset":17,"data":{"seq":5,"ts":1700000000123456789,"pad":"xx"}}"#;
        let s = parse_sample(ring);
        assert_eq!(s.offset, Some(17));
        assert_eq!(s.seq, Some(5));
        assert_eq!(s.ts_nanos, Some(1_700_000_000_123_456_789));
        let raw = parse_sample(br#"{"seq":3,"ts":9}"#);
        assert_eq!(
            (raw.seq, raw.ts_nanos, raw.offset),
            (Some(3), Some(9), None)
        );
        assert_eq!(
            parse_sample(br#"{"reply":"pong","id":3,"code":200}"#).seq,
            None
        );
        assert_eq!(parse_sample(br#"{"seq":"x"}"#).seq, None);
    }
}
