//! A published message rendered into the one frame every subscriber is sent.
//!
//! The shape is `{"channel":"<name>","offset":<n>,"data":<payload>}`: the payload is
//! embedded as-is when it is valid JSON (its line breaks between tokens turned into
//! spaces), otherwise as a JSON string. Rendering happens once
//! per message; the result is refcounted and shared by every subscriber on every shard.

use crate::proto::frame::{header_len, opcode, write_header};
use bytes::Bytes;
use serde::de::IgnoredAny;

/// How a payload goes into the `data` field, decided once per message before the
/// channel's offset is taken (validation can be slow for large payloads).
///
/// The result is always valid UTF-8: every transport carries it in a text frame or an
/// SSE event, and one invalid byte makes a strict client drop the connection (1007),
/// again on every replay. Ingest refuses payloads that are not UTF-8
/// ([`crate::ingest::line::validate_payload`]); bytes that reach this point anyway (a
/// store written by an older version, a foreign publisher on the cluster's subjects) are
/// carried as a string with U+FFFD in place of each bad sequence, and
/// [`EncodedData::replaced_invalid_utf8`] says so, so the change is never silent.
#[derive(Debug, Clone)]
pub struct EncodedData {
    json: Vec<u8>,
    replaced: bool,
}

impl EncodedData {
    /// Classifies `payload`: valid JSON is kept verbatim, anything else becomes a string.
    pub fn new(payload: &[u8]) -> Self {
        let Ok(text) = std::str::from_utf8(payload) else {
            let text = String::from_utf8_lossy(payload);
            return EncodedData {
                // Serializing a str cannot fail.
                json: serde_json::to_vec(&*text).unwrap_or_default(),
                replaced: true,
            };
        };
        // Checked as a str: serde_json's `IgnoredAny` skips string bytes unchecked when
        // reading a byte slice, so invalid UTF-8 inside a JSON string would pass.
        if serde_json::from_str::<IgnoredAny>(text).is_ok() {
            // Valid JSON has raw line breaks only between tokens (inside a string they
            // are invalid), where a space means the same: without them, a message is
            // also one SSE `data:` line (crate::proto::sse).
            let json = payload
                .iter()
                .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
                .collect();
            return EncodedData {
                json,
                replaced: false,
            };
        }
        EncodedData {
            // Serializing a str cannot fail.
            json: serde_json::to_vec(text).unwrap_or_default(),
            replaced: false,
        }
    }

    /// The JSON text for the `data` field.
    pub fn as_bytes(&self) -> &[u8] {
        &self.json
    }

    /// True when the payload was not UTF-8 and its bad sequences were replaced.
    pub fn replaced_invalid_utf8(&self) -> bool {
        self.replaced
    }
}

/// The notice a subscriber gets for messages of `channel` it fell too far behind to
/// receive (no longer in history): `{"type":"gap","channel":"news","from":18,"to":40}`,
/// offsets `from` to `to` inclusive.
pub fn encode_gap(channel: &str, from: u64, to: u64) -> Bytes {
    // Channel names never need escaping (see proto::channel).
    let body = format!(r#"{{"type":"gap","channel":"{channel}","from":{from},"to":{to}}}"#);
    crate::proto::frame::encode_frame(opcode::TEXT, body.as_bytes())
}

/// Renders the complete WebSocket text frame for one message.
pub fn encode_message(channel: &str, offset: u64, data: &EncodedData) -> Bytes {
    let offset_text = offset.to_string();
    let body_len = r#"{"channel":"","offset":,"data":}"#.len()
        + channel.len()
        + offset_text.len()
        + data.json.len();
    let hl = header_len(body_len);
    let mut frame = vec![0u8; hl];
    write_header(&mut frame, opcode::TEXT, body_len);
    frame.reserve_exact(body_len);
    frame.extend_from_slice(br#"{"channel":""#);
    frame.extend_from_slice(channel.as_bytes());
    frame.extend_from_slice(br#"","offset":"#);
    frame.extend_from_slice(offset_text.as_bytes());
    frame.extend_from_slice(br#","data":"#);
    frame.extend_from_slice(&data.json);
    frame.push(b'}');
    debug_assert_eq!(frame.len(), hl + body_len);
    Bytes::from(frame)
}

/// Renders a presence event frame: `{"type":"<kind>","channel":"<name>","member":<json>}`
/// (`kind` is `join` or `leave`; `member_json` is a rendered
/// [`crate::presence::Member`]). Like a message, it is encoded once and shared by every
/// subscriber; unlike one, it has no offset.
pub fn encode_presence_event(kind: &str, channel: &str, member_json: &str) -> Bytes {
    let body_len = r#"{"type":"","channel":"","member":}"#.len()
        + kind.len()
        + channel.len()
        + member_json.len();
    let hl = header_len(body_len);
    let mut frame = vec![0u8; hl];
    write_header(&mut frame, opcode::TEXT, body_len);
    frame.reserve_exact(body_len);
    frame.extend_from_slice(br#"{"type":""#);
    frame.extend_from_slice(kind.as_bytes());
    frame.extend_from_slice(br#"","channel":""#);
    // Channel names never need escaping (see proto::channel).
    frame.extend_from_slice(channel.as_bytes());
    frame.extend_from_slice(br#"","member":"#);
    frame.extend_from_slice(member_json.as_bytes());
    frame.push(b'}');
    debug_assert_eq!(frame.len(), hl + body_len);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FrameHeader;
    use proptest::prelude::*;
    use serde_json::Value;

    fn body(frame: &[u8]) -> Value {
        let h = FrameHeader::parse(frame).unwrap();
        assert_eq!(h.len as usize, frame.len() - h.header_len);
        serde_json::from_slice(&frame[h.header_len..]).unwrap()
    }

    #[test]
    fn json_payload_is_embedded() {
        let f = encode_message("news", 7, &EncodedData::new(br#"{"a":[1,2]}"#));
        assert_eq!(
            &f[2..],
            br#"{"channel":"news","offset":7,"data":{"a":[1,2]}}"#
        );
    }

    #[test]
    fn other_payload_becomes_a_string() {
        let v = body(&encode_message(
            "c",
            1,
            &EncodedData::new(b"hello \"world\"\n\xff"),
        ));
        assert_eq!(v["data"], "hello \"world\"\n\u{fffd}");
    }

    /// Regression: `{"t":"\xc3("}` passed as JSON and went out byte for byte.
    #[test]
    fn json_with_invalid_utf8_inside_a_string_is_never_sent_as_is() {
        for payload in [
            &b"{\"t\":\"\xc3(\"}"[..],
            b"{\"t\":\"\xed\xa0\x80\"}",
            b"{\"t\":\"\xc0\xaf\"}",
        ] {
            let data = EncodedData::new(payload);
            assert!(data.replaced_invalid_utf8());
            let frame = encode_message("c", 1, &data);
            assert!(std::str::from_utf8(&frame[2..]).is_ok(), "{payload:?}");
        }
        assert!(!EncodedData::new(b"{\"t\":\"ok\"}").replaced_invalid_utf8());
    }

    /// Regression: a payload that was JSON but for invalid UTF-8 inside a string (`"\xff"`)
    /// was embedded verbatim (serde_json validating into `IgnoredAny` skips strings without
    /// checking their bytes), so the text frame was not UTF-8 and a browser failed the
    /// connection of every subscriber of the channel. Found by fuzz/targets/ingest.rs.
    #[test]
    fn json_with_invalid_utf8_in_a_string_becomes_a_string() {
        for payload in [
            &b"\"\xff\""[..],
            b"{\"a\":\"caf\xc3\"}",
            b"[\"ok\",\"\xed\xa0\x80\"]",
            b"{\"\xff\":1}",
        ] {
            let f = encode_message("c", 1, &EncodedData::new(payload));
            let h = FrameHeader::parse(&f).unwrap();
            let text = std::str::from_utf8(&f[h.header_len..]).expect("a text frame is UTF-8");
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["data"], *String::from_utf8_lossy(payload), "{payload:?}");
        }
    }

    #[test]
    fn presence_events_render_as_documented() {
        let f = encode_presence_event("join", "room:1", r#"{"user":"a"}"#);
        assert_eq!(
            body(&f),
            serde_json::json!({"type":"join","channel":"room:1","member":{"user":"a"}})
        );
    }

    /// JSON-shaped payloads whose strings hold arbitrary bytes: random bytes alone almost
    /// never form JSON, so they never reached the branch that embeds a payload verbatim.
    fn json_with_any_string_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|inner| {
            let mut p = b"{\"t\":\"".to_vec();
            p.extend(
                inner
                    .into_iter()
                    .filter(|b| *b != b'"' && *b != b'\\' && *b >= 0x20),
            );
            p.extend_from_slice(b"\"}");
            p
        })
    }

    proptest! {
        #[test]
        fn every_payload_renders_valid_utf8_json(
            payload in prop_oneof![proptest::collection::vec(any::<u8>(), 0..70_000), json_with_any_string_bytes()],
            offset in any::<u64>(),
        ) {
            let frame = encode_message("room:1", offset, &EncodedData::new(&payload));
            let h = FrameHeader::parse(&frame).unwrap();
            prop_assert!(std::str::from_utf8(&frame[h.header_len..]).is_ok());
            let v = body(&frame);
            prop_assert_eq!(v["channel"].as_str(), Some("room:1"));
            prop_assert_eq!(v["offset"].as_u64(), Some(offset));
        }
    }
}
