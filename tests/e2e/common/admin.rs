//! Calls on the admin port that several tests make.

use serde_json::Value;

use super::{http, Server};

/// Publishes `body` to `channel` over HTTP with `ack=1` (written to the inbox when it is
/// an inbox channel); the offset it got.
pub fn http_publish_acked(server: &Server, channel: &str, body: &str) -> u64 {
    let r = http::request(
        server.admin_addr(),
        "POST",
        &format!("/publish?channel={channel}&ack=1"),
        &[],
        body.as_bytes(),
    )
    .expect("HTTP publish");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["offset"].as_u64().expect("offset")
}

/// `POST /admin/disconnect?user=…`: the server ends every connection of `user`; its
/// answer.
pub fn admin_disconnect(server: &Server, user: &str) -> Value {
    let r = http::request(
        server.admin_addr(),
        "POST",
        &format!("/admin/disconnect?user={user}"),
        &[],
        b"",
    )
    .expect("POST /admin/disconnect");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}
