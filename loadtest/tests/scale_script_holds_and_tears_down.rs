//! `loadtest/scale.sh` at CI size: 3,000 connections over 3 ringcast nodes, each in its
//! own network namespace. Every connection is held, the one broadcast reaches all of them,
//! the per-node counts add up, and afterwards no namespace, bridge or process is left.
//!
//! Needs root and `ip netns` (iproute2); without them the test fails, it is not skipped.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{num, ringcast_bin, workspace};

/// Names of this run's namespaces: `<prefix>-<i>`.
fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running `ip netns list`: is iproute2 installed? (apt-get install iproute2)");
    assert!(
        out.status.success(),
        "`ip netns list` failed ({}): network namespaces are required: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn three_namespaces_hold_3000_and_everyone_gets_the_broadcast() {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "scale.sh needs root (network namespaces, sysctls); run the tests as root"
    );
    let prefix = format!("rct{}", std::process::id() % 10_000);
    assert!(
        namespaces(&prefix).is_empty(),
        "namespaces {prefix}-* exist before the test"
    );
    let out: PathBuf = common::tmp_path("scale-3000");
    let _ = std::fs::remove_dir_all(&out);
    let script = workspace().join("loadtest/scale.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args(["3000", "--nodes", "3", "--hold", "1", "--rate", "3000"])
        .args(["--prefix", &prefix, "--subnet", "127.201"])
        .args([
            "--server-cpus",
            "all",
            "--harness-cpus",
            "all",
            "--timeout",
            "60",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--ringcast-bin")
        .arg(ringcast_bin())
        .arg("--load-bin")
        .arg(env!("CARGO_BIN_EXE_ringcast-load"))
        .spawn()
        .expect("starting loadtest/scale.sh");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for scale.sh") {
            break status;
        }
        if Instant::now() >= deadline {
            // SIGTERM first: the script's trap tears the namespaces down.
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scale.sh did not finish within 120 s (output in {})",
                out.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let left = namespaces(&prefix);
    let bridge = Command::new("ip")
        .args(["link", "show", &format!("{prefix}-br")])
        .output()
        .expect("running `ip link show`");
    assert!(
        left.is_empty(),
        "namespaces left behind after scale.sh: {left:?}"
    );
    assert!(
        !bridge.status.success(),
        "bridge {prefix}-br left behind after scale.sh"
    );
    assert!(
        status.success(),
        "scale.sh failed ({status}); output in {}",
        out.display()
    );

    let text = std::fs::read_to_string(out.join("result.json")).expect("reading result.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("result.json is JSON");
    assert_eq!(num(&r, &["connections", "connected"]), 3000, "{text}");
    assert_eq!(num(&r, &["connections", "open_at_end"]), 3000, "{text}");
    assert_eq!(num(&r, &["connections", "failed"]), 0, "{text}");
    assert_eq!(num(&r, &["delivery", "expected"]), 3000, "{text}");
    assert_eq!(num(&r, &["delivery", "received"]), 3000, "{text}");
    assert_eq!(num(&r, &["delivery", "lost"]), 0, "{text}");
    let targets = r["targets"].as_array().expect("per-target results");
    assert_eq!(targets.len(), 3, "{text}");
    for t in targets {
        assert_eq!(t["open_at_end"], 1000, "{t}");
        assert_eq!(t["received"], 1000, "{t}");
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
