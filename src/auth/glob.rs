//! Channel patterns from a token's channels claim: exact names and `*` globs.
//!
//! A pattern uses the channel alphabet plus `*`, which matches any run of characters,
//! `:` included, and may appear anywhere: `news:*` grants `news:eu` and `news:eu:sport`,
//! `*:public` every namespace's `public` channel, `*` everything. Nothing else is special:
//! there is no `?`, no character class and no escaping, so a pattern reads as what it
//! grants.

use crate::proto::channel::MAX_CHANNEL_LEN;

/// A validated channel pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Box<str>);

/// The rule for patterns, as shown in error messages.
pub const PATTERN_RULE: &str =
    "must be 1-128 bytes of [A-Za-z0-9_.:@/=+-] and `*` (any run of characters)";

impl Pattern {
    /// Parses one pattern; `None` when it breaks [`PATTERN_RULE`].
    pub fn parse(text: &str) -> Option<Pattern> {
        let valid = !text.is_empty()
            && text.len() <= MAX_CHANNEL_LEN
            && text.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'_' | b'.' | b':' | b'@' | b'/' | b'=' | b'+' | b'-' | b'*'
                    )
            });
        valid.then(|| Pattern(text.into()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `channel` matches.
    pub fn matches(&self, channel: &str) -> bool {
        glob_match(self.0.as_bytes(), channel.as_bytes())
    }
}

/// Matches `name` against `pattern` where `*` is any run of bytes.
///
/// The classic two-cursor walk: on a mismatch, retry from the last `*` one byte further
/// into the name. Linear in practice and O(pattern × name) at worst (128 × 128 here), so a
/// hostile token cannot make it expensive.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // (position after the last `*`, name position it was tried at)
    let mut retry: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                p += 1;
                retry = Some((p, n));
            }
            Some(&c) if c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match retry {
                Some((after_star, tried)) => {
                    p = after_star;
                    n = tried + 1;
                    retry = Some((after_star, tried + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn exact_names_and_globs() {
        assert!(m("news", "news"));
        assert!(!m("news", "news:eu"));
        assert!(m("news:*", "news:eu"));
        assert!(m("news:*", "news:eu:sport"));
        assert!(m("news:*", "news:"));
        assert!(!m("news:*", "news"));
        assert!(!m("news:*", "newsroom:1"));
        assert!(m("*:public", "room:public"));
        assert!(!m("*:public", "room:public2"));
        assert!(m("*", "anything:at:all"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(!m("a*b*c", "aXbY"));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in ["", "a b", "news:\"x\"", "é", &"a".repeat(129)] {
            assert!(Pattern::parse(bad).is_none(), "{bad:?}");
        }
    }

    /// The obviously right matcher: try every split at each `*`.
    fn naive(pattern: &[u8], name: &[u8]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some((b'*', rest)) => (0..=name.len()).any(|i| naive(rest, &name[i..])),
            Some((c, rest)) => name.first() == Some(c) && naive(rest, &name[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_naive_model(pattern in "[ab:*]{1,10}", name in "[ab:]{0,12}") {
            let p = Pattern::parse(&pattern).unwrap();
            prop_assert_eq!(p.matches(&name), naive(pattern.as_bytes(), name.as_bytes()));
        }
    }
}
