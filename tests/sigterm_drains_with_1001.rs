//! SIGTERM drains: `/readyz` turns 503, every connection is closed with 1001 and a
//! `reconnect after <ms>ms` hint, and the process exits 0 within the drain window.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 10;
const DRAIN_WINDOW: Duration = Duration::from_secs(2);
/// Room past the drain window for the last close to go out and the process to exit.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// Parses `reconnect after <ms>ms`, the hint docs/protocol.md promises.
fn reconnect_hint_ms(reason: &str) -> Option<u64> {
    reason
        .strip_prefix("reconnect after ")?
        .strip_suffix("ms")?
        .parse()
        .ok()
}

#[test]
fn sigterm_drains_with_1001() {
    let _deadline = Deadline::new("sigterm_drains_with_1001", Duration::from_secs(60));
    let mut server = Server::start(&["--drain-window", "2"]);

    let ready = server.admin_get("/readyz").expect("GET /readyz");
    assert_eq!(
        (ready.status, ready.text().trim()),
        (200, "ready"),
        "/readyz before the drain"
    );

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| server.subscribe(&["drain"]))
        .map(|mut sub| {
            thread::spawn(move || {
                let frame = sub.wait_close(DRAIN_WINDOW + EXIT_GRACE + Duration::from_secs(5));
                (frame, Instant::now())
            })
        })
        .collect();
    server.wait_for_connections(CLIENTS, Duration::from_secs(10));

    // Poll /readyz through the drain until the admin port goes away.
    let stop = Arc::new(AtomicBool::new(false));
    let admin = server.admin_addr();
    let poller = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match common::http::get(admin, "/readyz") {
                    Ok(r) => statuses.push(r.status),
                    Err(_) => break,
                }
                thread::sleep(Duration::from_millis(20));
            }
            statuses
        })
    };

    let signalled_at = Instant::now();
    server.sigterm();
    let status = server.wait_exit(DRAIN_WINDOW + EXIT_GRACE);
    let exited_after = signalled_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let statuses = poller.join().expect("/readyz poller");

    let status = status.unwrap_or_else(|| {
        panic!("ringcast still running {exited_after:?} after SIGTERM with --drain-window 2")
    });
    assert!(
        status.success(),
        "ringcast exited with {status} after SIGTERM"
    );
    eprintln!("exited {exited_after:?} after SIGTERM; /readyz answered {statuses:?}");

    let saw_503 = statuses.contains(&503);
    assert!(
        saw_503 || exited_after <= DRAIN_WINDOW,
        "/readyz never answered 503 during a drain that took {exited_after:?}: {statuses:?}"
    );
    let first_503 = statuses.iter().position(|&s| s == 503);
    if let Some(i) = first_503 {
        assert!(
            statuses[i..].iter().all(|&s| s == 503),
            "/readyz went back to ready during the drain: {statuses:?}"
        );
    }

    let mut hints = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (frame, closed_at) = client
            .join()
            .unwrap_or_else(|_| panic!("client {i} failed (see its panic above)"));
        let frame =
            frame.unwrap_or_else(|| panic!("client {i}: connection ended without a close frame"));
        assert_eq!(
            u16::from(frame.code),
            1001,
            "client {i}: close code ({frame:?})"
        );
        let hint = reconnect_hint_ms(&frame.reason).unwrap_or_else(|| {
            panic!(
                "client {i}: close reason {:?} is not `reconnect after <ms>ms`",
                frame.reason
            )
        });
        assert!(
            closed_at.duration_since(signalled_at) <= DRAIN_WINDOW + EXIT_GRACE,
            "client {i} was closed {:?} after SIGTERM",
            closed_at.duration_since(signalled_at)
        );
        hints.push(hint);
    }
    eprintln!("reconnect hints (ms): {hints:?}");
}
