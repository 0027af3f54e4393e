//! The browser client (clients/js/ringcast.js) in a real headless Chromium: it receives
//! messages published over the admin HTTP API with exact offsets, follows a durable inbox
//! channel across a server restart (SIGTERM drain, new process on the same ports) without
//! losing or repeating a message, and the example page shows what it received: the
//! count on the page is checked, and a screenshot is saved under
//! target/browser-artifacts/ with its path printed to the log (`artifact: ...`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::admin::http_publish_acked;
use crate::common::browser::query_escape;
use crate::common::inbox::{drain_behind_shut_gate, wait_for_refused_attempt, InboxServer};
use crate::common::*;
use serde_json::{json, Value};

const SECRET: &str = "ringcast-browser-test-secret-0123456789";

fn harness(ws_url: &str, channels: &str, extra: &str) -> String {
    format!(
        "test/browser_harness.html?url={}&channels={}{extra}",
        query_escape(ws_url),
        query_escape(channels)
    )
}

/// `(channel, offset)` of every message the page's client delivered, in order.
fn delivered(browser: &mut Browser) -> Vec<(String, u64)> {
    let v = browser.eval("window.log.messages.map(m => [m.channel, m.offset])");
    v.as_array()
        .expect("array of messages")
        .iter()
        .map(|p| {
            (
                p[0].as_str().expect("channel").to_string(),
                p[1].as_u64().expect("offset"),
            )
        })
        .collect()
}

fn artifact_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("browser-artifacts")
}

#[test]
fn browser_receives_websocket_messages_with_exact_offsets() {
    let _deadline = Deadline::new(
        "browser_receives_websocket_messages_with_exact_offsets",
        Duration::from_secs(120),
    );
    let server = Server::start(&[]);
    let mut browser = Browser::start();
    let ws = format!("ws://127.0.0.1:{}/ws", server.ws_port);
    browser.open(&harness(&ws, "news,room:1", ""));
    browser.wait(
        "window.log.subscribed.length === 2",
        Duration::from_secs(20),
    );
    let subscribed = browser.eval("window.log.subscribed");
    for s in subscribed.as_array().expect("array") {
        assert_eq!(s["offset"], 0, "fresh channels start at 0: {subscribed}");
        assert!(
            s["epoch"].as_str().is_some_and(|e| !e.is_empty()),
            "{subscribed}"
        );
    }

    for i in 1..=5 {
        for channel in ["news", "room:1"] {
            let r = server.http_publish(Some(channel), format!("{{\"n\":{i}}}").as_bytes());
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["offset"], i, "{}", r.text());
        }
    }
    browser.wait("window.log.messages.length >= 10", Duration::from_secs(20));
    let got = delivered(&mut browser);
    for channel in ["news", "room:1"] {
        let offsets: Vec<u64> = got
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5], "{channel}: {got:?}");
    }
    assert_eq!(got.len(), 10, "{got:?}");
    let data =
        browser.eval("window.log.messages.filter(m => m.channel === 'news').map(m => m.data.n)");
    assert_eq!(data, json!([1, 2, 3, 4, 5]));
    let states = browser.eval("window.log.states.map(s => s.state + ':' + s.transport)");
    assert_eq!(
        states,
        json!(["connecting:websocket", "connected:websocket"]),
        "one connection, over WebSocket"
    );
    browser.assert_no_page_errors();
}

#[test]
fn browser_follows_an_inbox_channel_across_a_restart_without_loss() {
    let _deadline = Deadline::new(
        "browser_follows_an_inbox_channel_across_a_restart_without_loss",
        Duration::from_secs(180),
    );
    let inbox = InboxServer::new(SECRET);
    let mut server = inbox.start();
    let ports = server.ports();
    // The browser reaches the server through a gate, so the test decides when it may
    // reconnect: after the messages published while it was away.
    let gate = TcpGate::start(server.ws_addr());
    let mut browser = Browser::start();
    let token = browser.token_for(SECRET, "alice");
    let ws = format!("ws://127.0.0.1:{}/ws", gate.port);
    browser.open(&harness(
        &ws,
        "user:alice",
        &format!(
            "&token={}&minDelay=200&maxDelay=2000&transports=websocket",
            query_escape(&token)
        ),
    ));
    browser.wait(
        "window.log.subscribed.length === 1",
        Duration::from_secs(20),
    );

    let publish = |server: &Server, range: std::ops::RangeInclusive<u64>| {
        for n in range {
            let offset = http_publish_acked(server, "user:alice", &format!("{{\"n\":{n}}}"));
            assert_eq!(offset, n, "inbox offsets continue across the restart");
        }
    };
    publish(&server, 1..=5);
    browser.wait("window.log.messages.length >= 5", Duration::from_secs(20));

    drain_behind_shut_gate(&mut server, &gate);
    let close = browser.wait(
        "window.log.states.find(s => s.state === 'disconnected')",
        Duration::from_secs(10),
    );
    assert_eq!(close["code"], 1001, "a drain closes with 1001: {close}");
    assert!(
        close["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("reconnect after ")),
        "{close}"
    );
    let server = inbox.restart_on(ports);
    // Published while the client is away: it comes back for them with `since`.
    publish(&server, 6..=10);
    wait_for_refused_attempt(&gate);
    assert_eq!(
        gate.relayed(),
        1,
        "no connection but the first one got through"
    );
    gate.open();
    browser.wait(
        "window.log.states.filter(s => s.state === 'connected').length === 2",
        Duration::from_secs(30),
    );
    browser.wait("window.log.messages.length >= 10", Duration::from_secs(20));
    publish(&server, 11..=15);
    browser.wait("window.log.messages.length >= 15", Duration::from_secs(20));

    let got = delivered(&mut browser);
    let expected: Vec<(String, u64)> = (1..=15).map(|o| ("user:alice".to_string(), o)).collect();
    assert_eq!(got, expected, "every message exactly once, in order");
    let data = browser.eval("window.log.messages.map(m => m.data.n)");
    assert_eq!(data, json!((1..=15).collect::<Vec<u64>>()));
    let subscribed: Value = browser.eval("window.log.subscribed");
    assert_eq!(subscribed[1]["recovered"], true, "{subscribed}");
    assert_eq!(
        subscribed[0]["epoch"], subscribed[1]["epoch"],
        "an inbox channel keeps its epoch across restarts: {subscribed}"
    );
    let gaps = browser.eval("window.log.gaps");
    assert_eq!(gaps, json!([]));
    browser.assert_no_page_errors();
    println!(
        "restart: {} refused attempt(s) while away; states {}",
        gate.refused(),
        browser.eval("JSON.stringify(window.log.states)")
    );
}

#[test]
fn example_page_shows_the_messages_it_received() {
    let _deadline = Deadline::new(
        "example_page_shows_the_messages_it_received",
        Duration::from_secs(120),
    );
    let server = Server::start(&[]);
    let mut browser = Browser::start();
    let ws = format!("ws://127.0.0.1:{}/ws", server.ws_port);
    browser.open(&format!(
        "example.html?url={}&channels=news,alerts",
        query_escape(&ws)
    ));
    browser.wait(
        "window.ringcast.position('news').epoch !== null && window.ringcast.position('alerts').epoch !== null",
        Duration::from_secs(20),
    );
    for i in 1..=5 {
        let r = server.http_publish(
            Some("news"),
            format!("{{\"title\":\"story {i}\"}}").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for text in ["disk almost full", "deploy finished"] {
        let r = server.http_publish(Some("alerts"), text.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let count = browser.wait(
        "document.getElementById('count').textContent === '7' && document.getElementById('count').textContent",
        Duration::from_secs(20),
    );
    assert_eq!(count, "7");
    let rows = browser.eval("[...document.querySelectorAll('#last li')].map(li => li.textContent)");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert_eq!(
        rows[0], "alerts #2 \"deploy finished\"",
        "newest first: {rows:?}"
    );
    assert_eq!(
        browser.eval("document.getElementById('state').dataset.state"),
        "connected"
    );
    let png = artifact_dir().join("example_page.png");
    browser.screenshot(&png);
    let bytes = std::fs::read(&png).expect("reading the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000,
        "not a PNG: {}",
        png.display()
    );
    // Written to the process's stderr itself, not through the test harness's captured
    // `println!`: the path shows in every log of the run, passing or not.
    let _ = writeln!(
        std::io::stderr(),
        "artifact: screenshot of the example page: {}",
        png.display()
    );
    browser.assert_no_page_errors();
}
