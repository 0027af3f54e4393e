//! Shards: one pinned glommio executor per core, each serving its own SO_REUSEPORT
//! listeners, connection table and subscription index, all following the one fan-out ring.
//!
//! [`run`] binds every socket first (so a bad address fails before anything starts), then
//! starts the executors and waits until every shard reports that it serves (only then is
//! "ringcast started" logged and `/readyz` answers 200; a shard that cannot start makes
//! `run` fail), then waits for a drain to finish.

pub mod admission;
pub mod batch;
pub mod cluster_publish;
pub mod commands;
pub mod conn;
pub mod control;
pub mod follower;
pub mod handshake;
pub mod inbox;
pub mod join;
pub mod lifecycle;
pub mod listener;
pub mod presence;
pub mod proxy;
pub mod readiness;
pub mod send;
pub mod state;
pub mod table;
pub mod tls_io;

use crate::admission::accept_backoff::{AcceptBackoff, AcceptError};
use crate::admission::per_ip::PerIpTable;
use crate::admission::token_bucket::TokenBucket;
use crate::auth::registry::Registry;
use crate::config::{ConfigLayer, Settings};
use crate::fanout::history::Limits as HistoryLimits;
use crate::fanout::publisher::Publisher;
use crate::fanout::ring::Ring;
use crate::fanout::wake::{install_senders, IdleFlags};
use crate::inbox::Inbox;
use crate::inbox::ShardQueues;
use crate::live::Live;
use crate::metrics;
use crate::metrics::RefuseCause;
use crate::presence::Presence;
use crate::sd_notify::{self, Event, Notifier};
use crate::shard::admission::{
    per_ip_cause, refuse_now, ConnectionSlots, HandshakeGate, ProxiedPeer,
};
use crate::shard::control::{ShardControl, ShardRequest, CONTROL_QUEUE};
use crate::shard::follower::LocalEvent;
use crate::shard::listener::{tcp_listeners, udp_sockets, BindError};
use crate::shard::state::Shard;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::net::{TcpListener, UdpSocket};
use glommio::{LocalExecutorBuilder, Placement};
use socket2::Socket;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why the server could not start or run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A shard's executor ran but its own setup failed.
    #[error("setting up shard {shard}: {message}")]
    Shard {
        /// Shard number.
        shard: usize,
        /// What failed.
        message: String,
    },
    /// An executor (io_uring instance) could not be created.
    #[error("starting shard {shard} on CPU {cpu}: {message}")]
    Executor {
        /// Shard number.
        shard: usize,
        /// CPU it was to be pinned to.
        cpu: usize,
        /// What failed and what to change.
        message: String,
    },
    /// Signal handling could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// The inbox is on but its database cannot be used.
    #[error("inbox: {0}; fix it, point inbox_path (or data_dir) at a writable place, or set inbox = false to run without durable user inboxes")]
    Inbox(crate::inbox::StoreError),
}

/// The sockets one shard serves.
struct ShardSockets {
    ws: Option<Socket>,
    /// The `tls_listen` listener, when configured.
    tls: Option<Socket>,
    udp: Option<Socket>,
    tcp: Option<Socket>,
    admin: Option<Socket>,
}

/// Everything a shard executor needs, moved into its thread.
struct ShardSetup {
    id: usize,
    settings: Arc<Settings>,
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
    presence: Arc<Presence>,
    slots: Arc<ConnectionSlots>,
    /// Open TCP ingest connections over the process (`max_tcp_ingest_connections`).
    ingest_slots: Arc<ConnectionSlots>,
    /// The per-address table (`None`: every per-IP limit is off).
    per_ip: Option<Arc<PerIpTable>>,
    sockets: ShardSockets,
    wake_senders: Vec<SharedSender<()>>,
    wake_receivers: Vec<SharedReceiver<()>>,
    /// This shard's queue of admin requests.
    control_receiver: SharedReceiver<ShardRequest>,
    /// Senders to every shard's control queue: only for the shard serving the admin port.
    control_senders: Vec<SharedSender<ShardRequest>>,
    /// The durable inbox, when on, and this shard's queues from its store thread.
    inbox: Option<(Inbox, ShardQueues)>,
    /// Told once: `Ok` when the shard serves, or why it could not start.
    started: mpsc::Sender<Result<(), StartError>>,
    done: mpsc::Sender<usize>,
}

/// Runs the server until a drain completes; SIGHUP re-resolves the command line and
/// environment alone (no file to read again).
///
/// # Errors
/// [`StartError`] when a socket cannot be bound or a shard cannot start.
pub fn run(settings: Settings) -> Result<(), StartError> {
    run_reloadable(settings, ConfigLayer::default())
}

/// Runs the server until a drain completes; SIGHUP reads `cli.config` again and applies
/// the keys that can change at runtime ([`crate::live`]), with `cli` (the command line and
/// environment of the start) still overriding the file.
///
/// # Errors
/// [`StartError`] when a socket cannot be bound or a shard cannot start.
pub fn run_reloadable(settings: Settings, cli: ConfigLayer) -> Result<(), StartError> {
    let table = match &cli.config {
        Some(path) => crate::live::read_file(path).map_or_else(|_| toml::Table::new(), |(t, _)| t),
        None => toml::Table::new(),
    };
    crate::live::install(Live::from_settings(&settings));
    let settings = Arc::new(settings);
    let n = settings.shards;
    metrics::init(n);
    raise_fd_limit(&settings);
    if !settings.transparent_huge_pages {
        // Before any large allocation, so no heap page was already made huge.
        if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
            tracing::warn!(error = %e, "could not disable transparent huge pages");
        }
    }
    let ring = Arc::new(Ring::new(settings.ring_capacity));
    let publisher = Arc::new(
        Publisher::new(ring, Arc::new(IdleFlags::new(n)))
            .with_idle_timeout(settings.channel_idle_timeout)
            .with_channel_gauge(&metrics::get().channels)
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
                metrics::get().history.clone(),
            ),
    );
    let inbox = match &settings.inbox {
        None => {
            tracing::info!("inbox off: messages to user: channels are not stored (inbox = true keeps them until acked)");
            None
        }
        Some(config) => {
            let (inbox, queues) = match &settings.cluster {
                // With the cluster on, user inboxes live in JetStream (docs/cluster.md).
                Some(cluster) => crate::inbox::jetstream::start(
                    cluster.clone(),
                    config.clone(),
                    publisher.clone(),
                    n,
                    metrics::get().inbox.clone(),
                ),
                None => crate::inbox::redb::start(
                    config.clone(),
                    publisher.clone(),
                    n,
                    metrics::get().inbox.clone(),
                ),
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
            Some((inbox, queues))
        }
    };
    let (inbox, inbox_queues) = match inbox {
        Some((inbox, queues)) => (Some(inbox), queues),
        None => (None, Vec::new()),
    };
    let mut inbox_queues = inbox_queues.into_iter();
    if let Some(cluster) = &settings.cluster {
        crate::cluster::presence::init(n, &cluster.subject_prefix, cluster.presence_window);
        let handle = crate::cluster::Cluster::start(cluster.clone(), publisher.clone(), n)
            .map_err(|e| StartError::Shard {
                shard: 0,
                message: format!("cluster: spawning the NATS thread: {e}"),
            })?;
        crate::cluster::install(handle);
        tracing::info!(nats = %cluster.nats_url, stream = %cluster.stream_name, "cluster on: channels are published through NATS JetStream");
    }
    // One limit for the process, whatever share of the connections each shard's
    // SO_REUSEPORT listener happens to receive.
    let slots = ConnectionSlots::new(settings.max_connections);
    // Every shard serves the TCP ingest port: one count for all of them.
    let ingest_slots = ConnectionSlots::new(settings.max_tcp_ingest_connections);
    // One table for the process: SO_REUSEPORT spreads one address over every shard.
    let per_ip = settings
        .per_ip
        .any()
        .then(|| PerIpTable::new(settings.per_ip));
    let reloader = Reloader {
        cli,
        table,
        slots: slots.clone(),
        per_ip: per_ip.clone(),
    };
    let registry = Arc::new(Registry::new().with_user_gauge(&metrics::get().users));
    let presence = Arc::new(
        Presence::new(publisher.ring().clone(), publisher.idle_flags().clone())
            .with_stats(metrics::get().presence.clone()),
    );
    if settings.cluster.is_some() {
        crate::cluster::presence::install_registry(presence.clone(), settings.namespaces.clone());
    }

    let mut ws = tcp_listeners(
        "WebSocket listener",
        settings.listen,
        settings.listen_backlog,
        n,
    )?
    .into_iter();
    let mut tls: std::vec::IntoIter<Option<Socket>> = match &settings.tls {
        Some(t) => tcp_listeners("TLS listener", t.listen, settings.listen_backlog, n)?
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
        None => (0..n).map(|_| None).collect::<Vec<_>>(),
    }
    .into_iter();
    let mut udp: std::vec::IntoIter<Option<Socket>> = match settings.udp_ingest {
        Some(a) => udp_sockets("UDP ingest", a, n)?
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
        None => (0..n).map(|_| None).collect::<Vec<_>>(),
    }
    .into_iter();
    let mut tcp: std::vec::IntoIter<Option<Socket>> = match settings.tcp_ingest {
        Some(a) => tcp_listeners("TCP ingest", a, 1024, n)?
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
        None => (0..n).map(|_| None).collect::<Vec<_>>(),
    }
    .into_iter();
    let mut admin = tcp_listeners("admin HTTP", settings.admin, 1024, 1)?.into_iter();
    let sockets: Vec<ShardSockets> = (0..n)
        .map(|_| ShardSockets {
            ws: ws.next(),
            tls: tls.next().flatten(),
            udp: udp.next().flatten(),
            tcp: tcp.next().flatten(),
            admin: admin.next(),
        })
        .collect();

    // Wake channels are single-producer: one per (producer shard, consumer shard) pair.
    let mut senders: Vec<Vec<SharedSender<()>>> = (0..n).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<SharedReceiver<()>>> = (0..n).map(|_| Vec::new()).collect();
    for producer in senders.iter_mut() {
        for consumer in receivers.iter_mut() {
            let (tx, rx) = shared_channel::new_bounded(1);
            producer.push(tx);
            consumer.push(rx);
        }
    }

    // Admin requests: shard 0 (which serves the admin port) to every shard.
    let (mut control_senders, control_receivers): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| shared_channel::new_bounded::<ShardRequest>(CONTROL_QUEUE))
        .unzip();
    let mut control_receivers = control_receivers.into_iter();

    let cpus = allowed_cpus();
    if n > cpus.len() {
        tracing::warn!(
            shards = n,
            cpus = cpus.len(),
            "more shards than CPUs: shards will share cores"
        );
    }
    let (done_tx, done_rx) = mpsc::channel();
    let (started_tx, started_rx) = mpsc::channel();
    for (id, ((sockets, wake_senders), wake_receivers)) in
        sockets.into_iter().zip(senders).zip(receivers).enumerate()
    {
        let cpu = cpus[id % cpus.len()];
        let setup = ShardSetup {
            id,
            settings: settings.clone(),
            publisher: publisher.clone(),
            registry: registry.clone(),
            presence: presence.clone(),
            slots: slots.clone(),
            ingest_slots: ingest_slots.clone(),
            per_ip: per_ip.clone(),
            sockets,
            wake_senders,
            wake_receivers,
            control_receiver: control_receivers.next().ok_or_else(|| StartError::Shard {
                shard: id,
                message: "no control queue (bug)".into(),
            })?,
            control_senders: if id == 0 {
                std::mem::take(&mut control_senders)
            } else {
                Vec::new()
            },
            inbox: inbox.clone().zip(inbox_queues.next()),
            started: started_tx.clone(),
            done: done_tx.clone(),
        };
        let started = started_tx.clone();
        let builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("ringcast-{id}"))
            .io_memory(settings.io_memory);
        std::thread::Builder::new()
            .name(format!("ringcast-{id}"))
            .spawn(move || match builder.make() {
                Err(e) => {
                    let _ = started.send(Err(StartError::Executor {
                        shard: id,
                        cpu,
                        message: explain_executor_error(&e),
                    }));
                }
                Ok(executor) => {
                    drop(started);
                    executor.run(shard_main(setup));
                }
            })
            .map_err(|e| StartError::Executor {
                shard: id,
                cpu,
                message: format!("spawning thread: {e}"),
            })?;
    }
    // Only the shards hold senders now: if every one of them is gone before all reported,
    // a shard died during setup.
    drop(started_tx);
    for ready in 0..n {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(StartError::Shard {
                    shard: ready,
                    message: format!(
                        "only {ready} of {n} shards reported serving before their threads ended"
                    ),
                })
            }
        }
    }
    tracing::info!(
        shards = n,
        ws = %settings.listen,
        tls = ?settings.tls.as_ref().map(|t| t.listen),
        udp = ?settings.udp_ingest,
        tcp = ?settings.tcp_ingest,
        admin = %settings.admin,
        "ringcast started"
    );
    // /readyz answers 200 from here, after the line above, never before.
    lifecycle::SHARDS_READY.store(n, Ordering::Release);
    // systemd (Type=notify) hears READY=1 at the same moment, never before.
    let notifier = Notifier::from_env();
    notifier.send(&Event::Ready {
        status: &serving_status(&settings),
    });
    let drained = wait_for_drain(&settings, done_rx, reloader, &notifier);
    if let Some(inbox) = &inbox {
        // After the drain: nothing is published any more.
        if !inbox.close(INBOX_CLOSE_WAIT) {
            tracing::warn!("the inbox store did not close in time: the next start repairs it");
        }
    }
    drained
}

/// How long the exit waits for the inbox store to close its file.
const INBOX_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The `STATUS=` line while serving: shards and listening addresses.
fn serving_status(settings: &Settings) -> String {
    format!(
        "serving: {} shards, ws {}, admin {}",
        settings.shards, settings.listen, settings.admin
    )
}

/// What a SIGHUP needs: the start's command line and environment, the file's keys as last
/// read, and the process-wide limits to change.
struct Reloader {
    cli: ConfigLayer,
    table: toml::Table,
    slots: Arc<ConnectionSlots>,
    /// The per-address table, when a per-IP limit was on at start (its limits reload;
    /// without one, turning a limit on needs a restart).
    per_ip: Option<Arc<PerIpTable>>,
}

impl Reloader {
    /// Reads the configuration again and applies what can change at runtime; a bad file is
    /// refused (logged with the key at fault) and the running configuration stays.
    fn reload(&mut self) {
        let counters = &metrics::get().config_reloads;
        match crate::live::reload(&self.cli, &self.table) {
            Err(e) => {
                counters[1].fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "config reload refused: {e}; the running configuration stays");
            }
            Ok(mut reloaded) => {
                if self.per_ip.is_none() {
                    // No table was kept at start (every per-IP limit off): there are no
                    // counts to check a new limit against.
                    let (later, now): (Vec<String>, Vec<String>) = reloaded
                        .applied
                        .drain(..)
                        .partition(|k| crate::live::PER_IP_KEYS.contains(&k.as_str()));
                    reloaded.applied = now;
                    reloaded.need_restart.extend(later);
                }
                for key in &reloaded.need_restart {
                    tracing::warn!(
                        key = %key,
                        "config reload: `{key}` changed but needs a restart; the running value stays"
                    );
                }
                self.slots.set_limit(reloaded.settings.max_connections);
                if let Some(table) = &self.per_ip {
                    table.set_limits(reloaded.settings.per_ip);
                }
                if let Some(tls) = &reloaded.settings.tls {
                    tracing::info!(
                        cert = %tls.cert_file.display(),
                        key = %tls.key_file.display(),
                        "TLS certificate and key re-read; new handshakes use them"
                    );
                }
                crate::live::install(Live::from_settings(&reloaded.settings));
                self.table = reloaded.table;
                counters[0].fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    changed = ?reloaded.applied,
                    "config reloaded: {}",
                    if reloaded.applied.is_empty() {
                        "no runtime key changed".to_string()
                    } else {
                        format!("applied {}", reloaded.applied.join(", "))
                    }
                );
            }
        }
    }
}

/// Blocks until SIGTERM/SIGINT starts a shutdown and every shard finished its drain (or
/// the window plus a grace period passed). The first signal turns `/readyz` 503 at once;
/// the listeners keep accepting for `drain_grace` (a load balancer's health check takes
/// the node out meanwhile), then the drain stops accepting and closes connections. A
/// second signal exits at once.
fn wait_for_drain(
    settings: &Settings,
    done: mpsc::Receiver<usize>,
    mut reloader: Reloader,
    notifier: &Notifier,
) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(StartError::Signals)?;
    let first = loop {
        match signals.forever().next() {
            Some(SIGHUP) => {
                tracing::info!("SIGHUP: reloading the configuration");
                notifier.send(&Event::Reloading {
                    monotonic_usec: sd_notify::monotonic_usec(),
                });
                reloader.reload();
                notifier.send(&Event::Reloaded {
                    status: &serving_status(settings),
                });
            }
            other => break other,
        }
    };
    lifecycle::STOPPING.store(true, Ordering::Release);
    notifier.send(&Event::Stopping {
        status: &format!(
            "shutting down: /readyz 503, draining in {} s over {} s",
            settings.drain_grace.as_secs(),
            settings.drain_window.as_secs()
        ),
    });
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGHUP {
                tracing::warn!("SIGHUP during shutdown: not reloading");
                continue;
            }
            tracing::warn!(
                signal = sig,
                "second signal: exiting without finishing the drain"
            );
            std::process::exit(1);
        }
    });
    if !settings.drain_grace.is_zero() {
        tracing::info!(signal = ?first, grace_secs = settings.drain_grace.as_secs(), "shutting down: /readyz answers 503, still accepting until the drain starts; send the signal again to exit at once");
        std::thread::sleep(settings.drain_grace);
    }
    tracing::info!(signal = ?first, window_secs = settings.drain_window.as_secs(), "draining: no new connections; send the signal again to exit at once");
    lifecycle::DRAINING.store(true, Ordering::Release);
    notifier.send(&Event::Status(&format!(
        "draining: closing connections with 1001 over {} s",
        settings.drain_window.as_secs()
    )));
    let deadline = Instant::now() + settings.drain_window + Duration::from_secs(5);
    for _ in 0..settings.shards {
        let left = deadline.saturating_duration_since(Instant::now());
        if done.recv_timeout(left).is_err() {
            tracing::warn!("drain window passed with connections still open; exiting");
            break;
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

async fn shard_main(setup: ShardSetup) {
    let ShardSetup {
        id,
        settings,
        publisher,
        registry,
        presence,
        slots,
        ingest_slots,
        per_ip,
        sockets,
        wake_senders,
        wake_receivers,
        control_receiver,
        control_senders,
        inbox,
        started,
        done,
    } = setup;
    let (inbox, inbox_queues) = match inbox {
        Some((inbox, queues)) => (Some(inbox), Some(queues)),
        None => (None, None),
    };
    let shard = match Shard::new(
        id,
        settings.clone(),
        publisher.clone(),
        registry.clone(),
        presence,
        slots,
        inbox.clone(),
    ) {
        Ok(shard) => Rc::new(shard),
        Err(e) => {
            let _ = started.send(Err(StartError::Shard {
                shard: id,
                message: format!("creating the shard's epoll set: {e} (fs.epoll.max_user_instances? RLIMIT_NOFILE?)"),
            }));
            return;
        }
    };
    let wake = Rc::new(LocalEvent::default());
    for rx in wake_receivers {
        let wake = wake.clone();
        glommio::spawn_local(async move {
            let rx = rx.connect().await;
            while rx.recv().await.is_some() {
                wake.notify();
            }
        })
        .detach();
    }
    let mut connected = Vec::with_capacity(wake_senders.len());
    for tx in wake_senders {
        connected.push(tx.connect().await);
    }
    install_senders(connected);
    if let Some(queues) = inbox_queues {
        // The store thread publishes from outside any executor: its wake-ups come here.
        let (notify, answers) = (wake.clone(), queues.answers);
        glommio::spawn_local(async move {
            while queues.wake.recv_async().await.is_ok() {
                notify.notify();
            }
        })
        .detach();
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Ok(answer) = answers.recv_async().await {
                shard.on_inbox_answer(answer);
            }
        })
        .detach();
    }
    if crate::cluster::get().is_some() {
        glommio::spawn_local(cluster_publish::serve(shard.clone())).detach();
    }
    if let Some(rx) = crate::cluster::get().and_then(|c| c.shard_wake(id)) {
        // The NATS thread publishes from outside any executor: its wake-ups come here.
        let notify = wake.clone();
        glommio::spawn_local(async move {
            while rx.recv_async().await.is_ok() {
                notify.notify();
            }
        })
        .detach();
    }
    if let Some(answers) = crate::cluster::presence::shard_answers(id) {
        // Cluster presence answers, merged on the NATS thread (src/shard/presence.rs).
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Ok(answer) = answers.recv_async().await {
                shard.on_presence_answer(answer);
            }
        })
        .detach();
    }
    if let Some(answers) = crate::cluster::get().and_then(|c| c.join_answers(id)) {
        // Joins answered by the NATS thread (see shard::join).
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Ok(answer) = answers.recv_async().await {
                shard.on_join_answer(answer);
            }
        })
        .detach();
    }
    glommio::spawn_local(follower::follow_ring(shard.clone(), wake)).detach();
    {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            control::serve(shard, control_receiver.connect().await).await
        })
        .detach();
    }
    glommio::spawn_local(watch_readiness(shard.clone())).detach();

    let metrics = shard.metrics;
    // SAFETY (all from_raw_fd below): each fd comes from a socket2::Socket we own and
    // consumed with into_raw_fd, so the glommio object becomes its only owner.
    if let Some(udp) = sockets.udp {
        let socket = unsafe { UdpSocket::from_raw_fd(udp.into_raw_fd()) };
        glommio::spawn_local(crate::ingest::udp::serve(
            socket,
            publisher.clone(),
            inbox.clone(),
            settings.clone(),
            metrics,
        ))
        .detach();
    }
    if let Some(tcp) = sockets.tcp {
        let listener = unsafe { TcpListener::from_raw_fd(tcp.into_raw_fd()) };
        glommio::spawn_local(crate::ingest::tcp::serve(
            listener,
            publisher.clone(),
            inbox.clone(),
            settings.clone(),
            metrics,
            ingest_slots,
        ))
        .detach();
    }
    if let Some(admin) = sockets.admin {
        let listener = unsafe { TcpListener::from_raw_fd(admin.into_raw_fd()) };
        let (publisher, settings, inbox) = (publisher.clone(), settings.clone(), inbox.clone());
        glommio::spawn_local(async move {
            let mut senders = Vec::with_capacity(control_senders.len());
            for tx in control_senders {
                senders.push(tx.connect().await);
            }
            let control = ShardControl::new(senders);
            crate::admin::serve(listener, publisher, inbox, settings, metrics, control).await
        })
        .detach();
    }
    let stop_accepting = Rc::new(LocalEvent::default());
    if let Some(ws) = sockets.ws {
        let ws = unsafe { TcpListener::from_raw_fd(ws.into_raw_fd()) };
        let gate = HandshakeGate::new(
            settings.max_handshakes_per_shard,
            settings.handshake_fair_share,
            metrics,
        );
        glommio::spawn_local(accept_loop(
            shard.clone(),
            ws,
            gate,
            per_ip.clone(),
            stop_accepting.clone(),
            false,
        ))
        .detach();
    }
    if let Some(tls) = sockets.tls {
        let tls = unsafe { TcpListener::from_raw_fd(tls.into_raw_fd()) };
        // Its own gate: a TLS handshake costs more CPU, and a storm of them must not
        // take the plain listener's upgrade places.
        let gate = HandshakeGate::new(
            settings.max_handshakes_per_shard,
            settings.handshake_fair_share,
            metrics,
        );
        glommio::spawn_local(accept_loop(
            shard.clone(),
            tls,
            gate,
            per_ip.clone(),
            stop_accepting.clone(),
            true,
        ))
        .detach();
    }
    tracing::info!(shard = id, "shard serving");
    let _ = started.send(Ok(()));

    lifecycle::run(shard, stop_accepting).await;
    let _ = done.send(id);
    // Keep serving ingest and admin until the process exits.
    futures_lite::future::pending::<()>().await;
}

async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    gate: Rc<HandshakeGate>,
    per_ip: Option<Arc<PerIpTable>>,
    stop: Rc<LocalEvent>,
    tls: bool,
) {
    // A refusal on the TLS port is counted and closed: a plain-text 503 would only be a
    // TLS error to the client.
    let refuse = |fd, cause: RefuseCause| {
        if tls {
            shard.metrics.refused[cause as usize].fetch_add(1, Ordering::Relaxed);
        } else {
            refuse_now(fd, cause, shard.metrics);
        }
    };
    let accept = async {
        let mut live = crate::live::Cached::new(&shard.settings);
        let mut backoff = AcceptBackoff::new();
        let rate = shard.settings.accept_rate_per_shard;
        let burst = (rate / 10).max(1);
        let mut bucket = TokenBucket::full(burst, Instant::now());
        loop {
            if rate > 0 {
                // Not accepting is the limit: the rest stay in the kernel's accept queue.
                let wait = bucket.wait_secs(Instant::now(), rate, burst);
                if wait > 0.0 {
                    glommio::timer::sleep(Duration::from_secs_f64(wait)).await;
                }
                let _ = bucket.try_take(Instant::now(), rate, burst);
            }
            match listener.accept().await {
                Ok(stream) => {
                    // The handshake duration runs from here to the answer written.
                    let accepted = Instant::now();
                    if live.refresh() {
                        gate.set_limit(live.get().max_handshakes_per_shard);
                        gate.set_fair_share(live.get().handshake_fair_share);
                    }
                    // The table's own descriptor, taken now: out of descriptors, this
                    // client waits here (and the rest in the kernel's accept queue)
                    // rather than getting `101` and then losing the connection.
                    let table_fd = loop {
                        // SAFETY: the stream owns the descriptor for this whole borrow.
                        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
                        match borrowed.try_clone_to_owned() {
                            Ok(fd) => break Some(fd),
                            Err(e) => {
                                let kind = AcceptError::from_errno(e.raw_os_error());
                                if kind == AcceptError::Other {
                                    break None;
                                }
                                pause_accepting(&shard, &mut backoff, kind, &e).await;
                            }
                        }
                    };
                    let peer = stream.peer_addr().ok();
                    // A trusted proxy's client is known only after its PROXY header:
                    // admitted by that address in the upgrade task instead.
                    let proxied = peer.and_then(|peer| {
                        let versions = shard.settings.proxy_header_from(peer.ip())?;
                        Some(ProxiedPeer {
                            versions,
                            peer,
                            per_ip: per_ip.clone(),
                        })
                    });
                    let ip_hold = match (&per_ip, peer) {
                        (Some(table), Some(peer)) if proxied.is_none() => {
                            match table.admit(peer.ip(), Instant::now()) {
                                Ok(hold) => Some(hold),
                                Err(refusal) => {
                                    refuse(stream.as_raw_fd(), per_ip_cause(refusal));
                                    backoff.on_success();
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    // The address the fair share counts: a trusted proxy's sockets stand
                    // for many clients and are never counted against one.
                    let source = match (&proxied, peer) {
                        (None, Some(peer)) => Some(shard.settings.per_ip.key(peer.ip())),
                        _ => None,
                    };
                    match (gate.try_enter(source), table_fd) {
                        (Some(ticket), Some(fd)) => {
                            let mut ticket = ticket.with_table_fd(fd);
                            if let Some(hold) = ip_hold {
                                ticket = ticket.with_ip_hold(hold);
                            }
                            if let Some(proxied) = proxied {
                                ticket = ticket.with_proxied(proxied);
                            }
                            if tls {
                                // The newest certificate (SIGHUP), else the start's.
                                let config = live.get().tls.clone().or_else(|| {
                                    shard.settings.tls.as_ref().map(|t| t.server_config.clone())
                                });
                                if let Some(config) = config {
                                    let upgrade = handshake::upgrade_tls(
                                        shard.clone(),
                                        stream,
                                        ticket,
                                        accepted,
                                        config,
                                    );
                                    glommio::spawn_local(upgrade).detach();
                                }
                            } else {
                                glommio::spawn_local(handshake::upgrade(
                                    shard.clone(),
                                    stream,
                                    ticket,
                                    accepted,
                                ))
                                .detach();
                            }
                        }
                        (Some(_), None) => {} // closed: the socket is already unusable
                        (None, _) => refuse(stream.as_raw_fd(), RefuseCause::HandshakesInFlight),
                    }
                }
                Err(e) => {
                    // Out of descriptors or kernel memory: the queued connection stays in
                    // the kernel's accept queue; open connections are not touched.
                    let kind = AcceptError::from_errno(e.raw_os_error());
                    pause_accepting(&shard, &mut backoff, kind, &e).await;
                    continue;
                }
            }
            backoff.on_success();
        }
    };
    futures_lite::future::or(accept, stop.wait()).await;
    drop(listener);
}

/// Counts an accept-side resource error, logs it if this interval has no line yet, and
/// sleeps for the backoff's pause.
async fn pause_accepting(
    shard: &Shard,
    backoff: &mut AcceptBackoff,
    kind: AcceptError,
    error: &dyn std::fmt::Display,
) {
    shard.metrics.accept_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    let pause = backoff.on_error(Instant::now());
    if let Some(errors) = pause.log {
        tracing::warn!(
            shard = shard.id,
            error = %error,
            reason = kind.label(),
            errors,
            pause_ms = pause.sleep.as_millis() as u64,
            "accept failed; not accepting for a while, open connections are kept: {}",
            kind.fix()
        );
    }
    glommio::timer::sleep(pause.sleep).await;
}

/// Waits for ready sockets on the blocking pool and handles them on the shard.
async fn watch_readiness(shard: Rc<Shard>) {
    let ready_set = shard.ready_set.clone();
    loop {
        let set = ready_set.clone();
        // A bounded wait, so the blocking thread never outlives a drain by long.
        let batch = glommio::executor()
            .spawn_blocking(move || set.wait(1000))
            .await;
        for ready in batch {
            conn::on_ready(&shard, ready);
        }
        shard.settle();
    }
}

fn explain_executor_error(e: &glommio::GlommioError<()>) -> String {
    let text = e.to_string();
    let os = match e {
        glommio::GlommioError::IoError(io) => io.raw_os_error(),
        _ => None,
    };
    let hint = match os {
        Some(libc::ENOMEM) => "io_uring setup ran out of locked memory: raise RLIMIT_MEMLOCK (systemd LimitMEMLOCK=, see kernel-tuning/ringcast.service) or lower io_memory",
        Some(libc::EPERM) => "io_uring is not permitted: check the kernel.io_uring_disabled sysctl, seccomp profile or container runtime",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors: raise LimitNOFILE",
        Some(libc::ENOSYS) => "this kernel has no io_uring (Linux 5.8 or newer is required)",
        _ => "see kernel-tuning/README.md for the limits ringcast needs",
    };
    format!("{text}: {hint}")
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, usize::from);
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => {
            let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect();
            if cpus.is_empty() {
                (0..all).collect()
            } else {
                cpus
            }
        }
        Err(_) => (0..all).collect(),
    }
}

/// Raises the soft fd limit to the hard limit and says what the hard limit allows.
fn raise_fd_limit(settings: &Settings) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let usable = hard.saturating_sub(64 + 8 * settings.shards as u64);
    if (settings.max_connections as u64) > usable {
        tracing::warn!(
            rlimit_nofile = hard,
            max_connections = settings.max_connections,
            "RLIMIT_NOFILE allows only about {usable} connections; raise LimitNOFILE (kernel-tuning/) or lower max_connections"
        );
    }
}
