//! What an authenticated connection carries: its user, its channel grants, its place in
//! the registry and when its token runs out.
//!
//! A connection keeps this behind one `Option<Box<Session>>` in its state machine
//! ([`crate::proto::conn::Connection`]): anonymous connections pay one null pointer, and
//! an authenticated one 32 bytes, because the user id and the grants are shared: every
//! connection of a user points at the one interned [`User`], and at the one [`Grants`] its
//! tokens last carried ([`crate::auth::registry::Registry`] interns both).

use crate::auth::glob::Pattern;
use std::sync::Arc;

/// A connected user, interned: one allocation per user however many connections it has.
#[derive(Debug)]
pub struct User {
    id: Box<str>,
}

impl User {
    pub(crate) fn new(id: &str) -> Self {
        User { id: id.into() }
    }

    /// The user id (the token's `sub`).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The channel patterns a token grants.
#[derive(Debug, PartialEq, Eq)]
pub struct Grants {
    patterns: Box<[Pattern]>,
}

impl Grants {
    /// Grants for exactly these patterns.
    pub fn new(patterns: Vec<Pattern>) -> Self {
        Grants {
            patterns: patterns.into_boxed_slice(),
        }
    }

    /// True when some pattern matches `channel`.
    pub fn allows(&self, channel: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(channel))
    }

    /// The patterns.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }
}

/// The identity of one authenticated connection.
#[derive(Debug)]
pub struct Session {
    /// Who (shared by all the user's connections).
    pub user: Arc<User>,
    /// What its token grants; `None`: not restricted by channel.
    pub grants: Option<Arc<Grants>>,
    /// Its key in the registry's connection slab.
    pub conn_id: usize,
    /// Shard second at which its token expires (leeway included): close 4401 then.
    pub expires_at: u32,
}

/// The shard second at which a token with `exp` (Unix seconds) stops being valid, given
/// that it is `now_unix` at shard second `now`, allowing `leeway` seconds of clock skew.
/// Saturates at `u32::MAX` (136 years of shard uptime) for far-future tokens.
pub fn expiry_second(now: u32, now_unix: u64, exp: u64, leeway: u64) -> u32 {
    let left = exp.saturating_add(leeway).saturating_sub(now_unix);
    u32::try_from(left).map_or(u32::MAX, |left| now.saturating_add(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_maps_unix_time_to_shard_seconds() {
        assert_eq!(expiry_second(100, 1_000, 1_030, 5), 135);
        assert_eq!(expiry_second(100, 1_000, 990, 5), 100);
        assert_eq!(expiry_second(100, 1_000, u64::MAX, 5), u32::MAX);
        assert_eq!(expiry_second(u32::MAX - 1, 0, 10, 0), u32::MAX);
    }

    #[test]
    fn a_session_stays_small() {
        // Boxed per authenticated connection: 32 bytes is one small allocator bin.
        assert!(std::mem::size_of::<Session>() <= 32);
    }
}
