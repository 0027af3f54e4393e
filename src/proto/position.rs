//! Position tokens: where an SSE stream or a long-poll client is in every channel, as one
//! string (`Last-Event-ID`, `?since=`, a poll answer's `position`).
//!
//! Two forms, both accepted wherever a position is read:
//!
//! - **full**: comma-separated entries `<channel>~<offset>~<epoch>`, e.g.
//!   `news~17~1796390886100725105,room:1~4~1796390886100725106` (a poll answer's
//!   `position`);
//! - **compact** (an SSE event's `id:` once the stream has two channels or more):
//!   `~<R>~<entry>,<entry>...`, each entry
//!   `<tag>.<offset>[.<x>]`, every number lowercase base 36: `tag` is the channel name's
//!   32-bit FNV-1a hash ([`channel_tag`]), `R` a reference epoch and `x` the channel's
//!   epoch XOR `R` (left out when 0). Channel names are not repeated: an entry costs ~10
//!   bytes whatever the name's length, and epochs of one server (consecutive numbers)
//!   cost a character or two after the first. A compact token is read against the
//!   request's channels ([`Position::parse_for`]): an entry whose tag names no requested
//!   channel is ignored, like a full entry for a channel not requested.
//!
//! `~` and `,` never occur in channel names, so a token starting with `~` is compact. The
//! empty string is the empty position. An entry is the `since` of a WebSocket `subscribe`
//! for its channel.

use crate::proto::channel::{is_valid_channel, CHANNEL_RULE};
use crate::proto::recovery::Since;
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
        if token.starts_with('~') {
            return Err("a compact position is read against the request's channels".into());
        }
        Position::parse_full(token)
    }

    /// Parses a token of either form for a request naming `channels` (a compact token's
    /// entries are found by their channel's tag among them).
    ///
    /// # Errors
    /// The reason the token is malformed (for a `400`).
    pub fn parse_for(token: &str, channels: &[String]) -> Result<Position, String> {
        match token.strip_prefix('~') {
            Some(compact) => Position::parse_compact(compact, channels),
            None => Position::parse_full(token),
        }
    }

    fn parse_compact(token: &str, channels: &[String]) -> Result<Position, String> {
        let (reference, body) = token
            .split_once('~')
            .ok_or_else(|| "malformed compact position: expected ~<epoch>~<entries>".to_string())?;
        let reference = base36(reference, "epoch")?;
        let mut position = Position::default();
        for entry in body.split(',') {
            let mut parts = entry.split('.');
            let (Some(tag), Some(offset), x, None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "malformed compact position entry {entry:?}: expected <tag>.<offset>[.<epoch>]"
                ));
            };
            let tag = base36(tag, "channel tag")?;
            let since = Since {
                offset: base36(offset, "offset")?,
                epoch: reference ^ x.map_or(Ok(0), |x| base36(x, "epoch"))?,
            };
            let mut named = channels.iter().filter(|c| u64::from(channel_tag(c)) == tag);
            let Some(channel) = named.next() else {
                // Not requested (this time): ignored, as a full entry would be.
                continue;
            };
            if let Some(other) = named.next() {
                return Err(format!(
                    "compact position entry {entry:?} fits channels {channel:?} and {other:?}: \
                     resume with a full position"
                ));
            }
            if position.get(channel).is_some() {
                return Err(format!("channel {channel:?} named twice in position"));
            }
            position.entries.push((channel.clone(), since));
        }
        Ok(position)
    }

    fn parse_full(token: &str) -> Result<Position, String> {
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

    /// Renders the token an SSE event's `id:` carries: the full token for one channel
    /// (as short, and what clients of one channel have always seen), else the compact one
    /// (also the full one when two of its channels share a tag, which a reader could not
    /// tell apart).
    pub fn encode_id(&self) -> String {
        if self.entries.len() <= 1 {
            return self.encode();
        }
        self.encode_compact()
    }

    /// Renders the compact token (the full one when two of its channels share a tag,
    /// which a reader could not tell apart).
    pub fn encode_compact(&self) -> String {
        let Some((_, first)) = self.entries.first() else {
            return String::new();
        };
        let tags: Vec<u32> = self.entries.iter().map(|(c, _)| channel_tag(c)).collect();
        if tags.iter().enumerate().any(|(i, t)| tags[..i].contains(t)) {
            return self.encode();
        }
        let reference = first.epoch;
        let mut out = String::with_capacity(16 + self.entries.len() * 12);
        out.push('~');
        push_base36(&mut out, reference);
        out.push('~');
        for (i, ((_, since), tag)) in self.entries.iter().zip(tags).enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_base36(&mut out, u64::from(tag));
            out.push('.');
            push_base36(&mut out, since.offset);
            let x = since.epoch ^ reference;
            if x != 0 {
                out.push('.');
                push_base36(&mut out, x);
            }
        }
        out
    }

    /// Renders the full token.
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

/// The tag that stands for a channel in a compact token: the 32-bit FNV-1a hash of its
/// name (a fixed function: tokens stay valid across versions and nodes).
pub fn channel_tag(channel: &str) -> u32 {
    channel.bytes().fold(0x811c_9dc5u32, |hash, b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

const DIGITS36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Appends `n` in lowercase base 36.
fn push_base36(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 13];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = DIGITS36[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// A lowercase base-36 number of a compact token.
fn base36(text: &str, what: &str) -> Result<u64, String> {
    let valid = !text.is_empty()
        && text.len() <= 13
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    valid
        .then(|| u64::from_str_radix(text, 36).ok())
        .flatten()
        .ok_or_else(|| format!("malformed {what} {text:?} in compact position"))
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
            ("~1~2", "read against the request's channels"),
            ("a~1~2,~1~2", "invalid channel name"),
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

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_compact_form_names_channels_by_tag_and_epochs_by_difference() {
        let full = "news~17~1796390886100725105,room:1~4~1796390886100725106";
        let p = Position::parse(full).unwrap();
        let compact = p.encode_compact();
        let tag = |c: &str| {
            let mut s = String::new();
            push_base36(&mut s, u64::from(channel_tag(c)));
            s
        };
        assert_eq!(
            compact,
            format!("~dnbzf8cy5rox~{}.h,{}.4.3", tag("news"), tag("room:1"))
        );
        let channels = names(&["room:1", "other", "news"]);
        assert_eq!(Position::parse_for(&compact, &channels), Ok(p.clone()));
        // The full form is still read, and a channel not requested is left out.
        assert_eq!(Position::parse_for(full, &channels), Ok(p));
        let only_news = Position::parse_for(&compact, &names(&["news"])).unwrap();
        assert_eq!(only_news.encode(), "news~17~1796390886100725105");
        assert_eq!(Position::default().encode_compact(), "");
        assert_eq!(Position::parse_for("", &channels), Ok(Position::default()));
        // An SSE id: full for one channel, compact for more.
        assert_eq!(only_news.encode_id(), only_news.encode());
        assert_eq!(Position::parse(full).unwrap().encode_id(), compact);
        // Without the request's channels a compact token means nothing.
        assert!(Position::parse(&compact).is_err());
    }

    #[test]
    fn malformed_compact_tokens_say_why() {
        let channels = names(&["a", "b"]);
        let a = channel_tag("a");
        for (bad, why) in [
            ("~".to_string(), "expected ~<epoch>~<entries>"),
            ("~1".to_string(), "expected ~<epoch>~<entries>"),
            ("~1~".to_string(), "expected <tag>.<offset>"),
            (format!("~1~{a}"), "expected <tag>.<offset>"),
            ("~1~zz.1.2.3".to_string(), "expected <tag>.<offset>"),
            ("~X~1.1".to_string(), "malformed epoch"),
            ("~1~1.-1".to_string(), "malformed offset"),
            ("~1~1.1.zzzzzzzzzzzzzz".to_string(), "malformed epoch"),
            ("~1~1.1.zzzzzzzzzzzzz".to_string(), "malformed epoch"),
        ] {
            let err = Position::parse_for(&bad, &channels).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let mut twice = String::from("~1~");
        push_base36(&mut twice, u64::from(a));
        let entry = twice[3..].to_string();
        twice = format!("{twice}.1,{entry}.2");
        assert!(Position::parse_for(&twice, &channels)
            .unwrap_err()
            .contains("named twice"));
    }

    #[test]
    fn a_tag_shared_by_two_channels_falls_back_to_the_full_form() {
        // Found by search: two valid names with one FNV-1a hash.
        let (x, y) = colliding_names();
        let mut p = Position::default();
        p.set(
            &x,
            Since {
                offset: 1,
                epoch: 5,
            },
        );
        p.set(
            &y,
            Since {
                offset: 2,
                epoch: 5,
            },
        );
        assert_eq!(p.encode_compact(), p.encode());
        // A reader whose request names both cannot tell which one an entry means.
        let mut one = Position::default();
        one.set(
            &x,
            Since {
                offset: 1,
                epoch: 5,
            },
        );
        let err = Position::parse_for(&one.encode_compact(), &[x.clone(), y.clone()]).unwrap_err();
        assert!(err.contains("resume with a full position"), "{err}");
    }

    /// Two channel names with the same tag.
    fn colliding_names() -> (String, String) {
        let mut seen = std::collections::HashMap::new();
        for i in 0u64.. {
            let name = format!("c{i:x}");
            if let Some(other) = seen.insert(channel_tag(&name), name.clone()) {
                return (other, name);
            }
        }
        unreachable!()
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,120}") {
            if let Ok(p) = Position::parse(&text) {
                prop_assert_eq!(Position::parse(&p.encode()), Ok(p));
            }
            let channels = names(&["a", "b"]);
            let compact = text.starts_with('~');
            if let Ok(p) = Position::parse_for(&text, &channels).map_err(|_| ()).and_then(|p| compact.then_some(p).ok_or(())) {
                prop_assert_eq!(Position::parse_for(&p.encode_compact(), &channels), Ok(p));
            }
        }

        #[test]
        fn compact_encode_then_parse_round_trips(
            entries in proptest::collection::btree_map("[a-z][a-z0-9:._-]{0,20}", (any::<u64>(), any::<u64>()), 0..8)
        ) {
            let mut p = Position::default();
            for (channel, (offset, epoch)) in &entries {
                p.set(channel, Since { offset: *offset, epoch: *epoch });
            }
            let channels: Vec<String> = entries.keys().cloned().collect();
            prop_assert_eq!(Position::parse_for(&p.encode_compact(), &channels), Ok(p));
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
