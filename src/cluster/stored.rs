//! Cluster messages as the NATS thread, its joins and the cluster inbox read and write
//! them: a channel subject read back from a JetStream stream (see [`from_leader`]), the
//! position a live message carries, and the headers a message is stored and sent with.
//!
//! A message carries `Ringcast-Offset` and `Ringcast-Epoch`; its live copy also
//! `Ringcast-Seq`, the stream sequence it was stored at (`subject.rs`).

use super::subject::{parse_u64, EPOCH_HEADER, OFFSET_HEADER, SEQ_HEADER};
use async_nats::jetstream::context::{Context, PublishError, PublishErrorKind};
use async_nats::jetstream::message::{PublishMessage as Publish, StreamMessage};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{
    DirectGetError, DirectGetErrorKind, RawMessageError, RawMessageErrorKind, Stream,
};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

/// One message of a subject as stored in the stream.
pub(crate) struct Entry {
    /// Its stream sequence.
    pub seq: u64,
    /// `Ringcast-Offset`, when present and a number.
    pub offset: Option<u64>,
    /// `Ringcast-Epoch`, when present and a number.
    pub epoch: Option<u64>,
    pub payload: Bytes,
}

impl Entry {
    fn of(m: StreamMessage) -> Self {
        let header = |name: &str| parse_u64(m.headers.get(name).map(|v| v.as_str()));
        Entry {
            seq: m.sequence,
            offset: header(OFFSET_HEADER),
            epoch: header(EPOCH_HEADER),
            payload: m.payload,
        }
    }

    /// (offset, epoch) when the message carries both.
    pub fn position(&self) -> Option<(u64, u64)> {
        self.offset.zip(self.epoch)
    }
}

/// Direct gets are answered by any replica of the stream, and a replica may not have
/// stored the newest messages yet (nats-server does not promise read-after-write for
/// them): a join would then adopt an old last offset, and reading back a hole would find
/// nothing and skip it. On a replicated stream reads therefore go to the stream leader
/// (the message API, `$JS.API.STREAM.MSG.GET`); with one replica the direct get reads
/// the same store, without the API's JSON and base64.
fn from_leader(stream: &Stream) -> bool {
    stream.cached_info().config.num_replicas > 1
}

fn direct(got: Result<StreamMessage, DirectGetError>) -> Result<Option<Entry>, String> {
    match got {
        Ok(m) => Ok(Some(Entry::of(m))),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn leader(got: Result<StreamMessage, RawMessageError>) -> Result<Option<Entry>, String> {
    match got {
        Ok(m) => Ok(Some(Entry::of(m))),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The offset and epoch of the copy a duplicate ack names (stream sequence `seq`): the
/// message this attempt read as the subject's last (`read`: offset, epoch, seq) when the
/// sequences agree, else read back from `stream` (20 tries, 100 ms apart). When it cannot
/// be read and no other node took an offset meanwhile (`races == 0`), every copy carried
/// the `attempted` position. `None`: stored, but where is not known.
pub(crate) async fn duplicate_position(
    stream: &Stream,
    seq: u64,
    read: (u64, u64, u64),
    attempted: (u64, u64),
    races: usize,
) -> Option<(u64, u64)> {
    if seq == read.2 {
        return Some((read.0, read.1));
    }
    for _ in 0..20 {
        if let Ok(Some(position)) = at(stream, seq).await.map(|m| m?.position()) {
            return Some(position);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (races == 0).then_some(attempted)
}

/// The first message of `subject` at stream sequence `from` or later; `None` when there
/// is none.
pub(crate) async fn next(
    stream: &Stream,
    subject: &str,
    from: u64,
) -> Result<Option<Entry>, String> {
    if from_leader(stream) {
        leader(stream.get_first_raw_message_by_subject(subject, from).await)
    } else {
        direct(
            stream
                .direct_get_next_for_subject(subject, Some(from))
                .await,
        )
    }
}

/// The last message of `subject`; `None` when the subject is empty.
pub(crate) async fn last(stream: &Stream, subject: &str) -> Result<Option<Entry>, String> {
    if from_leader(stream) {
        leader(stream.get_last_raw_message_by_subject(subject).await)
    } else {
        direct(stream.direct_get_last_for_subject(subject).await)
    }
}

/// The message at stream sequence `seq`; `None` when there is none.
pub(crate) async fn at(stream: &Stream, seq: u64) -> Result<Option<Entry>, String> {
    if from_leader(stream) {
        leader(stream.get_raw_message(seq).await)
    } else {
        direct(stream.direct_get(seq).await)
    }
}

/// Stores `payload` with `headers` on `subject` if the subject's last message is at
/// stream sequence `expected` (0: the subject is empty). `Some(sequence)` when stored;
/// `None` when refused because another writer came first (10071). The ack waits at most
/// the context's timeout.
pub(crate) async fn store_expecting(
    js: &Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    expected: u64,
) -> Result<Option<u64>, PublishError> {
    let publish = Publish::build()
        .payload(payload)
        .headers(headers)
        .expected_last_subject_sequence(expected);
    send_expecting(js, subject, publish)
        .await
        .map(|ack| ack.map(|a| a.sequence))
}

/// [`store_expecting`] with a `Nats-Msg-Id`: a copy of a message the stream stored within
/// its duplicate window is not stored again but answered with the stored copy's sequence
/// and `duplicate: true`. Refused with 10071 (`None`) first when `expected` is no longer
/// the subject's last sequence: JetStream checks that before the id.
pub(crate) async fn store_once(
    js: &Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    expected: u64,
    msg_id: &str,
) -> Result<Option<PublishAck>, PublishError> {
    let publish = Publish::build()
        .payload(payload)
        .headers(headers)
        .expected_last_subject_sequence(expected)
        .message_id(msg_id);
    send_expecting(js, subject, publish).await
}

async fn send_expecting(
    js: &Context,
    subject: String,
    publish: Publish,
) -> Result<Option<PublishAck>, PublishError> {
    match js.send_publish(subject, publish).await?.await {
        Ok(ack) => Ok(Some(ack)),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
        Err(e) => Err(e),
    }
}

/// Failures after which the message may or may not be stored, or JetStream is briefly
/// unable to answer (ack timeout, no responders while a leader moves, a broken
/// connection): sent again with the same `Nats-Msg-Id`. The others are final.
pub(crate) fn transient(kind: PublishErrorKind) -> bool {
    !matches!(
        kind,
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::WrongLastMessageId
    )
}

/// `Nats-Msg-Id`s unique to this process and message: `<start in ns, hex>.<pid>.<n>`.
pub(crate) struct MsgIds {
    base: u64,
    next: Cell<u64>,
}

impl MsgIds {
    /// Ids based on the current time.
    pub fn new() -> Self {
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2));
        MsgIds {
            base,
            next: Cell::new(0),
        }
    }

    /// The next id.
    pub fn next(&self) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{:x}.{}.{n}", self.base, std::process::id())
    }
}

/// The (offset, epoch, stream sequence) of a live message; `None` when it carries no
/// offset or epoch. A missing sequence is 0 (not known).
pub(crate) fn live_position(headers: Option<&HeaderMap>) -> Option<(u64, u64, u64)> {
    let h = headers?;
    let header = |name: &str| parse_u64(h.get(name).map(|v| v.as_str()));
    let (offset, epoch) = header(OFFSET_HEADER).zip(header(EPOCH_HEADER))?;
    Some((offset, epoch, header(SEQ_HEADER).unwrap_or(0)))
}

/// The headers of a message at `offset` in `epoch`; with `seq` (the stream sequence it
/// was stored at) for its live copy.
pub(crate) fn headers(offset: u64, epoch: u64, seq: Option<u64>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(OFFSET_HEADER, offset.to_string().as_str());
    headers.insert(EPOCH_HEADER, epoch.to_string().as_str());
    if let Some(seq) = seq {
        headers.insert(SEQ_HEADER, seq.to_string().as_str());
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_copy_round_trips_its_position() {
        let h = headers(7, 99, Some(12));
        assert_eq!(live_position(Some(&h)), Some((7, 99, 12)));
        assert_eq!(live_position(Some(&headers(7, 99, None))), Some((7, 99, 0)));
    }

    #[test]
    fn message_ids_never_repeat_in_a_process() {
        let ids = MsgIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(a.ends_with(".0") && b.ends_with(".1"), "{a} {b}");
        assert!(a.contains(&format!(".{}.", std::process::id())), "{a}");
    }

    #[test]
    fn only_an_unknown_outcome_is_sent_again() {
        assert!(transient(PublishErrorKind::TimedOut));
        assert!(transient(PublishErrorKind::StreamNotFound));
        assert!(!transient(PublishErrorKind::MaxPayloadExceeded));
        assert!(!transient(PublishErrorKind::WrongLastMessageId));
    }

    #[test]
    fn a_message_without_ringcast_headers_has_no_position() {
        assert_eq!(live_position(None), None);
        let mut h = HeaderMap::new();
        h.insert(OFFSET_HEADER, "x");
        h.insert(EPOCH_HEADER, "1");
        assert_eq!(live_position(Some(&h)), None);
    }
}
