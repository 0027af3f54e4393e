//! Every scenario against a real ringcast server (two shards) at small scale.
//!
//! The binary comes from `RINGCAST_BIN`, else `target/release/ringcast`, else
//! `target/debug/ringcast`; without one these tests fail (they are never skipped).
//! ringcast adds per-channel offsets, so besides the publisher's `seq` every delivery is
//! also checked for offsets growing by exactly one.

mod common;

use common::{assert_exact, metric_sum, num, run_ok, start_ringcast, Ringcast};

fn url(rc: &Ringcast) -> String {
    format!("ws://127.0.0.1:{}/ws?channels=bench", rc.ws)
}

fn fanout_over(publish: &str, rc: &Ringcast, rate: &str) {
    let (url, pid) = (url(rc), rc.proc.pid().to_string());
    let r = run_ok(&[
        "fanout",
        "--url",
        &url,
        "-n",
        "200",
        "--publish",
        publish,
        "--messages",
        "100",
        "--msg-rate",
        rate,
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_exact(&r, "delivery", 200, 100);
    assert_eq!(
        num(&r, &["delivery", "offset_skipped"]),
        0,
        "no backpressure skips expected"
    );
    assert_eq!(
        r["problems"].as_array().map(Vec::len),
        Some(0),
        "{:#}",
        r["problems"]
    );
    assert!(
        r["server"]["deliveries_per_cpu_sec"].is_number()
            || r["server"]["cpu_delivery_secs"] == 0.0
    );
}

#[test]
fn connect_holds_every_connection() {
    let rc = start_ringcast(&[]);
    let (url, pid) = (url(&rc), rc.proc.pid().to_string());
    let r = run_ok(&[
        "connect",
        "--url",
        &url,
        "-n",
        "300",
        "--hold",
        "1",
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_eq!(num(&r, &["connections", "connected"]), 300);
    assert_eq!(num(&r, &["connections", "open_at_end"]), 300);
    assert_eq!(
        num(&r, &["connections", "failed"]),
        0,
        "{:#}",
        r["connections"]["failures"]
    );
    assert_eq!(
        r["connections"]["close_codes"].as_object().map(|m| m.len()),
        Some(0)
    );
    assert!(r["server"]["rss_per_connection_bytes"].is_number());
}

#[test]
fn fanout_over_udp_is_exact() {
    let rc = start_ringcast(&[]);
    fanout_over(&format!("udp://127.0.0.1:{}", rc.udp), &rc, "2000");
}

#[test]
fn fanout_over_tcp_is_exact() {
    let rc = start_ringcast(&[]);
    fanout_over(&format!("tcp://127.0.0.1:{}", rc.tcp), &rc, "0");
}

#[test]
fn fanout_over_http_is_exact() {
    let rc = start_ringcast(&[]);
    fanout_over(
        &format!("http://127.0.0.1:{}/publish", rc.admin),
        &rc,
        "1000",
    );
}

/// The SSE transport: the same exact accounting (every message once, in order, offsets
/// by one) over `GET /sse`, and `connect` holding SSE streams.
#[test]
fn fanout_over_sse_is_exact() {
    let rc = start_ringcast(&[]);
    let (url, pid) = (url(&rc), rc.proc.pid().to_string());
    let publish = format!("tcp://127.0.0.1:{}", rc.tcp);
    let r = run_ok(&[
        "fanout",
        "--url",
        &url,
        "--transport",
        "sse",
        "-n",
        "200",
        "--publish",
        &publish,
        "--messages",
        "100",
        "--msg-rate",
        "0",
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_exact(&r, "delivery", 200, 100);
    assert_eq!(num(&r, &["delivery", "offset_skipped"]), 0);
    assert_eq!(
        r["problems"].as_array().map(Vec::len),
        Some(0),
        "{:#}",
        r["problems"]
    );
    let r = run_ok(&[
        "connect",
        "--url",
        &url,
        "--transport",
        "sse",
        "-n",
        "100",
        "--hold",
        "1",
        "--timeout",
        "60",
    ]);
    assert_eq!(num(&r, &["connections", "connected"]), 100);
    assert_eq!(num(&r, &["connections", "open_at_end"]), 100);
}

#[test]
fn latency_collects_every_sample() {
    let rc = start_ringcast(&[]);
    let (url, publish) = (url(&rc), format!("tcp://127.0.0.1:{}", rc.tcp));
    let r = run_ok(&[
        "latency",
        "--url",
        &url,
        "-n",
        "50",
        "--publish",
        &publish,
        "--msg-rate",
        "200",
        "--duration",
        "2",
        "--timeout",
        "60",
    ]);
    assert_exact(&r, "delivery", 50, 400);
    assert!(r["delivery"]["latency_us"]["p99"]
        .as_f64()
        .is_some_and(|p| p > 0.0));
}

#[test]
fn storm_of_client_drops_recovers() {
    let rc = start_ringcast(&[]);
    let (url, publish) = (url(&rc), format!("tcp://127.0.0.1:{}", rc.tcp));
    let r = run_ok(&[
        "storm",
        "--url",
        &url,
        "-n",
        "300",
        "--publish",
        &publish,
        "--mode",
        "drop",
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
    assert_eq!(num(&r, &["storm", "reconnect_us", "count"]), 300);
    assert_eq!(num(&r, &["connections", "open_at_end"]), 300);
    assert_eq!(num(&r, &["delivery", "duplicates"]), 0);
    assert_eq!(num(&r, &["delivery", "offset_regressions"]), 0);
}

#[test]
fn slow_subscribers_do_not_hurt_healthy_ones() {
    // A backlog small enough that slow consumers hit backpressure within the 4 MB
    // published, and large enough (128 ms of this stream) that a healthy reader sharing
    // a 2-vCPU CI machine with the server is never mistaken for a slow one: at 64 KiB
    // (32 ms) healthy readers were skipped now and then, with any server build.
    let rc = start_ringcast(&[
        "--max-backlog-bytes",
        "262144",
        "--slow-consumer-drop-limit",
        "200",
    ]);
    let (url, publish) = (url(&rc), format!("tcp://127.0.0.1:{}", rc.tcp));
    let r = run_ok(&[
        "slow",
        "--url",
        &url,
        "-n",
        "20",
        "--publish",
        &publish,
        "--slow-fraction",
        "0.5",
        "--messages",
        "4000",
        "--msg-rate",
        "2000",
        "--size",
        "1024",
        "--timeout",
        "90",
    ]);
    let healthy = &r["delivery"];
    assert_eq!(num(healthy, &["subscribers"]), 10);
    assert_eq!(
        num(healthy, &["lost"]),
        0,
        "healthy subscribers lost messages: {healthy:#}"
    );
    assert_eq!(num(healthy, &["duplicates"]), 0);
    assert_eq!(num(healthy, &["offset_skipped"]), 0);
    assert_eq!(healthy["close_codes"].as_object().map(|m| m.len()), Some(0));
    let slow = &r["slow"];
    assert_eq!(num(slow, &["subscribers"]), 10);
    assert_eq!(num(slow, &["duplicates"]), 0);
    assert_eq!(num(slow, &["offset_regressions"]), 0);
    // ringcast made the slow ones lag (caught up from history), skipped messages for
    // them, or closed them with 1013; it never closed them any other way.
    let closes = slow["close_codes"].as_object().cloned().unwrap_or_default();
    assert!(
        closes.keys().all(|code| code == "1013"),
        "unexpected close codes for slow subscribers: {closes:?}"
    );
    let caught_up = metric_sum(rc.admin, "ringcast_caught_up_total");
    assert!(
        caught_up > 0.0
            || num(slow, &["lost"]) + num(slow, &["offset_skipped"]) > 0
            || !closes.is_empty(),
        "the slow subscribers never fell behind (no catch-up, no loss, no close): the \
         scenario did not exercise backpressure: {slow:#}"
    );
    println!(
        "slow subscribers: lost {} skipped {} closes {closes:?}",
        slow["lost"], slow["offset_skipped"]
    );
}

#[test]
fn recovery_storm_delivers_every_message_exactly_once() {
    let rc = start_ringcast(&[]);
    let url = format!("ws://127.0.0.1:{}/ws", rc.ws);
    let (publish, pid) = (
        format!("tcp://127.0.0.1:{}", rc.tcp),
        rc.proc.pid().to_string(),
    );
    // Reconnecting at 200/s spreads the comeback over a second, so most subscribers miss
    // messages and must be replayed some. `--within` is wide: time is reported, not tested.
    let r = run_ok(&[
        "recover",
        "--url",
        &url,
        "-n",
        "200",
        "--channels",
        "10",
        "--msg-rate",
        "200",
        "--publish",
        &publish,
        "--hold",
        "1",
        "--reconnect-rate",
        "200",
        "--after",
        "1",
        "--within",
        "60",
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_eq!(
        r["problems"].as_array().map(Vec::len),
        Some(0),
        "{:#}",
        r["problems"]
    );
    let rec = &r["recover"];
    assert_eq!(num(rec, &["subscribed"]), 200, "{rec:#}");
    assert_eq!(num(rec, &["resubscribed"]), 200, "{rec:#}");
    assert_eq!(num(rec, &["recovered"]), 200, "{rec:#}");
    assert_eq!(num(rec, &["not_recovered"]), 0, "{rec:#}");
    assert_eq!(rec["all_recovered"], true, "{rec:#}");
    assert_eq!(num(rec, &["time_to_recovered_us", "count"]), 200);
    assert!(rec["time_to_all_recovered_ms"].is_number(), "{rec:#}");
    assert_eq!(num(rec, &["subscribers_with_problems"]), 0, "{rec:#}");
    assert_eq!(num(rec, &["gap_notices"]), 0);
    assert!(num(rec, &["replayed"]) > 0, "nothing was replayed: {rec:#}");
    let d = &r["delivery"];
    // 20 subscribers per channel, so each published message is due 20 times.
    let published = num(&r, &["publishing", "messages"]);
    assert_eq!(num(d, &["expected"]), 20 * published, "{d:#}");
    assert_eq!(num(d, &["received"]), num(d, &["expected"]), "{d:#}");
    for field in ["lost", "duplicates", "out_of_order", "gap_events"] {
        assert_eq!(num(d, &[field]), 0, "{field}: {d:#}");
    }
    assert_eq!(
        num(rec, &["replayed"]) + num(rec, &["live"]),
        num(d, &["received"])
    );
    assert!(r["server"]["cpu_delivery_secs"].is_number());
}
