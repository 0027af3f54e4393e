//! Publisher bytes on the ingest ports: one UDP datagram, TCP lines (`AUTH <key>` first
//! when a key is set), the HTTP `Authorization: Bearer` value; `parse_message` and the
//! frame each accepted message becomes.
//!
//! Checks, besides never panicking: an accepted message is `<channel> <payload>` with a
//! valid channel and a payload of 1 to `max_message_size` bytes; the text frame every
//! subscriber is sent for it is valid UTF-8 (RFC 6455 requires it of a text frame; a
//! browser drops the connection otherwise), valid JSON naming the channel and offset,
//! and one line (an SSE `data:` line carries it unchanged).

use ringcast::ingest::key::{auth_line, bearer};
use ringcast::ingest::line::{parse_message, strip_newline, IngestError};
use ringcast::proto::channel::is_valid_channel;
use ringcast::proto::frame::{opcode, FrameHeader};
use ringcast::proto::message::{encode_message, EncodedData};
use serde::de::IgnoredAny;
use serde::Deserialize;

const MAX_PAYLOAD: usize = 256;
const OFFSET: u64 = 42;

/// The rendered message, its `data` checked for JSON grammar only.
#[derive(Deserialize)]
struct Message {
    channel: String,
    offset: u64,
    #[allow(dead_code)]
    data: IgnoredAny,
}

fn check_message(msg: &[u8]) {
    let (channel, payload) = match parse_message(msg, MAX_PAYLOAD) {
        Err(e) => {
            assert_eq!(IngestError::LABELS[e.index()], e.label());
            return;
        }
        Ok(parsed) => parsed,
    };
    assert!(is_valid_channel(channel.as_bytes()), "{channel:?}");
    assert!((1..=MAX_PAYLOAD).contains(&payload.len()));
    assert_eq!([channel.as_bytes(), b" ", payload].concat(), msg);

    let frame = encode_message(channel, OFFSET, &EncodedData::new(payload));
    let Some(h) = FrameHeader::parse(&frame) else {
        panic!("no frame header");
    };
    assert!(h.fin && h.opcode == opcode::TEXT && h.mask.is_none());
    assert_eq!(h.header_len as u64 + h.len, frame.len() as u64);
    let body = &frame[h.header_len..];
    let Ok(text) = std::str::from_utf8(body) else {
        panic!(
            "text frame is not UTF-8: {:?}",
            String::from_utf8_lossy(body)
        );
    };
    assert!(!text.contains(['\n', '\r']), "{text:?}");
    let message: Message =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON {text:?}: {e}"));
    assert_eq!(
        (message.channel.as_str(), message.offset),
        (channel, OFFSET)
    );
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // One UDP datagram.
        check_message(strip_newline(data));
        // TCP: newline-terminated lines; an unterminated tail waits for more.
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let line = strip_newline(&rest[..=nl]);
            rest = &rest[nl + 1..];
            if let Some(key) = auth_line(line) {
                assert_eq!(&line[5..], key);
            }
            check_message(line);
        }
        // HTTP: the Authorization header's value.
        if let Some(token) = bearer(data) {
            assert!(data[..7].eq_ignore_ascii_case(b"bearer "));
            assert_eq!(token, token.trim_ascii());
        }
    });
}
