//! Subscribers that fall behind during a burst are caught up from channel history, not
//! dropped: Python `websockets` clients (tests/clients/py_burst.py) read a burst of
//! 20,000 messages of 1 KiB published over TCP as fast as it goes, over two shards. With
//! enough history every subscriber, including one that stops reading for 1.5 s, gets every
//! offset once, in order. With a short history the one that paused gets `gap` notices for
//! exactly what it can no longer have, and still every other offset in order.
//! (Before catch-up, the burst got healthy subscribers skipped and then closed with 1013
//! together with the one that paused.)

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn run_burst(server: &Server, extra: &[&str]) -> Value {
    let ws = format!("ws://{}/ws?channels=burst", server.ws_addr());
    let tcp = server.tcp_addr().to_string();
    let mut args = vec![
        "--ws",
        &ws,
        "--tcp",
        &tcp,
        "--channel",
        "burst",
        "--messages",
        "20000",
        "--size",
        "1024",
    ];
    args.extend_from_slice(extra);
    let summary = python::run_script("py_burst.py", &args).summary();
    println!("{summary}");
    summary
}

#[test]
fn with_enough_history_nobody_misses_a_message() {
    let _deadline = Deadline::new(
        "with_enough_history_nobody_misses_a_message",
        Duration::from_secs(150),
    );
    let server = Server::start(&["--history-size", "20000"]);
    run_burst(
        &server,
        &[
            "--healthy",
            "3",
            "--pausing",
            "1",
            "--pause",
            "1.5",
            "--no-gaps",
        ],
    );
    let metrics = server.metrics();
    assert!(
        metrics.sum("ringcast_caught_up_total") > 0.0,
        "the paused subscriber never lagged: the test proved nothing\n{}",
        metrics.describe("ringcast_lagged_total")
    );
    assert_eq!(
        metrics.sum_where(
            "ringcast_connections_closed_total",
            &[("reason", "slow_consumer")]
        ),
        0.0
    );
}

#[test]
fn past_the_history_a_lagging_subscriber_gets_gap_notices() {
    let _deadline = Deadline::new(
        "past_the_history_a_lagging_subscriber_gets_gap_notices",
        Duration::from_secs(150),
    );
    // A loss limit it cannot reach here: this test is about the notices (a unit test
    // covers the 1013 past the limit).
    let server = Server::start(&[
        "--history-size",
        "500",
        "--slow-consumer-drop-limit",
        "1000000",
    ]);
    let summary = run_burst(
        &server,
        &["--healthy", "1", "--pausing", "1", "--pause", "2"],
    );
    let paused = &summary["subscribers"][1];
    assert!(
        paused["gap_offsets"].as_u64().unwrap_or(0) > 0,
        "the paused subscriber got no gap notice: {summary}"
    );
    // Both, the healthy one too: every offset once, as a message or inside a notice
    // (py_burst.py fails on anything out of order).
    for (i, sub) in summary["subscribers"]
        .as_array()
        .expect("subscribers")
        .iter()
        .enumerate()
    {
        let accounted =
            sub["messages"].as_u64().unwrap_or(0) + sub["gap_offsets"].as_u64().unwrap_or(0);
        assert_eq!(accounted, 20_000, "subscriber {i}: {summary}");
    }
    assert!(summary["ok"].as_bool().unwrap_or(false), "{summary}");
    let dropped = server
        .metrics()
        .sum_where("ringcast_dropped_total", &[("reason", "slow_consumer")]);
    assert!(dropped > 0.0, "gaps are counted as slow-consumer drops");
}
