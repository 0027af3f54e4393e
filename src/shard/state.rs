//! What one shard owns: its connection table, subscription index and counters.
//!
//! A shard is single-threaded (one pinned glommio executor), so its state sits in
//! `RefCell`s shared by its tasks through an `Rc`; borrows never cross an `.await`. The
//! fields are private to the shard's driver modules (`pub(super)`): protocol decisions
//! live in [`crate::proto::conn::Connection`], and this struct only holds what the driver
//! needs to carry them out.

use crate::admission::per_ip::PerIpHold;
use crate::auth::registry::Registry;
use crate::config::Settings;
use crate::engine::Engine;
use crate::fanout::index::InterestSink;
use crate::ingest::route::Routes;
use crate::live::{Cached, Live};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::proto::backlog::BacklogLimits;
use crate::proto::conn::ConnConfig;
use crate::shard::admission::ConnectionSlots;
use crate::shard::batch::SendRing;
use crate::shard::lifecycle::Jitter;
use crate::shard::readiness::ReadySet;
use crate::shard::send::FairSlice;
use crate::shard::table::Socket;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

/// Largest single read from a socket; one per shard, shared by all its connections.
pub const SCRATCH_SIZE: usize = 64 * 1024;

/// A shard's state.
pub struct Shard {
    /// Shard number (0-based), also its CPU when pinned.
    pub(super) id: usize,
    /// Validated settings.
    pub(super) settings: Arc<Settings>,
    /// The sans-io core: connections, subscriptions, the round's policy.
    pub(crate) engine: Engine<Socket>,
    /// Read buffer shared by every connection of the shard.
    pub(super) scratch: RefCell<Box<[u8]>>,
    /// Plaintext decrypted from one read's TLS records (grows to the largest read's
    /// plaintext, at most the scratch buffer's size; empty until the shard's first TLS
    /// read).
    pub(super) tls_plain: RefCell<Vec<u8>>,
    /// Who is connected where, over all shards.
    pub(super) registry: Arc<Registry>,
    /// Who is subscribed to each presence channel, over all shards.
    pub(super) presence: Arc<Presence>,
    /// The settings a reload may change (token keys, limits).
    pub(super) live: RefCell<Cached>,
    /// All counters (for latency recording).
    pub(super) all_metrics: &'static Metrics,
    /// The process-wide connection limit ([`crate::shard::admission`]).
    pub(super) slots: Arc<ConnectionSlots>,
    /// Each adopted connection's place under the per-address limits, by its descriptor
    /// (empty while they are off); dropped when the connection leaves the table.
    pub(super) ip_holds: RefCell<HashMap<RawFd, PerIpHold>>,
    /// Set once this shard stopped accepting for a drain.
    pub(super) draining: Cell<bool>,
    /// Idle sockets waiting for input or writability.
    pub(super) ready_set: ReadySet,
    /// The io_uring that submits a fan-out round's writes at once (`None`: plain sends).
    pub(super) send_ring: RefCell<Option<SendRing>>,
    /// How long the fan-out has held the core since it last yielded.
    pub(super) fair: FairSlice,
    /// Where a client's publish goes (the inbox for `user:` channels, the cluster, or
    /// this node's publisher), and the inbox and cluster themselves.
    pub(super) routes: Routes,
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
        routes: Routes,
        registry: Arc<Registry>,
        presence: Arc<Presence>,
        slots: Arc<ConnectionSlots>,
        all_metrics: &'static Metrics,
    ) -> std::io::Result<Self> {
        let publisher = routes.publisher.clone();
        let base = settings.ping_interval.as_secs();
        // +-10% per shard, so a fleet's shards do not ping in lockstep.
        let ping_after = (base + Jitter::new(id as u64 + 1).below(base / 5 + 1))
            .saturating_sub(base / 10)
            .max(1) as u32;
        let conn_config = ConnConfig {
            max_message_size: settings.max_message_size,
            max_inbound_per_sec: settings.live.max_inbound_per_sec,
            backlog: BacklogLimits {
                max_bytes: settings.live.max_backlog_bytes,
                max_frames: settings.live.max_backlog_frames,
                drop_limit: settings.live.slow_consumer_drop_limit,
            },
            ping_after,
            dead_after: ping_after + settings.pong_timeout.as_secs() as u32,
            linger: crate::shard::conn::LINGER_SECS,
            stall_after: settings.live.slow_consumer_timeout.as_secs() as u32,
        };
        // Room for every connection the process may hold: SO_REUSEPORT does not promise
        // an even spread, so one shard may end up with most of them.
        let engine = Engine::new(
            id,
            publisher,
            all_metrics.shard(id),
            conn_config,
            settings.live.max_connections,
            routes.inbox.is_some(),
            routes.cluster.clone().map(|cluster| {
                let sink: InterestSink =
                    Box::new(move |channel, on| cluster.note_interest(channel, on));
                sink
            }),
        );
        let live = Cached::new(&settings);
        Ok(Shard {
            id,
            engine,
            live: RefCell::new(live),
            slots,
            ip_holds: RefCell::default(),
            settings,
            scratch: RefCell::new(vec![0u8; SCRATCH_SIZE].into_boxed_slice()),
            tls_plain: RefCell::default(),
            registry,
            presence,
            all_metrics,
            draining: Cell::new(false),
            ready_set: ReadySet::new()?,
            send_ring: RefCell::new(match SendRing::new() {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(shard = id, error = %e, "no io_uring for batched sends; writing with one syscall per socket");
                    None
                }
            }),
            fair: FairSlice::default(),
            routes,
            started: Instant::now(),
        })
    }

    /// The current reloadable settings.
    pub fn live(&self) -> Arc<Live> {
        self.live.borrow_mut().get().clone()
    }

    /// Applies a reload, if one happened since the last call, to this shard's connection
    /// limits (called every heartbeat tick: one atomic load when nothing changed).
    pub fn refresh_live(&self) {
        let mut cached = self.live.borrow_mut();
        if !cached.refresh() {
            return;
        }
        let live = cached.get();
        let mut config = self.engine.conn_config.get();
        config.max_inbound_per_sec = live.max_inbound_per_sec;
        config.backlog = BacklogLimits {
            max_bytes: live.max_backlog_bytes,
            max_frames: live.max_backlog_frames,
            drop_limit: live.slow_consumer_drop_limit,
        };
        config.stall_after = live.slow_consumer_timeout.as_secs() as u32;
        self.engine.conn_config.set(config);
    }

    /// Seconds since the shard started: the coarse clock of liveness checks.
    pub fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// Shard 0 of a one-shard process with `settings`, a ring of `ring_capacity` slots, a
    /// presence registry and no inbox, for unit tests of the driver.
    #[cfg(test)]
    pub(crate) fn for_tests(settings: Settings, ring_capacity: usize) -> Shard {
        use crate::fanout::publisher::Publisher;
        use crate::fanout::ring::Ring;
        use crate::fanout::wake::IdleFlags;
        let publisher = Arc::new(Publisher::new(
            Arc::new(Ring::new(ring_capacity)),
            Arc::new(IdleFlags::new(1)),
        ));
        Shard::for_tests_with(settings, publisher, None)
    }

    /// [`Shard::for_tests`] over `publisher`, with `inbox`.
    #[cfg(test)]
    pub(crate) fn for_tests_with(
        settings: Settings,
        publisher: Arc<crate::fanout::publisher::Publisher>,
        inbox: Option<crate::inbox::Inbox>,
    ) -> Shard {
        let presence = Arc::new(Presence::new(
            publisher.ring().clone(),
            publisher.idle_flags().clone(),
        ));
        let slots = ConnectionSlots::new(settings.live.max_connections);
        let live = Cached::pinned(settings.live.clone());
        let routes = Routes {
            publisher,
            inbox,
            cluster: None,
        };
        let shard = Shard::new(
            0,
            Arc::new(settings),
            routes,
            Arc::default(),
            presence,
            slots,
            Metrics::leak(1),
        )
        .expect("shard");
        *shard.live.borrow_mut() = live;
        shard
    }

    /// Wall-clock Unix seconds, for token `exp`/`nbf` (a clock before 1970 reads as 0,
    /// which makes every token not yet valid rather than valid forever).
    pub fn unix_now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}
