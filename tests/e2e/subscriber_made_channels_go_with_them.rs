//! Channel state that only subscribers made goes when they leave (docs/operations.md,
//! `ringcast_channels`), and a channel with retained history keeps it.
//!
//! Regression: every subscribe of a never-used name created channel state that lived for
//! `channel_idle_timeout` (1 h): 2,000 connections that each subscribed 64 fresh names
//! and left left 128,000 channels and +45 MiB behind, and a loop of that grew without
//! bound. Here 200 connections × 64 fresh names, three rounds: after each round the
//! channel count returns to the one published channel, and the server's RSS after the
//! third round is where it was after the first (a leak would add ~4 MiB a round).

use crate::common::*;
use serde_json::json;
use std::time::Duration;

const CONNECTIONS: usize = 200;
const NAMES: usize = 64;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn channels_made_by_subscribers_go_when_they_leave() {
    let _deadline = Deadline::new(
        "channels_made_by_subscribers_go_when_they_leave",
        Duration::from_secs(180),
    );
    let server = Server::start(&[]);
    // Published once: kept (with its history) after its subscribers leave.
    let r = server.http_publish(Some("kept"), b"{\"n\":1}");
    assert_eq!(r.status, 200, "{}", r.text());

    let mut rss = Vec::new();
    for round in 0..3 {
        let mut subs = Vec::new();
        for c in 0..CONNECTIONS {
            let mut sub = Subscriber::connect(&format!("ws://{}/ws", server.ws_addr()));
            for n in 0..NAMES {
                let channel = if c == 0 && n == 0 {
                    "kept".to_string()
                } else {
                    format!("fresh:{round}:{c}:{n}")
                };
                let reply = sub.request(
                    &json!({"cmd":"subscribe","channel":channel,"id":n}),
                    Duration::from_secs(10),
                );
                assert_eq!(reply["code"], 200, "{reply}");
            }
            subs.push(sub);
        }
        let held = server.metrics().sum("ringcast_channels");
        assert_eq!(
            held,
            (CONNECTIONS * NAMES) as f64,
            "round {round}: one per name"
        );
        for mut sub in subs {
            sub.close();
        }
        server.wait_for_connections(0, Duration::from_secs(20));
        server.wait_for_metric(
            "ringcast_channels",
            "the subscribers' channels are forgotten, the published one kept",
            Duration::from_secs(30),
            |v| v == 1.0,
        );
        rss.push(rss_kib(server.pid()));
    }
    let m = server.metrics();
    assert_eq!(
        m.sum("ringcast_history_messages"),
        1.0,
        "the kept channel's history"
    );
    assert!(
        rss[2] <= rss[0] + 2048,
        "RSS after each round (KiB): {rss:?}: the rounds' channels were not freed"
    );
}

/// `max_channels` holds for publishes too: a publish to a channel the server would have to
/// create past the cap is refused on every path with the reason, and counted; channels
/// that exist go on.
#[test]
fn publishes_to_new_channels_stop_at_max_channels() {
    let _deadline = Deadline::new(
        "publishes_to_new_channels_stop_at_max_channels",
        Duration::from_secs(60),
    );
    let server = Server::start(&["--max-channels", "2"]);
    for channel in ["a", "b"] {
        let r = server.http_publish(Some(channel), b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let full = "too many channels on this server (max_channels = 2)";
    let r = server.http_publish(Some("c"), b"{}");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains(full), "{}", r.text());
    let mut tcp = server.tcp_ingest();
    tcp.send_raw(b"ACK ON\nc {}\na {}\n");
    let first = tcp.read_line(Duration::from_secs(5));
    assert!(
        first
            .as_deref()
            .is_some_and(|l| l.starts_with("ERR ") && l.contains(full)),
        "{first:?}"
    );
    assert_eq!(
        tcp.read_line(Duration::from_secs(5)).as_deref(),
        Some("OK 2")
    );
    server.udp_publish("d", b"{}");
    let mut sub = Subscriber::connect(&format!("ws://{}/ws", server.ws_addr()));
    let reply = sub.request(
        &json!({"cmd":"subscribe","channel":"e","id":1}),
        Duration::from_secs(5),
    );
    assert_eq!(reply["code"], 503, "{reply}");
    server.wait_for_metric(
        "ringcast_channels_refused_total",
        "HTTP, TCP, UDP and the subscribe are counted",
        Duration::from_secs(10),
        |v| v == 4.0,
    );
    assert_eq!(server.metrics().sum("ringcast_channels"), 2.0);
}
