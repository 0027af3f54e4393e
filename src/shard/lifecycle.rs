//! Liveness and shutdown: heartbeats, dead-peer detection and the SIGTERM drain.
//!
//! One sweep per second walks the shard's connection table: a connection silent for
//! `ping_interval` (jittered per shard so a fleet does not ping in lockstep) gets a ping;
//! one silent for `ping_interval + pong_timeout` is closed as dead. A drain (first SIGTERM
//! or SIGINT) stops accepting, then closes connections with 1001 in equal batches over
//! `drain_window`, each with a random reconnect hint inside the window, so clients do not
//! come back all at once.

use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::proto::frame::{encode_frame, opcode};
use crate::shard::conn::LINGER_SECS;
use crate::shard::follower::LocalEvent;
use crate::shard::state::Shard;
use crate::shard::table::ConnState;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Set by the signal thread when a drain starts.
pub static DRAINING: AtomicBool = AtomicBool::new(false);

/// Shards that have started serving (for `/readyz`).
pub static SHARDS_READY: AtomicUsize = AtomicUsize::new(0);

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
pub async fn run(shard: Rc<Shard>, stop_accepting: Rc<LocalEvent>) {
    let mut jitter = Jitter::new(shard.id as u64 + 1);
    let base = shard.settings.ping_interval.as_secs();
    // +-10% per shard, at least a second apart from the pong timeout arithmetic.
    let ping_after = (base + jitter.below(base / 5 + 1))
        .saturating_sub(base / 10)
        .max(1) as u32;
    let dead_after = ping_after + shard.settings.pong_timeout.as_secs() as u32;
    let mut last_sweep = Instant::now();
    loop {
        glommio::timer::sleep(TICK).await;
        if DRAINING.load(Ordering::Acquire) {
            break;
        }
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            sweep(&shard, ping_after, dead_after);
        }
    }
    shard.draining.set(true);
    stop_accepting.notify();
    drain(&shard, &mut jitter).await;
}

fn sweep(shard: &Shard, ping_after: u32, dead_after: u32) {
    let now = shard.now_secs();
    let ping = encode_frame(opcode::PING, b"");
    let mut lingered = Vec::new();
    {
        let mut conns = shard.conns.borrow_mut();
        for (key, conn) in conns.iter_mut() {
            let key = key as u32;
            let silent = now.saturating_sub(conn.last_rx);
            match conn.state {
                ConnState::Closing(since) if now.saturating_sub(since) >= LINGER_SECS => {
                    lingered.push(key)
                }
                ConnState::Open if silent >= dead_after => {
                    shard.schedule_close(key, conn, None, CloseCause::Dead)
                }
                ConnState::Open if silent >= ping_after && !conn.pinged => {
                    conn.pinged = true;
                    shard.metrics.pings_sent.fetch_add(1, Ordering::Relaxed);
                    shard.queue_control(key, conn, ping.clone());
                    shard.flush_or_close(key, conn);
                }
                _ => {}
            }
        }
    }
    for key in lingered {
        shard.finalize_close(key);
    }
    shard.settle();
}

async fn drain(shard: &Shard, jitter: &mut Jitter) {
    let window = shard.settings.drain_window;
    let total = shard.conns.borrow().len();
    let ticks = (window.as_millis() / TICK.as_millis()).max(1) as usize;
    let per_tick = total.div_ceil(ticks).max(1);
    let window_ms = window.as_millis() as u64 + 1000;
    tracing::info!(
        shard = shard.id,
        connections = total,
        window_secs = window.as_secs(),
        "drain started"
    );
    let mut last_sweep = Instant::now();
    loop {
        {
            let mut conns = shard.conns.borrow_mut();
            let mut picked = 0;
            for (key, conn) in conns.iter_mut() {
                if picked == per_tick {
                    break;
                }
                if conn.is_open() {
                    picked += 1;
                    let hint = format!("reconnect after {}ms", jitter.below(window_ms));
                    let reason = CloseReason::new(CloseCode::GoingAway, hint);
                    shard.schedule_close(key as u32, conn, Some(reason), CloseCause::Drain);
                }
            }
        }
        shard.settle();
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            // Finalizes lingering closes; nothing is pinged during a drain.
            sweep(shard, u32::MAX, u32::MAX);
        }
        if shard.conns.borrow().is_empty() {
            break;
        }
        glommio::timer::sleep(TICK).await;
    }
    tracing::info!(shard = shard.id, "drain finished");
}
