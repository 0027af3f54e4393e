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

use crate::config::Settings;
use crate::fanout::publisher::Publisher;
use crate::inbox::{is_user_channel, Inbox, InboxReply, StoreError};
use crate::ingest::key::auth_line;
use crate::ingest::line::{parse_message, strip_newline, IngestError};
use crate::metrics::{ShardMetrics, Source};
use crate::shard::listener::accept_allowed;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Accepts ingest connections on `listener` forever.
pub async fn serve(
    listener: TcpListener,
    publisher: Arc<Publisher>,
    inbox: Option<Inbox>,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
) {
    accept_allowed(listener, "TCP ingest", &settings.clone(), |stream| {
        connection(
            stream,
            publisher.clone(),
            inbox.clone(),
            settings.clone(),
            metrics,
        )
    })
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

/// Answers `ERR unauthorized` and ends the connection. What the publisher already sent is
/// read and discarded first (for at most a second): closing with unread input makes the
/// kernel reset the connection, which can destroy the answer before it is read.
async fn refuse(stream: &mut TcpStream, chunk: &mut [u8]) {
    if stream.write_all(b"ERR unauthorized\n").await.is_err() {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let mut left: usize = 1 << 20;
    while left > 0 {
        match stream.read(chunk).await {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    publisher: Arc<Publisher>,
    inbox: Option<Inbox>,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
) {
    // None until the first line decides it.
    let mut ack_mode: Option<bool> = None;
    let key = crate::live::Cached::new(&settings).get().ingest_key.clone();
    let mut authorized = key.is_none();
    let max_line = settings.max_message_size + 256;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
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
            if !authorized {
                match (&key, auth_line(line)) {
                    (Some(key), Some(given)) if key.matches(given) => {
                        authorized = true;
                        continue;
                    }
                    _ => {
                        crate::metrics::get().ingest_unauthorized[0].fetch_add(1, Relaxed);
                        refuse(&mut stream, &mut chunk).await;
                        return;
                    }
                }
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
                Ok((channel, payload)) => {
                    metrics.messages_in[Source::Tcp as usize].fetch_add(1, Relaxed);
                    match &inbox {
                        Some(inbox) if is_user_channel(channel) => {
                            let (reply, wait) = if acks {
                                let (tx, rx) = flume::bounded(1);
                                (InboxReply::Wait(tx), Some(rx))
                            } else {
                                (InboxReply::None, None)
                            };
                            match inbox.publish(channel, payload, reply) {
                                Ok(()) => replies.extend(wait.map(Pending::Commit)),
                                Err(e) => replies.push(Pending::Ready(commit_line(Some(Err(
                                    e.to_store_error()
                                ))))),
                            }
                        }
                        _ if crate::cluster::get().is_some() => {
                            let (reply, wait) = if acks {
                                let (tx, rx) = flume::bounded(1);
                                (crate::cluster::ClusterReply::Stored(tx), Some(rx))
                            } else {
                                (crate::cluster::ClusterReply::None, None)
                            };
                            if let Some(cluster) = crate::cluster::get() {
                                match cluster.publish(channel, payload, reply) {
                                    Ok(()) => replies.extend(wait.map(Pending::Cluster)),
                                    Err(e) => replies
                                        .push(Pending::Ready(format!("ERR {e}\n").into_bytes())),
                                }
                            }
                        }
                        _ => {
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
