//! The Python clients in tests/clients (built on `websockets`, `PyJWT`), run to completion.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use serde_json::Value;

use super::server::die_with_parent;

/// What a script printed and how it ended.
pub struct ScriptRun {
    /// The script's file name.
    pub name: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Runs `python3 tests/clients/NAME ARGS...` with no stdin, killed if the test dies.
///
/// # Panics
/// When python3 cannot be started (the message says how to install what is missing).
pub fn run_script(name: &str, args: &[&str]) -> ScriptRun {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name);
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut command);
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run python3 {} ({e}); install python3 with websockets, PyJWT and \
             cryptography (scripts/test.sh does)",
            script.display()
        )
    });
    ScriptRun {
        name: name.to_string(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl ScriptRun {
    /// How it ended and everything it printed, for an assertion message.
    pub fn explain(&self) -> String {
        format!(
            "{} exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.name, self.status, self.stdout, self.stderr
        )
    }

    /// The JSON lines of its stdout.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Requires exit 0 and a `{"case": C, "ok": true}` line for each of `cases`; returns
    /// every JSON line. `context` (e.g. the server log) goes into a failure message.
    ///
    /// # Panics
    /// When a case is missing or failed, or the script did not exit 0.
    pub fn assert_cases(&self, cases: &[&str], context: &str) -> Vec<Value> {
        let explain = format!("{}\n--- context\n{context}", self.explain());
        let results = self.json_lines();
        for case in cases {
            let result = results
                .iter()
                .find(|r| r["case"] == *case)
                .unwrap_or_else(|| panic!("case {case} did not report\n{explain}"));
            assert_eq!(
                result["ok"], true,
                "case {case} failed: {}\n{explain}",
                result["error"]
            );
        }
        assert!(self.status.success(), "{explain}");
        results
    }

    /// Its one JSON summary line, after checking that it exited 0.
    ///
    /// # Panics
    /// When it did not exit 0 or printed no JSON.
    pub fn summary(&self) -> Value {
        assert!(self.status.success(), "{}", self.explain());
        self.json_lines()
            .pop()
            .unwrap_or_else(|| panic!("no JSON summary\n{}", self.explain()))
    }
}
