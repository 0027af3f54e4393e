//! Bad input of every kind gets the answer docs/protocol.md gives it, and never hurts
//! anyone else: after all of it, a normal subscriber still receives what is published.
//!
//! One server takes every case in turn. Each case is a named function; a failing case
//! is reported by name and the rest still run, so one run shows every broken answer.

use std::any::Any;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use crate::common::http::{self, HttpResponse};
use crate::common::raw_ws::opcode;
use crate::common::*;
use serde_json::{json, Value};

const MAX_MESSAGE_SIZE: usize = 4096;
const WAIT: Duration = Duration::from_secs(5);

/// A named check run against the shared server.
type Case = (&'static str, fn(&Server));

/// `[(name, fn)]` from function names, so a failure names the case.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        &[$((stringify!($case), $case as fn(&Server))),*]
    };
}

#[test]
fn bad_input_gets_clear_error() {
    let _deadline = Deadline::new("bad_input_gets_clear_error", Duration::from_secs(90));
    let server = Server::start(&["--max-message-size", &MAX_MESSAGE_SIZE.to_string()]);
    // Connected before any bad input, checked after all of it.
    let mut bystander = server.subscribe(&["after.bad", "bad.tcp"]);

    let cases: &[Case] = cases![
        garbage_http_gets_400,
        upgrade_without_key_gets_400,
        upgrade_with_bad_channel_gets_400,
        upgrade_with_empty_channel_name_gets_400,
        upgrade_with_too_many_channels_gets_400,
        unknown_path_gets_404,
        post_to_ws_gets_405,
        get_ws_without_upgrade_gets_426,
        wrong_websocket_version_gets_426,
        oversized_request_head_gets_431,
        unmasked_client_frame_is_closed_with_1002,
        reserved_bits_are_closed_with_1002,
        unknown_opcode_is_closed_with_1002,
        fragmented_ping_is_closed_with_1002,
        stray_continuation_is_closed_with_1002,
        binary_message_is_closed_with_1003,
        invalid_utf8_text_is_closed_with_1007,
        oversized_frame_is_closed_with_1009,
        bad_commands_get_error_replies_and_connection_stays,
        malformed_tcp_lines_get_err_and_connection_stays,
        overlong_tcp_line_gets_err_and_close,
        malformed_udp_datagrams_are_counted,
        bad_http_publishes_get_400_or_413,
        payloads_that_are_not_utf8_are_refused_on_every_ingest_path,
        frames_pipelined_before_a_close_are_answered_before_it,
    ];
    let mut failures = Vec::new();
    for (name, case) in cases {
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| case(&server))) {
            failures.push(format!("{name}: {}", panic_text(&panic)));
        }
    }

    // The TCP case published one good line to bad.tcp; now one more via HTTP.
    let response = server.http_publish(Some("after.bad"), b"{\"ok\":true}");
    assert_eq!(response.status, 200, "{}", response.text());
    let mut got = Vec::new();
    while let Some(d) = bystander.next_delivery(Duration::from_secs(2)) {
        got.push((d.channel, d.offset, d.data));
    }
    let expected = vec![
        ("bad.tcp".to_string(), 1, json!("still usable")),
        ("after.bad".to_string(), 1, json!({ "ok": true })),
    ];
    if got != expected {
        failures.push(format!(
            "bystander_still_receives: got {got:?}, expected {expected:?}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

fn panic_text(panic: &Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

// ---- HTTP upgrade errors ---------------------------------------------------------------

const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

fn raw_request(addr: SocketAddr, request: &str) -> HttpResponse {
    http::send_raw(addr, request.as_bytes())
        .unwrap_or_else(|e| panic!("no HTTP response to {request:?}: {e}"))
}

/// Asserts the status and the one-line plain-text body every error response carries.
fn assert_error(response: &HttpResponse, status: u16) {
    assert_eq!(
        response.status,
        status,
        "{} {} {:?}",
        response.status,
        response.reason,
        response.text()
    );
    let body = response.text();
    assert!(
        !body.trim().is_empty() && !body.trim().contains('\n'),
        "a {status} answer should explain itself in one line, body was {body:?}"
    );
}

fn garbage_http_gets_400(server: &Server) {
    let r = raw_request(server.ws_addr(), "HELLO THERE\r\n\r\n");
    assert_error(&r, 400);
}

fn upgrade_without_key_gets_400(server: &Server) {
    let r = raw_request(
        server.ws_addr(),
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_error(&r, 400);
}

fn upgrade_with_bad_channel_gets_400(server: &Server) {
    let r = raw_request(
        server.ws_addr(),
        &format!("GET /ws?channels=ok,bad!name HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n"),
    );
    assert_error(&r, 400);
}

fn upgrade_with_empty_channel_name_gets_400(server: &Server) {
    for list in ["news,,x", "news,"] {
        let r = raw_request(
            server.ws_addr(),
            &format!("GET /ws?channels={list} HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n"),
        );
        assert_error(&r, 400);
        assert!(
            r.text().contains("empty channel name"),
            "{list}: {:?}",
            r.text()
        );
    }
}

/// Regression: channels past `max_subscriptions_per_connection` (default 64) used to be
/// dropped silently after a `101`.
fn upgrade_with_too_many_channels_gets_400(server: &Server) {
    let list: Vec<String> = (0..65).map(|i| format!("c{i}")).collect();
    let r = raw_request(
        server.ws_addr(),
        &format!(
            "GET /ws?channels={} HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n",
            list.join(",")
        ),
    );
    assert_error(&r, 400);
    assert!(r.text().contains("more than 64 channels"), "{:?}", r.text());
}

fn unknown_path_gets_404(server: &Server) {
    let r = raw_request(
        server.ws_addr(),
        &format!("GET /nope HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n"),
    );
    assert_error(&r, 404);
}

fn post_to_ws_gets_405(server: &Server) {
    let r = raw_request(
        server.ws_addr(),
        &format!("POST /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}Content-Length: 0\r\n\r\n"),
    );
    assert_error(&r, 405);
    assert_eq!(r.header("allow"), Some("GET"), "405 must say Allow: GET");
}

fn get_ws_without_upgrade_gets_426(server: &Server) {
    let r = raw_request(
        server.ws_addr(),
        "GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_error(&r, 426);
}

fn wrong_websocket_version_gets_426(server: &Server) {
    let r = raw_request(
        server.ws_addr(),
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    assert_error(&r, 426);
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
}

fn oversized_request_head_gets_431(server: &Server) {
    let pad = "a".repeat(9 * 1024);
    let r = raw_request(
        server.ws_addr(),
        &format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}X-Pad: {pad}\r\n\r\n"),
    );
    assert_error(&r, 431);
}

// ---- WebSocket protocol violations ----------------------------------------------------

/// Sends `frame` on a fresh connection and asserts the server closes with `code`.
fn assert_frame_closes_with(server: &Server, frame: OutFrame, code: u16) {
    let mut ws = server.raw_ws(&[]);
    // A server that closes at once may reset the connection under a long write; the
    // close frame it sent first is still read below.
    let _ = ws.send(&frame);
    let end = ws.read_close(WAIT);
    assert_eq!(
        end.code(),
        Some(code),
        "server answered {frame:?} with {end:?}"
    );
}

fn unmasked_client_frame_is_closed_with_1002(server: &Server) {
    assert_frame_closes_with(server, OutFrame::text(r#"{"cmd":"ping"}"#).unmasked(), 1002);
}

fn reserved_bits_are_closed_with_1002(server: &Server) {
    assert_frame_closes_with(server, OutFrame::text(r#"{"cmd":"ping"}"#).rsv(0b100), 1002);
}

fn unknown_opcode_is_closed_with_1002(server: &Server) {
    assert_frame_closes_with(server, OutFrame::new(0x3, "?"), 1002);
}

fn fragmented_ping_is_closed_with_1002(server: &Server) {
    assert_frame_closes_with(server, OutFrame::new(opcode::PING, "x").not_final(), 1002);
}

fn stray_continuation_is_closed_with_1002(server: &Server) {
    assert_frame_closes_with(server, OutFrame::new(opcode::CONTINUATION, "x"), 1002);
}

fn binary_message_is_closed_with_1003(server: &Server) {
    assert_frame_closes_with(server, OutFrame::new(opcode::BINARY, vec![1, 2, 3]), 1003);
}

fn invalid_utf8_text_is_closed_with_1007(server: &Server) {
    assert_frame_closes_with(
        server,
        OutFrame::text(vec![b'{', 0xff, 0xfe, 0x80, b'}']),
        1007,
    );
}

/// Regression: ten text+ping pairs and a close in one write got the close but none of
/// the pongs or replies.
fn frames_pipelined_before_a_close_are_answered_before_it(server: &Server) {
    let mut ws = server.raw_ws(&[]);
    let mut burst = Vec::new();
    for i in 0..10u8 {
        burst.extend(OutFrame::text(format!(r#"{{"cmd":"ping","id":{i}}}"#)).encode());
        burst.extend(OutFrame::new(opcode::PING, vec![i]).encode());
    }
    burst.extend(OutFrame::new(opcode::CLOSE, 1000u16.to_be_bytes().to_vec()).encode());
    ws.send_bytes(&burst).expect("write the burst");
    let (mut pongs, mut replies) = (Vec::new(), Vec::new());
    let end = loop {
        match ws.read_frame(WAIT) {
            Ok(Some(f)) if f.opcode == opcode::PONG => pongs.extend(f.payload),
            Ok(Some(f)) if f.opcode == opcode::TEXT => {
                let reply: Value = serde_json::from_slice(&f.payload).expect("JSON reply");
                replies.push(reply["id"].as_u64().expect("the reply echoes the id"));
            }
            Ok(Some(f)) if f.opcode == opcode::CLOSE => break f.payload,
            other => panic!("expected pongs, replies, then a close; got {other:?}"),
        }
    };
    assert_eq!(
        pongs,
        (0..10u8).collect::<Vec<_>>(),
        "one pong per ping, in order"
    );
    assert_eq!(
        replies,
        (0..10u64).collect::<Vec<_>>(),
        "one reply per command"
    );
    assert_eq!(
        end.get(..2),
        Some(&1000u16.to_be_bytes()[..]),
        "then the close"
    );
}

fn oversized_frame_is_closed_with_1009(server: &Server) {
    let frame = OutFrame::text(vec![b'a'; 2 * MAX_MESSAGE_SIZE]);
    assert_frame_closes_with(server, frame, 1009);
}

// ---- bad commands -----------------------------------------------------------------------

fn assert_reply(reply: &Value, code: u64, id: Option<Value>) {
    assert_eq!(reply["code"], code, "reply {reply}");
    if code != 200 {
        assert_eq!(reply["reply"], "error", "reply {reply}");
        assert!(
            reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "an error reply says what was wrong: {reply}"
        );
    }
    if let Some(id) = id {
        assert_eq!(reply["id"], id, "the id is echoed: {reply}");
    }
}

fn bad_commands_get_error_replies_and_connection_stays(server: &Server) {
    let mut ws = server.subscribe(&[]);
    ws.send_text("{not json");
    assert_reply(&ws.next_reply(WAIT), 400, None);
    ws.send_text("[1,2,3]");
    assert_reply(&ws.next_reply(WAIT), 400, None);
    let reply = ws.request(&json!({ "cmd": "subscribe", "id": 4 }), WAIT);
    assert_reply(&reply, 400, Some(json!(4)));
    let reply = ws.request(
        &json!({ "cmd": "subscribe", "channel": "bad name!", "id": "s" }),
        WAIT,
    );
    assert_reply(&reply, 400, Some(json!("s")));
    let reply = ws.request(&json!({ "cmd": "frobnicate", "id": 7 }), WAIT);
    assert_reply(&reply, 404, Some(json!(7)));

    // Still usable.
    let pong = ws.request(&json!({ "cmd": "ping", "id": 3 }), WAIT);
    assert_eq!(pong, json!({ "reply": "pong", "id": 3, "code": 200 }));
    let reply = ws.request(
        &json!({ "cmd": "subscribe", "channel": "bad.cmd", "id": 8 }),
        WAIT,
    );
    let epoch = reply["epoch"].as_str().unwrap_or_default().to_string();
    assert!(
        !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_digit()),
        "{reply}"
    );
    assert_eq!(
        reply,
        json!({ "reply": "subscribe", "id": 8, "code": 200, "channel": "bad.cmd",
                "offset": 0, "epoch": epoch })
    );
    let bad_since = ws.request(
        &json!({ "cmd": "subscribe", "channel": "x", "id": 9, "since": { "offset": 1 } }),
        WAIT,
    );
    assert_eq!(bad_since["code"], 400, "{bad_since}");
    let r = server.http_publish(Some("bad.cmd"), b"after errors");
    assert_eq!(r.status, 200, "{}", r.text());
    let d = ws
        .next_delivery(WAIT)
        .expect("the connection that sent bad commands still receives messages");
    assert_eq!(
        (d.channel.as_str(), d.data),
        ("bad.cmd", json!("after errors"))
    );
}

// ---- bad ingest -------------------------------------------------------------------------

fn assert_err_line(tcp: &mut TcpIngest, sent: &str) {
    let line = tcp
        .read_line(WAIT)
        .unwrap_or_else(|| panic!("no reply to the malformed TCP line {sent:?}"));
    assert!(
        line.starts_with("ERR ") && line.len() > 4,
        "reply to {sent:?} should be `ERR <reason>`, was {line:?}"
    );
}

fn malformed_tcp_lines_get_err_and_connection_stays(server: &Server) {
    let mut tcp = server.tcp_ingest();
    for line in ["nospace", "bad!chan payload", "empty.payload "] {
        tcp.send_raw(format!("{line}\n").as_bytes());
        assert_err_line(&mut tcp, line);
    }
    // Still usable: a good line is delivered (the bystander checks it) and not answered.
    tcp.send_raw(b"bad.tcp still usable\r\n");
    assert_eq!(tcp.read_line(Duration::from_millis(300)), None);
}

fn overlong_tcp_line_gets_err_and_close(server: &Server) {
    let mut tcp = server.tcp_ingest();
    let mut line = b"long.line ".to_vec();
    line.resize(line.len() + 2 * MAX_MESSAGE_SIZE, b'a');
    line.push(b'\n');
    tcp.send_raw(&line);
    let reply = tcp.read_line(WAIT);
    assert_eq!(reply.as_deref(), Some("ERR line too long"));
    assert_eq!(
        tcp.read_line(WAIT),
        None,
        "the connection is closed after `ERR line too long`"
    );
}

fn malformed_udp_datagrams_are_counted(server: &Server) {
    let rejected = |s: &Server| {
        s.metrics()
            .sum_where("ringcast_ingest_rejected_total", &[("source", "udp")])
    };
    let before = rejected(server);
    for datagram in [&b"nospace"[..], b"bad!chan payload", b"empty.payload "] {
        server.udp_send_raw(datagram);
    }
    wait_until(
        WAIT,
        "3 malformed UDP datagrams are counted as rejected",
        || (rejected(server) >= before + 3.0).then_some(()),
    );
}

/// Regression: JSON with invalid UTF-8 inside a string (`{"t":"\xc3("}`) passed as
/// JSON and went out byte for byte in text frames, closing every strict client with
/// 1007 (the bystander's client checks UTF-8 and would fail); raw invalid bytes were
/// turned into U+FFFD without a word. Every path now refuses them, naming the byte.
fn payloads_that_are_not_utf8_are_refused_on_every_ingest_path(server: &Server) {
    let poison: [&[u8]; 3] = [
        b"{\"t\":\"\xc3(\"}",
        b"{\"t\":\"\xed\xa0\x80\"}",
        b"{\"t\":\"\xc0\xaf\"}",
    ];
    let invalid_utf8 = |s: &Server, source: &str| {
        s.metrics().sum_where(
            "ringcast_ingest_rejected_total",
            &[("source", source), ("reason", "invalid_utf8")],
        )
    };
    for payload in poison {
        let r = server.http_publish(Some("bad.tcp"), payload);
        assert_eq!(r.status, 400, "HTTP publish of {payload:?}: {}", r.text());
        assert_eq!(
            r.json()["error"],
            "payload is not valid UTF-8 at byte 6",
            "{payload:?}"
        );
    }
    let mut tcp = server.tcp_ingest();
    for payload in poison {
        let mut line = b"bad.tcp ".to_vec();
        line.extend_from_slice(payload);
        line.push(b'\n');
        tcp.send_raw(&line);
        assert_eq!(
            tcp.read_line(WAIT).as_deref(),
            Some("ERR payload is not valid UTF-8 at byte 6"),
            "TCP line {line:?}"
        );
    }
    let before = invalid_utf8(server, "udp");
    for payload in poison {
        let mut datagram = b"bad.tcp ".to_vec();
        datagram.extend_from_slice(payload);
        server.udp_send_raw(&datagram);
    }
    wait_until(WAIT, "3 UDP datagrams counted as invalid_utf8", || {
        (invalid_utf8(server, "udp") >= before + 3.0).then_some(())
    });
    assert_eq!(invalid_utf8(server, "http"), 3.0);
    assert_eq!(invalid_utf8(server, "tcp"), 3.0);
}

fn bad_http_publishes_get_400_or_413(server: &Server) {
    let cases: [(Option<&str>, Vec<u8>, u16); 4] = [
        (None, b"no channel".to_vec(), 400),
        (Some("bad!name"), b"x".to_vec(), 400),
        (Some("empty.body"), Vec::new(), 400),
        (Some("too.big"), vec![b'a'; 2 * MAX_MESSAGE_SIZE], 413),
    ];
    for (channel, body, status) in cases {
        let r = server.http_publish(channel, &body);
        assert_eq!(
            r.status,
            status,
            "POST /publish channel={channel:?} with {} bytes: {}",
            body.len(),
            r.text()
        );
        if status == 400 {
            assert!(
                r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
                "a 400 from /publish carries {{\"error\":...}}: {}",
                r.text()
            );
        }
    }
}
