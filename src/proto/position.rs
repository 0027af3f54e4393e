//! Position tokens: where an SSE stream or a long-poll client is in every channel, as one
//! string (`Last-Event-ID`, `?since=`, a poll answer's `position`).
//!
//! The form is comma-separated entries `<channel>~<offset>~<epoch>`, e.g.
//! `news~17~1796390886100725105,room:1~4~1796390886100725106`; `~` and `,` never occur
//! in channel names. The empty string is the empty position. An entry is the `since` of a
//! WebSocket `subscribe` for its channel.

use crate::fanout::history::Since;
use crate::proto::channel::{is_valid_channel, CHANNEL_RULE};
use std::fmt::Write;

/// A parsed position token: one entry per channel, in token order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    entries: Vec<(String, Since)>,
}

impl Position {
    /// Parses a token.
    ///
    /// # Errors
    /// The reason the token is malformed (for a `400`).
    pub fn parse(token: &str) -> Result<Position, String> {
        let mut entries: Vec<(String, Since)> = Vec::new();
        if token.is_empty() {
            return Ok(Position { entries });
        }
        for entry in token.split(',') {
            let mut parts = entry.split('~');
            let (Some(channel), Some(offset), Some(epoch), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "malformed position entry {entry:?}: expected <channel>~<offset>~<epoch>"
                ));
            };
            if !is_valid_channel(channel.as_bytes()) {
                return Err(format!(
                    "invalid channel name {channel:?} in position: {CHANNEL_RULE}"
                ));
            }
            let number = |text: &str, what: &str| {
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "malformed {what} {text:?} in position entry {entry:?}"
                    ));
                }
                text.parse::<u64>()
                    .map_err(|_| format!("{what} {text:?} out of range in position"))
            };
            let since = Since {
                offset: number(offset, "offset")?,
                epoch: number(epoch, "epoch")?,
            };
            if entries.iter().any(|(c, _)| c == channel) {
                return Err(format!("channel {channel:?} named twice in position"));
            }
            entries.push((channel.to_string(), since));
        }
        Ok(Position { entries })
    }

    /// An empty position with room for `channels` entries (an idle SSE connection keeps
    /// its position for as long as it lives: no spare capacity).
    pub fn with_capacity(channels: usize) -> Position {
        Position {
            entries: Vec::with_capacity(channels),
        }
    }

    /// The entry for `channel`, if any.
    pub fn get(&self, channel: &str) -> Option<Since> {
        self.entries
            .iter()
            .find(|(c, _)| c == channel)
            .map(|(_, s)| *s)
    }

    /// The entries, in token order.
    pub fn entries(&self) -> &[(String, Since)] {
        &self.entries
    }

    /// Sets `channel`'s entry (appended when new).
    pub fn set(&mut self, channel: &str, since: Since) {
        match self.entries.iter_mut().find(|(c, _)| c == channel) {
            Some((_, s)) => *s = since,
            None => self.entries.push((channel.to_string(), since)),
        }
    }

    /// Renders the token.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.entries.len() * 32);
        for (i, (channel, since)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{channel}~{}~{}", since.offset, since.epoch);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_documented_example() {
        let token = "news~17~1796390886100725105,room:1~4~1796390886100725106";
        let p = Position::parse(token).unwrap();
        assert_eq!(
            p.get("news"),
            Some(Since {
                offset: 17,
                epoch: 1796390886100725105
            })
        );
        assert_eq!(p.get("room:1").map(|s| s.offset), Some(4));
        assert_eq!(p.get("other"), None);
        assert_eq!(p.encode(), token);
        assert_eq!(Position::parse("").unwrap(), Position::default());
    }

    #[test]
    fn malformed_tokens_say_why() {
        for (bad, why) in [
            ("news", "expected <channel>~<offset>~<epoch>"),
            ("news~1", "expected"),
            ("news~1~2~3", "expected"),
            ("news~x~2", "malformed offset"),
            ("news~1~", "malformed epoch"),
            ("news~-1~2", "malformed offset"),
            ("news~1~99999999999999999999999", "out of range"),
            ("bad name~1~2", "invalid channel name"),
            ("~1~2", "invalid channel name"),
            ("a~1~2,", "expected"),
            ("a~1~2,a~3~4", "named twice"),
        ] {
            let err = Position::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn set_updates_in_place_and_appends() {
        let mut p = Position::parse("a~1~9").unwrap();
        p.set(
            "b",
            Since {
                offset: 2,
                epoch: 8,
            },
        );
        p.set(
            "a",
            Since {
                offset: 5,
                epoch: 9,
            },
        );
        assert_eq!(p.encode(), "a~5~9,b~2~8");
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,120}") {
            if let Ok(p) = Position::parse(&text) {
                prop_assert_eq!(Position::parse(&p.encode()), Ok(p));
            }
        }

        #[test]
        fn encode_then_parse_round_trips(
            entries in proptest::collection::btree_map("[a-z][a-z0-9:._-]{0,20}", (any::<u64>(), any::<u64>()), 0..8)
        ) {
            let mut p = Position::default();
            for (channel, (offset, epoch)) in &entries {
                p.set(channel, Since { offset: *offset, epoch: *epoch });
            }
            prop_assert_eq!(Position::parse(&p.encode()), Ok(p));
        }
    }
}
