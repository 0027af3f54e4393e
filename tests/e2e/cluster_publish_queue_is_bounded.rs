//! Every publish between ingest and JetStream counts against `[cluster] publish_queue`
//! (docs/cluster.md, "Publish queue"): a node reaches a real nats-server through a TCP
//! gate that holds the server's bytes, so no publish is acknowledged and they pile up.
//!
//! Regression: the NATS thread moved each publish off its bounded queue at once into an
//! unbounded per-channel queue: 400,000 TCP lines left ~347,000 in memory while nothing
//! said so. Now the gauge `ringcast_cluster_publish_queued` counts each publish from
//! acceptance to answer and never passes the bound; beyond it HTTP answers 503, UDP is
//! refused and counted, and TCP ingest stops reading (its lines wait in the kernel and
//! are all delivered, in order, once JetStream answers again).

use crate::common::nats::{start_node, wait_cluster_up, NatsServer};
use crate::common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

const QUEUE: f64 = 64.0;
const LINES: u64 = 600;
const CHANNEL: &str = "feed:queue";

#[test]
fn cluster_publishes_wait_in_a_bounded_queue_and_tcp_ingest_is_held_back() {
    let _deadline = Deadline::new(
        "cluster_publishes_wait_in_a_bounded_queue_and_tcp_ingest_is_held_back",
        Duration::from_secs(120),
    );
    let nats = NatsServer::start();
    let gate = TcpGate::start(SocketAddr::from(([127, 0, 0, 1], nats.port)));
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start_node(
        dir.path(),
        "a",
        &format!("nats://127.0.0.1:{}", gate.port),
        "history_size = 1000",
        "publish_queue = 64",
        &[],
    );
    wait_cluster_up(&node, 1.0);
    let mut sub = node.subscribe(&[CHANNEL]);
    node.wait_for_connections(1, Duration::from_secs(10));

    gate.hold();
    let mut tcp = TcpIngest::connect(node.tcp_addr());
    for n in 1..=LINES {
        tcp.publish(CHANNEL, json!({ "n": n }).to_string().as_bytes());
    }
    node.wait_for_metric(
        "ringcast_cluster_publish_queued",
        "publish_queue publishes wait for JetStream",
        Duration::from_secs(30),
        |v| v == QUEUE,
    );
    // Full: HTTP is refused with the reason, UDP is refused and counted.
    let r = node.http_publish(Some(CHANNEL), b"{\"http\":1}");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("publish_queue"), "{}", r.text());
    node.udp_publish(CHANNEL, b"{\"udp\":1}");
    node.wait_for_metric(
        "ringcast_cluster_publish_refused_total",
        "the refusals are counted",
        Duration::from_secs(10),
        |v| v >= 2.0,
    );
    let m = node.metrics();
    assert_eq!(
        m.sum("ringcast_cluster_publish_queued"),
        QUEUE,
        "never past the bound"
    );

    gate.release();
    // Every TCP line arrives once, in order, and nothing refused does.
    let got = sub.collect(LINES as usize, Duration::from_secs(60));
    let ns: Vec<u64> = got
        .iter()
        .map(|d| d.data["n"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        ns,
        (1..=LINES).collect::<Vec<_>>(),
        "TCP lines in order, none lost"
    );
    let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, (1..=LINES).collect::<Vec<_>>());
    assert!(
        sub.next_delivery(Duration::from_millis(500)).is_none(),
        "nothing more"
    );
    node.wait_for_metric(
        "ringcast_cluster_publish_queued",
        "every publish answered",
        Duration::from_secs(30),
        |v| v == 0.0,
    );
    assert_eq!(
        node.metrics().sum("ringcast_cluster_publish_errors_total"),
        0.0
    );
}
