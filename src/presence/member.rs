//! Who a presence member is, and how it is written in replies and events.
//!
//! An authenticated connection counts as its user: one user with several connections on
//! a channel (on any shards) is one member with a connection count, joins with its first
//! connection and leaves with its last. An anonymous connection has no identity to share,
//! so it is a member of its own, named by its [`ConnId`].

use crate::auth::session::User;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

/// With the cluster on, this node's tag: anonymous connection ids start with it, so they
/// are unique over every node (docs/cluster.md, *Presence*).
static NODE_TAG: OnceLock<String> = OnceLock::new();

/// Sets the node tag (once, at start, cluster on only).
pub fn set_node_tag(tag: &str) {
    let _ = NODE_TAG.set(tag.to_string());
}

/// A connection's process-wide name while it is open: shard, table slot and the slot's
/// generation (so a reused slot is a different connection). Written `shard-key-generation`,
/// or `node-shard-key-generation` with the cluster on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// The shard that owns it.
    pub shard: u32,
    /// Its connection-table key on that shard.
    pub key: u32,
    /// The slot's generation.
    pub generation: u32,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(node) = NODE_TAG.get() {
            write!(f, "{node}-")?;
        }
        write!(f, "{}-{}-{}", self.shard, self.key, self.generation)
    }
}

/// One presence member.
#[derive(Debug, Clone)]
pub enum Member {
    /// An authenticated user (the interned [`User`] its connections share).
    User(Arc<User>),
    /// An anonymous connection.
    Conn(ConnId),
}

impl PartialEq for Member {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            // By id, not pointer: a user that reconnects after its last connection closed
            // is interned anew.
            (Member::User(a), Member::User(b)) => a.id() == b.id(),
            (Member::Conn(a), Member::Conn(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Member {}

impl Hash for Member {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Member::User(u) => {
                state.write_u8(0);
                u.id().hash(state);
            }
            Member::Conn(c) => {
                state.write_u8(1);
                c.hash(state);
            }
        }
    }
}

impl Member {
    /// Appends the member as a JSON object: `{"user":"<sub>"}` or `{"conn":"<id>"}`, with
    /// `,"connections":N` when `connections` is given.
    pub fn write_json(&self, out: &mut String, connections: Option<u32>) {
        match self {
            Member::User(u) => {
                out.push_str("{\"user\":");
                // A `sub` is any string: escape it.
                out.push_str(&serde_json::Value::String(u.id().to_string()).to_string());
            }
            Member::Conn(c) => {
                out.push_str("{\"conn\":\"");
                out.push_str(&c.to_string());
                out.push('"');
            }
        }
        if let Some(n) = connections {
            out.push_str(",\"connections\":");
            out.push_str(&n.to_string());
        }
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_render_as_documented() {
        let mut out = String::new();
        Member::User(Arc::new(User::new("al\"ice"))).write_json(&mut out, Some(2));
        out.push(' ');
        let conn = ConnId {
            shard: 1,
            key: 4,
            generation: 9,
        };
        Member::Conn(conn).write_json(&mut out, None);
        assert_eq!(
            out,
            r#"{"user":"al\"ice","connections":2} {"conn":"1-4-9"}"#
        );
    }

    #[test]
    fn users_are_equal_by_id() {
        let a = Member::User(Arc::new(User::new("a")));
        let b = Member::User(Arc::new(User::new("a")));
        assert_eq!(a, b);
        let conn = Member::Conn(ConnId {
            shard: 0,
            key: 0,
            generation: 0,
        });
        assert_ne!(a, conn);
    }
}
