//! Calls on the admin port that several tests make: publishes that must succeed, and
//! metrics several tests wait on.

use std::ops::RangeInclusive;
use std::time::Duration;

use serde_json::Value;

use super::{http, Server};

/// Publishes `body` to `channel` over HTTP (`POST /publish?channel=…`); the offset it got.
///
/// # Panics
/// When the request fails or is not answered 200 with an offset.
pub fn http_publish_offset(server: &Server, channel: &str, body: &str) -> u64 {
    publish_for_offset(server, &format!("/publish?channel={channel}"), body)
}

/// Publishes `body` to `channel` over HTTP with `ack=1` (written to the inbox when it is
/// an inbox channel, acknowledged by the cluster when there is one); the offset it got.
///
/// # Panics
/// As [`http_publish_offset`].
pub fn http_publish_acked(server: &Server, channel: &str, body: &str) -> u64 {
    publish_for_offset(server, &format!("/publish?channel={channel}&ack=1"), body)
}

fn publish_for_offset(server: &Server, target: &str, body: &str) -> u64 {
    let r = http::request(server.admin_addr(), "POST", target, &[], body.as_bytes())
        .unwrap_or_else(|e| panic!("POST {target} {body}: {e}\n{}", server.describe()));
    assert_eq!(r.status, 200, "POST {target} {body}: {}", r.text());
    r.json()["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("POST {target} {body}: no offset in {}", r.text()))
}

/// Publishes `{"n":i}` to `channel` over HTTP for each `i` in `numbers`, and requires each
/// to get offset `i` (a new channel's first message has offset 1).
pub fn publish_numbered(server: &Server, channel: &str, numbers: RangeInclusive<u64>) {
    for i in numbers {
        let offset = http_publish_offset(server, channel, &format!("{{\"n\":{i}}}"));
        assert_eq!(offset, i, "the offset of {{\"n\":{i}}} on {channel}");
    }
}

/// Connections the server has closed as slow consumers so far.
pub fn slow_consumer_closes(server: &Server) -> f64 {
    server.metrics().sum_where(
        "ringcast_connections_closed_total",
        &[("reason", "slow_consumer")],
    )
}

/// Waits until `ringcast_inbox_up` reads `up` (1: the inbox store serves; 0: it does not).
pub fn wait_inbox_up(server: &Server, up: f64) {
    server.wait_for_metric(
        "ringcast_inbox_up",
        &format!("ringcast_inbox_up == {up}"),
        Duration::from_secs(30),
        |v| v == up,
    );
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
