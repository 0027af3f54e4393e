//! Interest-based routing (docs/cluster.md, "Interest-based routing") checked against a
//! real nats-server's monitoring endpoint: a node with no subscriber of a channel holds
//! no NATS subscription for it and receives none of its messages while another node
//! publishes; a channel flapping between 0 and 1 local subscribers within
//! `interest_linger` keeps one and the same NATS subscription; after the linger it is
//! gone.

use crate::common::nats::{Cluster, NatsServer};
use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const CHANNEL: &str = "news:interest";
const LIVE_SUBJECT: &str = "rc.live.news=3Ainterest";
/// Long enough that the flapping below (a few round trips on loopback) stays inside it
/// even on a loaded machine; the end of the test waits for it to pass.
const LINGER_SECS: u64 = 20;

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    crate::common::nats::start_node(
        dir,
        name,
        nats_url,
        "history_size = 1000\n[namespaces.news]\nallow_publish = true",
        &format!("interest_linger = {LINGER_SECS}"),
        &[],
    )
}

/// Every NATS subscription (over all connections) to the channel's live subject:
/// (connection id, subscription id).
fn live_subscriptions(nats: &NatsServer) -> Vec<(u64, String)> {
    let connz = nats.monitor("/connz?subs=detail&limit=1000");
    let mut found = Vec::new();
    for conn in connz["connections"].as_array().into_iter().flatten() {
        let cid = conn["cid"].as_u64().unwrap_or(0);
        for sub in conn["subscriptions_list_detail"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if sub["subject"] == LIVE_SUBJECT {
                found.push((cid, sub["sid"].as_str().unwrap_or("").to_string()));
            }
        }
    }
    found
}

fn subscribe(sub: &mut Subscriber, id: u64) {
    let reply = sub.request(
        &json!({"cmd":"subscribe","channel":CHANNEL,"id":id}),
        Duration::from_secs(5),
    );
    assert_eq!(reply["code"], 200, "subscribe: {reply}");
}

fn unsubscribe(sub: &mut Subscriber, id: u64) {
    let reply: Value = sub.request(
        &json!({"cmd":"unsubscribe","channel":CHANNEL,"id":id}),
        Duration::from_secs(5),
    );
    assert_eq!(reply["code"], 200, "unsubscribe: {reply}");
}

#[test]
fn only_interested_nodes_subscribe_and_a_flapping_channel_keeps_one_subscription() {
    // 0 publishes, 1 has the subscriber, 2 has nobody.
    let cluster = Cluster::start(
        "only_interested_nodes_subscribe_and_a_flapping_channel_keeps_one_subscription",
        Duration::from_secs(180),
        NatsServer::start_monitored,
        &["node0", "node1", "node2"],
        node,
    )
    .wait_up();
    let (nats, nodes) = (&cluster.nats, &cluster.nodes);
    let mut sub = Subscriber::connect(&format!("ws://{}/ws", nodes[1].ws_addr()));
    subscribe(&mut sub, 1);
    nodes[1].wait_for_metric(
        "ringcast_cluster_subscriptions",
        "node 1 follows the channel",
        Duration::from_secs(10),
        |v| v == 1.0,
    );
    let first = wait_until(
        Duration::from_secs(10),
        "nats-server shows node 1's subscription to the live subject",
        || {
            let subs = live_subscriptions(nats);
            (subs.len() == 1).then(|| subs[0].clone())
        },
    );

    const N: u64 = 50;
    for i in 0..N {
        let offset = admin::http_publish_acked(&nodes[0], CHANNEL, &format!("{{\"n\":{i}}}"));
        assert_eq!(offset, i + 1, "offsets from 1 in publish order");
    }
    let got = sub.collect(N as usize, Duration::from_secs(30));
    assert_eq!(
        got.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>(),
        "node 1's subscriber gets every message"
    );
    let m1 = nodes[1].metrics();
    assert_eq!(
        m1.sum("ringcast_cluster_received_total"),
        N as f64,
        "node 1 received each message once"
    );
    for (i, what) in [
        (0, "the publishing node"),
        (2, "the node with no subscriber"),
    ] {
        let m = nodes[i].metrics();
        assert_eq!(
            m.sum("ringcast_cluster_subscriptions"),
            0.0,
            "{what} holds no live subscription"
        );
        assert_eq!(
            m.sum("ringcast_cluster_received_total"),
            0.0,
            "{what} received nothing of the channel"
        );
    }
    assert_eq!(
        live_subscriptions(nats),
        vec![first.clone()],
        "one NATS subscription to the channel in the whole cluster"
    );

    // Flapping between 0 and 1 local subscribers within the linger: one subscription,
    // the same one throughout (same connection, same sid).
    for round in 0..5u64 {
        unsubscribe(&mut sub, 10 + round);
        assert_eq!(
            live_subscriptions(nats),
            vec![first.clone()],
            "after unsubscribe {round}: the subscription lingers"
        );
        subscribe(&mut sub, 20 + round);
        assert_eq!(
            live_subscriptions(nats),
            vec![first.clone()],
            "after subscribe {round}: the same subscription, not a new one"
        );
    }
    assert_eq!(
        nodes[1].metrics().sum("ringcast_cluster_subscriptions"),
        1.0,
        "node 1 counts one subscription after the flapping"
    );
    // Still delivering through it.
    let offset = admin::http_publish_acked(&nodes[0], CHANNEL, "{\"n\":\"after\"}");
    let d = sub
        .next_delivery(Duration::from_secs(10))
        .expect("a message after the flapping");
    assert_eq!(d.offset, offset, "delivered through the kept subscription");
    // A client's publish command on the node without subscribers answers the stream's
    // offset once stored (docs/protocol.md), not 0.
    let mut client = Subscriber::connect(&format!("ws://{}/ws", nodes[0].ws_addr()));
    let reply = client.request(
        &json!({"cmd":"publish","channel":CHANNEL,"data":{"n":"client"},"id":7}),
        Duration::from_secs(30),
    );
    assert_eq!(reply["code"], 200, "client publish: {reply}");
    assert_eq!(
        reply["offset"],
        offset + 1,
        "a client publish answers the stream's offset: {reply}"
    );
    let d = sub
        .next_delivery(Duration::from_secs(10))
        .expect("the client's message on node 1");
    assert_eq!(d.offset, offset + 1, "the client's message, at that offset");
    assert_eq!(
        nodes[0].metrics().sum("ringcast_cluster_subscriptions"),
        0.0,
        "publishing creates no subscription"
    );

    // The last subscriber leaves: after the linger, the subscription goes.
    unsubscribe(&mut sub, 99);
    nodes[1].wait_for_metric(
        "ringcast_cluster_subscriptions",
        "node 1 drops the subscription after interest_linger",
        Duration::from_secs(LINGER_SECS * 3),
        |v| v == 0.0,
    );
    wait_until(
        Duration::from_secs(10),
        "nats-server shows no subscription to the live subject",
        || live_subscriptions(nats).is_empty().then_some(()),
    );
    // Nothing routed to node 1 any more.
    admin::http_publish_acked(&nodes[0], CHANNEL, "{\"n\":\"unheard\"}");
    let before = nodes[1].metrics().sum("ringcast_cluster_received_total");
    assert_eq!(
        before,
        (N + 2) as f64,
        "node 1 receives nothing once it stopped following"
    );
}
