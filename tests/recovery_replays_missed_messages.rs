//! Recovery under continuous publishing, checked by an independent client: Python
//! subscribers (the `websockets` package, tests/clients/py_recover.py) keep dropping
//! their connection and coming back with `subscribe` + `since` while a TCP publisher
//! writes 20,000 messages to one channel. Over two shards, each subscriber must end with
//! every offset after its first position exactly once, in order, every reconnect
//! answered `recovered: true`; unknown epochs and offsets ahead of the channel answer
//! `recovered: false` with the documented reason.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn recovery_replays_missed_messages_under_publishing() {
    let _deadline = Deadline::new(
        "recovery_replays_missed_messages_under_publishing",
        Duration::from_secs(120),
    );
    let server = Server::start(&[
        "--history-size",
        "100000",
        "--max-recovery-messages",
        "100000",
    ]);
    let ws = format!("ws://{}/ws", server.ws_addr());
    let tcp = server.tcp_addr().to_string();
    let summary = python::run_script(
        "py_recover.py",
        &[
            "--ws",
            &ws,
            "--tcp",
            &tcp,
            "--channel",
            "rec:1",
            "--messages",
            "20000",
            "--rate",
            "10000",
            "--subscribers",
            "4",
            "--timeout",
            "90",
        ],
    )
    .summary();
    assert!(
        summary["reconnects"].as_u64().unwrap_or(0) >= 8,
        "too few reconnects to mean anything: {summary}"
    );
    let metrics = server.metrics();
    assert!(metrics.sum_where("ringcast_recoveries_total", &[("result", "recovered")]) >= 8.0);
    assert!(metrics.sum("ringcast_history_replayed_total") > 0.0);
    println!("{summary}");
}
