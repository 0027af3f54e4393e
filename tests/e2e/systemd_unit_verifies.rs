//! kernel-tuning/ringcast.service passes systemd's own offline checks. systemd is not PID
//! 1 where the tests run, so the unit is never started here; what can be checked without
//! a running manager is:
//!
//! - `systemd-analyze verify`: every key known and every value parsed, the `ExecStart=`
//!   binary executable (the unit's `/usr/local/bin/ringcast` is replaced by the binary
//!   under test in a copy), with no warning at all. A copy with a misspelt key and a bad
//!   value shows the check is not silently passing;
//! - `systemd-analyze security --offline=true`: the sandbox scores at most 1.5 ("OK"),
//!   as the unit's comment and kernel-tuning/README.md say.
//!
//! docs/operations.md (*Running under systemd*) lists what is and is not verified.
//! `systemd-analyze` comes with Debian's `systemd` package (scripts/test.sh installs it);
//! a missing one fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// The unit with its binary path pointed at the binary under test, written as
/// `dir/ringcast.service` (systemd names the unit after its file).
fn unit_copy(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernel-tuning/ringcast.service");
    let text = std::fs::read_to_string(&shipped)
        .unwrap_or_else(|e| panic!("reading {}: {e}", shipped.display()));
    assert!(
        text.contains("ExecStart=/usr/local/bin/ringcast "),
        "the unit no longer starts /usr/local/bin/ringcast; update this test"
    );
    let binary = Server::binary()
        .canonicalize()
        .expect("the ringcast binary under test exists (cargo build --release)");
    let text = text.replace(
        "ExecStart=/usr/local/bin/ringcast ",
        &format!("ExecStart={} ", binary.display()),
    );
    let path = dir.join("ringcast.service");
    std::fs::write(&path, edit(text)).expect("writing the unit copy");
    path
}

/// Runs `systemd-analyze ARGS`; returns its exit success and everything it printed.
fn analyze(args: &[&str], unit: &Path) -> (bool, String) {
    run_tool(
        Command::new("systemd-analyze").args(args).arg(unit),
        "systemd",
    )
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_a_warning() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_copy(dir.path(), |t| t);
    let (ok, printed) = analyze(&["verify"], &unit);
    assert!(
        ok && printed.trim().is_empty(),
        "systemd-analyze verify kernel-tuning/ringcast.service (exit ok: {ok}):\n{printed}"
    );
}

#[test]
fn systemd_analyze_verify_reports_a_broken_unit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_copy(dir.path(), |t| {
        t.replace("TimeoutStopSec=90", "TimeoutStopSex=90")
            .replace("ProtectSystem=strict", "ProtectSystem=strictly")
    });
    let (_, printed) = analyze(&["verify"], &unit);
    assert!(
        printed.contains("Unknown key 'TimeoutStopSex'") && printed.contains("strictly"),
        "verify did not report a misspelt key and a bad value:\n{printed}"
    );
}

#[test]
fn systemd_analyze_security_scores_the_sandbox_ok() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_copy(dir.path(), |t| t);
    // --threshold is the exposure × 10: exit non-zero above 1.5.
    let (ok, printed) = analyze(&["security", "--offline=true", "--threshold=15"], &unit);
    let overall = printed
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no overall line)");
    println!("{overall}");
    assert!(
        ok,
        "systemd-analyze security scores the unit above 1.5: {overall}\n{printed}"
    );
}
