//! The inbox across a cluster (docs/cluster.md, "Inbox"): three ringcast nodes with the
//! inbox and token authentication on, joined by a real nats-server. A Python client
//! (`websockets` + PyJWT, tests/clients/py_inbox_cluster.py) gets on node 1 what was
//! published on node 0, live and unacked; acks on node 1; moves to node 2 and gets only
//! the unacked ones with the same offsets and epoch; offsets continue after everything
//! is acked. Then messages acknowledged to their publisher on node 0 survive `kill -9` of
//! node 0 and are delivered on node 1. With NATS down, user channels answer 503
//! `inbox: ...`, never a local offset.

mod common;

use common::nats::{start_recovering_node, Cluster, NatsServer};
use common::*;
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    let data = dir.join(name);
    start_recovering_node(
        dir,
        name,
        nats_url,
        1000,
        5,
        &[
            "--jwt-secret",
            SECRET,
            "--inbox",
            "true",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
    )
}

fn wait_inbox_up(server: &Server, up: f64) {
    server.wait_for_metric(
        "ringcast_inbox_up",
        &format!("ringcast_inbox_up == {up}"),
        Duration::from_secs(30),
        |v| v == up,
    );
}

fn addrs(server: &Server) -> String {
    format!("{},{}", server.ws_addr(), server.admin_addr())
}

fn http_publish_acked(server: &Server, channel: &str, body: &str) -> http::HttpResponse {
    let request = format!(
        "POST /publish?channel={channel}&ack=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http::send_raw(server.admin_addr(), request.as_bytes()).expect("HTTP publish")
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
    let all: Vec<String> = nodes.iter().map(addrs).collect();
    let mut args = vec!["--nodes"];
    args.extend(all.iter().map(String::as_str));
    args.extend(["--secret", SECRET, "--user", "42", "moves"]);
    let run = python::run_script("py_inbox_cluster.py", &args);
    assert!(
        run.status.success(),
        "{}\n--- node 0\n{}\n--- node 1\n{}\n--- node 2\n{}",
        run.explain(),
        nodes[0].log(),
        nodes[1].log(),
        nodes[2].log()
    );
    let epoch = run.summary()["epoch"]
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
    let check = python::run_script(
        "py_inbox_cluster.py",
        &[
            "--nodes",
            &addrs(&nodes[0]),
            "--secret",
            SECRET,
            "--user",
            "42",
            "check",
            "--first",
            "7",
            "--last",
            "17",
            "--epoch",
            &epoch,
        ],
    );
    assert!(
        check.status.success(),
        "{}\n--- node 1\n{}",
        check.explain(),
        nodes[0].log()
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
