//! Publish dedupe (docs/cluster.md, "Publish dedupe: a re-sent message is stored once"):
//! node A reaches a real nats-server through a TCP gate that can hold the server's bytes.
//! Held while A publishes, the stream's acknowledgement comes too late: A's outcome is
//! unknown and it sends the message again with the same `Nats-Msg-Id`. The stream has it
//! already, so the copy is refused (10071: not the expected last sequence) and then, after
//! A reads the last message again, answered `duplicate`. A answers the publisher with the
//! stored copy's offset, and the message is stored and delivered once. The same for a
//! `user:` channel with the cluster inbox on (its own stream, its own NATS client).

use crate::common::admin::{http_publish_acked, http_publish_offset};
use crate::common::nats::{start_node, wait_cluster_up, wait_following, NatsServer};
use crate::common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const CHANNEL: &str = "feed:dedupe";
/// Longer than the node's JetStream request timeout (2 s), well inside its 10 s resend
/// window.
const HELD: Duration = Duration::from_millis(3500);
/// How long the held publish's client waits: the hold, then the node's re-send (within
/// its 10 s window), with room for a loaded machine.
const LATE_ANSWER_WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_publish_whose_acknowledgement_is_late_is_stored_and_delivered_once() {
    let _deadline = Deadline::new(
        "a_publish_whose_acknowledgement_is_late_is_stored_and_delivered_once",
        Duration::from_secs(120),
    );
    let nats = NatsServer::start();
    let gate = TcpGate::start(SocketAddr::from(([127, 0, 0, 1], nats.port)));
    let dir = tempfile::tempdir().expect("temp dir");
    let history = "history_size = 1000";
    let a = start_node(
        dir.path(),
        "a",
        &format!("nats://127.0.0.1:{}", gate.port),
        history,
        "",
        &[],
    );
    let b = start_node(dir.path(), "b", &nats.url(), history, "", &[]);
    wait_cluster_up(&a, 1.0);
    wait_cluster_up(&b, 1.0);
    let (mut sub, _) = nats_ws_subscribe(&b);
    wait_following([&b]);

    assert_eq!(http_publish_offset(&a, CHANNEL, "{\"n\":1}"), 1);
    gate.hold();
    let late = std::thread::spawn({
        let addr = a.admin_addr();
        move || {
            // Answered after the hold and the re-send: later than an ordinary request.
            http::request_waiting(
                addr,
                "POST",
                &format!("/publish?channel={CHANNEL}"),
                &[],
                b"{\"n\":2}",
                LATE_ANSWER_WAIT,
            )
        }
    });
    std::thread::sleep(HELD);
    gate.release();
    let r = late
        .join()
        .expect("publish thread")
        .expect("HTTP publish 2");
    assert_eq!(r.status, 200, "publish 2: {}\n{}", r.text(), a.log());
    assert_eq!(r.json()["offset"], 2, "{}", r.text());
    assert_eq!(http_publish_offset(&a, CHANNEL, "{\"n\":3}"), 3);

    let got = sub.collect(3, Duration::from_secs(10));
    let seen: Vec<(u64, Value)> = got
        .iter()
        .map(|d| (d.offset, d.data["n"].clone()))
        .collect();
    assert_eq!(
        seen,
        vec![(1, json!(1)), (2, json!(2)), (3, json!(3))],
        "node B gets each message once, in order"
    );
    assert!(
        sub.next_delivery(Duration::from_millis(500)).is_none(),
        "nothing more"
    );

    let m = a.metrics();
    assert!(
        m.sum("ringcast_cluster_publish_resent_total") >= 1.0,
        "A sent the message again: {}",
        m.describe("ringcast_cluster_publish_resent_total")
    );
    assert_eq!(
        m.sum("ringcast_cluster_publish_deduped_total"),
        1.0,
        "the stream answered the copy duplicate: {}",
        m.describe("ringcast_cluster_publish_deduped_total")
    );

    let stored = python::run_script(
        "py_nats_check.py",
        &[
            "--servers",
            &nats.url(),
            "--stream",
            "RINGCAST",
            "--subject",
            "rc.ch.feed=3Adedupe",
        ],
    )
    .summary();
    assert_eq!(
        stored["offsets"],
        json!([1, 2, 3]),
        "stored once each: {stored}"
    );
}

fn nats_ws_subscribe(server: &Server) -> (Subscriber, Value) {
    crate::common::nats::ws_subscribe(server, &json!({"cmd":"subscribe","channel":CHANNEL,"id":1}))
}

const USER: &str = "user:7";

/// Regression (open issue, item 13, "cluster inbox publish dedupe"): a cluster-inbox
/// publish whose JetStream ack came late was answered 503 although it was stored, and
/// the publisher's retry stored it a second time. Now it carries a `Nats-Msg-Id` and is
/// sent again with it, like a channel publish: stored once, answered once with its
/// offset, delivered once.
#[test]
fn an_inbox_publish_whose_acknowledgement_is_late_is_stored_and_delivered_once() {
    let _deadline = Deadline::new(
        "an_inbox_publish_whose_acknowledgement_is_late_is_stored_and_delivered_once",
        Duration::from_secs(60),
    );
    let nats = NatsServer::start();
    let gate = TcpGate::start(SocketAddr::from(([127, 0, 0, 1], nats.port)));
    let dir = tempfile::tempdir().expect("temp dir");
    let node = |name: &str, url: &str| {
        let data = dir.path().join(name);
        start_node(
            dir.path(),
            name,
            url,
            "history_size = 1000",
            "interest_linger = 5",
            &[
                "--inbox",
                "true",
                "--data-dir",
                data.to_str().expect("utf-8 path"),
            ],
        )
    };
    let a = node("a", &format!("nats://127.0.0.1:{}", gate.port));
    let b = node("b", &nats.url());
    for n in [&a, &b] {
        n.wait_for_metric(
            "ringcast_inbox_up",
            "the cluster inbox is up",
            Duration::from_secs(30),
            |v| v == 1.0,
        );
    }
    let (mut sub, _) =
        crate::common::nats::ws_subscribe(&b, &json!({"cmd":"subscribe","channel":USER,"id":1}));
    assert_eq!(http_publish_acked(&a, USER, "{\"n\":1}"), 1);
    assert_eq!(
        sub.collect(1, Duration::from_secs(10))[0].offset,
        1,
        "node B follows the user"
    );

    gate.hold();
    let late = std::thread::spawn({
        let addr = a.admin_addr();
        move || {
            // Answered after the hold and the re-send: later than an ordinary request.
            http::request_waiting(
                addr,
                "POST",
                &format!("/publish?channel={USER}&ack=1"),
                &[],
                b"{\"n\":2}",
                LATE_ANSWER_WAIT,
            )
        }
    });
    std::thread::sleep(HELD);
    gate.release();
    let r = late
        .join()
        .expect("publish thread")
        .expect("HTTP publish 2");
    assert_eq!(r.status, 200, "publish 2: {}\n{}", r.text(), a.log());
    assert_eq!(r.json()["offset"], 2, "{}", r.text());
    assert_eq!(http_publish_acked(&a, USER, "{\"n\":3}"), 3);

    let got = sub.collect(2, Duration::from_secs(10));
    let seen: Vec<(u64, Value)> = got
        .iter()
        .map(|d| (d.offset, d.data["n"].clone()))
        .collect();
    assert_eq!(
        seen,
        vec![(2, json!(2)), (3, json!(3))],
        "node B gets each message once, in order"
    );
    assert!(
        sub.next_delivery(Duration::from_millis(500)).is_none(),
        "nothing more"
    );

    let m = a.metrics();
    assert!(
        m.sum("ringcast_inbox_publish_resent_total") >= 1.0,
        "A sent the message again: {}",
        m.describe("ringcast_inbox_publish_resent_total")
    );
    assert_eq!(
        m.sum("ringcast_inbox_publish_deduped_total"),
        1.0,
        "the stream answered the copy duplicate: {}",
        m.describe("ringcast_inbox_publish_deduped_total")
    );
    let stored = python::run_script(
        "py_nats_check.py",
        &[
            "--servers",
            &nats.url(),
            "--stream",
            "RINGCAST_INBOX",
            "--subject",
            "rc.inbox.user=3A7",
        ],
    )
    .summary();
    assert_eq!(
        stored["offsets"],
        json!([1, 2, 3]),
        "stored once each: {stored}"
    );
}
