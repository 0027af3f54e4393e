//! Who may subscribe or publish to a channel: the identity (or its absence), the
//! namespace's rules and the `user:` rule, decided in one place.
//!
//! In order:
//! 1. Publishing needs `allow_publish` in the channel's namespace.
//! 2. With authentication configured, `user:<id>` belongs to the connection whose token
//!    has `sub` = `<id>`, and to nobody else, whatever its grants or namespace say.
//!    (Without it nobody has an id, and `user:` channels stay ordinary channels, as
//!    before identity existed.)
//! 3. An anonymous connection needs `anonymous = true` in the namespace.
//! 4. An authenticated connection needs its token's channels claim, when present, to
//!    match the channel.

use crate::auth::namespace::{namespace_of, Namespaces};
use crate::auth::session::Session;

/// The per-user channel prefix.
pub const USER_PREFIX: &str = "user:";

/// What a connection wants to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive its messages.
    Subscribe,
    /// Publish to it with `{"cmd":"publish"}`.
    Publish,
}

/// Decides whether `session` (`None`: anonymous) may `access` `channel`; the error is the
/// reason shown to the client with code 403.
///
/// # Errors
/// A one-line reason when the access is forbidden.
pub fn check(
    namespaces: &Namespaces,
    auth_enabled: bool,
    session: Option<&Session>,
    channel: &str,
    access: Access,
) -> Result<(), String> {
    let rules = namespaces.rules_for(channel);
    let scope = || match namespace_of(channel) {
        Some(ns) => format!("namespace {ns:?}"),
        None => "channels without a namespace".to_string(),
    };
    if access == Access::Publish && !rules.allow_publish {
        return Err(format!("publishing is not allowed in {}", scope()));
    }
    if auth_enabled {
        if let Some(owner) = channel.strip_prefix(USER_PREFIX) {
            return match session {
                Some(s) if s.user.id() == owner => Ok(()),
                Some(_) => Err(format!("{channel} is another user's channel")),
                None => Err(format!(
                    "{channel} is a user's channel: connect with that user's token"
                )),
            };
        }
    }
    match session {
        None if !rules.anonymous => Err(format!(
            "anonymous connections may not use {}: connect with a token",
            scope()
        )),
        None => Ok(()),
        Some(s) => match &s.grants {
            Some(grants) if !grants.allows(channel) => {
                Err(format!("the token does not grant channel {channel}"))
            }
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::glob::Pattern;
    use crate::auth::namespace::NamespaceTable;
    use crate::auth::session::{Grants, User};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn namespaces() -> Namespaces {
        let mut tables = BTreeMap::new();
        tables.insert(
            "news".to_string(),
            NamespaceTable {
                anonymous: Some(false),
                allow_publish: Some(true),
                ..NamespaceTable::default()
            },
        );
        Namespaces::resolve(&Default::default(), None, Some(&tables)).unwrap()
    }

    fn session(user: &str, grants: Option<&[&str]>) -> Session {
        Session {
            user: Arc::new(User::new(user)),
            grants: grants.map(|g| {
                Arc::new(Grants::new(
                    g.iter().map(|p| Pattern::parse(p).unwrap()).collect(),
                ))
            }),
            conn_id: 0,
            expires_at: u32::MAX,
        }
    }

    #[test]
    fn the_matrix() {
        use Access::{Publish, Subscribe};
        let ns = namespaces();
        let alice = session("alice", None);
        let limited = session("bob", Some(&["news:eu*"]));
        let ok = |s: Option<&Session>, ch: &str, a| check(&ns, true, s, ch, a).is_ok();
        // Anonymous: namespace rule.
        assert!(ok(None, "plain", Subscribe));
        assert!(!ok(None, "news:eu", Subscribe));
        assert!(!ok(None, "plain", Publish));
        // user: channels.
        assert!(ok(Some(&alice), "user:alice", Subscribe));
        assert!(!ok(Some(&alice), "user:bob", Subscribe));
        assert!(!ok(None, "user:alice", Subscribe));
        assert!(ok(Some(&limited), "user:bob", Subscribe));
        // Grants.
        assert!(ok(Some(&limited), "news:eu", Subscribe));
        assert!(ok(Some(&limited), "news:eu", Publish));
        assert!(!ok(Some(&limited), "news:us", Subscribe));
        assert!(!ok(Some(&limited), "plain", Subscribe));
        assert!(ok(Some(&alice), "news:us", Publish));
        // Publishing needs allow_publish.
        assert!(!ok(Some(&alice), "plain", Publish));
        let err = check(&ns, true, None, "news:x", Subscribe).unwrap_err();
        assert!(err.contains("namespace \"news\""), "{err}");
    }

    #[test]
    fn without_auth_user_channels_are_ordinary() {
        let ns = Namespaces::default();
        assert!(check(&ns, false, None, "user:alice", Access::Subscribe).is_ok());
        assert!(check(&ns, false, None, "anything", Access::Subscribe).is_ok());
        assert!(check(&ns, false, None, "anything", Access::Publish).is_err());
    }
}
