//! Every subscriber receives every published message exactly once, in order.
//!
//! 300 subscribers (100 Node `ws`, 100 Python `websockets`, 100 Rust tungstenite),
//! spread by SO_REUSEPORT over both shards, subscribe to three channels; each channel is
//! fed by one ingest path (UDP, TCP, HTTP). Every subscriber must see offsets 1..=20 on
//! each channel, once each and strictly +1, and every Rust subscriber must receive the
//! very same frame bytes for a given message (encode once, send many).

use std::thread;
use std::time::Duration;

use crate::common::server::wait_for_messages_in;
use crate::common::*;
use serde_json::json;

const PER_FLEET: usize = 100;
const PER_PATH: u64 = 20;
const UDP_CHANNEL: &str = "fan.udp";
const TCP_CHANNEL: &str = "fan:tcp";
const HTTP_CHANNEL: &str = "fan/http";
const CHANNELS: [&str; 3] = [UDP_CHANNEL, TCP_CHANNEL, HTTP_CHANNEL];

fn payload(via: &str, n: u64) -> Vec<u8> {
    json!({ "via": via, "n": n }).to_string().into_bytes()
}

#[test]
fn fanout_reaches_every_subscriber() {
    let _deadline = Deadline::new("fanout_reaches_every_subscriber", Duration::from_secs(150));
    let server = Server::start(&[]);
    let url = server.ws_url(&CHANNELS);
    let per_subscriber = (PER_PATH * 3) as usize;

    let mut node = ExternalFleet::spawn(
        ClientKind::Node,
        &url,
        PER_FLEET,
        per_subscriber,
        Duration::from_secs(60),
    );
    let mut python = ExternalFleet::spawn(
        ClientKind::Python,
        &url,
        PER_FLEET,
        per_subscriber,
        Duration::from_secs(60),
    );
    let rust: Vec<Subscriber> = (0..PER_FLEET)
        .map(|_| server.subscribe(&CHANNELS))
        .collect();
    node.wait_ready(Duration::from_secs(30));
    python.wait_ready(Duration::from_secs(30));
    server.wait_for_connections(3 * PER_FLEET, Duration::from_secs(20));

    // The contract's gauge may or may not be split per shard; ringcast also exports a
    // per-shard gauge. Either one shows whether SO_REUSEPORT spread the connections.
    let metrics = server.metrics();
    let mut per_shard = metrics.by_label("ringcast_connections", "shard");
    if per_shard.is_empty() {
        per_shard = metrics.by_label("ringcast_shard_connections", "shard");
    }
    if per_shard.is_empty() {
        eprintln!("note: no per-shard connection gauge in /metrics, so the split of the 300 connections over shards is not checked");
    } else {
        assert!(
            per_shard.len() >= 2 && per_shard.values().all(|&n| n > 0.0),
            "300 connections should land on both shards, got {per_shard:?}"
        );
    }

    let readers: Vec<_> = rust
        .into_iter()
        .map(|mut sub| thread::spawn(move || sub.collect(per_subscriber, Duration::from_secs(60))))
        .collect();

    // UDP on loopback drops datagrams only when the receive buffer overflows; a short
    // pause between datagrams keeps this test about ringcast, not the kernel.
    for n in 1..=PER_PATH {
        server.udp_publish(UDP_CHANNEL, &payload("udp", n));
        thread::sleep(Duration::from_millis(5));
    }
    let mut tcp = server.tcp_ingest();
    for n in 1..=PER_PATH {
        tcp.publish(TCP_CHANNEL, &payload("tcp", n));
    }
    for n in 1..=PER_PATH {
        let response = server.http_publish(Some(HTTP_CHANNEL), &payload("http", n));
        assert_eq!(
            response.status,
            200,
            "HTTP publish #{n}: {}",
            response.text()
        );
        assert_eq!(
            response.json(),
            json!({ "channel": HTTP_CHANNEL, "offset": n }),
            "HTTP publish #{n} reply"
        );
    }
    wait_for_messages_in(&server, (PER_PATH * 3) as usize, Duration::from_secs(10));
    assert_eq!(
        tcp.read_line(Duration::from_millis(100)),
        None,
        "the TCP ingest answered a well-formed line"
    );

    let mut reference: Option<Vec<Delivery>> = None;
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader
            .join()
            .unwrap_or_else(|_| panic!("Rust subscriber {i} failed (see its panic above)"));
        let mut log = OffsetLog::default();
        log.observe_all(&got);
        for (channel, via) in [
            (UDP_CHANNEL, "udp"),
            (TCP_CHANNEL, "tcp"),
            (HTTP_CHANNEL, "http"),
        ] {
            log.assert_exactly(&format!("Rust subscriber {i}"), channel, 1, PER_PATH);
            for d in got.iter().filter(|d| d.channel == channel) {
                assert_eq!(
                    d.data,
                    json!({ "via": via, "n": d.offset }),
                    "Rust subscriber {i}: payload of {channel}#{}",
                    d.offset
                );
            }
        }
        match &reference {
            None => reference = Some(got),
            Some(first) => {
                let key = |d: &Delivery| (d.channel.clone(), d.offset);
                let mut a: Vec<_> = first.iter().map(|d| (key(d), d.raw.clone())).collect();
                let mut b: Vec<_> = got.iter().map(|d| (key(d), d.raw.clone())).collect();
                a.sort();
                b.sort();
                assert_eq!(
                    a, b,
                    "Rust subscriber {i} got different frame bytes than subscriber 0"
                );
            }
        }
    }

    let expected = [
        (UDP_CHANNEL, 1, PER_PATH),
        (TCP_CHANNEL, 1, PER_PATH),
        (HTTP_CHANNEL, 1, PER_PATH),
    ];
    node.finish(Duration::from_secs(60))
        .assert_every_subscriber_got(&expected);
    python
        .finish(Duration::from_secs(60))
        .assert_every_subscriber_got(&expected);

    let metrics = server.metrics();
    let deliveries = metrics.sum("ringcast_deliveries_total");
    assert!(
        deliveries >= (3 * PER_FLEET * per_subscriber) as f64,
        "ringcast_deliveries_total is {deliveries}, expected at least {}",
        3 * PER_FLEET * per_subscriber
    );
    assert_eq!(
        metrics.sum("ringcast_messages_in_total"),
        (PER_PATH * 3) as f64,
        "{}",
        metrics.describe("ringcast_messages_in_total")
    );
}
