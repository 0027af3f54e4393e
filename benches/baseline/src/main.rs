//! `baseline-tokio`: the reference broadcast server ringcast is benchmarked against.
//!
//! A number for ringcast only means something next to the design most Rust WebSocket
//! fan-out services start from, written the way a careful engineer would write it. This is
//! that design, kept small so anyone can check it is a fair opponent:
//!
//! - one tokio `current_thread` runtime (one core, like one ringcast shard);
//! - tokio-tungstenite, with a 4 KiB read buffer per connection;
//! - one task per connection, fed by a `tokio::sync::broadcast` channel;
//! - the frame text is built once per message and shared (`Utf8Bytes` is reference counted);
//! - write coalescing: a task `feed`s everything queued in its receiver, then `flush`es once.
//!
//! The wire output matches ringcast's, so the same load harness and the same checks apply:
//! every message arrives as one text frame `{"channel":"<ch>","offset":<n>,"data":<payload>}`
//! with per-channel offsets starting at 1, and the payload embedded as-is when it is valid
//! JSON, else as a JSON string. Messages come in on a UDP socket, one `<channel> <payload>`
//! datagram each. Unlike ringcast there are no subscriptions: every connection (any path)
//! receives every message. A receiver that falls behind by more than `--capacity` messages
//! skips ahead; the skipped messages are counted and the connection keeps going.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Command line of the baseline server.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Reference tokio + tungstenite broadcast server (benchmark baseline)"
)]
struct Args {
    /// WebSocket listen address; upgrades are accepted on any path. Default: 127.0.0.1:8081
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// UDP ingest address; each datagram is `<channel> <payload>`. Default: 127.0.0.1:9100
    #[arg(long, default_value = "127.0.0.1:9100")]
    udp: SocketAddr,
    /// Messages a connection may fall behind before it skips ahead. Default: 65536
    #[arg(long, default_value_t = 65536)]
    capacity: usize,
}

/// Process-wide counters, printed every ten seconds when they change.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    published: AtomicU64,
    malformed: AtomicU64,
    lagged: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio current_thread runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the WebSocket listener on {}", args.listen))?;
    let udp = UdpSocket::bind(args.udp)
        .await
        .with_context(|| format!("binding the UDP ingest socket on {}", args.udp))?;
    let (tx, _) = broadcast::channel::<Utf8Bytes>(args.capacity.max(1));
    let counters = Arc::new(Counters::default());
    eprintln!(
        "baseline-tokio ready ws={} udp={}",
        listener
            .local_addr()
            .context("reading the listener address")?,
        udp.local_addr().context("reading the UDP ingest address")?
    );
    tokio::spawn(ingest(udp, tx.clone(), counters.clone()));
    tokio::spawn(report(counters.clone()));
    let config = WebSocketConfig::default().read_buffer_size(4096);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning on the error.
                eprintln!("baseline-tokio: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Subscribe before the handshake, so nothing published after the 101 is missed.
        let rx = tx.subscribe();
        tokio::spawn(serve(stream, rx, config, counters.clone()));
    }
}

/// One connection: handshake, then forward broadcast frames until either side goes away.
async fn serve(
    stream: TcpStream,
    mut rx: broadcast::Receiver<Utf8Bytes>,
    config: WebSocketConfig,
    counters: Arc<Counters>,
) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let _ = pump(&mut ws, &mut rx, &counters).await;
    counters.connections.fetch_sub(1, Ordering::Relaxed);
}

async fn pump(
    ws: &mut WebSocketStream<TcpStream>,
    rx: &mut broadcast::Receiver<Utf8Bytes>,
    counters: &Counters,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    loop {
        tokio::select! {
            first = rx.recv() => {
                match first {
                    Ok(text) => ws.feed(Message::Text(text)).await?,
                    Err(RecvError::Lagged(n)) => {
                        counters.lagged.fetch_add(n, Ordering::Relaxed);
                        continue;
                    }
                    Err(RecvError::Closed) => return Ok(()),
                }
                // Coalesce: everything already queued goes out with a single flush.
                loop {
                    match rx.try_recv() {
                        Ok(text) => ws.feed(Message::Text(text)).await?,
                        Err(TryRecvError::Lagged(n)) => {
                            counters.lagged.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                    }
                }
                ws.flush().await?;
            }
            incoming = ws.next() => match incoming {
                // Pings and closes are answered by tungstenite itself; data is ignored.
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return Ok(()),
            },
        }
    }
}

/// Reads `<channel> <payload>` datagrams and broadcasts each as one ready-made frame text.
async fn ingest(udp: UdpSocket, tx: broadcast::Sender<Utf8Bytes>, counters: Arc<Counters>) {
    let mut buf = vec![0u8; 65536];
    let mut offsets: HashMap<String, u64> = HashMap::new();
    loop {
        let len = match udp.recv(&mut buf).await {
            Ok(len) => len,
            Err(err) => {
                eprintln!("baseline-tokio: UDP receive failed: {err}");
                continue;
            }
        };
        match encode(&buf[..len], &mut offsets) {
            Some(frame) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
                // An error only means nobody is connected right now.
                let _ = tx.send(frame);
            }
            None => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Builds `{"channel":..,"offset":..,"data":..}` for one datagram; `None` if malformed.
fn encode(datagram: &[u8], offsets: &mut HashMap<String, u64>) -> Option<Utf8Bytes> {
    let datagram = datagram.strip_suffix(b"\n").unwrap_or(datagram);
    let datagram = datagram.strip_suffix(b"\r").unwrap_or(datagram);
    let space = datagram.iter().position(|&b| b == b' ')?;
    let (channel, payload) = (&datagram[..space], &datagram[space + 1..]);
    let channel = std::str::from_utf8(channel).ok()?;
    if channel.is_empty() || payload.is_empty() {
        return None;
    }
    let offset = match offsets.get_mut(channel) {
        Some(offset) => offset,
        None => offsets.entry(channel.to_owned()).or_insert(0),
    };
    *offset += 1;
    let mut text = String::with_capacity(payload.len() + channel.len() + 48);
    text.push_str("{\"channel\":");
    text.push_str(&serde_json::to_string(channel).ok()?);
    text.push_str(",\"offset\":");
    text.push_str(&offset.to_string());
    text.push_str(",\"data\":");
    match std::str::from_utf8(payload) {
        Ok(json) if serde_json::from_str::<serde::de::IgnoredAny>(json).is_ok() => {
            text.push_str(json)
        }
        _ => text.push_str(&serde_json::to_string(&String::from_utf8_lossy(payload)).ok()?),
    }
    text.push('}');
    Some(text.into())
}

/// Prints the counters every ten seconds when anything changed.
async fn report(counters: Arc<Counters>) {
    let mut last = [0u64; 4];
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = [
            counters.connections.load(Ordering::Relaxed),
            counters.published.load(Ordering::Relaxed),
            counters.malformed.load(Ordering::Relaxed),
            counters.lagged.load(Ordering::Relaxed),
        ];
        if now != last {
            eprintln!(
                "baseline-tokio: connections={} published={} malformed={} lagged={}",
                now[0], now[1], now[2], now[3]
            );
            last = now;
        }
    }
}
