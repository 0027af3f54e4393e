//! The ingest message format, `<channel> <payload>`, shared by UDP, TCP and HTTP.

use crate::proto::channel::is_valid_channel;
use thiserror::Error;

/// Why an ingest message was rejected. Each maps to a metric label and a reply text.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IngestError {
    /// No space between channel and payload.
    #[error("expected `<channel> <payload>`: no space after the channel")]
    NoSeparator,
    /// The channel name breaks the naming rule.
    #[error("invalid channel name: must be 1-128 bytes of [A-Za-z0-9_.:@/=+-]")]
    InvalidChannel,
    /// Nothing after the channel.
    #[error("empty payload")]
    EmptyPayload,
    /// Payload over `max_message_size`.
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload is not UTF-8: every transport carries it in a text frame or an SSE
    /// event, where invalid UTF-8 makes strict clients drop the connection (1007), and
    /// changing the bytes would alter the message without a word.
    #[error("payload is not valid UTF-8 at byte {offset}")]
    InvalidUtf8 {
        /// Offset in the payload of the first byte that is not UTF-8.
        offset: usize,
    },
}

impl IngestError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            IngestError::NoSeparator => "no_separator",
            IngestError::InvalidChannel => "invalid_channel",
            IngestError::EmptyPayload => "empty_payload",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::InvalidUtf8 { .. } => "invalid_utf8",
        }
    }

    /// Every label, for metrics rendering.
    pub const LABELS: [&'static str; 5] = [
        "no_separator",
        "invalid_channel",
        "empty_payload",
        "too_large",
        "invalid_utf8",
    ];

    /// Index of this error's label in [`IngestError::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            IngestError::NoSeparator => 0,
            IngestError::InvalidChannel => 1,
            IngestError::EmptyPayload => 2,
            IngestError::TooLarge { .. } => 3,
            IngestError::InvalidUtf8 { .. } => 4,
        }
    }
}

/// Splits one message into `(channel, payload)`, validating both.
///
/// # Errors
/// The [`IngestError`] describing what is wrong.
pub fn parse_message(msg: &[u8], max_payload: usize) -> Result<(&str, &[u8]), IngestError> {
    let space = msg
        .iter()
        .position(|&b| b == b' ')
        .ok_or(IngestError::NoSeparator)?;
    let (channel, payload) = (&msg[..space], &msg[space + 1..]);
    if !is_valid_channel(channel) {
        return Err(IngestError::InvalidChannel);
    }
    validate_payload(payload, max_payload)?;
    // is_valid_channel admits ASCII only.
    let channel = std::str::from_utf8(channel).map_err(|_| IngestError::InvalidChannel)?;
    Ok((channel, payload))
}

/// Checks a payload's size bounds and that it is UTF-8.
///
/// # Errors
/// [`IngestError::EmptyPayload`], [`IngestError::TooLarge`] or
/// [`IngestError::InvalidUtf8`].
pub fn validate_payload(payload: &[u8], max_payload: usize) -> Result<(), IngestError> {
    if payload.is_empty() {
        return Err(IngestError::EmptyPayload);
    }
    if payload.len() > max_payload {
        return Err(IngestError::TooLarge {
            size: payload.len(),
            limit: max_payload,
        });
    }
    std::str::from_utf8(payload).map_err(|e| IngestError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    Ok(())
}

/// Strips one trailing `\n` or `\r\n`.
pub fn strip_newline(msg: &[u8]) -> &[u8] {
    let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
    msg.strip_suffix(b"\r").unwrap_or(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_channel_and_payload() {
        assert_eq!(
            parse_message(b"news {\"a\":1}", 100),
            Ok(("news", &b"{\"a\":1}"[..]))
        );
        assert_eq!(
            parse_message(b"c  two spaces", 100),
            Ok(("c", &b" two spaces"[..]))
        );
        assert_eq!(strip_newline(b"a b\r\n"), b"a b");
        assert_eq!(strip_newline(b"a b\n"), b"a b");
    }

    #[test]
    fn malformed_messages_are_named() {
        assert_eq!(
            parse_message(b"nospace", 100),
            Err(IngestError::NoSeparator)
        );
        assert_eq!(
            parse_message(b" payload", 100),
            Err(IngestError::InvalidChannel)
        );
        assert_eq!(
            parse_message(b"bad\"ch x", 100),
            Err(IngestError::InvalidChannel)
        );
        assert_eq!(parse_message(b"ch ", 100), Err(IngestError::EmptyPayload));
        assert_eq!(
            parse_message(b"ch 12345", 4),
            Err(IngestError::TooLarge { size: 5, limit: 4 })
        );
        for e in [
            IngestError::NoSeparator,
            IngestError::InvalidChannel,
            IngestError::EmptyPayload,
            IngestError::TooLarge { size: 5, limit: 4 },
            IngestError::InvalidUtf8 { offset: 0 },
        ] {
            assert_eq!(IngestError::LABELS[e.index()], e.label());
        }
    }

    /// Regression: JSON whose strings hold invalid UTF-8 passed as valid JSON and went out
    /// byte for byte in text frames, closing every strict client with 1007 (and again on
    /// every replay). Lone surrogates and overlong forms are not UTF-8 either.
    #[test]
    fn payloads_that_are_not_utf8_are_refused_with_the_offset() {
        for (payload, offset) in [
            (&b"{\"t\":\"\xc3(\"}"[..], 6),
            (&b"{\"t\":\"\xed\xa0\x80\"}"[..], 6),
            (&b"{\"t\":\"\xc0\xaf\"}"[..], 6),
            (&b"plain \xff text"[..], 6),
            (&b"\xf0\x9f\x98"[..], 0),
        ] {
            let mut line = b"news ".to_vec();
            line.extend_from_slice(payload);
            assert_eq!(
                parse_message(&line, 100),
                Err(IngestError::InvalidUtf8 { offset }),
                "{payload:?}"
            );
        }
        assert!(parse_message("news {\"t\":\"h\u{e9}\u{1f600}\"}".as_bytes(), 100).is_ok());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok((ch, payload)) = parse_message(&data, 100) {
                prop_assert!(is_valid_channel(ch.as_bytes()));
                prop_assert!(!payload.is_empty() && payload.len() <= 100);
                prop_assert!(std::str::from_utf8(payload).is_ok());
            }
        }
    }
}
