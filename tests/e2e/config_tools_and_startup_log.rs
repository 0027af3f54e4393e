//! The configuration tools of the real binary: `config defaults` prints a file that
//! `config check` accepts, `config check` names a bad key, a bad environment value is
//! named by its variable, `--version` carries the git revision, and the startup log
//! (plain text without colour when stderr is not a terminal, or JSON) states the
//! effective configuration once.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

fn ringcast(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(Server::binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RINGCAST_") {
            command.env_remove(&name);
        }
    }
    command.env_remove("NO_COLOR");
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running ringcast {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn config_defaults_round_trip_through_config_check() {
    let _deadline = Deadline::new("config_defaults_round_trip", Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("temp dir");
    let defaults = ringcast(&["config", "defaults"], &[]);
    assert!(defaults.status.success(), "{}", text(&defaults.stderr));
    let body = text(&defaults.stdout);
    assert!(body.contains("\nmax_connections = 1000000\n"), "{body}");
    assert!(body.contains("\ndrain_grace = 5\n"), "{body}");
    let path = dir.path().join("defaults.toml");
    std::fs::write(&path, &body).expect("writing the defaults");
    let check = ringcast(&["config", "check", path.to_str().expect("utf-8")], &[]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert_eq!(text(&check.stdout).trim(), "ok");

    for (content, key) in [
        ("max_connections = 0\n", "`max_connections`"),
        ("ring_capacity = 1000\n", "`ring_capacity`"),
        ("max_conections = 5\n", "max_conections"),
        ("ping_interval = \"soon\"\n", "ping_interval"),
    ] {
        std::fs::write(&path, content).expect("writing a bad file");
        let check = ringcast(&["config", "check", path.to_str().expect("utf-8")], &[]);
        let stderr = text(&check.stderr);
        assert!(!check.status.success(), "{content:?} was accepted");
        assert!(stderr.contains(key), "{content:?}: {stderr}");
    }
}

#[test]
fn a_bad_environment_value_is_named_by_its_variable() {
    let _deadline = Deadline::new("a_bad_environment_value", Duration::from_secs(60));
    let out = ringcast(&[], &[("RINGCAST_MAX_CONNECTIONS", "abc")]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("RINGCAST_MAX_CONNECTIONS") && stderr.contains("max_connections"),
        "{stderr}"
    );
}

#[test]
fn version_names_the_git_revision() {
    let out = ringcast(&["--version"], &[]);
    assert!(out.status.success());
    let version = text(&out.stdout);
    let revision = version
        .trim()
        .strip_prefix(&format!("ringcast {} (git ", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {version:?}"));
    // Built from this checkout (tests run from one; CI clones the repository), the
    // revision is one of its commits: "unknown" here means build.rs lost git.
    assert!(
        revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit()),
        "{version:?}"
    );
    let known = std::process::Command::new("git")
        .args(["cat-file", "-e", &format!("{revision}^{{commit}}")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running git (the tests run from a git checkout)");
    assert!(
        known.success(),
        "{revision} is not a commit of this checkout"
    );
}

/// Starts the binary on free ports with `extra`, waits for `ringcast started`, and
/// returns its log.
fn startup_log(extra: &[&str]) -> String {
    let server = Server::start(extra);
    wait_until(
        Duration::from_secs(15),
        "`ringcast started` in the log",
        || server.log().contains("ringcast started").then_some(()),
    );
    server.log()
}

#[test]
fn the_startup_log_states_the_effective_configuration_without_colour() {
    let _deadline = Deadline::new("startup_log", Duration::from_secs(60));
    let log = startup_log(&[
        "--max-connections",
        "4321",
        "--ingest-key",
        "secret-key-0123456789",
    ]);
    assert_eq!(log.matches("effective configuration").count(), 1, "{log}");
    // Keys as the configuration file names them, not a Rust struct dump.
    assert!(log.contains("max_connections = 4321, "), "{log}");
    assert!(log.contains("listen = 127.0.0.1:"), "{log}");
    assert!(!log.contains("Settings {"), "{log}");
    assert!(log.contains("ingest_key = <redacted>"), "{log}");
    assert!(
        !log.contains("secret-key-0123456789"),
        "the ingest key leaked: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a non-terminal log: {log:?}"
    );

    let log = startup_log(&["--log-format", "json"]);
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        assert!(value.get("level").is_some(), "{line}");
    }
}
