//! `/metrics` passes `promtool check metrics` (the Prometheus project's own linter: HELP
//! and TYPE per family, `_total` on counters, base units, no duplicates) with no lint
//! output, after traffic has moved every kind of metric: subscribers, publishes over
//! UDP, TCP and HTTP, a bad upgrade (400), a refused one (503, `max_connections`), and a
//! slow consumer that lags behind.
//!
//! It also checks the two latency histograms are there and counting: the delivery
//! latency's `_count` grows with published messages and the handshake duration's with
//! upgrades, with cumulative buckets ending in `+Inf` = `_count`.
//!
//! `promtool` comes from Debian's `prometheus` package (scripts/test.sh installs it); a
//! missing `promtool` fails the test.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use socket2::{Domain, Socket, Type};

const CHANNEL: &str = "news";
const SUBSCRIBERS: usize = 3;
const MESSAGES: usize = 20;

/// The raw `/metrics` page.
fn scrape(server: &Server) -> String {
    match server.admin_get("/metrics") {
        Ok(r) if r.status == 200 => r.text(),
        Ok(r) => panic!("GET /metrics answered {}: {}", r.status, r.text()),
        Err(e) => panic!("GET /metrics failed: {e}\n{}", server.describe()),
    }
}

/// Runs `promtool check metrics` on `page`; returns its exit success and all it printed.
fn promtool_check(page: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's prometheus package \
                 (scripts/test.sh does)"
            )
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(page.as_bytes())
        .expect("writing the page to promtool");
    // promtool reads a small page and exits; the test's Deadline bounds a hang.
    let out = child.wait_with_output().expect("waiting for promtool");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// An upgrade attempt's HTTP status (the socket is dropped afterwards).
fn upgrade_status(server: &Server, request_target: &str) -> u16 {
    let addr = server.ws_addr();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let request = format!(
        "GET {request_target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending an upgrade to {addr}: {e}"));
    let (head, _) = http::read_head(&mut stream, Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no answer to the upgrade of {request_target}: {e}"));
    head.status
}

/// A WebSocket with the smallest receive buffer the kernel allows, which never reads.
fn slow_consumer(server: &Server) -> RawWs {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .connect_timeout(&server.ws_addr().into(), Duration::from_secs(5))
        .expect("connecting the slow consumer");
    RawWs::upgrade(TcpStream::from(socket), &format!("/ws?channels={CHANNEL}"))
}

/// `name`'s buckets are cumulative (never decreasing), end in `+Inf` equal to `_count`;
/// returns `_count`.
fn histogram_count(m: &Metrics, name: &str) -> f64 {
    let bucket = format!("{name}_bucket");
    let buckets: Vec<_> = m.series(&bucket).collect();
    assert!(
        buckets.len() >= 10,
        "{name}: expected its buckets, got {buckets:?}"
    );
    let mut last = 0.0;
    for b in &buckets {
        assert!(
            b.value >= last,
            "{name}: buckets not cumulative at le={:?}",
            b.label("le")
        );
        last = b.value;
    }
    let inf = buckets.last().expect("a bucket");
    assert_eq!(inf.label("le"), Some("+Inf"), "{name}: last bucket");
    let count = m.sum(&format!("{name}_count"));
    assert_eq!(inf.value, count, "{name}: +Inf bucket and _count differ");
    assert!(m.has(&format!("{name}_sum")), "{name}: no _sum");
    count
}

#[test]
fn metrics_pass_promtool() {
    let _deadline = Deadline::new("metrics_pass_promtool", Duration::from_secs(120));
    let server = Server::start(&[
        "--shards",
        "2",
        "--max-connections",
        "5",
        "--max-backlog-bytes",
        "65536",
        "--slow-consumer-timeout",
        "2",
    ]);
    // Fresh server: the page must already pass before any traffic.
    let (ok, printed) = promtool_check(&scrape(&server));
    assert!(
        ok && printed.trim().is_empty(),
        "idle page: promtool said:\n{printed}"
    );
    let before = server.metrics();
    let deliveries_before = histogram_count(&before, "ringcast_delivery_latency_seconds");
    let handshakes_before = histogram_count(&before, "ringcast_handshake_duration_seconds");

    let mut subs: Vec<Subscriber> = (0..SUBSCRIBERS)
        .map(|_| server.subscribe(&[CHANNEL]))
        .collect();
    let slow = slow_consumer(&server);
    // A bad request (400) and one more than max_connections allows after the fifth (503).
    assert_eq!(upgrade_status(&server, "/nowhere"), 404);
    let fifth = server.raw_ws(&["other"]);
    server.wait_for_connections(SUBSCRIBERS + 2, Duration::from_secs(10));
    assert_eq!(
        upgrade_status(&server, "/ws?channels=x"),
        503,
        "the sixth upgrade with --max-connections 5"
    );
    drop(fifth);

    let mut tcp = server.tcp_ingest();
    for i in 0..MESSAGES {
        let payload = format!("{{\"n\":{i}}}");
        match i % 3 {
            0 => server.udp_publish(CHANNEL, payload.as_bytes()),
            1 => tcp.publish(CHANNEL, payload.as_bytes()),
            _ => assert_eq!(
                server
                    .http_publish(Some(CHANNEL), payload.as_bytes())
                    .status,
                200
            ),
        }
        // Paced, so UDP datagrams are not lost to a full socket buffer.
        std::thread::sleep(Duration::from_millis(5));
    }
    for (n, sub) in subs.iter_mut().enumerate() {
        let got = sub.collect(MESSAGES, Duration::from_secs(10));
        assert_eq!(
            got.len(),
            MESSAGES,
            "subscriber {n} got {} messages",
            got.len()
        );
    }

    // The slow consumer: big messages until it lags (or is dropped) or the cap is hit.
    let big = vec![b'x'; 16 * 1024];
    let lag_seen = |m: &Metrics| {
        m.sum("ringcast_lagged_total") > 0.0
            || m.sum_where(
                "ringcast_connections_closed_total",
                &[("reason", "slow_consumer")],
            ) > 0.0
    };
    let mut published = 0;
    while published < 3000 && !lag_seen(&server.metrics()) {
        for _ in 0..50 {
            tcp.publish(CHANNEL, &big);
        }
        published += 50;
    }
    assert!(
        lag_seen(&server.metrics()),
        "the slow consumer never lagged after {published} messages of 16 KiB"
    );
    drop(slow);

    let page = scrape(&server);
    let (ok, printed) = promtool_check(&page);
    assert!(
        ok && printed.trim().is_empty(),
        "promtool check metrics failed or linted after traffic:\n{printed}\n--- page ---\n{page}"
    );

    let after = Metrics::parse(&page);
    let deliveries = histogram_count(&after, "ringcast_delivery_latency_seconds");
    let handshakes = histogram_count(&after, "ringcast_handshake_duration_seconds");
    assert!(
        deliveries >= deliveries_before + MESSAGES as f64,
        "delivery latency _count went from {deliveries_before} to {deliveries} over {MESSAGES}+ messages"
    );
    // Three subscribers, the slow consumer and the fifth: five completed upgrades.
    assert!(
        handshakes >= handshakes_before + 5.0,
        "handshake duration _count went from {handshakes_before} to {handshakes} over 5 upgrades"
    );
    assert!(
        after.sum_where(
            "ringcast_connections_refused_total",
            &[("reason", "max_connections")]
        ) >= 1.0
    );
    for family in [
        "ringcast_shard_connections",
        "ringcast_shard_send_backlog_bytes",
        "ringcast_ring_lag",
    ] {
        let shards = after.by_label(family, "shard");
        assert_eq!(
            shards.keys().map(String::as_str).collect::<Vec<_>>(),
            ["0", "1"],
            "{family} by shard"
        );
    }
    assert!(after.sum("process_resident_memory_bytes") > 0.0);
    assert!(after.sum("process_max_fds") > 0.0);

    // Every family is documented where operators look it up.
    let docs = std::fs::read_to_string(OPERATIONS).expect("reading docs/operations.md");
    let undocumented: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|name| {
            !docs.contains(&format!("`{name}`")) && !docs.contains(&format!("`{name}{{"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "families missing from docs/operations.md: {undocumented:?}"
    );
}

const OPERATIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
