//! Mistakes an SRE makes at 3 a.m. get a clear, specific error and a non-zero exit.

mod common;

use std::time::Duration;

use common::{free_tcp_port, run_load};

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = run_load(args, Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "expected failure for {args:?}:\n{}",
        out.output
    );
    for needle in needles {
        assert!(
            out.output.contains(needle),
            "{needle:?} missing from:\n{}",
            out.output
        );
    }
}

#[test]
fn refused_target_names_the_address() {
    let port = free_tcp_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    fails_with(
        &[
            "connect",
            "--url",
            &url,
            "-n",
            "20",
            "--hold",
            "0",
            "--timeout",
            "20",
        ],
        &["connection refused", &format!("127.0.0.1:{port}")],
    );
}

#[test]
fn remote_targets_need_allow_remote() {
    fails_with(
        &["connect", "--url", "ws://192.0.2.1:80/ws", "-n", "1"],
        &["not a loopback", "--allow-remote"],
    );
    fails_with(
        &[
            "fanout",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--publish",
            "udp://192.0.2.1:9000",
            "-n",
            "1",
        ],
        &["not a loopback"],
    );
}

#[test]
fn bad_urls_are_rejected() {
    fails_with(
        &["connect", "--url", "http://127.0.0.1:1/", "-n", "1"],
        &["bad URL", "ws://"],
    );
    fails_with(
        &["connect", "--url", "wss://127.0.0.1:1/", "-n", "1"],
        &["TLS"],
    );
    fails_with(
        &[
            "fanout",
            "--url",
            "ws://127.0.0.1:1/",
            "--publish",
            "smtp://x:1",
            "-n",
            "1",
        ],
        &["bad URL"],
    );
}

#[test]
fn too_many_connections_for_the_fd_limit_says_what_is_needed() {
    fails_with(
        &[
            "connect",
            "--url",
            "ws://127.0.0.1:1/",
            "-n",
            "100000",
            "--max-workers",
            "2",
        ],
        &["worker processes", "RLIMIT_NOFILE"],
    );
}

#[test]
fn recover_refuses_what_it_cannot_account_for() {
    fails_with(
        &[
            "recover",
            "--url",
            "ws://127.0.0.1:1/ws?channels=news",
            "-n",
            "1",
        ],
        &["without channels=", "ws://127.0.0.1:1/ws"],
    );
    fails_with(
        &[
            "recover",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--publish",
            "ws",
            "-n",
            "1",
        ],
        &["udp://, tcp:// or http://"],
    );
    fails_with(
        &["recover", "--url", "ws://127.0.0.1:1/ws", "--channels", "0"],
        &["--channels >= 1"],
    );
}
