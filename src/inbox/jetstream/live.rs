//! Reads and live delivery of the JetStream inbox: a read (a subscribe) gives the local
//! publisher every unacked message it has not seen and answers the backlog; messages
//! stored by any node reach the local publisher in offset order, once, through the
//! `inlive` subscription kept while shards have subscribers (holes read back from the
//! stream).

use super::record::{next_position, AckRecord};
use super::{js_error, Node, MAX_TRIES};
use crate::cluster::interest::apply as apply_interest;
use crate::cluster::stored;
use crate::inbox::reply::{Backlog, MAX_DELIVERY};
use crate::inbox::{ErrorKind, StoreError};
use crate::proto::message::{encode_message, EncodedData};
use bytes::Bytes;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Node {
    /// The unacked messages of `channel` up to its last offset, every one of them given
    /// to the local publisher first.
    pub(super) async fn read(self: &Rc<Self>, channel: &Arc<str>) -> Result<Backlog, StoreError> {
        let subject = self.subject("inbox", channel);
        let (inbox, acks) = self.streams()?;
        let mut tries = 0;
        let (record, (last, epoch, last_seq)) = loop {
            let last = self.read_last(&inbox, channel).await?;
            let record = self.read_record(&acks, channel).await?;
            let position = next_position(last, record.map(|r| r.0));
            if position.1 != 0 {
                break (record.map(|r| r.0), position);
            }
            // A user channel never written: fix its epoch now, so this answer and every
            // later message agree (one record wins on every node).
            let fresh = AckRecord {
                acked: 0,
                last: 0,
                epoch: self.new_epoch(),
                floor: self.observed.get(),
            };
            self.write_record(channel, fresh, 0).await?;
            tries += 1;
            if tries >= MAX_TRIES {
                return Err(StoreError::new(
                    ErrorKind::Overloaded,
                    "the ack record keeps changing; retry",
                ));
            }
        };
        let acked = record.filter(|r| r.epoch == epoch).map_or(0, |r| r.acked);
        let mut messages: Vec<(u64, u64, Bytes)> = Vec::new();
        let mut cursor = 1;
        while messages.len() < MAX_DELIVERY {
            let Some(m) = stored::next(&inbox, &subject, cursor)
                .await
                .map_err(|e| js_error("reading the inbox", e))?
            else {
                break;
            };
            cursor = m.seq + 1;
            self.observe(m.seq);
            let offset = m.offset.unwrap_or(0);
            if offset > last {
                break;
            }
            if offset > acked && m.epoch == Some(epoch) {
                messages.push((offset, m.seq, m.payload));
            }
        }
        let more = match messages.last() {
            Some(&(o, _, _)) if messages.len() >= MAX_DELIVERY => last.saturating_sub(o),
            _ => 0,
        };
        // Every unacked offset up to `last` reaches the local publisher before the answer
        // (the shard's attach relies on it; see src/shard/inbox.rs).
        {
            let mut chans = self.chans.borrow_mut();
            let c = chans.entry(channel.clone()).or_default();
            if c.epoch != epoch {
                c.epoch = epoch;
                c.applied = 0;
                c.applied_seq = 0;
            }
            for (offset, seq, payload) in &messages {
                if *offset > c.applied {
                    self.publish_local(channel, *offset, epoch, payload);
                    c.applied = *offset;
                    c.applied_seq = *seq;
                }
            }
            if last > c.applied {
                c.applied = last;
                c.applied_seq = c.applied_seq.max(last_seq);
            }
        }
        self.wake();
        Ok(Backlog {
            last,
            epoch,
            frames: messages
                .into_iter()
                .map(|(offset, _, payload)| {
                    (
                        offset,
                        encode_message(channel, offset, &EncodedData::new(&payload)),
                    )
                })
                .collect(),
            more,
        })
    }

    /// Gives a message to the local publisher unless it is at or behind its position.
    pub(super) fn publish_local(&self, channel: &str, offset: u64, epoch: u64, payload: &[u8]) {
        let publisher = &self.parts.publisher;
        match publisher.position(channel) {
            Some((last, e)) if e == epoch && last >= offset => {}
            _ => {
                publisher.publish_at(channel, offset, epoch, payload);
            }
        }
    }

    pub(super) fn wake(&self) {
        self.parts.replies.wake_idle(&self.parts.publisher);
    }

    /// Gives one stored message to the local publisher in offset order, once: earlier
    /// missing offsets are read back from the stream first when the channel has local
    /// subscribers (acked ones are gone: skipped).
    pub(super) async fn deliver(
        self: &Rc<Self>,
        channel: &Arc<str>,
        offset: u64,
        epoch: u64,
        seq: u64,
        payload: Bytes,
    ) {
        let (fill_from, followed) = {
            let mut chans = self.chans.borrow_mut();
            let c = chans.entry(channel.clone()).or_default();
            if c.epoch != epoch {
                c.epoch = epoch;
                c.applied = offset.saturating_sub(1);
                c.applied_seq = 0;
            }
            if offset <= c.applied {
                return;
            }
            (
                (offset > c.applied + 1).then_some(c.applied_seq + 1),
                c.sub.is_some() || c.interest > 0,
            )
        };
        if let (Some(cursor), true) = (fill_from, followed) {
            self.fill(channel, epoch, cursor, offset).await;
        }
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        if c.epoch == epoch && offset > c.applied {
            self.publish_local(channel, offset, epoch, &payload);
            c.applied = offset;
            c.applied_seq = c.applied_seq.max(seq);
            drop(chans);
            self.wake();
        }
    }

    /// Reads the channel's messages from stream sequence `cursor` on and applies those
    /// before `before`.
    pub(super) async fn fill(&self, channel: &Arc<str>, epoch: u64, mut cursor: u64, before: u64) {
        let Ok((inbox, _)) = self.streams() else {
            return;
        };
        let subject = self.subject("inbox", channel);
        loop {
            let m = match stored::next(&inbox, &subject, cursor).await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, channel = %channel, "cluster inbox: reading back a hole");
                    return;
                }
            };
            cursor = m.seq + 1;
            let offset = m.offset.unwrap_or(0);
            if offset >= before {
                return;
            }
            let mut chans = self.chans.borrow_mut();
            let Some(c) = chans.get_mut(channel) else {
                return;
            };
            if m.epoch == Some(epoch) && c.epoch == epoch && offset > c.applied {
                self.publish_local(channel, offset, epoch, &m.payload);
                c.applied = offset;
                c.applied_seq = m.seq;
            }
        }
    }

    /// `net`: how many more (or fewer) shards have subscribers of `channel`.
    pub(super) fn on_interest(self: Rc<Self>, channel: Arc<str>, net: i64) {
        let mut chans = self.chans.borrow_mut();
        let c = chans.entry(channel.clone()).or_default();
        c.interest = apply_interest(c.interest, net);
        if c.interest == 0 {
            if net < 0 {
                c.linger_until = Some(Instant::now() + self.parts.settings.interest_linger);
            }
            return;
        }
        c.linger_until = None;
        if c.sub.is_some() {
            return;
        }
        let node = self.clone();
        let name = channel.clone();
        let task = tokio::task::spawn_local(async move {
            let mut sub = loop {
                match node.client.subscribe(node.subject("inlive", &name)).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster inbox: subscribing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            // Messages stored between the subscribe's read and this subscription: read
            // them back (twice: interest travels between NATS servers asynchronously).
            let _ = node.client.flush().await;
            node.catch_up(&name).await;
            {
                let (node, name) = (node.clone(), name.clone());
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    node.catch_up(&name).await;
                });
            }
            use futures_lite::StreamExt;
            while let Some(m) = sub.next().await {
                if let Some((offset, epoch, seq)) = stored::live_position(m.headers.as_ref()) {
                    node.deliver(&name, offset, epoch, seq, m.payload).await;
                }
            }
        });
        c.sub = Some(task.abort_handle());
    }

    /// Applies whatever the stream has after the last applied message.
    pub(super) async fn catch_up(&self, channel: &Arc<str>) {
        let from = self
            .chans
            .borrow()
            .get(channel)
            .map(|c| (c.epoch, c.applied_seq + 1));
        if let Some((epoch, cursor)) = from.filter(|f| f.0 != 0) {
            self.fill(channel, epoch, cursor, u64::MAX).await;
            self.wake();
        }
    }

    /// Ends live subscriptions whose linger passed; forgets idle channels.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        let workers = self.workers.borrow();
        self.chans.borrow_mut().retain(|name, c| {
            if c.interest == 0 && c.linger_until.is_some_and(|t| t <= now) {
                c.linger_until = None;
                if let Some(sub) = c.sub.take() {
                    sub.abort();
                }
            }
            c.sub.is_some() || c.interest > 0 || workers.contains_key(name)
        });
    }
}
