//! Against an independent server (Node, `ws` package): the harness publishes through its
//! own WebSocket connection and counts every rebroadcast delivery exactly.

mod common;

use common::{assert_exact, run_ok, start_node};

#[test]
fn ws_publisher_fanout_against_node_ws_server() {
    let (_server, ws, _udp) = start_node();
    let url = format!("ws://127.0.0.1:{ws}/");
    let r = run_ok(&[
        "fanout",
        "--url",
        &url,
        "-n",
        "200",
        "--publish",
        "ws",
        "--messages",
        "100",
        "--msg-rate",
        "1000",
        "--timeout",
        "60",
    ]);
    assert_exact(&r, "delivery", 200, 100);
    assert_eq!(
        r["problems"].as_array().map(Vec::len),
        Some(0),
        "{:#}",
        r["problems"]
    );
}
