//! Three ringcast nodes joined by a real nats-server (docs/cluster.md): a message from
//! ingest on any node reaches subscribers on every node exactly once, in offset order,
//! with the same offsets everywhere; a client that moves to another node recovers by
//! offset; with NATS stopped each node keeps serving its own un-acknowledged publishes
//! and says the cluster is down, refuses acknowledged ones (they mean stored), and after
//! NATS returns they deliver across nodes again.

use crate::common::nats::{
    start_node, start_recovering_node, wait_cluster_up, wait_following, ws_subscribe, Cluster,
    NatsServer,
};
use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const CHANNEL: &str = "news:cluster";

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    start_recovering_node(dir, name, nats_url, 1000, 5, &[])
}

fn subscribe(server: &Server, channel: &str) -> (Subscriber, Value) {
    ws_subscribe(server, &json!({"cmd":"subscribe","channel":channel,"id":1}))
}

fn offsets(ds: &[Delivery]) -> Vec<u64> {
    ds.iter().map(|d| d.offset).collect()
}

fn missing(ds: &[Delivery], total: u64) -> Vec<u64> {
    let got: std::collections::HashSet<u64> = ds.iter().map(|d| d.offset).collect();
    (1..=total).filter(|o| !got.contains(o)).collect()
}

#[test]
fn every_node_delivers_every_message_once_in_order_and_a_moved_client_recovers() {
    let cluster = Cluster::start(
        "every_node_delivers_every_message_once_in_order_and_a_moved_client_recovers",
        Duration::from_secs(120),
        NatsServer::start,
        &["node0", "node1", "node2"],
        node,
    )
    .wait_up();
    let nodes = &cluster.nodes;
    let mut subs: Vec<Subscriber> = nodes.iter().map(|n| subscribe(n, CHANNEL).0).collect();
    wait_following(nodes.iter());
    // 300 messages, from TCP (acked), HTTP and UDP on the three nodes in turn, so
    // publishers on different nodes interleave on one channel.
    let mut tcp: Vec<TcpIngest> = nodes.iter().map(|n| n.tcp_ingest()).collect();
    for t in tcp.iter_mut() {
        t.send_raw(b"ACK ON\n");
    }
    const TOTAL: u64 = 300;
    for i in 0..TOTAL {
        let node = (i % 3) as usize;
        let payload = format!("{{\"n\":{i}}}");
        match i % 2 {
            0 => {
                tcp[node].publish(CHANNEL, payload.as_bytes());
            }
            _ => {
                let r = nodes[node].http_publish(Some(CHANNEL), payload.as_bytes());
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < TOTAL as usize {
            match sub.next_delivery(Duration::from_secs(30)) {
                Some(d) => got.push(d),
                None => panic!(
                    "node {i}: {} of {TOTAL} messages within 30 s: missing {:?}\n{}",
                    got.len(),
                    missing(&got, TOTAL),
                    cluster.metrics()
                ),
            }
        }
        assert_eq!(
            offsets(&got),
            (1..=TOTAL).collect::<Vec<_>>(),
            "node {i}: offsets\n{}",
            cluster.metrics()
        );
        let mut ns: Vec<u64> = got
            .iter()
            .map(|d| d.data["n"].as_u64().expect("n"))
            .collect();
        ns.sort_unstable();
        assert_eq!(
            ns,
            (0..TOTAL).collect::<Vec<_>>(),
            "node {i}: payloads once each"
        );
    }
    // A client on node 0 takes its position, leaves, and comes back on node 2.
    let (mut mover, reply) = subscribe(&nodes[0], CHANNEL);
    let epoch = reply["epoch"].as_str().expect("epoch").to_string();
    let at = reply["offset"].as_u64().expect("offset");
    assert_eq!(at, TOTAL);
    mover.close();
    for i in 0..20 {
        let r = nodes[1].http_publish(Some(CHANNEL), format!("{{\"late\":{i}}}").as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Node 2 has them (its subscriber sees them) before the client asks.
    let seen = subs[2].collect(20, Duration::from_secs(10));
    assert_eq!(offsets(&seen), (TOTAL + 1..=TOTAL + 20).collect::<Vec<_>>());
    let (mut moved, reply) = ws_subscribe(
        &nodes[2],
        &json!({"cmd":"subscribe","channel":CHANNEL,"id":2,"since":{"offset":at,"epoch":epoch}}),
    );
    assert_eq!(reply["recovered"], true, "{reply}");
    let replayed = moved.collect(20, Duration::from_secs(10));
    assert_eq!(
        offsets(&replayed),
        (TOTAL + 1..=TOTAL + 20).collect::<Vec<_>>()
    );
    let m = nodes[0].metrics();
    assert!(
        m.sum("ringcast_cluster_published_total") >= 100.0,
        "{}",
        m.describe("ringcast_cluster_published_total")
    );
    assert!(
        m.sum("ringcast_cluster_received_total") >= 200.0,
        "{}",
        m.describe("ringcast_cluster_received_total")
    );
}

#[test]
fn nodes_serve_locally_while_nats_is_down_and_deliver_across_again_after() {
    let mut cluster = Cluster::start(
        "nodes_serve_locally_while_nats_is_down_and_deliver_across_again_after",
        Duration::from_secs(120),
        NatsServer::start,
        &["a", "b"],
        node,
    )
    .wait_up();
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (mut sub_a, _) = subscribe(a, CHANNEL);
    let (mut sub_b, _) = subscribe(b, CHANNEL);
    wait_following([a, b]);
    let r = a.http_publish(Some(CHANNEL), b"{\"phase\":1}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sub_a.collect(1, Duration::from_secs(10))[0].offset, 1);
    assert_eq!(sub_b.collect(1, Duration::from_secs(10))[0].offset, 1);

    cluster.nats.stop();
    wait_cluster_up(a, 0.0);
    wait_cluster_up(b, 0.0);
    let ready = a.admin_get("/readyz").expect("readyz");
    assert!(ready.text().contains("cluster down"), "{}", ready.text());
    // Local publishes keep being served, in a local epoch.
    let r = a.http_publish(Some(CHANNEL), b"{\"phase\":2}");
    assert_eq!(r.status, 200, "{}", r.text());
    let local = sub_a.collect(1, Duration::from_secs(10));
    assert_eq!(local[0].data["phase"], 2);
    assert!(a.metrics().sum("ringcast_cluster_local_publishes_total") >= 1.0);

    cluster.nats.restart();
    wait_cluster_up(a, 1.0);
    wait_cluster_up(b, 1.0);
    // Cross-node delivery again: B's publish continues the stream's offsets.
    let r = wait_until(
        Duration::from_secs(20),
        "a publish after NATS returned is stored",
        || {
            let r = b.http_publish(Some(CHANNEL), b"{\"phase\":3}");
            (r.status == 200).then_some(r)
        },
    );
    assert_eq!(r.json()["offset"], 2, "{}", r.text());
    let on_b = sub_b.collect(1, Duration::from_secs(10));
    assert_eq!(
        (on_b[0].offset, on_b[0].data["phase"].clone()),
        (2, json!(3))
    );
    let on_a = sub_a.collect(1, Duration::from_secs(10));
    assert_eq!(
        (on_a[0].offset, on_a[0].data["phase"].clone()),
        (2, json!(3))
    );
}

/// A node whose clients may publish to `news:` channels.
fn publishing_node(dir: &Path, name: &str, nats_url: &str) -> Server {
    start_node(
        dir,
        name,
        nats_url,
        "history_size = 1000\n[namespaces.news]\nallow_publish = true",
        "interest_linger = 5",
        &[],
    )
}

/// `POST /publish?channel=CHANNEL&ack=1` with `body`: the answer, whatever its status.
fn publish_acked(server: &Server, body: &str) -> http::HttpResponse {
    http::request(
        server.admin_addr(),
        "POST",
        &format!("/publish?channel={CHANNEL}&ack=1"),
        &[],
        body.as_bytes(),
    )
    .expect("HTTP publish")
}

/// Regression (open issue, item 11, "a cluster acknowledgement that lies"): with NATS
/// down for more than 2 s, `ack=1` was answered `200 {"offset":N}` with a local-epoch
/// offset although nothing was stored, and so were the first acknowledged publishes
/// after NATS returned, until the node had reconnected; they never reached the other
/// node. An acknowledgement means stored: refused (503 / `ERR cluster: ...`) until it is.
#[test]
fn an_acknowledged_publish_is_refused_while_nats_is_down_and_stored_once_it_is_back() {
    let mut cluster = Cluster::start(
        "an_acknowledged_publish_is_refused_while_nats_is_down_and_stored_once_it_is_back",
        Duration::from_secs(60),
        NatsServer::start,
        &["a", "b"],
        publishing_node,
    )
    .wait_up();
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (mut sub_b, _) = subscribe(b, CHANNEL);
    wait_following([b]);
    let r = publish_acked(a, "{\"phase\":1}");
    assert_eq!(
        (r.status, r.json()["offset"].clone()),
        (200, json!(1)),
        "{}",
        r.text()
    );
    assert_eq!(sub_b.collect(1, Duration::from_secs(10))[0].offset, 1);
    let mut tcp = a.tcp_ingest();
    tcp.send_raw(b"ACK ON\n");
    let mut client = Subscriber::connect(&format!("ws://{}/ws", a.ws_addr()));

    cluster.nats.stop();
    wait_cluster_up(a, 0.0);
    // Un-acknowledged: served on node A only (in a local epoch) once NATS has been
    // unreachable for 2 s; answered only then, so the node is past that point below.
    let r = a.http_publish(Some(CHANNEL), b"{\"phase\":\"local\"}");
    assert_eq!(r.status, 200, "{}", r.text());
    let unreachable = "cluster: NATS is unreachable";
    let r = publish_acked(a, "{\"phase\":\"refused-http\"}");
    assert_eq!(r.status, 503, "ack=1 while NATS is down: {}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.starts_with(unreachable), "{}", r.text());
    tcp.publish(CHANNEL, b"{\"phase\":\"refused-tcp\"}");
    let line = tcp
        .read_line(Duration::from_secs(10))
        .expect("a TCP ack line");
    assert!(
        line.starts_with(&format!("ERR {unreachable}")),
        "ACK ON while NATS is down: {line}"
    );
    let reply = client.request(
        &json!({"cmd":"publish","channel":CHANNEL,"data":{"phase":"refused-client"},"id":3}),
        Duration::from_secs(10),
    );
    assert_eq!(
        reply["code"], 503,
        "client publish while NATS is down: {reply}"
    );
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.starts_with(unreachable)),
        "{reply}"
    );

    // NATS returns. Until node A has reconnected an acknowledged publish is refused;
    // the first one answered 200 is in the stream and reaches node B.
    cluster.nats.restart();
    let mut tries = 0;
    let (offset, stored_try) = wait_until(
        Duration::from_secs(20),
        "an acknowledged publish is stored after NATS returned",
        || {
            tries += 1;
            let r = publish_acked(a, &format!("{{\"phase\":\"back\",\"try\":{tries}}}"));
            match r.status {
                200 => Some((r.json()["offset"].clone(), tries)),
                503 => {
                    assert!(r.text().contains("\"error\":\"cluster: "), "{}", r.text());
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
                other => panic!("ack=1 after NATS returned: {other} {}", r.text()),
            }
        },
    );
    assert_eq!(offset, json!(2), "the stream's next offset");
    let on_b = sub_b.collect(1, Duration::from_secs(10));
    assert_eq!(
        (on_b[0].offset, on_b[0].data.clone()),
        (2, json!({"phase":"back","try":stored_try})),
        "node B gets the stored message"
    );
    assert!(
        sub_b.next_delivery(Duration::from_millis(500)).is_none(),
        "node B gets nothing refused or local"
    );
    let stored = python::run_script(
        "py_nats_check.py",
        &[
            "--servers",
            &cluster.nats.url(),
            "--stream",
            "RINGCAST",
            "--subject",
            "rc.ch.news=3Acluster",
        ],
    )
    .summary();
    assert_eq!(stored["offsets"], json!([1, 2]), "stored: {stored}");
    assert_eq!(
        a.metrics().sum("ringcast_cluster_local_publishes_total"),
        1.0,
        "only the un-acknowledged publish was served locally"
    );
}
