//! What every scenario shares: checking the target, planning workers, connecting,
//! publishing and draining, server sampling, and turning worker reports into [`Results`].
//!
//! A scenario is a straight-line script over a [`Run`] and a [`Fleet`]; every wait in it is
//! bounded by the run's global `--timeout` deadline, so a run always ends by itself.

pub mod connect;
pub mod fanout;
pub mod recover;
pub mod slow;
pub mod storm;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::{Common, PublishArgs, Transport};
use crate::fleet::{Fleet, FleetError, Live};
use crate::ipc::{self, SlowSpec, WorkerFinal, WorkerSpec};
use crate::limits::{self, LimitError, WorkerPlan};
use crate::procstat::ProcError;
use crate::publish::PublishError;
use crate::report::{self, ClientResults, Results};
use crate::target::{self, PublishTarget, UrlError, WsTarget};

mod probe;
mod waits;
pub use probe::Probe;
pub use waits::{delivery_problems, delivery_window, merge_groups};

/// Why a scenario could not run or finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// A URL is unusable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The load does not fit this box.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// Worker processes failed.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The publisher failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The server could not be sampled.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// Not a single subscriber connected.
    #[error("no connection to {url} succeeded ({attempts} attempts: {causes}){hint}")]
    NoConnections {
        /// Target URL.
        url: String,
        /// Failed attempts.
        attempts: u64,
        /// Failure causes with counts.
        causes: String,
        /// Advice for the most common cause.
        hint: String,
    },
    /// A flag value makes no sense.
    #[error("invalid option: {0}")]
    Invalid(String),
    /// Writing an output file failed.
    #[error("writing {path}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// One run of a scenario: its target, worker plan, deadline and server probe.
pub struct Run {
    /// Scenario name.
    pub name: &'static str,
    /// Shared options.
    pub common: Common,
    /// Subscriber endpoint.
    pub target: WsTarget,
    /// Subscribers to open.
    pub conns: u64,
    plan: WorkerPlan,
    sources: Vec<IpAddr>,
    started: Instant,
    started_ms: u64,
    /// No wait goes past this.
    pub deadline: Instant,
    /// Server CPU/RSS sampling.
    pub probe: Probe,
    /// Warnings collected on the way.
    pub warnings: Vec<String>,
    /// Problems collected on the way.
    pub problems: Vec<String>,
    /// A phase hit the deadline.
    pub timed_out: bool,
    /// Failed attempts are part of the scenario (a restarting server refuses for a
    /// while): report them as a warning, not a problem.
    pub failures_expected: bool,
}

impl Run {
    /// Checks the options and target and plans the workers.
    ///
    /// # Errors
    /// Bad URL, non-loopback target, bad option values, fd limit, unreadable server pid.
    pub fn new(
        name: &'static str,
        common: &Common,
        default_conns: u64,
    ) -> Result<Run, ScenarioError> {
        let mut target = target::parse_ws(&common.url)?;
        target::check_local(&common.url, target.addr, common.allow_remote)?;
        if common.transport == Transport::Sse {
            if name == "recover" {
                return Err(ScenarioError::Invalid(
                    "--transport sse does not apply to `recover` (it subscribes by command)".into(),
                ));
            }
            target.path = target::sse_path(&target.path);
        }
        if !(common.rate >= 0.0 && common.connect_timeout > 0.0 && common.timeout > 0.0) {
            return Err(ScenarioError::Invalid(
                "--rate must be >= 0, --connect-timeout and --timeout > 0".into(),
            ));
        }
        let conns = common.connections.unwrap_or(default_conns);
        let fds = limits::raise_nofile();
        let plan = limits::plan_workers(
            conns,
            common.conns_per_worker,
            common.workers,
            common.max_workers,
            fds,
        )?;
        let sources = limits::source_ips(target.addr, &common.source_ips, common.source_count);
        let warnings = limits::system_warnings(conns, sources.len().max(1));
        let probe = Probe::new(common.server_pid)?;
        Ok(Run {
            name,
            common: common.clone(),
            target,
            conns,
            plan,
            sources,
            started: Instant::now(),
            started_ms: ipc::unix_ms(),
            deadline: Instant::now() + Duration::from_secs_f64(common.timeout),
            probe,
            warnings,
            problems: Vec::new(),
            timed_out: false,
            failures_expected: false,
        })
    }

    /// Worker specs for this run.
    pub fn specs(
        &self,
        slow: Option<SlowSpec>,
        reconnect: bool,
        reconnect_rate: f64,
    ) -> Vec<WorkerSpec> {
        let workers = self.plan.per_worker.len() as f64;
        let mut first = 0;
        let lifetime_ms = (self.common.timeout * 1000.0) as u64 + 30_000;
        self.plan
            .per_worker
            .iter()
            .enumerate()
            .map(|(id, &conns)| {
                let spec = WorkerSpec {
                    id,
                    target: self.target.addr,
                    host: self.target.host.clone(),
                    path: self.target.path.clone(),
                    first_index: first,
                    conns,
                    rate: self.common.rate / workers,
                    max_pending: self.common.max_pending,
                    connect_timeout_ms: (self.common.connect_timeout * 1000.0) as u64,
                    source_ips: self.sources.clone(),
                    slow: slow.clone(),
                    reconnect,
                    reconnect_rate: reconnect_rate / workers,
                    lifetime_ms,
                    recover: None,
                    sse: self.common.transport == Transport::Sse,
                };
                first += conns;
                spec
            })
            .collect()
    }

    /// Starts the workers and waits until every subscriber connected or failed.
    ///
    /// # Errors
    /// Workers failed to start, or not one subscriber could connect.
    pub fn connect(&mut self, specs: &[WorkerSpec]) -> Result<Fleet, ScenarioError> {
        self.probe.mark("before");
        let mut fleet = Fleet::spawn(specs, self.name)?;
        if !fleet.wait_until(self.deadline, Live::ramp_done)? {
            self.timeout("connecting");
        }
        if fleet.live.open() == 0 && self.conns > 0 {
            let finals = fleet.finish(0, Duration::from_secs(10))?;
            let conn = report::connections(&finals, self.conns, self.sources.len());
            let hint = match conn.failures.iter().max_by_key(|(_, n)| **n) {
                Some((cause, _)) if cause == "refused" => format!(
                    "; connection refused by {}: is the server running and listening there?",
                    self.target.addr
                ),
                Some((cause, _)) if cause.ends_with("timeout") => {
                    format!("; nothing answered at {} in time", self.target.addr)
                }
                _ => String::new(),
            };
            let causes = conn
                .failures
                .iter()
                .map(|(c, n)| format!("{n}× {c}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ScenarioError::NoConnections {
                url: self.target.url.clone(),
                attempts: conn.failed,
                causes,
                hint,
            });
        }
        self.probe.mark("connected");
        Ok(fleet)
    }

    /// The publish endpoint and channel for `args`.
    ///
    /// # Errors
    /// A bad or non-loopback publish URL.
    pub fn publish_target(
        &self,
        args: &PublishArgs,
    ) -> Result<(PublishTarget, String), ScenarioError> {
        let publish = target::parse_publish(&args.publish, &self.target)?;
        target::check_local(&args.publish, publish.addr(), self.common.allow_remote)?;
        let channel = args
            .channel
            .clone()
            .or_else(|| self.target.channel())
            .unwrap_or_else(|| "bench".into());
        Ok((publish, channel))
    }

    /// Records that a phase hit the global deadline.
    pub fn timeout(&mut self, phase: &str) {
        self.timed_out = true;
        self.problems.push(format!(
            "--timeout {}s reached while {phase}",
            self.common.timeout
        ));
    }

    /// Server ratios from the probe, with warnings where the samples cannot be trusted.
    pub fn server_results(
        &mut self,
        connected: u64,
        deliveries: u64,
    ) -> Option<report::ServerResults> {
        let out = self.probe.results(connected, deliveries)?;
        if out.rss_per_connection_bytes < 0.0 {
            self.warnings.push(
                "server RSS fell while connecting (memory kept from earlier runs was reused); \
                 restart the server for a clean bytes-per-connection figure"
                    .into(),
            );
        }
        if !self.probe.missed.is_empty() {
            self.warnings.push(format!(
                "server samples missed at {:?} (did the process exit?)",
                self.probe.missed
            ));
        }
        Some(out)
    }

    /// The parts of [`Results`] every scenario fills the same way.
    pub fn results(&mut self, fleet: &Fleet, finals: &[WorkerFinal]) -> Results {
        let connections = report::connections(finals, self.conns, self.sources.len());
        if connections.failed > 0 {
            let causes = connections
                .failures
                .iter()
                .map(|(c, n)| format!("{n}× {c}"))
                .collect::<Vec<_>>();
            let list = if self.failures_expected {
                &mut self.warnings
            } else {
                &mut self.problems
            };
            list.push(format!(
                "{} failed connection attempts: {}",
                connections.failed,
                causes.join(", ")
            ));
        }
        if connections.connected < self.conns {
            self.problems.push(format!(
                "only {} of {} subscribers connected",
                connections.connected, self.conns
            ));
        }
        let worker_cpu_secs = finals.iter().map(|f| f.cpu_secs).sum();
        Results {
            schema: "ringcast-load/1",
            scenario: self.name.into(),
            url: self.target.url.clone(),
            started_unix_ms: self.started_ms,
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            completed: !self.timed_out,
            connections,
            client: ClientResults { worker_cpu_secs },
            timeline: report::timeline(&fleet.live),
            timeline_secs: fleet.live.last_report_secs,
            warnings: std::mem::take(&mut self.warnings),
            ..Results::default()
        }
    }

    /// Prints the summary and writes `--json` / `--plot`.
    ///
    /// # Errors
    /// An output file could not be written.
    pub fn emit(&mut self, mut results: Results) -> Result<Results, ScenarioError> {
        results.problems.append(&mut self.problems);
        results.warnings.append(&mut self.warnings);
        print!("{}", crate::summary::table(&results));
        if let Some(path) = &self.common.json {
            let text =
                serde_json::to_string_pretty(&results).map_err(|e| output_err(path, e.into()))?;
            std::fs::write(path, text + "\n").map_err(|e| output_err(path, e))?;
        }
        if let Some(path) = &self.common.plot {
            std::fs::write(path, crate::plot::svg(&results)).map_err(|e| output_err(path, e))?;
        }
        Ok(results)
    }
}

fn output_err(path: &Path, source: std::io::Error) -> ScenarioError {
    ScenarioError::Output {
        path: path.to_owned(),
        source,
    }
}
