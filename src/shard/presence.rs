//! Presence on the shard: keeping the process-wide [`crate::presence::Presence`] in step
//! with this shard's subscription index, and answering `{"cmd":"presence"}`.
//!
//! Every subscription that takes effect on a presence channel (the index reports it as
//! new) is one connection in; every one that ends, by unsubscribe or by any close path
//! (all of which pass through [`Shard::drop_subscriptions`]), is one connection out. So
//! the registry holds exactly the index's presence subscriptions of every shard.

use crate::auth::namespace::namespace_of;
use crate::auth::permission::Access;
use crate::auth::session::Session;
use crate::cluster::presence::{QueryTag, ShardAnswer};
use crate::cluster::presence_wire::Merged;
use crate::presence::{Change, ConnId, Member};
use crate::proto::command::Reply;
use crate::shard::state::Shard;
use crate::shard::table::Conn;

/// Renders a presence reply; `partial` adds `"partial":true` (cluster on, only this
/// node's members: docs/protocol.md, *Presence*).
fn presence_reply(id: Option<&str>, channel: &str, merged: &Merged, partial: bool) -> String {
    let members = merged.members_json();
    let mut reply = Reply::Presence {
        id,
        channel,
        count: usize::try_from(merged.count).unwrap_or(usize::MAX),
        connections: merged.connections,
        members: members.as_deref(),
    }
    .to_json();
    if partial && reply.ends_with('}') {
        reply.pop();
        reply.push_str(",\"partial\":true}");
    }
    reply
}

/// The presence member a connection counts as: its user, or itself when anonymous.
pub(super) fn member_of(id: ConnId, session: Option<&Session>) -> Member {
    match session {
        Some(s) => Member::User(s.user.clone()),
        None => Member::Conn(id),
    }
}

impl Shard {
    /// The process-wide name of connection `key` (with its slot's `generation`).
    pub(super) fn conn_id(&self, key: u32, generation: u32) -> ConnId {
        ConnId {
            shard: self.id as u32,
            key,
            generation,
        }
    }

    /// A subscription of connection `id` to `channel` took effect.
    /// Not while a long poll is being adopted: polls are not members.
    pub(super) fn presence_in(&self, id: ConnId, session: Option<&Session>, channel: &str) {
        let rules = self.settings.namespaces.rules_for(channel);
        if rules.presence && !self.engine.quiet_presence.get() {
            let member = member_of(id, session);
            let change = self.presence.join(channel, &member, rules.join_leave);
            if rules.join_leave && change == Change::Joined {
                // The other nodes' subscribers (nothing when the cluster is off).
                crate::cluster::presence::event(channel, &member, true);
            }
        }
    }

    /// A subscription of connection `id` to `channel` ended.
    pub(super) fn presence_out(&self, id: ConnId, session: Option<&Session>, channel: &str) {
        let rules = self.settings.namespaces.rules_for(channel);
        if rules.presence {
            let member = member_of(id, session);
            let change = self.presence.leave(channel, &member, rules.join_leave);
            if rules.join_leave && change == Change::Left {
                crate::cluster::presence::event(channel, &member, false);
            }
        }
    }

    /// Removes every subscription of connection `key` from the index and, for presence
    /// channels, from presence; `conn` is the table entry at `key` (`None` if already
    /// gone, when presence has nothing of it either).
    pub(super) fn drop_subscriptions(&self, key: u32, conn: Option<&Conn>) {
        let mut index = self.engine.index.borrow_mut();
        let Some(conn) = conn else {
            index.remove_conn(key);
            return;
        };
        let id = self.conn_id(key, conn.generation);
        let session = conn.machine.session();
        if conn.machine.is_poll() {
            // Never a presence member (see shard::conn::adopt_stream).
            index.remove_conn(key);
            return;
        }
        index.remove_conn_each(key, |channel| self.presence_out(id, session, channel));
    }

    /// `{"cmd":"presence"}` from connection `conn`: with the cluster on, asks every node
    /// and answers when the NATS thread has merged their answers (an empty reply now);
    /// otherwise (or NATS down) at once from this node ([`Shard::presence_query`]).
    pub(super) fn presence_query_from(
        &self,
        conn: ConnId,
        id: Option<&str>,
        channel: &str,
        session: Option<&Session>,
    ) -> String {
        if !crate::cluster::presence::enabled() {
            return self.presence_query(id, channel, session);
        }
        if let Some(refusal) = self.presence_refusal(id, channel, session) {
            return refusal;
        }
        let max = self.settings.presence_max_members;
        let tag = QueryTag {
            key: conn.key,
            generation: conn.generation,
            id: id.map(str::to_string),
        };
        match crate::cluster::presence::query(channel, self.id, tag, max) {
            Ok(()) => String::new(),
            Err(_) => {
                let merged = crate::cluster::presence::local_only(channel, max);
                presence_reply(id, channel, &merged, true)
            }
        }
    }

    /// The NATS thread's merged answer for one of this shard's connections: sent if the
    /// connection is still the one that asked (a closed one's answer is dropped here).
    pub fn on_presence_answer(&self, answer: ShardAnswer) {
        let ShardAnswer {
            tag,
            channel,
            merged,
            partial,
        } = answer;
        let reply = presence_reply(tag.id.as_deref(), &channel, &merged, partial);
        self.answer_later(tag.key, tag.generation, reply, Vec::new());
        self.settle();
    }

    /// The 403 or 404 refusal of a presence query, if any.
    fn presence_refusal(
        &self,
        id: Option<&str>,
        channel: &str,
        session: Option<&Session>,
    ) -> Option<String> {
        let refuse = |code, error: &str| {
            Reply::Refused {
                kind: "presence",
                id,
                channel: Some(channel),
                code,
                error,
            }
            .to_json()
        };
        if let Err(reason) = self.permit(session, channel, Access::Subscribe) {
            return Some(refuse(403, &reason));
        }
        if !self.settings.namespaces.rules_for(channel).presence {
            let scope = match namespace_of(channel) {
                Some(ns) => format!("namespace {ns:?}: set presence = true in [namespaces.{ns}]"),
                None => "channels without a namespace: set presence = true in [channel_defaults]"
                    .to_string(),
            };
            return Some(refuse(404, &format!("presence is not kept for {scope}")));
        }
        None
    }

    /// `{"cmd":"presence"}` answered from this node: the channel's members over every
    /// shard, or only their count past `presence_max_members`. Needs the right to
    /// subscribe to the channel (403) and presence on in its namespace (404).
    pub(super) fn presence_query(
        &self,
        id: Option<&str>,
        channel: &str,
        session: Option<&Session>,
    ) -> String {
        if let Some(refusal) = self.presence_refusal(id, channel, session) {
            return refusal;
        }
        let snapshot = self
            .presence
            .snapshot(channel, self.settings.presence_max_members);
        let members = snapshot.members.map(|list| {
            let mut out = String::with_capacity(2 + list.len() * 40);
            out.push('[');
            for (i, (member, connections)) in list.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                member.write_json(&mut out, Some(*connections));
            }
            out.push(']');
            out
        });
        Reply::Presence {
            id,
            channel,
            count: snapshot.count,
            connections: snapshot.connections,
            members: members.as_deref(),
        }
        .to_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::namespace::{NamespaceTable, Namespaces};
    use crate::metrics::CloseCause;
    use crate::shard::conn::{adopt, Carried};
    use std::collections::BTreeMap;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn shard_with_presence() -> Shard {
        let mut settings = crate::config::resolve(Default::default(), Default::default())
            .expect("default settings");
        let mut tables = BTreeMap::new();
        tables.insert(
            "room".to_string(),
            NamespaceTable {
                presence: Some(true),
                join_leave: Some(true),
                ..NamespaceTable::default()
            },
        );
        settings.namespaces =
            Namespaces::resolve(&NamespaceTable::default(), None, Some(&tables)).expect("rules");
        Shard::for_tests(settings, 64)
    }

    /// Every way a subscription ends takes the connection out of presence: unsubscribe,
    /// a decided close (drain here; the heartbeat's dead-peer close takes the same path),
    /// and a table removal without a close order.
    #[test]
    fn every_way_out_leaves_presence() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let shard = shard_with_presence();
            let mut peers = Vec::new();
            let chans = vec!["room:1".to_string(), "plain".to_string()];
            let keys: Vec<u32> = (0..3)
                .map(|_| {
                    let (ours, theirs) = UnixStream::pair().expect("socketpair");
                    peers.push(theirs);
                    let key = shard.engine.conns.borrow().next_key();
                    adopt(
                        &shard,
                        OwnedFd::from(ours),
                        &chans,
                        None,
                        None,
                        Vec::new(),
                        Carried::default(),
                    );
                    key
                })
                .collect();
            let count = || shard.presence.snapshot("room:1", 10).count;
            assert_eq!(count(), 3);
            assert_eq!(shard.presence.snapshot("plain", 10).count, 0, "no presence");

            let generation = shard
                .engine
                .conns
                .borrow()
                .get(keys[0])
                .map(|c| c.generation);
            let id = shard.conn_id(keys[0], generation.expect("conn 0"));
            let reply = shard.run_command(
                id,
                r#"{"cmd":"unsubscribe","channel":"room:1"}"#,
                None,
                &mut Vec::new(),
            );
            assert!(reply.contains("200"), "{reply}");
            assert_eq!(count(), 2);
            let reply = shard.presence_query(Some("1"), "room:1", None);
            assert!(reply.contains(r#""count":2"#), "{reply}");

            {
                let mut conns = shard.engine.conns.borrow_mut();
                let conn = conns.get_mut(keys[1]).expect("conn 1");
                assert!(shard
                    .engine
                    .schedule_close(keys[1], conn, None, CloseCause::Drain));
            }
            shard.settle();
            assert_eq!(count(), 1);

            shard.finalize_close(keys[2]);
            assert_eq!(count(), 0);
            assert_eq!(
                (
                    shard.presence.channel_count(),
                    shard.presence.member_count()
                ),
                (0, 0)
            );
            // Three joins, three leaves went into the ring.
            assert_eq!(shard.engine.publisher.ring().head(), 6);
            drop(peers);
        });
    }
}
