//! Recovery under continuous publishing, checked by an independent client: Python
//! subscribers (the `websockets` package, tests/clients/py_recover.py) keep dropping
//! their connection and coming back with `subscribe` + `since` while a TCP publisher
//! writes 20,000 messages to one channel. Over two shards, each subscriber must end with
//! every offset after its first position exactly once, in order, every reconnect
//! answered `recovered: true`; unknown epochs and offsets ahead of the channel answer
//! `recovered: false` with the documented reason.

use std::time::Duration;

use crate::common::admin::http_publish_offset;
use crate::common::*;

#[test]
fn recovery_replays_missed_messages_under_publishing() {
    let _deadline = Deadline::new(
        "recovery_replays_missed_messages_under_publishing",
        Duration::from_secs(120),
    );
    let server = Server::start(&[
        "--history-size",
        "100000",
        "--max-recovery-messages",
        "100000",
    ]);
    let ws = format!("ws://{}/ws", server.ws_addr());
    let tcp = server.tcp_addr().to_string();
    let summary = python::run_script(
        "py_recover.py",
        &[
            "--ws",
            &ws,
            "--tcp",
            &tcp,
            "--channel",
            "rec:1",
            "--messages",
            "20000",
            "--rate",
            "10000",
            "--subscribers",
            "4",
            "--timeout",
            "90",
        ],
    )
    .summary();
    assert!(
        summary["reconnects"].as_u64().unwrap_or(0) >= 8,
        "too few reconnects to mean anything: {summary}"
    );
    let metrics = server.metrics();
    assert!(metrics.sum_where("ringcast_recoveries_total", &[("result", "recovered")]) >= 8.0);
    assert!(metrics.sum("ringcast_history_replayed_total") > 0.0);
    println!("{summary}");
}

/// `since` on the upgrade URL (the position token of docs/protocol.md, also SSE's
/// `id:`): a channel named there with a position gets the `subscribe` reply with
/// `recovered` and its missed messages first, exactly like the command; one without an
/// entry stays silent and live, as URL channels always were.
#[test]
fn since_on_the_upgrade_url_resumes_those_channels() {
    let _deadline = Deadline::new(
        "since_on_the_upgrade_url_resumes_those_channels",
        Duration::from_secs(30),
    );
    let server = Server::start(&[]);
    let base = format!("ws://{}/ws", server.ws_addr());
    let mut first = Subscriber::connect(&format!("{base}?channels=url:a"));
    let sub = first.request(
        &serde_json::json!({"cmd":"subscribe","channel":"url:b"}),
        Duration::from_secs(5),
    );
    let epoch_b = sub["epoch"].as_str().expect("epoch").to_string();
    for n in 1..=3 {
        http_publish_offset(&server, "url:a", &format!("{{\"n\":{n}}}"));
        http_publish_offset(&server, "url:b", &format!("{{\"n\":{n}}}"));
    }
    let got = first.collect(6, Duration::from_secs(5));
    let mut seen: Vec<(String, u64)> = got.iter().map(|d| (d.channel.clone(), d.offset)).collect();
    seen.sort();
    let expected: Vec<(String, u64)> = ["url:a", "url:b"]
        .iter()
        .flat_map(|c| (1..=3).map(move |o| (c.to_string(), o)))
        .collect();
    assert_eq!(seen, expected);
    first.close();
    // Away: 4 and 5 are published to both.
    for n in 4..=5 {
        http_publish_offset(&server, "url:a", &format!("{{\"n\":{n}}}"));
        http_publish_offset(&server, "url:b", &format!("{{\"n\":{n}}}"));
    }
    let since = format!("url:b~3~{epoch_b}");
    let mut again = Subscriber::connect(&format!("{base}?channels=url:a,url:b&since={since}"));
    let reply = again.next_reply(Duration::from_secs(5));
    assert_eq!(reply["reply"], "subscribe", "{reply}");
    assert_eq!(reply["channel"], "url:b", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["offset"], 5, "{reply}");
    let replayed = again.collect_without_replies(2, Duration::from_secs(5));
    let offsets: Vec<(String, u64)> = replayed
        .iter()
        .map(|d| (d.channel.clone(), d.offset))
        .collect();
    assert_eq!(
        offsets,
        vec![("url:b".to_string(), 4), ("url:b".to_string(), 5)]
    );
    // Live from here on both, url:a without a reply (no position was given for it).
    http_publish_offset(&server, "url:a", "{\"n\":6}");
    http_publish_offset(&server, "url:b", "{\"n\":6}");
    // A reply for url:a here would fail the collector.
    let live = again.collect_without_replies(2, Duration::from_secs(5));
    let mut offsets: Vec<(String, u64)> =
        live.iter().map(|d| (d.channel.clone(), d.offset)).collect();
    offsets.sort();
    assert_eq!(
        offsets,
        vec![("url:a".to_string(), 6), ("url:b".to_string(), 6)]
    );
    // A malformed position is refused before the upgrade.
    let bad = http::send_raw(
        server.ws_addr(),
        b"GET /ws?channels=url:a&since=url:a~x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .expect("upgrade request");
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("bad position"), "{}", bad.text());
}
