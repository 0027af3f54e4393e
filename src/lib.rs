//! ringcast: a thread-per-core io_uring WebSocket server that fans every published
//! message out to every subscriber of its channel.
//!
//! # Layout
//!
//! The folders follow the data path of one message. Two of them are floors the rest
//! stands on: [`proto`] at the bottom imports nothing else of the crate, and [`fanout`]
//! imports only [`proto`] (what it reports upward, such as a channel's first subscriber,
//! goes to a sink its owner gives); `scripts/check-floors.sh` checks both.
//!
//! - [`ingest`]: UDP datagrams, TCP lines and HTTP `POST /publish` become
//!   `(channel, payload)` (pure parsing plus thin listeners); [`ingest::route`] says
//!   where a message goes (the inbox, the cluster or this node's publisher).
//! - [`fanout`]: the channel's offset is taken and the frame encoded once, then pushed into
//!   the shared lock-free [`fanout::ring::Ring`]; every shard follows the ring with its own
//!   cursor and is woken by coalesced cross-core wake-ups.
//! - [`engine`]: a shard's sans-io core: its connection table, subscription index and
//!   the policy of a fan-out round (offers, pauses, overrun healing, catch-up from
//!   history, ticks, close orders), driven by events; it asks its driver only to write a
//!   backlog ([`engine::Wire`]). The seeded simulations drive it for real.
//! - [`shard`]: the engine's driver, one pinned glommio executor per core: SO_REUSEPORT accept, upgrade,
//!   connection table, channel index, the send path (one `sendmsg` carries every queued
//!   frame), heartbeats and drain.
//! - [`server`]: the process above the shards: builds what they share, binds every
//!   socket, starts one shard thread per core, then waits for SIGHUP (reload) and
//!   SIGTERM (drain); sets the process limits.
//! - [`proto`]: sans-io WebSocket: upgrade parsing, frame codec, masking, commands, close
//!   codes, and per connection the [`proto::backlog::SendBacklog`] that bounds what a slow
//!   reader can cost. Nothing there touches a socket or a clock.
//! - [`auth`]: identity and permissions: JWT verification, channel grants, namespace
//!   rules, and the registry of which user is connected on which shard (sans-io apart
//!   from the registry).
//! - [`inbox`]: the durable per-user inbox: one handle and one reply path for shards,
//!   two backends side by side. `inbox/redb/`: a store thread owns a redb file, commits
//!   messages to `user:<id>` channels in groups (one fsync for many), then publishes them
//!   with offsets that survive restarts. `inbox/jetstream/`: the same inbox in JetStream
//!   when the cluster is on. Shards reach either only through queues.
//! - [`presence`]: who is subscribed to a presence channel over every shard (users, or
//!   anonymous connections), and the join/leave events sent through the ring.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/publish` on the admin port.
//! - [`admission`]: what the accept loop and the upgrade decide about a new socket
//!   (accept error backoff), pure, with the clock passed in.
//! - [`tls`]: TLS termination (rustls): the certificate and key, and the sans-io session
//!   the shard drives for a `wss://`/`https://` connection.
//! - [`cluster`]: several nodes joined over NATS: channel offsets and presence on the
//!   NATS thread, and the NATS runtime (`cluster/nats.rs`) it shares with the JetStream
//!   inbox; shards reach both through queues.
//! - [`config`]: TOML file + flags + environment, validated into settings;
//!   [`config_tools`]: `ringcast config check|defaults`; [`live`]: the settings a SIGHUP
//!   may change, swapped while serving.
//! - [`metrics`]: per-shard counters summed into the Prometheus text on a scrape;
//!   [`procstat`]: the standard `process_*` metrics from `/proc`.
//! - [`check_host`]: `ringcast check-host`, the host's limits against a connection target.
//! - [`sd_notify`]: READY/STOPPING/RELOADING/STATUS to systemd (`Type=notify`).

pub mod admin;
pub mod admission;
pub mod auth;
pub mod check_host;
pub mod cluster;
pub mod config;
pub mod config_tools;
pub mod engine;
pub mod fanout;
pub mod inbox;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod presence;
pub mod procstat;
pub mod proto;
pub mod sd_notify;
pub mod server;
pub mod shard;
pub mod tls;
