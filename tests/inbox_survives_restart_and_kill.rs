//! The durable inbox end to end: messages to `user:` channels acknowledged to their
//! publisher (TCP `ACK ON` mode, HTTP `?ack=1`) survive a SIGTERM restart and a `kill -9`
//! right after the acks arrived; a Python client (`websockets` + PyJWT tokens,
//! tests/clients/py_inbox.py) then receives exactly the unacked ones, acks, reconnects
//! and does not get acked ones again. Also: an unwritable inbox path stops startup with
//! a message naming the path.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";

fn start(dir: &std::path::Path) -> Server {
    start_with(dir, &[])
}

fn start_with(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--jwt-secret",
        SECRET,
        "--inbox",
        "true",
        "--data-dir",
        dir.to_str().expect("utf-8 temp dir"),
        "--drain-window",
        "1",
        "--drain-grace",
        "0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Publishes `n` messages to `channel` in ack mode; returns the offsets acknowledged.
fn publish_acked(server: &Server, channel: &str, n: usize) -> Vec<u64> {
    let mut tcp = server.tcp_ingest();
    tcp.send_raw(b"ACK ON\n");
    for i in 0..n {
        tcp.publish(channel, format!("{{\"n\":{i}}}").as_bytes());
    }
    (0..n)
        .map(|_| {
            let line = tcp
                .read_line(Duration::from_secs(5))
                .expect("an ack line within 5 s");
            line.strip_prefix("OK ")
                .and_then(|o| o.parse().ok())
                .unwrap_or_else(|| panic!("expected OK <offset>, got {line:?}"))
        })
        .collect()
}

fn http_publish_acked(server: &Server, channel: &str, body: &str) -> serde_json::Value {
    let request = format!(
        "POST /publish?channel={channel}&ack=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = http::send_raw(server.admin_addr(), request.as_bytes()).expect("HTTP publish");
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

#[test]
fn inbox_survives_restart_and_kill_and_acks_are_not_redelivered() {
    let _deadline = Deadline::new(
        "inbox_survives_restart_and_kill_and_acks_are_not_redelivered",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = start(dir.path());
    assert_eq!(
        publish_acked(&server, "user:alice", 20),
        (1..=20).collect::<Vec<_>>()
    );
    for expected in 21..=25 {
        let body = http_publish_acked(&server, "user:alice", "{\"via\":\"http\"}");
        assert_eq!(body["offset"], expected, "{body}");
    }
    // Without ack mode: queued (202), stored all the same.
    let request = "POST /publish?channel=user:bob HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
    let queued = http::send_raw(server.admin_addr(), request.as_bytes()).expect("HTTP publish");
    assert_eq!(queued.status, 202, "{}", queued.text());
    assert!(server.log().contains("inbox on"), "{}", server.log());

    server.sigterm();
    assert!(
        server.wait_exit(Duration::from_secs(40)).is_some(),
        "no exit after SIGTERM"
    );
    let server = start(dir.path());
    // Offsets continue across the restart.
    assert_eq!(
        publish_acked(&server, "user:alice", 10),
        (26..=35).collect::<Vec<_>>()
    );
    // kill -9 right after the acks arrived: nothing acknowledged may be lost. Dropping
    // the server kills it with SIGKILL (std's Child::kill) and reaps it.
    drop(server);
    // This time every token is subscribed to its own user channel at connect, so the
    // client names none (py_inbox.py --auto).
    let server = start_with(dir.path(), &["--subscribe-user-channel", "true"]);
    let metrics = server.metrics();
    assert_eq!(metrics.sum("ringcast_inbox_up"), 1.0);

    let run = python::run_script(
        "py_inbox.py",
        &[
            "--ws",
            &server.ws_addr().to_string(),
            "--admin",
            &server.admin_addr().to_string(),
            "--secret",
            SECRET,
            "--user",
            "alice",
            "--expect",
            "35",
            "--ack",
            "30",
            "--auto",
        ],
    );
    assert!(
        run.status.success(),
        "{}\n--- server log\n{}",
        run.explain(),
        server.log()
    );
    let metrics = server.metrics();
    assert!(metrics.sum("ringcast_inbox_acks_total") >= 2.0);
    assert!(metrics.sum("ringcast_inbox_commits_total") >= 1.0);
    println!("{}", run.stdout);
}

/// Subscribing while the channel is published: every subscription continues at exactly
/// the acked offset + 1 (store, then history or live), over two shards.
#[test]
fn inbox_then_live_has_no_gap_and_no_duplicate_while_publishing() {
    let _deadline = Deadline::new(
        "inbox_then_live_has_no_gap_and_no_duplicate_while_publishing",
        Duration::from_secs(90),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path());
    let run = python::run_script(
        "py_inbox.py",
        &[
            "--ws",
            &server.ws_addr().to_string(),
            "--admin",
            &server.admin_addr().to_string(),
            "--tcp",
            &server.tcp_addr().to_string(),
            "--secret",
            SECRET,
            "--user",
            "carol",
            "--churn",
            "3000",
        ],
    );
    assert!(
        run.status.success(),
        "{}\n--- server log\n{}",
        run.explain(),
        server.log()
    );
    let summary = run.summary();
    assert!(summary["sessions"].as_u64().unwrap_or(0) >= 5, "{summary}");
    println!("{summary}");
}

/// Regression: after a restart, an inbox subscribe while a burst on another channel kept
/// its shard's ring follower far behind attached at history's estimate (0 after a
/// restart): the client got a gap notice over every unacked message, and acking the next
/// live one removed them all unread. Now such a subscribe waits for the follower (the
/// waits are counted, which shows the burst did what it must) or is refused with 503.
#[test]
fn an_inbox_subscribe_behind_a_burst_gets_every_unacked_message() {
    let _deadline = Deadline::new(
        "an_inbox_subscribe_behind_a_burst_gets_every_unacked_message",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = start(dir.path());
    assert_eq!(
        publish_acked(&server, "user:erin", 50),
        (1..=50).collect::<Vec<_>>()
    );
    server.sigterm();
    assert!(server.wait_exit(Duration::from_secs(40)).is_some());
    let server = start(dir.path());
    // Subscribers of the burst channel give each shard's follower work per message.
    let _burst_subscribers: Vec<_> = (0..64).map(|_| server.raw_ws(&["burst"])).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let (stop, addr) = (stop.clone(), server.tcp_addr());
            std::thread::spawn(move || {
                let mut tcp = std::net::TcpStream::connect(addr).expect("TCP ingest");
                let batch: Vec<u8> = (0..4000)
                    .flat_map(|i| format!("burst {{\"n\":{i}}}\n").into_bytes())
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    if tcp.write_all(&batch).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    let run = python::run_script(
        "py_inbox.py",
        &[
            "--ws",
            &server.ws_addr().to_string(),
            "--admin",
            &server.admin_addr().to_string(),
            "--secret",
            SECRET,
            "--user",
            "erin",
            "--expect",
            "50",
            "--resubscribes",
            "40",
        ],
    );
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        let _ = f.join();
    }
    assert!(
        run.status.success(),
        "{}\n--- server log\n{}",
        run.explain(),
        server.log()
    );
    let waits = server.metrics().sum("ringcast_inbox_subscribe_waits_total");
    println!("{} subscribe waits: {waits}", run.stdout.trim());
    assert!(
        waits > 0.0,
        "no subscribe ever found its follower behind: the burst did not reproduce the case"
    );
}

#[test]
fn an_unusable_inbox_path_stops_startup_with_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A regular file where the data directory should be.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").expect("writing a file");
    let out = Command::new(Server::binary())
        .args([
            "--inbox",
            "true",
            "--data-dir",
            blocker.to_str().expect("utf-8"),
            "--listen",
            &format!("127.0.0.1:{}", free_tcp_port()),
            "--admin",
            &format!("127.0.0.1:{}", free_tcp_port()),
            "--udp-ingest",
            "off",
            "--tcp-ingest",
            "off",
        ])
        .output()
        .expect("running ringcast");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("inbox: creating directory") && stderr.contains("blocker"),
        "{stderr}"
    );
    assert!(stderr.contains("inbox = false"), "{stderr}");
}
