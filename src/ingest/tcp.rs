//! TCP ingest: newline-delimited messages, many per connection. A malformed line is
//! answered with `ERR <reason>\n` and the connection goes on. A line longer than
//! `max_message_size` plus room for the channel (256 bytes) gets `ERR line too long` and
//! the connection is closed: past that length the stream can no longer be trusted to be
//! framed the way the publisher meant.

use crate::config::Settings;
use crate::fanout::publisher::Publisher;
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
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
) {
    accept_allowed(listener, "TCP ingest", &settings.clone(), |stream| {
        connection(stream, publisher.clone(), settings.clone(), metrics)
    })
    .await
}

async fn connection(
    mut stream: TcpStream,
    publisher: Arc<Publisher>,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
) {
    let max_line = settings.max_message_size + 256;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut replies = Vec::new();
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
            match parse_message(line, settings.max_message_size) {
                Ok((channel, payload)) => {
                    publisher.publish(channel, payload);
                    metrics.messages_in[Source::Tcp as usize].fetch_add(1, Relaxed);
                }
                Err(e) => {
                    metrics.ingest_rejected[Source::Tcp as usize][e.index()].fetch_add(1, Relaxed);
                    replies.extend_from_slice(format!("ERR {e}\n").as_bytes());
                }
            }
        }
        buf.drain(..start);
        too_long |= buf.len() > max_line;
        if too_long {
            metrics.ingest_rejected[Source::Tcp as usize]
                [IngestError::TooLarge { size: 0, limit: 0 }.index()]
            .fetch_add(1, Relaxed);
            replies.extend_from_slice(b"ERR line too long\n");
        }
        if !replies.is_empty() && stream.write_all(&replies).await.is_err() {
            return;
        }
        if too_long {
            return;
        }
    }
}
