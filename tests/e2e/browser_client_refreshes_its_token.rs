//! The browser client (clients/js/ringcast.js, in headless Chromium) keeps a connection
//! whose tokens live only seconds: it calls getToken() shortly before each token's `exp`
//! and sends `refresh`, so the server never closes it with 4401.

use std::time::Duration;

use crate::common::browser::query_escape;
use crate::common::*;
use serde_json::json;

const SECRET: &str = "ringcast-browser-test-secret-0123456789";
/// Token lifetime in seconds; the client refreshes 2 s before `exp` (its floor, as the
/// server checks expiry in whole seconds and may close up to a second early).
const TTL: u64 = 6;

#[test]
fn browser_refreshes_short_lived_tokens_without_reconnecting() {
    let _deadline = Deadline::new(
        "browser_refreshes_short_lived_tokens_without_reconnecting",
        Duration::from_secs(120),
    );
    // No leeway: a token not refreshed in time closes the connection within a second.
    let server = Server::start(&["--jwt-secret", SECRET, "--jwt-leeway", "0"]);
    let mut browser = Browser::start();
    let ws = format!("ws://127.0.0.1:{}/ws", server.ws_port);
    browser.open(&format!(
        "test/browser_harness.html?url={}&channels=news&secret={}&sub=alice&ttl={TTL}&transports=websocket",
        query_escape(&ws),
        query_escape(SECRET)
    ));
    browser.wait(
        "window.log.subscribed.length === 1",
        Duration::from_secs(20),
    );
    // Three tokens: the connection has outlived the first two's `exp`.
    let tokens = browser.wait(
        "window.log.tokens.length >= 3 && window.log.tokens",
        Duration::from_secs(TTL * 4 + 10),
    );
    let first_exp = tokens[0]["exp"].as_u64().expect("exp");
    let third_iat = tokens[2]["iat"].as_u64().expect("iat");
    assert!(third_iat >= first_exp, "{tokens}");
    let r = server.http_publish(Some("news"), b"{\"still\":\"here\"}");
    assert_eq!(r.status, 200, "{}", r.text());
    browser.wait("window.log.messages.length === 1", Duration::from_secs(10));
    let states = browser.eval("window.log.states.map(s => s.state)");
    assert_eq!(
        states,
        json!(["connecting", "connected"]),
        "one connection all along: {}",
        browser.eval("JSON.stringify(window.log)")
    );
    assert_eq!(browser.eval("window.log.errors"), json!([]));
    browser.assert_no_page_errors();
}
