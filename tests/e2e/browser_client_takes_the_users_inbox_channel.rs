//! With `subscribe_user_channel`, the server subscribes a token's connection to its
//! `user:<sub>` inbox channel at connect. The browser client (clients/js/ringcast.js, in
//! headless Chromium) delivers that channel although the page never named it, keeps its
//! position, and after a reconnect (an admin disconnect, 4403), where the server sends
//! every unacked message again, delivers none twice.

use std::time::Duration;

use crate::common::admin::{admin_disconnect, http_publish_acked};
use crate::common::browser::query_escape;
use crate::common::*;
use serde_json::json;

const SECRET: &str = "ringcast-browser-test-secret-0123456789";

#[test]
fn browser_delivers_the_inbox_channel_the_server_subscribed_it_to() {
    let _deadline = Deadline::new(
        "browser_delivers_the_inbox_channel_the_server_subscribed_it_to",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--inbox",
        "true",
        "--data-dir",
        dir.path().to_str().expect("utf-8 temp dir"),
        "--subscribe-user-channel",
        "true",
    ]);
    for n in 1..=3 {
        assert_eq!(
            http_publish_acked(&server, "user:bob", &format!("{{\"n\":{n}}}")),
            n
        );
    }
    let mut browser = Browser::start();
    let token = browser.token_for(SECRET, "bob");
    let ws = format!("ws://127.0.0.1:{}/ws", server.ws_port);
    // No channels: the page only connects with its token.
    browser.open(&format!(
        "test/browser_harness.html?url={}&token={}&minDelay=100&maxDelay=500&transports=websocket",
        query_escape(&ws),
        query_escape(&token)
    ));
    browser.wait("window.log.messages.length >= 3", Duration::from_secs(20));
    let subscribed = browser.eval("window.log.subscribed[0]");
    assert_eq!(subscribed["channel"], "user:bob", "{subscribed}");
    assert_eq!(subscribed["inbox"]["unacked"], 3, "{subscribed}");

    // The server closes it (4403); the client reconnects, is subscribed again by the
    // server (all 3 unacked follow again) and asks with `since` itself (409).
    admin_disconnect(&server, "bob");
    browser.wait(
        "window.log.states.filter(s => s.state === 'connected').length === 2",
        Duration::from_secs(20),
    );
    let again = browser.wait("window.log.subscribed[1]", Duration::from_secs(20));
    assert_eq!(again["recovered"], true, "same inbox history: {again}");
    assert_eq!(http_publish_acked(&server, "user:bob", "{\"n\":4}"), 4);
    browser.wait("window.log.messages.length >= 4", Duration::from_secs(20));
    assert_eq!(
        browser.eval("window.log.messages.map(m => m.channel + '#' + m.offset + ':' + m.data.n)"),
        json!([
            "user:bob#1:1",
            "user:bob#2:2",
            "user:bob#3:3",
            "user:bob#4:4"
        ]),
        "each message once, in order; subscribe replies {}",
        browser.eval("JSON.stringify(window.log.subscribed)")
    );
    let close = browser.eval("window.log.states.find(s => s.state === 'disconnected')");
    assert_eq!(close["code"], 4403, "{close}");
    assert_eq!(browser.eval("window.log.errors"), json!([]));
    assert_eq!(
        browser.eval("window.rc.position('user:bob').offset"),
        4,
        "the position follows the adopted channel"
    );
    browser.assert_no_page_errors();
}
