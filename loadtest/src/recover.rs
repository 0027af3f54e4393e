//! What one `recover` subscriber says and checks: the subscribe command (first with no
//! position, then with `since`), the server frames it tells apart (subscribe replies, gap
//! notices, messages), and the accounting of its offsets over the whole run. Pure code, no
//! clock and no I/O.
//!
//! A subscriber's first subscribe reply gives its position `base`: it must then receive
//! every offset `base + 1, base + 2, …` of its channel exactly once and in order, across
//! every reconnect, up to the channel's last message. Offsets are fed to a [`SeqTracker`]
//! as `offset − base`, so gaps, duplicates and reordering are counted the same way as the
//! publisher's `seq` in the other scenarios. After a reconnect the subscriber asks for what
//! it missed (`since` = the last offset it received); a `"recovered":true` reply is followed
//! by the replayed offsets up to the reply's `offset`, then live ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::seq::{parse_sample, Sample, SeqSummary, SeqTracker};

/// `{"cmd":"subscribe","channel":C}`, or with `"since":{"offset":O,"epoch":"E"}`.
pub fn subscribe_command(channel: &str, since: Option<(u64, &str)>) -> Vec<u8> {
    // Value's Display escapes the strings; the field order is ours.
    let channel = serde_json::Value::from(channel);
    match since {
        None => format!(r#"{{"cmd":"subscribe","channel":{channel}}}"#),
        Some((offset, epoch)) => {
            let epoch = serde_json::Value::from(epoch);
            format!(
                r#"{{"cmd":"subscribe","channel":{channel},"since":{{"offset":{offset},"epoch":{epoch}}}}}"#
            )
        }
    }
    .into_bytes()
}

/// The fields of a reply to `subscribe` that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SubscribeReply {
    /// 200 on success.
    #[serde(default)]
    pub code: u16,
    /// The position: last offset this connection will not receive live.
    pub offset: Option<u64>,
    /// The channel's history, a decimal string.
    pub epoch: Option<String>,
    /// Present when the subscribe carried `since`.
    pub recovered: Option<bool>,
    /// Why a recovery failed.
    pub reason: Option<String>,
}

#[derive(Deserialize)]
struct Tagged {
    reply: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// A server text frame, as far as `recover` cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A reply to `subscribe`.
    Reply(SubscribeReply),
    /// A gap notice (`{"type":"gap",…}`): the server skipped offsets for this subscriber.
    Gap,
    /// A channel message with its offset (and the publisher's `seq`/`ts` when present).
    Message(Sample),
    /// Anything else (another reply, an event, foreign traffic).
    Other,
}

/// Tells a server text frame apart. Message frames start with `{"channel":` (ringcast
/// encodes them with a fixed field order); replies with `{"reply":`; notices and events
/// with `{"type":`. Only the rare replies and notices are parsed as JSON.
pub fn classify(payload: &[u8]) -> Frame {
    if payload.starts_with(b"{\"reply\":") || payload.starts_with(b"{\"type\":") {
        let Ok(tag) = serde_json::from_slice::<Tagged>(payload) else {
            return Frame::Other;
        };
        return match (tag.reply.as_deref(), tag.kind.as_deref()) {
            (Some("subscribe"), _) => serde_json::from_slice(payload)
                .map(Frame::Reply)
                .unwrap_or(Frame::Other),
            (_, Some("gap")) => Frame::Gap,
            _ => Frame::Other,
        };
    }
    let sample = parse_sample(payload);
    if sample.offset.is_some() {
        Frame::Message(sample)
    } else {
        Frame::Other
    }
}

/// What a reply or message meant, for the worker's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The first subscribe succeeded: the subscriber has its position.
    Subscribed,
    /// `"recovered":true`; `caught_up` when nothing was missed (no replay follows).
    Recovered {
        /// No replay to wait for.
        caught_up: bool,
    },
    /// `"recovered":false` (or no `recovered` at all).
    NotRecovered,
    /// The reply was an error, or lacked a position.
    Failed,
    /// The last replayed message arrived.
    CaughtUp,
}

/// Counts of one subscriber, or summed over many.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverCounts {
    /// Subscribers that got their first position.
    pub subscribed: u64,
    /// Replies saying `"recovered":true`.
    pub recovered: u64,
    /// Replies saying `"recovered":false`, by `reason`.
    pub not_recovered: BTreeMap<String, u64>,
    /// Subscribe replies that failed (by code, `"no_position"` when offset/epoch lacked).
    pub reply_errors: BTreeMap<String, u64>,
    /// Messages delivered as part of a recovery (offsets up to the recovered reply's).
    pub replayed: u64,
    /// Messages delivered live.
    pub live: u64,
    /// Gap notices received (the server skipped offsets: backpressure).
    pub gap_notices: u64,
    /// Messages at or below the subscriber's first position (it must never get them).
    pub below_position: u64,
    /// Messages before any subscribe reply (the URL subscribed to something?).
    pub before_subscribe: u64,
    /// Replies whose epoch differed from the first one.
    pub epoch_changes: u64,
}

impl RecoverCounts {
    /// Adds another subscriber's counts.
    pub fn add(&mut self, o: &RecoverCounts) {
        self.subscribed += o.subscribed;
        self.recovered += o.recovered;
        crate::stats::add_counts(&mut self.not_recovered, &o.not_recovered);
        crate::stats::add_counts(&mut self.reply_errors, &o.reply_errors);
        self.replayed += o.replayed;
        self.live += o.live;
        self.gap_notices += o.gap_notices;
        self.below_position += o.below_position;
        self.before_subscribe += o.before_subscribe;
        self.epoch_changes += o.epoch_changes;
    }

    /// Recoveries that did not succeed (false replies and failed replies).
    pub fn failed_recoveries(&self) -> u64 {
        self.not_recovered.values().sum::<u64>() + self.reply_errors.values().sum::<u64>()
    }
}

/// How many of messages `1..=published`, sent round-robin over `k` channels (message `s`
/// to channel `(s − 1) mod k`), went to channel `index`.
pub fn published_to(published: u64, k: u64, index: u64) -> u64 {
    let k = k.max(1);
    if published > index {
        (published - index - 1) / k + 1
    } else {
        0
    }
}

/// One subscriber of channel `index` of `k`, across all of its connections.
#[derive(Debug, Clone)]
pub struct RecoverTracker {
    /// Channel name.
    pub channel: String,
    index: u64,
    k: u64,
    base: Option<u64>,
    last: Option<u64>,
    epoch: Option<String>,
    replay_until: Option<u64>,
    /// Unix ns of the drop this subscriber is recovering from, until its catch-up.
    pub dropped_at_ns: Option<u64>,
    /// It got a subscribe reply since that drop.
    pub answered: bool,
    seq: SeqTracker,
    /// Its counts.
    pub counts: RecoverCounts,
}

impl RecoverTracker {
    /// A subscriber of `channel`, number `index` of the `k` channels.
    pub fn new(channel: String, index: u64, k: u64) -> RecoverTracker {
        RecoverTracker {
            channel,
            index,
            k,
            base: None,
            last: None,
            epoch: None,
            replay_until: None,
            dropped_at_ns: None,
            answered: false,
            seq: SeqTracker::new(),
            counts: RecoverCounts::default(),
        }
    }

    /// The subscribe to send on a (re)connect: with `since` once a position is known.
    pub fn command(&mut self) -> Vec<u8> {
        self.replay_until = None;
        let since = match (self.last, self.epoch.as_deref()) {
            (Some(offset), Some(epoch)) if self.base.is_some() => Some((offset, epoch)),
            _ => None,
        };
        subscribe_command(&self.channel, since)
    }

    /// A subscribe reply arrived.
    pub fn on_reply(&mut self, reply: &SubscribeReply) -> Event {
        let (Some(offset), Some(epoch), 200) = (reply.offset, reply.epoch.as_deref(), reply.code)
        else {
            let key = if reply.code == 200 {
                "no_position".to_owned()
            } else {
                reply.code.to_string()
            };
            *self.counts.reply_errors.entry(key).or_insert(0) += 1;
            return Event::Failed;
        };
        if self.base.is_none() {
            self.base = Some(offset);
            self.last = Some(offset);
            self.epoch = Some(epoch.to_owned());
            self.counts.subscribed += 1;
            return Event::Subscribed;
        }
        if self.epoch.as_deref() != Some(epoch) {
            self.counts.epoch_changes += 1;
            self.epoch = Some(epoch.to_owned());
        }
        if reply.recovered == Some(true) {
            self.counts.recovered += 1;
            if self.last.is_some_and(|last| offset > last) {
                self.replay_until = Some(offset);
                return Event::Recovered { caught_up: false };
            }
            return Event::Recovered { caught_up: true };
        }
        let reason = match (reply.recovered, reply.reason.as_deref()) {
            (None, _) => "no_recovered_field",
            (Some(_), Some(reason)) => reason,
            (Some(_), None) => "no_reason",
        };
        *self
            .counts
            .not_recovered
            .entry(reason.to_owned())
            .or_insert(0) += 1;
        Event::NotRecovered
    }

    /// A message with `offset` arrived; returns [`Event::CaughtUp`] when it ends a replay.
    pub fn on_message(&mut self, offset: u64) -> Option<Event> {
        let Some(base) = self.base else {
            self.counts.before_subscribe += 1;
            return None;
        };
        if offset <= base {
            self.counts.below_position += 1;
            return None;
        }
        self.seq.observe(offset - base);
        self.last = Some(self.last.map_or(offset, |last| last.max(offset)));
        let Some(until) = self.replay_until else {
            self.counts.live += 1;
            return None;
        };
        self.counts.replayed += 1;
        if offset >= until {
            self.replay_until = None;
            return Some(Event::CaughtUp);
        }
        None
    }

    /// Gap notice from the server.
    pub fn on_gap_notice(&mut self) {
        self.counts.gap_notices += 1;
    }

    /// Offsets that must have arrived: every message published to its channel (the run
    /// starts publishing only once every subscriber has its position).
    pub fn expected(&self, published: u64) -> u64 {
        published_to(published, self.k, self.index)
    }

    /// Delivery accounting of its offsets, given `published` messages over all channels.
    pub fn summary(&self, published: u64) -> SeqSummary {
        self.seq.summary(self.expected(published))
    }

    /// Whether anything about this subscriber is wrong.
    pub fn has_problem(&self, published: u64) -> bool {
        let s = self.summary(published);
        let c = &self.counts;
        s.lost + s.duplicates + s.out_of_order + s.gap_events + s.invalid > 0
            || c.failed_recoveries() + c.gap_notices + c.below_position + c.epoch_changes > 0
            || c.subscribed == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reply(offset: u64, epoch: &str, recovered: Option<bool>) -> SubscribeReply {
        SubscribeReply {
            code: 200,
            offset: Some(offset),
            epoch: Some(epoch.into()),
            recovered,
            reason: None,
        }
    }

    #[test]
    fn commands_carry_since_once_positioned() {
        let mut t = RecoverTracker::new("recover-7".into(), 7, 100);
        assert_eq!(
            t.command(),
            br#"{"cmd":"subscribe","channel":"recover-7"}"#.to_vec()
        );
        assert_eq!(t.on_reply(&reply(16, "42", None)), Event::Subscribed);
        t.on_message(17);
        let cmd: serde_json::Value = serde_json::from_slice(&t.command()).unwrap_or_default();
        assert_eq!(cmd["since"]["offset"], 17);
        assert_eq!(cmd["since"]["epoch"], "42");
        assert_eq!(cmd["channel"], "recover-7");
    }

    #[test]
    fn frames_are_told_apart() {
        let r = br#"{"reply":"subscribe","id":5,"code":200,"channel":"news","offset":40,"epoch":"1796390886100725105","recovered":true}"#;
        let Frame::Reply(rep) = classify(r) else {
            panic!("not a reply")
        };
        assert_eq!(
            (rep.offset, rep.epoch.as_deref(), rep.recovered),
            (Some(40), Some("1796390886100725105"), Some(true))
        );
        let no = br#"{"reply":"subscribe","code":200,"channel":"c","offset":9,"epoch":"1","recovered":false,"reason":"too_old"}"#;
        assert!(matches!(classify(no), Frame::Reply(r) if r.reason.as_deref() == Some("too_old")));
        let msg = br#"{"channel":"c","offset":41,"data":{"seq":3,"ts":9}}"#;
        assert!(
            matches!(classify(msg), Frame::Message(s) if s.offset == Some(41) && s.seq == Some(3))
        );
        let gap = br#"{"type":"gap","channel":"news","from":18,"to":40}"#;
        assert_eq!(classify(gap), Frame::Gap);
        assert_eq!(
            classify(br#"{"reply":"pong","id":3,"code":200}"#),
            Frame::Other
        );
        let err = br#"{"reply":"subscribe","code":409,"channel":"c","error":"x"}"#;
        assert!(matches!(classify(err), Frame::Reply(r) if r.code == 409 && r.offset.is_none()));
    }

    #[test]
    fn a_clean_recovery_is_exact() {
        let mut t = RecoverTracker::new("c-1".into(), 1, 4);
        t.on_reply(&reply(10, "e", None));
        (11..=13).for_each(|o| assert_eq!(t.on_message(o), None));
        // Away while 14..=16 were published; the reply promises them, then live from 17.
        assert_eq!(
            t.on_reply(&reply(16, "e", Some(true))),
            Event::Recovered { caught_up: false }
        );
        assert_eq!(t.on_message(14), None);
        assert_eq!(t.on_message(15), None);
        assert_eq!(t.on_message(16), Some(Event::CaughtUp));
        assert_eq!(t.on_message(17), None);
        // 4 channels: messages 2, 6, 10, …, 26 (7 of 28) went to channel 1.
        assert_eq!(t.expected(28), 7);
        let s = t.summary(28);
        assert_eq!((s.unique, s.lost, s.duplicates, s.gap_events), (7, 0, 0, 0));
        assert_eq!((t.counts.replayed, t.counts.live), (3, 4));
        assert!(!t.has_problem(28));
        // Nothing missed: caught up at once.
        assert_eq!(
            t.on_reply(&reply(17, "e", Some(true))),
            Event::Recovered { caught_up: true }
        );
    }

    #[test]
    fn gaps_duplicates_and_refusals_are_problems() {
        let mut t = RecoverTracker::new("c-0".into(), 0, 1);
        t.on_reply(&reply(0, "e", None));
        [1, 2, 2, 5, 4, 0].iter().for_each(|&o| {
            t.on_message(o);
        });
        let s = t.summary(6);
        assert_eq!(
            (s.duplicates, s.out_of_order, s.gap_events, s.lost),
            (1, 1, 1, 2)
        );
        assert_eq!(t.counts.below_position, 1);
        assert!(t.has_problem(6));
        let mut r = reply(9, "f", Some(false));
        r.reason = Some("epoch_changed".into());
        assert_eq!(t.on_reply(&r), Event::NotRecovered);
        assert_eq!(t.counts.not_recovered.get("epoch_changed"), Some(&1));
        assert_eq!(t.counts.epoch_changes, 1);
        let err = SubscribeReply {
            code: 409,
            ..SubscribeReply::default()
        };
        assert_eq!(t.on_reply(&err), Event::Failed);
        assert_eq!(t.counts.reply_errors.get("409"), Some(&1));
    }

    #[test]
    fn round_robin_shares_add_up() {
        for (p, k) in [(0, 3), (1, 3), (10, 3), (1000, 100), (7, 1)] {
            let total: u64 = (0..k).map(|j| published_to(p, k, j)).sum();
            assert_eq!(total, p, "published {p} over {k}");
        }
        assert_eq!(published_to(10, 3, 0), 4);
        assert_eq!(published_to(10, 3, 2), 3);
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = classify(&bytes);
            let mut prefixed = b"{\"reply\":".to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = classify(&prefixed);
        }

        #[test]
        fn commands_round_trip(channel in "[a-z0-9:_-]{1,40}", offset in any::<u64>(), epoch in "[0-9]{1,20}") {
            let mut t = RecoverTracker::new(channel.clone(), 0, 1);
            let first: serde_json::Value = serde_json::from_slice(&t.command()).unwrap_or_default();
            prop_assert_eq!(first["channel"].as_str(), Some(channel.as_str()));
            prop_assert!(first.get("since").is_none());
            t.on_reply(&reply(offset, &epoch, None));
            let again: serde_json::Value = serde_json::from_slice(&t.command()).unwrap_or_default();
            prop_assert_eq!(again["since"]["offset"].as_u64(), Some(offset));
            prop_assert_eq!(again["since"]["epoch"].as_str(), Some(epoch.as_str()));
        }

        #[test]
        fn any_arrival_order_accounts_for_every_offset(order in proptest::collection::vec(1u64..=40, 0..80)) {
            let mut t = RecoverTracker::new("c".into(), 0, 1);
            t.on_reply(&reply(100, "e", None));
            order.iter().for_each(|&o| { t.on_message(100 + o); });
            let s = t.summary(40);
            prop_assert_eq!(s.received, order.len() as u64);
            prop_assert_eq!(s.unique + s.duplicates, s.received);
            prop_assert_eq!(s.unique + s.lost, 40);
            let clean = order.iter().copied().eq(1..=40);
            prop_assert_eq!(!t.has_problem(40), clean);
        }
    }
}
