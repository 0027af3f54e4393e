//! UDP ingest: one datagram, one message. Malformed datagrams are counted (there is no one
//! to answer) and logged at most once per second per shard.
//!
//! With the inbox on, a message to a `user:` channel goes to the store thread and is
//! published once committed. UDP has no acknowledgements: a datagram the store refuses
//! (queue full, disk error) is only counted (`ringcast_inbox_errors_total`); publishers
//! that need to know use TCP ack mode or HTTP `?ack=1`.

use crate::cluster::ClusterReply;
use crate::config::Settings;
use crate::fanout::publisher::channels_full;
use crate::inbox::InboxReply;
use crate::ingest::line::{parse_message, strip_newline};
use crate::ingest::route::{Routes, Target};
use crate::metrics::{ShardMetrics, Source};
use glommio::net::UdpSocket;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receives datagrams on `socket` and publishes them, forever.
pub async fn serve(
    socket: UdpSocket,
    routes: Routes,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
) {
    // Channel + space + payload + "\r\n": the largest datagram worth receiving whole.
    let mut buf = vec![0u8; (settings.max_message_size + 256).min(65_536)];
    let mut last_log: Option<Instant> = None;
    // The allowlist follows reloads: one atomic load per datagram when unchanged.
    let mut live = crate::live::Cached::new(&settings);
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "UDP ingest receive failed");
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !live.get().ingest_allowed(from.ip()) {
            continue;
        }
        match parse_message(strip_newline(&buf[..n]), settings.max_message_size) {
            Ok((channel, _))
                if !routes
                    .publisher
                    .has_room_for(channel, settings.max_channels) =>
            {
                metrics.channels_refused.fetch_add(1, Relaxed);
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_log = Some(Instant::now());
                    tracing::warn!(%from, channel, "UDP ingest datagram dropped: {} (logged at most once per second)", channels_full(settings.max_channels));
                }
            }
            Ok((channel, payload)) => {
                // Refusals are counted by the inbox or the cluster; there is no one to tell.
                match routes.target(channel) {
                    Target::Inbox(inbox) => {
                        let _ = inbox.publish(channel, payload, InboxReply::None);
                    }
                    Target::Cluster(cluster) => {
                        let _ = cluster.publish(channel, payload, ClusterReply::None);
                    }
                    Target::Local(publisher) => {
                        publisher.publish(channel, payload);
                    }
                }
                metrics.messages_in[Source::Udp as usize].fetch_add(1, Relaxed);
            }
            Err(e) => {
                metrics.ingest_rejected[Source::Udp as usize][e.index()].fetch_add(1, Relaxed);
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_log = Some(Instant::now());
                    tracing::warn!(%from, reason = %e, "rejected UDP ingest datagram (logged at most once per second)");
                }
            }
        }
    }
}
