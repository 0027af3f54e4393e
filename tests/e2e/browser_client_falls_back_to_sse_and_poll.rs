//! Where WebSocket cannot connect, the browser client (clients/js/ringcast.js, in
//! headless Chromium) falls back to Server-Sent Events (`/sse`), and where that fails
//! too, to long-polling (`/poll`) (docs/protocol.md, "SSE and long-poll"). The page is
//! served from another origin than ringcast, so CORS is exercised as in production.
//! Messages arrive gap-free with exact offsets, whatever the transport.

use std::time::Duration;

use crate::common::admin::publish_numbered;
use crate::common::browser::query_escape;
use crate::common::*;
use serde_json::json;

fn offsets(browser: &mut Browser, channel: &str) -> serde_json::Value {
    browser.eval(&format!(
        "window.log.messages.filter(m => m.channel === '{channel}').map(m => m.offset)"
    ))
}

fn falls_back_to(transport: &str, refused_sse: bool) {
    let server = Server::start(&[]);
    let mut browser = Browser::start();
    // Nothing listens there: every WebSocket attempt fails before it opens.
    let refused = free_tcp_port();
    let sse = if refused_sse {
        format!("http://127.0.0.1:{}/sse", free_tcp_port())
    } else {
        format!("http://127.0.0.1:{}/sse", server.ws_port)
    };
    let poll = format!("http://127.0.0.1:{}/poll", server.ws_port);
    browser.open(&format!(
        "test/browser_harness.html?url={}&sseUrl={}&pollUrl={}&channels=news,room:1\
         &minDelay=100&maxDelay=400&fallbackAfter=2",
        query_escape(&format!("ws://127.0.0.1:{refused}/ws")),
        query_escape(&sse),
        query_escape(&poll),
    ));
    let connected = browser.wait(
        "window.log.states.find(s => s.state === 'connected')",
        Duration::from_secs(30),
    );
    assert_eq!(
        connected["transport"],
        transport,
        "states: {}",
        browser.eval("JSON.stringify(window.log.states)")
    );
    browser.wait(
        "window.log.subscribed.length === 2",
        Duration::from_secs(20),
    );

    publish_numbered(&server, "news", 1..=20);
    publish_numbered(&server, "room:1", 1..=5);
    browser.wait("window.log.messages.length >= 25", Duration::from_secs(30));
    assert_eq!(
        offsets(&mut browser, "news"),
        json!((1..=20).collect::<Vec<u64>>())
    );
    assert_eq!(
        offsets(&mut browser, "room:1"),
        json!((1..=5).collect::<Vec<u64>>())
    );
    assert_eq!(browser.eval("window.log.gaps"), json!([]));
    assert_eq!(
        browser.eval(
            "window.log.messages.filter(m => m.channel === 'news').map(m => m.data.n).join()"
        ),
        json!((1..=20)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(","))
    );
    // Still on the fallback transport, one connection: nothing was re-delivered.
    assert_eq!(
        browser.eval("window.log.states.filter(s => s.state === 'connected').length"),
        1
    );
    assert_eq!(browser.eval("window.rc.transport"), transport);
    browser.assert_no_page_errors();
}

#[test]
fn browser_falls_back_to_sse_when_websocket_cannot_connect() {
    let _deadline = Deadline::new(
        "browser_falls_back_to_sse_when_websocket_cannot_connect",
        Duration::from_secs(120),
    );
    falls_back_to("sse", false);
}

#[test]
fn browser_falls_back_to_long_poll_when_websocket_and_sse_cannot_connect() {
    let _deadline = Deadline::new(
        "browser_falls_back_to_long_poll_when_websocket_and_sse_cannot_connect",
        Duration::from_secs(120),
    );
    falls_back_to("poll", true);
}

/// WebSocket blocked (a shut gate), so the client runs on SSE; once WebSocket gets
/// through again, the client switches back to it by itself, and the channel continues
/// across the switch with no gap and no duplicate.
#[test]
fn browser_returns_to_websocket_when_it_works_again() {
    let _deadline = Deadline::new(
        "browser_returns_to_websocket_when_it_works_again",
        Duration::from_secs(120),
    );
    let server = Server::start(&[]);
    let gate = TcpGate::start(server.ws_addr());
    gate.shut();
    let mut browser = Browser::start();
    browser.open(&format!(
        "test/browser_harness.html?url={}&sseUrl={}&channels=news\
         &minDelay=100&maxDelay=400&fallbackAfter=2&retryWebSocketAfter=3000",
        query_escape(&format!("ws://127.0.0.1:{}/ws", gate.port)),
        query_escape(&format!("http://127.0.0.1:{}/sse", server.ws_port)),
    ));
    browser.wait(
        "window.log.states.find(s => s.state === 'connected' && s.transport === 'sse')",
        Duration::from_secs(30),
    );
    browser.wait(
        "window.log.subscribed.length === 1",
        Duration::from_secs(20),
    );
    publish_numbered(&server, "news", 1..=10);
    browser.wait("window.log.messages.length >= 10", Duration::from_secs(20));
    gate.open();
    browser.wait(
        "window.log.states.find(s => s.state === 'connected' && s.transport === 'websocket')",
        Duration::from_secs(30),
    );
    browser.wait(
        "window.log.subscribed.length === 2",
        Duration::from_secs(20),
    );
    let resubscribed = browser.eval("window.log.subscribed[1]");
    assert_eq!(resubscribed["recovered"], true, "{resubscribed}");
    for i in 11..=20 {
        let r = server.http_publish(Some("news"), format!("{{\"n\":{i}}}").as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    browser.wait("window.log.messages.length >= 20", Duration::from_secs(20));
    assert_eq!(
        offsets(&mut browser, "news"),
        json!((1..=20).collect::<Vec<u64>>())
    );
    assert_eq!(browser.eval("window.rc.transport"), "websocket");
    assert!(gate.relayed() >= 1);
    browser.assert_no_page_errors();
}

/// A refused SSE stream is visible to the client (unlike a refused WebSocket handshake):
/// at the connection limit `/sse` answers 503 + Retry-After, the client waits at least
/// that long (not its short backoff), and connects once a slot is free.
#[test]
fn browser_waits_the_retry_after_of_a_503_on_sse() {
    let _deadline = Deadline::new(
        "browser_waits_the_retry_after_of_a_503_on_sse",
        Duration::from_secs(120),
    );
    let server = Server::start(&["--max-connections", "1"]);
    let holder = server.subscribe(&["news"]);
    server.wait_for_connections(1, Duration::from_secs(10));
    let mut browser = Browser::start();
    browser.open(&format!(
        "test/browser_harness.html?sseUrl={}&channels=news&transports=sse&minDelay=100&maxDelay=400",
        query_escape(&format!("http://127.0.0.1:{}/sse", server.ws_port)),
    ));
    let refused = browser.wait(
        "window.log.states.find(s => s.state === 'disconnected')",
        Duration::from_secs(20),
    );
    assert_eq!(refused["status"], 503, "{refused}");
    // ringcast's 503s carry Retry-After: 5; the backoff alone would wait under 100 ms.
    assert!(
        refused["delay"].as_f64().is_some_and(|d| d >= 5000.0),
        "the client did not wait the Retry-After: {refused}"
    );
    let error = browser.eval("window.log.errors[0]");
    assert_eq!(error["code"], 503, "{error}");
    drop(holder);
    browser.wait(
        "window.log.states.find(s => s.state === 'connected' && s.transport === 'sse')",
        Duration::from_secs(30),
    );
    browser.wait(
        "window.log.subscribed.length === 1",
        Duration::from_secs(20),
    );
    browser.assert_no_page_errors();
}
