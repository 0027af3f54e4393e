//! The cluster inbox (JetStream) when the node applying an ack is killed with `kill -9`
//! while the ack is in flight: two ringcast nodes on a real nats-server; a user reads
//! its inbox on node 0, acks half of it and node 0 is killed a varying moment after the
//! ack was sent. An ack that was answered is never undone (its messages are not
//! delivered again); one that was not may have been applied or not, but as a whole
//! (the ack record is written before anything is purged); and no unacked message is
//! lost: the other node, and node 0 restarted, deliver exactly the offsets after the
//! applied ack, in order, once.

use crate::common::admin::{http_publish_acked, wait_inbox_up};
use crate::common::nats::{start_recovering_node, Cluster, NatsServer};
use crate::common::subscriber::Event;
use crate::common::*;
use std::path::Path;
use std::time::Duration;

const USER: &str = "user:42";

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    let data = dir.join(name);
    start_recovering_node(
        dir,
        name,
        nats_url,
        1000,
        5,
        &[
            "--inbox",
            "true",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
    )
}

/// Subscribes to the user's inbox on `server` and reads every message up to `last`:
/// the unacked ones after the reply, and (when the node's follower had not passed them
/// yet, docs/protocol.md) those that follow live; then nothing more. Returns the client
/// and their offsets.
fn read_inbox(server: &Server, last: u64) -> (Subscriber, Vec<u64>) {
    let mut client = server.subscribe(&[USER]);
    let reply = client.next_reply(Duration::from_secs(10));
    assert_eq!(reply["code"], 200, "subscribe: {reply}\n{}", server.log());
    let mut offsets = Vec::new();
    while offsets.last() != Some(&last) {
        let d = client
            .next_delivery(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("got {offsets:?} of the inbox up to {last} (reply {reply})"));
        assert_eq!(
            d.data["n"], d.offset,
            "offset {} carries another message",
            d.offset
        );
        offsets.push(d.offset);
    }
    assert!(
        client.next_delivery(Duration::from_millis(300)).is_none(),
        "a message after the last offset"
    );
    (client, offsets)
}

/// Checks that `offsets` are exactly those after one of `acked` (the acks that may have
/// been applied) up to `last`; returns the ack that was.
fn applied_ack(who: &str, offsets: &[u64], acked: &[u64], last: u64) -> u64 {
    let first = offsets.first().copied().unwrap_or(last + 1);
    let applied = first - 1;
    assert!(
        acked.contains(&applied),
        "{who}: the inbox starts at offset {first}, but the ack applied can only be one of \
         {acked:?}: an answered ack was undone, an ack applied in part, or unacked messages \
         lost"
    );
    assert_eq!(
        offsets,
        (first..=last).collect::<Vec<_>>(),
        "{who}: not exactly the offsets after the ack, in order, once"
    );
    applied
}

#[test]
fn an_ack_cut_by_a_node_kill_is_applied_whole_or_not_at_all() {
    let mut cluster = Cluster::start(
        "an_ack_cut_by_a_node_kill_is_applied_whole_or_not_at_all",
        Duration::from_secs(240),
        NatsServer::start,
        &["node0", "node1"],
        node,
    )
    .wait_up();
    let nats_url = cluster.nats.url();
    let dir = cluster.dir.path().to_path_buf();
    let nodes = &mut cluster.nodes;
    for n in nodes.iter() {
        wait_inbox_up(n, 1.0);
    }
    // The acks that may be the one applied: the last answered one, and any sent after it
    // whose node was killed before it answered.
    let mut candidates = vec![0];
    let mut last = 0;
    let mut outcomes = Vec::new();
    // From "killed before the ack left the socket" to "killed well after its answer".
    let delays_ms = [0, 0, 1, 2, 3, 5, 8, 15, 50];
    for (round, delay) in delays_ms.into_iter().enumerate() {
        for _ in 0..10 {
            let offset = http_publish_acked(&nodes[1], USER, &format!("{{\"n\":{}}}", last + 1));
            assert_eq!(offset, last + 1, "offsets continue across kills");
            last = offset;
        }
        let (mut client, offsets) = read_inbox(&nodes[0], last);
        let applied = applied_ack(
            &format!("round {round}, node 0"),
            &offsets,
            &candidates,
            last,
        );
        candidates = vec![applied];
        let target = applied + 5;
        client.send_command(
            &serde_json::json!({"cmd": "ack", "channel": USER, "offset": target, "id": round}),
        );
        std::thread::sleep(Duration::from_millis(delay));
        nodes[0].kill9();
        // The answer, if it was sent before the kill.
        let answered = loop {
            match client.next_event_or_gone(Duration::from_secs(2)) {
                Event::Reply(reply) => {
                    assert_eq!(reply["code"], 200, "{reply}");
                    assert_eq!(reply["removed"], 5, "{reply}");
                    break true;
                }
                Event::Delivery(_) | Event::Ping => {}
                Event::Closed(_) | Event::TimedOut => break false,
            }
        };
        if answered {
            candidates = vec![target];
        } else {
            candidates.push(target);
        }
        // The other node sees the same inbox at once.
        let (_, offsets) = read_inbox(&nodes[1], last);
        let applied = applied_ack(
            &format!("round {round}, node 1"),
            &offsets,
            &candidates,
            last,
        );
        outcomes.push(match (answered, applied == target) {
            (true, _) => "answered",
            (false, true) => "applied, unanswered",
            (false, false) => "not applied",
        });
        candidates = vec![applied];
        nodes[0] = node(&dir, "node0", &nats_url);
        wait_inbox_up(&nodes[0], 1.0);
    }
    println!("acks cut by kill -9 (delays {delays_ms:?} ms): {outcomes:?}");
    let m = nodes[1].metrics();
    assert_eq!(
        m.sum("ringcast_inbox_errors_total"),
        0.0,
        "{}",
        m.describe("ringcast_inbox_errors_total")
    );
}
