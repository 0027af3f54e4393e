//! One channel, fed at once from UDP, TCP (two connections) and HTTP (two publishers):
//! every subscriber still sees offsets 1, 2, 3, … with no gap, duplicate or reordering,
//! and each published message exactly once under the offset the server assigned it.
//!
//! Taking an offset and claiming a fan-out slot are two steps; this is the test that
//! catches two producers interleaving them.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::Duration;

use crate::common::server::wait_for_messages_in;
use crate::common::*;
use serde_json::{json, Value};

const CHANNEL: &str = "race:1";
const UDP_MESSAGES: u64 = 1000;
const TCP_CONNECTIONS: u64 = 2;
const TCP_MESSAGES_EACH: u64 = 1000;
const HTTP_PUBLISHERS: u64 = 2;
const HTTP_MESSAGES_EACH: u64 = 250;
const TOTAL: u64 =
    UDP_MESSAGES + TCP_CONNECTIONS * TCP_MESSAGES_EACH + HTTP_PUBLISHERS * HTTP_MESSAGES_EACH;
const RUST_SUBSCRIBERS: usize = 30;
const FLEET_SUBSCRIBERS: usize = 20;

fn payload(via: &str, n: u64) -> Vec<u8> {
    json!({ "via": via, "n": n }).to_string().into_bytes()
}

#[test]
fn offsets_stay_ordered_across_ingest_paths() {
    let _deadline = Deadline::new(
        "offsets_stay_ordered_across_ingest_paths",
        Duration::from_secs(120),
    );
    let server = Server::start(&[]);
    let url = server.ws_url(&[CHANNEL]);

    let mut node = ExternalFleet::spawn(
        ClientKind::Node,
        &url,
        FLEET_SUBSCRIBERS,
        TOTAL as usize,
        Duration::from_secs(60),
    );
    let mut python = ExternalFleet::spawn(
        ClientKind::Python,
        &url,
        FLEET_SUBSCRIBERS,
        TOTAL as usize,
        Duration::from_secs(60),
    );
    let readers: Vec<_> = (0..RUST_SUBSCRIBERS)
        .map(|_| server.subscribe(&[CHANNEL]))
        .map(|mut sub| thread::spawn(move || sub.collect(TOTAL as usize, Duration::from_secs(60))))
        .collect();
    node.wait_ready(Duration::from_secs(30));
    python.wait_ready(Duration::from_secs(30));
    server.wait_for_connections(
        RUST_SUBSCRIBERS + 2 * FLEET_SUBSCRIBERS,
        Duration::from_secs(20),
    );

    // Offsets the HTTP API handed out, by (publisher, n).
    let http_offsets: BTreeMap<(u64, u64), u64> = thread::scope(|s| {
        let server = &server;
        s.spawn(move || {
            for n in 1..=UDP_MESSAGES {
                server.udp_publish(CHANNEL, &payload("udp", n));
                thread::sleep(Duration::from_millis(1));
            }
        });
        for c in 0..TCP_CONNECTIONS {
            s.spawn(move || {
                let mut tcp = server.tcp_ingest();
                for n in 1..=TCP_MESSAGES_EACH {
                    tcp.publish(CHANNEL, &payload(&format!("tcp{c}"), n));
                }
                assert_eq!(
                    tcp.read_line(Duration::from_millis(100)),
                    None,
                    "TCP ingest answered a well-formed line"
                );
            });
        }
        let http: Vec<_> = (0..HTTP_PUBLISHERS)
            .map(|p| {
                s.spawn(move || {
                    (1..=HTTP_MESSAGES_EACH)
                        .map(|n| {
                            let r = server
                                .http_publish(Some(CHANNEL), &payload(&format!("http{p}"), n));
                            assert_eq!(r.status, 200, "HTTP publish: {}", r.text());
                            let offset = r.json()["offset"]
                                .as_u64()
                                .unwrap_or_else(|| panic!("no offset in {}", r.text()));
                            ((p, n), offset)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        http.into_iter()
            .flat_map(|h| h.join().expect("HTTP publisher thread"))
            .collect()
    });
    wait_for_messages_in(&server, TOTAL as usize, Duration::from_secs(15));

    let distinct: BTreeSet<u64> = http_offsets.values().copied().collect();
    assert_eq!(
        distinct.len(),
        http_offsets.len(),
        "the HTTP API handed out one offset twice"
    );

    let mut published: BTreeSet<(String, u64)> =
        (1..=UDP_MESSAGES).map(|n| ("udp".to_string(), n)).collect();
    for c in 0..TCP_CONNECTIONS {
        published.extend((1..=TCP_MESSAGES_EACH).map(|n| (format!("tcp{c}"), n)));
    }
    for p in 0..HTTP_PUBLISHERS {
        published.extend((1..=HTTP_MESSAGES_EACH).map(|n| (format!("http{p}"), n)));
    }

    let mut reference: Option<Vec<(u64, Value)>> = None;
    for (i, reader) in readers.into_iter().enumerate() {
        let who = format!("Rust subscriber {i}");
        let got = reader
            .join()
            .unwrap_or_else(|_| panic!("{who} failed (see its panic above)"));
        let mut log = OffsetLog::default();
        log.observe_all(&got);
        log.assert_exactly(&who, CHANNEL, 1, TOTAL);

        let seen: Vec<(String, u64)> = got
            .iter()
            .map(|d| {
                let via = d.data["via"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{who}: odd payload {}", d.raw));
                (via.to_string(), d.data["n"].as_u64().unwrap_or(0))
            })
            .collect();
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{who}: a message arrived twice");
        assert_eq!(
            unique, published,
            "{who}: the messages received differ from those published"
        );

        for d in &got {
            if let Some(p) = d.data["via"].as_str().and_then(|v| v.strip_prefix("http")) {
                let key = (
                    p.parse::<u64>().unwrap_or(u64::MAX),
                    d.data["n"].as_u64().unwrap_or(0),
                );
                assert_eq!(
                    http_offsets.get(&key),
                    Some(&d.offset),
                    "{who}: {} arrived under a different offset than POST /publish answered",
                    d.raw
                );
            }
        }

        let order: Vec<(u64, Value)> = got.iter().map(|d| (d.offset, d.data.clone())).collect();
        match &reference {
            None => reference = Some(order),
            Some(first) => assert!(
                *first == order,
                "{who} saw a different message under some offset than subscriber 0"
            ),
        }
    }

    for fleet in [node, python] {
        fleet
            .finish(Duration::from_secs(60))
            .assert_every_subscriber_got(&[(CHANNEL, 1, TOTAL)]);
    }
}
