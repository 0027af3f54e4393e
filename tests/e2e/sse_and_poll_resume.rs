//! The HTTP transports of the WebSocket port, end to end with independent clients: a
//! stdlib Python SSE client (tests/clients/py_sse.py) and curl.
//!
//! SSE carries the same JSON as a WebSocket subscriber of the same channel, resumes with
//! Last-Event-ID without gap or duplicate while messages keep coming, honours `?since`,
//! tells an unknown position `recovered:false`, sends heartbeat comments and ends a drain
//! with the close event. Long-poll answers at once, holds until a publish, answers empty
//! at its timeout, and refuses bad parameters with a reason. CORS preflights, refused
//! origins and bad tokens get the documented answers.

use std::time::Duration;

use crate::common::curl::{curl_spawn, curl_text};
use crate::common::*;
use serde_json::Value;

/// The status line and headers (`-i` output up to the blank line) and the body.
fn split_response(text: &str) -> (String, String) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    (head.to_string(), body.to_string())
}

/// The `data:` payloads of an SSE stream, parsed.
fn sse_data(stream: &str) -> Vec<Value> {
    stream
        .split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad data {d:?}: {e}")))
        })
        .collect()
}

fn poll(server: &Server, query: &str) -> Value {
    let url = format!("http://{}/poll?{query}", server.ws_addr());
    let body = curl_text(&["--max-time", "70", &url]);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("poll {query}: {body:?}: {e}"))
}

#[test]
fn sse_matches_websocket_and_resumes_with_last_event_id_without_gaps() {
    let _deadline = Deadline::new(
        "sse_matches_websocket_and_resumes_with_last_event_id_without_gaps",
        Duration::from_secs(120),
    );
    let server = Server::start(&[
        "--history-size",
        "100000",
        "--max-recovery-messages",
        "100000",
    ]);
    // A WebSocket subscriber of the same channel, subscribed before anything is published.
    let mut ws = server.raw_ws(&["same"]);
    let run = python::run_script(
        "py_sse.py",
        &[
            "--addr",
            &server.ws_addr().to_string(),
            "--tcp",
            &server.tcp_addr().to_string(),
            "--channel",
            "same",
            "--messages",
            "2000",
            "--every",
            "150",
            "--timeout",
            "90",
        ],
    );
    let lines = run.assert_cases(&["resume"], &server.describe());
    let summary = lines.last().cloned().unwrap_or_default();
    assert!(
        summary["reconnects"].as_u64().unwrap_or(0) >= 5,
        "too few reconnects to mean anything: {summary}"
    );
    let sse: Vec<String> = lines
        .iter()
        .filter_map(|l| l["data"].as_str().map(str::to_string))
        .collect();
    assert_eq!(sse.len(), 2000, "{}", run.explain());
    for (i, data) in sse.iter().enumerate() {
        let frame = ws
            .read_frame(Duration::from_secs(10))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("WebSocket subscriber: message {} did not arrive", i + 1));
        assert_eq!(
            String::from_utf8_lossy(&frame.payload),
            *data,
            "SSE and WebSocket differ at message {}",
            i + 1
        );
    }
    let metrics = server.metrics();
    metrics.assert_at_least("ringcast_recoveries_total", &[("result", "recovered")], 5.0);
}

#[test]
fn sse_since_heartbeats_and_unknown_positions() {
    let _deadline = Deadline::new(
        "sse_since_heartbeats_and_unknown_positions",
        Duration::from_secs(60),
    );
    let server = Server::start(&["--ping-interval", "1"]);
    let first = poll(&server, "channels=h&timeout=1");
    let position = first["position"].as_str().expect("position").to_string();
    let epoch = position.rsplit('~').next().expect("epoch").to_string();
    for i in 1..=3 {
        let resp = server.http_publish(Some("h"), format!("{{\"n\":{i}}}").as_bytes());
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    let url = format!(
        "http://{}/sse?channels=h&since=h~1~{epoch}",
        server.ws_addr()
    );
    // Read for a few heartbeat intervals; curl's --max-time ends the stream.
    let out = curl_text(&["-N", "--max-time", "4", &url]);
    assert!(out.starts_with("retry: "), "{out:?}");
    assert!(out.contains("\n\n:\n\n"), "no heartbeat comment in {out:?}");
    let data = sse_data(&out);
    assert_eq!(data[0]["recovered"], true, "{out}");
    let offsets: Vec<u64> = data[1..]
        .iter()
        .filter_map(|d| d["offset"].as_u64())
        .collect();
    assert_eq!(offsets, [2, 3], "{out}");
    assert!(out.contains(&format!("id: h~3~{epoch}\ndata: ")), "{out}");
    // Last-Event-ID wins over ?since.
    let out = curl_text(&[
        "-N",
        "--max-time",
        "2",
        "-H",
        &format!("Last-Event-ID: h~2~{epoch}"),
        &url,
    ]);
    let offsets: Vec<u64> = sse_data(&out)
        .iter()
        .filter(|d| d.get("reply").is_none())
        .filter_map(|d| d["offset"].as_u64())
        .collect();
    assert_eq!(offsets, [3], "{out}");
    // An epoch the channel never had.
    let url = format!("http://{}/sse?channels=h&since=h~1~12345", server.ws_addr());
    let out = curl_text(&["-N", "--max-time", "2", &url]);
    let reply = &sse_data(&out)[0];
    assert_eq!(reply["recovered"], false, "{out}");
    assert_eq!(reply["reason"], "epoch_changed", "{out}");
    assert_eq!(reply["offset"], 3, "{out}");
    // A malformed token.
    let url = format!("http://{}/sse?channels=h&since=h~1", server.ws_addr());
    let (head, body) = split_response(&curl_text(&["-i", "--max-time", "5", &url]));
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("bad position"), "{body}");
}

#[test]
fn a_drain_ends_sse_streams_with_the_close_event() {
    let _deadline = Deadline::new(
        "a_drain_ends_sse_streams_with_the_close_event",
        Duration::from_secs(60),
    );
    let mut server = Server::start(&["--drain-window", "1"]);
    let url = format!("http://{}/sse?channels=d", server.ws_addr());
    let child = curl_spawn(&["-N", "--max-time", "30", &url]);
    server.wait_for_connections(1, Duration::from_secs(10));
    server.sigterm();
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = sse_data(&text).pop().expect("events");
    assert_eq!(last["type"], "close", "{text}");
    assert_eq!(last["code"], 1001, "{text}");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("reconnect after ")),
        "{text}"
    );
    // curl ended because the server closed the stream, not at its --max-time.
    assert!(out.status.success(), "curl: {:?}\n{text}", out.status);
}

#[test]
fn long_polls_answer_hold_and_time_out() {
    let _deadline = Deadline::new(
        "long_polls_answer_hold_and_time_out",
        Duration::from_secs(90),
    );
    let server = Server::start(&[]);
    // No position: the subscribe reply comes at once.
    let first = poll(&server, "channels=p,q&timeout=30");
    let events = first["events"].as_array().expect("events");
    assert_eq!(events.len(), 2, "{first}");
    assert_eq!(events[0]["reply"], "subscribe");
    assert_eq!(events[0]["channel"], "p");
    let position = first["position"].as_str().expect("position").to_string();
    // A recovered position with nothing new: held until a publish.
    let url = format!(
        "http://{}/poll?channels=p,q&timeout=30&since={position}",
        server.ws_addr()
    );
    let held = curl_spawn(&["--max-time", "60", &url]);
    server.wait_for_connections(1, Duration::from_secs(10));
    let resp = server.http_publish(Some("p"), b"{\"x\":1}");
    assert_eq!(resp.status, 200, "{resp:?}");
    let out = held.wait_with_output().expect("curl");
    let answer: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("held poll: {:?}: {e}", String::from_utf8_lossy(&out.stdout)));
    let events = answer["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{answer}");
    assert_eq!(events[0]["offset"], 1, "{answer}");
    assert_eq!(events[0]["data"]["x"], 1, "{answer}");
    let next = answer["position"].as_str().expect("position").to_string();
    assert!(next.contains("p~1~"), "{next}");
    // Nothing new within the timeout: empty events, same position.
    let empty = poll(&server, &format!("channels=p,q&timeout=1&since={next}"));
    assert_eq!(empty["events"], serde_json::json!([]), "{empty}");
    assert_eq!(empty["position"], next.as_str(), "{empty}");
    // Bad parameters say why.
    for (query, why) in [
        ("channels=p&timeout=0", "timeout"),
        ("channels=p&timeout=61", "timeout"),
        ("channels=p&since=p~1", "bad position"),
        ("channels=bad%20name", "invalid channel name"),
    ] {
        let url = format!("http://{}/poll?{query}", server.ws_addr());
        let (head, body) = split_response(&curl_text(&["-i", "--max-time", "5", &url]));
        assert!(head.starts_with("HTTP/1.1 400"), "{query}: {head}");
        assert!(body.contains(why), "{query}: {body}");
    }
    let url = format!("http://{}/poll?channels=p", server.ws_addr());
    let (head, _) = split_response(&curl_text(&["-i", "-X", "POST", "--max-time", "5", &url]));
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let metrics = server.metrics();
    assert!(
        metrics.sum_where(
            "ringcast_connections_closed_total",
            &[("reason", "poll_answered")]
        ) >= 3.0
    );
}

#[test]
fn cors_preflights_refused_origins_and_bad_tokens() {
    let _deadline = Deadline::new(
        "cors_preflights_refused_origins_and_bad_tokens",
        Duration::from_secs(60),
    );
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.test",
        "--jwt-secret",
        "0123456789abcdef0123456789abcdef",
        "--allow-anonymous",
        "true",
    ]);
    let base = format!("http://{}", server.ws_addr());
    let (head, _) = split_response(&curl_text(&[
        "-i",
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://app.test",
        "-H",
        "Access-Control-Request-Method: GET",
        "--max-time",
        "5",
        &format!("{base}/sse?channels=a"),
    ]));
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    for h in [
        "Access-Control-Allow-Origin: https://app.test",
        "Access-Control-Allow-Credentials: true",
        "Access-Control-Allow-Methods: GET",
        "Access-Control-Allow-Headers: Authorization, Last-Event-ID",
        "Access-Control-Max-Age: 600",
    ] {
        assert!(head.contains(h), "{h} missing in {head}");
    }
    for path in ["sse?channels=a", "poll?channels=a&timeout=1"] {
        let (head, body) = split_response(&curl_text(&[
            "-i",
            "-H",
            "Origin: https://evil.test",
            "--max-time",
            "5",
            &format!("{base}/{path}"),
        ]));
        assert!(head.starts_with("HTTP/1.1 403"), "{path}: {head}");
        assert_eq!(body, "forbidden: origin https://evil.test is not allowed\n");
    }
    let (head, body) = split_response(&curl_text(&[
        "-i",
        "-H",
        "Origin: https://app.test",
        "--max-time",
        "5",
        &format!("{base}/poll?channels=a&timeout=1"),
    ]));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Access-Control-Allow-Origin: https://app.test"),
        "{head}"
    );
    assert!(head.contains("Vary: Origin"), "{head}");
    assert!(body.starts_with("{\"events\":["), "{body}");
    let (head, body) = split_response(&curl_text(&[
        "-i",
        "-N",
        "--max-time",
        "5",
        &format!("{base}/sse?channels=a&token=not.a.jwt"),
    ]));
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(body.starts_with("unauthorized: "), "{body}");
}
