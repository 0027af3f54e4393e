//! Identity end to end: tokens signed by an independent implementation (Python's PyJWT,
//! keys from `cryptography`) over real `websockets` connections to the real binary.
//!
//! tests/clients/py_auth.py runs the cases and prints one JSON line per case; each test
//! here starts a server configured for its suite, runs the script and requires every
//! expected case to report `ok`. A missing Python module fails the test (exit 2 with the
//! install command), never skips it.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";

/// Namespaces for the suites: `room` takes client publishes, `news` does not.
const NAMESPACES: &str = "[namespaces.room]\nallow_publish = true\n\
                          [namespaces.news]\nallow_publish = false\n";

fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a scratch directory")
}

/// Runs py_auth.py with `args` and requires exit 0 and an `ok` line for each of `cases`.
fn run_cases(args: &[&str], cases: &[&str]) {
    python::run_script("py_auth.py", args).assert_cases(cases, "");
}

fn start(extra: &[&str], config_dir: &Path) -> Server {
    let config = config_dir.join("ringcast.toml");
    std::fs::write(&config, NAMESPACES).expect("writing the config file");
    let mut args = vec!["--config", config.to_str().expect("utf-8 temp path")];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn hs256_tokens_gate_the_upgrade_channels_refresh_and_expiry() {
    let _deadline = Deadline::new("hs256 token cases", Duration::from_secs(60));
    let dir = scratch_dir();
    let server = start(
        &[
            "--jwt-secret",
            SECRET,
            "--jwt-leeway",
            "0",
            "--jwt-cookie",
            "rc_token",
            // A cookie needs named origins (the server refuses to start with "*").
            "--allowed-origins",
            "https://app.test",
        ],
        dir.path(),
    );
    let (ws, admin) = (
        server.ws_addr().to_string(),
        server.admin_addr().to_string(),
    );
    run_cases(
        &[
            "hs256", "--ws", &ws, "--admin", &admin, "--secret", SECRET, "--cookie", "rc_token",
        ],
        &[
            "valid_hs256",
            "token_in_header_and_cookie",
            "expired",
            "not_yet_valid",
            "forged_signature",
            "wrong_key",
            "anonymous_refused",
            "garbage_token",
            "forbidden_channel",
            "other_users_channel",
            "refresh_extends",
            "expiry_closes_4401",
            "client_publish",
        ],
    );
    let metrics = server.metrics();
    assert!(metrics.sum_where("ringcast_auth_failures_total", &[("reason", "expired")]) >= 1.0);
    assert!(
        metrics.sum_where(
            "ringcast_auth_failures_total",
            &[("reason", "bad_signature")]
        ) >= 2.0
    );
    assert!(
        metrics.sum_where(
            "ringcast_connections_closed_total",
            &[("reason", "token_expired")]
        ) >= 1.0
    );
}

#[test]
fn admin_disconnect_closes_a_user_on_every_shard() {
    let _deadline = Deadline::new("admin disconnect", Duration::from_secs(60));
    let dir = scratch_dir();
    let server = start(&["--jwt-secret", SECRET, "--shards", "2"], dir.path());
    let (ws, admin) = (
        server.ws_addr().to_string(),
        server.admin_addr().to_string(),
    );
    run_cases(
        &[
            "disconnect",
            "--ws",
            &ws,
            "--admin",
            &admin,
            "--secret",
            SECRET,
        ],
        &["admin_disconnect"],
    );
    let metrics = server.metrics();
    assert_eq!(
        metrics.sum_where(
            "ringcast_connections_closed_total",
            &[("reason", "admin_disconnect")]
        ),
        16.0
    );
}

#[test]
fn rs256_tokens_verify_with_a_public_key_file() {
    let _deadline = Deadline::new("rs256 token cases", Duration::from_secs(60));
    let dir = scratch_dir();
    let dir_text = dir.path().to_str().expect("utf-8 temp path");
    run_cases(&["keygen", "--dir", dir_text], &[]);
    let public = dir.path().join("rsa.pub.pem");
    let server = start(
        &[
            "--jwt-public-key-file",
            public.to_str().expect("utf-8 temp path"),
            "--jwt-algorithm",
            "RS256",
        ],
        dir.path(),
    );
    let (ws, admin) = (
        server.ws_addr().to_string(),
        server.admin_addr().to_string(),
    );
    run_cases(
        &["rs256", "--ws", &ws, "--admin", &admin, "--dir", dir_text],
        &[
            "valid_rs256",
            "rs256_wrong_key",
            "rs256_server_refuses_hs256",
        ],
    );
}
