//! Channel names: what a valid one looks like.

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// The rule, as shown to clients in error messages.
pub const CHANNEL_RULE: &str = "must be 1-128 bytes of [A-Za-z0-9_.:@/=+-]";

/// Returns true when `name` is a valid channel name.
///
/// The alphabet is small on purpose: names are embedded into message frames without JSON
/// escaping and appear as metric-free log fields, so nothing in them may need quoting.
pub fn is_valid_channel(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'=' | b'+' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_namespaced_names() {
        assert!(is_valid_channel(b"news"));
        assert!(is_valid_channel(b"room:42"));
        assert!(is_valid_channel(b"user:alice@example.com"));
    }

    #[test]
    fn rejects_empty_long_and_quoted() {
        assert!(!is_valid_channel(b""));
        assert!(!is_valid_channel(&[b'a'; MAX_CHANNEL_LEN + 1]));
        assert!(!is_valid_channel(b"a\"b"));
        assert!(!is_valid_channel(b"a b"));
        assert!(!is_valid_channel(b"a\\b"));
    }
}
