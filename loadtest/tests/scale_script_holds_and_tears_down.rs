//! `loadtest/scale.sh` at CI size: 3,000 connections over 3 ringcast nodes, each in its
//! own network namespace. Every connection is held, the one broadcast reaches all of them,
//! the per-node counts add up, and afterwards no namespace, bridge or process is left.
//!
//! Needs root and `ip netns` (iproute2); without them the test fails, it is not skipped.

mod common;

use std::time::Duration;

use common::num;
use common::scale::{
    assert_everyone_held_and_reached, assert_namespaces_and_bridge_gone, assert_root, fresh_out,
    fresh_prefix, read_json, scale_command, wait_for_script,
};

#[test]
fn three_namespaces_hold_3000_and_everyone_gets_the_broadcast() {
    assert_root();
    let prefix = fresh_prefix("rct");
    let out = fresh_out("scale-3000");
    let mut child = scale_command(
        "3000",
        &["--nodes", "3", "--hold", "1", "--rate", "3000"],
        &prefix,
        "127.201",
        &out,
    )
    .spawn()
    .expect("starting loadtest/scale.sh");
    let status = wait_for_script(&mut child, Duration::from_secs(120), "scale.sh", &out);
    assert_namespaces_and_bridge_gone(&prefix);
    assert!(
        status.success(),
        "scale.sh failed ({status}); output in {}",
        out.display()
    );

    let (text, r) = read_json(&out, "result.json");
    assert_eq!(num(&r, &["connections", "failed"]), 0, "{text}");
    for t in assert_everyone_held_and_reached(&r, &text, 3000, 3) {
        assert!(
            t["url"].as_str().is_some_and(|u| u.contains("127.201.1.")),
            "{t}"
        );
    }
    assert_eq!(
        r["server"]["pids"].as_array().map(Vec::len),
        Some(3),
        "the three nodes are sampled together"
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("reading report.md");
    assert!(report.contains("result: OK"), "{report}");
    assert!(report.contains("per connection"), "{report}");
}
