//! The browser client (clients/js/ringcast.js, in headless Chromium) does not hammer a
//! server that is down: after a drain it waits the 1001 hint, then retries with
//! full-jitter exponential backoff. Counted at a plain TCP listener that takes the
//! server's port: a handful of attempts in the observation window, not a tight loop, and
//! delays that vary within the growing cap. When a server is back on the port, the
//! client reconnects and resubscribes.

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::common::browser::query_escape;
use crate::common::*;
use serde_json::Value;

const MIN_DELAY_MS: f64 = 250.0;
const MAX_DELAY_MS: f64 = 2000.0;
/// How long the port refuses the client (attempts are counted, not timed).
const WINDOW: Duration = Duration::from_secs(12);
/// Far below a tight loop (a browser retrying at once makes hundreds in the window),
/// far above what the backoff makes (about one a second once at the cap).
const MAX_ATTEMPTS: usize = 40;

#[test]
fn browser_backs_off_with_jitter_while_the_server_is_down() {
    let _deadline = Deadline::new(
        "browser_backs_off_with_jitter_while_the_server_is_down",
        Duration::from_secs(120),
    );
    let mut server = Server::start(&["--drain-window", "1"]);
    let ports = server.ports();
    let mut browser = Browser::start();
    let ws = format!("ws://127.0.0.1:{}/ws", server.ws_port);
    browser.open(&format!(
        "test/browser_harness.html?url={}&channels=news&minDelay={MIN_DELAY_MS}&maxDelay={MAX_DELAY_MS}&transports=websocket",
        query_escape(&ws)
    ));
    browser.wait(
        "window.log.subscribed.length === 1",
        Duration::from_secs(20),
    );

    server.sigterm();
    assert!(
        server.wait_exit(Duration::from_secs(30)).is_some(),
        "no exit within 30 s of SIGTERM\n{}",
        server.describe()
    );
    // A listener on the server's port that accepts and closes: every attempt of the
    // client is one accept (its handshake then fails, as against a dead server).
    let listener = TcpListener::bind(("127.0.0.1", ports.ws))
        .unwrap_or_else(|e| panic!("binding the counting listener on {}: {e}", ports.ws));
    listener.set_nonblocking(true).expect("non-blocking");
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (accepted, stop) = (Arc::clone(&accepted), Arc::clone(&stop));
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((socket, _)) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        drop(socket);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("counting listener: {e}"),
                }
            }
            // The listener closes here, freeing the port for the next server.
        })
    };
    let before = browser
        .eval("window.log.states.filter(s => s.state === 'connecting').length")
        .as_u64()
        .expect("count");
    thread::sleep(WINDOW);
    stop.store(true, Ordering::SeqCst);
    counter.join().expect("counting listener thread");
    let attempts = accepted.load(Ordering::SeqCst);
    let after = browser
        .eval("window.log.states.filter(s => s.state === 'connecting').length")
        .as_u64()
        .expect("count");

    let states = browser.eval("window.log.states");
    let downs: Vec<Value> = states
        .as_array()
        .expect("states")
        .iter()
        .filter(|s| s["state"] == "disconnected")
        .cloned()
        .collect();
    let explain = format!("{attempts} attempts at the port; states: {states}");
    assert!(
        (3..=MAX_ATTEMPTS).contains(&attempts),
        "expected a few spread attempts, not none and not a tight loop: {explain}"
    );
    // Every attempt the page started after the listener was up reached it (one more at
    // most: the one in flight when the window ended, or the one refused before the bind).
    let started = (after - before) as usize;
    assert!(
        started.abs_diff(attempts) <= 2,
        "page started {started} attempts, listener saw {attempts}: {explain}"
    );

    // The drain's 1001 hint is honoured: the first wait is at least the hint.
    let first = &downs[0];
    assert_eq!(first["code"], 1001, "{explain}");
    let hint: f64 = first["reason"]
        .as_str()
        .and_then(|r| r.strip_prefix("reconnect after "))
        .and_then(|r| r.strip_suffix("ms"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no hint in {first}"));
    let first_delay = first["delay"].as_f64().expect("delay");
    assert!(
        first_delay >= hint && first_delay <= hint + MIN_DELAY_MS + 1.0,
        "{explain}"
    );

    // Full jitter: each later delay is within [0, min(max, min * 2^n)] for the n-th
    // failure, and the delays are not one fixed period.
    let failures: Vec<(u64, f64)> = downs[1..]
        .iter()
        .map(|d| {
            (
                d["attempt"].as_u64().expect("attempt"),
                d["delay"].as_f64().expect("delay"),
            )
        })
        .collect();
    assert!(failures.len() >= 3, "{explain}");
    for (attempt, delay) in &failures {
        let cap = MAX_DELAY_MS.min(MIN_DELAY_MS * 2f64.powi(*attempt as i32 - 1));
        assert!(
            *delay >= 0.0 && *delay <= cap + 1.0,
            "delay {delay} over the cap {cap} of attempt {attempt}: {explain}"
        );
    }
    let delays: Vec<f64> = failures.iter().map(|(_, d)| *d).collect();
    let spread = delays.iter().cloned().fold(f64::MIN, f64::max)
        - delays.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread >= 0.1 * MAX_DELAY_MS.min(MIN_DELAY_MS * 4.0),
        "delays {delays:?} barely vary: not jittered? {explain}"
    );
    println!("backoff: {attempts} attempts in {WINDOW:?}; delays {delays:?}");

    // Back on the same port: the client reconnects and resubscribes.
    let server = Server::start_on(ports, &["--drain-window", "1"]);
    browser.wait(
        "window.log.subscribed.length === 2 && window.log.states.at(-1).state === 'connected'",
        Duration::from_secs(20),
    );
    let r = server.http_publish(Some("news"), b"{\"back\":true}");
    assert_eq!(r.status, 200, "{}", r.text());
    browser.wait(
        "window.log.messages.length === 1 && window.log.messages[0].data.back === true",
        Duration::from_secs(20),
    );
    let subscribed = browser.eval("window.log.subscribed[1]");
    assert_eq!(
        subscribed["recovered"], false,
        "a new process has a new epoch: {subscribed}"
    );
    assert_eq!(subscribed["reason"], "epoch_changed", "{subscribed}");
    browser.assert_no_page_errors();
}
