//! A worker process: thousands of subscriber sockets on one epoll loop (mio).
//!
//! The parent starts `ringcast-load worker` with a [`WorkerSpec`] on stdin. The worker
//! ramps its connections at the given rate (never more than `max_pending` handshakes in
//! flight), reads every delivery, and reports ticks and a final summary on stdout (see
//! [`crate::ipc`]). Slow subscribers stop listening after their handshake until `Resume`,
//! or read a trickle every 100 ms. In reconnect mode every ended or failed connection is
//! retried with backoff; `Drop` closes all open connections at once and reconnects them.
//! In `recover` runs each subscriber subscribes by command on every (re)connect, with
//! `since` once it has a position, and its offsets are accounted for across the run.

mod conn;
mod dial;
mod phases;
mod record;
mod schedule;

use std::io::BufRead;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};

use crate::ipc::{self, Command, WorkerMsg, WorkerSpec};
use crate::recover::RecoverTracker;
use crate::stats;
use conn::{Conn, End, State, Upgrade};
use record::Recorder;
use schedule::Schedule;

const WAKER: Token = Token(usize::MAX);
const TICK: Duration = Duration::from_millis(250);
const TRICKLE: Duration = Duration::from_millis(100);
const SCRATCH: usize = 64 * 1024;

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Reading the spec or talking to the parent failed.
    #[error("worker I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The spec line was not valid.
    #[error("invalid worker spec: {0}")]
    Spec(#[from] serde_json::Error),
}

/// Entry point of the hidden `worker` subcommand.
///
/// # Errors
/// When the spec cannot be read or epoll cannot be set up.
pub fn run() -> Result<(), WorkerError> {
    crate::limits::raise_nofile();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let spec: WorkerSpec = serde_json::from_str(&line)?;
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(Some(cmd)).is_err() {
                        return;
                    }
                }
                Err(err) => eprintln!("ringcast-load worker: ignoring bad command {line:?}: {err}"),
            }
            let _ = waker.wake();
        }
        // The parent is gone: stop rather than linger.
        let _ = tx.send(None);
        let _ = waker.wake();
    });
    Worker::new(spec, poll).run(&rx)
}

struct Worker {
    spec: WorkerSpec,
    poll: Poll,
    upgrade: Upgrade,
    conns: Vec<Conn>,
    sched: Schedule,
    rec: Recorder,
    handshake: hdrhistogram::Histogram<u64>,
    reconnect: hdrhistogram::Histogram<u64>,
    connects: u64,
    pending: u64,
    open: u64,
    resolved: u64,
    ramp_start_ms: Option<u64>,
    ramp_end_ms: Option<u64>,
    all_up: bool,
    storm_start: Option<Instant>,
    down_at_ms: Option<u64>,
    back_at_ms: Option<u64>,
    slow_paused: bool,
    tick_now: bool,
}

impl Worker {
    fn new(spec: WorkerSpec, poll: Poll) -> Worker {
        let now = Instant::now();
        let conns = (0..spec.conns)
            .map(|i| {
                let index = spec.first_index + i;
                let slow = spec.slow.as_ref().is_some_and(|s| s.is_slow(index));
                let recover = spec.recover.as_ref().map(|r| {
                    let (channel, name) = r.channel_of(index);
                    RecoverTracker::new(name, channel, r.channels)
                });
                Conn::new(slow, recover, now)
            })
            .collect();
        Worker {
            upgrade: Upgrade {
                host: spec.host.clone(),
                path: spec.path.clone(),
                sse: spec.sse,
            },
            sched: Schedule::new(spec.conns as usize, spec.rate, spec.max_pending, now),
            conns,
            poll,
            rec: Recorder::new(),
            handshake: stats::new_hist(),
            reconnect: stats::new_hist(),
            connects: 0,
            pending: 0,
            open: 0,
            resolved: 0,
            ramp_start_ms: None,
            ramp_end_ms: None,
            all_up: false,
            storm_start: None,
            down_at_ms: None,
            back_at_ms: None,
            slow_paused: true,
            tick_now: false,
            spec,
        }
    }

    fn run(&mut self, inbox: &mpsc::Receiver<Option<Command>>) -> Result<(), WorkerError> {
        let begin = Instant::now();
        let lifetime = Duration::from_millis(self.spec.lifetime_ms);
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; SCRATCH];
        let mut next_tick = begin + TICK;
        let mut next_trickle = begin + TRICKLE;
        if self.spec.conns == 0 {
            self.ramp_end_ms = Some(ipc::unix_ms());
        }
        loop {
            let now = Instant::now();
            let wake = [
                Some(next_tick),
                self.sched.next_due(now),
                Some(next_trickle),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_tick);
            let timeout = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            if let Err(err) = self.poll.poll(&mut events, Some(timeout)) {
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err.into());
                }
            }
            for event in events.iter() {
                if event.token() == WAKER {
                    continue;
                }
                let i = event.token().0;
                let read =
                    !(self.conns[i].slow && self.slow_paused && self.conns[i].state == State::Open);
                let res = self.conns[i].on_event(
                    event.is_writable(),
                    &self.upgrade,
                    &mut scratch,
                    &mut self.rec,
                    read,
                );
                self.settle(i, res);
            }
            while let Ok(msg) = inbox.try_recv() {
                match msg {
                    Some(Command::Finish { published }) => return self.finish(published),
                    Some(Command::Drop) => self.drop_all(),
                    Some(Command::Resume) => self.resume(&mut scratch),
                    None => return Ok(()),
                }
            }
            let now = Instant::now();
            for (i, generation) in self.sched.expired(now) {
                let conn = &self.conns[i];
                if conn.generation == generation
                    && matches!(conn.state, State::Connecting | State::Handshaking)
                {
                    let cause = if conn.state == State::Connecting {
                        "connect_timeout"
                    } else {
                        "handshake_timeout"
                    };
                    self.settle(i, Err(End::Failed(cause.into())));
                }
            }
            while let Some(i) = self.sched.next_start(now, self.pending) {
                self.start(i);
            }
            if now >= next_trickle {
                next_trickle = now + TRICKLE;
                self.trickle(&mut scratch);
            }
            if now >= next_tick || self.tick_now {
                next_tick = now + TICK;
                self.tick_now = false;
                self.emit_tick()?;
            }
            if now.duration_since(begin) > lifetime {
                let error = "worker lifetime exceeded; stopping".to_string();
                ipc::emit(&WorkerMsg::Fatal { error })?;
                return Ok(());
            }
        }
    }

    fn start(&mut self, i: usize) {
        let index = self.spec.first_index + i as u64;
        let ips = &self.spec.source_ips;
        let source = (!ips.is_empty()).then(|| ips[(index % ips.len() as u64) as usize]);
        let rcvbuf = self
            .spec
            .slow
            .as_ref()
            .filter(|_| self.conns[i].slow)
            .map(|s| s.rcvbuf);
        self.ramp_start_ms.get_or_insert_with(ipc::unix_ms);
        let registry = self.poll.registry();
        match self.conns[i].connect(self.spec.target, source, rcvbuf, registry, Token(i)) {
            Ok(()) => {
                self.pending += 1;
                let timeout = Duration::from_millis(self.spec.connect_timeout_ms);
                self.sched
                    .watch(i, self.conns[i].generation, self.conns[i].started + timeout);
            }
            Err(cause) => self.failed(i, &cause),
        }
    }

    /// Applies the result of handling connection `i`.
    fn settle(&mut self, i: usize, res: Result<(), End>) {
        if std::mem::take(&mut self.conns[i].just_opened) {
            self.opened(i);
        }
        let Err(end) = res else { return };
        let conn = &mut self.conns[i];
        let was = conn.state;
        conn.shutdown(self.poll.registry(), false, &mut self.rec);
        match was {
            State::Connecting | State::Handshaking => {
                self.pending -= 1;
                let cause = match end {
                    End::Failed(cause) => cause,
                    End::Closed(code) => format!("close_{code}"),
                };
                self.failed(i, &cause);
            }
            State::Open => {
                self.open -= 1;
                let slow = conn.slow;
                let code = match end {
                    End::Closed(code) => code,
                    End::Failed(cause) => {
                        self.rec.failure(&format!("disconnect_{cause}"));
                        1006
                    }
                };
                self.rec.closed(slow, code);
                self.lost_one(i);
            }
            State::Queued | State::Done => {}
        }
    }

    fn opened(&mut self, i: usize) {
        let now = Instant::now();
        self.pending -= 1;
        self.open += 1;
        self.connects += 1;
        self.rec.tick.connects += 1;
        let conn = &mut self.conns[i];
        stats::record(&mut self.handshake, nanos(now - conn.started));
        if let Some(since) = conn.down_since.take() {
            stats::record(&mut self.reconnect, nanos(now - since));
        }
        if conn.slow && self.slow_paused {
            conn.set_listening(self.poll.registry(), Token(i), false);
        }
        self.resolve_one();
        if self.open == self.spec.conns {
            self.all_up = true;
            if self.down_at_ms.is_some() && self.back_at_ms.is_none() {
                self.back_at_ms = Some(ipc::unix_ms());
                self.storm_start = None;
                self.tick_now = true;
            }
        }
    }

    fn failed(&mut self, i: usize, cause: &str) {
        self.rec.failure(cause);
        self.resolve_one();
        let conn = &mut self.conns[i];
        if self.spec.reconnect {
            conn.attempts += 1;
            conn.state = State::Queued;
            let backoff = 100u64 << conn.attempts.min(4);
            let delay = Duration::from_millis(
                backoff.min(1000) / 2 + fastrand::u64(0..=backoff.min(1000) / 2),
            );
            self.sched.retry(i, Instant::now() + delay);
        } else {
            conn.state = State::Done;
        }
    }

    /// An open connection ended: reconnect it (reconnect mode) or retire it.
    fn lost_one(&mut self, i: usize) {
        let now = Instant::now();
        if self.all_up {
            self.all_up = false;
            self.down_at_ms = Some(ipc::unix_ms());
            self.back_at_ms = None;
            self.storm_start.get_or_insert(now);
        }
        let conn = &mut self.conns[i];
        if self.spec.reconnect {
            conn.state = State::Queued;
            conn.down_since = Some(self.storm_start.unwrap_or(now));
            let delay = Duration::from_millis(20 + fastrand::u64(0..100));
            self.sched.retry(i, now + delay);
        } else {
            conn.state = State::Done;
        }
    }

    fn resolve_one(&mut self) {
        if self.ramp_end_ms.is_none() {
            self.resolved += 1;
            if self.resolved >= self.spec.conns {
                self.ramp_end_ms = Some(ipc::unix_ms());
                self.tick_now = true;
            }
        }
    }

    fn emit_tick(&mut self) -> Result<(), WorkerError> {
        let mut tick = self.rec.take_tick();
        tick.open = self.open;
        tick.pending = self.pending;
        tick.queued = self.sched.queued() as u64;
        tick.ramp_done = self.ramp_end_ms.is_some();
        tick.down_at_ms = self.down_at_ms;
        tick.back_at_ms = self.back_at_ms;
        tick.subscribed = self.rec.recover.subscribed;
        tick.resubscribed = self.rec.recover.resubscribed;
        ipc::emit(&WorkerMsg::Tick(tick))?;
        Ok(())
    }

    fn finish(&mut self, published: u64) -> Result<(), WorkerError> {
        self.emit_tick()?;
        let mut report = self.rec.finish(&self.conns, published);
        report.handshake = stats::to_pairs(&self.handshake);
        report.reconnect = stats::to_pairs(&self.reconnect);
        report.connects = self.connects;
        report.ramp_start_ms = self.ramp_start_ms;
        report.ramp_end_ms = self.ramp_end_ms;
        report.open_at_end = self.open;
        ipc::emit(&WorkerMsg::Final(Box::new(report)))?;
        for conn in &mut self.conns {
            conn.shutdown(self.poll.registry(), true, &mut self.rec);
        }
        Ok(())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
