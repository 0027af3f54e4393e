//! Liveness and shutdown: heartbeats, dead-peer detection and the SIGTERM drain.
//!
//! Every connection's state machine is ticked once per second by a sweep spread over ten
//! 100 ms ticks (a tenth of the table each), so a million-entry table never stalls the
//! shard: a connection silent for `ping_interval` (jittered per shard so a fleet does not
//! ping in lockstep) gets a ping, written with the round's other pings in one io_uring
//! submission; one silent for `ping_interval + pong_timeout` is closed as dead. The first SIGTERM
//! or SIGINT turns `/readyz` 503 at once; `drain_grace` later the drain stops accepting, then closes connections with 1001 in equal batches over
//! `drain_window`, each with a random reconnect hint inside the window, so clients do not
//! come back all at once.

use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::shard::follower::LocalEvent;
use crate::shard::state::Shard;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The process's phase, shared by the main thread (which moves it on: serving, stopping,
/// draining), every shard and the admin port (`/readyz`).
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Set on the first SIGTERM/SIGINT, `drain_grace` before `draining`: `/readyz`
    /// answers 503 while the listeners still accept.
    stopping: AtomicBool,
    /// Set when a drain starts (after `drain_grace`): shards stop accepting and close
    /// their connections.
    draining: AtomicBool,
    /// The shard count once every shard serves (for `/readyz`).
    shards_ready: AtomicUsize,
}

impl Lifecycle {
    /// Every one of the `shards` serves.
    pub fn serving(&self, shards: usize) {
        self.shards_ready.store(shards, Ordering::Release);
    }

    /// Shards serving (0 until all do).
    pub fn shards_ready(&self) -> usize {
        self.shards_ready.load(Ordering::Acquire)
    }

    /// The first SIGTERM/SIGINT arrived.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The drain starts.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// True once the drain started.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// True from the first SIGTERM/SIGINT on (grace and drain): `/readyz` answers 503.
    pub fn shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Acquire) || self.draining()
    }
}

const TICK: Duration = Duration::from_millis(100);

/// A small xorshift generator: jitter needs spread, not cryptography.
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock and `salt`.
    pub fn new(salt: u64) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Jitter((t ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    /// Next value in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

/// Runs heartbeats until a drain starts, then drains this shard and returns.
pub async fn run(shard: Rc<Shard>, stop_accepting: Rc<LocalEvent>, lifecycle: Arc<Lifecycle>) {
    let mut sweep = Sweep::default();
    loop {
        glommio::timer::sleep(TICK).await;
        if lifecycle.draining() {
            break;
        }
        shard.refresh_live();
        sweep.step(&shard);
    }
    shard.draining.set(true);
    stop_accepting.notify();
    drain(&shard, &mut Jitter::new(shard.id as u64 + 1), &mut sweep).await;
}

/// The heartbeat sweep: every connection's machine is ticked once per second, spread over
/// the second's ticks so no single tick walks a whole million-entry table.
#[derive(Default)]
struct Sweep {
    cursor: u32,
}

/// Ticks per full pass over the table.
const TICKS_PER_PASS: u32 = (1000 / TICK.as_millis()) as u32;

impl Sweep {
    /// Ticks the next slice of the table: pings go out through the batched send path,
    /// dead peers and expired lingers are closed.
    fn step(&mut self, shard: &Shard) {
        shard.engine.answer_due_polls(Instant::now());
        let now = shard.now_secs();
        let high = shard.engine.conns.borrow().high();
        if self.cursor >= high {
            self.cursor = 0;
        }
        // Every tick: channels that subscribers made and left go within seconds, even when
        // a loop of subscribes to fresh names makes them fast.
        expire_idle_channels(shard);
        let end = high.min(self.cursor + high.div_ceil(TICKS_PER_PASS).max(1));
        let (pings, lingered) = shard.engine.tick(now, self.cursor..end);
        self.cursor = end;
        shard
            .engine
            .metrics
            .pings_sent
            .fetch_add(pings, Ordering::Relaxed);
        for key in lingered {
            shard.finalize_close(key);
        }
        shard.settle();
    }
}

/// Forgets idle channels' offset state, a bounded slice per call ([`crate::fanout::
/// publisher::Publisher::expire_idle`]); only shard 0 sweeps, the others return at once.
/// Called every tick (10 times a second): at most 40,960 entries a second are examined,
/// a few milliseconds of shard 0's time.
fn expire_idle_channels(shard: &Shard) {
    if shard.id != 0 {
        return;
    }
    let sweep = shard.engine.publisher.expire_idle(Instant::now());
    if sweep.expired > 0 {
        tracing::debug!(
            expired = sweep.expired,
            scanned = sweep.scanned,
            "idle channels forgotten"
        );
    }
}

/// Closes every connection with 1001 in equal batches over `drain_window`, walking the
/// table with a cursor (never rescanning connections already closing).
async fn drain(shard: &Shard, jitter: &mut Jitter, sweep: &mut Sweep) {
    let window = shard.settings.drain_window;
    let total = shard.engine.conns.borrow().len();
    let ticks = (window.as_millis() / TICK.as_millis()).max(1) as usize;
    let per_tick = total.div_ceil(ticks).max(1);
    let window_ms = window.as_millis() as u64 + 1000;
    tracing::info!(
        shard = shard.id,
        connections = total,
        window_secs = window.as_secs(),
        "drain started"
    );
    let mut cursor = 0u32;
    loop {
        {
            let mut conns = shard.engine.conns.borrow_mut();
            let mut picked = 0;
            let high = conns.high();
            // Wraps once: a handshake that finished after the drain began lands anywhere.
            let mut steps = 0;
            while picked < per_tick && steps < high {
                if cursor >= high {
                    cursor = 0;
                }
                let key = cursor;
                cursor += 1;
                steps += 1;
                let Some(conn) = conns.get_mut(key) else {
                    continue;
                };
                if conn.machine.is_open() {
                    picked += 1;
                    let hint = format!("reconnect after {}ms", jitter.below(window_ms));
                    let reason = CloseReason::new(CloseCode::GoingAway, hint);
                    shard
                        .engine
                        .schedule_close(key, conn, Some(reason), CloseCause::Drain);
                }
            }
        }
        shard.settle();
        // Finalizes lingering closes (and keeps detecting dead peers).
        sweep.step(shard);
        if shard.engine.conns.borrow().is_empty() {
            break;
        }
        glommio::timer::sleep(TICK).await;
    }
    tracing::info!(shard = shard.id, "drain finished");
}
