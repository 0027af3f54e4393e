//! The inbox across a cluster (docs/cluster.md, "Inbox"): three ringcast nodes with the
//! inbox and token authentication on, joined by a real nats-server. A Python client
//! (`websockets` + PyJWT, tests/clients/py_inbox_cluster.py) gets on node 1 what was
//! published on node 0, live and unacked; acks on node 1; moves to node 2 and gets only
//! the unacked ones with the same offsets and epoch; offsets continue after everything
//! is acked. Then messages acknowledged to their publisher on node 0 survive `kill -9` of
//! node 0 and are delivered on node 1. With NATS down, user channels answer 503
//! `inbox: ...`, never a local offset. The same walk on a 3-server NATS cluster with
//! 3-replica inbox streams (reads then go to the stream leader), and one NATS server
//! killed: messages acknowledged to their publisher after that reach the user.

use crate::common::admin::wait_inbox_up;
use crate::common::nats::{start_node, start_recovering_node, Cluster, NatsCluster, NatsServer};
use crate::common::*;
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    let data = dir.join(name);
    start_recovering_node(dir, name, nats_url, 1000, 5, &inbox_args(&data))
}

/// The inbox and JWT arguments of every node.
fn inbox_args(data: &Path) -> [&str; 6] {
    [
        "--jwt-secret",
        SECRET,
        "--inbox",
        "true",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ]
}

fn addrs(server: &Server) -> String {
    format!("{},{}", server.ws_addr(), server.admin_addr())
}

/// Runs `py_inbox_cluster.py` with `args` after `--nodes <nodes> --secret S --user 42`;
/// its summary on success, else a panic with its output and the nodes' logs.
fn inbox_client(nodes: &[&Server], args: &[&str]) -> serde_json::Value {
    let all = nodes.iter().map(|n| addrs(n)).collect::<Vec<_>>();
    let mut argv = vec!["--nodes"];
    argv.extend(all.iter().map(String::as_str));
    argv.extend(["--secret", SECRET, "--user", "42"]);
    argv.extend_from_slice(args);
    let run = python::run_script("py_inbox_cluster.py", &argv);
    assert!(
        run.status.success(),
        "{}\n{}",
        run.explain(),
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {i}\n{}", n.log()))
            .collect::<String>()
    );
    run.summary()
}

/// The node answers an acknowledged publish within its JetStream timeout (2 s) plus its
/// 10 s of re-sending; a client that gave up sooner would time out on a slow machine
/// while the server keeps its promise.
const ACKED_PUBLISH_WAIT: Duration = Duration::from_secs(15);

fn http_publish_acked(server: &Server, channel: &str, body: &str) -> http::HttpResponse {
    try_http_publish_acked(server, channel, body, ACKED_PUBLISH_WAIT).expect("HTTP publish")
}

/// As [`http_publish_acked`], waiting up to `wait` for the answer.
fn try_http_publish_acked(
    server: &Server,
    channel: &str,
    body: &str,
    wait: Duration,
) -> std::io::Result<http::HttpResponse> {
    let target = format!("/publish?channel={channel}&ack=1");
    http::request_waiting(
        server.admin_addr(),
        "POST",
        &target,
        &[],
        body.as_bytes(),
        wait,
    )
}

#[test]
fn a_users_inbox_follows_them_across_nodes_and_survives_a_killed_node() {
    let mut cluster = Cluster::start(
        "a_users_inbox_follows_them_across_nodes_and_survives_a_killed_node",
        Duration::from_secs(150),
        NatsServer::start,
        &["node0", "node1", "node2"],
        node,
    );
    let nodes = &mut cluster.nodes;
    for n in nodes.iter() {
        wait_inbox_up(n, 1.0);
    }
    let epoch = inbox_client(&nodes.iter().collect::<Vec<_>>(), &["moves"])["epoch"]
        .as_str()
        .expect("epoch in the summary")
        .to_string();

    // Acknowledged on node 0, then node 0 is killed (SIGKILL): every acknowledged
    // message is in JetStream and reaches the user on node 1.
    for i in 8..=17 {
        let r = http_publish_acked(&nodes[0], "user:42", &format!("{{\"n\":{i}}}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["offset"], i, "{}", r.text());
    }
    drop(nodes.remove(0));
    inbox_client(
        &[&nodes[0]],
        &["check", "--first", "7", "--last", "17", "--epoch", &epoch],
    );
    let m = nodes[0].metrics();
    assert!(
        m.sum("ringcast_inbox_acks_total") >= 1.0,
        "{}",
        m.describe("ringcast_inbox_acks_total")
    );

    // NATS down: user channels are refused (503 inbox: ...), not served locally.
    cluster.nats.stop();
    wait_inbox_up(&nodes[0], 0.0);
    let r = http_publish_acked(&nodes[0], "user:42", "{\"n\":99}");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("inbox"), "{}", r.text());
}

#[test]
fn a_users_inbox_on_replicated_streams_survives_a_nats_server_loss() {
    let _deadline = Deadline::new(
        "a_users_inbox_on_replicated_streams_survives_a_nats_server_loss",
        Duration::from_secs(240),
    );
    let mut nats = NatsCluster::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes: Vec<Server> = ["node0", "node1", "node2"]
        .iter()
        .map(|name| {
            let data = dir.path().join(name);
            start_node(
                dir.path(),
                name,
                &nats.urls(),
                "history_size = 1000\nmax_recovery_messages = 1000",
                "interest_linger = 5\nstream_replicas = 3",
                &inbox_args(&data),
            )
        })
        .collect();
    for n in &nodes {
        wait_inbox_up(n, 1.0);
    }
    let epoch = inbox_client(&nodes.iter().collect::<Vec<_>>(), &["moves"])["epoch"]
        .as_str()
        .expect("epoch in the summary")
        .to_string();

    // One NATS server dies; every node reconnects to another. While the streams elect
    // a new leader the node re-sends a publish with its message id for up to 10 s (the
    // answer waits for that); one refused then (503) is sent again, as a real publisher
    // would, and may have been stored, so offsets may pass 17, never go back.
    nats.servers[0].stop();
    let mut acked = Vec::new();
    for i in 8..=17 {
        let offset = wait_until(
            Duration::from_secs(60),
            "an inbox publish is acknowledged",
            || {
                let body = format!("{{\"n\":{i}}}");
                match try_http_publish_acked(&nodes[0], "user:42", &body, ACKED_PUBLISH_WAIT) {
                    Ok(r) if r.status == 200 => r.json()["offset"].as_u64(),
                    _ => {
                        std::thread::sleep(Duration::from_millis(200));
                        None
                    }
                }
            },
        );
        acked.push(offset);
    }
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]) && acked[0] == 8,
        "acknowledged offsets: {acked:?}"
    );
    let last = acked[acked.len() - 1].to_string();
    for n in &nodes[1..] {
        inbox_client(
            &[n],
            &["check", "--first", "7", "--last", &last, "--epoch", &epoch],
        );
    }
}
