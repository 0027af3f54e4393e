//! Shared plumbing of the end-to-end tests: free ports, real servers started as child
//! processes (baseline-tokio, ringcast, the Node `ws` broadcast server), and running the
//! harness binary with a time limit and reading its `--json` results.
//!
//! Every server is killed when its guard drops; every harness run is bounded.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod scale;

/// A child process killed on drop, with its output in a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to a log file.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let log = tmp_path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("creating a log file");
        let err = out.try_clone().expect("cloning the log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` holds; panics with the process output if it exits or times out.
    pub fn wait_ready(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut(&Proc) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            if ready(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before {what}; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not {what} within {limit:?}; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A unique path in the temp dir.
pub fn tmp_path(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "ringcast-load-test-{}-{n}-{name}",
        std::process::id()
    ))
}

/// A TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    l.local_addr().expect("local addr").port()
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("binding UDP port 0");
    s.local_addr().expect("local addr").port()
}

/// The workspace root (parent of `loadtest/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Starts baseline-tokio on free ports; returns it with (ws port, udp port).
pub fn start_baseline() -> (Proc, u16, u16) {
    let bin = baseline_bin();
    let (ws, udp) = (free_tcp_port(), free_udp_port());
    let mut proc = Proc::spawn(
        "baseline-tokio",
        Command::new(&bin)
            .arg("--listen")
            .arg(format!("127.0.0.1:{ws}"))
            .arg("--udp")
            .arg(format!("127.0.0.1:{udp}")),
    );
    proc.wait_ready("ready", Duration::from_secs(10), |p| {
        p.output().contains("baseline-tokio ready")
    });
    (proc, ws, udp)
}

/// The baseline-tokio binary: `BASELINE_TOKIO_BIN`, else next to this test's target dir,
/// else built now with the same cargo, profile and target dir.
fn baseline_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("BASELINE_TOKIO_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/<profile>/deps/<test>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("profile dir")
        .to_owned();
    let bin = profile_dir.join("baseline-tokio");
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "baseline-tokio", "--bin", "baseline-tokio"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build -p baseline-tokio");
        assert!(status.success(), "cargo build -p baseline-tokio failed");
    }
    assert!(
        bin.exists(),
        "baseline-tokio not found at {}",
        bin.display()
    );
    bin
}

/// A running ringcast server and its ports.
pub struct Ringcast {
    pub proc: Proc,
    pub ws: u16,
    pub udp: u16,
    pub tcp: u16,
    pub admin: u16,
}

/// The ringcast binary: `RINGCAST_BIN`, else target/release, else target/debug. Panics
/// (the test fails, it is never skipped) when there is none.
pub fn ringcast_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("RINGCAST_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "RINGCAST_BIN={} does not exist",
            path.display()
        );
        return path;
    }
    let root = workspace();
    for profile in ["release", "debug"] {
        let bin = root.join("target").join(profile).join("ringcast");
        if bin.exists() {
            return bin;
        }
    }
    panic!(
        "no ringcast binary: set RINGCAST_BIN, or build it first \
         (`cargo build --release --bin ringcast` puts it at {}/target/release/ringcast)",
        root.display()
    );
}

/// Starts ringcast with two shards on free ports, plus `extra` flags; waits for /healthz.
pub fn start_ringcast(extra: &[&str]) -> Ringcast {
    let bin = ringcast_bin();
    let (ws, udp, tcp, admin) = (
        free_tcp_port(),
        free_udp_port(),
        free_tcp_port(),
        free_tcp_port(),
    );
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let mut proc = Proc::spawn(
        "ringcast",
        Command::new(&bin)
            .args([
                "--listen",
                &addr(ws),
                "--udp-ingest",
                &addr(udp),
                "--tcp-ingest",
                &addr(tcp),
            ])
            .args(["--admin", &addr(admin), "--shards", "2"])
            .args(extra),
    );
    proc.wait_ready("healthy", Duration::from_secs(20), |_| {
        http_status(admin, "GET", "/healthz") == Some(200)
    });
    Ringcast {
        proc,
        ws,
        udp,
        tcp,
        admin,
    }
}

/// The sum of every sample of metric `name` (any labels) in ringcast's `/metrics` on
/// 127.0.0.1:`port`; 0 when absent.
pub fn metric_sum(port: u16, name: &str) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the admin port");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("GET /metrics");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading /metrics");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let bare = key.split('{').next()?;
            (bare == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Status of a one-shot HTTP request to 127.0.0.1:`port`, if anything answered.
pub fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Starts the Node `ws` broadcast server (installing `ws` first if needed); returns it with
/// (ws port, udp port). Fails loudly when node or npm are missing.
pub fn start_node() -> (Proc, u16, u16) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    for tool in ["node", "npm"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "`{tool}` is required for this test (the Node `ws` broadcast server) but is not on PATH"
        );
    }
    if !dir.join("node_modules/ws").exists() {
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("running npm install");
        assert!(status.success(), "npm install in {} failed", dir.display());
    }
    let (ws, udp) = (free_tcp_port(), free_udp_port());
    let mut proc = Proc::spawn(
        "node-broadcast",
        Command::new("node")
            .arg(dir.join("broadcast.js"))
            .arg(ws.to_string())
            .arg(udp.to_string()),
    );
    proc.wait_ready("ready", Duration::from_secs(15), |p| {
        p.output().contains("node-broadcast ready")
    });
    (proc, ws, udp)
}

/// What a harness run produced.
pub struct Outcome {
    pub status: ExitStatus,
    pub output: String,
    pub json: Option<Value>,
}

/// Runs `ringcast-load <args> --json <tmp>` and waits at most `limit`.
pub fn run_load(args: &[&str], limit: Duration) -> Outcome {
    let json_path = tmp_path("results.json");
    let mut proc = Proc::spawn(
        "ringcast-load",
        Command::new(env!("CARGO_BIN_EXE_ringcast-load"))
            .args(args)
            .arg("--json")
            .arg(&json_path),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = proc.child.try_wait().expect("waiting for ringcast-load") {
            break status;
        }
        if Instant::now() > deadline {
            panic!(
                "ringcast-load {args:?} ran longer than {limit:?}; output:\n{}",
                proc.output()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let _ = std::fs::remove_file(&json_path);
    Outcome {
        status,
        output: proc.output(),
        json,
    }
}

/// Runs the harness, requires success, returns the JSON results (and echoes the summary).
pub fn run_ok(args: &[&str]) -> Value {
    let out = run_load(args, Duration::from_secs(90));
    println!("{}", out.output);
    assert!(
        out.status.success(),
        "ringcast-load {args:?} failed ({}):\n{}",
        out.status,
        out.output
    );
    out.json.unwrap_or_else(|| {
        panic!(
            "no JSON results from ringcast-load {args:?}:\n{}",
            out.output
        )
    })
}

/// `v[a][b]…` as u64, panicking with the path when missing.
pub fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for key in path {
        cur = &cur[*key];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("results have no number at {path:?}: {cur}"))
}

/// Asserts the delivery section is exact: every expected delivery once, in order.
pub fn assert_exact(results: &Value, section: &str, subscribers: u64, messages: u64) {
    let d = &results[section];
    assert_eq!(
        num(results, &["publishing", "messages"]),
        messages,
        "messages published"
    );
    assert_eq!(num(d, &["subscribers"]), subscribers, "subscribers");
    assert_eq!(
        num(d, &["expected"]),
        subscribers * messages,
        "expected deliveries"
    );
    assert_eq!(
        num(d, &["received"]),
        num(d, &["expected"]),
        "received == expected"
    );
    assert_eq!(num(d, &["lost"]), 0, "lost");
    assert_eq!(num(d, &["duplicates"]), 0, "duplicates");
    assert_eq!(num(d, &["out_of_order"]), 0, "out of order");
    assert_eq!(num(d, &["offset_regressions"]), 0, "offset regressions");
    assert_eq!(
        num(d, &["latency_us", "count"]),
        subscribers * messages,
        "latency samples"
    );
}
