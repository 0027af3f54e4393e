//! The browser client (clients/js/ringcast.js, in headless Chromium) publishes over its
//! WebSocket where the namespace allows it (the promise resolves with the offset, or
//! rejects with the server's 403), reports presence join events, and stops delivering a
//! channel once unsubscribed.

use std::time::Duration;

use crate::common::browser::query_escape;
use crate::common::*;
use serde_json::json;

const NAMESPACES: &str =
    "[namespaces.room]\nallow_publish = true\npresence = true\njoin_leave = true\n";

#[test]
fn browser_publishes_sees_presence_and_unsubscribes() {
    let _deadline = Deadline::new(
        "browser_publishes_sees_presence_and_unsubscribes",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("ringcast.toml");
    std::fs::write(&config, NAMESPACES).expect("writing the config file");
    let server = Server::start(&["--config", config.to_str().expect("utf-8 temp path")]);
    let mut browser = Browser::start();
    let ws = format!("ws://127.0.0.1:{}/ws", server.ws_port);
    browser.open(&format!(
        "test/browser_harness.html?url={}&channels=room:1,news",
        query_escape(&ws)
    ));
    browser.wait(
        "window.log.subscribed.length === 2",
        Duration::from_secs(20),
    );

    let join = browser.wait("window.log.presence[0]", Duration::from_secs(10));
    assert_eq!(join["type"], "join", "{join}");
    assert_eq!(join["channel"], "room:1", "{join}");
    assert!(
        join["member"]["conn"].is_string(),
        "anonymous member: {join}"
    );

    let reply = browser.eval("window.rc.publish('room:1', {hi: 1})");
    assert_eq!(reply, json!({"channel": "room:1", "offset": 1}));
    let refused = browser
        .eval("window.rc.publish('news', 1).then(() => 'published', e => [e.code, e.message])");
    assert_eq!(
        refused[0], 403,
        "news does not allow client publishes: {refused}"
    );
    browser.wait("window.log.messages.length === 1", Duration::from_secs(10));
    assert_eq!(
        browser.eval("window.log.messages[0]"),
        json!({"channel": "room:1", "offset": 1, "data": {"hi": 1}})
    );

    browser.eval("window.rc.unsubscribe('room:1'), window.rc.subscribe('room:2'), 1");
    browser.wait(
        "window.log.subscribed.some(s => s.channel === 'room:2')",
        Duration::from_secs(10),
    );
    for channel in ["room:1", "room:2", "news"] {
        let r = server.http_publish(Some(channel), b"\"after\"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    browser.wait("window.log.messages.length >= 3", Duration::from_secs(10));
    assert_eq!(
        browser.eval("window.log.messages.map(m => m.channel + '#' + m.offset)"),
        json!(["room:1#1", "room:2#1", "news#1"]),
        "nothing from room:1 after unsubscribe"
    );
    assert_eq!(browser.eval("window.rc.position('room:1')"), json!(null));

    // close() stops for good; connect() starts again and resumes every channel.
    browser.eval("window.rc.close(), 1");
    assert_eq!(browser.eval("window.rc.state"), "closed");
    let r = server.http_publish(Some("news"), b"\"while closed\"");
    assert_eq!(r.status, 200, "{}", r.text());
    browser.eval("window.rc.connect(), 1");
    browser.wait("window.log.messages.length >= 4", Duration::from_secs(20));
    let last = browser.eval("window.log.messages[3]");
    assert_eq!(
        last,
        json!({"channel": "news", "offset": 2, "data": "while closed"})
    );
    let resumed = browser
        .eval("window.log.subscribed.filter(s => s.recovered === true).map(s => s.channel).sort()");
    assert_eq!(resumed, json!(["news", "room:2"]));
    browser.assert_no_page_errors();
}
