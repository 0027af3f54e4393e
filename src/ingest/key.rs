//! The shared ingest key (`ingest_key`): what a TCP publisher's first line and an HTTP
//! publisher's `Authorization` header must carry when it is set. Pure parsing and a
//! constant-time comparison; the listeners decide what to do with the answer.
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
            if let Ok(s) = std::str::from_utf8(&data) {
                if let Ok(k) = IngestKey::new(s) {
                    prop_assert!(k.matches(s.as_bytes()));
                }
            }
        }
    }
}
