//! Against the baseline-tokio server: every delivery is counted exactly, connections
//! spread over worker processes, and a reconnect storm recovers.

mod common;

use common::{assert_exact, num, run_ok, start_baseline};

#[test]
fn fanout_counts_every_delivery_exactly() {
    let (_server, ws, udp) = start_baseline();
    let url = format!("ws://127.0.0.1:{ws}/");
    let publish = format!("udp://127.0.0.1:{udp}");
    let r = run_ok(&[
        "fanout",
        "--url",
        &url,
        "-n",
        "200",
        "--publish",
        &publish,
        "--messages",
        "100",
        "--msg-rate",
        "0",
        "--timeout",
        "60",
    ]);
    assert_exact(&r, "delivery", 200, 100);
    assert_eq!(num(&r, &["connections", "connected"]), 200);
    assert_eq!(num(&r, &["connections", "failed"]), 0);
    assert_eq!(
        r["problems"].as_array().map(Vec::len),
        Some(0),
        "{:#}",
        r["problems"]
    );
    assert!(r["completed"].as_bool().unwrap_or(false));
}

#[test]
fn connect_spreads_over_worker_processes_and_samples_the_server() {
    let (server, ws, _udp) = start_baseline();
    let url = format!("ws://127.0.0.1:{ws}/any/path");
    let pid = server.pid().to_string();
    let r = run_ok(&[
        "connect",
        "--url",
        &url,
        "-n",
        "400",
        "--workers",
        "2",
        "--rate",
        "2000",
        "--hold",
        "0.5",
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_eq!(num(&r, &["connections", "connected"]), 400);
    assert_eq!(num(&r, &["connections", "workers"]), 2);
    assert_eq!(num(&r, &["connections", "handshake_us", "count"]), 400);
    assert_eq!(num(&r, &["server", "pid"]), u64::from(server.pid()));
    assert!(num(&r, &["server", "rss_connected_bytes"]) > 0);
}

#[test]
fn storm_drop_brings_everyone_back() {
    let (_server, ws, udp) = start_baseline();
    let url = format!("ws://127.0.0.1:{ws}/");
    let publish = format!("udp://127.0.0.1:{udp}");
    let r = run_ok(&[
        "storm",
        "--url",
        &url,
        "-n",
        "300",
        "--publish",
        &publish,
        "--hold",
        "0.5",
        "--msg-rate",
        "50",
        "--after",
        "0.5",
        "--restart-wait",
        "20",
        "--timeout",
        "60",
    ]);
    assert_eq!(r["storm"]["all_back"], true, "{:#}", r["storm"]);
    assert!(r["storm"]["time_to_all_back_ms"].is_number());
    assert_eq!(num(&r, &["storm", "reconnect_us", "count"]), 300);
    assert_eq!(num(&r, &["connections", "handshakes"]), 600);
    assert_eq!(num(&r, &["delivery", "duplicates"]), 0);
}
