//! The cluster inbox never gives an offset twice (docs/cluster.md, "Offsets, acks,
//! epoch"): one ringcast node with the inbox in JetStream and `inbox_retention = 2`,
//! a real nats-server (monitored, so the test waits for the retention to empty the
//! stream instead of sleeping).
//!
//! Regression: once retention emptied a user's subject, the next offsets restarted from
//! the ack record: offsets 1-3 expired and the next messages got 1 and 2 again; after an
//! ack and the expiry of the next messages, the next message reused their offsets, and a
//! client resuming from the last of them was sent old messages and never the new one.

use crate::common::admin::http_publish_acked;
use crate::common::nats::{start_node, Cluster, NatsServer};
use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";
const USER: &str = "7";
const CHANNEL: &str = "user:7";

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    let data = dir.join(name);
    start_node(
        dir,
        name,
        nats_url,
        "",
        "",
        &[
            "--jwt-secret",
            SECRET,
            "--inbox",
            "true",
            "--inbox-retention",
            "2",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
    )
}

fn token() -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": USER, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signing a token")
}

/// Messages in the inbox stream, from nats-server's monitoring endpoint.
fn inbox_messages(nats: &NatsServer) -> u64 {
    let jsz = nats.monitor("/jsz?streams=true");
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .filter(|s| s["name"].as_str().is_some_and(|n| n.ends_with("_INBOX")))
        .map(|s| s["state"]["messages"].as_u64().unwrap_or(0))
        .sum()
}

fn wait_expired(nats: &NatsServer) {
    wait_until(
        Duration::from_secs(30),
        "retention emptied the inbox stream",
        || (inbox_messages(nats) == 0).then_some(()),
    );
}

fn subscribe(server: &Server, since: Option<(u64, &str)>) -> (Subscriber, Value) {
    let mut sub = Subscriber::connect(&format!("ws://{}/ws?token={}", server.ws_addr(), token()));
    let mut command = json!({"cmd": "subscribe", "channel": CHANNEL, "id": 1});
    if let Some((offset, epoch)) = since {
        command["since"] = json!({"offset": offset, "epoch": epoch});
    }
    let reply = sub.request(&command, Duration::from_secs(10));
    assert_eq!(reply["code"], 200, "subscribe: {reply}");
    (sub, reply)
}

#[test]
fn cluster_inbox_offsets_never_repeat_after_retention_empties_a_user() {
    let cluster = Cluster::start(
        "cluster_inbox_offsets_never_repeat_after_retention_empties_a_user",
        Duration::from_secs(120),
        NatsServer::start_monitored,
        &["node0"],
        node,
    );
    let server = &cluster.nodes[0];
    server.wait_for_metric(
        "ringcast_inbox_up",
        "the cluster inbox is up",
        Duration::from_secs(30),
        |v| v == 1.0,
    );

    // Three messages nobody acks expire.
    let first: Vec<u64> = (1..=3)
        .map(|n| http_publish_acked(server, CHANNEL, &format!("{{\"n\":{n}}}")))
        .collect();
    assert_eq!(first, [1, 2, 3]);
    wait_expired(&cluster.nats);
    let next = http_publish_acked(server, CHANNEL, "{\"n\":4}");
    assert!(next > 3, "offset {next} given again after 1-3 expired");

    // The user gets it, acks it; three more arrive live, then expire unacked.
    let (mut sub, reply) = subscribe(server, None);
    let epoch = reply["epoch"].as_str().expect("epoch").to_string();
    let unacked = sub.collect_without_replies(1, Duration::from_secs(10));
    assert_eq!(unacked[0].offset, next, "{}", unacked[0].raw);
    let ack = sub.request(
        &json!({"cmd": "ack", "channel": CHANNEL, "offset": next, "id": 2}),
        Duration::from_secs(10),
    );
    assert_eq!(
        (ack["code"].as_u64(), ack["removed"].as_u64()),
        (Some(200), Some(1)),
        "{ack}"
    );
    let live: Vec<u64> = (5..=7)
        .map(|n| http_publish_acked(server, CHANNEL, &format!("{{\"n\":{n}}}")))
        .collect();
    assert_eq!(
        live,
        [next + 1, next + 2, next + 3],
        "offsets continue after an ack"
    );
    let got: Vec<u64> = sub
        .collect_without_replies(3, Duration::from_secs(10))
        .iter()
        .map(|d| d.offset)
        .collect();
    assert_eq!(got, live);
    sub.close();
    wait_expired(&cluster.nats);

    // The next message goes past every expired offset, in the same epoch, and a client
    // resuming from the last one it saw gets that message and nothing older.
    let newest = http_publish_acked(server, CHANNEL, "{\"n\":8}");
    assert!(
        newest > live[2],
        "offset {newest} given again after {live:?} expired"
    );
    let (mut sub, reply) = subscribe(server, Some((live[2], &epoch)));
    assert_eq!(reply["epoch"].as_str(), Some(epoch.as_str()), "{reply}");
    let got = sub.collect_without_replies(1, Duration::from_secs(10));
    assert_eq!(
        (got[0].offset, &got[0].data),
        (newest, &json!({"n": 8})),
        "{}",
        got[0].raw
    );
    let mut rest = Vec::new();
    while let Some(d) = sub.next_delivery(Duration::from_millis(500)) {
        rest.push(d.raw);
    }
    assert!(rest.is_empty(), "more than the newest message: {rest:?}");

    let m = server.metrics();
    assert!(
        m.sum("ringcast_inbox_offset_skips_total") >= 2.0,
        "{}",
        m.describe("ringcast_inbox_offset_skips_total")
    );
    assert_eq!(m.sum("ringcast_owner_offsets_refused_total"), 0.0);
}
