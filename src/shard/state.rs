//! What one shard owns: its connection table, subscription index and counters.
//!
//! A shard is single-threaded (one pinned glommio executor), so its state sits in
//! `RefCell`s shared by its tasks through an `Rc`; borrows never cross an `.await`.

use crate::config::Settings;
use crate::fanout::backlog::BacklogLimits;
use crate::fanout::index::SubscriptionIndex;
use crate::fanout::publisher::Publisher;
use crate::metrics::{self, Metrics, ShardMetrics};
use crate::shard::admission::ConnectionSlots;
use crate::shard::batch::SendRing;
use crate::shard::conn::CloseOrder;
use crate::shard::readiness::ReadySet;
use crate::shard::table::Conn;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Instant;

/// Largest single read from a socket; one per shard, shared by all its connections.
pub const SCRATCH_SIZE: usize = 64 * 1024;

/// A shard's state.
pub struct Shard {
    /// Shard number (0-based), also its CPU when pinned.
    pub id: usize,
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Connection table.
    pub conns: RefCell<Slab<Conn>>,
    /// Channel -> subscribers on this shard.
    pub index: RefCell<SubscriptionIndex>,
    /// Connections with frames queued in this fan-out round.
    pub dirty: RefCell<Vec<u32>>,
    /// Read buffer shared by every connection of the shard.
    pub scratch: RefCell<Box<[u8]>>,
    /// Offsets + ring.
    pub publisher: Arc<Publisher>,
    /// Per-connection backlog bounds.
    pub limits: BacklogLimits,
    /// This shard's counters.
    pub metrics: &'static ShardMetrics,
    /// All counters (for latency recording).
    pub all_metrics: &'static Metrics,
    /// The process-wide connection limit ([`crate::shard::admission`]).
    pub slots: Arc<ConnectionSlots>,
    /// Set once this shard stopped accepting for a drain.
    pub draining: Cell<bool>,
    /// Idle sockets waiting for input or writability.
    pub ready_set: ReadySet,
    /// Closes decided but not yet carried out (see [`Shard::settle`]).
    pub closes: RefCell<Vec<CloseOrder>>,
    /// Lingering closes whose peer finished.
    pub finalize: RefCell<Vec<u32>>,
    /// The io_uring that submits a fan-out round's writes at once (`None`: plain sends).
    pub send_ring: RefCell<Option<SendRing>>,
    generation: Cell<u32>,
    started: Instant,
}

impl Shard {
    /// A shard with empty tables.
    ///
    /// # Errors
    /// Creating the shard's epoll set failed.
    pub fn new(
        id: usize,
        settings: Arc<Settings>,
        publisher: Arc<Publisher>,
        slots: Arc<ConnectionSlots>,
    ) -> std::io::Result<Self> {
        let all_metrics = metrics::get();
        Ok(Shard {
            id,
            limits: BacklogLimits {
                max_bytes: settings.max_backlog_bytes,
                max_frames: settings.max_backlog_frames,
                drop_limit: settings.slow_consumer_drop_limit,
            },
            slots,
            settings,
            conns: RefCell::new(Slab::new()),
            index: RefCell::new(SubscriptionIndex::new()),
            dirty: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0u8; SCRATCH_SIZE].into_boxed_slice()),
            publisher,
            metrics: all_metrics.shard(id),
            all_metrics,
            draining: Cell::new(false),
            ready_set: ReadySet::new()?,
            closes: RefCell::new(Vec::new()),
            finalize: RefCell::new(Vec::new()),
            send_ring: RefCell::new(match SendRing::new() {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(shard = id, error = %e, "no io_uring for batched sends; writing with one syscall per socket");
                    None
                }
            }),
            generation: Cell::new(0),
            started: Instant::now(),
        })
    }

    /// A new generation number for a table slot.
    pub fn next_generation(&self) -> u32 {
        let g = self.generation.get().wrapping_add(1);
        self.generation.set(g);
        g
    }

    /// Seconds since the shard started: the coarse clock of liveness checks.
    pub fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }
}
