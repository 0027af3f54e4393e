//! Harness for ringcast's end-to-end tests: the real binary, real sockets, real clients.
//!
//! Every test starts its own `ringcast` process on free loopback ports
//! ([`Server::start`]), talks to it the way production clients and publishers do, and
//! asserts on what docs/protocol.md promises. Nothing here fakes the server.
//!
//! # Layout
//!
//! - [`server`]: spawn the binary, wait for `/readyz`, publish (UDP, TCP, HTTP),
//!   read metrics, send SIGTERM; killed on drop, its log printed when a test fails.
//! - [`http`]: a tiny HTTP/1.1 client over `std::net::TcpStream` (admin API, bad upgrades).
//! - [`metrics`]: Prometheus text parsing with sums over label sets.
//! - [`subscriber`]: a tungstenite client that decodes ringcast messages and checks offsets.
//! - [`raw_ws`]: a hand-driven WebSocket for crafted frames and close codes.
//! - [`external`]: the Node (`ws`) and Python (`websockets`) subscriber fleets in
//!   tests/clients, run as subprocesses.
//! - [`browser`]: headless Chromium driven through tests/clients/browser_driver.js,
//!   running the browser client clients/js/ringcast.js.
//! - [`nats`]: a real JetStream nats-server (one, or a 3-server cluster), killed on drop.
//! - [`tcp_gate`]: a TCP forwarder a test can shut (refusing and counting connection
//!   attempts) and open again.
//! - [`curl`]: curl runs; [`per_ip`]: sockets from chosen loopback source addresses;
//!   [`inbox`]: an inbox server restarted behind a shut gate; [`admin`]: admin-port calls.
//! - [`tls`]: a self-signed certificate for the TLS port.
//!
//! Every wait is bounded: helpers take a timeout and panic with a message saying what
//! did not happen, and [`Deadline`] aborts the test binary when a test hangs anyway.
//!
//! All the end-to-end tests share this one process (tests/e2e/main.rs), several at a
//! time: a helper keeps its state per call or per test (ports drawn free, temporary
//! directories, environments passed to the child), never in the process's environment.

pub mod admin;
pub mod browser;
pub mod curl;
pub mod external;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod nats;
pub mod per_ip;
pub mod python;
pub mod raw_ws;
pub mod server;
pub mod subscriber;
pub mod tcp_gate;
pub mod tls;

pub use browser::Browser;
pub use external::{ClientKind, ExternalFleet};
pub use metrics::Metrics;
pub use raw_ws::{CloseSeen, OutFrame, RawWs};
pub use server::{Ports, Server, TcpIngest};
pub use subscriber::{Delivery, OffsetLog, Subscriber};
pub use tcp_gate::TcpGate;

use std::net::{TcpListener, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Reads a piped child's output on two threads: its stdout as lines, and its stderr
/// collected as text (for failure messages).
pub fn child_output(
    child: &mut std::process::Child,
) -> (
    mpsc::Receiver<String>,
    std::sync::Arc<std::sync::Mutex<String>>,
) {
    use std::io::{BufRead, BufReader, Read};
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = std::sync::Arc::clone(&stderr);
    let mut pipe = child.stderr.take().expect("piped stderr");
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("stderr buffer")
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    (lines, stderr)
}

/// Runs an installed tool (`command`, from Debian's `package`); returns its exit success
/// and everything it printed (stdout, then stderr). A missing tool fails the test.
pub fn run_tool(command: &mut std::process::Command, package: &str) -> (bool, String) {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {program} ({e}): install Debian's {package} package \
             (scripts/test.sh does)"
        )
    });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// Writes `text` to `path` (a configuration file a test then reloads).
pub fn write_file(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A loopback TCP port that was free a moment ago.
///
/// The socket is dropped before returning, so another process may take the port in the
/// meantime; [`Server::start`] retries with new ports when ringcast reports a bind clash.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to find a free TCP port")
        .port()
}

/// A loopback UDP port that was free a moment ago (see [`free_tcp_port`]).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("binding 127.0.0.1:0 to find a free UDP port")
        .port()
}

/// Polls `probe` every 20 ms until it returns `Some`, or gives up after `timeout`.
pub fn try_wait_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`try_wait_until`], but panics with `what` when the time runs out.
pub fn wait_until<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    try_wait_until(timeout, probe)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting until {what}"))
}

/// Aborts the whole test binary when a test outlives its time bound.
///
/// The socket helpers all time out on their own; this is the backstop that turns a hang
/// nobody foresaw into a loud failure instead of a stuck CI run. It ends every test of
/// the binary, not only the one that hung: a thread cannot be stopped from outside, and
/// the hung one would keep its servers and clients. Child processes die with the test
/// binary (they are spawned with `PR_SET_PDEATHSIG`).
pub struct Deadline {
    cancel: Option<mpsc::Sender<()>>,
}

impl Deadline {
    /// Starts the clock for the test called `test`.
    pub fn new(test: &'static str, limit: Duration) -> Deadline {
        let (cancel, cancelled) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                eprintln!(
                    "\n{test}: still running after its {limit:?} bound; aborting the test binary"
                );
                std::process::exit(101);
            }
        });
        Deadline {
            cancel: Some(cancel),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // Dropping the sender disconnects the watchdog, which then exits quietly.
        self.cancel.take();
    }
}
