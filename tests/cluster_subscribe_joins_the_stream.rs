//! A subscribe on a cluster node that does not follow the channel yet is answered once
//! the node follows it (docs/cluster.md, "Recovery on any node"): a client that moves to
//! a node that never had a subscriber of the channel recovers its missed messages from
//! the stream, and subscribers that join while publishes flow get every offset after
//! their reply's, once, in order. Real nats-server, real binaries.

mod common;

use common::nats::{wait_cluster_up, NatsServer};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn node(nats_url: &str, dir: &tempfile::TempDir, name: &str) -> Server {
    common::nats::start_node(
        dir.path(),
        name,
        nats_url,
        "history_size = 1000\nmax_recovery_messages = 1000",
        "interest_linger = 5",
        &[],
    )
}

fn publish(server: &Server, channel: &str, payload: &Value) -> u64 {
    let r = server.http_publish(Some(channel), payload.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["offset"]
        .as_u64()
        .expect("offset in the publish answer")
}

fn subscribe(server: &Server, command: &Value) -> (Subscriber, Value) {
    let mut sub = Subscriber::connect(&format!("ws://{}/ws", server.ws_addr()));
    let reply = sub.request(command, Duration::from_secs(10));
    assert_eq!(reply["code"], 200, "subscribe: {reply}");
    (sub, reply)
}

fn cluster_metrics(nodes: &[&Server]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let m = n.metrics();
            let text: Vec<String> = m
                .samples
                .iter()
                .filter(|s| s.name.starts_with("ringcast_cluster_"))
                .map(|s| format!("{} {}", s.name, s.value))
                .collect();
            format!("node {i}:\n{}", text.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_moved_client_recovers_on_a_node_that_never_followed_the_channel() {
    let _deadline = Deadline::new(
        "a_moved_client_recovers_on_a_node_that_never_followed_the_channel",
        Duration::from_secs(120),
    );
    const CHANNEL: &str = "news:moved";
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = node(&nats.url(), &dir, "a");
    let b = node(&nats.url(), &dir, "b");
    wait_cluster_up(&a, 1.0);
    wait_cluster_up(&b, 1.0);

    // The channel's first publish chooses its cluster epoch (a subscriber that came
    // before it holds a local epoch: docs/cluster.md, "Joining a channel").
    assert_eq!(publish(&a, CHANNEL, &json!({"n": 1})), 1);
    // The client reads messages on A up to offset 10, notes its position, goes away.
    let (mut client, reply) = subscribe(&a, &json!({"cmd":"subscribe","channel":CHANNEL,"id":1}));
    assert_eq!(reply["offset"], 1, "{reply}");
    for i in 2..=10 {
        assert_eq!(publish(&a, CHANNEL, &json!({"n": i})), i);
    }
    let got = client.collect(9, Duration::from_secs(10));
    let at = got.last().expect("ten messages").offset;
    assert_eq!(at, 10);
    let epoch = reply["epoch"].as_str().expect("epoch").to_string();
    client.close();
    // 15 more while it is away; B never had a subscriber of the channel.
    for i in 11..=25 {
        assert_eq!(publish(&a, CHANNEL, &json!({"n": i})), i);
    }
    let (mut moved, reply) = subscribe(
        &b,
        &json!({"cmd":"subscribe","channel":CHANNEL,"id":2,"since":{"offset":at,"epoch":epoch}}),
    );
    assert_eq!(
        reply["recovered"],
        true,
        "{reply}\n{}",
        cluster_metrics(&[&a, &b])
    );
    assert_eq!(reply["epoch"].as_str(), Some(epoch.as_str()), "{reply}");
    // Replayed up to the reply's offset; the rest (if the shard had not read them from
    // the ring yet) follow live: either way 11..=25, once each, in order.
    let position = reply["offset"].as_u64().expect("offset");
    assert!((at..=25).contains(&position), "{reply}");
    let replayed = moved.collect(15, Duration::from_secs(10));
    assert_eq!(
        replayed.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (11..=25).collect::<Vec<_>>()
    );
    assert_eq!(
        replayed
            .iter()
            .map(|d| d.data["n"].as_u64().expect("n"))
            .collect::<Vec<_>>(),
        (11..=25).collect::<Vec<_>>()
    );
    // Then live, from both nodes: the next offsets, nothing repeated.
    for i in 26..=30 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(publish(node, CHANNEL, &json!({"n": i})), i);
    }
    let live = moved.collect(5, Duration::from_secs(10));
    assert_eq!(
        live.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (26..=30).collect::<Vec<_>>()
    );
    let m = b.metrics();
    assert!(
        m.sum("ringcast_cluster_joins_total") >= 1.0,
        "{}",
        cluster_metrics(&[&a, &b])
    );
    assert!(
        m.sum("ringcast_cluster_join_fetched_total") >= 15.0,
        "{}",
        cluster_metrics(&[&a, &b])
    );
    assert_eq!(m.sum("ringcast_cluster_join_fallbacks_total"), 0.0);
}

#[test]
fn subscribers_joining_while_publishes_flow_get_every_offset_after_their_reply() {
    let _deadline = Deadline::new(
        "subscribers_joining_while_publishes_flow_get_every_offset_after_their_reply",
        Duration::from_secs(180),
    );
    const CHANNELS: usize = 6;
    const PER_CHANNEL: u64 = 200;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = node(&nats.url(), &dir, "a");
    let b = node(&nats.url(), &dir, "b");
    wait_cluster_up(&a, 1.0);
    wait_cluster_up(&b, 1.0);
    let channels: Vec<String> = (0..CHANNELS).map(|i| format!("news:flow{i}")).collect();
    // A publishes to every channel in turn, through its TCP ingest (acked: each line is
    // stored in the stream before the next).
    let publisher = {
        let channels = channels.clone();
        let addr = a.tcp_addr();
        std::thread::spawn(move || {
            let mut tcp = TcpIngest::connect(addr);
            tcp.send_raw(b"ACK ON\n");
            for n in 1..=PER_CHANNEL {
                for ch in &channels {
                    tcp.publish(ch, format!("{{\"n\":{n}}}").as_bytes());
                    let line = tcp
                        .read_line(Duration::from_secs(10))
                        .expect("an answer to every acked publish within 10 s");
                    assert!(line.starts_with("OK"), "publish to {ch}: {line}");
                }
            }
        })
    };
    // Wait until publishing is under way, then join B's channels one by one as it goes.
    a.wait_for_metric(
        "ringcast_cluster_published_total",
        "publishes are flowing",
        Duration::from_secs(20),
        |v| v >= 60.0,
    );
    let mut subs = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        let (sub, reply) = subscribe(&b, &json!({"cmd":"subscribe","channel":ch,"id":i}));
        let from = reply["offset"].as_u64().expect("offset");
        subs.push((ch.clone(), sub, from));
        std::thread::sleep(Duration::from_millis(50));
    }
    publisher.join().expect("the publisher thread");
    for (ch, mut sub, from) in subs {
        let expect: Vec<u64> = (from + 1..=PER_CHANNEL).collect();
        let got = sub.collect(expect.len(), Duration::from_secs(30));
        let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
        assert_eq!(
            offsets,
            expect,
            "{ch}: subscribed at {from}\n{}",
            cluster_metrics(&[&a, &b])
        );
        let ns: Vec<u64> = got
            .iter()
            .map(|d| d.data["n"].as_u64().expect("n"))
            .collect();
        assert_eq!(ns, expect, "{ch}: payloads");
        // Nothing after the last one: the next publish is the next offset.
        assert_eq!(
            publish(&a, &ch, &json!({"n": PER_CHANNEL + 1})),
            PER_CHANNEL + 1
        );
        let next = sub
            .next_delivery(Duration::from_secs(10))
            .expect("the last publish arrives");
        assert_eq!(next.offset, PER_CHANNEL + 1, "{ch}: {}", next.raw);
    }
    let m = b.metrics();
    assert!(
        m.sum("ringcast_cluster_joins_total") >= CHANNELS as f64,
        "{}",
        cluster_metrics(&[&a, &b])
    );
}
