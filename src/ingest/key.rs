//! The shared ingest key (`ingest_key`): what a TCP publisher's first line and an HTTP
//! publisher's `Authorization` header must carry when it is set. Pure parsing and a
//! constant-time comparison; the listeners decide what to do with the answer (and when
//! to stop waiting for it: `ingest_auth_timeout`).
//!
//! UDP takes no key: with no handshake, the key would travel in every datagram, readable
//! by anyone who can see one and replayable as is. UDP ingest stays limited to loopback
//! and `ingest_allow` networks.

use subtle::ConstantTimeEq;

/// Shortest key accepted: 128 bits of hex or base64 are 22-32 characters.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted (it travels in one line or header).
pub const MAX_KEY_LEN: usize = 256;

/// A configured ingest key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct IngestKey(Box<[u8]>);

impl std::fmt::Debug for IngestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IngestKey(<redacted>)")
    }
}

impl IngestKey {
    /// Checks a configured key: 16-256 bytes of visible ASCII (no spaces or control
    /// characters, so it fits a line and a header as is).
    ///
    /// # Errors
    /// Why the key is refused (without the key).
    pub fn new(key: &str) -> Result<IngestKey, String> {
        if key.len() < MIN_KEY_LEN || key.len() > MAX_KEY_LEN {
            return Err(format!(
                "must be {MIN_KEY_LEN}-{MAX_KEY_LEN} bytes, got {}",
                key.len()
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII without spaces".into());
        }
        Ok(IngestKey(key.as_bytes().into()))
    }

    /// Whether `candidate` is the key, in time that does not depend on where they differ
    /// (only on the candidate's length, which tells an attacker nothing about the key's
    /// bytes).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        bool::from(self.0.as_ref().ct_eq(candidate))
    }
}

/// The key of a TCP ingest `AUTH <key>` line (newline already stripped); `None` when the
/// line is not one.
pub fn auth_line(line: &[u8]) -> Option<&[u8]> {
    line.strip_prefix(b"AUTH ")
}

/// Most bytes a TCP ingest connection may send before its `AUTH` line is whole: the
/// longest `AUTH <key>\r\n` is 263 bytes, the rest leaves room for blank lines before
/// it. Nothing more is read, so an unauthorized peer holds at most this much.
pub const PRE_AUTH_LIMIT: usize = 512;

/// What the bytes a TCP publisher sent before its `AUTH` line say (sans-io).
#[derive(Debug, PartialEq, Eq)]
pub enum AuthCheck {
    /// No whole non-empty line yet, and room for one: read more (nothing consumed).
    NeedMore,
    /// The first non-empty line is `AUTH <key>` with the right key; the line and any
    /// blank lines before it are the first `consumed` bytes.
    Authorized {
        /// Bytes of `buf` that were the key line (and blank lines before it).
        consumed: usize,
    },
    /// The first non-empty line is not the key (another key, a message), or
    /// [`PRE_AUTH_LIMIT`] bytes came without one.
    Refused,
}

/// Checks what a TCP publisher sent first (`buf`, all of it since accept) against `key`.
/// Blank lines before the `AUTH` line are skipped.
pub fn check_auth(buf: &[u8], key: &IngestKey) -> AuthCheck {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let end = start + nl + 1;
        let line = crate::ingest::line::strip_newline(&buf[start..end]);
        start = end;
        if line.is_empty() {
            continue;
        }
        return match auth_line(line) {
            Some(given) if key.matches(given) => AuthCheck::Authorized { consumed: end },
            _ => AuthCheck::Refused,
        };
    }
    if buf.len() >= PRE_AUTH_LIMIT {
        return AuthCheck::Refused;
    }
    AuthCheck::NeedMore
}

/// The token of an `Authorization: Bearer <token>` header value (scheme
/// case-insensitive, RFC 9110 11.1); `None` for any other scheme.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "0123456789abcdef-key";

    #[test]
    fn keys_are_checked_and_compared() {
        let key = IngestKey::new(KEY).unwrap();
        assert!(key.matches(KEY.as_bytes()));
        assert!(!key.matches(b"0123456789abcdef-kez"));
        assert!(!key.matches(b""));
        assert!(!key.matches(&KEY.as_bytes()[..KEY.len() - 1]));
        assert!(IngestKey::new("short").is_err());
        assert!(IngestKey::new("has a space in the middle").is_err());
        assert!(IngestKey::new(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(!format!("{key:?}").contains(KEY));
    }

    #[test]
    fn auth_lines_and_bearer_headers_are_parsed() {
        assert_eq!(auth_line(b"AUTH abc"), Some(&b"abc"[..]));
        assert_eq!(auth_line(b"auth abc"), None);
        assert_eq!(auth_line(b"news {}"), None);
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn the_first_line_decides_and_nothing_past_the_limit_is_needed() {
        let key = IngestKey::new(KEY).unwrap();
        let right = format!("AUTH {KEY}\n");
        assert_eq!(check_auth(b"", &key), AuthCheck::NeedMore);
        assert_eq!(check_auth(b"AUTH 0123", &key), AuthCheck::NeedMore);
        assert_eq!(
            check_auth(right.as_bytes(), &key),
            AuthCheck::Authorized {
                consumed: right.len()
            }
        );
        let blank_then_crlf = format!("\n\r\nAUTH {KEY}\r\nnews {{}}\n");
        assert_eq!(
            check_auth(blank_then_crlf.as_bytes(), &key),
            AuthCheck::Authorized {
                consumed: 3 + right.len() + 1
            }
        );
        assert_eq!(check_auth(b"news {}\n", &key), AuthCheck::Refused);
        assert_eq!(check_auth(b"AUTH wrong-key\n", &key), AuthCheck::Refused);
        // 65,000 bytes without a newline: refused once the limit is reached, never more
        // is read.
        let flood = vec![b'x'; PRE_AUTH_LIMIT];
        assert_eq!(
            check_auth(&flood[..PRE_AUTH_LIMIT - 1], &key),
            AuthCheck::NeedMore
        );
        assert_eq!(check_auth(&flood, &key), AuthCheck::Refused);
        let longest = format!("AUTH {}\r\n", "k".repeat(MAX_KEY_LEN));
        assert!(longest.len() < PRE_AUTH_LIMIT, "the longest AUTH line fits");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let key = IngestKey::new(KEY).unwrap();
            let _ = key.matches(&data);
            if let Some(k) = auth_line(&data) {
                prop_assert!(k.len() + 5 == data.len());
            }
            if let Some(t) = bearer(&data) {
                prop_assert!(t.len() + 7 <= data.len());
            }
            match check_auth(&data, &key) {
                AuthCheck::Authorized { consumed } => prop_assert!(consumed <= data.len()),
                AuthCheck::NeedMore => prop_assert!(data.len() < PRE_AUTH_LIMIT),
                AuthCheck::Refused => {}
            }
            if let Ok(s) = std::str::from_utf8(&data) {
                if let Ok(k) = IngestKey::new(s) {
                    prop_assert!(k.matches(s.as_bytes()));
                }
            }
        }
    }
}
