//! The `ringcast` binary: configuration, then shards, then run until drained;
//! `ringcast check-host` inspects the host instead (see [`ringcast::check_host`]), and
//! `ringcast config check|defaults` checks a file or prints every key's default.

use clap::Parser;
use ringcast::check_host;
use ringcast::config::{self, Command, ConfigAction, ConfigLayer, LogFormat};
use ringcast::config_tools;
use std::io::IsTerminal;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cli = match ConfigLayer::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap names the flag; a value from the environment is named by its variable.
            if let Some(message) = config_tools::explain_env_error(&e, &args) {
                eprintln!("ringcast: {message}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    match &cli.command {
        Some(Command::CheckHost { connections }) => {
            return check_host::run(&check_host_target(&cli, *connections))
        }
        Some(Command::Config {
            action: ConfigAction::Check { file },
        }) => {
            return match config_tools::check(file) {
                Ok(()) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringcast: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Config {
            action: ConfigAction::Defaults,
        }) => {
            print!("{}", config_tools::defaults_toml());
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    abort_on_panic();
    let reload_cli = cli.clone();
    let settings = match config::load(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringcast: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        git = env!("RINGCAST_GIT_REVISION"),
        "effective configuration (flags and environment over the file over the defaults; secrets redacted): {}",
        ringcast::server::startup_log::effective_settings(&settings)
    );
    match ringcast::server::run_reloadable(settings, reload_cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `check-host` checks for: the connection count, and the shards, io memory and
/// ports of the configuration the same flags, environment and `--config` file give (the
/// defaults when they do not load, said on stderr).
fn check_host_target(cli: &ConfigLayer, connections: u64) -> check_host::Target {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get() as u64);
    let mut layer = cli.clone();
    layer.command = None;
    match config::load(layer) {
        Ok(s) => {
            let mut ports: Vec<u16> = [Some(s.listen), s.udp_ingest, s.tcp_ingest, Some(s.admin)]
                .into_iter()
                .flatten()
                .map(|a| a.port())
                .filter(|&p| p != 0)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            check_host::Target {
                connections,
                shards: s.shards as u64,
                io_memory: s.io_memory as u64,
                ports,
                ws_port: s.listen.port(),
            }
        }
        Err(e) => {
            eprintln!("ringcast check-host: configuration not loaded ({e}); checking the defaults");
            check_host::Target::defaults(connections, cpus)
        }
    }
}

/// Log lines to stderr, filtered by `RINGCAST_LOG` (default `info`); colour only when
/// stderr is a terminal and `NO_COLOR` is unset.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
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
