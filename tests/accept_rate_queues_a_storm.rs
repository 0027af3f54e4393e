//! `accept_rate_per_shard` paces accepting instead of refusing: a storm of 2000 unpaced
//! connections against 500 accepts per second per shard waits in the kernel's accept
//! queue and every connection gets in, none answered 503. Only counts are asserted.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const STORM: usize = 2000;

fn load_binary() -> PathBuf {
    let bin = std::env::var_os("RINGCAST_LOAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Server::binary().with_file_name("ringcast-load"));
    assert!(
        bin.exists(),
        "{} does not exist; build it with `cargo build --release --workspace` or set RINGCAST_LOAD_BIN",
        bin.display()
    );
    bin
}

#[test]
fn accept_rate_queues_a_storm() {
    let _deadline = Deadline::new("accept_rate_queues_a_storm", Duration::from_secs(120));
    let server = Server::start(&["--accept-rate-per-shard", "500", "--listen-backlog", "4096"]);
    let mut load = Command::new(load_binary())
        .args(["connect", "--url", &server.ws_url(&["storm"])])
        .args(["-n", &STORM.to_string(), "--rate", "0"])
        .args(["--connect-timeout", "60", "--hold", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning ringcast-load");
    let connected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        server.wait_for_connections(STORM, Duration::from_secs(60))
    }));
    let _ = load.kill();
    let _ = load.wait();
    if let Err(panic) = connected {
        std::panic::resume_unwind(panic);
    }
    let m = server.metrics();
    assert_eq!(
        m.sum("ringcast_connections_refused_total"),
        0.0,
        "a paced storm is queued, not refused: {}",
        m.describe("ringcast_connections_refused_total")
    );
    assert_eq!(m.sum("ringcast_connections_accepted_total"), STORM as f64);
}
