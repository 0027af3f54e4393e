//! A client's text message as a command: `parse_command`, and the replies that echo it.
//!
//! Checks, besides never panicking: a parsed command re-renders: the reply echoing its
//! `id` and channel is valid JSON carrying the same id and channel (channel names are
//! written unescaped, so every accepted one must need no escaping); a publish's `data` is
//! the JSON the client sent, kept verbatim by the message encoder; an error reply is
//! valid JSON with its code.

use ringcast::proto::channel::is_valid_channel;
use ringcast::proto::command::{parse_command, Command, Reply};
use ringcast::proto::message::EncodedData;
use serde::Deserialize;
use serde_json::Value;

/// The fields of the client's message that the command echoes, read the way the parser
/// reads them (other fields skipped unparsed).
#[derive(Deserialize)]
struct Sent {
    id: Option<Value>,
    since: Option<Value>,
    data: Option<Value>,
}

/// The same JSON value; numbers compared by value, since a re-rendered `-0` or `1.0` may
/// come back as another kind of number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON {text:?}: {e}"))
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let command = match parse_command(text) {
            Ok(command) => command,
            Err(e) => {
                assert!(matches!(e.code, 400 | 404), "{e:?}");
                let reply = json(&Reply::Error(&e).to_json());
                assert_eq!(reply["reply"], "error");
                assert_eq!(reply["code"], e.code);
                if let Some(id) = &e.id {
                    assert!(same(&reply["id"], &json(id)));
                }
                return;
            }
        };
        let sent: Sent = serde_json::from_str(text).expect("parsed once already");
        let (id, channel) = match &command {
            Command::Subscribe {
                id, channel, since, ..
            } => {
                if let Some(since) = since {
                    let offset = sent.since.as_ref().and_then(|s| s["offset"].as_u64());
                    assert_eq!(offset, Some(since.offset));
                }
                (id, Some(channel))
            }
            Command::Unsubscribe { id, channel }
            | Command::Presence { id, channel }
            | Command::Ack { id, channel, .. } => (id, Some(channel)),
            Command::Publish { id, channel, data } => {
                assert!(sent.data.is_some_and(|d| same(&json(data), &d)), "{data}");
                assert_eq!(
                    EncodedData::new(data.as_bytes()).as_bytes(),
                    data.as_bytes()
                );
                (id, Some(channel))
            }
            Command::Refresh { id, token } => {
                assert!(!token.is_empty());
                (id, None)
            }
            Command::Ping { id } => (id, None),
        };
        if let Some(channel) = channel {
            assert!(is_valid_channel(channel.as_bytes()), "{channel:?}");
        }
        let reply = json(
            &Reply::Ok {
                kind: "subscribe",
                id: id.as_deref(),
                channel: channel.map(String::as_str),
            }
            .to_json(),
        );
        match id {
            Some(id) => {
                assert!(same(&reply["id"], &json(id)), "{id}");
                assert!(sent.id.is_some_and(|s| same(&reply["id"], &s)), "{id}");
            }
            None => assert!(sent.id.is_none()),
        }
        if let Some(channel) = channel {
            assert_eq!(reply["channel"].as_str(), Some(channel.as_str()));
        }
    });
}
