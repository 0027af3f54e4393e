//! SIGTERM drains: `/readyz` turns 503, every connection is closed with 1001 and a
//! `reconnect after <ms>ms` hint, and the process exits 0 within the drain window.
//! Between the signal and the drain, `drain_grace` keeps the listeners accepting while
//! `/readyz` already answers 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

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
    // No grace: the drain starts at the signal, as the timings below assume.
    let mut server = Server::start(&["--drain-window", "2", "--drain-grace", "0"]);

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
                match crate::common::http::get(admin, "/readyz") {
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

    // The closes are spread over the drain window, so the admin port answers for most
    // of it: a poller every 20 ms must see the 503.
    assert!(
        statuses.contains(&503),
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

/// Grace long enough that the probes below finish inside it even on a loaded machine;
/// nothing asserts how long it takes.
const GRACE_SECS: u64 = 8;

#[test]
fn readyz_fails_first_and_upgrades_still_succeed_during_the_grace() {
    let _deadline = Deadline::new(
        "readyz_fails_first_and_upgrades_still_succeed_during_the_grace",
        Duration::from_secs(60),
    );
    let grace = GRACE_SECS.to_string();
    let mut server = Server::start(&["--drain-window", "1", "--drain-grace", &grace]);
    let mut before = server.subscribe(&["grace"]);
    server.wait_for_connections(1, Duration::from_secs(10));

    server.sigterm();
    wait_until(
        Duration::from_secs(5),
        "/readyz answers 503 after SIGTERM",
        || server.admin_get("/readyz").ok().filter(|r| r.status == 503),
    );
    // Still inside the grace: the node is out of the load balancer, but a client that
    // was already on its way in is served, and both connections stay open.
    let mut during = server.subscribe(&["grace"]);
    server.wait_for_connections(2, Duration::from_secs(5));
    assert_eq!(
        server.metrics().sum("ringcast_draining"),
        1.0,
        "ringcast_draining during the grace"
    );
    let published = server.http_publish(Some("grace"), b"{\"during\":\"grace\"}");
    assert_eq!(published.status, 200, "{}", published.text());
    for (who, sub) in [("before", &mut before), ("during", &mut during)] {
        let d = sub
            .next_delivery(Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!("subscriber connected {who} the signal got nothing during the grace")
            });
        assert_eq!(d.channel, "grace", "{who}: {d:?}");
    }

    // After the grace: the drain closes both with 1001 and the process exits 0.
    let limit = Duration::from_secs(GRACE_SECS) + Duration::from_secs(15);
    for (who, sub) in [("before", &mut before), ("during", &mut during)] {
        let frame = sub
            .wait_close(limit)
            .unwrap_or_else(|| panic!("{who}: connection ended without a close frame"));
        assert_eq!(u16::from(frame.code), 1001, "{who}: {frame:?}");
    }
    let status = server
        .wait_exit(limit)
        .unwrap_or_else(|| panic!("ringcast still running after the grace and the drain"));
    assert!(status.success(), "ringcast exited with {status}");
    let log = server.log();
    assert!(
        log.contains("shutting down") && log.contains("draining"),
        "grace and drain are both logged:\n{log}"
    );
}
