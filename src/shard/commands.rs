//! Client commands on the shard: what each one does to the index, the publisher and the
//! connection's session, and the reply it gets.
//!
//! Presence (`presence` queries, and keeping the registry in step with subscribes and
//! unsubscribes) is [`crate::shard::presence`]'s.
//!
//! Permission decisions are [`crate::auth::permission::check`]'s; this module only
//! carries them out. A refused subscribe or publish is a reply with code 403 for that
//! command alone: the connection and its other subscriptions stay.

use crate::auth::permission::{check, Access};
use crate::auth::session::{expiry_second, Session};
use crate::fanout::publisher::channels_full;
use crate::inbox::InboxReply;
use crate::inbox::ShardTag;
use crate::ingest::line::validate_payload;
use crate::ingest::route::Target;
use crate::metrics::Source;
use crate::presence::ConnId;
use crate::proto::command::{parse_command, Command, Reply, Since};
use crate::shard::join::Joining;
use crate::shard::state::Shard;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

impl Shard {
    /// Whether `session` (`None`: anonymous) may `access` `channel`; the error is the 403
    /// reason.
    pub(super) fn permit(
        &self,
        session: Option<&Session>,
        channel: &str,
        access: Access,
    ) -> Result<(), String> {
        let verdict = check(
            &self.settings.namespaces,
            self.live.borrow_mut().get().auth.enabled(),
            session,
            channel,
            access,
        );
        if verdict.is_err() {
            self.engine.metrics.forbidden.fetch_add(1, Relaxed);
        }
        verdict
    }

    /// [`Shard::permit`] for a subscribe, and room for the channel: a subscribe that
    /// would create channel state past `max_channels` is refused. The error is the reply
    /// code (403, 503) and its reason.
    pub(super) fn may_subscribe(
        &self,
        session: Option<&Session>,
        channel: &str,
    ) -> Result<(), (u16, String)> {
        self.permit(session, channel, Access::Subscribe)
            .map_err(|reason| (403, reason))?;
        let max = self.settings.max_channels;
        if !self.engine.publisher.has_room_for(channel, max) {
            self.engine.metrics.channels_refused.fetch_add(1, Relaxed);
            return Err((503, channels_full(max)));
        }
        Ok(())
    }

    /// Executes one command of connection `conn` and renders its reply; a recovery's
    /// missed messages go to `replay`.
    pub(super) fn run_command(
        &self,
        conn: ConnId,
        text: &str,
        session: Option<&mut Session>,
        replay: &mut Vec<Bytes>,
    ) -> String {
        let (key, generation) = (conn.key, conn.generation);
        let command = match parse_command(text) {
            Ok(command) => command,
            Err(err) => return Reply::Error(&err).to_json(),
        };
        match command {
            Command::Ping { id } => Reply::Ok {
                kind: "pong",
                id: id.as_deref(),
                channel: None,
            }
            .to_json(),
            Command::Subscribe { id, channel, since } => {
                let refuse = |code, error: &str| {
                    Reply::Refused {
                        kind: "subscribe",
                        id: id.as_deref(),
                        channel: Some(&channel),
                        code,
                        error,
                    }
                    .to_json()
                };
                if let Err((code, reason)) = self.may_subscribe(session.as_deref(), &channel) {
                    return refuse(code, &reason);
                }
                let index = self.engine.index.borrow();
                let limit = self.settings.max_subscriptions_per_connection;
                // Inbox subscribes waiting for the store count too (there are few: each
                // waits milliseconds).
                let waiting = self
                    .engine
                    .inbox_pending
                    .borrow()
                    .keys()
                    .filter(|(k, _)| *k == key)
                    .count()
                    + self.engine.cluster_waiting(key);
                if index.count_of(key) + waiting >= limit && !index.is_subscribed(key, &channel) {
                    return refuse(
                        413,
                        &format!("at most {limit} subscriptions per connection"),
                    );
                }
                if let Some(inbox) = self.inbox_for(&channel) {
                    if index.is_subscribed(key, &channel) {
                        return refuse(409, &format!("already subscribed to {channel}"));
                    }
                    drop(index);
                    // Answered when the store's answer arrives (an empty reply now).
                    return self
                        .inbox_subscribe(inbox, key, generation, &channel, id, since, 0)
                        .err()
                        .unwrap_or_default();
                }
                if since.is_some() && index.is_subscribed(key, &channel) {
                    // Its missed messages may have come live: a replay could repeat them.
                    return refuse(
                        409,
                        &format!("already subscribed to {channel}: unsubscribe first to recover"),
                    );
                }
                let subscribed = index.is_subscribed(key, &channel);
                drop(index);
                if !subscribed {
                    // Cluster: answered once this node follows the channel (shard::join).
                    match self.cluster_join(conn, &channel, id.as_deref(), since, true) {
                        Joining::Waiting => return String::new(),
                        Joining::Refused(reply) => return reply,
                        Joining::Local => {}
                    }
                }
                self.subscribe_at(
                    conn,
                    session.as_deref(),
                    &channel,
                    id.as_deref(),
                    since,
                    replay,
                )
            }
            Command::Unsubscribe { id, channel } => {
                if self.engine.index.borrow_mut().unsubscribe(key, &channel) {
                    self.presence_out(conn, session.as_deref(), &channel);
                }
                // A subscribe still waiting for a join: its answer is dropped.
                self.engine.cluster_forget(key, &channel);
                if self.inbox_for(&channel).is_some() {
                    // An inbox subscribe still waiting for the store: its answer is dropped.
                    self.engine
                        .inbox_pending
                        .borrow_mut()
                        .remove(&(key, Arc::from(channel.as_str())));
                }
                Reply::Ok {
                    kind: "unsubscribe",
                    id: id.as_deref(),
                    channel: Some(&channel),
                }
                .to_json()
            }
            Command::Publish { id, channel, data } => self.client_publish(
                key,
                generation,
                id.as_deref(),
                &channel,
                &data,
                session.as_deref(),
            ),
            Command::Ack {
                id,
                channel,
                offset,
            } => self.inbox_ack(key, generation, id, &channel, offset, session.as_deref()),
            Command::Presence { id, channel } => {
                self.presence_query_from(conn, id.as_deref(), &channel, session.as_deref())
            }
            Command::Refresh { id, token } => self.refresh(id.as_deref(), &token, session),
        }
    }

    /// Subscribes connection `conn` to `channel` (a channel it may use, not an inbox
    /// one), recovering from `since` when given; returns the subscribe reply, and a
    /// recovery's missed messages in `replay`. Shared by the `subscribe` command and the
    /// HTTP transports, so both recover the same way.
    pub(super) fn subscribe_at(
        &self,
        conn: ConnId,
        session: Option<&Session>,
        channel: &str,
        id: Option<&str>,
        since: Option<Since>,
        replay: &mut Vec<Bytes>,
    ) -> String {
        let mut index = self.engine.index.borrow_mut();
        // Attached at the follower's cursor and subscribed in the same step: what the
        // follower has not read yet reaches this connection live, the rest comes from
        // history (see crate::fanout::history).
        let attach = self.engine.publisher.attach(
            channel,
            since,
            self.engine.ring_cursor.get(),
            self.settings.max_recovery_messages,
        );
        if index.subscribe(conn.key, channel) {
            self.presence_in(conn, session, channel);
        }
        index.note_position(channel, attach.offset);
        index.note_epoch(channel, attach.epoch);
        if !attach.exact {
            // Applied to the connection once its command (or upgrade) is done: see
            // Engine::lag_inexact_attaches.
            self.engine
                .note_inexact_attach(Arc::from(channel), attach.offset);
        }
        let recovered = attach.recovery.map(|result| match result {
            Ok(frames) => {
                self.engine.metrics.recovered.fetch_add(1, Relaxed);
                self.engine
                    .metrics
                    .replayed
                    .fetch_add(frames.len() as u64, Relaxed);
                *replay = frames;
                Ok(())
            }
            Err(why) => {
                self.engine.metrics.not_recovered.fetch_add(1, Relaxed);
                Err(why.label())
            }
        });
        Reply::Subscribed {
            id,
            channel,
            offset: attach.offset,
            epoch: attach.epoch,
            recovered,
            inbox: None,
        }
        .to_json()
    }

    /// `{"cmd":"publish"}`: through the same [`crate::fanout::publisher::Publisher`] as
    /// the ingest ports, so offsets and ordering are the same whoever publishes.
    fn client_publish(
        &self,
        key: u32,
        generation: u32,
        id: Option<&str>,
        channel: &str,
        data: &str,
        session: Option<&Session>,
    ) -> String {
        let refuse = |code, error: &str| {
            Reply::Refused {
                kind: "publish",
                id,
                channel: Some(channel),
                code,
                error,
            }
            .to_json()
        };
        if let Err(reason) = self.permit(session, channel, Access::Publish) {
            return refuse(403, &reason);
        }
        let source = Source::Client as usize;
        if let Err(e) = validate_payload(data.as_bytes(), self.settings.max_message_size) {
            self.engine.metrics.ingest_rejected[source][e.index()].fetch_add(1, Relaxed);
            return refuse(413, &e.to_string());
        }
        let max = self.settings.max_channels;
        if !self.engine.publisher.has_room_for(channel, max) {
            self.engine.metrics.channels_refused.fetch_add(1, Relaxed);
            return refuse(503, &channels_full(max));
        }
        // Who a publish answered later (inbox, cluster) is answered to.
        let tag = || ShardTag {
            key,
            generation,
            id: id.map(str::to_string),
            since: None,
            attempt: 0,
        };
        let answered_later = match self.routes.target(channel) {
            Target::Inbox(inbox) => {
                let reply = InboxReply::Shard {
                    shard: self.id,
                    tag: tag(),
                };
                inbox
                    .publish(channel, data.as_bytes(), reply)
                    .map_err(|e| format!("inbox: {}", e.to_store_error()))
            }
            // Answered with the stream's offset once stored (crate::shard::cluster_publish).
            Target::Cluster(cluster) => {
                crate::shard::cluster_publish::publish(cluster, tag(), channel, data.as_bytes())
                    .map_err(str::to_string)
            }
            Target::Local(publisher) => {
                let published = publisher.publish(channel, data.as_bytes());
                self.engine.metrics.messages_in[source].fetch_add(1, Relaxed);
                return Reply::Published {
                    id,
                    channel,
                    offset: published.offset,
                }
                .to_json();
            }
        };
        match answered_later {
            Ok(()) => {
                self.engine.metrics.messages_in[source].fetch_add(1, Relaxed);
                // Answered once committed or stored.
                String::new()
            }
            Err(e) => refuse(503, &e),
        }
    }

    /// `{"cmd":"refresh"}`: a new token for the same user moves the connection's expiry
    /// and replaces its grants (subscriptions already made stay).
    fn refresh(&self, id: Option<&str>, token: &str, session: Option<&mut Session>) -> String {
        let refuse = |code, error: &str| {
            Reply::Refused {
                kind: "refresh",
                id,
                channel: None,
                code,
                error,
            }
            .to_json()
        };
        let live = self.live();
        let Some(verifier) = &live.auth.verifier else {
            return refuse(400, "authentication is not configured on this server");
        };
        let Some(session) = session else {
            return refuse(
                403,
                "an anonymous connection cannot refresh: reconnect with a token",
            );
        };
        let claims = match verifier.verify(token, self.unix_now()) {
            Ok(claims) => claims,
            Err(e) => {
                self.engine.metrics.auth_failures[e.index()].fetch_add(1, Relaxed);
                return refuse(401, &e.to_string());
            }
        };
        if claims.sub != session.user.id() {
            return refuse(
                403,
                "the token is for another user (sub differs): reconnect to change user",
            );
        }
        session.expires_at = expiry_second(
            self.now_secs(),
            self.unix_now(),
            claims.exp,
            verifier.leeway(),
        );
        self.registry.refresh_grants(session, claims.channels);
        Reply::Refreshed {
            id,
            exp: claims.exp,
        }
        .to_json()
    }
}
