//! The identity features over the HTTP transports, end to end: a durable inbox read over
//! SSE and long-poll, presence events on an SSE stream, an admin disconnect and a token's
//! expiry ending an SSE stream with the documented close event (and answering a held
//! long-poll). Read by `httpx` with tokens signed by PyJWT (tests/clients/
//! py_sse_identity.py), against the real binary.
//!
//! Regression: an inbox channel's subscribe reply carried the `id:` of the position
//! after its unacked messages, so a stream cut between the reply and them resumed past
//! them (the `inbox` case resumes from the reply's id).

use std::time::Duration;

use crate::common::*;

const SECRET: &str = "ringcast-sse-identity-secret-0123456789";

const NAMESPACES: &str = "[namespaces.room]\npresence = true\njoin_leave = true\n";

#[test]
fn inbox_presence_admin_disconnect_and_expiry_over_sse() {
    let _deadline = Deadline::new(
        "inbox_presence_admin_disconnect_and_expiry_over_sse",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("ringcast.toml");
    std::fs::write(&config, NAMESPACES).expect("writing the config file");
    let data = dir.path().join("data");
    let server = Server::start(&[
        "--config",
        config.to_str().expect("utf-8 temp path"),
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0",
        "--inbox",
        "true",
        "--data-dir",
        data.to_str().expect("utf-8 temp path"),
    ]);
    let run = python::run_script(
        "py_sse_identity.py",
        &[
            "--addr",
            &server.ws_addr().to_string(),
            "--admin",
            &server.admin_addr().to_string(),
            "--secret",
            SECRET,
        ],
    );
    run.assert_cases(
        &["inbox", "presence", "admin_disconnect", "token_expiry"],
        &server.describe(),
    );
    let metrics = server.metrics();
    for (reason, at_least) in [("admin_disconnect", 2.0), ("token_expired", 2.0)] {
        assert!(
            metrics.sum_where("ringcast_connections_closed_total", &[("reason", reason)])
                >= at_least,
            "{reason}: {}",
            metrics.describe("ringcast_connections_closed_total")
        );
    }
}
