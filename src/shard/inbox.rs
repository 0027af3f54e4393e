//! Inbox channels on the shard: subscribe, ack and client publish to `user:<id>` when
//! the durable inbox is on, answered when the store thread's answer arrives.
//!
//! # Subscribe: unacked, then live, no gap, no duplicate
//!
//! The shard never reads the store. A subscribe sends a read to the store thread and
//! does not subscribe the connection yet, so no live message of the channel reaches it
//! meanwhile. The store thread is the channel's only writer and answers after publishing
//! everything it committed: "the unacked messages, and the last offset L", where every
//! offset up to L is already in the ring. When the answer arrives (on this shard, between
//! its other tasks), the shard makes the publisher's position agree with the store
//! ([`Publisher::adopt_position`]), attaches at its follower's cursor with `since = L`
//! and subscribes the connection in the same step, exactly like a recovery
//! ([`crate::fanout::history`]): the attach's position P is the last offset this shard
//! already passed; everything after P reaches the connection live.
//!
//! - P >= L: the client gets the unacked messages, then (L, P] from history, then live.
//! - P < L: the follower has not read (P, L] yet; those come live, so the unacked
//!   messages above P are not sent from the store (they would be duplicates).
//!
//! If history cannot give (L, P] (evicted in the microseconds between, or history off),
//! the read is retried (up to three times) instead of answering with a gap.
//!
//! P must be exact: when the shard's follower is too far behind for the ring to tell
//! (a burst on other channels), the publisher only estimates P from history, which
//! after a restart knows nothing, and the unacked messages would turn into a gap. The
//! answer is then kept and the attach tried again after [`INEXACT_WAIT`] (the follower
//! moves on meanwhile), up to [`MAX_INEXACT_WAITS`] times; after that the subscribe is
//! refused with 503 and the client subscribes again. Nothing is lost either way.
//!
//! # Acks never remove what the connection did not get
//!
//! A cumulative ack of N removes every unacked message up to N. A connection that was
//! sent a gap notice on its inbox channel (it fell behind history while lagging) never
//! got the offsets in the gap, so its acks at or past the first of them are refused
//! (409) until it subscribes again (unsubscribe, subscribe), which sends the unacked
//! messages from the store.
//!
//! [`Publisher::adopt_position`]: crate::fanout::publisher::Publisher::adopt_position

use crate::auth::permission::Access;
use crate::auth::session::Session;
use crate::inbox::{is_user_channel, Inbox, InboxAnswer, InboxReply, StoreError};
use crate::inbox::{AnswerKind, Backlog, ShardTag};
use crate::proto::command::Reply;
use crate::proto::frame::{encode_frame, opcode};
use crate::proto::recovery::Since;
use crate::shard::state::Shard;
use bytes::Bytes;
use std::rc::Rc;
use std::sync::Arc;

/// Reads of one subscribe before the shard gives up lining the inbox up with history.
const MAX_ATTEMPTS: u8 = 3;

/// How long an inbox subscribe whose attach was not exact waits before trying again.
const INEXACT_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// Tries of an inexact attach before the subscribe is refused (about 2 s in all).
const MAX_INEXACT_WAITS: u32 = 400;

fn refused(kind: &'static str, id: Option<&str>, channel: &str, code: u16, error: &str) -> String {
    Reply::Refused {
        kind,
        id,
        channel: Some(channel),
        code,
        error,
    }
    .to_json()
}

fn store_refusal(kind: &'static str, id: Option<&str>, channel: &str, e: &StoreError) -> String {
    refused(kind, id, channel, 503, &format!("inbox: {e}"))
}

impl Shard {
    /// The inbox, if it owns `channel`.
    pub(super) fn inbox_for(&self, channel: &str) -> Option<&Inbox> {
        self.routes
            .inbox
            .as_ref()
            .filter(|_| is_user_channel(channel))
    }

    /// Starts an inbox subscribe (permission already checked): the reply comes with the
    /// store's answer.
    ///
    /// # Errors
    /// The rendered refusal to send now (already pending: 409; store queue full: 503).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn inbox_subscribe(
        &self,
        inbox: &Inbox,
        key: u32,
        generation: u32,
        channel: &str,
        id: Option<String>,
        since: Option<Since>,
        attempt: u8,
    ) -> Result<(), String> {
        let name: Arc<str> = Arc::from(channel);
        {
            let mut pending = self.engine.inbox_pending.borrow_mut();
            if attempt == 0 && pending.get(&(key, name.clone())) == Some(&generation) {
                return Err(refused(
                    "subscribe",
                    id.as_deref(),
                    channel,
                    409,
                    &format!("already subscribing to {channel}"),
                ));
            }
            pending.insert((key, name.clone()), generation);
        }
        let tag = ShardTag {
            key,
            generation,
            id,
            since,
            attempt,
        };
        let id = tag.id.clone();
        let reply = InboxReply::Shard {
            shard: self.id,
            tag,
        };
        inbox.read(channel, reply).map_err(|e| {
            self.engine.inbox_pending.borrow_mut().remove(&(key, name));
            store_refusal("subscribe", id.as_deref(), channel, &e.to_store_error())
        })
    }

    /// `{"cmd":"ack"}`: only on an inbox channel the connection may subscribe to (with
    /// authentication on: only its own `user:<id>`); answered once committed.
    pub(super) fn inbox_ack(
        &self,
        key: u32,
        generation: u32,
        id: Option<String>,
        channel: &str,
        offset: u64,
        session: Option<&Session>,
    ) -> String {
        let Some(inbox) = self.inbox_for(channel) else {
            let why = if self.routes.inbox.is_none() {
                "the inbox is off on this server (inbox = false): nothing to ack"
            } else {
                "only user:<id> channels have an inbox to ack"
            };
            return refused("ack", id.as_deref(), channel, 400, why);
        };
        if let Err(reason) = self.permit(session, channel, Access::Subscribe) {
            return refused("ack", id.as_deref(), channel, 403, &reason);
        }
        if let Some(missed) = self.inbox_missed(key, generation, channel) {
            if offset >= missed {
                self.all_metrics
                    .inbox
                    .acks_past_gap
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = format!(
                    "offsets from {missed} on were not delivered on this connection (gap \
                     notice): unsubscribe and subscribe to {channel} again to get them from \
                     the inbox before acking past {}",
                    missed - 1
                );
                return refused("ack", id.as_deref(), channel, 409, &why);
            }
        }
        let tag = ShardTag {
            key,
            generation,
            id: id.clone(),
            since: None,
            attempt: 0,
        };
        let reply = InboxReply::Shard {
            shard: self.id,
            tag,
        };
        match inbox.ack(channel, offset, reply) {
            Ok(()) => String::new(),
            Err(e) => store_refusal("ack", id.as_deref(), channel, &e.to_store_error()),
        }
    }

    /// The first offset of inbox `channel` connection `key` was told it missed, if any.
    fn inbox_missed(&self, key: u32, generation: u32, channel: &str) -> Option<u64> {
        let gaps = self.engine.inbox_gaps.borrow();
        let (g, from) = gaps.get(&(key, Arc::from(channel)))?;
        (*g == generation).then_some(*from)
    }

    /// Handles the store thread's answer for one of this shard's connections.
    pub fn on_inbox_answer(self: &Rc<Self>, answer: InboxAnswer) {
        let InboxAnswer { tag, channel, kind } = answer;
        let id = tag.id.as_deref();
        match kind {
            AnswerKind::Published(result) => {
                let reply = match result {
                    Ok(offset) => Reply::Published {
                        id,
                        channel: &channel,
                        offset,
                    }
                    .to_json(),
                    Err(e) => store_refusal("publish", id, &channel, &e),
                };
                self.answer_later(tag.key, tag.generation, reply, Vec::new());
            }
            AnswerKind::Acked { upto, result } => {
                let reply = match result {
                    Ok(Ok(removed)) => Reply::Acked {
                        id,
                        channel: &channel,
                        offset: upto,
                        removed,
                    }
                    .to_json(),
                    Ok(Err(last)) => refused(
                        "ack",
                        id,
                        &channel,
                        400,
                        &format!("offset {upto} is ahead of {channel}'s last offset {last}"),
                    ),
                    Err(e) => store_refusal("ack", id, &channel, &e),
                };
                self.answer_later(tag.key, tag.generation, reply, Vec::new());
            }
            AnswerKind::Unacked(result) => self.finish_subscribe(tag, channel, result, 0),
        }
        self.settle();
    }

    /// Subscribes the connection with its unacked messages (see the module docs);
    /// `waits`: how often this answer waited for an exact attach already.
    fn finish_subscribe(
        self: &Rc<Self>,
        tag: ShardTag,
        channel: Arc<str>,
        result: Result<Backlog, StoreError>,
        waits: u32,
    ) {
        let id = tag.id.as_deref();
        let k = (tag.key, channel.clone());
        if self.engine.inbox_pending.borrow().get(&k) != Some(&tag.generation) {
            return; // Unsubscribed meanwhile, or the connection is gone.
        }
        let backlog = match result {
            Ok(b) => b,
            Err(e) => {
                self.engine.inbox_pending.borrow_mut().remove(&k);
                let reply = store_refusal("subscribe", id, &channel, &e);
                return self.answer_later(tag.key, tag.generation, reply, Vec::new());
            }
        };
        let (last, epoch) = (backlog.last, backlog.epoch);
        self.engine.publisher.adopt_position(&channel, last, epoch);
        let attach = self.engine.publisher.attach(
            &channel,
            Some(Since {
                offset: last,
                epoch,
            }),
            self.engine.ring_cursor.get(),
            self.settings.max_recovery_messages,
        );
        if !attach.exact {
            if waits < MAX_INEXACT_WAITS {
                self.all_metrics
                    .inbox
                    .subscribe_waits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Still pending: an unsubscribe meanwhile drops it, a second subscribe
                // of the channel is refused as for any pending one.
                let shard = self.clone();
                glommio::spawn_local(async move {
                    glommio::timer::sleep(INEXACT_WAIT).await;
                    shard.finish_subscribe(tag, channel, Ok(backlog), waits + 1);
                    shard.settle();
                })
                .detach();
                return;
            }
            self.engine.inbox_pending.borrow_mut().remove(&k);
            let reply = refused(
                "subscribe",
                id,
                &channel,
                503,
                "inbox: this server is busy catching up on other channels: subscribe again",
            );
            return self.answer_later(tag.key, tag.generation, reply, Vec::new());
        }
        self.engine.inbox_pending.borrow_mut().remove(&k);
        let position = attach.offset;
        let tail = if position > last {
            match attach.recovery {
                Some(Ok(frames)) => frames,
                _ => return self.retry_subscribe(tag, &channel),
            }
        } else {
            Vec::new()
        };
        // Positions from before a restart stay valid: the epoch is the store's.
        let after = tag
            .since
            .filter(|s| s.epoch == epoch)
            .map_or(0, |s| s.offset);
        let mut frames: Vec<Bytes> = backlog
            .frames
            .into_iter()
            .filter(|(offset, _)| *offset > after && *offset <= position.min(last))
            .map(|(_, frame)| frame)
            .collect();
        let unacked = frames.len() as u64;
        frames.extend(tail);
        let reply = Reply::Subscribed {
            id,
            channel: &channel,
            offset: position,
            epoch,
            recovered: None,
            inbox: Some((unacked, backlog.more)),
        }
        .to_json();
        // Subscribed in the same step as the attach: nothing in between can run.
        let mut conns = self.engine.conns.borrow_mut();
        let Some(conn) = conns.get_current(tag.key, tag.generation) else {
            return;
        };
        if !conn.machine.is_open() {
            return;
        }
        let added = {
            let mut index = self.engine.index.borrow_mut();
            let added = index.subscribe(tag.key, &channel);
            // Where its subscribers are, for the follower's catch-up and overrun heal.
            index.note_position(&channel, position);
            added
        };
        if added && !conn.machine.is_poll() {
            let id = self.conn_id(tag.key, tag.generation);
            self.presence_in(id, conn.machine.session(), &channel);
        }
        // Counted here, when sent (the store's answer may hold some that come live instead).
        self.all_metrics
            .inbox
            .delivered
            .fetch_add(unacked, std::sync::atomic::Ordering::Relaxed);
        self.engine
            .queue_control(tag.key, conn, encode_frame(opcode::TEXT, reply.as_bytes()));
        conn.machine.queue_replay(frames);
        // The store's frames start over: what an earlier gap missed is among them.
        self.engine.forget_inbox_gap(tag.key, Some(&channel));
        self.engine.count_backlog(conn);
        self.engine.answer_poll_if_due(tag.key, conn);
        self.flush_or_close(tag.key, conn);
    }

    fn retry_subscribe(&self, tag: ShardTag, channel: &str) {
        self.engine
            .inbox_pending
            .borrow_mut()
            .remove(&(tag.key, Arc::from(channel)));
        let id = tag.id.clone();
        let attempt = tag.attempt + 1;
        let retried = match &self.routes.inbox {
            Some(inbox) if attempt < MAX_ATTEMPTS => self
                .inbox_subscribe(
                    inbox,
                    tag.key,
                    tag.generation,
                    channel,
                    id.clone(),
                    tag.since,
                    attempt,
                )
                .is_ok(),
            _ => false,
        };
        if !retried {
            let reply = refused(
                "subscribe",
                id.as_deref(),
                channel,
                503,
                "inbox: could not line the inbox up with live delivery (history too short?): subscribe again",
            );
            self.answer_later(tag.key, tag.generation, reply, Vec::new());
        }
    }

    /// Sends a reply (and frames) to connection `key` if it is still the one of
    /// `generation` and open: the answer to a request answered later (inbox, cluster
    /// publish, cluster presence query).
    pub(super) fn answer_later(
        &self,
        key: u32,
        generation: u32,
        reply: String,
        frames: Vec<Bytes>,
    ) {
        let mut conns = self.engine.conns.borrow_mut();
        let Some(conn) = conns.get_current(key, generation) else {
            return;
        };
        if !conn.machine.is_open() {
            return;
        }
        self.engine
            .queue_control(key, conn, encode_frame(opcode::TEXT, reply.as_bytes()));
        if !frames.is_empty() {
            conn.machine.queue_replay(frames);
            self.engine.count_backlog(conn);
        }
        self.engine.answer_poll_if_due(key, conn);
        self.flush_or_close(key, conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::publisher::Publisher;
    use crate::fanout::ring::Ring;
    use crate::fanout::wake::IdleFlags;
    use crate::inbox::InboxConfig;
    use crate::inbox::InboxStats;
    use crate::proto::frame::FrameHeader;
    use crate::proto::message::{encode_message, EncodedData};
    use crate::shard::conn::{adopt, Carried};
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// The JSON of every frame the peer has received so far.
    fn received(peer: &mut UnixStream) -> Vec<serde_json::Value> {
        peer.set_nonblocking(true).expect("nonblocking");
        let mut wire = Vec::new();
        let _ = peer.read_to_end(&mut wire);
        let mut out = Vec::new();
        while let Some(h) = FrameHeader::parse(&wire) {
            let end = h.header_len + h.len as usize;
            out.push(serde_json::from_slice(&wire[h.header_len..end]).expect("JSON frame"));
            wire.drain(..end);
        }
        out
    }

    /// Regression: after a restart, an inbox subscribe answered while its shard's
    /// follower was more than a ring scan behind (a burst on another channel) attached at
    /// history's estimate (0), so the store's 50 unacked messages were filtered out, the
    /// client got a gap notice for them, and acking the next live one removed them
    /// unread. Now the subscribe waits until the attach is exact, then gets all 50.
    #[test]
    fn an_inexact_attach_waits_instead_of_skipping_unacked_messages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings =
            crate::config::resolve(Default::default(), Default::default()).expect("settings");
        let publisher = Arc::new(Publisher::new(
            Arc::new(Ring::new(1 << 14)),
            Arc::new(IdleFlags::new(1)),
        ));
        let config = InboxConfig {
            path: dir.path().join("inbox.redb"),
            retention: Duration::from_secs(3600),
            max_batch: 64,
            queue: 64,
        };
        let stats = Arc::new(InboxStats::default());
        let (inbox, _queues) =
            crate::inbox::redb::start(config, publisher.clone(), 1, stats.clone()).expect("inbox");
        let shard = Rc::new(Shard::for_tests_with(
            settings,
            publisher.clone(),
            Some(inbox),
        ));
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let (ours, mut peer) = UnixStream::pair().expect("socketpair");
            let key = shard.engine.conns.borrow().next_key();
            adopt(
                &shard,
                OwnedFd::from(ours),
                &[],
                None,
                None,
                Vec::new(),
                Carried::default(),
            );
            let generation = shard
                .engine
                .conns
                .borrow()
                .get(key)
                .expect("conn")
                .generation;
            let channel: Arc<str> = Arc::from("user:erin");
            shard
                .engine
                .inbox_pending
                .borrow_mut()
                .insert((key, channel.clone()), generation);
            // What the store answers after a restart: 50 unacked, nothing in history.
            let epoch = 77;
            let backlog = Backlog {
                last: 50,
                epoch,
                frames: (1..=50)
                    .map(|o| (o, encode_message(&channel, o, &EncodedData::new(b"1"))))
                    .collect(),
                more: 0,
            };
            // A burst the follower has not read: more than attach scans.
            for _ in 0..5000 {
                publisher.publish_quiet("burst", b"1");
            }
            let tag = ShardTag {
                key,
                generation,
                id: None,
                since: None,
                attempt: 0,
            };
            let count = || {
                shard
                    .all_metrics
                    .inbox
                    .subscribe_waits
                    .load(std::sync::atomic::Ordering::Relaxed)
            };
            let waits = count();
            shard.finish_subscribe(tag, channel.clone(), Ok(backlog), 0);
            assert!(received(&mut peer).is_empty(), "answered at an estimate");
            assert!(count() > waits, "the wait is counted");
            // The follower passes the burst; the waiting subscribe is placed exactly.
            shard.engine.ring_cursor.set(publisher.ring().head());
            glommio::timer::sleep(INEXACT_WAIT * 4).await;
            let frames = received(&mut peer);
            let reply = frames.first().expect("the subscribe reply");
            assert_eq!(reply["reply"], "subscribe", "{reply}");
            assert_eq!(reply["inbox"]["unacked"], 50, "{reply}");
            let offsets: Vec<u64> = frames[1..]
                .iter()
                .map(|f| f["offset"].as_u64().expect("a message"))
                .collect();
            assert_eq!(offsets, (1..=50).collect::<Vec<_>>());
            assert!(shard.engine.index.borrow().is_subscribed(key, &channel));
        });
    }
}
