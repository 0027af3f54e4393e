//! TCP ingest: newline-delimited messages, many per connection. A malformed line is
//! answered with `ERR <reason>\n` and the connection goes on. A line longer than
//! `max_message_size` plus room for the channel (256 bytes) gets `ERR line too long` and
//! the connection is closed: past that length the stream can no longer be trusted to be
//! framed the way the publisher meant.
//!
//! # Ack mode
//!
//! A connection whose first line is `ACK ON` is in ack mode (the line itself is not
//! answered and not published): from then on every non-empty line gets exactly one reply
//! line, in order: `OK <offset>` once the message is published (for a `user:` channel
//! with the inbox on: once it is committed to disk, so it survives a crash; on a cluster
//! node: once JetStream stored it, never in a local epoch while NATS is unreachable), or
//! `ERR <reason>`. Without ack mode only malformed lines are answered, as before, and a
//! message to a user channel that the inbox refuses is answered `ERR inbox: <reason>`.
//!
//! # Ingest key
//!
//! With `ingest_key` set, the first non-empty line must be `AUTH <key>` (not answered when
//! right; `ACK ON` may follow it). A missing or wrong key is answered `ERR unauthorized`
//! and the connection is closed without publishing anything. The key in force when the
//! connection was accepted applies to it (a reload affects the next connections).
//!
//! Until that line, a connection holds a 512-byte buffer and nothing else
//! ([`PRE_AUTH_LIMIT`]; its 64 KiB read buffer comes with the key), and it has
//! `ingest_auth_timeout` from accept to send it: then `ERR auth timeout` and close.
//!
//! # Connections
//!
//! At most `max_tcp_ingest_connections` are open over the process; past it a new one is
//! answered `ERR too many ingest connections` and closed.

use crate::cluster::ClusterReply;
use crate::config::Settings;
use crate::fanout::publisher::channels_full;
use crate::inbox::{InboxReply, StoreError};
use crate::ingest::key::{check_auth, AuthCheck, IngestKey, PRE_AUTH_LIMIT};
use crate::ingest::line::{parse_message, strip_newline, IngestError};
use crate::ingest::route::{Routes, Target};
use crate::metrics::{Metrics, ShardMetrics, Source, TcpIngestRefusal};
use crate::shard::admission::ConnectionSlots;
use crate::shard::listener::{accept_allowed, linger_close, PortCap, PortSlot};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Accepts ingest connections on `listener` forever; `slots` counts them over every
/// shard.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    settings: Arc<Settings>,
    (metrics, all_metrics): (&'static ShardMetrics, &'static Metrics),
    slots: Arc<ConnectionSlots>,
) {
    let cap = PortCap {
        slots,
        limit: |live| live.max_tcp_ingest_connections,
        refusal: b"ERR too many ingest connections\n".to_vec(),
        refused: &metrics.tcp_ingest_refused[TcpIngestRefusal::MaxConnections as usize],
        open: &metrics.tcp_ingest_connections,
        setting: "max_tcp_ingest_connections",
    };
    accept_allowed(
        listener,
        "TCP ingest",
        &settings.clone(),
        cap,
        |stream, slot| {
            let settings = settings.clone();
            connection(stream, slot, routes.clone(), settings, metrics, all_metrics)
        },
    )
    .await
}

/// A reply line, ready or waiting for the inbox's commit.
enum Pending {
    Ready(Vec<u8>),
    Commit(flume::Receiver<Result<u64, StoreError>>),
    /// A cluster publish's offset (or why not).
    Cluster(flume::Receiver<Result<u64, String>>),
}

/// The line an ack-mode publisher gets for an inbox commit's outcome.
fn commit_line(outcome: Option<Result<u64, StoreError>>) -> Vec<u8> {
    match outcome {
        Some(Ok(offset)) => format!("OK {offset}\n").into_bytes(),
        Some(Err(e)) => format!("ERR inbox: {e}\n").into_bytes(),
        None => b"ERR inbox: the store thread stopped\n".to_vec(),
    }
}

/// How long a refused publisher's input is read and discarded before the close.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// Answers `line` (an `ERR ...`, within [`REFUSE_LINGER`]) and ends the connection,
/// reading what the publisher still sends for at most that long ([`linger_close`]).
async fn refuse(stream: &mut TcpStream, line: &[u8]) {
    let answered =
        futures_lite::future::or(async { stream.write_all(line).await.is_ok() }, async {
            glommio::timer::sleep(REFUSE_LINGER).await;
            false
        })
        .await;
    if answered {
        linger_close(stream, REFUSE_LINGER).await;
    }
}

/// How a connection's wait for its `AUTH` line ended.
enum PreAuth {
    /// The key was right; the bytes that followed its line.
    Authorized(Vec<u8>),
    /// A wrong or missing key.
    Refused,
    /// No `AUTH` line within `ingest_auth_timeout`.
    TimedOut,
    /// The publisher closed (or the read failed) first.
    Gone,
}

/// Reads until the first non-empty line, at most [`PRE_AUTH_LIMIT`] bytes and for at most
/// `timeout`, and checks it against `key`.
async fn authorize(stream: &mut TcpStream, key: &IngestKey, timeout: Duration) -> PreAuth {
    let read = async {
        let mut buf = [0u8; PRE_AUTH_LIMIT];
        let mut len = 0;
        loop {
            match check_auth(&buf[..len], key) {
                AuthCheck::Authorized { consumed } => {
                    return PreAuth::Authorized(buf[consumed..len].to_vec())
                }
                AuthCheck::Refused => return PreAuth::Refused,
                // Never full here: a full buffer is refused.
                AuthCheck::NeedMore => match stream.read(&mut buf[len..]).await {
                    Ok(n) if n > 0 => len += n,
                    _ => return PreAuth::Gone,
                },
            }
        }
    };
    let deadline = async {
        glommio::timer::sleep(timeout).await;
        PreAuth::TimedOut
    };
    futures_lite::future::or(read, deadline).await
}

async fn connection(
    mut stream: TcpStream,
    _slot: PortSlot,
    routes: Routes,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
    all_metrics: &'static Metrics,
) {
    // None until the first line decides it.
    let mut ack_mode: Option<bool> = None;
    let key = crate::live::Cached::new(&settings).get().ingest_key.clone();
    let mut buf: Vec<u8> = match key {
        None => Vec::with_capacity(8192),
        Some(key) => match authorize(&mut stream, &key, settings.ingest_auth_timeout).await {
            PreAuth::Authorized(rest) => {
                let mut buf = Vec::with_capacity(8192.max(rest.len()));
                buf.extend_from_slice(&rest);
                buf
            }
            PreAuth::Refused => {
                all_metrics.ingest_unauthorized[0].fetch_add(1, Relaxed);
                refuse(&mut stream, b"ERR unauthorized\n").await;
                return;
            }
            PreAuth::TimedOut => {
                metrics.tcp_ingest_refused[TcpIngestRefusal::AuthTimeout as usize]
                    .fetch_add(1, Relaxed);
                refuse(&mut stream, b"ERR auth timeout\n").await;
                return;
            }
            PreAuth::Gone => return,
        },
    };
    let max_line = settings.max_message_size + 256;
    let mut chunk = vec![0u8; 64 * 1024];
    // Bytes that came with the `AUTH` line are lines like any other.
    let mut fresh = !buf.is_empty();
    loop {
        if !fresh {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
        }
        fresh = false;
        let mut replies: Vec<Pending> = Vec::new();
        let mut start = 0;
        let mut too_long = false;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            if nl > max_line {
                // Judged by length alone, so the answer does not depend on how the line
                // was split across reads.
                too_long = true;
                break;
            }
            let line = strip_newline(&buf[start..start + nl + 1]);
            start += nl + 1;
            if line.is_empty() {
                continue;
            }
            let acks = match ack_mode {
                Some(on) => on,
                None => {
                    let on = line == b"ACK ON";
                    ack_mode = Some(on);
                    if on {
                        continue;
                    }
                    on
                }
            };
            match parse_message(line, settings.max_message_size) {
                Ok((channel, _))
                    if !routes
                        .publisher
                        .has_room_for(channel, settings.max_channels) =>
                {
                    metrics.channels_refused.fetch_add(1, Relaxed);
                    let refusal = channels_full(settings.max_channels);
                    replies.push(Pending::Ready(format!("ERR {refusal}\n").into_bytes()));
                }
                Ok((channel, payload)) => {
                    metrics.messages_in[Source::Tcp as usize].fetch_add(1, Relaxed);
                    match routes.target(channel) {
                        Target::Inbox(inbox) => {
                            let (reply, wait) = if acks {
                                let (tx, rx) = flume::bounded(1);
                                (InboxReply::Wait(tx), Some(rx))
                            } else {
                                (InboxReply::None, None)
                            };
                            // A full queue holds this connection back (not read meanwhile).
                            match inbox.publish_waiting(channel, payload, reply).await {
                                Ok(()) => replies.extend(wait.map(Pending::Commit)),
                                Err(e) => replies.push(Pending::Ready(commit_line(Some(Err(
                                    e.to_store_error()
                                ))))),
                            }
                        }
                        Target::Cluster(cluster) => {
                            let (reply, wait) = if acks {
                                let (tx, rx) = flume::bounded(1);
                                (ClusterReply::Stored(tx), Some(rx))
                            } else {
                                (ClusterReply::None, None)
                            };
                            // While publish_queue publishes wait for JetStream, this
                            // connection is not read: TCP holds the sender back.
                            match cluster.publish_waiting(channel, payload, reply).await {
                                Ok(()) => replies.extend(wait.map(Pending::Cluster)),
                                Err(e) => {
                                    replies.push(Pending::Ready(format!("ERR {e}\n").into_bytes()))
                                }
                            }
                        }
                        Target::Local(publisher) => {
                            let published = publisher.publish(channel, payload);
                            if acks {
                                replies.push(Pending::Ready(
                                    format!("OK {}\n", published.offset).into_bytes(),
                                ));
                            }
                        }
                    }
                }
                Err(e) => {
                    metrics.ingest_rejected[Source::Tcp as usize][e.index()].fetch_add(1, Relaxed);
                    replies.push(Pending::Ready(format!("ERR {e}\n").into_bytes()));
                }
            }
        }
        buf.drain(..start);
        too_long |= buf.len() > max_line;
        if too_long {
            metrics.ingest_rejected[Source::Tcp as usize]
                [IngestError::TooLarge { size: 0, limit: 0 }.index()]
            .fetch_add(1, Relaxed);
            replies.push(Pending::Ready(b"ERR line too long\n".to_vec()));
        }
        // In line order; every commit of this read was queued before the first wait, so
        // they share group commits.
        let mut out = Vec::new();
        for reply in replies {
            match reply {
                Pending::Ready(line) => out.extend_from_slice(&line),
                Pending::Commit(rx) => {
                    out.extend_from_slice(&commit_line(rx.recv_async().await.ok()))
                }
                Pending::Cluster(rx) => out.extend_from_slice(
                    &match rx.recv_async().await {
                        Ok(Ok(offset)) => format!("OK {offset}\n"),
                        Ok(Err(e)) => format!("ERR {e}\n"),
                        Err(_) => "ERR cluster: the NATS thread stopped\n".to_string(),
                    }
                    .into_bytes(),
                ),
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if too_long {
            return;
        }
    }
}
