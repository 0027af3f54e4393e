//! The parent's side of the worker processes: start them, follow their ticks, tell them
//! what to do next, collect their final reports.
//!
//! Ticks are folded into [`Live`]: running totals, the latest gauges of each worker, and
//! one [`Bucket`] per second of the run (the timeline behind the plot and the JSON). While
//! stderr is a terminal a one-line progress display is redrawn four times a second.
//! Dropping a [`Fleet`] kills any worker still running (by its pid; they are our children).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::ipc::{Command, Tick, WorkerFinal, WorkerMsg, WorkerSpec};
use crate::stats::{self, human_count, human_us, Percentiles};

/// A worker could not be started or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Starting a worker process failed.
    #[error("starting worker process {id}")]
    Spawn {
        /// Worker number.
        id: usize,
        /// The error.
        source: std::io::Error,
    },
    /// A worker exited before its final report.
    #[error("worker process {id} exited unexpectedly; see its messages above")]
    Died {
        /// Worker number.
        id: usize,
    },
    /// A worker reported a fatal error.
    #[error("worker process {id}: {error}")]
    Fatal {
        /// Worker number.
        id: usize,
        /// Its message.
        error: String,
    },
    /// Final reports did not arrive in time.
    #[error("worker processes did not report back within {0:?}")]
    Timeout(Duration),
}

enum Line {
    Msg(WorkerMsg),
    Eof,
}

/// One second of the run, summed over all workers.
pub struct Bucket {
    /// Connections open at the end of the second.
    pub open: u64,
    /// Handshakes completed.
    pub connects: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Connections ended by the server.
    pub closes: u64,
    /// Deliveries to healthy subscribers.
    pub deliveries: u64,
    /// Healthy delivery latency.
    pub latency: Histogram<u64>,
    /// Worker reports that landed in this second (0: the second has no samples at all).
    pub reports: u64,
}

/// Running view of the whole fleet.
pub struct Live {
    /// When the fleet started.
    pub started: Instant,
    /// Latest tick of each worker (gauges are current; counters are the last delta).
    pub last: Vec<Tick>,
    /// Handshakes completed so far.
    pub connects: u64,
    /// Failed attempts so far.
    pub failures: u64,
    /// Server-side endings so far.
    pub closes: u64,
    /// Healthy deliveries so far.
    pub deliveries: u64,
    /// Slow deliveries so far.
    pub slow_deliveries: u64,
    /// Per-second timeline.
    pub timeline: Vec<Bucket>,
    /// Seconds from `started` to the last report absorbed: the timeline ends there.
    pub last_report_secs: f64,
}

impl Live {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.last.iter().map(|t| t.open).sum()
    }

    /// `recover`: subscribers that have their first position.
    pub fn subscribed(&self) -> u64 {
        self.last.iter().map(|t| t.subscribed).sum()
    }

    /// `recover`: subscribers answered since the drop.
    pub fn resubscribed(&self) -> u64 {
        self.last.iter().map(|t| t.resubscribed).sum()
    }

    /// Every worker finished its initial ramp.
    pub fn ramp_done(&self) -> bool {
        self.last.iter().all(|t| t.ramp_done)
    }

    /// Earliest `down_at_ms` and latest `back_at_ms` over all workers (storms).
    pub fn outage(&self) -> (Option<u64>, Option<u64>) {
        let down = self.last.iter().filter_map(|t| t.down_at_ms).min();
        let back = self
            .last
            .iter()
            .map(|t| t.back_at_ms)
            .collect::<Option<Vec<_>>>();
        (down, back.and_then(|b| b.into_iter().max()))
    }

    fn absorb(&mut self, worker: usize, tick: Tick) {
        let elapsed = self.started.elapsed();
        self.last_report_secs = elapsed.as_secs_f64();
        let second = elapsed.as_secs() as usize;
        while self.timeline.len() <= second {
            self.timeline.push(Bucket {
                open: 0,
                connects: 0,
                failures: 0,
                closes: 0,
                deliveries: 0,
                latency: stats::new_hist(),
                reports: 0,
            });
        }
        self.connects += tick.connects;
        self.failures += tick.failures;
        self.closes += tick.closes;
        self.deliveries += tick.deliveries;
        self.slow_deliveries += tick.slow_deliveries;
        self.last[worker] = tick;
        let open = self.open();
        let tick = &self.last[worker];
        let bucket = &mut self.timeline[second];
        bucket.open = open;
        bucket.connects += tick.connects;
        bucket.failures += tick.failures;
        bucket.closes += tick.closes;
        bucket.deliveries += tick.deliveries;
        bucket.reports += 1;
        stats::merge_pairs(&mut bucket.latency, &tick.latency);
    }
}

/// The running worker processes.
pub struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: mpsc::Receiver<(usize, Line)>,
    finals: Vec<Option<WorkerFinal>>,
    /// What the workers reported so far.
    pub live: Live,
    label: String,
    target: u64,
    progress: bool,
    last_draw: Instant,
    /// Extra text for the progress line (publisher state).
    pub status: String,
}

impl Fleet {
    /// Starts one worker process per spec (this same binary, `worker` subcommand).
    ///
    /// # Errors
    /// A process could not be started or given its spec.
    pub fn spawn(specs: &[WorkerSpec], label: &str) -> Result<Fleet, FleetError> {
        let exe = std::env::current_exe().map_err(|source| FleetError::Spawn { id: 0, source })?;
        let (tx, rx) = mpsc::channel();
        let mut fleet = Fleet {
            children: Vec::new(),
            stdins: Vec::new(),
            rx,
            finals: vec![None; specs.len()],
            live: Live {
                started: Instant::now(),
                last: vec![Tick::default(); specs.len()],
                connects: 0,
                failures: 0,
                closes: 0,
                deliveries: 0,
                slow_deliveries: 0,
                timeline: Vec::new(),
                last_report_secs: 0.0,
            },
            label: label.to_owned(),
            target: specs.iter().map(|s| s.conns).sum(),
            progress: std::io::stderr().is_terminal(),
            last_draw: Instant::now(),
            status: String::new(),
        };
        for spec in specs {
            let id = spec.id;
            let spawn_err = |source| FleetError::Spawn { id, source };
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(spawn_err)?;
            let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                fleet.children.push(child);
                return Err(FleetError::Died { id });
            };
            fleet.children.push(child);
            let mut line = serde_json::to_vec(spec).map_err(|e| spawn_err(e.into()))?;
            line.push(b'\n');
            stdin.write_all(&line).map_err(spawn_err)?;
            fleet.stdins.push(stdin);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<WorkerMsg>(&line) {
                        Ok(msg) => {
                            if tx.send((id, Line::Msg(msg))).is_err() {
                                return;
                            }
                        }
                        Err(err) => {
                            let head: String = line.chars().take(200).collect();
                            eprintln!("ringcast-load: worker {id} sent an unreadable line ({err}): {head}…");
                        }
                    }
                }
                let _ = tx.send((id, Line::Eof));
            });
        }
        Ok(fleet)
    }

    /// Sends `cmd` to every worker.
    pub fn send(&mut self, cmd: &Command) {
        let mut line = serde_json::to_vec(cmd).unwrap_or_default();
        line.push(b'\n');
        for stdin in &mut self.stdins {
            // A worker that is gone shows up as a missing final report.
            let _ = stdin.write_all(&line);
        }
    }

    /// Processes worker messages until `done` holds (true) or `deadline` passes (false).
    ///
    /// # Errors
    /// A worker died or failed.
    pub fn wait_until(
        &mut self,
        deadline: Instant,
        mut done: impl FnMut(&Live) -> bool,
    ) -> Result<bool, FleetError> {
        loop {
            if done(&self.live) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.pump((deadline - now).min(Duration::from_millis(50)))?;
        }
    }

    fn pump(&mut self, timeout: Duration) -> Result<(), FleetError> {
        let mut next = self.rx.recv_timeout(timeout).ok();
        while let Some((id, line)) = next {
            match line {
                Line::Msg(WorkerMsg::Tick(tick)) => self.live.absorb(id, tick),
                Line::Msg(WorkerMsg::Final(report)) => self.finals[id] = Some(*report),
                Line::Msg(WorkerMsg::Fatal { error }) => {
                    return Err(FleetError::Fatal { id, error })
                }
                Line::Eof if self.finals[id].is_none() => return Err(FleetError::Died { id }),
                Line::Eof => {}
            }
            next = self.rx.try_recv().ok();
        }
        self.draw(false);
        Ok(())
    }

    /// Redraws the progress line (terminals only).
    pub fn draw(&mut self, last: bool) {
        if !self.progress || (!last && self.last_draw.elapsed() < Duration::from_millis(250)) {
            return;
        }
        self.last_draw = Instant::now();
        let live = &self.live;
        let recent = live.timeline.iter().rev().nth(1).or(live.timeline.last());
        let rate = recent.map_or(0, |b| b.deliveries);
        let p99 = recent.map_or(0.0, |b| Percentiles::of(&b.latency).p99);
        let pending: u64 = live.last.iter().map(|t| t.pending).sum();
        eprint!(
            "\r\x1b[2K{} {:5.1}s  open {}/{}  connecting {}  failed {}  closed {}  {}  deliveries {} ({}/s, p99 {})",
            self.label,
            live.started.elapsed().as_secs_f64(),
            live.open(),
            self.target,
            pending,
            live.failures,
            live.closes,
            self.status,
            human_count(live.deliveries as f64),
            human_count(rate as f64),
            human_us(p99),
        );
        if last {
            eprintln!();
        }
    }

    /// Tells every worker to finish and collects their reports.
    ///
    /// # Errors
    /// A worker died, failed, or did not answer within `wait`.
    pub fn finish(
        &mut self,
        published: u64,
        wait: Duration,
    ) -> Result<Vec<WorkerFinal>, FleetError> {
        self.send(&Command::Finish { published });
        let deadline = Instant::now() + wait;
        while !self.finals.iter().all(Option::is_some) {
            if Instant::now() >= deadline {
                return Err(FleetError::Timeout(wait));
            }
            self.pump(Duration::from_millis(20))?;
        }
        self.draw(true);
        self.stdins.clear();
        for child in &mut self.children {
            let _ = child.wait();
        }
        Ok(self.finals.iter_mut().filter_map(Option::take).collect())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
