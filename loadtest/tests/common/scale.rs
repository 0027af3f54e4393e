//! What the `loadtest/scale.sh` tests share: the root check, the script's command line
//! at CI size, a bounded wait that lets the script's trap tear down on timeout, the
//! teardown checks (no namespace, no bridge) and the per-run delivery counts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{num, ringcast_bin, workspace};

/// Names of this run's namespaces: `<prefix>-<i>`.
pub fn namespaces(prefix: &str) -> Vec<String> {
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

/// Fails unless the test runs as root (scale.sh needs namespaces and sysctls).
pub fn assert_root() {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "scale.sh needs root (network namespaces, sysctls); run the tests as root"
    );
}

/// A namespace prefix for this run, `<tag><pid % 10000>`, with no namespace of it yet.
pub fn fresh_prefix(tag: &str) -> String {
    let prefix = format!("{tag}{}", std::process::id() % 10_000);
    assert!(
        namespaces(&prefix).is_empty(),
        "namespaces {prefix}-* exist before the test"
    );
    prefix
}

/// `bash loadtest/scale.sh <connections> <mode args…>` with the CI-size options every
/// scale test uses: this run's prefix and subnet, all CPUs for servers and harness, a
/// 60 s harness timeout, the output directory and the binaries under test.
pub fn scale_command(
    connections: &str,
    mode: &[&str],
    prefix: &str,
    subnet: &str,
    out: &Path,
) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("loadtest/scale.sh"))
        .arg(connections)
        .args(mode)
        .args(["--prefix", prefix, "--subnet", subnet])
        .args([
            "--server-cpus",
            "all",
            "--harness-cpus",
            "all",
            "--timeout",
            "60",
        ])
        .arg("--out")
        .arg(out)
        .arg("--ringcast-bin")
        .arg(ringcast_bin())
        .arg("--load-bin")
        .arg(env!("CARGO_BIN_EXE_ringcast-load"));
    cmd
}

/// Waits for the script up to `limit`. On timeout it sends SIGTERM first (the script's
/// trap tears namespaces and servers down), then kills it and panics naming `what`.
pub fn wait_for_script(child: &mut Child, limit: Duration, what: &str, out: &Path) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for scale.sh") {
            return status;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {} s (output in {})",
                limit.as_secs(),
                out.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No namespace `<prefix>-*` and no bridge `<prefix>-br` is left after the script.
pub fn assert_namespaces_and_bridge_gone(prefix: &str) {
    let left = namespaces(prefix);
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
}

/// A JSON file the script wrote into `out`: its text and its value.
pub fn read_json(out: &Path, name: &str) -> (String, Value) {
    let text =
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
    let v =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON ({e}): {text}"));
    (text, v)
}

/// Every connection connected, was open at the end and received the one broadcast, and
/// each of the `targets` nodes held and reached `connections / targets` of them.
/// Returns the per-target results for further checks.
pub fn assert_everyone_held_and_reached(
    r: &Value,
    text: &str,
    connections: u64,
    targets: usize,
) -> Vec<Value> {
    assert_eq!(num(r, &["connections", "connected"]), connections, "{text}");
    assert_eq!(
        num(r, &["connections", "open_at_end"]),
        connections,
        "{text}"
    );
    assert_eq!(num(r, &["delivery", "expected"]), connections, "{text}");
    assert_eq!(num(r, &["delivery", "received"]), connections, "{text}");
    assert_eq!(num(r, &["delivery", "lost"]), 0, "{text}");
    let per_target = r["targets"].as_array().expect("per-target results").clone();
    assert_eq!(per_target.len(), targets, "{text}");
    let each = connections / targets as u64;
    for t in &per_target {
        assert_eq!(t["open_at_end"], each, "{t}");
        assert_eq!(t["received"], each, "{t}");
    }
    per_target
}

/// The output directory `tmp/<name>`, emptied.
pub fn fresh_out(name: &str) -> PathBuf {
    let out = super::tmp_path(name);
    let _ = std::fs::remove_dir_all(&out);
    out
}
