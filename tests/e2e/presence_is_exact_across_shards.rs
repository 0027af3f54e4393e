//! Presence end to end over two shards: real `websockets` clients, tokens signed by
//! PyJWT, and one raw socket that goes silent after its upgrade.
//!
//! tests/clients/py_presence.py runs the cases and prints one JSON line per case; the
//! test starts the server, runs the script and requires every case to report `ok`, then
//! checks the presence metrics went back to zero once every client left. A missing
//! Python module fails the test (exit 2 with the install command), never skips it.

use std::time::Duration;

use crate::common::*;

const SECRET: &str = "ringcast-test-secret-0123456789abcdef";

const NAMESPACES: &str = "[namespaces.room]\npresence = true\njoin_leave = true\n\
                          [namespaces.lobby]\npresence = true\njoin_leave = true\n\
                          [namespaces.news]\npresence = false\n";

const CASES: [&str; 3] = [
    "join_leave_on_both_shards",
    "presence_is_exact_across_shards",
    "dead_peer_leaves_within_the_heartbeat",
];

#[test]
fn presence_is_exact_across_shards_and_join_leave_reach_every_shard() {
    let _deadline = Deadline::new("presence cases", Duration::from_secs(90));
    let dir = tempfile::tempdir().expect("creating a scratch directory");
    let config = dir.path().join("ringcast.toml");
    std::fs::write(&config, NAMESPACES).expect("writing the config file");
    let server = Server::start(&[
        "--config",
        config.to_str().expect("utf-8 temp path"),
        "--shards",
        "2",
        "--jwt-secret",
        SECRET,
        "--allow-anonymous",
        "true",
        "--presence-max-members",
        "12",
        "--ping-interval",
        "1",
        "--pong-timeout",
        "1",
    ]);
    let (ws, admin) = (
        server.ws_addr().to_string(),
        server.admin_addr().to_string(),
    );
    let results = python::run_script(
        "py_presence.py",
        &[
            "presence", "--ws", &ws, "--admin", &admin, "--secret", SECRET,
        ],
    )
    .assert_cases(&CASES, &server.log());
    for measure in results.iter().filter(|r| r.get("measure").is_some()) {
        eprintln!("{}: {}", measure["measure"], measure["value"]);
    }
    // Every client is gone: nothing of them is left in the registry.
    server.wait_for_connections(0, Duration::from_secs(10));
    let metrics = wait_until(Duration::from_secs(5), "presence gauges back to 0", || {
        let m = server.metrics();
        (m.sum("ringcast_presence_members") == 0.0 && m.sum("ringcast_presence_channels") == 0.0)
            .then_some(m)
    });
    let joins = metrics.sum_where("ringcast_presence_events_total", &[("type", "join")]);
    let leaves = metrics.sum_where("ringcast_presence_events_total", &[("type", "leave")]);
    assert!(joins >= 10.0, "joins counted: {joins}");
    assert_eq!(joins, leaves, "every member that joined left");
}
