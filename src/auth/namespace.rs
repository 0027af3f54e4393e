//! Namespace rules: per-prefix policy for channels (`news:eu` is in namespace `news`).
//!
//! `[namespaces.NAME]` tables in the config file set the rules for channels `NAME:...`;
//! `[channel_defaults]` sets the rules for every other channel (no `:`, or a prefix with no
//! table), and each namespace table inherits from it the keys it leaves out. Without any
//! of these tables every channel gets [`NamespaceRules::default`], which is how ringcast
//! behaved before namespaces: anyone may subscribe, nobody publishes from a client.
//!
//! `anonymous` and `allow_publish` are enforced by [`crate::auth::permission`]; `presence`,
//! `join_leave`, `history_size` and `history_ttl` are read through
//! [`Namespaces::rules_for`] by presence ([`crate::presence`]) and history.

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Largest `history_size` accepted (messages per channel).
pub const MAX_HISTORY_SIZE: u64 = 1_000_000;

/// Largest `history_ttl` accepted, in seconds (30 days).
pub const MAX_HISTORY_TTL: u64 = 30 * 24 * 3600;

/// One `[namespaces.NAME]` or `[channel_defaults]` table as written; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceTable {
    /// Anonymous connections may subscribe (and publish, with `allow_publish`). Default: true.
    pub anonymous: Option<bool>,
    /// Clients may publish with `{"cmd":"publish"}` where their token grants the channel.
    /// Default: false.
    pub allow_publish: Option<bool>,
    /// Presence (who is subscribed) is kept. Default: false.
    pub presence: Option<bool>,
    /// Join/leave events are sent to subscribers; needs `presence`. Default: false.
    pub join_leave: Option<bool>,
    /// Messages kept per channel for recovery; 0 keeps none. Default: the top-level
    /// `history_size`.
    pub history_size: Option<u64>,
    /// Seconds a message stays in history; 0 means until pushed out by size. Default: the
    /// top-level `history_ttl`.
    pub history_ttl: Option<u64>,
}

impl NamespaceTable {
    /// This table's keys, with `other`'s where this one leaves them out.
    pub fn or(&self, other: &NamespaceTable) -> NamespaceTable {
        NamespaceTable {
            anonymous: self.anonymous.or(other.anonymous),
            allow_publish: self.allow_publish.or(other.allow_publish),
            presence: self.presence.or(other.presence),
            join_leave: self.join_leave.or(other.join_leave),
            history_size: self.history_size.or(other.history_size),
            history_ttl: self.history_ttl.or(other.history_ttl),
        }
    }
}

/// The checked rules of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRules {
    /// Anonymous connections may use the namespace's channels.
    pub anonymous: bool,
    /// Clients may publish to the namespace's channels.
    pub allow_publish: bool,
    /// Presence is kept for the namespace's channels.
    pub presence: bool,
    /// Join/leave events go to subscribers.
    pub join_leave: bool,
    /// Messages of history per channel (0: none).
    pub history_size: usize,
    /// How long a message stays in history; `None`: until pushed out by size.
    pub history_ttl: Option<Duration>,
}

impl Default for NamespaceRules {
    fn default() -> Self {
        NamespaceRules {
            anonymous: true,
            allow_publish: false,
            presence: false,
            join_leave: false,
            history_size: 0,
            history_ttl: None,
        }
    }
}

/// A namespace key with a bad value: the full key (`namespaces.news.history_size`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceError {
    /// The TOML key at fault.
    pub key: String,
    /// Why.
    pub message: String,
}

/// The rules of every configured namespace plus the default.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    default: NamespaceRules,
    by_name: HashMap<Box<str>, NamespaceRules>,
}

impl Namespaces {
    /// Checks `[channel_defaults]` and every `[namespaces.NAME]` table.
    ///
    /// # Errors
    /// The first key with a bad value.
    /// `builtin` holds the top-level keys that stand behind both (`history_size`,
    /// `history_ttl`).
    pub fn resolve(
        builtin: &NamespaceTable,
        defaults: Option<&NamespaceTable>,
        tables: Option<&BTreeMap<String, NamespaceTable>>,
    ) -> Result<Namespaces, NamespaceError> {
        let base = NamespaceTable::default();
        let default = rules("channel_defaults", defaults.unwrap_or(&base), builtin)?;
        let defaults = defaults.unwrap_or(&base).or(builtin);
        let defaults = &defaults;
        let mut by_name = HashMap::new();
        for (name, table) in tables.into_iter().flatten() {
            let prefix = format!("namespaces.{name}");
            if !is_valid_namespace(name) {
                return Err(NamespaceError {
                    key: prefix,
                    message: "a namespace name is 1-64 bytes of [A-Za-z0-9_.@/=+-] (no `:`): \
                              the part of a channel name before its first `:`"
                        .into(),
                });
            }
            by_name.insert(name.as_str().into(), rules(&prefix, table, defaults)?);
        }
        Ok(Namespaces { default, by_name })
    }

    /// The rules for `channel`: its namespace's, else the default.
    pub fn rules_for(&self, channel: &str) -> &NamespaceRules {
        namespace_of(channel)
            .and_then(|ns| self.by_name.get(ns))
            .unwrap_or(&self.default)
    }

    /// The largest history size of any namespace (and the default): the cluster stream
    /// keeps that many messages per channel.
    pub fn max_history_size(&self) -> usize {
        self.by_name
            .values()
            .map(|r| r.history_size)
            .fold(self.default.history_size, usize::max)
    }

    /// The rules for channels outside any configured namespace.
    pub fn default_rules(&self) -> &NamespaceRules {
        &self.default
    }

    /// The configured namespaces' names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(|n| &**n).collect();
        names.sort_unstable();
        names
    }
}

/// The namespace of `channel`: the part before its first `:`, if any.
pub fn namespace_of(channel: &str) -> Option<&str> {
    channel.split_once(':').map(|(ns, _)| ns)
}

fn is_valid_namespace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'/' | b'=' | b'+' | b'-')
        })
}

/// `table` over `inherit` over the built-in defaults, checked; `prefix` names the table.
fn rules(
    prefix: &str,
    table: &NamespaceTable,
    inherit: &NamespaceTable,
) -> Result<NamespaceRules, NamespaceError> {
    let base = NamespaceRules::default();
    let err = |key: &str, message: String| NamespaceError {
        key: format!("{prefix}.{key}"),
        message,
    };
    let pick_bool =
        |own: Option<bool>, up: Option<bool>, default: bool| own.or(up).unwrap_or(default);
    let history_size = table.history_size.or(inherit.history_size).unwrap_or(0);
    if history_size > MAX_HISTORY_SIZE {
        return Err(err(
            "history_size",
            format!("must be between 0 and {MAX_HISTORY_SIZE}, got {history_size}"),
        ));
    }
    let history_ttl = table.history_ttl.or(inherit.history_ttl).unwrap_or(0);
    if history_ttl > MAX_HISTORY_TTL {
        return Err(err(
            "history_ttl",
            format!("must be between 0 and {MAX_HISTORY_TTL} seconds, got {history_ttl}"),
        ));
    }
    // Only a TTL this table sets itself: an inherited one may meet a size of 0 here.
    if table.history_ttl.is_some_and(|t| t > 0) && history_size == 0 {
        return Err(err(
            "history_ttl",
            "needs history_size > 0: a TTL on an empty history keeps nothing".into(),
        ));
    }
    let presence = pick_bool(table.presence, inherit.presence, base.presence);
    let join_leave = pick_bool(table.join_leave, inherit.join_leave, base.join_leave);
    if join_leave && !presence {
        return Err(err(
            "join_leave",
            "needs presence = true: join/leave events come from presence".into(),
        ));
    }
    Ok(NamespaceRules {
        anonymous: pick_bool(table.anonymous, inherit.anonymous, base.anonymous),
        allow_publish: pick_bool(
            table.allow_publish,
            inherit.allow_publish,
            base.allow_publish,
        ),
        presence,
        join_leave,
        // Bounded by MAX_HISTORY_SIZE above.
        history_size: history_size as usize,
        history_ttl: (history_ttl > 0).then(|| Duration::from_secs(history_ttl)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Namespaces, NamespaceError> {
        #[derive(Deserialize)]
        struct File {
            channel_defaults: Option<NamespaceTable>,
            namespaces: Option<BTreeMap<String, NamespaceTable>>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        Namespaces::resolve(
            &NamespaceTable::default(),
            file.channel_defaults.as_ref(),
            file.namespaces.as_ref(),
        )
    }

    #[test]
    fn no_tables_means_the_old_behaviour() {
        let ns = parse("").unwrap();
        assert_eq!(ns.rules_for("news:eu"), &NamespaceRules::default());
        assert!(ns.rules_for("x").anonymous);
        assert!(!ns.rules_for("x").allow_publish);
    }

    #[test]
    fn channels_find_their_namespace_and_inherit_the_defaults() {
        let ns = parse(
            "[channel_defaults]\nhistory_size = 10\n\
             [namespaces.news]\nanonymous = false\nallow_publish = true\nhistory_ttl = 60\n\
             [namespaces.chat]\npresence = true\njoin_leave = true\nhistory_size = 0\n",
        )
        .unwrap();
        let news = ns.rules_for("news:eu:sport");
        assert!(!news.anonymous && news.allow_publish);
        assert_eq!(news.history_size, 10);
        assert_eq!(news.history_ttl, Some(Duration::from_secs(60)));
        let chat = ns.rules_for("chat:1");
        assert!(chat.presence && chat.join_leave && chat.anonymous);
        assert_eq!(chat.history_size, 0);
        // No `:`, or a prefix without a table: the defaults.
        assert_eq!(ns.rules_for("news"), ns.default_rules());
        assert_eq!(ns.rules_for("room:1").history_size, 10);
    }

    #[test]
    fn bad_values_name_the_full_key() {
        for (text, key) in [
            (
                "[namespaces.news]\nhistory_size = 2000000",
                "namespaces.news.history_size",
            ),
            (
                "[namespaces.news]\nhistory_ttl = 9",
                "namespaces.news.history_ttl",
            ),
            (
                "[namespaces.a]\njoin_leave = true",
                "namespaces.a.join_leave",
            ),
            ("[namespaces.\"a:b\"]\npresence = true", "namespaces.a:b"),
            (
                "[channel_defaults]\nhistory_ttl = 99999999",
                "channel_defaults.history_ttl",
            ),
        ] {
            assert_eq!(parse(text).unwrap_err().key, key, "{text}");
        }
    }
}
