//! The `ringcast` binary: configuration, then shards, then run until drained;
//! `ringcast check-host` inspects the host instead (see [`ringcast::check_host`]).

use clap::Parser;
use ringcast::check_host;
use ringcast::config::{self, Command, ConfigLayer};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = ConfigLayer::parse();
    if let Some(Command::CheckHost { connections }) = cli.command {
        return check_host::run(connections);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match config::load(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringcast: {e}");
            return ExitCode::from(2);
        }
    };
    match ringcast::shard::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::FAILURE
        }
    }
}
