//! Headless Chromium running the browser client (clients/js/ringcast.js), driven by
//! tests/clients/browser_driver.js (playwright-core) as a subprocess.
//!
//! The driver serves clients/js/ at [`Browser::base`] and tests/clients/ under `test/`
//! from its own static HTTP server, so pages load over real HTTP and connect to ringcast
//! over real sockets. [`Browser::call`] sends one JSON command and waits for its answer.
//! A missing Chromium or playwright-core fails the test with a message saying what to
//! install.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::server::die_with_parent;

/// How long the browser gets to start and the static server to listen.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// A running driver with one browser.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    next_id: u64,
    /// Where the driver serves clients/js/ (`http://127.0.0.1:<port>/`).
    pub base: String,
}

impl Browser {
    /// Starts the driver and waits until the browser is up.
    ///
    /// # Panics
    /// When node, playwright-core or /usr/bin/chromium is missing, or the launch fails.
    pub fn start() -> Browser {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/browser_driver.js");
        let mut command = Command::new("node");
        command
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run node {} ({e}); install Node.js, Debian's chromium and \
                 playwright-core in tests/clients (scripts/test.sh does)",
                script.display()
            )
        });
        let stdin = child.stdin.take().expect("piped stdin");
        let (lines, stderr) = super::child_output(&mut child);
        let mut browser = Browser {
            child,
            stdin,
            lines,
            stderr,
            next_id: 1,
            base: String::new(),
        };
        let ready = browser.next_json(Instant::now() + LAUNCH_TIMEOUT, "the ready line");
        assert_eq!(ready["event"], "ready", "unexpected first line {ready}");
        browser.base = ready["base"].as_str().expect("base URL").to_string();
        eprintln!(
            "browser up: chromium {} serving {}",
            ready["chromium"], browser.base
        );
        browser
    }

    /// Sends `cmd` (a JSON object with `cmd`) and returns its `value`.
    ///
    /// # Panics
    /// When the command fails or no answer comes within `timeout`.
    pub fn call(&mut self, mut cmd: Value, timeout: Duration) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        let line = format!("{cmd}\n");
        if let Err(e) = self.stdin.write_all(line.as_bytes()) {
            panic!("writing to the browser driver: {e}\n{}", self.stderr_text());
        }
        let what = format!("the answer to {}", truncate(&cmd.to_string(), 300));
        let answer = self.next_json(Instant::now() + timeout, &what);
        assert_eq!(answer["id"], json!(id), "answer out of order: {answer}");
        if answer["ok"] != true {
            panic!(
                "browser command {} failed: {}\n--- driver stderr\n{}",
                truncate(&cmd.to_string(), 300),
                answer["error"].as_str().unwrap_or("?"),
                self.stderr_text()
            );
        }
        answer["value"].clone()
    }

    /// Opens `path` (relative to [`Browser::base`]) in a fresh tab.
    pub fn open(&mut self, path: &str) {
        self.call(
            json!({"cmd": "open", "path": path}),
            Duration::from_secs(30),
        );
    }

    /// Evaluates a JavaScript expression in the page.
    pub fn eval(&mut self, expr: &str) -> Value {
        self.call(
            json!({"cmd": "eval", "expr": expr}),
            Duration::from_secs(30),
        )
    }

    /// Waits until `expr` is truthy in the page (at most `timeout`); returns its value.
    pub fn wait(&mut self, expr: &str, timeout: Duration) -> Value {
        let ms = timeout.as_millis() as u64;
        self.call(
            json!({"cmd": "wait", "expr": expr, "timeout": ms}),
            timeout + Duration::from_secs(15),
        )
    }

    /// Saves a PNG of the whole page to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        self.call(
            json!({"cmd": "screenshot", "path": path.to_str().expect("utf-8 path")}),
            Duration::from_secs(30),
        );
    }

    /// An HS256 token for `sub` that expires in an hour, signed by the driver.
    pub fn token_for(&mut self, secret: &str, sub: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        self.sign(secret, json!({"sub": sub, "exp": exp}))
    }

    /// An HS256 JWT over `claims`, signed by node's crypto (independent of ringcast).
    pub fn sign(&mut self, secret: &str, claims: Value) -> String {
        self.call(
            json!({"cmd": "sign", "secret": secret, "claims": claims}),
            Duration::from_secs(10),
        )
        .as_str()
        .expect("token string")
        .to_string()
    }

    /// Asserts no page threw an uncaught error.
    pub fn assert_no_page_errors(&mut self) {
        let errors = self.call(json!({"cmd": "errors"}), Duration::from_secs(10));
        assert_eq!(
            errors,
            json!([]),
            "uncaught errors in the page\n--- driver stderr\n{}",
            self.stderr_text()
        );
    }

    /// What the driver and the pages' consoles printed.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn next_json(&mut self, deadline: Instant, what: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!(
                    "browser driver printed {line:?} ({e})\n{}",
                    self.stderr_text()
                )
            }),
            Err(RecvTimeoutError::Timeout) => panic!(
                "timed out waiting for {what} from the browser driver\n--- driver stderr\n{}",
                self.stderr_text()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(200)); // let stderr drain
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "the browser driver ended (status {status:?}) before {what}\n--- driver stderr\n{}",
                    self.stderr_text()
                )
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.stdin.write_all(b"{\"cmd\":\"quit\"}\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Percent-encodes a query value (for page URLs carrying ws:// URLs and tokens).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
