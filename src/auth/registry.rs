//! Who is connected where: user id → connections, each connection → (shard, slot).
//!
//! Shared by every shard, touched once per authenticated connect and close (and per
//! admin request), never per message. Two parts:
//!
//! - a `sharded_slab::Slab` of [`ConnRecord`]s, one per authenticated connection: a
//!   lock-free concurrent slab whose key is the connection's process-wide id (inserts go
//!   to the inserting thread's shard of the slab, removals from any thread are fine);
//! - the users, striped by hash: each stripe maps a user id to its interned [`User`], the
//!   last [`Grants`] its tokens carried, and its connection ids. A stripe is held for one
//!   hash lookup and a push or `swap_remove`; like the publisher's stripes it is taken by
//!   spinning (a shard thread must never park), and 64 stripes keep connects of different
//!   users apart.
//!
//! Interning is what keeps an authenticated connection small: its [`Session`] holds two
//! shared pointers instead of a copy of the id and the patterns.

use crate::auth::glob::Pattern;
use crate::auth::session::{Grants, Session, User};
use crate::fanout::spin::spin_lock;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

const STRIPES: usize = 64;

/// Where one authenticated connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRecord {
    /// The shard that owns it.
    pub shard: u32,
    /// Its connection-table key on that shard.
    pub key: u32,
    /// The table slot's generation, so a reused slot is never mistaken for it.
    pub generation: u32,
}

/// A map key that is the interned user, looked up by `&str`.
struct UserKey(Arc<User>);

impl Borrow<str> for UserKey {
    fn borrow(&self) -> &str {
        self.0.id()
    }
}

impl Hash for UserKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id().hash(state)
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for UserKey {}

#[derive(Default)]
struct UserConns {
    /// The grants most recently seen for this user, shared while tokens agree.
    grants: Option<Arc<Grants>>,
    /// Connection ids (slab keys).
    conns: Vec<usize>,
}

type UserStripe = CachePadded<Mutex<HashMap<UserKey, UserConns, ahash::RandomState>>>;

/// The process-wide registry of authenticated connections.
pub struct Registry {
    conns: sharded_slab::Slab<ConnRecord>,
    stripes: Box<[UserStripe]>,
    hasher: ahash::RandomState,
    users: AtomicU64,
    gauge: Option<&'static AtomicU64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            conns: sharded_slab::Slab::new(),
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(Mutex::new(HashMap::default())))
                .collect(),
            hasher: ahash::RandomState::new(),
            users: AtomicU64::new(0),
            gauge: None,
        }
    }

    /// Mirrors the number of connected users into `gauge` (`ringcast_users_connected`).
    pub fn with_user_gauge(mut self, gauge: &'static AtomicU64) -> Self {
        gauge.store(self.users.load(Relaxed), Relaxed);
        self.gauge = Some(gauge);
        self
    }

    fn stripe(&self, user: &str) -> &UserStripe {
        &self.stripes[(self.hasher.hash_one(user) as usize) % STRIPES]
    }

    /// Registers a connection of `user` at `record`, with the grants its token carries.
    /// Returns its session (expiring at shard second `expires_at`), or `None` when the
    /// slab is out of ids (billions of connections: not reachable in practice).
    pub fn register(
        &self,
        user: &str,
        grants: Option<Vec<Pattern>>,
        record: ConnRecord,
        expires_at: u32,
    ) -> Option<Session> {
        let conn_id = self.conns.insert(record)?;
        let mut map = spin_lock(self.stripe(user));
        let (user, entry) = match map.get_key_value(user) {
            Some((key, _)) => {
                let user = key.0.clone();
                let entry = map.get_mut(user.id())?;
                (user, entry)
            }
            None => {
                let user = Arc::new(User::new(user));
                self.count_users(1);
                let entry = map.entry(UserKey(user.clone())).or_default();
                (user, entry)
            }
        };
        entry.conns.push(conn_id);
        let grants = intern(entry, grants);
        Some(Session {
            user,
            grants,
            conn_id,
            expires_at,
        })
    }

    /// The shared [`Grants`] for a refreshed token of `session`'s user.
    pub fn refresh_grants(&self, session: &mut Session, grants: Option<Vec<Pattern>>) {
        let mut map = spin_lock(self.stripe(session.user.id()));
        session.grants = match map.get_mut(session.user.id()) {
            Some(entry) => intern(entry, grants),
            None => grants.map(|g| Arc::new(Grants::new(g))),
        };
    }

    /// Removes a connection registered with [`Registry::register`].
    pub fn unregister(&self, session: &Session) {
        self.conns.remove(session.conn_id);
        let id = session.user.id();
        let mut map = spin_lock(self.stripe(id));
        let Some(entry) = map.get_mut(id) else {
            return;
        };
        if let Some(i) = entry.conns.iter().position(|&c| c == session.conn_id) {
            entry.conns.swap_remove(i);
        }
        if entry.conns.is_empty() {
            map.remove(id);
            self.count_users(-1);
        }
    }

    /// `user`'s connections on `shard`, as (table key, generation).
    pub fn connections_on(&self, user: &str, shard: u32) -> Vec<(u32, u32)> {
        let ids: Vec<usize> = {
            let map = spin_lock(self.stripe(user));
            match map.get(user) {
                Some(entry) => entry.conns.clone(),
                None => return Vec::new(),
            }
        };
        ids.into_iter()
            .filter_map(|id| self.conns.get(id).map(|r| *r))
            .filter(|r| r.shard == shard)
            .map(|r| (r.key, r.generation))
            .collect()
    }

    /// Connections `user` has, over all shards.
    pub fn connection_count(&self, user: &str) -> usize {
        spin_lock(self.stripe(user))
            .get(user)
            .map_or(0, |entry| entry.conns.len())
    }

    /// Users with at least one connection.
    pub fn user_count(&self) -> u64 {
        self.users.load(Relaxed)
    }

    fn count_users(&self, delta: i64) {
        let now = if delta > 0 {
            self.users.fetch_add(1, Relaxed) + 1
        } else {
            self.users.fetch_sub(1, Relaxed).saturating_sub(1)
        };
        if let Some(g) = self.gauge {
            g.store(now, Relaxed);
        }
    }
}

/// The user's shared grants for `patterns`: the ones already held when equal.
fn intern(entry: &mut UserConns, patterns: Option<Vec<Pattern>>) -> Option<Arc<Grants>> {
    let patterns = patterns?;
    match &entry.grants {
        Some(held) if held.patterns() == patterns.as_slice() => Some(held.clone()),
        _ => {
            let grants = Arc::new(Grants::new(patterns));
            entry.grants = Some(grants.clone());
            Some(grants)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(shard: u32, key: u32) -> ConnRecord {
        ConnRecord {
            shard,
            key,
            generation: key + 100,
        }
    }

    fn news() -> Option<Vec<Pattern>> {
        Some(vec![Pattern::parse("news:*").unwrap()])
    }

    #[test]
    fn users_are_interned_and_counted() {
        let r = Registry::new();
        let a1 = r.register("alice", news(), at(0, 1), 9).unwrap();
        let a2 = r.register("alice", news(), at(1, 7), 9).unwrap();
        let b = r.register("bob", None, at(1, 2), 9).unwrap();
        assert!(Arc::ptr_eq(&a1.user, &a2.user));
        assert!(Arc::ptr_eq(
            a1.grants.as_ref().unwrap(),
            a2.grants.as_ref().unwrap()
        ));
        assert_ne!(a1.conn_id, a2.conn_id);
        assert_eq!(r.user_count(), 2);
        assert_eq!(r.connections_on("alice", 1), vec![(7, 107)]);
        assert_eq!(r.connections_on("alice", 0), vec![(1, 101)]);
        assert_eq!(r.connection_count("alice"), 2);
        r.unregister(&a1);
        assert_eq!(r.connections_on("alice", 0), vec![]);
        assert_eq!(r.user_count(), 2);
        r.unregister(&a2);
        r.unregister(&b);
        assert_eq!(r.user_count(), 0);
        assert_eq!(r.connections_on("alice", 1), vec![]);
    }

    #[test]
    fn refreshed_grants_replace_the_shared_ones() {
        let r = Registry::new();
        let mut a = r.register("alice", news(), at(0, 1), 9).unwrap();
        r.refresh_grants(&mut a, Some(vec![Pattern::parse("room:1").unwrap()]));
        assert!(a.grants.as_ref().unwrap().allows("room:1"));
        assert!(!a.grants.as_ref().unwrap().allows("news:x"));
        r.refresh_grants(&mut a, None);
        assert!(a.grants.is_none());
    }

    #[test]
    fn shards_register_concurrently() {
        let r = Arc::new(Registry::new());
        std::thread::scope(|s| {
            for shard in 0..4u32 {
                let r = r.clone();
                s.spawn(move || {
                    let sessions: Vec<Session> = (0..500)
                        .map(|k| {
                            r.register(&format!("u{}", k % 50), None, at(shard, k), 0)
                                .unwrap()
                        })
                        .collect();
                    for session in &sessions[..250] {
                        r.unregister(session);
                    }
                });
            }
        });
        let on_shard: usize = (0..50)
            .map(|u| r.connections_on(&format!("u{u}"), 2).len())
            .sum();
        assert_eq!(on_shard, 250);
        assert_eq!(r.user_count(), 50);
    }
}
