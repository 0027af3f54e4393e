//! The shipped unit's seccomp filter (`SystemCallFilter=@system-service` then
//! `SystemCallFilter=~@privileged`, kernel-tuning/ringcast.service) allows every system
//! call ringcast makes. systemd is not PID 1 where the tests run, so the filter itself
//! cannot be applied; instead ringcast runs under `strace -f` through a start, a
//! WebSocket subscriber, HTTP, UDP and TCP publishes, a SIGHUP reload and a SIGTERM
//! drain, and every call it made must be in the set `systemd-analyze syscall-filter`
//! expands those groups to on this host. io_uring operations submitted through the ring
//! are not system calls (seccomp never sees them); `io_uring_setup`/`_enter`/`_register`
//! are, and must be in the set.
//!
//! Not covered: TLS, the inbox, and the EMFILE paths (their calls are the same kinds:
//! reads, writes, file opens). `strace` and `systemd-analyze` are installed by
//! scripts/test.sh; a missing one fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// A syscall-filter group expanded to call names, nested groups included.
fn expand(group: &str, cache: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if let Some(names) = cache.get(group) {
        return names.clone();
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", group])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}): install Debian's systemd package \
                 (scripts/test.sh does)"
            )
        });
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {group}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut names = BTreeSet::new();
    for line in text.lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if item.starts_with('@') {
            names.extend(expand(item, cache));
        } else {
            names.insert(item.to_string());
        }
    }
    assert!(
        !names.is_empty(),
        "group {group} expanded to nothing:\n{text}"
    );
    cache.insert(group.to_string(), names.clone());
    names
}

/// The call names in an `strace -f` output (`PID name(...` lines; a call interrupted
/// and resumed is counted at its start).
fn traced_calls(trace: &str) -> BTreeSet<String> {
    trace
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|t| t.split_once('(').map(|(name, _)| name))
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// The pid of the process strace started (strace's only child).
fn traced_pid(strace_pid: u32) -> libc::pid_t {
    let path = format!("/proc/{strace_pid}/task/{strace_pid}/children");
    wait_until(
        Duration::from_secs(10),
        &format!("strace (pid {strace_pid}) has a child in {path}"),
        || {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse().ok())
        },
    )
}

fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is the traced server,
    // a grandchild that stays a zombie under strace until strace reaps it, so it cannot
    // be reused before the test ends.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

#[test]
fn systemd_sandbox_allows_ringcasts_syscalls() {
    let _deadline = Deadline::new(
        "systemd_sandbox_allows_ringcasts_syscalls",
        Duration::from_secs(120),
    );
    let version = Command::new("strace")
        .arg("-V")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run strace ({e}): install Debian's strace package (scripts/test.sh does)"
            )
        });
    assert!(version.status.success(), "strace -V failed");

    let real = Server::binary()
        .canonicalize()
        .expect("the ringcast binary under test exists (cargo build --release)");
    let dir = tempfile::tempdir().expect("temp dir");
    let trace_path = dir.path().join("trace.txt");
    let wrapper = dir.path().join("ringcast-under-strace");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec strace -f -qq -I3 -o '{}' '{}' \"$@\"\n",
            trace_path.display(),
            real.display()
        ),
    )
    .expect("writing the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the wrapper");
    let mut server = Server::start_program(
        &wrapper,
        &["--drain-grace", "0", "--drain-window", "1"],
        &[],
    );
    let pid = traced_pid(server.pid());

    let mut sub = Subscriber::connect(&server.ws_url(&["sys"]));
    server.wait_for_connections(1, Duration::from_secs(10));
    let r = server.http_publish(Some("sys"), br#"{"n":1}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    server.udp_publish("sys", br#"{"n":2}"#);
    server.tcp_ingest().publish("sys", br#"{"n":3}"#);
    let got = sub.collect(3, Duration::from_secs(10));
    assert_eq!(got.len(), 3, "deliveries under strace: {got:?}");

    kill(pid, libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "the SIGHUP reload is counted",
        || {
            (server
                .metrics()
                .sum_where("ringcast_config_reloads_total", &[("result", "ok")])
                == 1.0)
                .then_some(())
        },
    );
    // strace itself blocks fatal signals (-I3): this only tells the harness the exit that
    // follows is expected. The drain is started by the SIGTERM to ringcast after it.
    server.sigterm();
    kill(pid, libc::SIGTERM);
    server
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "ringcast under strace did not exit after SIGTERM\n{}",
                server.log()
            )
        });
    assert!(
        server.log().contains("drained; exiting"),
        "ringcast did not finish its drain\n{}",
        server.log()
    );

    let trace = std::fs::read_to_string(&trace_path).expect("reading the strace output");
    let used = traced_calls(&trace);
    assert!(
        used.contains("io_uring_setup") && (used.contains("accept") || used.contains("accept4")),
        "the trace lacks calls ringcast surely makes: {used:?}"
    );
    let mut cache = BTreeMap::new();
    let allowed: BTreeSet<String> = expand("@system-service", &mut cache)
        .difference(&expand("@privileged", &mut cache))
        .cloned()
        .collect();
    let refused: Vec<&String> = used.difference(&allowed).collect();
    println!(
        "{} distinct system calls traced, all in @system-service minus @privileged ({} calls): {:?}",
        used.len(),
        allowed.len(),
        used
    );
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter would refuse {refused:?} (EPERM, SystemCallErrorNumber)"
    );
}
