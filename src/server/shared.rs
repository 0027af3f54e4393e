//! What every shard shares, built once before any shard starts: the publisher (and its
//! fan-out ring), the durable inbox, the cluster bridge, the user registry, presence, and
//! the process-wide connection counts. Shards get these as handles, never from globals.

use super::StartError;
use crate::admission::per_ip::PerIpTable;
use crate::auth::registry::Registry;
use crate::config::Settings;
use crate::fanout::history::Limits as HistoryLimits;
use crate::fanout::publisher::Publisher;
use crate::fanout::ring::Ring;
use crate::fanout::wake::IdleFlags;
use crate::inbox::Inbox;
use crate::inbox::ShardQueues;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::shard::admission::ConnectionSlots;
use crate::shard::lifecycle::Lifecycle;
use crate::shard::ShardError;
use std::sync::Arc;

/// The process-wide state every shard is handed.
pub(super) struct Shared {
    /// The settings of the start.
    pub settings: Arc<Settings>,
    /// Offsets, history and the fan-out ring.
    pub publisher: Arc<Publisher>,
    /// The durable inbox, when on.
    pub inbox: Option<Inbox>,
    /// Which user is connected on which shard.
    pub registry: Arc<Registry>,
    /// Presence over every shard.
    pub presence: Arc<Presence>,
    /// Open WebSocket connections over the process (`max_connections`).
    pub slots: Arc<ConnectionSlots>,
    /// Open TCP ingest connections over the process (`max_tcp_ingest_connections`).
    pub ingest_slots: Arc<ConnectionSlots>,
    /// The per-address table (`None`: every per-IP limit is off).
    pub per_ip: Option<Arc<PerIpTable>>,
    /// Serving, stopping or draining.
    pub lifecycle: Arc<Lifecycle>,
    /// Every counter of the process.
    pub metrics: &'static Metrics,
    /// The cluster, when this node is part of one.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    /// Builds the shared state and starts the threads beside the shards (inbox store,
    /// NATS); also returns each shard's queues from the inbox store (empty when off).
    ///
    /// # Errors
    /// [`StartError::Inbox`] when the inbox database cannot be used, or a
    /// [`ShardError`] when the NATS thread cannot be spawned.
    pub fn start(
        settings: Arc<Settings>,
        metrics: &'static Metrics,
    ) -> Result<(Shared, Vec<ShardQueues>), StartError> {
        let n = settings.shards;
        let publisher = Arc::new(publisher(&settings, metrics));
        let (inbox, inbox_queues) = match start_inbox(&settings, &publisher, metrics)? {
            Some((inbox, queues)) => (Some(inbox), queues),
            None => (None, Vec::new()),
        };
        let mut cluster_handle = None;
        if let Some(cluster) = &settings.cluster {
            crate::cluster::presence::init(n, &cluster.subject_prefix, cluster.presence_window);
            let handle = crate::cluster::Cluster::start(cluster.clone(), publisher.clone(), n)
                .map_err(|e| ShardError::Setup {
                    shard: 0,
                    message: format!("cluster: spawning the NATS thread: {e}"),
                })?;
            crate::cluster::presence::watch_link(handle.stats().clone());
            cluster_handle = Some(Arc::new(handle));
            tracing::info!(nats = %cluster.nats_url, stream = %cluster.stream_name, "cluster on: channels are published through NATS JetStream");
        }
        // One limit for the process, whatever share of the connections each shard's
        // SO_REUSEPORT listener happens to receive.
        let slots = ConnectionSlots::new(settings.live.max_connections);
        // Every shard serves the TCP ingest port: one count for all of them.
        let ingest_slots = ConnectionSlots::new(settings.live.max_tcp_ingest_connections);
        // One table for the process: SO_REUSEPORT spreads one address over every shard.
        let per_ip = settings
            .per_ip
            .any()
            .then(|| PerIpTable::new(settings.per_ip));
        let registry = Arc::new(Registry::new().with_user_gauge(&metrics.users));
        let presence = Arc::new(
            Presence::new(publisher.ring().clone(), publisher.idle_flags().clone())
                .with_stats(metrics.presence.clone()),
        );
        if settings.cluster.is_some() {
            crate::cluster::presence::install_registry(
                presence.clone(),
                settings.namespaces.clone(),
            );
        }
        let shared = Shared {
            settings,
            publisher,
            inbox,
            registry,
            presence,
            slots,
            ingest_slots,
            per_ip,
            lifecycle: Arc::default(),
            metrics,
            cluster: cluster_handle,
        };
        Ok((shared, inbox_queues))
    }
}

/// The publisher over a new ring, with each channel's history limits from its namespace.
fn publisher(settings: &Arc<Settings>, metrics: &'static Metrics) -> Publisher {
    let ring = Arc::new(Ring::new(settings.ring_capacity));
    Publisher::new(ring, Arc::new(IdleFlags::new(settings.shards)))
        .with_idle_timeout(settings.channel_idle_timeout)
        .with_channel_gauge(&metrics.channels)
        .with_history(
            {
                let settings = settings.clone();
                move |channel| {
                    let rules = settings.namespaces.rules_for(channel);
                    HistoryLimits {
                        size: rules.history_size,
                        ttl: rules.history_ttl.map_or(u64::MAX, |t| t.as_secs()),
                    }
                }
            },
            settings.history_max_bytes,
            metrics.history.clone(),
        )
}

/// Opens the inbox when it is on (in JetStream with the cluster on, else the local redb
/// file) and says where messages to `user:` channels are kept.
fn start_inbox(
    settings: &Settings,
    publisher: &Arc<Publisher>,
    metrics: &Metrics,
) -> Result<Option<(Inbox, Vec<ShardQueues>)>, StartError> {
    let n = settings.shards;
    let Some(config) = &settings.inbox else {
        tracing::info!("inbox off: messages to user: channels are not stored (inbox = true keeps them until acked)");
        return Ok(None);
    };
    let (inbox, queues) = match &settings.cluster {
        // With the cluster on, user inboxes live in JetStream (docs/cluster.md).
        Some(cluster) => crate::inbox::jetstream::start(
            cluster.clone(),
            config.clone(),
            publisher.clone(),
            n,
            metrics.inbox.clone(),
        ),
        None => {
            crate::inbox::redb::start(config.clone(), publisher.clone(), n, metrics.inbox.clone())
        }
    }
    .map_err(StartError::Inbox)?;
    let path = match settings.cluster {
        Some(_) => inbox.path().clone(),
        None => std::path::absolute(&config.path).unwrap_or_else(|_| config.path.clone()),
    };
    tracing::info!(
        path = %path.display(),
        retention_secs = config.retention.as_secs(),
        "inbox on: messages to user: channels are stored in {} until acked",
        path.display()
    );
    Ok(Some((inbox, queues)))
}
