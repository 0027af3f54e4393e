//! The Node and Python subscriber fleets in tests/clients, run as subprocesses.
//!
//! Each fleet opens K connections with a mainstream client library (`ws` for Node,
//! `websockets` for Python), prints `{"event":"ready",…}` once all are open, checks
//! offsets itself while it waits for M messages each, and ends with one
//! `{"event":"summary",…}` line that [`FleetSummary`] asserts on.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::server::die_with_parent;

/// Which client library a fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Node.js with the `ws` package (tests/clients/node_sub.js).
    Node,
    /// Python 3 with the `websockets` package (tests/clients/py_sub.py).
    Python,
}

impl ClientKind {
    fn program(self) -> &'static str {
        match self {
            ClientKind::Node => "node",
            ClientKind::Python => "python3",
        }
    }

    fn script(self) -> PathBuf {
        let name = match self {
            ClientKind::Node => "node_sub.js",
            ClientKind::Python => "py_sub.py",
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/clients")
            .join(name)
    }

    fn install_hint(self) -> &'static str {
        match self {
            ClientKind::Node => {
                "install Node.js and run `npm install --no-audit --no-fund` in tests/clients \
                 (scripts/test.sh does both)"
            }
            ClientKind::Python => {
                "install python3 and `python3 -m pip install websockets` (scripts/test.sh does both)"
            }
        }
    }
}

/// A running fleet of external subscribers.
pub struct ExternalFleet {
    kind: ClientKind,
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    subscribers: usize,
}

impl ExternalFleet {
    /// Starts `subscribers` connections to `url`, each waiting for `messages` messages
    /// for at most `timeout` (counted by the client from when it starts).
    ///
    /// # Panics
    /// When the interpreter is missing.
    pub fn spawn(
        kind: ClientKind,
        url: &str,
        subscribers: usize,
        messages: usize,
        timeout: Duration,
    ) -> ExternalFleet {
        let mut command = Command::new(kind.program());
        command
            .arg(kind.script())
            .args(["--url", url])
            .args(["--subscribers", &subscribers.to_string()])
            .args(["--messages", &messages.to_string()])
            .args(["--timeout", &format!("{:.1}", timeout.as_secs_f64())])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run `{}` for the {kind:?} subscriber fleet ({e}); {}",
                kind.program(),
                kind.install_hint()
            )
        });

        let (lines, stderr) = super::child_output(&mut child);
        ExternalFleet {
            kind,
            child,
            lines,
            stderr,
            subscribers,
        }
    }

    /// Waits for the "ready" line: every connection is open (and, since channels are in
    /// the URL, subscribed).
    ///
    /// # Panics
    /// When the fleet ends or stays silent for `timeout`; quotes what it printed.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_json(deadline) {
                Ok(v) if v["event"] == "ready" => return,
                Ok(v) if v["event"] == "summary" => {
                    panic!(
                        "{:?} fleet finished before all connections opened: {v}\nstderr: {}",
                        self.kind,
                        self.stderr_text()
                    )
                }
                Ok(_) => {}
                Err(why) => panic!(
                    "{:?} fleet of {} never reported ready within {timeout:?}: {why}\nstderr: {}",
                    self.kind,
                    self.subscribers,
                    self.stderr_text()
                ),
            }
        }
    }

    /// Waits for the summary line and the process exit.
    ///
    /// # Panics
    /// When no summary arrives within `timeout`.
    pub fn finish(mut self, timeout: Duration) -> FleetSummary {
        let deadline = Instant::now() + timeout;
        let json = loop {
            match self.next_json(deadline) {
                Ok(v) if v["event"] == "summary" => break v,
                Ok(_) => {}
                Err(why) => {
                    let _ = self.child.kill();
                    panic!(
                        "{:?} fleet gave no summary within {timeout:?}: {why}\nstderr: {}",
                        self.kind,
                        self.stderr_text()
                    )
                }
            }
        };
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            if Instant::now() > deadline + Duration::from_secs(5) {
                let _ = self.child.kill();
                panic!("{:?} fleet printed its summary but did not exit", self.kind);
            }
            thread::sleep(Duration::from_millis(10));
        };
        FleetSummary {
            kind: self.kind,
            json,
            status,
            stderr: self.stderr_text(),
        }
    }

    fn next_json(&mut self, deadline: Instant) -> Result<Value, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => serde_json::from_str(&line)
                .map_err(|e| format!("unexpected output line {line:?} ({e})")),
            Err(RecvTimeoutError::Timeout) => Err("timed out".into()),
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(100)); // let stderr drain
                let status = self.child.try_wait().ok().flatten();
                Err(format!("the process ended (status {status:?})"))
            }
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for ExternalFleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The summary line of a fleet, plus its exit status and stderr.
#[derive(Debug)]
pub struct FleetSummary {
    /// Which library produced it.
    pub kind: ClientKind,
    /// The summary object (see tests/clients/*_sub.*).
    pub json: Value,
    /// The process exit status.
    pub status: ExitStatus,
    /// What it wrote to stderr.
    pub stderr: String,
}

impl FleetSummary {
    /// Asserts every subscriber of the fleet received, for each `(channel, first, last)`,
    /// exactly the offsets `first..=last` once each and in order, and nothing else.
    pub fn assert_every_subscriber_got(&self, expected: &[(&str, u64, u64)]) {
        let j = &self.json;
        let who = format!("{:?} fleet", self.kind);
        assert!(
            j["error_count"] == 0 && j["ok"] == true && self.status.success(),
            "{who} reported errors (exit {}): {}\nstderr: {}",
            self.status,
            j,
            self.stderr
        );
        assert_eq!(
            j["complete"], j["subscribers"],
            "{who}: not every subscriber finished: {j}"
        );
        let channels = j["channels"].as_object().cloned().unwrap_or_default();
        assert_eq!(
            channels.len(),
            expected.len(),
            "{who}: saw channels {:?}, expected {:?}",
            channels.keys().collect::<Vec<_>>(),
            expected
        );
        for (name, first, last) in expected {
            let c = &channels
                .get(*name)
                .unwrap_or_else(|| panic!("{who}: no message on channel {name}: {j}"));
            let count = last - first + 1;
            for (field, want) in [
                ("subscribers", j["subscribers"].as_u64().unwrap_or(0)),
                ("first_min", *first),
                ("first_max", *first),
                ("last_min", *last),
                ("last_max", *last),
                ("count_min", count),
                ("count_max", count),
            ] {
                assert_eq!(
                    c[field].as_u64(),
                    Some(want),
                    "{who}: channel {name} {field} should be {want}: {c}"
                );
            }
        }
    }
}
