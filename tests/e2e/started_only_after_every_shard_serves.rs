//! "ringcast started" is logged, and `/readyz` answers 200, only once every shard has
//! registered its listeners and said so.
//!
//! Regression: the line used to be logged as soon as each executor thread existed, before
//! any shard had set anything up, so an SRE reading "started" could not trust it.

use std::time::Duration;

use crate::common::*;

const SHARDS: usize = 2;

#[test]
fn started_only_after_every_shard_serves() {
    let _deadline = Deadline::new(
        "started_only_after_every_shard_serves",
        Duration::from_secs(30),
    );
    let server = Server::start(&["--shards", &SHARDS.to_string()]);
    wait_until(Duration::from_secs(10), "/readyz answers 200", || {
        matches!(server.admin_get("/readyz"), Ok(r) if r.status == 200).then_some(())
    });
    // Read the log only now: whatever /readyz saw must already be in it.
    let log = server.log();
    let started_at = log.find("ringcast started").unwrap_or_else(|| {
        panic!("/readyz said 200 before \"ringcast started\" was logged\n{log}")
    });
    for shard in 0..SHARDS {
        let serving = log
            .lines()
            .position(|l| l.contains("shard serving") && l.contains(&format!("shard={shard}")))
            .unwrap_or_else(|| panic!("shard {shard} never logged \"shard serving\"\n{log}"));
        let serving_at: usize = log.lines().take(serving).map(|l| l.len() + 1).sum();
        assert!(
            serving_at < started_at,
            "\"ringcast started\" was logged before shard {shard} served\n{log}"
        );
    }
}
