//! Two ringcast nodes on a 3-server NATS cluster with a 3-replica stream: one NATS
//! server is killed while a node publishes. Every message acknowledged to the publisher
//! (HTTP 200 with an offset) reaches the subscriber on the other node, in order, and is
//! in the stream as read by an independent client (nats-py); publishes refused while the
//! stream leader moves are retried by the publisher, as a real one would.

use crate::common::nats::NatsCluster;
use crate::common::*;
use serde_json::json;
use std::time::Duration;

const CHANNEL: &str = "feed:ha";

// While the surviving NATS servers elect a new JetStream leader, a node's publishes are
// re-sent with the same message id (the stream dedupes them) or refused (503), never
// served in a local epoch (docs/cluster.md, "Failure modes").
#[test]
fn no_acknowledged_message_is_lost_when_one_nats_server_dies() {
    let _deadline = Deadline::new(
        "no_acknowledged_message_is_lost_when_one_nats_server_dies",
        Duration::from_secs(240),
    );
    let mut nats = NatsCluster::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes: Vec<Server> = (0..2)
        .map(|i| {
            crate::common::nats::start_node(
                dir.path(),
                &format!("n{i}"),
                &nats.urls(),
                "history_size = 1000",
                "stream_replicas = 3",
                &[],
            )
        })
        .collect();
    for n in &nodes {
        n.wait_for_metric(
            "ringcast_cluster_up",
            "cluster up",
            Duration::from_secs(60),
            |v| v == 1.0,
        );
    }
    let mut sub = Subscriber::connect(&format!("ws://{}/ws", nodes[1].ws_addr()));
    let reply = sub.request(
        &json!({"cmd":"subscribe","channel":CHANNEL,"id":1}),
        Duration::from_secs(5),
    );
    assert_eq!(reply["code"], 200, "{reply}");
    nodes[1].wait_for_metric(
        "ringcast_cluster_subscriptions",
        "following",
        Duration::from_secs(10),
        |v| v >= 1.0,
    );

    // Its NATS subscription is in place, so no live message goes past it before it is
    // there.
    wait_until(
        Duration::from_secs(20),
        "a NATS server knows node 1's interest in the channel",
        || {
            nats.servers
                .iter()
                .any(|s| {
                    let subsz = s.monitor("/subsz?subs=1&test=rc.live.feed=3Aha");
                    subsz["subscriptions_list"]
                        .as_array()
                        .is_some_and(|l| !l.is_empty())
                })
                .then_some(())
        },
    );

    const TOTAL: usize = 200;
    let mut acked: Vec<u64> = Vec::new();
    for i in 0..TOTAL {
        if i == TOTAL / 2 {
            nats.servers[0].stop();
        }
        let offset = wait_until(Duration::from_secs(90), "a publish is acknowledged", || {
            // A refusal (503) or an answer slower than the client's 5 s timeout is not an
            // acknowledgement: the publisher sends the message again, as a real one would.
            let r = http::request(
                nodes[0].admin_addr(),
                "POST",
                &format!("/publish?channel={CHANNEL}"),
                &[],
                format!("{{\"n\":{i}}}").as_bytes(),
            );
            match r {
                Ok(r) if r.status == 200 => r.json()["offset"].as_u64(),
                _ => {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                }
            }
        });
        acked.push(offset);
    }
    // A publish refused on a timeout may still have been stored: the publisher's retry
    // then stores it again (at least once), so offsets may pass TOTAL, never go back.
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "acked offsets increase: {acked:?}"
    );
    let last = *acked.last().expect("acked");
    let got = sub.collect(last as usize, Duration::from_secs(60));
    let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
    assert_eq!(
        offsets,
        (1..=last).collect::<Vec<_>>(),
        "delivered on the other node, gap-free"
    );
    let mut ns: Vec<u64> = got
        .iter()
        .map(|d| d.data["n"].as_u64().expect("n"))
        .collect();
    assert!(
        ns.windows(2).all(|w| w[0] <= w[1]),
        "payloads in publish order"
    );
    ns.dedup();
    assert_eq!(
        ns,
        (0..TOTAL as u64).collect::<Vec<_>>(),
        "every payload delivered"
    );

    assert_eq!(
        nodes[0]
            .metrics()
            .sum("ringcast_cluster_local_publishes_total"),
        0.0,
        "nothing was served in a local epoch"
    );

    let live: Vec<String> = nats.servers[1..].iter().map(|s| s.url()).collect();
    let stored = python::run_script(
        "py_nats_check.py",
        &[
            "--servers",
            &live.join(","),
            "--stream",
            "RINGCAST",
            "--subject",
            "rc.ch.feed=3Aha",
        ],
    )
    .summary();
    assert!(
        stored["markers"].as_u64().is_some_and(|m| m <= 1)
            && stored["epochs"].as_array().map(Vec::len) == Some(1),
        "one epoch, at most one epoch marker: {stored}"
    );
    let stored: Vec<u64> = stored["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(
        stored,
        (1..=last).collect::<Vec<_>>(),
        "the stream holds every acknowledged offset"
    );
}
