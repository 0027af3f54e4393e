//! Client commands (JSON text frames) and the replies to them.
//!
//! [`parse_command`] turns one text message into a [`Command`] or a [`CommandError`];
//! [`Reply`] renders the answer. Every reply carries a `code` (200 on success).

use crate::proto::channel::{is_valid_channel, CHANNEL_RULE};
pub use crate::proto::recovery::Since;
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write as _;

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start receiving a channel's messages.
    Subscribe {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
        /// Channel name (validated).
        channel: String,
        /// Recover from this position: replay what was missed after it first.
        since: Option<Since>,
    },
    /// Stop receiving a channel's messages.
    Unsubscribe {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
        /// Channel name (validated).
        channel: String,
    },
    /// Application-level ping; answered with a `pong` reply.
    Ping {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
    },
    /// Publish `data` to a channel (where the token and namespace allow it).
    Publish {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
        /// Channel name (validated).
        channel: String,
        /// The payload: the `data` value's JSON text.
        data: String,
    },
    /// Acknowledge a user channel's inbox messages up to `offset` (cumulative).
    Ack {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
        /// Channel name (validated).
        channel: String,
        /// The last offset received.
        offset: u64,
    },
    /// Who is subscribed to a presence channel.
    Presence {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
        /// Channel name (validated).
        channel: String,
    },
    /// Replace the connection's token (same `sub`) before it expires.
    Refresh {
        /// Echoed request id, already rendered as JSON.
        id: Option<String>,
        /// The new token (not verified here).
        token: String,
    },
}

/// A command that cannot be carried out, with the code of its error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// Echoed request id, when one could be read.
    pub id: Option<String>,
    /// 400 malformed, 401 bad token (refresh), 403 forbidden, 404 unknown command (or no
    /// presence on the channel), 413 too many subscriptions or payload too large.
    pub code: u16,
    /// Explanation for the client.
    pub error: String,
}

#[derive(Deserialize)]
struct RawCommand {
    cmd: Option<Value>,
    channel: Option<Value>,
    id: Option<Value>,
    since: Option<Value>,
    data: Option<Value>,
    token: Option<Value>,
    offset: Option<Value>,
}

/// Reads `since`: `{"offset": N, "epoch": "E"}` as a subscribe reply gave them. The
/// epoch is a string because it does not fit a JavaScript number.
fn parse_since(v: &Value) -> Result<Since, &'static str> {
    const SHAPE: &str = "since must be {\"offset\": <integer>, \"epoch\": \"<epoch string from a subscribe reply>\"}";
    let Value::Object(fields) = v else {
        return Err(SHAPE);
    };
    let offset = fields.get("offset").and_then(Value::as_u64).ok_or(SHAPE)?;
    let epoch = match fields.get("epoch") {
        Some(Value::String(e)) => e.parse::<u64>().map_err(|_| SHAPE)?,
        _ => return Err(SHAPE),
    };
    Ok(Since { offset, epoch })
}

/// Parses one text message as a command.
///
/// # Errors
/// A [`CommandError`] (code 400 or 404) to be sent back; the connection stays open.
pub fn parse_command(text: &str) -> Result<Command, CommandError> {
    let raw: RawCommand = serde_json::from_str(text).map_err(|e| CommandError {
        id: None,
        code: 400,
        error: format!("malformed command: {e}"),
    })?;
    let id = match raw.id {
        None | Some(Value::Null) => None,
        Some(v @ (Value::Number(_) | Value::String(_))) => Some(v.to_string()),
        Some(_) => return Err(bad(None, "id must be a number or a string")),
    };
    let cmd = match raw.cmd {
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad(id, "cmd must be a string")),
        None => return Err(bad(id, "missing field cmd")),
    };
    let channel = || match &raw.channel {
        Some(Value::String(s)) if is_valid_channel(s.as_bytes()) => Ok(s.clone()),
        Some(Value::String(s)) => Err(bad(
            id.clone(),
            &format!("invalid channel name {s:?}: {CHANNEL_RULE}"),
        )),
        _ => Err(bad(id.clone(), "missing string field channel")),
    };
    match cmd.as_str() {
        "subscribe" => {
            let since = match &raw.since {
                None | Some(Value::Null) => None,
                Some(v) => Some(parse_since(v).map_err(|e| bad(id.clone(), e))?),
            };
            Ok(Command::Subscribe {
                channel: channel()?,
                id,
                since,
            })
        }
        "unsubscribe" => Ok(Command::Unsubscribe {
            channel: channel()?,
            id,
        }),
        "ping" => Ok(Command::Ping { id }),
        "presence" => Ok(Command::Presence {
            channel: channel()?,
            id,
        }),
        "publish" => {
            let channel = channel()?;
            match raw.data {
                Some(data) => Ok(Command::Publish {
                    id,
                    channel,
                    data: data.to_string(),
                }),
                None => Err(bad(id, "missing field data (any JSON value but null)")),
            }
        }
        "ack" => {
            let channel = channel()?;
            match raw.offset.as_ref().and_then(Value::as_u64) {
                Some(offset) => Ok(Command::Ack {
                    id,
                    channel,
                    offset,
                }),
                None => Err(bad(
                    id,
                    "missing field offset (the last offset received, a non-negative integer)",
                )),
            }
        }
        "refresh" => match raw.token {
            Some(Value::String(token)) if !token.is_empty() => Ok(Command::Refresh { id, token }),
            _ => Err(bad(id, "missing string field token")),
        },
        other => Err(CommandError {
            id,
            code: 404,
            error: format!(
                "unknown command {other:?} (known: subscribe, unsubscribe, publish, presence, ack, refresh, ping)"
            ),
        }),
    }
}

fn bad(id: Option<String>, error: &str) -> CommandError {
    CommandError {
        id,
        code: 400,
        error: error.to_string(),
    }
}

/// A reply to render as one text frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Success of `kind` (subscribe, unsubscribe, pong) for `channel` if any.
    Ok {
        /// The reply name.
        kind: &'static str,
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The channel the command named.
        channel: Option<&'a str>,
    },
    /// A subscription took effect, at `offset` of `epoch`.
    Subscribed {
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The channel.
        channel: &'a str,
        /// The offset the subscriber is at: live messages follow it.
        offset: u64,
        /// The channel's epoch.
        epoch: u64,
        /// With `since`: `Ok` when every missed message follows this reply, else the
        /// reason it could not be recovered.
        recovered: Option<Result<(), &'static str>>,
        /// For an inbox channel: (unacked messages following this reply, unacked
        /// messages left out past the delivery limit).
        inbox: Option<(u64, u64)>,
    },
    /// An ack removed inbox messages up to `offset`.
    Acked {
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The channel.
        channel: &'a str,
        /// The acked offset.
        offset: u64,
        /// Messages it removed (0 when already acked).
        removed: u64,
    },
    /// An error reply.
    Error(&'a CommandError),
    /// An error reply about a specific command kind (e.g. 413 or 403 on subscribe).
    Refused {
        /// The reply name.
        kind: &'static str,
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The channel the command named, if any.
        channel: Option<&'a str>,
        /// The error code.
        code: u16,
        /// Explanation.
        error: &'a str,
    },
    /// A client publish went into the ring at `offset`.
    Published {
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The channel.
        channel: &'a str,
        /// The offset the message was given.
        offset: u64,
    },
    /// A channel's presence: `count` members with `connections` connections, and the
    /// members themselves unless there are too many.
    Presence {
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The channel.
        channel: &'a str,
        /// Distinct members.
        count: usize,
        /// Connections over all members.
        connections: u64,
        /// The members as a rendered JSON array; `None`: over `presence_max_members`.
        members: Option<&'a str>,
    },
    /// A refresh replaced the token; it now expires at `exp` (Unix seconds).
    Refreshed {
        /// The request id, rendered JSON.
        id: Option<&'a str>,
        /// The new token's `exp`.
        exp: u64,
    },
}

impl Reply<'_> {
    /// The JSON text of this reply.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(96);
        let (kind, id, code) = match self {
            Reply::Ok { kind, id, .. } => (*kind, *id, 200),
            Reply::Subscribed { id, .. } => ("subscribe", *id, 200),
            Reply::Error(e) => ("error", e.id.as_deref(), e.code),
            Reply::Refused { kind, id, code, .. } => (*kind, *id, *code),
            Reply::Published { id, .. } => ("publish", *id, 200),
            Reply::Refreshed { id, .. } => ("refresh", *id, 200),
            Reply::Acked { id, .. } => ("ack", *id, 200),
            Reply::Presence { id, .. } => ("presence", *id, 200),
        };
        let _ = write!(out, "{{\"reply\":\"{kind}\"");
        if let Some(id) = id {
            let _ = write!(out, ",\"id\":{id}");
        }
        let _ = write!(out, ",\"code\":{code}");
        // Channel names never need escaping (see proto::channel).
        match self {
            Reply::Ok {
                channel: Some(ch), ..
            } => {
                let _ = write!(out, ",\"channel\":\"{ch}\"");
            }
            Reply::Ok { .. } => {}
            Reply::Subscribed {
                channel,
                offset,
                epoch,
                recovered,
                inbox,
                ..
            } => {
                let _ = write!(
                    out,
                    ",\"channel\":\"{channel}\",\"offset\":{offset},\"epoch\":\"{epoch}\""
                );
                match recovered {
                    None => {}
                    Some(Ok(())) => out.push_str(",\"recovered\":true"),
                    Some(Err(reason)) => {
                        let _ = write!(out, ",\"recovered\":false,\"reason\":\"{reason}\"");
                    }
                }
                if let Some((unacked, more)) = inbox {
                    let _ = write!(out, ",\"inbox\":{{\"unacked\":{unacked},\"more\":{more}}}");
                }
            }
            Reply::Error(CommandError { error, .. }) => push_error(&mut out, error),
            Reply::Refused { channel, error, .. } => {
                if let Some(ch) = channel {
                    let _ = write!(out, ",\"channel\":\"{ch}\"");
                }
                push_error(&mut out, error);
            }
            Reply::Published {
                channel, offset, ..
            } => {
                let _ = write!(out, ",\"channel\":\"{channel}\",\"offset\":{offset}");
            }
            Reply::Refreshed { exp, .. } => {
                let _ = write!(out, ",\"exp\":{exp}");
            }
            Reply::Acked {
                channel,
                offset,
                removed,
                ..
            } => {
                let _ = write!(
                    out,
                    ",\"channel\":\"{channel}\",\"offset\":{offset},\"removed\":{removed}"
                );
            }
            Reply::Presence {
                channel,
                count,
                connections,
                members,
                ..
            } => {
                let _ = write!(
                    out,
                    ",\"channel\":\"{channel}\",\"count\":{count},\"connections\":{connections}"
                );
                if let Some(members) = members {
                    let _ = write!(out, ",\"members\":{members}");
                }
            }
        }
        out.push('}');
        out
    }
}

fn push_error(out: &mut String, error: &str) {
    out.push_str(",\"error\":");
    out.push_str(&Value::String(error.to_string()).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_command() {
        assert_eq!(
            parse_command(r#"{"cmd":"subscribe","channel":"news","id":1}"#),
            Ok(Command::Subscribe {
                id: Some("1".into()),
                channel: "news".into(),
                since: None,
            })
        );
        assert_eq!(
            parse_command(
                r#"{"cmd":"subscribe","channel":"n","since":{"offset":7,"epoch":"18446744073709551615"}}"#
            ),
            Ok(Command::Subscribe {
                id: None,
                channel: "n".into(),
                since: Some(Since {
                    offset: 7,
                    epoch: u64::MAX
                }),
            })
        );
        for bad_since in [
            r#"{"offset":7}"#,
            r#"{"offset":7,"epoch":12}"#,
            r#"{"offset":-1,"epoch":"1"}"#,
            r#"{"offset":1,"epoch":"x"}"#,
            r#"[7,"1"]"#,
        ] {
            let text = format!(r#"{{"cmd":"subscribe","channel":"n","since":{bad_since}}}"#);
            let err = parse_command(&text).unwrap_err();
            assert_eq!(err.code, 400, "{bad_since}");
            assert!(err.error.contains("since must be"), "{}", err.error);
        }
        assert_eq!(
            parse_command(r#"{"cmd":"unsubscribe","channel":"a:b","id":"x"}"#),
            Ok(Command::Unsubscribe {
                id: Some("\"x\"".into()),
                channel: "a:b".into()
            })
        );
        assert_eq!(
            parse_command(r#"{"cmd":"ping"}"#),
            Ok(Command::Ping { id: None })
        );
    }

    /// Regression: a numeric id with more digits than an f64 holds (`12345678902134567890123`)
    /// was read one unit in the last place off (serde_json's default float parsing is not
    /// correctly rounded) and echoed as another number, so the client could not match the
    /// reply to its request. Found by fuzz/targets/command.rs.
    #[test]
    fn long_numeric_ids_are_echoed_as_the_same_number() {
        for id in [
            "12345678902134567890123",
            "12345678901234067890123",
            "3.14159265358979323846264",
        ] {
            let Ok(Command::Ping { id: Some(echoed) }) =
                parse_command(&format!(r#"{{"cmd":"ping","id":{id}}}"#))
            else {
                panic!("{id}: not a ping with an id");
            };
            // Rust's float parsing rounds correctly, as a browser's JSON.parse does.
            assert_eq!(
                echoed.parse::<f64>(),
                id.parse::<f64>(),
                "{id} echoed as {echoed}"
            );
        }
    }

    #[test]
    fn errors_carry_codes_and_ids() {
        assert_eq!(parse_command("not json").unwrap_err().code, 400);
        assert_eq!(parse_command("[1,2]").unwrap_err().code, 400);
        let unknown = parse_command(r#"{"cmd":"dance","id":7}"#).unwrap_err();
        assert_eq!((unknown.code, unknown.id.as_deref()), (404, Some("7")));
        assert_eq!(
            parse_command(r#"{"cmd":"subscribe","id":2}"#)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            parse_command(r#"{"cmd":"subscribe","channel":"a b"}"#)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            parse_command(r#"{"cmd":"ping","id":{}}"#).unwrap_err().code,
            400
        );
    }

    #[test]
    fn replies_render_as_documented() {
        let ok = Reply::Ok {
            kind: "subscribe",
            id: Some("1"),
            channel: Some("news"),
        };
        assert_eq!(
            ok.to_json(),
            r#"{"reply":"subscribe","id":1,"code":200,"channel":"news"}"#
        );
        let err = parse_command(r#"{"cmd":"x","id":"q"}"#).unwrap_err();
        let v: Value = serde_json::from_str(&Reply::Error(&err).to_json()).unwrap();
        assert_eq!(v["reply"], "error");
        assert_eq!(v["id"], "q");
        assert_eq!(v["code"], 404);
    }

    #[test]
    fn publish_and_refresh_parse_and_reply() {
        assert_eq!(
            parse_command(r#"{"cmd":"publish","channel":"room:1","data":{"t":"hi"},"id":5}"#),
            Ok(Command::Publish {
                id: Some("5".into()),
                channel: "room:1".into(),
                data: r#"{"t":"hi"}"#.into()
            })
        );
        assert_eq!(
            parse_command(r#"{"cmd":"publish","channel":"room:1","data":"text"}"#),
            Ok(Command::Publish {
                id: None,
                channel: "room:1".into(),
                data: r#""text""#.into()
            })
        );
        assert_eq!(
            parse_command(r#"{"cmd":"publish","channel":"room:1"}"#)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            parse_command(r#"{"cmd":"refresh","token":"a.b.c"}"#),
            Ok(Command::Refresh {
                id: None,
                token: "a.b.c".into()
            })
        );
        assert_eq!(
            parse_command(r#"{"cmd":"refresh","token":7}"#)
                .unwrap_err()
                .code,
            400
        );
        let published = Reply::Published {
            id: Some("5"),
            channel: "room:1",
            offset: 9,
        };
        assert_eq!(
            published.to_json(),
            r#"{"reply":"publish","id":5,"code":200,"channel":"room:1","offset":9}"#
        );
        let refused = Reply::Refused {
            kind: "subscribe",
            id: None,
            channel: Some("user:bob"),
            code: 403,
            error: "user:bob is another user's channel",
        };
        let v: Value = serde_json::from_str(&refused.to_json()).unwrap();
        assert_eq!(
            (v["code"].as_u64(), v["channel"].as_str()),
            (Some(403), Some("user:bob"))
        );
        assert_eq!(
            Reply::Refreshed { id: None, exp: 77 }.to_json(),
            r#"{"reply":"refresh","code":200,"exp":77}"#
        );
    }

    #[test]
    fn ack_parses_and_replies() {
        assert_eq!(
            parse_command(r#"{"cmd":"ack","channel":"user:42","offset":7,"id":3}"#),
            Ok(Command::Ack {
                id: Some("3".into()),
                channel: "user:42".into(),
                offset: 7
            })
        );
        for bad in [
            r#"{"cmd":"ack","channel":"user:42"}"#,
            r#"{"cmd":"ack","channel":"user:42","offset":-1}"#,
            r#"{"cmd":"ack","channel":"user:42","offset":"7"}"#,
            r#"{"cmd":"ack","offset":7}"#,
        ] {
            assert_eq!(parse_command(bad).unwrap_err().code, 400, "{bad}");
        }
        let acked = Reply::Acked {
            id: None,
            channel: "user:42",
            offset: 7,
            removed: 2,
        };
        assert_eq!(
            acked.to_json(),
            r#"{"reply":"ack","code":200,"channel":"user:42","offset":7,"removed":2}"#
        );
        let subscribed = Reply::Subscribed {
            id: None,
            channel: "user:42",
            offset: 9,
            epoch: 5,
            recovered: None,
            inbox: Some((3, 0)),
        };
        assert_eq!(
            subscribed.to_json(),
            r#"{"reply":"subscribe","code":200,"channel":"user:42","offset":9,"epoch":"5","inbox":{"unacked":3,"more":0}}"#
        );
    }

    #[test]
    fn presence_parses_and_replies() {
        assert_eq!(
            parse_command(r#"{"cmd":"presence","channel":"room:1","id":7}"#),
            Ok(Command::Presence {
                id: Some("7".into()),
                channel: "room:1".into()
            })
        );
        assert_eq!(
            parse_command(r#"{"cmd":"presence"}"#).unwrap_err().code,
            400
        );
        let listed = Reply::Presence {
            id: Some("7"),
            channel: "room:1",
            count: 1,
            connections: 2,
            members: Some(r#"[{"user":"a","connections":2}]"#),
        };
        assert_eq!(
            listed.to_json(),
            r#"{"reply":"presence","id":7,"code":200,"channel":"room:1","count":1,"connections":2,"members":[{"user":"a","connections":2}]}"#
        );
        let counted = Reply::Presence {
            id: None,
            channel: "room:1",
            count: 5000,
            connections: 5001,
            members: None,
        };
        assert_eq!(
            counted.to_json(),
            r#"{"reply":"presence","code":200,"channel":"room:1","count":5000,"connections":5001}"#
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_and_errors_render_as_json(s in "\\PC{0,200}") {
            if let Err(e) = parse_command(&s) {
                let json = Reply::Error(&e).to_json();
                prop_assert!(serde_json::from_str::<Value>(&json).is_ok());
            }
        }
    }
}
