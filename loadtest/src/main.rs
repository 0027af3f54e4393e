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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringcast-load: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (name, result) = match cli.scenario {
        Scenario::Worker => return worker::run().context("worker process"),
        Scenario::Connect(args) => ("connect", scenario::connect::run(&args)),
        Scenario::Fanout(args) => ("fanout", scenario::fanout::run_fanout(&args)),
        Scenario::Latency(args) => ("latency", scenario::fanout::run_latency(&args)),
        Scenario::Storm(args) => ("storm", scenario::storm::run(&args)),
        Scenario::Slow(args) => ("slow", scenario::slow::run(&args)),
        Scenario::Recover(args) => ("recover", scenario::recover::run(&args)),
    };
    result.with_context(|| format!("scenario {name}"))?;
    Ok(())
}
