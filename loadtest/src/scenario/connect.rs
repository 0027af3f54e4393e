//! `connect`: ramp to N connections at `--rate`, hold them for `--hold` seconds.
//!
//! Answers "how many connections can this host take, how fast, and what do they cost":
//! achieved connect rate, handshake latency percentiles, failed attempts by cause,
//! connections the server closed during the hold (by close code), and with
//! `--server-pid` the server's RSS per connection.

use crate::cli::ConnectArgs;
use crate::report::Results;

use super::{Run, ScenarioError};

/// Runs the scenario.
///
/// # Errors
/// Setup failed, or no connection could be made.
pub fn run(args: &ConnectArgs) -> Result<Results, ScenarioError> {
    let mut run = Run::new("connect", &args.common, 1000)?;
    let specs = run.specs(None, false, 0.0);
    let mut fleet = run.connect(&specs)?;
    run.idle(&mut fleet, args.hold)?;
    let finals = fleet.finish(0, std::time::Duration::from_secs(30))?;
    run.probe.mark("drained");
    let mut results = run.results(&fleet, &finals);
    let closed: u64 = results.connections.close_codes.values().sum();
    if closed > 0 {
        run.problems.push(format!(
            "the server closed {closed} connections during the hold"
        ));
    }
    results.server = run.server_results(results.connections.connected, 0);
    run.emit(results)
}
