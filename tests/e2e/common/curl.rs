//! curl as an independent HTTP client (`-s`; callers bound every run with `--max-time`).
//! A missing curl fails the test with what to install.

use std::process::{Child, Command, Output, Stdio};

use super::server;

/// A curl command with `args`, its output piped, killed with the test process.
pub fn curl_command(args: &[&str]) -> Command {
    let mut command = Command::new("curl");
    command
        .arg("-s")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    server::die_with_parent(&mut command);
    command
}

/// Runs curl with `args` to the end.
pub fn curl(args: &[&str]) -> Output {
    curl_command(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}); install curl (scripts/test.sh does)"))
}

/// Runs curl with `args` to the end; what it wrote to stdout.
pub fn curl_text(args: &[&str]) -> String {
    String::from_utf8_lossy(&curl(args).stdout).into_owned()
}

/// Starts curl with `args` in the background.
pub fn curl_spawn(args: &[&str]) -> Child {
    curl_command(args)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}); install curl (scripts/test.sh does)"))
}
