//! `ringcast check-host` on this very host: a small connection count passes (exit 0, at
//! most warnings), an impossible one fails (exit 1) and names what blocks it, each finding
//! with its fix.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// Runs `ringcast <global> check-host <args>`; returns the exit code, stdout and stderr.
fn check_host_with(global: &[&str], args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = Command::new(Server::binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RINGCAST_") {
            command.env_remove(&name);
        }
    }
    let child = command
        .args(global)
        .arg("check-host")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", Server::binary().display()));
    let output = child
        .wait_with_output()
        .expect("waiting for ringcast check-host");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn check_host(args: &[&str]) -> (Option<i32>, String, String) {
    check_host_with(&[], args)
}

#[test]
fn check_host_passes_or_names_the_blocker() {
    let _deadline = Deadline::new(
        "check_host_passes_or_names_the_blocker",
        Duration::from_secs(60),
    );
    // A hundred connections fit on any machine these tests run on (RLIMIT_NOFILE 20000).
    let (code, out, err) = check_host(&["--connections", "100"]);
    assert_eq!(
        code,
        Some(0),
        "check-host for 100 connections failed\n{out}{err}"
    );
    assert!(out.contains("result: OK for 100 connections"), "{out}");
    assert!(!out.contains("BLOCK "), "{out}");
    for line in out.lines().filter(|l| l.starts_with("WARN ")) {
        let next = out.lines().skip_while(|l| *l != line).nth(1).unwrap_or("");
        assert!(
            next.trim_start().starts_with("fix: "),
            "no fix after {line:?}\n{out}"
        );
    }

    // A hundred million connections need more descriptors and RAM than any test host has.
    let (code, out, err) = check_host(&["--connections", "100000000"]);
    assert_eq!(
        code,
        Some(1),
        "check-host for 100M connections did not fail\n{out}{err}"
    );
    let result = out
        .lines()
        .find(|l| l.starts_with("result: BLOCKED for 100000000 connections by "))
        .unwrap_or_else(|| panic!("no BLOCKED result line\n{out}"));
    assert!(result.contains("RLIMIT_NOFILE"), "{result}\n{out}");
    assert!(result.contains("MemTotal"), "{result}\n{out}");
    assert!(out.contains("BLOCK  RLIMIT_NOFILE = "), "{out}");
    assert!(out.contains("fix: systemd: LimitNOFILE="), "{out}");

    // The configuration's ports are the ones checked against the ephemeral range.
    let (code, out, err) =
        check_host_with(&["--listen", "127.0.0.1:8443"], &["--connections", "100"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ports 8443 9000 9001 9090"), "{out}");
}
