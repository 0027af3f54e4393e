//! Running out of file descriptors is a state ringcast lives through: the accept loop
//! pauses (100 ms doubling to 1 s) instead of spinning, counts
//! `ringcast_accept_errors_total{reason="emfile"}`, logs once per 10 s rather than once
//! per failed accept, keeps every open connection served, and accepts again as soon as
//! descriptors are free. New clients meanwhile wait in the kernel's accept queue.
//!
//! The server's RLIMIT_NOFILE is lowered after start with util-linux `prlimit --pid` to a
//! few descriptors above what it holds with its first subscribers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const UPGRADE: &str = "GET /ws?channels=fd HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
     Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
     Sec-WebSocket-Version: 13\r\n\r\n";

/// Opens a TCP connection (the kernel completes it whether or not ringcast accepts) and
/// sends an upgrade request.
fn start_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("TCP connect to {addr} (the kernel accepts it): {e}"));
    s.write_all(UPGRADE.as_bytes())
        .expect("sending the upgrade request");
    s
}

/// True when the server answered `101` within `wait`; false when nothing arrived.
fn answered_101(s: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 101"),
        "an upgrade answered with something else than 101: {text:?}"
    );
    true
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .count()
}

/// Sets the soft RLIMIT_NOFILE of `pid` (the hard limit stays, so it can be raised again
/// without privileges).
fn set_nofile(pid: u32, limit: usize) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:"))
        .output()
        .unwrap_or_else(|e| {
            panic!("running prlimit (util-linux; scripts/test.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "prlimit --pid {pid} --nofile={limit}: failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fd_exhaustion_pauses_accept() {
    let _deadline = Deadline::new("fd_exhaustion_pauses_accept", Duration::from_secs(90));
    let server = Server::start(&["--shards", "1"]);
    let mut subscribers: Vec<Subscriber> = (0..5).map(|_| server.subscribe(&["fd"])).collect();
    server.wait_for_connections(5, Duration::from_secs(5));

    // Room for HEADROOM more descriptors, then twice as many upgrades as fit.
    const HEADROOM: usize = 10;
    let limit = open_fds(server.pid()) + HEADROOM;
    set_nofile(server.pid(), limit);
    let mut clients: Vec<TcpStream> = (0..2 * HEADROOM)
        .map(|_| start_upgrade(server.ws_addr()))
        .collect();
    let mut upgraded = Vec::new();
    let mut waiting = Vec::new();
    let settled = Instant::now() + Duration::from_secs(2);
    for mut c in clients.drain(..) {
        let left = settled.saturating_duration_since(Instant::now());
        if answered_101(&mut c, left.max(Duration::from_millis(50))) {
            upgraded.push(c);
        } else {
            waiting.push(c);
        }
    }
    eprintln!(
        "limit {limit}: {} upgraded, {} waiting in the accept queue",
        upgraded.len(),
        waiting.len()
    );
    assert!(
        !waiting.is_empty(),
        "every upgrade was answered although RLIMIT_NOFILE left room for only {HEADROOM}"
    );
    assert!(
        upgraded.len() < 2 * HEADROOM,
        "more upgrades answered than descriptors allowed"
    );

    // Open subscribers are still served while accept fails.
    for i in 0..3u32 {
        server.udp_publish("fd", format!("while-exhausted-{i}").as_bytes());
    }
    for (n, s) in subscribers.iter_mut().enumerate() {
        let got = s.collect(3, Duration::from_secs(5));
        assert_eq!(
            got.len(),
            3,
            "subscriber {n} missed messages while the server was out of descriptors"
        );
    }

    // Free descriptors: the queued upgrades are accepted now, without a reconnect.
    drop(upgraded);
    let first = waiting
        .iter_mut()
        .position(|c| answered_101(c, Duration::from_secs(10)))
        .unwrap_or(usize::MAX);
    assert!(
        first != usize::MAX,
        "no queued upgrade was answered within 10 s of descriptors becoming free\n{}",
        server.describe()
    );
    drop(waiting);
    set_nofile(server.pid(), 4096); // soft limit back up

    // Everyone left: a new subscriber connects and the errors were counted, logged rarely.
    let mut late = wait_until(Duration::from_secs(10), "a new subscriber connects", || {
        Some(server.subscribe(&["fd"]))
    });
    server.udp_publish("fd", b"after");
    assert_eq!(
        late.collect(1, Duration::from_secs(5)).len(),
        1,
        "the subscriber connected after the exhaustion gets messages"
    );
    let m = server.metrics();
    let emfile = m.sum_where("ringcast_accept_errors_total", &[("reason", "emfile")]);
    assert!(
        emfile >= 2.0,
        "accept errors are counted: {}",
        m.describe("ringcast_accept_errors_total")
    );
    let log = server.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("accept failed") && l.contains("LimitNOFILE"))
        .count();
    assert!(
        lines >= 1,
        "the exhaustion is logged with the fix (LimitNOFILE)\n{log}"
    );
    assert!(
        (lines as f64) < emfile,
        "logged {lines} times for {emfile} failed accepts: once per interval, not per failure\n{log}"
    );
    // The first subscribers lived through all of it.
    for (n, s) in subscribers.iter_mut().enumerate() {
        assert_eq!(
            s.collect(1, Duration::from_secs(5)).len(),
            1,
            "subscriber {n}, connected before the exhaustion, lost its connection"
        );
    }
}
