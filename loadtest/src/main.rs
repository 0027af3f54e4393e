//! `ringcast-load`: the load harness SREs use to prove a host running ringcast (or any
//! WebSocket broadcast server).
//!
//! Scenarios (`connect`, `fanout`, `latency`, `storm`, `slow`, `recover`) open many subscriber
//! sockets from several worker processes and 127.0.0.x source addresses, publish
//! numbered, timestamped messages, and account for every delivery. Results are printed as
//! a table and optionally written as JSON (`--json`) and an SVG plot (`--plot`). See
//! `docs/loadtest.md` for flags, the JSON schema and host tuning.
//!
//! # Layout
//! - `cli`: flags. `target`: URLs and the loopback guard. `limits`: fds, workers, sources.
//! - `wsproto`, `seq`, `recover`: pure WebSocket client codec, delivery accounting, and
//!   the subscribe/recovery conversation of scenario `recover`.
//! - `worker/`: the mio event loop of one worker process (`conn`, `schedule`, `record`).
//! - `ipc`: parent ↔ worker JSON lines. `fleet`: the parent's side of the workers.
//! - `publish`: the publisher thread. `procstat`: server CPU/RSS from /proc.
//! - `scenario/`: the six scripts. `report`, `summary`, `plot`, `stats`: results and
//!   their forms.

mod cli;
mod fleet;
mod ipc;
mod limits;
mod plot;
mod procstat;
mod publish;
mod recover;
mod report;
mod scenario;
mod seq;
mod sseproto;
mod stats;
mod summary;
mod target;
mod worker;
mod wsproto;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Scenario};

/// Exit status of a run that completed but found problems (1 is an error that stopped the
/// run, 2 a usage error).
const EXIT_PROBLEMS: u8 = 3;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Outcome::Clean) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Problems(n)) => {
            eprintln!(
                "ringcast-load: {n} problem(s) found (see PROBLEM lines; --exit-zero to exit 0)"
            );
            std::process::ExitCode::from(EXIT_PROBLEMS)
        }
        Err(err) => {
            eprintln!("ringcast-load: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a run that did not fail outright ended.
enum Outcome {
    /// No problems, or `--exit-zero`.
    Clean,
    /// This many problems were reported.
    Problems(usize),
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let (name, exit_zero, result) = match cli.scenario {
        Scenario::Worker => {
            worker::run().context("worker process")?;
            return Ok(Outcome::Clean);
        }
        Scenario::Connect(a) => ("connect", a.common.exit_zero, scenario::connect::run(&a)),
        Scenario::Fanout(a) => (
            "fanout",
            a.common.exit_zero,
            scenario::fanout::run_fanout(&a),
        ),
        Scenario::Latency(a) => (
            "latency",
            a.common.exit_zero,
            scenario::fanout::run_latency(&a),
        ),
        Scenario::Storm(a) => ("storm", a.common.exit_zero, scenario::storm::run(&a)),
        Scenario::Slow(a) => ("slow", a.common.exit_zero, scenario::slow::run(&a)),
        Scenario::Recover(a) => ("recover", a.common.exit_zero, scenario::recover::run(&a)),
    };
    let results = result.with_context(|| format!("scenario {name}"))?;
    Ok(if results.problems.is_empty() || exit_zero {
        Outcome::Clean
    } else {
        Outcome::Problems(results.problems.len())
    })
}
