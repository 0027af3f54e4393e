//! A long poll is a connection per request. On a channel whose namespace announces joins
//! and leaves, polls read presence events but are not members: other subscribers see no
//! join and leave per poll, and a poll is not answered by its own join (it is held to its
//! timeout like on any other channel).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const NAMESPACES: &str = "[namespaces.room]\npresence = true\njoin_leave = true\n";

/// One long poll with curl (bounded by `--max-time`), its answer parsed.
fn poll(server: &Server, query: &str) -> Value {
    let url = format!("http://{}/poll?{query}", server.ws_addr());
    let mut command = Command::new("curl");
    command
        .args(["-s", "--max-time", "30", &url])
        .stdin(Stdio::null());
    server::die_with_parent(&mut command);
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}); install curl (scripts/test.sh does)"));
    let body = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("poll {query}: {body:?}: {e}"))
}

#[test]
fn long_polls_read_presence_but_do_not_join() {
    let _deadline = Deadline::new(
        "long_polls_read_presence_but_do_not_join",
        Duration::from_secs(90),
    );
    let dir = tempfile::tempdir().expect("creating a scratch directory");
    let config = dir.path().join("ringcast.toml");
    std::fs::write(&config, NAMESPACES).expect("writing the config file");
    let server = Server::start(&[
        "--config",
        config.to_str().expect("utf-8 temp path"),
        "--allow-anonymous",
        "true",
    ]);
    let joins = |server: &Server| {
        let m = server.metrics();
        (
            m.sum_where("ringcast_presence_events_total", &[("type", "join")]),
            m.sum_where("ringcast_presence_events_total", &[("type", "leave")]),
        )
    };

    // A WebSocket member of the channel: one join.
    let _member = server.subscribe(&["room:1"]);
    wait_until(Duration::from_secs(10), "the member's join", || {
        (joins(&server) == (1.0, 0.0)).then_some(())
    });

    // The first poll answers at once with the subscribe reply and a position.
    let first = poll(&server, "channels=room:1&timeout=5");
    let events = first["events"].as_array().expect("events");
    assert!(
        events.iter().any(|e| e["reply"] == "subscribe"),
        "first answer has the subscribe reply: {first}"
    );
    let position = first["position"].as_str().expect("position").to_string();

    // Polls from that position are held to their timeout: nothing of their own answers
    // them, however many there are.
    for _ in 0..3 {
        let next = poll(
            &server,
            &format!("channels=room:1&timeout=1&since={position}"),
        );
        assert_eq!(
            next["events"],
            serde_json::json!([]),
            "held to its timeout: {next}"
        );
    }
    assert_eq!(
        joins(&server),
        (1.0, 0.0),
        "polls made no join or leave:\n{}",
        server.log()
    );

    // Another member's join does answer a held poll: polls read presence events.
    let held = {
        let query = format!("channels=room:1&timeout=20&since={position}");
        let ws = server.ws_addr();
        std::thread::spawn(move || {
            let url = format!("http://{ws}/poll?{query}");
            let mut command = Command::new("curl");
            command
                .args(["-s", "--max-time", "30", &url])
                .stdin(Stdio::null());
            server::die_with_parent(&mut command);
            let out = command.output().expect("curl runs");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    // The member and the held poll.
    server.wait_for_connections(2, Duration::from_secs(10));
    let _other = server.subscribe(&["room:1"]);
    let body = held.join().expect("the poll thread");
    let answered: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("held poll: {body:?}: {e}"));
    let events = answered["events"].as_array().expect("events");
    assert!(
        events.iter().any(|e| e["type"] == "join"),
        "the held poll is answered with the second member's join: {answered}"
    );
}
