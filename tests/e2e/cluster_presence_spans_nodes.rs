//! Presence across three ringcast nodes joined by a real nats-server (docs/cluster.md,
//! *Presence*): a `presence` query on any node lists the members of every node (a user on
//! two nodes once, its connections summed), join/leave events from one node reach
//! subscribers on another, and members of a node killed with SIGKILL stop being listed.
//!
//! tests/clients/py_cluster_presence.py runs the cases with real `websockets` clients and
//! PyJWT tokens and prints one JSON line per case; it kills the third node itself (its
//! pid is given) in the last case.

use crate::common::nats::NatsServer;
use crate::common::*;
use std::time::Duration;

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";

const CASES: [&str; 3] = [
    "query_merges_every_node",
    "join_leave_cross_nodes",
    "killed_node_drops_out",
];

fn node(nats_url: &str, dir: &tempfile::TempDir, name: &str) -> Server {
    crate::common::nats::start_node(
        dir.path(),
        name,
        nats_url,
        "[namespaces.room]\npresence = true\njoin_leave = true",
        "interest_linger = 5\npresence_window_ms = 200",
        &[
            "--shards",
            "2",
            "--jwt-secret",
            SECRET,
            "--allow-anonymous",
            "true",
        ],
    )
}

#[test]
fn presence_is_answered_and_announced_across_nodes() {
    let _deadline = Deadline::new(
        "presence_is_answered_and_announced_across_nodes",
        Duration::from_secs(180),
    );
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nodes: Vec<Server> = (0..3)
        .map(|i| node(&nats.url(), &dir, &format!("node{i}")))
        .collect();
    for n in &nodes {
        n.wait_for_metric(
            "ringcast_cluster_up",
            "the node connected to NATS",
            Duration::from_secs(20),
            |v| v == 1.0,
        );
    }
    let join = |f: &dyn Fn(&Server) -> String| nodes.iter().map(f).collect::<Vec<_>>().join(",");
    let ws = join(&|n| n.ws_addr().to_string());
    let admin = join(&|n| n.admin_addr().to_string());
    let pids = join(&|n| n.pid().to_string());
    let logs = || {
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {i}\n{}", n.log()))
            .collect::<String>()
    };
    let run = python::run_script(
        "py_cluster_presence.py",
        &[
            "--ws", &ws, "--admin", &admin, "--pids", &pids, "--secret", SECRET,
        ],
    );
    run.assert_cases(&CASES, &logs());
    // The queries went through NATS and the surviving nodes answered each other.
    for n in &nodes[..2] {
        let m = n.metrics();
        assert!(
            m.sum("ringcast_cluster_presence_queries_total") >= 1.0,
            "{}",
            m.describe("ringcast_cluster_presence_queries_total")
        );
        assert!(
            m.sum("ringcast_cluster_presence_served_total") >= 1.0,
            "{}",
            m.describe("ringcast_cluster_presence_served_total")
        );
        assert_eq!(m.sum("ringcast_cluster_presence_partial_total"), 0.0);
    }
    assert!(
        nodes[1]
            .metrics()
            .sum("ringcast_cluster_presence_events_received_total")
            >= 4.0
    );
    // The script killed node C (SIGKILL). Its child is not reaped yet, so kill(2) on it
    // still succeeds: this marks it as ended by the test, not on its own.
    nodes[2].sigterm();
    assert!(
        nodes[2].wait_exit(Duration::from_secs(10)).is_some(),
        "node C still runs after the script's SIGKILL"
    );
}

/// NATS unreachable: the query is answered from the node's own members, marked partial.
#[test]
fn with_nats_down_the_answer_is_local_and_partial() {
    let _deadline = Deadline::new(
        "with_nats_down_the_answer_is_local_and_partial",
        Duration::from_secs(60),
    );
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = node(&nats.url(), &dir, "a");
    a.wait_for_metric(
        "ringcast_cluster_up",
        "connected",
        Duration::from_secs(20),
        |v| v == 1.0,
    );
    nats.stop();
    a.wait_for_metric(
        "ringcast_cluster_up",
        "NATS gone",
        Duration::from_secs(20),
        |v| v == 0.0,
    );
    // A tungstenite client: subscribed on the upgrade URL (its own join event is a frame
    // this client does not decode, so it only asks, on a second connection).
    let _member = a.raw_ws(&["room:down"]);
    let mut asker = Subscriber::connect(&format!("ws://{}/ws", a.ws_addr()));
    let reply = wait_until(Duration::from_secs(10), "the member counted", || {
        let r = asker.request(
            &serde_json::json!({"cmd":"presence","channel":"room:down","id":1}),
            Duration::from_secs(5),
        );
        (r["count"] == 1).then_some(r)
    });
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["partial"], true, "{reply}");
    assert!(a.metrics().sum("ringcast_cluster_presence_partial_total") >= 1.0);
}
