//! Cluster subscribes on the shard: with the cluster on and up, a subscribe of a channel
//! this node does not follow yet is answered once the NATS thread has joined it
//! ([`crate::cluster::thread`], join.rs: live subject subscribed, the stream's position
//! adopted, a `since` in the stream's epoch read back into local history).
//!
//! The shard never waits: it queues the join and does not subscribe the connection yet,
//! so no live message of the channel reaches it meanwhile. The answer arrives on this
//! shard's join queue; the connection is then subscribed exactly as a subscribe of a
//! followed channel is ([`Shard::subscribe_at`]: attached at the follower's cursor and
//! subscribed in the same step, the inbox's shape, [`crate::shard::inbox`]), so there
//! is no gap and no duplicate between the reply and live delivery. The answer may also
//! say "from local state" (NATS down, or the join not done within 2 s): the subscribe
//! is then answered as without a cluster.
//!
//! An unsubscribe, or the connection closing, while the join runs: the answer is dropped
//! (pending entries are keyed by connection key and generation, as the inbox's are).

use crate::cluster::{JoinAnswer, JoinTag};
use crate::presence::ConnId;
use crate::proto::command::Reply;
use crate::proto::frame::{encode_frame, opcode};
use crate::proto::recovery::Since;
use crate::shard::state::Shard;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// What a subscribe does about the cluster.
pub(super) enum Joining {
    /// It waits for the join: answered later (nothing to send now).
    Waiting,
    /// Answer it now from local state, as without a cluster.
    Local,
    /// The rendered refusal to send now (already waiting for this channel: 409).
    Refused(String),
}

impl Shard {
    /// Whether a subscribe of `channel` (permitted, not an inbox channel) by connection
    /// `conn` must wait for this node to follow the channel; if so, the join is queued.
    pub(super) fn cluster_join(
        &self,
        conn: ConnId,
        channel: &str,
        id: Option<&str>,
        since: Option<Since>,
        reply: bool,
    ) -> Joining {
        let Some(cluster) = &self.routes.cluster else {
            return Joining::Local;
        };
        if cluster.follows(channel) {
            return Joining::Local;
        }
        let stats = cluster.join_stats();
        if cluster.stats().is_down() {
            stats.fallbacks.fetch_add(1, Relaxed);
            return Joining::Local;
        }
        let name: Arc<str> = Arc::from(channel);
        let k = (conn.key, name.clone());
        {
            let mut pending = self.engine.cluster_pending.borrow_mut();
            if pending.get(&k) == Some(&conn.generation) {
                return Joining::Refused(
                    Reply::Refused {
                        kind: "subscribe",
                        id,
                        channel: Some(channel),
                        code: 409,
                        error: &format!("already subscribing to {channel}"),
                    }
                    .to_json(),
                );
            }
            pending.insert(k.clone(), conn.generation);
        }
        let rules = self.settings.namespaces.rules_for(channel);
        let bound = self.settings.max_recovery_messages.min(rules.history_size);
        let tag = JoinTag {
            key: conn.key,
            generation: conn.generation,
            id: id.map(str::to_string),
            since,
            reply,
        };
        match cluster.join(self.id, name, tag, bound) {
            Ok(()) => {
                stats.waits.fetch_add(1, Relaxed);
                Joining::Waiting
            }
            Err(_) => {
                self.engine.cluster_pending.borrow_mut().remove(&k);
                stats.fallbacks.fetch_add(1, Relaxed);
                Joining::Local
            }
        }
    }

    /// The NATS thread answered a join: subscribes the connection if it still wants it.
    pub fn on_join_answer(&self, answer: JoinAnswer) {
        self.finish_join(answer);
        self.settle();
    }

    fn finish_join(&self, answer: JoinAnswer) {
        let JoinAnswer { channel, tag, .. } = answer;
        {
            let mut pending = self.engine.cluster_pending.borrow_mut();
            let k = (tag.key, channel.clone());
            if pending.get(&k) != Some(&tag.generation) {
                return; // Unsubscribed meanwhile, or the connection is gone.
            }
            pending.remove(&k);
        }
        let mut conns = self.engine.conns.borrow_mut();
        let Some(conn) = conns.get_current(tag.key, tag.generation) else {
            return;
        };
        if !conn.machine.is_open() {
            return;
        }
        let id = self.conn_id(tag.key, tag.generation);
        // A long poll is not a presence member (see shard::conn::adopt_stream).
        let quiet = conn.machine.is_poll();
        if quiet {
            self.engine.quiet_presence.set(true);
        }
        if tag.reply {
            let mut replay = Vec::new();
            let session = conn.machine.session();
            let reply = self.subscribe_at(
                id,
                session,
                &channel,
                tag.id.as_deref(),
                tag.since,
                &mut replay,
            );
            self.engine
                .queue_control(tag.key, conn, encode_frame(opcode::TEXT, reply.as_bytes()));
            self.engine
                .queue_recovery(tag.key, conn, &channel, tag.since, replay);
        } else {
            // An upgrade URL's channel without a position: subscribed quietly, as in
            // shard::conn::adopt.
            let mut index = self.engine.index.borrow_mut();
            let at = index.members(&channel).is_empty().then(|| {
                self.engine
                    .publisher
                    .attach(&channel, None, self.engine.ring_cursor.get(), 0)
                    .offset
            });
            let added = index.subscribe(tag.key, &channel);
            if let Some(at) = at {
                index.note_position(&channel, at);
            }
            drop(index);
            if added {
                self.presence_in(id, conn.machine.session(), &channel);
            }
        }
        if quiet {
            self.engine.quiet_presence.set(false);
        }
        self.engine.count_backlog(conn);
        self.engine.lag_inexact_attaches(tag.key, conn);
        self.engine.answer_poll_if_due(tag.key, conn);
        if conn.machine.is_open() {
            self.flush_or_close(tag.key, conn);
            self.engine.release_idle_stream(tag.key, conn);
        }
    }
}
