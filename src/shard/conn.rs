//! One connection's task: upgrade, then read commands and keep the socket writable.
//!
//! After the upgrade the task is a hand-written future ([`Session`]) rather than an
//! `async` loop so that an idle connection costs only what it must: the glommio stream
//! (non-buffered: glommio's buffered stream would hold a receive buffer per socket), the
//! frame decoder (no allocation unless a fragmented message is in flight) and a partial
//! input buffer that exists only while a frame is split across reads. Reads go into the
//! shard's scratch buffer.

use crate::metrics::CloseCause;
use crate::proto::close::{CloseCode, CloseReason};
use crate::proto::command::{parse_command, Command, Reply};
use crate::proto::frame::{encode_close, encode_frame, opcode, FrameDecoder, Inbound};
use crate::proto::upgrade::{accept_response, http_response, parse_upgrade, MAX_REQUEST_HEAD};
use crate::shard::send::Flush;
use crate::shard::state::Shard;
use crate::shard::table::Conn;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

/// Serves one accepted TCP connection until it closes.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let Some((channels, leftover)) = handshake(&shard, &mut stream).await else {
        return;
    };
    let now = shard.now_secs();
    let key = {
        let mut conns = shard.conns.borrow_mut();
        conns.insert(Conn::new(stream.as_raw_fd(), now)) as u32
    };
    {
        let mut index = shard.index.borrow_mut();
        for ch in channels
            .iter()
            .take(shard.settings.max_subscriptions_per_connection)
        {
            index.subscribe(key, ch);
        }
    }
    shard.metrics.connections.fetch_add(1, Relaxed);
    shard.metrics.accepted.fetch_add(1, Relaxed);
    let mut session = Session {
        shard: shard.clone(),
        key,
        stream,
        decoder: FrameDecoder::new(shard.settings.max_message_size),
        pending_input: leftover,
        inbound_window: (now, 0),
    };
    let outcome = if session.pending_input.is_empty() {
        Ok(())
    } else {
        let mut input = std::mem::take(&mut session.pending_input);
        session.consume(&mut input)
    };
    let close = match outcome {
        Ok(()) => (&mut session).await,
        Err(close) => close,
    };
    session.finish(close).await;
}

/// Reads and answers the upgrade request. Returns the channels and any bytes the client
/// sent after the request head, or `None` when the connection got an HTTP error.
async fn handshake(shard: &Shard, stream: &mut TcpStream) -> Option<(Vec<String>, Vec<u8>)> {
    let _ = stream.set_read_timeout(Some(shard.settings.handshake_timeout));
    let mut head = Vec::with_capacity(512);
    let mut chunk = vec![0u8; 2048];
    let upgrade = loop {
        let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&chunk[..n]);
        match parse_upgrade(&head) {
            Ok(Some(upgrade)) => break upgrade,
            Ok(None) if head.len() <= MAX_REQUEST_HEAD => continue,
            Ok(None) => unreachable!("parse_upgrade rejects heads over MAX_REQUEST_HEAD"),
            Err(reject) => {
                shard.metrics.handshake_rejected.fetch_add(1, Relaxed);
                let _ = stream.write_all(&reject.response()).await;
                return None;
            }
        }
    };
    let open = shard.metrics.connections.load(Relaxed) as usize;
    if open >= shard.max_conns || shard.draining.get() {
        shard.metrics.refused_full.fetch_add(1, Relaxed);
        let body = if shard.draining.get() {
            "server is draining\n"
        } else {
            "server is at its connection limit\n"
        };
        let _ = stream
            .write_all(&http_response(503, "Retry-After: 5\r\n", body))
            .await;
        return None;
    }
    stream
        .write_all(&accept_response(&upgrade.key))
        .await
        .ok()?;
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_nodelay(true);
    let leftover = head.split_off(upgrade.head_len);
    Some((upgrade.channels, leftover))
}

/// The live phase of a connection, polled by glommio until it decides to close.
struct Session {
    shard: Rc<Shard>,
    key: u32,
    stream: TcpStream,
    decoder: FrameDecoder,
    /// Bytes of a frame split across reads; empty (unallocated) otherwise.
    pending_input: Vec<u8>,
    /// (second, frames received in it) for the inbound rate limit.
    inbound_window: (u32, u32),
}

/// How a session ends: the close frame to send (if any) and the metric label.
type Ending = (Option<CloseReason>, CloseCause);

impl Future for Session {
    type Output = Ending;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ending> {
        let this = self.get_mut();
        loop {
            if let Some(end) = this.poll_write_side(cx) {
                return Poll::Ready(end);
            }
            let shard = this.shard.clone();
            let mut scratch = shard.scratch.borrow_mut();
            let read = Pin::new(&mut this.stream).poll_read(cx, &mut scratch);
            match read {
                Poll::Pending => {
                    let mut conns = shard.conns.borrow_mut();
                    if let Some(conn) = conns.get_mut(this.key as usize) {
                        if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            conn.waker = Some(cx.waker().clone());
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => return Poll::Ready((None, CloseCause::PeerGone)),
                Poll::Ready(Err(_)) => return Poll::Ready((None, CloseCause::PeerGone)),
                Poll::Ready(Ok(n)) => {
                    let result = if this.pending_input.is_empty() {
                        this.consume(&mut scratch[..n])
                    } else {
                        let mut input = std::mem::take(&mut this.pending_input);
                        input.extend_from_slice(&scratch[..n]);
                        this.consume(&mut input)
                    };
                    if let Err(end) = result {
                        return Poll::Ready(end);
                    }
                }
            }
        }
    }
}

impl Session {
    /// Flushes a backlog left by the fan-out round and registers for writability when the
    /// socket is full. Returns an ending when a close was requested or the socket failed.
    fn poll_write_side(&mut self, cx: &mut Context<'_>) -> Option<Ending> {
        let shard = self.shard.clone();
        let mut conns = shard.conns.borrow_mut();
        let conn = conns.get_mut(self.key as usize)?;
        if let Some(close) = conn.close.take() {
            return Some((close.reason, close.cause));
        }
        loop {
            match shard.flush(conn) {
                Flush::Done => return None,
                Flush::Failed => return Some((None, CloseCause::IoError)),
                Flush::Blocked => {}
            }
            // glommio's poll_write tries a send and, on EAGAIN, arms a writability poll
            // that wakes this task. Hand it the first unwritten bytes.
            let mut slices = [std::io::IoSlice::new(&[]); 1];
            conn.backlog.io_slices(&mut slices);
            match Pin::new(&mut self.stream).poll_write(cx, &slices[0]) {
                Poll::Ready(Ok(n)) => conn.backlog.advance(n),
                Poll::Ready(Err(_)) => return Some((None, CloseCause::IoError)),
                Poll::Pending => return None,
            }
        }
    }

    /// Decodes and handles every complete frame in `input`; keeps an incomplete tail.
    fn consume(&mut self, input: &mut [u8]) -> Result<(), Ending> {
        let now = self.shard.now_secs();
        if let Some(conn) = self.shard.conns.borrow_mut().get_mut(self.key as usize) {
            conn.last_rx = now;
            conn.pinged = false;
        }
        let mut at = 0;
        while at < input.len() {
            let (used, event) = match self.decoder.decode(&mut input[at..]) {
                Ok(Some(step)) => step,
                Ok(None) => break,
                Err(e) => return Err((Some(CloseReason::from(e)), CloseCause::ProtocolError)),
            };
            at += used;
            let Some(event) = event else { continue };
            if self.inbound_window.0 != now {
                self.inbound_window = (now, 0);
            }
            self.inbound_window.1 += 1;
            if self.inbound_window.1 > self.shard.settings.max_inbound_per_sec {
                let reason = CloseReason::new(CloseCode::Policy, "too many frames per second");
                return Err((Some(reason), CloseCause::Policy));
            }
            handle_event(&self.shard, self.key, event)?;
        }
        if at < input.len() {
            self.pending_input = input[at..].to_vec();
        }
        Ok(())
    }

    /// Sends the close frame (if any), unregisters the connection and closes the socket.
    async fn finish(mut self, (reason, cause): Ending) {
        let shard = self.shard.clone();
        self.shard.index.borrow_mut().remove_conn(self.key);
        let conn = self.shard.conns.borrow_mut().try_remove(self.key as usize);
        shard.metrics.connections.fetch_sub(1, Relaxed);
        shard.metrics.closed[cause as usize].fetch_add(1, Relaxed);
        let Some(mut conn) = conn else { return };
        let left = conn.backlog.bytes();
        if let Some(reason) = reason {
            conn.backlog.discard_unstarted();
            conn.backlog.push_control(
                encode_close(reason.code.code(), &reason.reason),
                &shard.limits,
            );
            // Best effort, bounded: a peer that does not read gets its socket closed anyway.
            let deadline = glommio::timer::sleep(Duration::from_secs(2));
            let write_out = async {
                while !conn.backlog.is_empty() {
                    let mut slices = [std::io::IoSlice::new(&[]); 1];
                    conn.backlog.io_slices(&mut slices);
                    match self.stream.write(&slices[0]).await {
                        Ok(n) if n > 0 => conn.backlog.advance(n),
                        _ => break,
                    }
                }
                let _ = self.stream.shutdown(std::net::Shutdown::Write).await;
                // Wait for the peer's close/EOF so the kernel does not answer unread
                // input with a reset that would destroy our close frame in flight.
                let mut sink = [0u8; 256];
                while let Ok(n) = self.stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            futures_lite::future::or(write_out, async {
                deadline.await;
            })
            .await;
        }
        shard.metrics.backlog_bytes.fetch_sub(left as u64, Relaxed);
    }
}

/// Acts on one client frame.
fn handle_event(shard: &Shard, key: u32, event: Inbound<'_>) -> Result<(), Ending> {
    match event {
        Inbound::Ping(payload) => shard.send_control(key, encode_frame(opcode::PONG, payload)),
        Inbound::Pong => {}
        Inbound::Close(code) => {
            // The decoder already refused codes a client may not send; answer with 1000.
            let _ = code;
            return Err((
                Some(CloseReason::new(CloseCode::Normal, "")),
                CloseCause::ClientClose,
            ));
        }
        Inbound::Text(text) => {
            shard.metrics.commands.fetch_add(1, Relaxed);
            let reply = run_command(shard, key, text);
            shard.send_control(key, encode_frame(opcode::TEXT, reply.as_bytes()));
        }
    }
    Ok(())
}

/// Executes a command and renders its reply.
fn run_command(shard: &Shard, key: u32, text: &str) -> String {
    match parse_command(text) {
        Err(err) => Reply::Error(&err).to_json(),
        Ok(Command::Ping { id }) => Reply::Ok {
            kind: "pong",
            id: id.as_deref(),
            channel: None,
        }
        .to_json(),
        Ok(Command::Subscribe { id, channel }) => {
            let mut index = shard.index.borrow_mut();
            let limit = shard.settings.max_subscriptions_per_connection;
            if index.count_of(key) >= limit && !index.is_subscribed(key, &channel) {
                let error = format!("at most {limit} subscriptions per connection");
                return Reply::Refused {
                    kind: "subscribe",
                    id: id.as_deref(),
                    code: 413,
                    error: &error,
                }
                .to_json();
            }
            index.subscribe(key, &channel);
            Reply::Ok {
                kind: "subscribe",
                id: id.as_deref(),
                channel: Some(&channel),
            }
            .to_json()
        }
        Ok(Command::Unsubscribe { id, channel }) => {
            shard.index.borrow_mut().unsubscribe(key, &channel);
            Reply::Ok {
                kind: "unsubscribe",
                id: id.as_deref(),
                channel: Some(&channel),
            }
            .to_json()
        }
    }
}
