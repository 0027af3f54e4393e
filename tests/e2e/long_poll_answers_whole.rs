//! Long-poll answers end to end with curl: an answer carries a `Content-Length` equal to
//! its body, a poll held for live messages answers with what the round that woke it
//! brought and never loses or repeats a message across polls chained by `position`, and
//! the timeout answer comes shortly after the timeout (bounded generously: the test
//! asserts only "before timeout + 3 s").

use std::process::Output;
use std::time::Duration;

use crate::common::curl::{curl, curl_spawn};
use crate::common::*;
use serde_json::Value;

/// One poll answer from curl's `-i` output followed by `\n<time_total>`: the head, the
/// parsed body and the seconds curl took.
fn answer(out: &Output) -> (String, Value, f64) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head: {text:?}"));
    let (body, time) = rest
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no time: {text:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("no Content-Length: {head}"))
        .trim()
        .parse()
        .expect("Content-Length");
    assert_eq!(length, body.len(), "Content-Length vs body: {head}\n{body}");
    let doc = serde_json::from_str(body).unwrap_or_else(|e| panic!("bad answer {body:?}: {e}"));
    (
        head.to_string(),
        doc,
        time.trim().parse().expect("time_total"),
    )
}

fn poll_args(url: &str) -> Vec<String> {
    ["-i", "--max-time", "70", "-w", "\n%{time_total}", url]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn poll(url: &str) -> (String, Value, f64) {
    let args = poll_args(url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    answer(&curl(&args))
}

#[test]
fn poll_answers_carry_their_length_all_messages_and_come_at_the_timeout() {
    let _deadline = Deadline::new(
        "poll_answers_carry_their_length_all_messages_and_come_at_the_timeout",
        Duration::from_secs(120),
    );
    let server = Server::start(&[]);
    let base = format!("http://{}/poll?channels=lp&timeout=20", server.ws_addr());
    let (head, first, _) = poll(&base);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert_eq!(first["events"][0]["reply"], "subscribe", "{first}");
    let mut position = first["position"].as_str().expect("position").to_string();

    // Held polls chained by position, while messages are published in bursts: every
    // message arrives exactly once, in order, whichever answer carries it.
    const TOTAL: u64 = 40;
    let mut seen = Vec::new();
    let mut published = 0;
    let mut most_in_one = 0;
    while seen.len() < TOTAL as usize {
        let url = format!("{base}&since={position}");
        let args = poll_args(&url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let held = curl_spawn(&args);
        // Published only once every earlier message was seen: this poll is then held
        // (with messages still to replay it would answer at once).
        if published < TOTAL && seen.len() as u64 == published {
            server.wait_for_connections(1, Duration::from_secs(10));
            for _ in 0..10 {
                published += 1;
                let body = format!("{{\"n\":{published}}}");
                let resp = server.http_publish(Some("lp"), body.as_bytes());
                assert_eq!(resp.status, 200, "{resp:?}");
            }
        }
        let out = held.wait_with_output().expect("curl");
        let (_, doc, _) = answer(&out);
        let events = doc["events"].as_array().expect("events").clone();
        assert!(
            !events.is_empty(),
            "a held poll answered empty before its timeout: {doc}"
        );
        most_in_one = most_in_one.max(events.len());
        for event in events {
            seen.push(
                event["data"]["n"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{event}")),
            );
        }
        position = doc["position"].as_str().expect("position").to_string();
    }
    assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>());
    assert!(position.starts_with(&format!("lp~{TOTAL}~")), "{position}");
    eprintln!("most messages in one answer: {most_in_one}");

    // Nothing new: the empty answer comes at the timeout, not seconds after it.
    let url = format!(
        "http://{}/poll?channels=lp&timeout=1&since={position}",
        server.ws_addr()
    );
    let (_, empty, took) = poll(&url);
    assert_eq!(empty["events"], serde_json::json!([]), "{empty}");
    assert_eq!(empty["position"], position.as_str(), "{empty}");
    eprintln!("a 1 s poll answered after {took:.3} s");
    assert!(took < 4.0, "a 1 s poll took {took} s");
}
