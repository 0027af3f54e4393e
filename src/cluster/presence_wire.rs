//! Presence across nodes, the sans-io half: what a presence query, a node's answer and a
//! join/leave event look like on NATS, and how the asking node merges the answers
//! (docs/cluster.md, *Presence*).
//!
//! Every payload is a small JSON object; decoding any bytes returns `None` rather than
//! panicking (a foreign or newer publisher on the subject is ignored).
//!
//! - query (`<prefix>.presence.q.<enc>`, with a reply subject): `{"node":"<asker>","max":N}`
//! - answer (to the reply subject): `{"node":"<id>","count":C,"connections":K,
//!   "members":[{"user":"alice","connections":2},{"conn":"<id>","connections":1}]}`,
//!   `members` absent when the node has more than `max`
//! - event (`<prefix>.presence.ev.<enc>`): `{"node":"<id>","type":"join"|"leave",
//!   "member":{"user":"alice"}}`

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A member as it crosses nodes: a user by its `sub`, an anonymous connection by its
/// cluster-wide connection id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WireMember {
    /// A token's `sub`.
    User(String),
    /// An anonymous connection's id (node tag first, so unique over the cluster).
    Conn(String),
}

/// A member on the wire: exactly one of `user` and `conn`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Listed {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    conn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    connections: Option<u32>,
}

impl Listed {
    fn of(member: &WireMember, connections: Option<u32>) -> Listed {
        match member {
            WireMember::User(u) => Listed {
                user: Some(u.clone()),
                conn: None,
                connections,
            },
            WireMember::Conn(c) => Listed {
                user: None,
                conn: Some(c.clone()),
                connections,
            },
        }
    }

    fn member(self) -> Option<WireMember> {
        match (self.user, self.conn) {
            (Some(u), None) => Some(WireMember::User(u)),
            (None, Some(c)) => Some(WireMember::Conn(c)),
            _ => None,
        }
    }
}

impl WireMember {
    /// The member as the client protocol writes it: `{"user":"<sub>"}` or
    /// `{"conn":"<id>"}`, with `,"connections":N` when given.
    pub fn to_json(&self, connections: Option<u64>) -> String {
        let mut out = String::with_capacity(48);
        match self {
            WireMember::User(u) => {
                out.push_str("{\"user\":");
                out.push_str(&serde_json::Value::String(u.clone()).to_string());
            }
            WireMember::Conn(c) => {
                out.push_str("{\"conn\":");
                out.push_str(&serde_json::Value::String(c.clone()).to_string());
            }
        }
        if let Some(n) = connections {
            out.push_str(",\"connections\":");
            out.push_str(&n.to_string());
        }
        out.push('}');
        out
    }
}

/// A presence query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The asking node's tag (it answers itself from local state, not over NATS).
    pub node: String,
    /// Past this many local members a node answers counts only.
    pub max: u64,
}

/// One node's answer: its local members of the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The answering node's tag.
    pub node: String,
    /// Its distinct members.
    pub count: u64,
    /// Their connections.
    pub connections: u64,
    /// Each member and its connection count; `None` past the query's `max`.
    pub members: Option<Vec<(WireMember, u32)>>,
}

#[derive(Serialize, Deserialize)]
struct AnswerBody {
    node: String,
    count: u64,
    connections: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    members: Option<Vec<Listed>>,
}

/// A join or leave decided on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The node where the member's first connection arrived or its last one left.
    pub node: String,
    /// Join (`true`) or leave.
    pub join: bool,
    /// Who.
    pub member: WireMember,
}

#[derive(Serialize, Deserialize)]
struct EventBody {
    node: String,
    #[serde(rename = "type")]
    kind: String,
    member: Listed,
}

impl Query {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a payload; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Query> {
        serde_json::from_slice(bytes).ok()
    }
}

impl Answer {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let body = AnswerBody {
            node: self.node.clone(),
            count: self.count,
            connections: self.connections,
            members: self
                .members
                .as_ref()
                .map(|list| list.iter().map(|(m, n)| Listed::of(m, Some(*n))).collect()),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// Parses a payload; `None` for anything else (including a member that is not
    /// exactly one of `user` and `conn`).
    pub fn decode(bytes: &[u8]) -> Option<Answer> {
        let body: AnswerBody = serde_json::from_slice(bytes).ok()?;
        let members = match body.members {
            None => None,
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for l in list {
                    let n = l.connections.unwrap_or(1);
                    out.push((l.member()?, n));
                }
                Some(out)
            }
        };
        Some(Answer {
            node: body.node,
            count: body.count,
            connections: body.connections,
            members,
        })
    }
}

impl Event {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let body = EventBody {
            node: self.node.clone(),
            kind: if self.join { "join" } else { "leave" }.to_string(),
            member: Listed::of(&self.member, None),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// Parses a payload; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Event> {
        let body: EventBody = serde_json::from_slice(bytes).ok()?;
        let join = match body.kind.as_str() {
            "join" => true,
            "leave" => false,
            _ => return None,
        };
        Some(Event {
            node: body.node,
            join,
            member: body.member.member()?,
        })
    }
}

/// The asking node's merge of every answer (its own included).
#[derive(Debug, Default)]
pub struct Merge {
    members: HashMap<WireMember, u64>,
    /// Answers that gave counts only (more members than the limit on that node).
    unlisted_count: u64,
    unlisted_connections: u64,
    nodes: Vec<String>,
}

/// The merged presence of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Distinct members (a user on several nodes once), or, when some node answered
    /// counts only, the listed members plus that node's count.
    pub count: u64,
    /// Connections over every node.
    pub connections: u64,
    /// The members, sorted, with their connections summed over nodes; `None` past the
    /// limit (or when a node answered counts only).
    pub members: Option<Vec<(WireMember, u64)>>,
}

impl Merge {
    /// Adds one node's answer; a second answer from the same node is ignored.
    pub fn add(&mut self, answer: Answer) {
        if self.nodes.contains(&answer.node) {
            return;
        }
        self.nodes.push(answer.node);
        match answer.members {
            Some(list) => {
                for (member, n) in list {
                    *self.members.entry(member).or_insert(0) += u64::from(n);
                }
            }
            None => {
                self.unlisted_count += answer.count;
                self.unlisted_connections += answer.connections;
            }
        }
    }

    /// Nodes that answered (the asker included).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The result, listing members when there are at most `max`.
    pub fn finish(self, max: usize) -> Merged {
        let listed_connections: u64 = self.members.values().sum();
        let count = self.members.len() as u64 + self.unlisted_count;
        let connections = listed_connections + self.unlisted_connections;
        let members = (self.unlisted_count == 0 && self.members.len() <= max).then(|| {
            let mut list: Vec<(WireMember, u64)> = self.members.into_iter().collect();
            list.sort();
            list
        });
        Merged {
            count,
            connections,
            members,
        }
    }
}

impl Merged {
    /// The `members` array as the client protocol writes it.
    pub fn members_json(&self) -> Option<String> {
        self.members.as_ref().map(|list| {
            let mut out = String::with_capacity(2 + list.len() * 40);
            out.push('[');
            for (i, (member, n)) in list.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&member.to_json(Some(*n)));
            }
            out.push(']');
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member() -> impl Strategy<Value = WireMember> {
        prop_oneof![
            any::<String>().prop_map(WireMember::User),
            any::<String>().prop_map(WireMember::Conn),
        ]
    }

    fn answer() -> impl Strategy<Value = Answer> {
        (
            any::<String>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(proptest::collection::vec((member(), any::<u32>()), 0..8)),
        )
            .prop_map(|(node, count, connections, members)| Answer {
                node,
                count,
                connections,
                members,
            })
    }

    proptest! {
        #[test]
        fn answers_round_trip(a in answer()) {
            prop_assert_eq!(Answer::decode(&a.encode()), Some(a));
        }

        #[test]
        fn events_round_trip(node in any::<String>(), join in any::<bool>(), m in member()) {
            let e = Event { node, join, member: m };
            prop_assert_eq!(Event::decode(&e.encode()), Some(e));
        }

        #[test]
        fn queries_round_trip(node in any::<String>(), max in any::<u64>()) {
            let q = Query { node, max };
            prop_assert_eq!(Query::decode(&q.encode()), Some(q));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Answer::decode(&bytes);
            let _ = Event::decode(&bytes);
            let _ = Query::decode(&bytes);
        }

        #[test]
        fn member_json_is_valid_json(m in member(), n in proptest::option::of(any::<u64>())) {
            let v: serde_json::Value = serde_json::from_str(&m.to_json(n)).expect("json");
            match &m {
                WireMember::User(u) => prop_assert_eq!(v["user"].as_str(), Some(u.as_str())),
                WireMember::Conn(c) => prop_assert_eq!(v["conn"].as_str(), Some(c.as_str())),
            }
            prop_assert_eq!(v["connections"].as_u64(), n);
        }
    }

    #[test]
    fn a_member_with_both_or_neither_name_is_refused() {
        let both = br#"{"node":"a","type":"join","member":{"user":"u","conn":"c"}}"#;
        assert_eq!(Event::decode(both), None);
        let neither = br#"{"node":"a","type":"join","member":{}}"#;
        assert_eq!(Event::decode(neither), None);
        let kind = br#"{"node":"a","type":"wave","member":{"user":"u"}}"#;
        assert_eq!(Event::decode(kind), None);
    }

    #[test]
    fn users_on_two_nodes_merge_and_connections_add_up() {
        let alice = WireMember::User("alice".into());
        let anon = WireMember::Conn("n1-0-1-1".into());
        let mut merge = Merge::default();
        merge.add(Answer {
            node: "n1".into(),
            count: 2,
            connections: 3,
            members: Some(vec![(alice.clone(), 2), (anon.clone(), 1)]),
        });
        merge.add(Answer {
            node: "n2".into(),
            count: 1,
            connections: 1,
            members: Some(vec![(alice.clone(), 1)]),
        });
        // A repeated answer (NATS redelivery cannot happen, a buggy node could) counts once.
        merge.add(Answer {
            node: "n2".into(),
            count: 1,
            connections: 1,
            members: Some(vec![(alice.clone(), 1)]),
        });
        assert_eq!(merge.nodes(), 2);
        let merged = merge.finish(10);
        assert_eq!((merged.count, merged.connections), (2, 4));
        assert_eq!(merged.members, Some(vec![(alice, 3), (anon, 1)]));
        assert_eq!(
            merged.members_json().as_deref(),
            Some(r#"[{"user":"alice","connections":3},{"conn":"n1-0-1-1","connections":1}]"#)
        );
    }

    #[test]
    fn past_the_limit_only_counts() {
        let mut merge = Merge::default();
        merge.add(Answer {
            node: "n1".into(),
            count: 2,
            connections: 2,
            members: Some(vec![
                (WireMember::User("a".into()), 1),
                (WireMember::User("b".into()), 1),
            ]),
        });
        let merged = merge.finish(1);
        assert_eq!((merged.count, merged.members), (2, None));
        let mut merge = Merge::default();
        merge.add(Answer {
            node: "n1".into(),
            count: 50,
            connections: 60,
            members: None,
        });
        merge.add(Answer {
            node: "n2".into(),
            count: 1,
            connections: 1,
            members: Some(vec![(WireMember::User("a".into()), 1)]),
        });
        let merged = merge.finish(100);
        assert_eq!(
            (merged.count, merged.connections, merged.members),
            (51, 61, None)
        );
    }
}
