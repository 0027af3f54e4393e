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
    abort_on_panic();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let reload_cli = cli.clone();
    let settings = match config::load(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringcast: {e}");
            return ExitCode::from(2);
        }
    };
    match ringcast::shard::run_reloadable(settings, reload_cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes a panic on any thread end the process, whatever the build profile (release
/// already builds with `panic = "abort"`): a shard thread that unwound away would leave
/// the rest answering `/healthz` 200 while its connections hang. The default hook still
/// prints the message and location first.
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}
