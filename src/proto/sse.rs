//! The HTTP transports (`GET /sse`, `GET /poll`) as a sans-io re-encoder of the WebSocket
//! frames every connection is fed.
//!
//! SSE and long-poll connections sit in the same connection table, index and fan-out as
//! WebSocket ones, and are handed the very same frames (the ring's shared `Bytes`: a
//! WebSocket header, then the JSON). [`HttpStream::encode`] turns one such frame into at
//! most three pieces for the connection's send backlog, without copying the JSON:
//!
//! - SSE, a text frame: `id: <token>\ndata: ` (per connection; with two channels or more
//!   the compact token, which does not repeat channel names), the JSON
//!   (`Bytes::slice` past the frame header, shared with every subscriber), `\n\n`;
//! - SSE, a ping: the comment `:\n\n` (the heartbeat); a close frame: the close event
//!   `data: {"type":"close","code":C,"reason":"R"}\n\n`;
//! - long-poll, a text frame: `,` between events, then the JSON. Nothing of a poll's
//!   answer is written before it is complete: when the poll ends, [`HttpStream::finish_poll`]
//!   gives the head (with the `Content-Length` of the whole answer) and `{"events":[`, to
//!   go before the queued events, and the end `],"position":"<token>"}`.
//!
//! It also keeps the stream's position (the `id:` token, see [`crate::proto::position`])
//! from what passes through it: a subscribe reply sets its channel's epoch and offset (a
//! recovered one keeps the requested offset: the replayed messages follow it), a message
//! sets its channel's offset, a gap notice moves it past the gap.
//!
//! An idle SSE stream keeps no encoder at all: its connection drops it
//! ([`crate::proto::conn::Connection::release_position`]) and the driver rebuilds it
//! before the next event from the subscription index (each channel's position and epoch
//! there, which a connection that keeps up shares with every other subscriber) and the
//! connection's own lag ([`HttpStream::restored`]). Heartbeats and the close event need no
//! position ([`encode_positionless`]).
//!
//! JSON with a raw line break would end an SSE `data:` line early. Published payloads
//! cannot carry one ([`crate::proto::message::EncodedData`] turns line breaks between JSON
//! tokens into spaces); every other frame is server-rendered and checked here anyway.

use crate::proto::frame::opcode;
use crate::proto::position::Position;
use crate::proto::recovery::Since;
use bytes::Bytes;
use serde::Deserialize;

/// Which HTTP transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `GET /sse`: an event stream until the server ends it.
    Sse,
    /// `GET /poll`: one answer, at the first event or at `deadline` (shard seconds).
    Poll {
        /// When a poll with nothing to say answers empty.
        deadline: u32,
    },
}

/// What one frame becomes on the wire: up to three pieces, in order (empty ones are
/// nothing to send).
pub type Parts = [Bytes; 3];

const NONE: Parts = [Bytes::new(), Bytes::new(), Bytes::new()];

/// The SSE heartbeat comment.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// One HTTP-transport connection's encoder and position.
#[derive(Debug)]
pub struct HttpStream {
    mode: Mode,
    position: Position,
    /// Events written so far (a poll answer puts commas between them).
    events: u32,
    /// A poll's CORS header lines, for the head written with its answer (empty for SSE).
    cors: String,
}

/// The fields of a subscribe reply the position needs.
#[derive(Deserialize)]
struct SubscribeReply<'a> {
    reply: &'a str,
    code: u16,
    channel: Option<&'a str>,
    offset: Option<u64>,
    epoch: Option<&'a str>,
    recovered: Option<bool>,
    inbox: Option<InboxCounts>,
}

/// The `inbox` field of an inbox channel's subscribe reply.
#[derive(Deserialize)]
struct InboxCounts {
    unacked: u64,
}

/// The fields of a gap notice.
#[derive(Deserialize)]
struct GapNotice<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    channel: &'a str,
    to: u64,
}

impl HttpStream {
    /// A stream that starts at `since` (the requested position: the entries for the
    /// requested `channels`, others dropped).
    pub fn new(mode: Mode, channels: &[String], since: Option<&Position>) -> Self {
        let mut position = Position::with_capacity(channels.len());
        if let Some(since) = since {
            for (channel, at) in since.entries() {
                if channels.iter().any(|c| c == channel) {
                    position.set(channel, *at);
                }
            }
        }
        HttpStream {
            mode,
            position,
            events: 0,
            cors: String::new(),
        }
    }

    /// A long poll until `deadline` (shard seconds, the coarse bound; the driver keeps a
    /// finer one) whose answer's head carries the CORS header lines `cors`.
    pub fn poll(deadline: u32, channels: &[String], since: Option<&Position>, cors: &str) -> Self {
        HttpStream {
            cors: cors.to_string(),
            ..HttpStream::new(Mode::Poll { deadline }, channels, since)
        }
    }

    /// An SSE stream at `position` (rebuilt by the driver after the encoder was released
    /// while idle).
    pub fn restored(position: Position) -> Self {
        HttpStream {
            mode: Mode::Sse,
            position,
            events: 0,
            cors: String::new(),
        }
    }

    /// The transport.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True for a long-poll connection.
    pub fn is_poll(&self) -> bool {
        matches!(self.mode, Mode::Poll { .. })
    }

    /// The position after everything encoded so far, as a full token.
    pub fn token(&self) -> String {
        self.position.encode()
    }

    /// The position after everything encoded so far.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Events encoded so far.
    pub fn events(&self) -> u32 {
        self.events
    }

    /// Re-encodes one server WebSocket frame (unmasked, final) for this transport. A
    /// poll's close frame is nothing here: [`HttpStream::finish_poll`] ends the answer.
    pub fn encode(&mut self, frame: &Bytes) -> Parts {
        let Some((op, start)) = frame_payload(frame) else {
            return NONE;
        };
        match (op, self.mode) {
            (opcode::TEXT, _) => self.encode_event(frame.slice(start..)),
            (_, Mode::Sse) => encode_positionless(frame).unwrap_or(NONE),
            _ => NONE,
        }
    }

    /// The pieces that complete a poll's answer once it ends, `events_len` bytes of
    /// events (everything [`HttpStream::encode`] gave) being queued: the head with the
    /// answer's `Content-Length` and `{"events":[`, to go before the events, and the end
    /// `],"position":"<token>"}`, to go after them.
    pub fn finish_poll(&self, events_len: usize) -> (Bytes, Bytes) {
        const START: &str = "{\"events\":[";
        let end = format!("],\"position\":\"{}\"}}", self.position.encode());
        let length = START.len() + events_len + end.len();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n\
             Content-Length: {length}\r\nConnection: close\r\n{}\r\n{START}",
            self.cors
        );
        (Bytes::from(head), Bytes::from(end))
    }

    fn encode_event(&mut self, json: Bytes) -> Parts {
        let recovered_reply = self.track(&json);
        let json = if json.starts_with(br#"{"channel":""#) {
            // A published message: its line breaks were removed at publish time.
            json
        } else {
            without_line_breaks(json)
        };
        match self.mode {
            Mode::Sse => {
                self.events += 1;
                let id = format!("id: {}\ndata: ", self.position.encode_id());
                [Bytes::from(id), json, Bytes::from_static(b"\n\n")]
            }
            // A recovered channel's reply says nothing a poll client needs.
            Mode::Poll { .. } if recovered_reply => NONE,
            Mode::Poll { .. } => {
                self.events += 1;
                let comma = if self.events > 1 {
                    Bytes::from_static(b",")
                } else {
                    Bytes::new()
                };
                [comma, json, Bytes::new()]
            }
        }
    }

    /// Moves the position past one event; true when it is a subscribe reply that
    /// recovered its channel.
    fn track(&mut self, json: &[u8]) -> bool {
        if let Some((channel, offset)) = message_position(json) {
            if let Some(mut at) = self.position.get(channel) {
                at.offset = offset;
                self.position.set(channel, at);
            }
            return false;
        }
        if json.starts_with(br#"{"reply":"subscribe""#) {
            let Ok(reply) = serde_json::from_slice::<SubscribeReply>(json) else {
                return false;
            };
            let (Some(channel), Some(offset), Some(epoch)) = (
                reply.channel,
                reply.offset,
                reply.epoch.and_then(|e| e.parse::<u64>().ok()),
            ) else {
                return false;
            };
            if reply.reply != "subscribe" || reply.code != 200 {
                return false;
            }
            let recovered = reply.recovered == Some(true);
            let offset = match (self.position.get(channel), &reply.inbox) {
                // The missed messages follow this reply: the position moves with them.
                (Some(at), _) if recovered && at.epoch == epoch => at.offset,
                // An inbox reply's offset is the position after the unacked messages
                // that follow it (the newest ones up to it): until they arrive, the
                // stream is before them, or a Last-Event-ID taken from the reply would
                // skip them.
                (_, Some(inbox)) => offset.saturating_sub(inbox.unacked),
                _ => offset,
            };
            self.position.set(channel, Since { offset, epoch });
            return recovered;
        }
        if json.starts_with(br#"{"type":"gap""#) {
            if let Ok(gap) = serde_json::from_slice::<GapNotice>(json) {
                if let (true, Some(mut at)) = (gap.kind == "gap", self.position.get(gap.channel)) {
                    at.offset = at.offset.max(gap.to);
                    self.position.set(gap.channel, at);
                }
            }
        }
        false
    }
}

/// What an SSE stream sends for a frame that needs no position: the heartbeat comment
/// for a ping, the close event for a close frame (`payload`: code and reason); `None`
/// for a text frame (an event, with its `id:`), nothing for anything else.
pub fn encode_positionless(frame: &[u8]) -> Option<Parts> {
    let Some((op, start)) = frame_payload(frame) else {
        return Some(NONE);
    };
    Some(match op {
        opcode::TEXT => return None,
        opcode::PING => [Bytes::from_static(HEARTBEAT), Bytes::new(), Bytes::new()],
        opcode::CLOSE => {
            let payload = &frame[start..];
            let code = match payload {
                [a, b, ..] => u16::from_be_bytes([*a, *b]),
                _ => 1005,
            };
            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
            // Serializing a str cannot fail.
            let reason = serde_json::to_string(&*reason).unwrap_or_default();
            let text =
                format!("data: {{\"type\":\"close\",\"code\":{code},\"reason\":{reason}}}\n\n");
            [Bytes::from(text), Bytes::new(), Bytes::new()]
        }
        _ => NONE,
    })
}

/// The opcode and payload start of a server frame; `None` when it is cut short.
fn frame_payload(frame: &[u8]) -> Option<(u8, usize)> {
    let (first, second) = (*frame.first()?, *frame.get(1)?);
    let start = match second & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    (frame.len() >= start).then_some((first & 0x0f, start))
}

/// `(channel, offset)` of a message frame's JSON (`{"channel":"c","offset":N,...`).
fn message_position(json: &[u8]) -> Option<(&str, u64)> {
    let rest = json.strip_prefix(br#"{"channel":""#)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let channel = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = rest[end..].strip_prefix(br#"","offset":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((channel, offset))
}

/// `json` with raw CR/LF turned into spaces (only ever between JSON tokens: inside a
/// JSON string they are invalid), copied only when there is one.
fn without_line_breaks(json: Bytes) -> Bytes {
    if !json.iter().any(|&b| b == b'\n' || b == b'\r') {
        return json;
    }
    let spaced: Vec<u8> = json
        .iter()
        .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
        .collect();
    Bytes::from(spaced)
}

/// The head of a `200` SSE answer (CORS lines in `cors`), and the reconnect hint.
pub fn sse_head(cors: &str, retry_ms: u64) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\nConnection: keep-alive\r\n{cors}\r\nretry: {retry_ms}\n\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{encode_close, encode_frame};
    use crate::proto::message::{encode_gap, encode_message, EncodedData};
    use proptest::prelude::*;

    fn text(json: &str) -> Bytes {
        encode_frame(opcode::TEXT, json.as_bytes())
    }

    /// The pieces as text, a compact `id:` shown as the full token it stands for (read
    /// against every channel these tests use).
    fn wire(parts: Parts) -> String {
        let text: String = parts
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        let Some(rest) = text.strip_prefix("id: ") else {
            return text;
        };
        let (id, rest) = rest.split_once('\n').unwrap_or((rest, ""));
        let known = channels(&["news", "b", "user:ivy", "a", "other"]);
        let full = Position::parse_for(id, &known).unwrap().encode();
        format!("id: {full}\n{rest}")
    }

    fn channels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sse_events_carry_the_position_after_them() {
        let mut s = HttpStream::new(Mode::Sse, &channels(&["news", "b"]), None);
        let reply = r#"{"reply":"subscribe","code":200,"channel":"news","offset":4,"epoch":"77"}"#;
        assert_eq!(
            wire(s.encode(&text(reply))),
            format!("id: news~4~77\ndata: {reply}\n\n")
        );
        let msg = encode_message("news", 5, &EncodedData::new(b"{\"a\":1}"));
        let parts = s.encode(&msg);
        // The JSON is the ring's bytes, not a copy.
        assert_eq!(parts[1].as_ptr(), msg[2..].as_ptr());
        assert_eq!(
            wire(parts),
            "id: news~5~77\ndata: {\"channel\":\"news\",\"offset\":5,\"data\":{\"a\":1}}\n\n"
        );
        let reply_b = r#"{"reply":"subscribe","code":200,"channel":"b","offset":0,"epoch":"78"}"#;
        s.encode(&text(reply_b));
        assert_eq!(s.token(), "news~5~77,b~0~78");
        let gap = encode_gap("news", 6, 9);
        assert!(wire(s.encode(&gap)).starts_with("id: news~9~77,b~0~78\ndata: {\"type\":\"gap\""));
        assert_eq!(wire(s.encode(&encode_frame(opcode::PING, b""))), ":\n\n");
        assert_eq!(
            wire(s.encode(&encode_close(1001, "reconnect after 12ms"))),
            "data: {\"type\":\"close\",\"code\":1001,\"reason\":\"reconnect after 12ms\"}\n\n"
        );
        assert_eq!(wire(s.encode(&encode_frame(opcode::PONG, b"x"))), "");
    }

    /// Regression: the reply's `id:` was the offset after the unacked messages that follow
    /// it, so a stream cut between the reply and them resumed past them.
    #[test]
    fn an_inbox_reply_is_positioned_before_its_unacked_messages() {
        let mut s = HttpStream::new(Mode::Sse, &channels(&["user:ivy"]), None);
        let reply = r#"{"reply":"subscribe","code":200,"channel":"user:ivy","offset":7,"epoch":"5","inbox":{"unacked":3,"more":0}}"#;
        assert!(wire(s.encode(&text(reply))).starts_with("id: user:ivy~4~5\n"));
        for offset in 5..=7 {
            s.encode(&encode_message("user:ivy", offset, &EncodedData::new(b"1")));
            assert_eq!(s.token(), format!("user:ivy~{offset}~5"));
        }
        // With a position: the unacked messages after it follow.
        let since = Position::parse("user:ivy~5~5").unwrap();
        let mut s = HttpStream::new(Mode::Sse, &channels(&["user:ivy"]), Some(&since));
        let reply = r#"{"reply":"subscribe","code":200,"channel":"user:ivy","offset":7,"epoch":"5","inbox":{"unacked":2,"more":0}}"#;
        assert!(wire(s.encode(&text(reply))).starts_with("id: user:ivy~5~5\n"));
        let none = r#"{"reply":"subscribe","code":200,"channel":"user:ivy","offset":7,"epoch":"5","inbox":{"unacked":0,"more":0}}"#;
        s.encode(&text(none));
        assert_eq!(s.token(), "user:ivy~7~5");
    }

    #[test]
    fn a_recovered_reply_keeps_the_requested_offset_until_the_replay() {
        let since = Position::parse("news~3~77,other~1~1").unwrap();
        let mut s = HttpStream::new(Mode::Sse, &channels(&["news"]), Some(&since));
        assert_eq!(s.token(), "news~3~77");
        let reply = r#"{"reply":"subscribe","code":200,"channel":"news","offset":5,"epoch":"77","recovered":true}"#;
        assert!(wire(s.encode(&text(reply))).starts_with("id: news~3~77\n"));
        s.encode(&encode_message("news", 4, &EncodedData::new(b"1")));
        assert_eq!(s.token(), "news~4~77");
        // Not recovered: live from the reply's offset in its epoch.
        let mut s = HttpStream::new(Mode::Sse, &channels(&["news"]), Some(&since));
        let lost = r#"{"reply":"subscribe","code":200,"channel":"news","offset":1,"epoch":"99","recovered":false,"reason":"epoch_changed"}"#;
        s.encode(&text(lost));
        assert_eq!(s.token(), "news~1~99");
        // A refused channel does not move.
        let refused = r#"{"reply":"subscribe","code":403,"channel":"news","error":"no"}"#;
        s.encode(&text(refused));
        assert_eq!(s.token(), "news~1~99");
    }

    /// A poll's answer as it goes out: head, `{"events":[`, the events, the end.
    fn poll_answer(s: &HttpStream, events: &str) -> (String, String) {
        let (head, end) = s.finish_poll(events.len());
        let head = String::from_utf8_lossy(&head).into_owned();
        let end = String::from_utf8_lossy(&end).into_owned();
        let (http, start) = head.split_once("\r\n\r\n").unwrap();
        (http.to_string(), format!("{start}{events}{end}"))
    }

    #[test]
    fn a_poll_answer_is_one_json_document_with_its_length() {
        let since = Position::parse("news~3~77").unwrap();
        let mut s = HttpStream::poll(
            9,
            &channels(&["news", "b"]),
            Some(&since),
            "Vary: Origin\r\n",
        );
        let mut events = String::new();
        let recovered = r#"{"reply":"subscribe","code":200,"channel":"news","offset":3,"epoch":"77","recovered":true}"#;
        events += &wire(s.encode(&text(recovered)));
        let fresh = r#"{"reply":"subscribe","code":200,"channel":"b","offset":0,"epoch":"5"}"#;
        events += &wire(s.encode(&text(fresh)));
        events += &wire(s.encode(&encode_message("news", 4, &EncodedData::new(b"\"x\""))));
        events += &wire(s.encode(&encode_frame(opcode::PING, b"")));
        events += &wire(s.encode(&encode_close(1000, "")));
        let (head, body) = poll_answer(&s, &events);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nVary: Origin"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
        );
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["events"].as_array().unwrap().len(), 2, "{body}");
        assert_eq!(doc["events"][0]["channel"], "b");
        assert_eq!(doc["events"][1]["offset"], 4);
        assert_eq!(doc["position"], "news~4~77,b~0~5");
        // Nothing at all: an empty list.
        let empty = HttpStream::poll(9, &channels(&["a"]), None, "");
        let (head, body) = poll_answer(&empty, "");
        assert_eq!(body, r#"{"events":[],"position":""}"#);
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    #[test]
    fn a_restored_stream_continues_from_its_position() {
        let position = Position::parse("a~4~7,b~9~8").unwrap();
        let mut s = HttpStream::restored(position);
        let msg = encode_message("b", 10, &EncodedData::new(b"1"));
        assert!(wire(s.encode(&msg)).starts_with("id: a~4~7,b~10~8\ndata: "));
        // Heartbeats and the close event need no position.
        assert_eq!(
            encode_positionless(&encode_frame(opcode::PING, b"")).map(wire),
            Some(":\n\n".to_string())
        );
        assert!(encode_positionless(&msg).is_none());
        let close = encode_positionless(&encode_close(4401, "token expired")).map(wire);
        assert_eq!(
            close.as_deref(),
            Some("data: {\"type\":\"close\",\"code\":4401,\"reason\":\"token expired\"}\n\n")
        );
    }

    /// Long channel names, a 19-digit epoch each, as many channels as a request may name.
    fn many_long_channels(n: usize, name_len: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("room:{i:03}-{}", "x".repeat(name_len)))
            .collect()
    }

    /// The `id:` line of one encoded event.
    fn id_line(parts: &Parts) -> String {
        let text = String::from_utf8_lossy(&parts[0]).into_owned();
        text.lines().next().unwrap_or_default().to_string()
    }

    /// Regression: every `id:` repeated the whole position (every channel's name,
    /// offset and epoch), so a stream of 62 long-named channels sent 8.7 KB id lines.
    #[test]
    fn sse_ids_do_not_grow_with_channel_names() {
        let mut longest = Vec::new();
        for name_len in [8, 120] {
            let names = many_long_channels(62, name_len);
            let mut s = HttpStream::new(Mode::Sse, &names, None);
            let mut max = 0;
            for (i, name) in names.iter().enumerate() {
                let epoch = 1_796_390_886_100_725_105u64 + i as u64;
                let reply = format!(
                    r#"{{"reply":"subscribe","code":200,"channel":"{name}","offset":{},"epoch":"{epoch}"}}"#,
                    1000 + i
                );
                max = max.max(id_line(&s.encode(&text(&reply))).len());
            }
            for (i, name) in names.iter().enumerate() {
                let msg = encode_message(name, 1001 + i as u64, &EncodedData::new(b"1"));
                max = max.max(id_line(&s.encode(&msg)).len());
            }
            longest.push(max);
        }
        // Per channel: its tag, offset and epoch difference, whatever its name's length.
        for max in longest {
            assert!(max <= 14 * 62 + 20, "id line of {max} bytes");
        }
    }

    /// Resuming from any event's `id:` is resuming from the position after that event,
    /// on every channel of the stream.
    #[test]
    fn every_compact_id_reads_back_as_the_position_after_its_event() {
        let names = many_long_channels(5, 40);
        let since = Position::parse(&format!("{}~3~900", names[1])).unwrap();
        let mut s = HttpStream::new(Mode::Sse, &names, Some(&since));
        let mut frames = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let recovered = if i == 1 { r#","recovered":true"# } else { "" };
            frames.push(text(&format!(
                r#"{{"reply":"subscribe","code":200,"channel":"{name}","offset":{},"epoch":"{}"{recovered}}}"#,
                5 + i,
                [900u64, 900, 901, 3_000_000_021, 902][i],
            )));
        }
        frames.push(encode_message(&names[1], 4, &EncodedData::new(b"1")));
        frames.push(encode_gap(&names[3], 9, 12));
        frames.push(encode_message(&names[0], 6, &EncodedData::new(b"2")));
        for frame in &frames {
            let parts = s.encode(frame);
            let line = id_line(&parts);
            let id = line.strip_prefix("id: ").unwrap();
            // The request the browser repeats names the same channels (in any order).
            let mut request = names.clone();
            request.reverse();
            assert_eq!(
                Position::parse_for(id, &request).unwrap().encode(),
                s.token()
            );
        }
        assert_eq!(
            s.token(),
            format!(
                "{}~4~900,{}~6~900,{}~7~901,{}~12~3000000021,{}~9~902",
                names[1], names[0], names[2], names[3], names[4]
            )
        );
    }

    #[test]
    fn line_breaks_never_reach_a_data_line() {
        let mut s = HttpStream::new(Mode::Sse, &channels(&["a"]), None);
        let event = wire(s.encode(&text("{\"type\":\"join\",\n\"channel\":\"a\"}")));
        assert_eq!(event.matches('\n').count(), 3, "{event:?}");
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..300), poll in any::<bool>()) {
            let mode = if poll { Mode::Poll { deadline: 1 } } else { Mode::Sse };
            let mut s = HttpStream::new(mode, &channels(&["a"]), None);
            let frame = Bytes::from(frame);
            let _ = s.encode(&frame);
            let _ = encode_positionless(&frame);
            let _ = s.finish_poll(frame.len());
        }

        #[test]
        fn arbitrary_json_text_never_panics_or_breaks_lines(json in ".{0,200}") {
            let mut s = HttpStream::new(Mode::Sse, &channels(&["a"]), None);
            let out = wire(s.encode(&text(&json)));
            prop_assert!(out.ends_with("\n\n"));
            prop_assert_eq!(out.matches('\n').count(), 3);
        }
    }
}
