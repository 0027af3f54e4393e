//! Channel names as NATS subject tokens, and the ringcast headers on cluster messages.
//! Pure functions (no I/O).
//!
//! A channel name is 1-128 bytes of `[A-Za-z0-9_.:@/=+-]`; a NATS subject token must not
//! contain `.`, `*`, `>` or whitespace, and `:`/`@`/`/`/`+` are best avoided. Encoding:
//! `[A-Za-z0-9_-]` stay as they are, every other byte becomes `=` and two upper-case hex
//! digits (`news:1` → `news=3A1`, `a.b` → `a=2Eb`, `=` → `=3D`). The mapping is one to
//! one, so two channels never share a subject.

/// Encodes `channel` as one subject token.
pub fn encode_channel(channel: &str) -> String {
    let mut out = String::with_capacity(channel.len() + 8);
    for &b in channel.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes a token made by [`encode_channel`]; `None` when it is not one.
pub fn decode_channel(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'=' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            let v = hi << 4 | lo;
            if v.is_ascii_alphanumeric() || v == b'_' || v == b'-' {
                // Not what the encoder writes: one name, one token.
                return None;
            }
            out.push(v);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Header with the channel offset a cluster message has.
pub const OFFSET_HEADER: &str = "Ringcast-Offset";
/// Header with the channel epoch a cluster message belongs to (decimal).
pub const EPOCH_HEADER: &str = "Ringcast-Epoch";
/// Header with the JetStream stream sequence of a live message (decimal).
pub const SEQ_HEADER: &str = "Ringcast-Seq";

/// Parses a decimal header value.
pub fn parse_u64(value: Option<&str>) -> Option<u64> {
    value.and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_map_to_safe_tokens() {
        assert_eq!(encode_channel("news"), "news");
        assert_eq!(encode_channel("news:1"), "news=3A1");
        assert_eq!(encode_channel("a.b*>"), "a=2Eb=2A=3E");
        assert_eq!(encode_channel("x=y"), "x=3Dy");
        assert_eq!(decode_channel("news=3A1").as_deref(), Some("news:1"));
        assert_eq!(decode_channel("a.b"), None);
        assert_eq!(decode_channel("=41"), None, "A is never escaped");
        assert_eq!(decode_channel("=4"), None);
    }

    proptest! {
        #[test]
        fn encoding_round_trips_and_is_subject_safe(name in "[A-Za-z0-9_.:@/=+-]{1,128}") {
            let token = encode_channel(&name);
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'='));
            prop_assert_eq!(decode_channel(&token), Some(name));
        }

        #[test]
        fn arbitrary_tokens_never_panic(token in any::<String>()) {
            if let Some(name) = decode_channel(&token) {
                prop_assert_eq!(encode_channel(&name), token);
            }
        }
    }
}
