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
use crate::limits::{self, LimitError};
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

/// One node the subscribers connect to (the `--url`, or each of `--targets`).
pub struct Node {
    /// Subscriber endpoint.
    pub target: WsTarget,
    /// Source addresses of its connections (empty: the kernel's choice).
    pub sources: Vec<IpAddr>,
    /// Subscribers to open there.
    pub conns: u64,
    /// Its workers' connection counts.
    per_worker: Vec<u64>,
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
    /// Where they connect: one node, or every node of `--targets`.
    pub nodes: Vec<Node>,
    /// Distinct source addresses over all nodes.
    sources: usize,
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
        let conns = common.connections.unwrap_or(default_conns);
        let fds = limits::raise_nofile();
        let specs = target::read_targets(&common.targets)?;
        let multi = !specs.is_empty();
        let specs = if multi {
            specs
        } else {
            vec![target::NodeSpec {
                url: common.url.clone(),
                sources: Vec::new(),
            }]
        };
        let k = specs.len() as u64;
        let mut nodes = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let mut target = target::parse_ws(&spec.url)?;
            target::check_local(&spec.url, target.addr, common.allow_remote)?;
            if common.transport == Transport::Sse {
                if name == "recover" {
                    return Err(ScenarioError::Invalid(
                        "--transport sse does not apply to `recover` (it subscribes by command)"
                            .into(),
                    ));
                }
                target.path = target::sse_path(&target.path);
            }
            let node_conns = conns / k + u64::from((i as u64) < conns % k);
            let explicit = if spec.sources.is_empty() {
                &common.source_ips
            } else {
                &spec.sources
            };
            // A loopback-range node that is not an address of this host (a network
            // namespace behind a bridge) is reached from its route's source address:
            // 127.0.0.x sources would not route back.
            let sources = if multi && explicit.is_empty() && !target::is_local_ip(target.addr.ip())
            {
                Vec::new()
            } else {
                limits::source_ips(target.addr, explicit, common.source_count)
            };
            let workers = common.workers.map(|w| w.div_ceil(k));
            let max = if multi { u64::MAX } else { common.max_workers };
            let plan =
                limits::plan_workers(node_conns, common.conns_per_worker, workers, max, fds)?;
            nodes.push(Node {
                target,
                sources,
                conns: node_conns,
                per_worker: plan.per_worker,
            });
        }
        let total_workers: usize = nodes.iter().map(|n| n.per_worker.len()).sum();
        if total_workers as u64 > common.max_workers {
            return Err(LimitError::TooManyWorkers {
                conns,
                workers: total_workers as u64,
                per_worker: common
                    .conns_per_worker
                    .clamp(1, fds.0.saturating_sub(64).max(1)),
                limit: fds.0,
                max: common.max_workers,
            }
            .into());
        }
        let mut distinct: Vec<IpAddr> = nodes.iter().flat_map(|n| n.sources.clone()).collect();
        distinct.sort();
        distinct.dedup();
        let sources = distinct.len();
        let busiest = nodes.iter().map(|n| n.conns).max().unwrap_or(0);
        let fewest_sources = nodes.iter().map(|n| n.sources.len()).min().unwrap_or(0);
        let warnings = limits::port_warning(busiest, fewest_sources.max(1))
            .into_iter()
            .chain(limits::file_max_warning(conns))
            .collect();
        let target = nodes[0].target.clone();
        let probe = Probe::new(&common.server_pid)?;
        Ok(Run {
            name,
            common: common.clone(),
            target,
            conns,
            nodes,
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
        let workers = self.worker_nodes().len() as f64;
        let mut first = 0;
        let lifetime_ms = (self.common.timeout * 1000.0) as u64 + 30_000;
        let mut specs = Vec::new();
        for node in &self.nodes {
            // `recover` rewrites `self.target` (channels dropped); with one node it is the
            // node's target.
            let target = if self.nodes.len() == 1 {
                &self.target
            } else {
                &node.target
            };
            for &conns in &node.per_worker {
                specs.push(WorkerSpec {
                    id: specs.len(),
                    target: target.addr,
                    host: target.host.clone(),
                    path: target.path.clone(),
                    first_index: first,
                    conns,
                    rate: self.common.rate / workers,
                    max_pending: self.common.max_pending,
                    connect_timeout_ms: (self.common.connect_timeout * 1000.0) as u64,
                    source_ips: node.sources.clone(),
                    slow: slow.clone(),
                    reconnect,
                    reconnect_rate: reconnect_rate / workers,
                    lifetime_ms,
                    recover: None,
                    sse: self.common.transport == Transport::Sse,
                });
                first += conns;
            }
        }
        specs
    }

    /// The node of each worker, in worker order.
    fn worker_nodes(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| std::iter::repeat_n(i, n.per_worker.len()))
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
            let conn = report::connections(&finals, self.conns, self.sources);
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

    /// The publish endpoints (`--publish` may list several, comma separated: each message
    /// goes to all) and the channel for `args`.
    ///
    /// # Errors
    /// A bad or non-loopback publish URL.
    pub fn publish_target(
        &self,
        args: &PublishArgs,
    ) -> Result<(Vec<PublishTarget>, String), ScenarioError> {
        let mut publish = Vec::new();
        for url in target::split_list(&args.publish) {
            let endpoint = target::parse_publish(&url, &self.target)?;
            target::check_local(&url, endpoint.addr(), self.common.allow_remote)?;
            publish.push(endpoint);
        }
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
        let connections = report::connections(finals, self.conns, self.sources);
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
            targets: self.per_target(finals),
            warnings: std::mem::take(&mut self.warnings),
            ..Results::default()
        }
    }

    /// Per-node numbers of a `--targets` run (None with a single `--url`).
    fn per_target(&self, finals: &[WorkerFinal]) -> Option<Vec<report::TargetResults>> {
        if self.common.targets.is_empty() {
            return None;
        }
        let mut out: Vec<report::TargetResults> = self
            .nodes
            .iter()
            .map(|n| report::TargetResults {
                url: n.target.url.clone(),
                requested: n.conns,
                workers: n.per_worker.len(),
                source_ips: n.sources.iter().map(ToString::to_string).collect(),
                ..report::TargetResults::default()
            })
            .collect();
        for (node, f) in self.worker_nodes().into_iter().zip(finals) {
            let t = &mut out[node];
            t.connected += f.healthy.subscribers + f.slow.subscribers;
            t.open_at_end += f.open_at_end;
            t.failed += f.failures.values().sum::<u64>();
            t.received += f.healthy.seq.received + f.slow.seq.received;
        }
        Some(out)
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
