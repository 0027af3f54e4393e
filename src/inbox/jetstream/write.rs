//! Writes of the JetStream inbox: a publish takes the channel's next offset (optimistic
//! concurrency on the subject's last sequence, retried on 10071, resent with the same
//! `Nats-Msg-Id` after an unknown outcome), an ack updates the ack record and purges
//! what it covers.

use super::record::{
    next_position, plan_ack, plan_ack_on_empty, reopen, AckPlan, AckRecord, ACKED_HEADER,
    FLOOR_HEADER,
};
use super::{js_error, offset_races, record_races, unavailable, Node, Position, MAX_TRIES};
use crate::cluster::stored;
use crate::cluster::subject::{EPOCH_HEADER, OFFSET_HEADER};
use crate::cluster::thread::RESEND_FOR;
use crate::inbox::StoreError;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream as JsStream};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Node {
    /// The channel's last stored message: (offset, epoch, seq).
    pub(super) async fn read_last(
        &self,
        inbox: &JsStream,
        channel: &str,
    ) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let last = stored::last(inbox, &self.subject("inbox", channel))
            .await
            .map_err(|e| js_error("reading the inbox's last message", e))?;
        let Some(m) = last else {
            return Ok(None);
        };
        self.observe(m.seq);
        match m.position() {
            Some((o, e)) => Ok(Some((o, e, m.seq))),
            None => Err(js_error(
                "reading the inbox",
                format!("message {} has no ringcast headers", m.seq),
            )),
        }
    }

    /// The ack record and its subject sequence.
    pub(super) async fn read_record(
        &self,
        acks: &JsStream,
        channel: &str,
    ) -> Result<Option<(AckRecord, u64)>, StoreError> {
        match acks
            .direct_get_last_for_subject(self.subject("inack", channel))
            .await
        {
            Ok(m) => {
                let h = |k: &str| m.headers.get(k).map(|v| v.as_str().to_string());
                let (a, l, e, f) = (
                    h(ACKED_HEADER),
                    h(OFFSET_HEADER),
                    h(EPOCH_HEADER),
                    h(FLOOR_HEADER),
                );
                AckRecord::parse(a.as_deref(), l.as_deref(), e.as_deref(), f.as_deref())
                    .map(|r| Some((r, m.sequence)))
                    .ok_or_else(|| js_error("reading an ack record", "malformed headers"))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(js_error("reading the ack record", e)),
        }
    }

    /// Writes an ack record expecting the record subject at `seq`: the record's new
    /// subject sequence, or `None` when another node wrote it first (10071).
    pub(super) async fn write_record(
        &self,
        channel: &str,
        record: AckRecord,
        seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut headers = HeaderMap::new();
        for (k, v) in record.to_headers() {
            headers.insert(k, v.as_str());
        }
        let subject = self.subject("inack", channel);
        stored::store_expecting(&self.js, subject, headers, Bytes::new(), seq)
            .await
            .map_err(|e| js_error("writing the ack record", e))
    }

    /// Where the next message of `channel` goes: after the subject's last message
    /// (cached from the last write, or read), or into an empty subject.
    pub(super) async fn publish_position(
        &self,
        inbox: &JsStream,
        acks: &JsStream,
        channel: &Arc<str>,
    ) -> Result<Position, StoreError> {
        if let Some((o, e, s)) = self.chans.borrow().get(channel).and_then(|c| c.stream_last) {
            return Ok(Position::After(o, e, s));
        }
        let last = self.read_last(inbox, channel).await?;
        let record = self.read_record(acks, channel).await?;
        Ok(match last {
            Some(_) => {
                let (o, e, s) = next_position(last, record.map(|r| r.0));
                Position::After(o, e, s)
            }
            None => Position::Empty(record),
        })
    }

    /// Before the first message into an empty subject: writes the record [`reopen`]
    /// decides and returns where the message goes (last offset, epoch, expected subject
    /// sequence 0); `None` when another node wrote the record first.
    pub(super) async fn reopen(
        &self,
        inbox: &JsStream,
        channel: &Arc<str>,
        record: Option<(AckRecord, u64)>,
    ) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let stream_last = match record {
            Some((r, _)) if !r.complete() => {
                let info = inbox
                    .get_info()
                    .await
                    .map_err(|e| js_error("reading the inbox stream's last sequence", e))?;
                info.state.last_sequence
            }
            _ => 0,
        };
        self.observe(stream_last);
        // An epoch is drawn only for a channel never written.
        let new_epoch = if record.is_none() {
            self.new_epoch()
        } else {
            0
        };
        let next = reopen(
            record.map(|r| r.0),
            stream_last,
            self.observed.get(),
            new_epoch,
        );
        let written = self
            .write_record(channel, next, record.map_or(0, |r| r.1))
            .await?;
        if written.is_none() {
            return Ok(None);
        }
        if let Some((r, _)) = record.filter(|(r, _)| !r.complete()) {
            self.parts.stats.offset_skips.fetch_add(1, Relaxed);
            tracing::info!(
                channel = %channel,
                expired_after = r.acked,
                next = next.last,
                "cluster inbox: unacked messages expired from an emptied user channel; its offsets continue past every offset they may have had"
            );
        }
        Ok(Some((next.last - 1, next.epoch, 0)))
    }

    pub(super) fn forget_last(&self, channel: &Arc<str>) {
        if let Some(c) = self.chans.borrow_mut().get_mut(channel) {
            c.stream_last = None;
        }
    }

    /// Stores one message with the user channel's next offset and `Nats-Msg-Id`, then
    /// delivers it locally and publishes it live. Lost races (10071) read the last
    /// message again; an unknown outcome (ack timeout, no responders, the connection
    /// lost after the send) is sent again with the same id for up to [`RESEND_FOR`], and
    /// the stream answers a copy of a stored message `duplicate` with the stored copy's
    /// sequence: stored, answered and delivered once (docs/cluster.md, *Inbox*).
    pub(super) async fn publish(
        self: &Rc<Self>,
        channel: &Arc<str>,
        payload: Bytes,
    ) -> Result<u64, StoreError> {
        let msg_id = self.msg_ids.next();
        let deadline = Instant::now() + RESEND_FOR;
        let mut sent = false;
        let mut races = 0;
        loop {
            let retry = sent && Instant::now() < deadline;
            let streams = match self.streams() {
                // A copy may be stored: wait for the connection, then send it again.
                Err(_) if retry => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) if sent => {
                    return Err(unavailable(
                        "NATS is unreachable: the connection was lost before JetStream \
                         acknowledged; the message may be stored: retry",
                    ))
                }
                other => other?,
            };
            let (inbox, acks) = streams;
            let position = match self.publish_position(&inbox, &acks, channel).await {
                Ok(Position::After(o, e, s)) => Ok(Some((o, e, s))),
                Ok(Position::Empty(record)) => self.reopen(&inbox, channel, record).await,
                Err(e) => Err(e),
            };
            let (last, epoch, seq) = match position {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Another node wrote the record first: read both again.
                    races += 1;
                    if races >= MAX_TRIES {
                        return Err(offset_races());
                    }
                    continue;
                }
                Err(e) if retry => {
                    tracing::debug!(error = %e, channel = %channel, "cluster inbox: reading the last message; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let epoch = if epoch == 0 { self.new_epoch() } else { epoch };
            let offset = last + 1;
            let subject = self.subject("inbox", channel);
            let headers = stored::headers(offset, epoch, None);
            sent = true;
            let ack = match stored::store_once(
                &self.js,
                subject,
                headers,
                payload.clone(),
                seq,
                &msg_id,
            )
            .await
            {
                Ok(Some(ack)) => ack,
                Ok(None) => {
                    // Another node took the offset, or an earlier copy of this message
                    // did: read the last one again (the copy then comes back duplicate).
                    self.forget_last(channel);
                    races += 1;
                    if races >= MAX_TRIES {
                        return Err(offset_races());
                    }
                    continue;
                }
                Err(e) if stored::transient(e.kind()) && Instant::now() < deadline => {
                    // Unknown outcome: the same message id again (the stream dedupes).
                    self.parts.stats.resent.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, channel = %channel, "cluster inbox: publish unacknowledged; sending it again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => {
                    self.forget_last(channel);
                    return Err(js_error("storing the message", e));
                }
            };
            let (offset, epoch) = if ack.duplicate {
                self.parts.stats.deduped.fetch_add(1, Relaxed);
                self.forget_last(channel);
                let read = (last, epoch, seq);
                stored::duplicate_position(&inbox, ack.sequence, read, (offset, epoch), races)
                    .await
                    .ok_or_else(|| {
                        js_error(
                            "reading back a stored message",
                            format!(
                                "stored at stream sequence {}, but its offset could not be read",
                                ack.sequence
                            ),
                        )
                    })?
            } else {
                self.observe(ack.sequence);
                self.chans
                    .borrow_mut()
                    .entry(channel.clone())
                    .or_default()
                    .stream_last = Some((offset, epoch, ack.sequence));
                (offset, epoch)
            };
            // At or below the applied offset (a copy already read back): dropped there.
            self.deliver(channel, offset, epoch, ack.sequence, payload.clone())
                .await;
            let headers = stored::headers(offset, epoch, Some(ack.sequence));
            // Live delivery to the other nodes is best effort: a node that misses it
            // reads the message back (hole fill, or the subscribe's read).
            let _ = self
                .client
                .publish_with_headers(self.subject("inlive", channel), headers, payload)
                .await;
            return Ok(offset);
        }
    }

    pub(super) async fn ack(
        self: &Rc<Self>,
        channel: &Arc<str>,
        upto: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let subject = self.subject("inbox", channel);
        for _ in 0..MAX_TRIES {
            let (inbox, acks) = self.streams()?;
            let last = self.read_last(&inbox, channel).await?;
            let record = self.read_record(&acks, channel).await?;
            let Some((_, _, stored_seq)) = last else {
                // Nothing left to remove, and nothing to write (see plan_ack_on_empty).
                return match plan_ack_on_empty(record.map(|r| r.0), upto) {
                    AckPlan::Ahead(last) => Ok(Err(last)),
                    _ => {
                        self.parts.stats.acks.fetch_add(1, Relaxed);
                        Ok(Ok(0))
                    }
                };
            };
            let (last_offset, epoch, last_seq) = next_position(last, record.map(|r| r.0));
            let acked = record.map_or(0, |r| r.0.acked);
            let (from, upto) = match plan_ack(acked, last_offset, upto) {
                AckPlan::Ahead(last) => return Ok(Err(last)),
                AckPlan::Nothing => {
                    self.parts.stats.acks.fetch_add(1, Relaxed);
                    return Ok(Ok(0));
                }
                AckPlan::Remove { from, upto } => (from, upto),
            };
            // Count what goes and find the first sequence that stays.
            let mut removed = 0;
            let mut bound = last_seq + 1;
            let mut cursor = 1;
            while let Some(m) = stored::next(&inbox, &subject, cursor)
                .await
                .map_err(|e| js_error("reading the inbox", e))?
            {
                let offset = m.offset.unwrap_or(0);
                if offset > upto {
                    bound = m.seq;
                    break;
                }
                if offset > from {
                    removed += 1;
                }
                cursor = m.seq + 1;
            }
            let record_seq = record.map_or(0, |r| r.1);
            let new = AckRecord {
                acked: upto,
                last: last_offset,
                epoch: if epoch == 0 { self.new_epoch() } else { epoch },
                // Messages past the last one read are stored above it.
                floor: record.map_or(0, |r| r.0.floor).max(stored_seq),
            };
            let Some(written) = self.write_record(channel, new, record_seq).await? else {
                continue; // Another node acked (or created the record) meanwhile.
            };
            if bound > 1 {
                if let Err(e) = inbox.purge().filter(subject.clone()).sequence(bound).await {
                    // The ack is durable; the next ack purges these too.
                    tracing::warn!(error = %e, channel = %channel, "cluster inbox: purging acked messages");
                }
            }
            if new.complete() {
                self.recheck_complete(&inbox, &acks, channel, new, written)
                    .await?;
            }
            if let Some(c) = self.chans.borrow_mut().get_mut(channel) {
                c.stream_last = None;
            }
            self.parts.stats.acks.fetch_add(1, Relaxed);
            self.parts.stats.acked.fetch_add(removed, Relaxed);
            return Ok(Ok(removed));
        }
        Err(record_races())
    }

    /// A complete record (everything acked up to the last offset read) claims that
    /// nothing was stored past its last offset; a publish from another node may have
    /// landed after the read, above the purge bound. Reads the subject again and, when
    /// it holds such a message, rewrites the record as incomplete (its last offset that
    /// message's), so an expiry of it later cannot make its offset come back.
    pub(super) async fn recheck_complete(
        &self,
        inbox: &JsStream,
        acks: &JsStream,
        channel: &Arc<str>,
        mut record: AckRecord,
        mut seq: u64,
    ) -> Result<(), StoreError> {
        for _ in 0..MAX_TRIES {
            let Some((o, e, s)) = self.read_last(inbox, channel).await? else {
                return Ok(()); // Empty: the next publish writes the record first.
            };
            if o <= record.last || e != record.epoch {
                return Ok(());
            }
            record.last = o;
            record.floor = record.floor.max(s);
            match self.write_record(channel, record, seq).await? {
                Some(_) => return Ok(()),
                // Written meanwhile by an ack or a reopen that read the subject after
                // this message: it accounts for it.
                None => match self.read_record(acks, channel).await? {
                    Some((r, _)) if r.last >= o || r.epoch != record.epoch => return Ok(()),
                    Some((r, s2)) => {
                        record = AckRecord { last: o, ..r };
                        record.floor = record.floor.max(s);
                        seq = s2;
                    }
                    None => return Ok(()),
                },
            }
        }
        Err(record_races())
    }
}
