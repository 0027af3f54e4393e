//! Shards: one pinned glommio executor per core, each serving its own SO_REUSEPORT
//! listeners, connection table and subscription index, all following the one fan-out ring.
//!
//! [`serve`] is what one shard thread runs: it builds the shard, starts its tasks (ring
//! follower, wake-ups, ingest, admin, accept loops, readiness), reports through
//! [`ShardSetup::started`] that it serves, then drains when told. The process around the
//! shards (binding, spawning, reload, drain wait) is [`crate::server`].

pub mod accept;
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

use crate::admission::per_ip::PerIpTable;
use crate::auth::registry::Registry;
use crate::config::Settings;
use crate::fanout::publisher::Publisher;
use crate::fanout::wake::install_senders;
use crate::inbox::Inbox;
use crate::inbox::ShardQueues;
use crate::ingest::route::Routes;
use crate::presence::Presence;
use crate::shard::accept::accept_loop;
use crate::shard::admission::{ConnectionSlots, HandshakeGate};
use crate::shard::control::{ShardControl, ShardRequest};
use crate::shard::follower::LocalEvent;
use crate::shard::state::Shard;
use glommio::channels::shared_channel::{SharedReceiver, SharedSender};
use glommio::net::{TcpListener, UdpSocket};
use socket2::Socket;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use thiserror::Error;

/// Why one shard did not start serving.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The shard's executor (io_uring instance) or thread could not be created.
    #[error("starting shard {shard} on CPU {cpu}: {message}")]
    Executor {
        /// Shard number.
        shard: usize,
        /// CPU it was to be pinned to.
        cpu: usize,
        /// What failed and what to change.
        message: String,
    },
    /// The shard's executor ran but its own setup failed.
    #[error("setting up shard {shard}: {message}")]
    Setup {
        /// Shard number.
        shard: usize,
        /// What failed.
        message: String,
    },
}

/// The sockets one shard serves, bound before any shard starts.
pub struct ShardSockets {
    /// Its share of the WebSocket listener (SO_REUSEPORT).
    pub ws: Option<Socket>,
    /// The `tls_listen` listener, when configured.
    pub tls: Option<Socket>,
    /// The UDP ingest socket, when configured.
    pub udp: Option<Socket>,
    /// The TCP ingest listener, when configured.
    pub tcp: Option<Socket>,
    /// The admin HTTP listener: shard 0 only.
    pub admin: Option<Socket>,
}

/// Everything a shard executor needs, moved into its thread.
pub struct ShardSetup {
    /// Shard number.
    pub id: usize,
    /// The settings of the start.
    pub settings: Arc<Settings>,
    /// The process's publisher (and through it the fan-out ring).
    pub publisher: Arc<Publisher>,
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
    pub lifecycle: Arc<lifecycle::Lifecycle>,
    /// The cluster, when this node is part of one.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Every counter of the process.
    pub metrics: &'static crate::metrics::Metrics,
    /// The sockets this shard serves.
    pub sockets: ShardSockets,
    /// Wake-ups to every shard (this one included) when this shard publishes.
    pub wake_senders: Vec<SharedSender<()>>,
    /// Wake-ups from every shard's publishes.
    pub wake_receivers: Vec<SharedReceiver<()>>,
    /// This shard's queue of admin requests.
    pub control_receiver: SharedReceiver<ShardRequest>,
    /// Senders to every shard's control queue: only for the shard serving the admin port.
    pub control_senders: Vec<SharedSender<ShardRequest>>,
    /// The durable inbox, when on, and this shard's queues from its store thread.
    pub inbox: Option<(Inbox, ShardQueues)>,
    /// Told once: `Ok` when the shard serves, or why it could not start.
    pub started: mpsc::Sender<Result<(), ShardError>>,
    /// Told this shard's number when its drain finished.
    pub done: mpsc::Sender<usize>,
}

/// Runs one shard on the current executor: builds it, starts its tasks, reports through
/// `setup.started`, drains when the process stops, then keeps ingest and admin serving
/// until the process exits (never returns after a successful start).
pub async fn serve(setup: ShardSetup) {
    let ShardSetup {
        id,
        settings,
        publisher,
        registry,
        presence,
        slots,
        ingest_slots,
        per_ip,
        lifecycle,
        cluster,
        metrics: all_metrics,
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
    let routes = Routes {
        publisher: publisher.clone(),
        inbox: inbox.clone(),
        cluster: cluster.clone(),
    };
    let shard = match Shard::new(
        id,
        settings.clone(),
        routes.clone(),
        registry.clone(),
        presence,
        slots,
        all_metrics,
    ) {
        Ok(shard) => Rc::new(shard),
        Err(e) => {
            let _ = started.send(Err(ShardError::Setup {
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
    if cluster.is_some() {
        glommio::spawn_local(cluster_publish::serve(shard.clone())).detach();
    }
    if let Some(rx) = cluster.as_ref().and_then(|c| c.shard_wake(id)) {
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
    if let Some(answers) = cluster.as_ref().and_then(|c| c.join_answers(id)) {
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

    let metrics = shard.engine.metrics;
    if let Some(udp) = sockets.udp {
        let socket = adopt_udp(udp);
        glommio::spawn_local(crate::ingest::udp::serve(
            socket,
            routes.clone(),
            settings.clone(),
            metrics,
        ))
        .detach();
    }
    if let Some(tcp) = sockets.tcp {
        let listener = adopt_listener(tcp);
        glommio::spawn_local(crate::ingest::tcp::serve(
            listener,
            routes.clone(),
            settings.clone(),
            (metrics, all_metrics),
            ingest_slots,
        ))
        .detach();
    }
    if let Some(admin) = sockets.admin {
        let listener = adopt_listener(admin);
        let (routes, settings, lifecycle) = (routes.clone(), settings.clone(), lifecycle.clone());
        glommio::spawn_local(async move {
            let mut senders = Vec::with_capacity(control_senders.len());
            for tx in control_senders {
                senders.push(tx.connect().await);
            }
            let control = ShardControl::new(senders);
            let port = crate::admin::AdminPort {
                routes,
                settings,
                metrics,
                all_metrics,
                control,
                lifecycle,
            };
            crate::admin::serve(listener, port).await
        })
        .detach();
    }
    let stop_accepting = Rc::new(LocalEvent::default());
    if let Some(ws) = sockets.ws {
        let ws = adopt_listener(ws);
        let gate = HandshakeGate::new(
            settings.live.max_handshakes_per_shard,
            settings.live.handshake_fair_share,
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
        let tls = adopt_listener(tls);
        // Its own gate: a TLS handshake costs more CPU, and a storm of them must not
        // take the plain listener's upgrade places.
        let gate = HandshakeGate::new(
            settings.live.max_handshakes_per_shard,
            settings.live.handshake_fair_share,
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

    lifecycle::run(shard, stop_accepting, lifecycle).await;
    let _ = done.send(id);
    // Keep serving ingest and admin until the process exits.
    futures_lite::future::pending::<()>().await;
}

/// Hands a bound, listening socket to glommio.
fn adopt_listener(socket: Socket) -> TcpListener {
    // SAFETY: `into_raw_fd` gives up the socket2 `Socket`'s ownership of an open listening
    // descriptor, so the `TcpListener` becomes its only owner and closes it once.
    unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) }
}

/// Hands a bound UDP socket to glommio.
fn adopt_udp(socket: Socket) -> UdpSocket {
    // SAFETY: `into_raw_fd` gives up the socket2 `Socket`'s ownership of an open datagram
    // descriptor, so the `UdpSocket` becomes its only owner and closes it once.
    unsafe { UdpSocket::from_raw_fd(socket.into_raw_fd()) }
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
