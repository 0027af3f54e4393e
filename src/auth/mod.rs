//! Identity and permissions: who a connection is, and what it may subscribe and publish.
//!
//! Sans-io like [`crate::proto`]: nothing here reads a socket or a clock (callers pass the
//! Unix time in), except the [`registry`], which is a shared data structure like the
//! fan-out ring.
//!
//! - [`token`] verifies a JWT (HS256/384/512 with a secret; RS256, ES256, EdDSA with a PEM
//!   public key) and extracts `sub`, `exp` and the channel grants.
//! - [`glob`] matches channel names against the grants' patterns (`news:*`).
//! - [`namespace`] holds the `[namespaces.NAME]` rules, looked up per channel.
//! - [`permission`] decides subscribe/publish for an identity (or none) on a channel.
//! - [`session`] is what an authenticated connection carries (compact, interned).
//! - [`registry`] maps users to their connections on every shard (sharded-slab).
//!
//! [`AuthSettings::admit`] is the upgrade's decision: which identity, or which 401.

pub mod glob;
pub mod namespace;
pub mod permission;
pub mod registry;
pub mod session;
pub mod token;

use std::path::PathBuf;
use std::sync::Arc;
use token::{AuthError, Claims, Verifier};

/// How connections authenticate (validated from the `jwt_*` and `allow_anonymous` keys).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The token verifier; `None`: authentication is off, every connection is anonymous
    /// and tokens are ignored.
    pub verifier: Option<Arc<Verifier>>,
    /// `jwt_public_key_file`, when the verifier's key came from one.
    pub public_key_file: Option<PathBuf>,
    /// Whether a connection without a token is accepted (as anonymous).
    pub allow_anonymous: bool,
    /// Cookie the upgrade may carry the token in; `None`: cookies are not read.
    pub cookie: Option<String>,
    /// Connections with a token are subscribed to their `user:<sub>` channel at connect.
    pub subscribe_user_channel: bool,
}

impl Default for AuthSettings {
    /// Authentication off: everyone is anonymous, as before identity existed.
    fn default() -> Self {
        AuthSettings {
            verifier: None,
            public_key_file: None,
            allow_anonymous: true,
            cookie: None,
            subscribe_user_channel: false,
        }
    }
}

impl AuthSettings {
    /// True when tokens are verified.
    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// The upgrade's decision at Unix time `now`: the token's claims, `None` for an
    /// anonymous connection, or why the upgrade gets 401.
    ///
    /// # Errors
    /// The [`AuthError`] for the 401 body.
    pub fn admit(&self, token: Option<&str>, now: u64) -> Result<Option<Claims>, AuthError> {
        match (&self.verifier, token) {
            (None, _) => Ok(None),
            (Some(v), Some(token)) => v.verify(token, now).map(Some),
            (Some(_), None) if self.allow_anonymous => Ok(None),
            (Some(_), None) => Err(AuthError::Missing {
                cookie: self
                    .cookie
                    .as_ref()
                    .map(|c| format!(", or the {c} cookie"))
                    .unwrap_or_default(),
            }),
        }
    }
}
