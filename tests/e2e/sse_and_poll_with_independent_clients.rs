//! SSE and long-poll (docs/protocol.md, "SSE and long-poll") read by clients ringcast did
//! not write: Python's `httpx` (tests/clients/py_httpx.py), the npm `eventsource` package
//! (tests/clients/node_eventsource.js, the EventSource of the WHATWG spec for Node) and
//! curl.
//!
//! - httpx resumes SSE with an explicit Last-Event-ID and with `?since=`, chains long
//!   polls by `position`, gets 400 with a reason for bad parameters and the documented
//!   `recovered:false` reply for unknown positions;
//! - `eventsource` reconnects on its own, with the Last-Event-ID it kept, after the server
//!   ends its stream (an admin disconnect) and across a drained restart (an inbox channel
//!   keeps its offsets and epoch; an ordinary one answers `epoch_changed`): no message lost
//!   or repeated;
//! - curl -N and plain curl do the same basics.
//!
//! A missing httpx, eventsource or curl fails the test with what to install.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::admin::{admin_disconnect, http_publish_acked};
use crate::common::curl::{curl_spawn, curl_text};
use crate::common::inbox::{drain_behind_shut_gate, wait_for_refused_attempt, InboxServer};
use crate::common::*;
use ringcast::proto::position::Position;
use serde_json::Value;

const SECRET: &str = "ringcast-sse-test-secret-0123456789abcdef";

#[test]
fn httpx_resumes_sse_by_header_and_since_and_chains_long_polls() {
    let _deadline = Deadline::new(
        "httpx_resumes_sse_by_header_and_since_and_chains_long_polls",
        Duration::from_secs(240),
    );
    let server = Server::start(&[
        "--history-size",
        "100000",
        "--max-recovery-messages",
        "100000",
        "--ping-interval",
        "2",
    ]);
    let run = python::run_script(
        "py_httpx.py",
        &[
            "transport",
            "--addr",
            &server.ws_addr().to_string(),
            "--tcp",
            &server.tcp_addr().to_string(),
        ],
    );
    let lines = run.assert_cases(
        &["sse_resume_header", "sse_resume_since", "poll_loop"],
        &server.describe(),
    );
    for line in &lines {
        println!("{line}");
    }
    let metrics = server.metrics();
    metrics.assert_at_least("ringcast_recoveries_total", &[("result", "recovered")], 6.0);
}

#[test]
fn httpx_gets_reasons_for_bad_parameters_and_unknown_positions() {
    let _deadline = Deadline::new(
        "httpx_gets_reasons_for_bad_parameters_and_unknown_positions",
        Duration::from_secs(120),
    );
    let server = Server::start(&[
        "--history-size",
        "5",
        "--max-recovery-messages",
        "100",
        "--max-subscriptions-per-connection",
        "8",
        "--ping-interval",
        "2",
    ]);
    let run = python::run_script(
        "py_httpx.py",
        &[
            "positions",
            "--addr",
            &server.ws_addr().to_string(),
            "--admin",
            &server.admin_addr().to_string(),
            "--max-channels",
            "8",
        ],
    );
    run.assert_cases(&["bad_params", "unknown_positions"], &server.describe());
    let metrics = server.metrics();
    // epoch_changed, ahead and too_old, each over SSE and over long-poll.
    metrics.assert_at_least(
        "ringcast_recoveries_total",
        &[("result", "not_recovered")],
        6.0,
    );
}

/// tests/clients/node_eventsource.js running, its JSON lines kept as they come.
struct EventSourceClient {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every line it printed so far, parsed.
    seen: Vec<Value>,
}

impl EventSourceClient {
    /// Starts it on `url`, signing a token for `sub` when given.
    fn start(url: &str, sub: Option<&str>) -> EventSourceClient {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_eventsource.js");
        let mut command = Command::new("node");
        command
            .arg(&script)
            .args(["--url", url, "--timeout", "170"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(sub) = sub {
            command.args(["--secret", SECRET, "--sub", sub]);
        }
        server::die_with_parent(&mut command);
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run node {} ({e}); install Node.js and the eventsource package in \
                 tests/clients (scripts/test.sh does)",
                script.display()
            )
        });
        let (lines, stderr) = child_output(&mut child);
        EventSourceClient {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    fn explain(&self) -> String {
        let tail: Vec<String> = self
            .seen
            .iter()
            .rev()
            .take(12)
            .rev()
            .map(Value::to_string)
            .collect();
        format!(
            "{} lines; the last ones:\n{}\n--- stderr\n{}",
            self.seen.len(),
            tail.join("\n"),
            self.stderr.lock().expect("stderr").as_str()
        )
    }

    /// Reads lines until `done` holds over everything seen, or panics after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let value: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
                    if value["event"] == "timeout" {
                        panic!("node_eventsource.js timed out\n{}", self.explain());
                    }
                    self.seen.push(value);
                }
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting until {what}, or the client died\n{}",
                    self.explain()
                ),
            }
        }
    }

    /// The data of every message event, in order.
    fn events(&self) -> Vec<&Value> {
        self.seen
            .iter()
            .filter(|l| l["event"] == "message")
            .map(|l| &l["data"])
            .collect()
    }

    /// Offsets of `channel`'s messages, in order of arrival.
    fn offsets(&self, channel: &str) -> Vec<u64> {
        offsets_in(&self.seen, channel)
    }

    /// Subscribe replies for `channel`, in order.
    fn replies(&self, channel: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|d| d["reply"] == "subscribe" && d["channel"] == channel)
            .cloned()
            .collect()
    }

    /// Close events the server sent.
    fn closes(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|d| d["type"] == "close")
            .cloned()
            .collect()
    }

    /// Closes its stdin (it closes the EventSource and exits 0) and checks it did.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = wait_until(Duration::from_secs(10), "node_eventsource.js exits", || {
            self.child.try_wait().ok().flatten()
        });
        assert!(status.success(), "{status}\n{}", self.explain());
    }
}

fn offsets_in(seen: &[Value], channel: &str) -> Vec<u64> {
    seen.iter()
        .filter(|l| l["event"] == "message" && l["data"]["channel"] == channel)
        .filter(|l| l["data"].get("reply").is_none())
        .filter_map(|l| l["data"]["offset"].as_u64())
        .collect()
}

fn count_replies(seen: &[Value]) -> usize {
    seen.iter()
        .filter(|l| l["event"] == "message" && l["data"]["reply"] == "subscribe")
        .count()
}

#[test]
fn eventsource_reconnects_with_last_event_id_after_the_server_ends_its_stream() {
    let _deadline = Deadline::new(
        "eventsource_reconnects_with_last_event_id_after_the_server_ends_its_stream",
        Duration::from_secs(180),
    );
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--history-size",
        "100000",
        "--max-recovery-messages",
        "100000",
    ]);
    let url = format!("http://{}/sse?channels=feed,side", server.ws_addr());
    let mut es = EventSourceClient::start(&url, Some("es"));
    es.wait_for("both subscribe replies", Duration::from_secs(20), |s| {
        count_replies(s) == 2
    });
    // A publisher that keeps going while the client is away and back.
    const TOTAL: u64 = 1500;
    let tcp = server.tcp_addr();
    let publisher = std::thread::spawn(move || {
        let mut ingest = TcpIngest::connect(tcp);
        for i in 1..=TOTAL {
            ingest.publish("feed", format!("{{\"i\":{i}}}").as_bytes());
            if i % 3 == 0 {
                ingest.publish("side", format!("{{\"i\":{}}}", i / 3).as_bytes());
            }
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        ingest.finish();
    });
    for (round, at) in [200u64, 600, 1000].into_iter().enumerate() {
        es.wait_for(
            &format!("feed offset {at} before disconnect {}", round + 1),
            Duration::from_secs(30),
            |s| offsets_in(s, "feed").last().is_some_and(|&o| o >= at),
        );
        let answer = admin_disconnect(&server, "es");
        assert_eq!(answer["closed"], 1, "{answer}");
        // Its automatic reconnect: both channels answered again.
        es.wait_for(
            &format!("the reconnect after disconnect {}", round + 1),
            Duration::from_secs(30),
            |s| count_replies(s) >= 2 * (round + 2),
        );
    }
    publisher.join().expect("publisher");
    es.wait_for("every message", Duration::from_secs(60), |s| {
        offsets_in(s, "feed").len() as u64 >= TOTAL
            && offsets_in(s, "side").len() as u64 >= TOTAL / 3
    });
    assert_eq!(
        es.offsets("feed"),
        (1..=TOTAL).collect::<Vec<_>>(),
        "feed: every offset once, in order"
    );
    assert_eq!(
        es.offsets("side"),
        (1..=TOTAL / 3).collect::<Vec<_>>(),
        "side: every offset once, in order"
    );
    for channel in ["feed", "side"] {
        let replies = es.replies(channel);
        assert_eq!(replies.len(), 4, "{replies:?}");
        assert!(replies[0].get("recovered").is_none(), "{replies:?}");
        for r in &replies[1..] {
            assert_eq!(r["recovered"], true, "a reconnect resumes: {r}");
        }
    }
    let closes = es.closes();
    assert_eq!(closes.len(), 3, "{closes:?}");
    for close in &closes {
        assert_eq!(
            *close,
            serde_json::json!({"type":"close","code":4403,"reason":"disconnected by an administrator"})
        );
    }
    // Every message event's id (compact: two channels) names both channels, its own at
    // its offset.
    let channels = ["feed".to_string(), "side".to_string()];
    for line in es.seen.iter().filter(|l| l["event"] == "message") {
        let (data, id) = (&line["data"], line["id"].as_str().unwrap_or(""));
        if let (Some(channel), Some(offset)) = (data["channel"].as_str(), data["offset"].as_u64()) {
            if data.get("reply").is_none() {
                let position = Position::parse_for(id, &channels)
                    .unwrap_or_else(|e| panic!("id {id} for {data}: {e}"));
                assert_eq!(
                    position.get(channel).map(|at| at.offset),
                    Some(offset),
                    "id {id} for {data}"
                );
                assert_eq!(position.entries().len(), 2, "id {id}");
            }
        }
    }
    let metrics = server.metrics();
    assert!(
        metrics.sum_where(
            "ringcast_connections_closed_total",
            &[("reason", "admin_disconnect")]
        ) >= 3.0,
        "{}",
        metrics.describe("ringcast_connections_closed_total")
    );
    es.finish();
}

#[test]
fn eventsource_resumes_across_a_drained_restart() {
    let _deadline = Deadline::new(
        "eventsource_resumes_across_a_drained_restart",
        Duration::from_secs(180),
    );
    let inbox = InboxServer::new(SECRET);
    let mut server = inbox.start();
    let ports = server.ports();
    // The client reaches the server through a gate: it may come back only once the
    // messages of the restarted server are published (no timing).
    let gate = TcpGate::start(server.ws_addr());
    let url = format!(
        "http://127.0.0.1:{}/sse?channels=user:alice,feed",
        gate.port
    );
    let mut es = EventSourceClient::start(&url, Some("alice"));
    es.wait_for("both subscribe replies", Duration::from_secs(20), |s| {
        count_replies(s) == 2
    });
    let publish_inbox = |server: &Server, range: std::ops::RangeInclusive<u64>| {
        for n in range {
            let offset = http_publish_acked(server, "user:alice", &format!("{{\"n\":{n}}}"));
            assert_eq!(offset, n, "inbox offsets continue across the restart");
        }
    };
    publish_inbox(&server, 1..=5);
    for n in 1..=3 {
        let r = server.http_publish(Some("feed"), format!("{{\"n\":{n}}}").as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    es.wait_for("the first messages", Duration::from_secs(20), |s| {
        offsets_in(s, "user:alice").len() == 5 && offsets_in(s, "feed").len() == 3
    });

    drain_behind_shut_gate(&mut server, &gate);
    es.wait_for("the drain's close event", Duration::from_secs(10), |s| {
        s.iter().any(|l| l["data"]["type"] == "close")
    });
    let server = inbox.restart_on(ports);
    publish_inbox(&server, 6..=10);
    wait_for_refused_attempt(&gate);
    gate.open();
    es.wait_for("the reconnect's replies", Duration::from_secs(30), |s| {
        count_replies(s) >= 4
    });
    es.wait_for(
        "the messages published while away",
        Duration::from_secs(20),
        |s| offsets_in(s, "user:alice").len() >= 10,
    );
    publish_inbox(&server, 11..=15);
    for n in 1..=2 {
        let r = server.http_publish(Some("feed"), format!("{{\"n\":{n}}}").as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    es.wait_for("the live messages", Duration::from_secs(20), |s| {
        offsets_in(s, "user:alice").len() >= 15 && offsets_in(s, "feed").len() >= 5
    });

    assert_eq!(
        es.offsets("user:alice"),
        (1..=15).collect::<Vec<_>>(),
        "inbox: every message once, in order, across the restart\n{}",
        es.explain()
    );
    // The feed's history died with the process: the new epoch starts again at 1.
    assert_eq!(es.offsets("feed"), [1, 2, 3, 1, 2], "{}", es.explain());
    let closes = es.closes();
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0]["code"], 1001, "{closes:?}");
    assert!(
        closes[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("reconnect after ")),
        "{closes:?}"
    );
    let inbox = es.replies("user:alice");
    assert_eq!(inbox.len(), 2, "{inbox:?}");
    assert_eq!(inbox[0]["epoch"], inbox[1]["epoch"], "{inbox:?}");
    // Last-Event-ID named offset 5: only 6..10 are unacked after it (1..5 were not
    // acknowledged either, and a reconnect without the id would get them again).
    assert_eq!(inbox[1]["inbox"]["unacked"], 5, "{inbox:?}");
    assert_eq!(inbox[1]["offset"], 10, "{inbox:?}");
    let feed = es.replies("feed");
    assert_eq!(feed.len(), 2, "{feed:?}");
    assert_eq!(feed[1]["recovered"], false, "{feed:?}");
    assert_eq!(feed[1]["reason"], "epoch_changed", "{feed:?}");
    assert_eq!(feed[1]["offset"], 0, "{feed:?}");
    assert_ne!(feed[0]["epoch"], feed[1]["epoch"], "{feed:?}");
    es.finish();
}

/// `(id, data)` of every event of an SSE stream's text.
fn sse_events(stream: &str) -> Vec<(Option<String>, Value)> {
    stream
        .split("\n\n")
        .filter_map(|event| {
            let id = event
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .map(str::to_string);
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            let data =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("bad data {data:?}: {e}"));
            Some((id, data))
        })
        .collect()
}

#[test]
fn curl_streams_resumes_and_chains_polls() {
    let _deadline = Deadline::new(
        "curl_streams_resumes_and_chains_polls",
        Duration::from_secs(90),
    );
    let server = Server::start(&["--ping-interval", "1"]);
    let base = format!("http://{}", server.ws_addr());
    for i in 1..=4 {
        for channel in ["ca", "cb"] {
            let r = server.http_publish(Some(channel), format!("{{\"i\":{i}}}").as_bytes());
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    // Live from here: only the replies, then heartbeats, until --max-time ends it.
    let out = curl_text(&[
        "-N",
        "--max-time",
        "2",
        &format!("{base}/sse?channels=ca,cb"),
    ]);
    assert!(out.starts_with("retry: "), "{out}");
    let events = sse_events(&out);
    assert_eq!(events.len(), 2, "{out}");
    // Two channels: the id is the compact token; a poll answer's position is full.
    let id = events[1].0.clone().expect("id");
    assert!(id.starts_with('~'), "{id}");
    let channels = ["ca".to_string(), "cb".to_string()];
    let position = Position::parse_for(&id, &channels)
        .unwrap_or_else(|e| panic!("id {id}: {e}"))
        .encode();
    assert!(
        position.starts_with("ca~4~") && position.contains(",cb~4~"),
        "{position}"
    );
    let epochs: Vec<&str> = position
        .split(',')
        .map(|e| e.rsplit('~').next().unwrap_or(""))
        .collect();
    // Resume both channels from offset 2 with Last-Event-ID: 3 and 4 of each, once.
    let from2 = format!("ca~2~{},cb~2~{}", epochs[0], epochs[1]);
    let out = curl_text(&[
        "-N",
        "--max-time",
        "2",
        "-H",
        &format!("Last-Event-ID: {from2}"),
        &format!("{base}/sse?channels=ca,cb"),
    ]);
    let got: Vec<(String, u64)> = sse_events(&out)
        .into_iter()
        .filter(|(_, d)| d.get("reply").is_none())
        .map(|(_, d)| {
            (
                d["channel"].as_str().unwrap_or("").to_string(),
                d["offset"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    // Per channel, in order (the channels may interleave).
    for channel in ["ca", "cb"] {
        let offsets: Vec<u64> = got
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(offsets, [3, 4], "{channel}: {out}");
    }
    assert_eq!(got.len(), 4, "{out}");
    assert_eq!(
        sse_events(&out).last().and_then(|e| e.0.clone()),
        Some(id.clone()),
        "{out}"
    );
    // The same with ?since= (percent-encoded), for clients that cannot set the header.
    let since = from2.replace(',', "%2C").replace('~', "%7E");
    let out2 = curl_text(&[
        "-N",
        "--max-time",
        "2",
        &format!("{base}/sse?channels=ca,cb&since={since}"),
    ]);
    assert_eq!(
        sse_events(&out2),
        sse_events(&out),
        "?since= and Last-Event-ID differ"
    );
    // Long-poll chain: replayed at once, then an empty answer at the timeout with the
    // same position, then a held poll answered by a publish.
    let poll = |query: &str| -> Value {
        let body = curl_text(&["--max-time", "70", &format!("{base}/poll?{query}")]);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("poll {query}: {body:?}: {e}"))
    };
    let replay = poll(&format!("channels=ca,cb&since={since}"));
    assert_eq!(
        replay["events"].as_array().map(Vec::len),
        Some(4),
        "{replay}"
    );
    assert_eq!(replay["position"], position.as_str(), "{replay}");
    let idle = poll(&format!("channels=ca,cb&timeout=1&since={position}"));
    assert_eq!(
        idle,
        serde_json::json!({"events": [], "position": position})
    );
    let url = format!("{base}/poll?channels=ca,cb&timeout=30&since={position}");
    let held = curl_spawn(&["--max-time", "60", &url]);
    server.wait_for_connections(1, Duration::from_secs(10));
    let r = server.http_publish(Some("cb"), b"{\"i\":5}");
    assert_eq!(r.status, 200, "{}", r.text());
    let out = held.wait_with_output().expect("curl");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("held poll JSON");
    assert_eq!(answer["events"][0]["offset"], 5, "{answer}");
    assert_eq!(answer["events"][0]["channel"], "cb", "{answer}");
    assert_eq!(
        answer["position"],
        format!("ca~4~{},cb~5~{}", epochs[0], epochs[1]).as_str(),
        "{answer}"
    );
    // An unknown position and bad parameters.
    let ahead = poll(&format!("channels=ca&since=ca~9~{}", epochs[0]));
    assert_eq!(ahead["events"][0]["recovered"], false, "{ahead}");
    assert_eq!(ahead["events"][0]["reason"], "ahead", "{ahead}");
    for (query, why) in [
        ("sse?channels=ca&since=ca~1", "bad position"),
        ("poll?channels=ca&timeout=99", "timeout must be"),
        ("sse?channels=bad%20name", "invalid channel name"),
    ] {
        let out = curl_text(&["-i", "--max-time", "5", &format!("{base}/{query}")]);
        assert!(out.starts_with("HTTP/1.1 400"), "{query}: {out}");
        assert!(out.contains(why), "{query}: {out}");
    }
}
