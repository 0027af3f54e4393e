//! Requests from the admin port to every shard, without blocking any of them.
//!
//! The admin server runs on shard 0; a request that concerns every shard's connections
//! (`POST /admin/disconnect?user=`) is delivered to each shard, shard 0 included, over
//! a bounded glommio shared channel: the same mechanism as the fan-out wake-ups
//! ([`crate::fanout::wake`]), which wakes a parked executor through its eventfd. Each
//! shard handles the request between its other tasks and reports into a shared
//! [`Ticket`]; the admin handler awaits the ticket with short timer sleeps, so no thread
//! ever waits on a lock or a blocking receive.

use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::shard::state::Shard;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests a shard's control queue holds before the admin port answers 503.
pub const CONTROL_QUEUE: usize = 64;

/// The close reason an admin disconnect sends (code 4403).
pub const DISCONNECT_REASON: &str = "disconnected by an administrator";

/// A request to one shard.
#[derive(Debug)]
pub enum ShardRequest {
    /// Close every connection of `user` on the shard with 4403.
    DisconnectUser {
        /// The user id (`sub`).
        user: Arc<str>,
        /// Where to report how many were closed.
        ticket: Arc<Ticket>,
    },
}

/// What the shards report for one request.
#[derive(Debug, Default)]
pub struct Ticket {
    closed: AtomicUsize,
    pending: AtomicUsize,
}

impl Ticket {
    fn report(&self, closed: usize) {
        self.closed.fetch_add(closed, Ordering::Relaxed);
        // Release: the count above is visible to whoever sees `pending` reach 0.
        self.pending.fetch_sub(1, Ordering::Release);
    }

    /// Connections closed so far.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::Relaxed)
    }

    /// True once every shard reported.
    pub fn done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }
}

/// Shard 0's senders to every shard's control queue, in shard order.
pub struct ShardControl {
    senders: Vec<ConnectedSender<ShardRequest>>,
}

impl ShardControl {
    /// Control over the shards behind `senders` (one per shard, in shard order).
    pub fn new(senders: Vec<ConnectedSender<ShardRequest>>) -> Rc<Self> {
        Rc::new(ShardControl { senders })
    }

    /// Asks every shard to close `user`'s connections and waits (asynchronously, at most
    /// `timeout`) until all reported. Returns (closed, shards that did not answer: their
    /// queue was full or they did not report in time).
    pub async fn disconnect_user(&self, user: &str, timeout: Duration) -> (usize, usize) {
        let user: Arc<str> = Arc::from(user);
        let ticket = Arc::new(Ticket::default());
        ticket.pending.store(self.senders.len(), Ordering::Release);
        let mut unreached = 0;
        for tx in &self.senders {
            let request = ShardRequest::DisconnectUser {
                user: user.clone(),
                ticket: ticket.clone(),
            };
            if tx.try_send(request).is_err() {
                unreached += 1;
                ticket.report(0);
            }
        }
        let deadline = Instant::now() + timeout;
        while !ticket.done() {
            if Instant::now() >= deadline {
                return (
                    ticket.closed(),
                    ticket.pending.load(Ordering::Acquire) + unreached,
                );
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        (ticket.closed(), unreached)
    }
}

/// Serves this shard's control queue until the process ends.
pub async fn serve(shard: Rc<Shard>, rx: ConnectedReceiver<ShardRequest>) {
    while let Some(request) = rx.recv().await {
        match request {
            ShardRequest::DisconnectUser { user, ticket } => {
                ticket.report(disconnect_user(&shard, &user));
            }
        }
    }
}

/// Closes every connection of `user` on `shard` with 4403; returns how many.
pub fn disconnect_user(shard: &Shard, user: &str) -> usize {
    let reason = CloseReason::new(CloseCode::Forbidden, DISCONNECT_REASON);
    let connections = shard.registry.connections_on(user, shard.id as u32);
    let closed = shard
        .engine
        .close_each(connections, &reason, CloseCause::AdminDisconnect);
    if closed > 0 {
        tracing::info!(shard = shard.id, user, closed, "admin disconnect");
    }
    shard.settle();
    closed
}
