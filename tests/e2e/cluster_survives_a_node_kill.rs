//! A ringcast node killed with SIGKILL while another node publishes (docs/cluster.md,
//! "Failure modes"): three nodes on one nats-server, a subscriber on each; a publisher
//! sends through node A's TCP ingest in ack mode while node B is killed. B's subscriber
//! reconnects to node C with `since` (its last offset and epoch) and recovers. Every
//! acknowledged offset reaches every surviving subscriber exactly once, in order, and the
//! moved subscriber ends gap-free.

use crate::common::nats::{
    start_recovering_node, wait_following, ws_subscribe, Cluster, NatsServer,
};
use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CHANNEL: &str = "news:kill";
const TOTAL: u64 = 300;
const LIVE_SUBJECT: &str = "rc.live.news=3Akill";

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    start_recovering_node(dir, name, nats_url, 2000, 30, &[])
}

fn subscribe(server: &Server, since: Option<(u64, &str)>) -> (Subscriber, Value) {
    let mut command = json!({"cmd":"subscribe","channel":CHANNEL,"id":1});
    if let Some((offset, epoch)) = since {
        command["since"] = json!({"offset": offset, "epoch": epoch});
    }
    ws_subscribe(server, &command)
}

/// Publishes `from..to` (payload `{"n":i}`) through TCP ingest in ack mode, one at a
/// time; a refusal (`ERR`) is sent again, as a real publisher would. Returns the
/// acknowledged offsets; `acked` counts them as they come.
fn publish(ingest: &mut TcpIngest, from: u64, to: u64, acked: &AtomicU64) -> Vec<u64> {
    let mut offsets = Vec::new();
    for i in from..to {
        let offset = wait_until(Duration::from_secs(60), "TCP ingest acknowledges", || {
            ingest.publish(CHANNEL, format!("{{\"n\":{i}}}").as_bytes());
            let line = ingest
                .read_line(Duration::from_secs(30))
                .expect("TCP ingest answers each line in ack mode");
            match line.strip_prefix("OK ") {
                Some(o) => Some(o.parse::<u64>().expect("OK <offset>")),
                None => {
                    assert!(line.starts_with("ERR "), "TCP ingest answered {line:?}");
                    std::thread::sleep(Duration::from_millis(100));
                    None
                }
            }
        });
        offsets.push(offset);
        acked.fetch_add(1, Ordering::SeqCst);
    }
    offsets
}

#[test]
fn a_killed_nodes_clients_recover_on_another_node_and_no_acked_offset_is_lost() {
    let mut cluster = Cluster::start(
        "a_killed_nodes_clients_recover_on_another_node_and_no_acked_offset_is_lost",
        Duration::from_secs(240),
        NatsServer::start_monitored,
        &["a", "b", "c"],
        node,
    )
    .wait_up();
    let (nats, nodes) = (&cluster.nats, &mut cluster.nodes);
    // Every node follows the channel and has taken the stream's epoch (offset 1 arrived)
    // before the subscribers under test subscribe: their replies carry that epoch.
    let mut primers: Vec<Subscriber> = nodes.iter().map(|n| subscribe(n, None).0).collect();
    wait_following(nodes.iter());
    // Their NATS subscriptions are in place (the metric counts them when asked for).
    wait_until(
        Duration::from_secs(20),
        "nats-server shows the three nodes' subscriptions to the live subject",
        || {
            let connz = nats.monitor("/connz?subs=1&limit=1000");
            let n = connz["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["subscriptions_list"].as_array().into_iter().flatten())
                .filter(|s| s.as_str() == Some(LIVE_SUBJECT))
                .count();
            (n == 3).then_some(())
        },
    );
    let first = admin::http_publish_acked(&nodes[0], CHANNEL, "{\"n\":\"first\"}");
    for (i, p) in primers.iter_mut().enumerate() {
        let d = p
            .next_delivery(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("node {i} delivers the first message"));
        assert_eq!(d.offset, first, "node {i}: the first message's offset");
    }
    drop(primers);
    let mut subs: Vec<(Subscriber, String)> = nodes
        .iter()
        .map(|n| {
            let (sub, reply) = subscribe(n, None);
            assert_eq!(
                reply["offset"], first,
                "subscribed after the first message: {reply}"
            );
            let epoch = reply["epoch"].as_str().expect("epoch").to_string();
            (sub, epoch)
        })
        .collect();
    let epoch = subs[0].1.clone();
    for (i, (_, e)) in subs.iter().enumerate() {
        assert_eq!(e, &epoch, "node {i} is in the stream's epoch");
    }

    let mut ingest = nodes[0].tcp_ingest();
    ingest.send_raw(b"ACK ON\n");
    let acked = Arc::new(AtomicU64::new(0));
    // First third, then B's subscriber reads what it got (its last position).
    let mut offsets = publish(&mut ingest, 0, TOTAL / 3, &acked);
    let b_seen = subs[1].0.collect(offsets.len(), Duration::from_secs(30));
    let mut b_log = OffsetLog::default();
    b_log.observe_all(&b_seen);
    let b_last = b_seen.last().expect("node B delivered").offset;

    // The rest is published while B is killed.
    let publisher = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let rest = publish(&mut ingest, TOTAL / 3, TOTAL, &acked);
            (ingest, rest)
        })
    };
    wait_until(
        Duration::from_secs(60),
        "the publisher is past the middle",
        || (acked.load(Ordering::SeqCst) >= TOTAL / 2).then_some(()),
    );
    nodes[1].kill9();
    assert!(!nodes[1].is_running(), "node B is gone");
    drop(subs.remove(1));
    // B's subscriber moves to C with its last position.
    let (mut moved, reply) = subscribe(&nodes[2], Some((b_last, &epoch)));
    assert_eq!(
        reply["recovered"], true,
        "the moved subscriber recovers on C: {reply}"
    );
    let (_ingest, rest) = publisher.join().expect("publisher thread");
    offsets.extend(rest);
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "acknowledged offsets increase: {offsets:?}"
    );
    let last = *offsets.last().expect("acked");
    assert!(
        last >= first + TOTAL,
        "every message acknowledged once at least"
    );

    // Survivors: every offset after the first, once, in order (acked ones included).
    for (who, (sub, _)) in ["A", "C"].iter().zip(subs.iter_mut()) {
        let got = sub.collect((last - first) as usize, Duration::from_secs(60));
        let mut log = OffsetLog::default();
        log.observe_all(&got);
        log.assert_exactly(
            &format!("node {who}'s subscriber"),
            CHANNEL,
            first + 1,
            last,
        );
    }
    // The moved subscriber: B's part, then C's replay and live messages, gap-free.
    let got = moved.collect((last - b_last) as usize, Duration::from_secs(60));
    b_log.observe_all(&got);
    b_log.assert_exactly("the moved subscriber (B, then C)", CHANNEL, first + 1, last);
    assert!(
        moved.next_delivery(Duration::from_millis(200)).is_none(),
        "nothing after the last acknowledged offset"
    );
}
