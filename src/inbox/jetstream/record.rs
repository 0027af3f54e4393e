//! The ack record and where a user channel's offsets continue (sans-io): what the
//! JetStream inbox writes beside a user's messages, and the plans an ack and a publish
//! into an emptied subject follow. Property-tested: offsets never repeat across acks and
//! expiry.

use crate::cluster::subject::{parse_u64, EPOCH_HEADER, OFFSET_HEADER};

/// Header of an ack record: the user acked every offset up to this one.
pub const ACKED_HEADER: &str = "Ringcast-Acked";

/// Header of an ack record: a stream sequence below every message stored past the
/// record's last offset (see [`AckRecord::floor`]).
pub const FLOOR_HEADER: &str = "Ringcast-Floor";

/// An ack record as stored: acked up to `acked`; the channel's last offset and epoch
/// when it was written.
///
/// The record is what a user channel's offsets continue from once its inbox subject is
/// empty (everything acked, or expired by `inbox_retention`). Two cases differ:
/// - `acked == last`: everything up to `last` was acked and nothing was stored past it
///   (a publish into an empty subject raises `last` first, see [`reopen`]), so the next
///   offset is `last + 1`;
/// - `acked < last`: messages past `acked` were stored and are gone unacked (expired);
///   how far they reached is not known, but each took a stream sequence above `floor`,
///   so the next offset skips past `last + (stream's last sequence - floor)`. Offsets
///   never repeat, and a client resuming from one of the expired offsets is told it
///   missed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRecord {
    /// Every offset up to this one is acked.
    pub acked: u64,
    /// The channel's last offset then.
    pub last: u64,
    /// The channel's epoch.
    pub epoch: u64,
    /// A stream sequence of the inbox stream below every message of this channel with an
    /// offset past `last` (0 in records written before it existed: then a skip is as
    /// long as the stream).
    pub floor: u64,
}

impl AckRecord {
    /// The record's headers.
    pub fn to_headers(self) -> [(&'static str, String); 4] {
        [
            (ACKED_HEADER, self.acked.to_string()),
            (OFFSET_HEADER, self.last.to_string()),
            (EPOCH_HEADER, self.epoch.to_string()),
            (FLOOR_HEADER, self.floor.to_string()),
        ]
    }

    /// Parses a record from header values; `None` when one is missing or malformed, or
    /// the record is inconsistent (acked past the last offset, epoch 0). A missing floor
    /// is 0.
    pub fn parse(
        acked: Option<&str>,
        last: Option<&str>,
        epoch: Option<&str>,
        floor: Option<&str>,
    ) -> Option<Self> {
        let r = AckRecord {
            acked: parse_u64(acked)?,
            last: parse_u64(last)?,
            epoch: parse_u64(epoch)?,
            floor: match floor {
                None => 0,
                some => parse_u64(some)?,
            },
        };
        (r.acked <= r.last && r.epoch != 0).then_some(r)
    }

    /// True when nothing was stored past `last`: an empty subject then continues at
    /// `last + 1`.
    pub fn complete(self) -> bool {
        self.acked == self.last
    }
}

/// What an ack of `upto` does, given the ack record's `acked` and the channel's `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPlan {
    /// Beyond the channel's last offset: refused with it.
    Ahead(u64),
    /// Already acked: nothing removed.
    Nothing,
    /// Removes the messages in `(from, upto]`.
    Remove {
        /// The previous ack position.
        from: u64,
        /// The new one.
        upto: u64,
    },
}

/// Decides an ack (sans-io).
pub fn plan_ack(acked: u64, last: u64, upto: u64) -> AckPlan {
    if upto > last {
        AckPlan::Ahead(last)
    } else if upto <= acked {
        AckPlan::Nothing
    } else {
        AckPlan::Remove { from: acked, upto }
    }
}

/// Decides an ack when the inbox subject is empty (sans-io): nothing is left to
/// remove, so nothing is written. With a complete record an offset past its last is
/// refused as usual; with an incomplete one (messages expired unacked) the client may
/// have seen offsets past it, so the ack removes nothing instead.
pub fn plan_ack_on_empty(record: Option<AckRecord>, upto: u64) -> AckPlan {
    match record {
        Some(r) if r.complete() && upto > r.last => AckPlan::Ahead(r.last),
        None if upto > 0 => AckPlan::Ahead(0),
        _ => AckPlan::Nothing,
    }
}

/// Where the next message of a channel goes: the last message in the stream if any, else
/// the ack record's position (the subject was emptied by acks or retention), else a new
/// channel (offset 0, epoch to choose). Returns (last offset, epoch or 0, expected
/// subject sequence).
pub fn next_position(last: Option<(u64, u64, u64)>, record: Option<AckRecord>) -> (u64, u64, u64) {
    match (last, record) {
        (Some((o, e, s)), Some(r)) if r.epoch == e => (o.max(r.last), e, s),
        (Some(l), _) => l,
        (None, Some(r)) => (r.last, r.epoch, 0),
        (None, None) => (0, 0, 0),
    }
}

/// The record a publish into an empty inbox subject writes before its message, whose
/// offset is the new record's `last` (sans-io).
///
/// - No record: a channel never written; offset 1 in `new_epoch`.
/// - A complete record: offset `last + 1`.
/// - An incomplete one (messages past `acked` expired unacked): every offset they may
///   have had is skipped, at most one per stream sequence since the record's floor
///   (`stream_last` is the inbox stream's last sequence now); the skipped offsets count
///   as acked.
///
/// `observed` is a stream sequence already seen: the message to come, and every later
/// one of the channel, will be stored above it, so it is the new record's floor.
pub fn reopen(
    record: Option<AckRecord>,
    stream_last: u64,
    observed: u64,
    new_epoch: u64,
) -> AckRecord {
    match record {
        None => AckRecord {
            acked: 0,
            last: 1,
            epoch: new_epoch,
            floor: observed,
        },
        Some(r) if r.complete() => AckRecord {
            acked: r.acked,
            last: r.last + 1,
            epoch: r.epoch,
            floor: observed.max(r.floor),
        },
        Some(r) => {
            let next = r.last + stream_last.saturating_sub(r.floor) + 1;
            AckRecord {
                acked: next - 1,
                last: next,
                epoch: r.epoch,
                floor: observed.max(stream_last),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acks_are_cumulative_and_bounded_by_the_last_offset() {
        assert_eq!(plan_ack(0, 10, 4), AckPlan::Remove { from: 0, upto: 4 });
        assert_eq!(plan_ack(4, 10, 4), AckPlan::Nothing);
        assert_eq!(plan_ack(4, 10, 2), AckPlan::Nothing);
        assert_eq!(plan_ack(4, 10, 11), AckPlan::Ahead(10));
        assert_eq!(plan_ack(0, 0, 1), AckPlan::Ahead(0));
    }

    #[test]
    fn an_emptied_subject_continues_from_the_ack_record() {
        let record = AckRecord {
            acked: 7,
            last: 7,
            epoch: 99,
            floor: 30,
        };
        assert_eq!(next_position(None, Some(record)), (7, 99, 0));
        assert_eq!(next_position(Some((9, 99, 40)), Some(record)), (9, 99, 40));
        assert_eq!(next_position(Some((3, 5, 2)), None), (3, 5, 2));
        assert_eq!(next_position(None, None), (0, 0, 0));
        // Complete: the next offset follows; the record says so before the message.
        assert_eq!(
            reopen(Some(record), 0, 50, 1),
            AckRecord {
                acked: 7,
                last: 8,
                epoch: 99,
                floor: 50
            }
        );
        assert_eq!(
            reopen(None, 0, 12, 5),
            AckRecord {
                acked: 0,
                last: 1,
                epoch: 5,
                floor: 12
            }
        );
    }

    /// Regression: with `inbox_retention = 2`, offsets 1-3 expired unacked and the next
    /// messages got 1 and 2 again; after an ack of 1 and the expiry of 4-6, the next
    /// message got 4 again. Expired offsets are skipped: at most one per stream sequence
    /// stored since the record's floor.
    #[test]
    fn expired_offsets_are_skipped_never_reused() {
        // Acked 1, offsets up to 6 were stored (5 and 6 without touching the record),
        // all expired; 4 stream sequences were used after the floor.
        let record = AckRecord {
            acked: 1,
            last: 4,
            epoch: 3,
            floor: 100,
        };
        assert!(!record.complete());
        let next = reopen(Some(record), 104, 90, 7);
        assert!(next.last > 6, "{next:?}");
        assert_eq!((next.acked, next.last, next.epoch), (8, 9, 3));
        assert_eq!(next.floor, 104);
        // An ack into the emptied subject removes nothing and is not refused for
        // offsets the client saw before they expired.
        assert_eq!(plan_ack_on_empty(Some(record), 6), AckPlan::Nothing);
        let done = AckRecord { acked: 4, ..record };
        assert_eq!(plan_ack_on_empty(Some(done), 6), AckPlan::Ahead(4));
        assert_eq!(plan_ack_on_empty(None, 1), AckPlan::Ahead(0));
        assert_eq!(plan_ack_on_empty(None, 0), AckPlan::Nothing);
    }

    /// One user channel, driven the way the node drives it (one request at a time):
    /// publishes, other users' publishes (stream sequences used elsewhere), acks and
    /// retention expiring the oldest messages. Every offset given out is above every
    /// earlier one, whatever expired.
    fn check_offsets_never_repeat(ops: &[(u8, u64)]) -> Result<(), TestCaseError> {
        let mut subject: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut record: Option<AckRecord> = None;
        let mut stream_last = 0u64;
        let mut highest = 0u64;
        for &(op, n) in ops {
            match op % 4 {
                0 => {
                    let offset = match subject.back() {
                        Some(&(o, _)) => next_position(Some((o, 3, 0)), record).0 + 1,
                        None => {
                            // Any sequence seen before is a valid floor.
                            let observed = n % (stream_last + 1);
                            let r = reopen(record, stream_last, observed, 3);
                            record = Some(r);
                            r.last
                        }
                    };
                    prop_assert!(offset > highest, "offset {offset} after {highest}");
                    highest = offset;
                    stream_last += 1;
                    subject.push_back((offset, stream_last));
                }
                1 => stream_last += n % 5,
                2 => {
                    let upto = n % (highest + 2);
                    let Some(&(o, s)) = subject.back() else {
                        let removes =
                            matches!(plan_ack_on_empty(record, upto), AckPlan::Remove { .. });
                        prop_assert!(!removes, "an ack of an empty subject removed something");
                        continue;
                    };
                    let (last, epoch, _) = next_position(Some((o, 3, s)), record);
                    let acked = record.map_or(0, |r| r.acked);
                    if let AckPlan::Remove { upto, .. } = plan_ack(acked, last, upto) {
                        record = Some(AckRecord {
                            acked: upto,
                            last,
                            epoch,
                            floor: record.map_or(0, |r| r.floor).max(s),
                        });
                        subject.retain(|&(offset, _)| offset > upto);
                    }
                }
                _ => {
                    for _ in 0..n % 4 {
                        subject.pop_front();
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn records_round_trip(acked in 0u64..1000, extra in 0u64..1000, epoch in 1u64.., floor in any::<u64>()) {
            let r = AckRecord { acked, last: acked + extra, epoch, floor };
            let h = r.to_headers();
            prop_assert_eq!(
                AckRecord::parse(Some(&h[0].1), Some(&h[1].1), Some(&h[2].1), Some(&h[3].1)),
                Some(r)
            );
            // Written before the floor existed: read as floor 0.
            prop_assert_eq!(
                AckRecord::parse(Some(&h[0].1), Some(&h[1].1), Some(&h[2].1), None),
                Some(AckRecord { floor: 0, ..r })
            );
        }

        #[test]
        fn arbitrary_header_values_never_panic(a in any::<String>(), l in any::<String>(), e in any::<String>(), f in any::<String>()) {
            if let Some(r) = AckRecord::parse(Some(&a), Some(&l), Some(&e), Some(&f)) {
                prop_assert!(r.acked <= r.last && r.epoch != 0);
            }
        }

        #[test]
        fn offsets_never_repeat_across_acks_and_expiry(ops in proptest::collection::vec((any::<u8>(), any::<u64>()), 0..300)) {
            check_offsets_never_repeat(&ops)?;
        }

        #[test]
        fn a_plan_never_removes_past_the_last_offset(acked in 0u64..100, last in 0u64..100, upto in 0u64..200) {
            match plan_ack(acked, last, upto) {
                AckPlan::Ahead(l) => prop_assert!(upto > l),
                AckPlan::Nothing => prop_assert!(upto <= acked),
                AckPlan::Remove { from, upto: u } => prop_assert!(from < u && u <= last),
            }
        }
    }
}
