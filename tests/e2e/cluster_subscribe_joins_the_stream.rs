//! A subscribe on a cluster node that does not follow the channel yet is answered once
//! the node follows it (docs/cluster.md, "Recovery on any node"): a client that moves to
//! a node that never had a subscriber of the channel recovers its missed messages from
//! the stream, and subscribers that join while publishes flow get every offset after
//! their reply's, once, in order. A channel's cluster epoch exists before its first
//! publish (the join stores an epoch marker), so subscribers of a never-published channel
//! on any node hold positions that recover everywhere. An SSE subscriber on a node that
//! never followed the channel gets the stream's offsets as event ids; so does a long poll
//! (its position token) and a WebSocket that names the channel and a `since` on its
//! upgrade URL. Real nats-server, real binaries.

use crate::common::admin::http_publish_offset;
use crate::common::nats::{start_recovering_node, ws_subscribe, Cluster, NatsServer};
use crate::common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn node(dir: &Path, name: &str, nats_url: &str) -> Server {
    start_recovering_node(dir, name, nats_url, 1000, 5, &[])
}

/// Nodes A and B on one nats-server, both joined; the test bounded by `limit_secs`.
fn two_nodes(test: &'static str, limit_secs: u64) -> Cluster {
    Cluster::start(
        test,
        Duration::from_secs(limit_secs),
        NatsServer::start,
        &["a", "b"],
        node,
    )
    .wait_up()
}

/// Nodes A and B (see [`two_nodes`]) with offsets 1 to 3 (`{"n": i}`) published on A,
/// and the channel's epoch as a subscriber on A sees it after them.
fn three_published_on_a(test: &'static str, channel: &str) -> (Cluster, String) {
    let c = two_nodes(test, 120);
    let a = &c.nodes[0];
    for i in 1..=3 {
        assert_eq!(
            http_publish_offset(a, channel, &json!({"n": i}).to_string()),
            i
        );
    }
    let (mut sub, reply) = ws_subscribe(a, &json!({"cmd":"subscribe","channel":channel,"id":1}));
    assert_eq!(reply["offset"], 3, "{reply}");
    sub.close();
    let epoch = reply["epoch"].as_str().expect("epoch").to_string();
    (c, epoch)
}

/// `node` joined a channel (read it from the stream, at least `fetched` messages) and
/// never fell back to its local state.
fn assert_joined(c: &Cluster, node: &Server, fetched: f64) {
    let m = node.metrics();
    assert!(
        m.sum("ringcast_cluster_joins_total") >= 1.0,
        "{}",
        c.metrics()
    );
    assert!(
        m.sum("ringcast_cluster_join_fetched_total") >= fetched,
        "{}",
        c.metrics()
    );
    assert_eq!(
        m.sum("ringcast_cluster_join_fallbacks_total"),
        0.0,
        "{}",
        c.metrics()
    );
}

#[test]
fn a_moved_client_recovers_on_a_node_that_never_followed_the_channel() {
    const CHANNEL: &str = "news:moved";
    let c = two_nodes(
        "a_moved_client_recovers_on_a_node_that_never_followed_the_channel",
        120,
    );
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    assert_eq!(
        http_publish_offset(a, CHANNEL, &json!({"n": 1}).to_string()),
        1
    );
    // The client reads messages on A up to offset 10, notes its position, goes away.
    let (mut client, reply) = ws_subscribe(a, &json!({"cmd":"subscribe","channel":CHANNEL,"id":1}));
    assert_eq!(reply["offset"], 1, "{reply}");
    for i in 2..=10 {
        assert_eq!(
            http_publish_offset(a, CHANNEL, &json!({"n": i}).to_string()),
            i
        );
    }
    let got = client.collect(9, Duration::from_secs(10));
    let at = got.last().expect("ten messages").offset;
    assert_eq!(at, 10);
    let epoch = reply["epoch"].as_str().expect("epoch").to_string();
    client.close();
    // 15 more while it is away; B never had a subscriber of the channel.
    for i in 11..=25 {
        assert_eq!(
            http_publish_offset(a, CHANNEL, &json!({"n": i}).to_string()),
            i
        );
    }
    let (mut moved, reply) = ws_subscribe(
        b,
        &json!({"cmd":"subscribe","channel":CHANNEL,"id":2,"since":{"offset":at,"epoch":epoch}}),
    );
    assert_eq!(reply["recovered"], true, "{reply}\n{}", c.metrics());
    assert_eq!(reply["epoch"].as_str(), Some(epoch.as_str()), "{reply}");
    // Replayed up to the reply's offset; the rest (if the shard had not read them from
    // the ring yet) follow live: either way 11..=25, once each, in order.
    let position = reply["offset"].as_u64().expect("offset");
    assert!((at..=25).contains(&position), "{reply}");
    let replayed = moved.collect(15, Duration::from_secs(10));
    assert_eq!(
        replayed.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (11..=25).collect::<Vec<_>>()
    );
    assert_eq!(
        replayed
            .iter()
            .map(|d| d.data["n"].as_u64().expect("n"))
            .collect::<Vec<_>>(),
        (11..=25).collect::<Vec<_>>()
    );
    // Then live, from both nodes: the next offsets, nothing repeated.
    for i in 26..=30 {
        let node = if i % 2 == 0 { a } else { b };
        assert_eq!(
            http_publish_offset(node, CHANNEL, &json!({"n": i}).to_string()),
            i
        );
    }
    let live = moved.collect(5, Duration::from_secs(10));
    assert_eq!(
        live.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (26..=30).collect::<Vec<_>>()
    );
    let m = b.metrics();
    assert!(
        m.sum("ringcast_cluster_joins_total") >= 1.0,
        "{}",
        c.metrics()
    );
    assert!(
        m.sum("ringcast_cluster_join_fetched_total") >= 15.0,
        "{}",
        c.metrics()
    );
    assert_eq!(m.sum("ringcast_cluster_join_fallbacks_total"), 0.0);
}

#[test]
fn subscribers_joining_while_publishes_flow_get_every_offset_after_their_reply() {
    const CHANNELS: usize = 6;
    const PER_CHANNEL: u64 = 200;
    let c = two_nodes(
        "subscribers_joining_while_publishes_flow_get_every_offset_after_their_reply",
        180,
    );
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let channels: Vec<String> = (0..CHANNELS).map(|i| format!("news:flow{i}")).collect();
    // A publishes to every channel in turn, through its TCP ingest (acked: each line is
    // stored in the stream before the next).
    let publisher = {
        let channels = channels.clone();
        let addr = a.tcp_addr();
        std::thread::spawn(move || {
            let mut tcp = TcpIngest::connect(addr);
            tcp.send_raw(b"ACK ON\n");
            for n in 1..=PER_CHANNEL {
                for ch in &channels {
                    tcp.publish(ch, format!("{{\"n\":{n}}}").as_bytes());
                    let line = tcp
                        .read_line(Duration::from_secs(10))
                        .expect("an answer to every acked publish within 10 s");
                    assert!(line.starts_with("OK"), "publish to {ch}: {line}");
                }
            }
        })
    };
    // Wait until publishing is under way, then join B's channels one by one as it goes.
    a.wait_for_metric(
        "ringcast_cluster_published_total",
        "publishes are flowing",
        Duration::from_secs(20),
        |v| v >= 60.0,
    );
    let mut subs = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        let (sub, reply) = ws_subscribe(b, &json!({"cmd":"subscribe","channel":ch,"id":i}));
        let from = reply["offset"].as_u64().expect("offset");
        subs.push((ch.clone(), sub, from));
        std::thread::sleep(Duration::from_millis(50));
    }
    publisher.join().expect("the publisher thread");
    for (ch, mut sub, from) in subs {
        let expect: Vec<u64> = (from + 1..=PER_CHANNEL).collect();
        let got = sub.collect(expect.len(), Duration::from_secs(30));
        let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
        assert_eq!(
            offsets,
            expect,
            "{ch}: subscribed at {from}\n{}",
            c.metrics()
        );
        let ns: Vec<u64> = got
            .iter()
            .map(|d| d.data["n"].as_u64().expect("n"))
            .collect();
        assert_eq!(ns, expect, "{ch}: payloads");
        // Nothing after the last one: the next publish is the next offset.
        assert_eq!(
            http_publish_offset(a, &ch, &json!({"n": PER_CHANNEL + 1}).to_string()),
            PER_CHANNEL + 1
        );
        let next = sub
            .next_delivery(Duration::from_secs(10))
            .expect("the last publish arrives");
        assert_eq!(next.offset, PER_CHANNEL + 1, "{ch}: {}", next.raw);
    }
    let m = b.metrics();
    assert!(
        m.sum("ringcast_cluster_joins_total") >= CHANNELS as f64,
        "{}",
        c.metrics()
    );
}

#[test]
fn subscribers_before_the_first_publish_share_the_channels_cluster_epoch() {
    const CHANNEL: &str = "news:unpublished";
    let c = two_nodes(
        "subscribers_before_the_first_publish_share_the_channels_cluster_epoch",
        120,
    );
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // Nothing was ever published to the channel: both joins find its subject empty.
    let (mut on_a, reply_a) = ws_subscribe(a, &json!({"cmd":"subscribe","channel":CHANNEL,"id":1}));
    let (mut on_b, reply_b) = ws_subscribe(b, &json!({"cmd":"subscribe","channel":CHANNEL,"id":2}));
    assert_eq!(reply_a["offset"], 0, "{reply_a}");
    assert_eq!(reply_b["offset"], 0, "{reply_b}");
    let epoch = reply_a["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(
        reply_b["epoch"].as_str(),
        Some(epoch.as_str()),
        "one cluster epoch on both nodes: {reply_a} / {reply_b}\n{}",
        c.metrics()
    );

    // The first publishes start at offset 1 in that epoch and reach both subscribers.
    for i in 1..=5 {
        assert_eq!(
            http_publish_offset(a, CHANNEL, &json!({"n": i}).to_string()),
            i
        );
    }
    for (name, sub) in [("A", &mut on_a), ("B", &mut on_b)] {
        let got = sub.collect(5, Duration::from_secs(10));
        assert_eq!(
            got.iter().map(|d| d.offset).collect::<Vec<_>>(),
            (1..=5).collect::<Vec<_>>(),
            "on {name}\n{}",
            c.metrics()
        );
        assert_eq!(
            got.iter()
                .map(|d| d.data["n"].as_u64().expect("n"))
                .collect::<Vec<_>>(),
            (1..=5).collect::<Vec<_>>(),
            "on {name}: payloads"
        );
    }
    on_a.close();
    on_b.close();

    // The position taken before the first publish recovers on either node.
    for (i, (name, server)) in [("A", a), ("B", b)].into_iter().enumerate() {
        let (mut back, reply) = ws_subscribe(
            server,
            &json!({"cmd":"subscribe","channel":CHANNEL,"id":10 + i,
                    "since":{"offset":0,"epoch":epoch}}),
        );
        assert_eq!(
            reply["recovered"],
            true,
            "on {name}: {reply}\n{}",
            c.metrics()
        );
        assert_eq!(reply["epoch"].as_str(), Some(epoch.as_str()), "{reply}");
        let got = back.collect(5, Duration::from_secs(10));
        assert_eq!(
            got.iter().map(|d| d.offset).collect::<Vec<_>>(),
            (1..=5).collect::<Vec<_>>(),
            "on {name}: replayed"
        );
        back.close();
    }
    for n in [a, b] {
        let m = n.metrics();
        assert_eq!(
            m.sum("ringcast_cluster_join_fallbacks_total"),
            0.0,
            "{}",
            c.metrics()
        );
        // The marker is no message: neither received nor skipped as a gap.
        assert_eq!(m.sum("ringcast_cluster_gap_offsets_total"), 0.0);
    }
}

/// An SSE stream read with a plain HTTP/1.1 client: its events' `id:` and parsed `data:`.
struct Sse {
    stream: TcpStream,
    buffer: String,
}

impl Sse {
    fn open(server: &Server, query: &str) -> Sse {
        let addr = server.ws_addr();
        let mut stream = TcpStream::connect(addr).expect("connect to the WebSocket port");
        write!(
            stream,
            "GET /sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("send the SSE request");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        Sse {
            stream,
            buffer: String::new(),
        }
    }

    /// The next `n` events that carry data, as (id, data); panics after `timeout`.
    fn events(&mut self, n: usize, timeout: Duration) -> Vec<(Option<String>, Value)> {
        let end = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            while let Some(at) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..at + 2).collect();
                let id = event
                    .lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .map(str::to_string);
                let data = event.lines().find_map(|l| l.strip_prefix("data: "));
                if let Some(d) = data {
                    let v: Value = serde_json::from_str(d)
                        .unwrap_or_else(|e| panic!("bad SSE data {d:?}: {e}"));
                    out.push((id, v));
                    if out.len() == n {
                        return out;
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "{n} SSE events not received within {timeout:?}; got {out:?}, pending {:?}",
                self.buffer
            );
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "the SSE stream ended; got {out:?}, pending {:?}",
                    self.buffer
                ),
                Ok(k) => {
                    self.buffer.push_str(&String::from_utf8_lossy(&chunk[..k]));
                    // The response head ends with a blank line too: drop it once.
                    if let Some(rest) = self.buffer.strip_prefix("HTTP/1.1 ") {
                        if let Some(at) = rest.find("\r\n\r\n") {
                            let head = &rest[..at];
                            assert!(head.starts_with("200"), "SSE answer: {head}");
                            self.buffer = rest[at + 4..].to_string();
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the SSE stream: {e}"),
            }
        }
    }
}

#[test]
fn an_sse_subscriber_on_a_node_that_never_followed_the_channel_gets_the_streams_offsets() {
    const CHANNEL: &str = "news:sse";
    let (c, epoch) = three_published_on_a(
        "an_sse_subscriber_on_a_node_that_never_followed_the_channel_gets_the_streams_offsets",
        CHANNEL,
    );
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // B never had a subscriber of the channel: an SSE client resumes there from offset 1.
    let mut sse = Sse::open(b, &format!("channels={CHANNEL}&since={CHANNEL}~1~{epoch}"));
    let events = sse.events(3, Duration::from_secs(10));
    let (id, reply) = &events[0];
    assert_eq!(reply["reply"], "subscribe", "{reply}");
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}\n{}", c.metrics());
    assert_eq!(reply["epoch"].as_str(), Some(epoch.as_str()), "{reply}");
    assert_eq!(id.as_deref(), Some(format!("{CHANNEL}~1~{epoch}").as_str()));
    for (k, (id, data)) in events[1..].iter().enumerate() {
        let offset = k as u64 + 2;
        assert_eq!(data["offset"], offset, "{data}");
        assert_eq!(data["data"]["n"], offset, "{data}");
        assert_eq!(
            id.as_deref(),
            Some(format!("{CHANNEL}~{offset}~{epoch}").as_str())
        );
    }
    // Live from both nodes: the stream's next offsets.
    assert_eq!(
        http_publish_offset(a, CHANNEL, &json!({"n": 4}).to_string()),
        4
    );
    assert_eq!(
        http_publish_offset(b, CHANNEL, &json!({"n": 5}).to_string()),
        5
    );
    let live = sse.events(2, Duration::from_secs(10));
    for (k, (id, data)) in live.iter().enumerate() {
        let offset = k as u64 + 4;
        assert_eq!(data["offset"], offset, "{data}");
        assert_eq!(
            id.as_deref(),
            Some(format!("{CHANNEL}~{offset}~{epoch}").as_str())
        );
    }
    assert_joined(&c, b, 2.0);
}

/// `GET /poll?query` on `server`'s WebSocket port, read whole (the server closes after
/// the answer); its JSON. Bounded by 40 s (the polls here ask for `timeout=30`).
fn poll(server: &Server, query: &str) -> Value {
    let addr = server.ws_addr();
    let mut stream = TcpStream::connect(addr).expect("connect to the WebSocket port");
    write!(
        stream,
        "GET /poll?{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the poll request");
    let r = http::read_response(&mut stream, Instant::now() + Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("GET /poll?{query}: no whole answer within 40 s: {e}"));
    assert_eq!(r.status, 200, "GET /poll?{query}: {}", r.text());
    r.json()
}

/// A poll answer's events, each a message of `channel` (no reply, no notice): their
/// offsets, checking each payload's `n` is its offset.
fn polled_offsets(answer: &Value, channel: &str) -> Vec<u64> {
    answer["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events in {answer}"))
        .iter()
        .map(|e| {
            assert_eq!(e["channel"], channel, "a message of the channel: {answer}");
            let offset = e["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("a message, with an offset: {answer}"));
            assert_eq!(e["data"]["n"], offset, "{answer}");
            offset
        })
        .collect()
}

#[test]
fn a_long_poll_on_a_node_that_never_followed_the_channel_gets_the_streams_offsets() {
    const CHANNEL: &str = "news:poll";
    let (c, epoch) = three_published_on_a(
        "a_long_poll_on_a_node_that_never_followed_the_channel_gets_the_streams_offsets",
        CHANNEL,
    );
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // B never had a subscriber of the channel: a poll from offset 1 gets 2 and 3 at
    // once (a recovered entry gives no reply event) and the position after them.
    let answer = poll(
        b,
        &format!("channels={CHANNEL}&since={CHANNEL}~1~{epoch}&timeout=30"),
    );
    assert_eq!(
        polled_offsets(&answer, CHANNEL),
        [2, 3],
        "{answer}\n{}",
        c.metrics()
    );
    assert_eq!(
        answer["position"].as_str(),
        Some(format!("{CHANNEL}~3~{epoch}").as_str()),
        "{answer}"
    );

    // Published on B, then polled from that position: offset 4.
    assert_eq!(
        http_publish_offset(b, CHANNEL, &json!({"n": 4}).to_string()),
        4
    );
    let position = format!("{CHANNEL}~3~{epoch}");
    let answer = poll(
        b,
        &format!("channels={CHANNEL}&since={position}&timeout=30"),
    );
    assert_eq!(polled_offsets(&answer, CHANNEL), [4], "{answer}");
    assert_eq!(
        answer["position"].as_str(),
        Some(format!("{CHANNEL}~4~{epoch}").as_str()),
        "{answer}"
    );

    // A poll from there is held until the next message, published on A: offset 5
    // (whether the poll was already held when it arrived, or recovers it).
    let answer = std::thread::scope(|scope| {
        let held = scope.spawn(|| {
            poll(
                b,
                &format!("channels={CHANNEL}&since={CHANNEL}~4~{epoch}&timeout=30"),
            )
        });
        assert_eq!(
            http_publish_offset(a, CHANNEL, &json!({"n": 5}).to_string()),
            5
        );
        held.join().expect("the poll thread")
    });
    assert_eq!(polled_offsets(&answer, CHANNEL), [5], "{answer}");
    assert_eq!(
        answer["position"].as_str(),
        Some(format!("{CHANNEL}~5~{epoch}").as_str()),
        "{answer}"
    );
    assert_joined(&c, b, 2.0);
}

/// The next frame that is not a ping: a reply or a message, in arrival order.
fn next_frame(sub: &mut Subscriber, what: &str) -> subscriber::Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sub.next_event(deadline.saturating_duration_since(Instant::now())) {
            subscriber::Event::Ping => {}
            subscriber::Event::TimedOut => panic!("{what}: nothing within 10 s"),
            subscriber::Event::Closed(frame) => panic!("{what}: the server closed: {frame:?}"),
            event => return event,
        }
    }
}

#[test]
fn an_upgrade_url_subscribe_on_a_node_that_never_followed_the_channel_gets_the_streams_offsets() {
    const CHANNEL: &str = "news:upgrade";
    let (c, epoch) = three_published_on_a("an_upgrade_url_subscribe_on_a_node_that_never_followed_the_channel_gets_the_streams_offsets", CHANNEL);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // B never had a subscriber of the channel: the upgrade names it with a position at
    // offset 1. The reply comes first, then 2 and 3, then live messages.
    let mut sub = Subscriber::connect(&format!(
        "ws://{}/ws?channels={CHANNEL}&since={CHANNEL}~1~{epoch}",
        b.ws_addr()
    ));
    let reply = match next_frame(&mut sub, "the subscribe reply") {
        subscriber::Event::Reply(reply) => reply,
        other => panic!("the subscribe reply comes first, got {other:?}"),
    };
    assert_eq!(reply["reply"], "subscribe", "{reply}");
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["channel"], CHANNEL, "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}\n{}", c.metrics());
    assert_eq!(reply["epoch"].as_str(), Some(epoch.as_str()), "{reply}");
    // Replayed up to the reply's offset; the rest (if the shard had not read them from
    // the ring yet) follow live: either way 2 and 3 come next, once each, in order.
    let position = reply["offset"].as_u64().expect("offset in the reply");
    assert!((1..=3).contains(&position), "{reply}");
    // Live from both nodes after the replay: the stream's next offsets.
    for i in 4..=6 {
        let node = if i == 5 { b } else { a };
        assert_eq!(
            http_publish_offset(node, CHANNEL, &json!({"n": i}).to_string()),
            i
        );
    }
    let mut got = Vec::new();
    for k in 2..=6u64 {
        match next_frame(&mut sub, &format!("offset {k}")) {
            subscriber::Event::Delivery(d) => {
                assert_eq!(d.channel, CHANNEL, "{}", d.raw);
                assert_eq!(d.data["n"], d.offset, "{}", d.raw);
                got.push(d.offset);
            }
            other => panic!("a message after {got:?}, got {other:?}"),
        }
    }
    assert_eq!(got, (2..=6).collect::<Vec<_>>(), "{}", c.metrics());
    // Nothing repeated after them: the next publish is the next message.
    assert_eq!(
        http_publish_offset(b, CHANNEL, &json!({"n": 7}).to_string()),
        7
    );
    let next = sub
        .next_delivery(Duration::from_secs(10))
        .expect("offset 7 arrives");
    assert_eq!(next.offset, 7, "{}", next.raw);
    assert_joined(&c, b, 2.0);
}
