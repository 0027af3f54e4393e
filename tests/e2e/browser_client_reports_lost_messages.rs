//! When what a browser client missed while away is gone from the server (the channel's
//! history is too small for it, or more than `max_recovery_messages` went by), the
//! client (clients/js/ringcast.js in headless Chromium) tells the application as
//! docs/clients.md says: a `subscribed` event with `recovered: false` and the server's
//! reason, then live messages from the channel's current offset, never a made-up
//! replay. Over SSE and long-poll, the transports whose position travels in the URL.
//!
//! The server ends the client's connection (`POST /admin/disconnect`), a shut gate keeps
//! it away while the channel moves on, then lets it back: no timing involved.

use std::time::Duration;

use crate::common::admin::{admin_disconnect, publish_numbered};
use crate::common::browser::query_escape;
use crate::common::*;
use serde_json::json;

const SECRET: &str = "ringcast-browser-gap-secret-0123456789";

fn loses_messages_while_away(transport: &str, server_args: &[&str], reason: &str) {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(server_args);
    let server = Server::start(&args);
    let gate = TcpGate::start(server.ws_addr());
    let mut browser = Browser::start();
    let token = browser.token_for(SECRET, "gina");
    let base = format!("127.0.0.1:{}", gate.port);
    browser.open(&format!(
        "test/browser_harness.html?sseUrl={}&pollUrl={}&channels=news&transports={transport}\
         &token={}&minDelay=200&maxDelay=1000",
        query_escape(&format!("http://{base}/sse")),
        query_escape(&format!("http://{base}/poll")),
        query_escape(&token),
    ));
    browser.wait(
        "window.log.subscribed.length === 1",
        Duration::from_secs(30),
    );
    publish_numbered(&server, "news", 1..=3);
    browser.wait("window.log.messages.length >= 3", Duration::from_secs(20));

    gate.shut();
    let closed = admin_disconnect(&server, "gina");
    if transport == "sse" {
        assert_eq!(closed["closed"], 1, "the stream was open: {closed}");
        let gone = browser.wait(
            "window.log.states.find(s => s.state === 'disconnected')",
            Duration::from_secs(10),
        );
        assert_eq!(
            gone["code"], 4403,
            "the close event's code reaches the client: {gone}"
        );
    }
    // (A long-poll client may be between two polls: it is kept away by the gate all the
    // same.)
    wait_until(
        Duration::from_secs(30),
        "the client tried to come back while the gate was shut",
        || (gate.refused() >= 1).then_some(()),
    );
    // The channel moves on well past what the server can replay.
    publish_numbered(&server, "news", 4..=20);
    gate.open();
    let resubscribed = browser.wait(
        "window.log.subscribed.length >= 2 && window.log.subscribed[1]",
        Duration::from_secs(30),
    );
    let epoch = browser.eval("window.log.subscribed[0].epoch");
    assert_eq!(
        resubscribed,
        json!({"channel": "news", "offset": 20, "epoch": epoch, "recovered": false, "reason": reason}),
        "the application is told what was lost"
    );
    publish_numbered(&server, "news", 21..=22);
    browser.wait("window.log.messages.length >= 5", Duration::from_secs(20));
    assert_eq!(
        browser.eval("window.log.messages.map(m => m.offset)"),
        json!([1, 2, 3, 21, 22]),
        "nothing replayed, live from the reply's offset"
    );
    assert_eq!(
        browser.eval("window.rc.position('news')"),
        json!({"offset": 22, "epoch": epoch})
    );
    // The reply said it: no gap event on top of it.
    assert_eq!(browser.eval("window.log.gaps"), json!([]));
    assert_eq!(browser.eval("window.rc.transport"), transport);
    browser.assert_no_page_errors();
    let metrics = server.metrics();
    metrics.assert_at_least(
        "ringcast_recoveries_total",
        &[("result", "not_recovered")],
        1.0,
    );
}

#[test]
fn sse_client_is_told_when_the_history_no_longer_reaches_back() {
    let _deadline = Deadline::new(
        "sse_client_is_told_when_the_history_no_longer_reaches_back",
        Duration::from_secs(120),
    );
    loses_messages_while_away("sse", &["--history-size", "5"], "too_old");
}

#[test]
fn long_poll_client_is_told_when_too_many_messages_went_by() {
    let _deadline = Deadline::new(
        "long_poll_client_is_told_when_too_many_messages_went_by",
        Duration::from_secs(120),
    );
    loses_messages_while_away(
        "poll",
        &["--history-size", "1000", "--max-recovery-messages", "5"],
        "too_many",
    );
}
