//! One subscriber socket: non-blocking connect, handshake, then frame reading.
//!
//! A connection owns no buffer while idle. Bytes are read into the worker's scratch
//! buffer and parsed in place; only a frame (or handshake answer) split across reads is
//! copied into `buf` until it completes, and `buf` is freed once it is drained. The
//! worker drives this through [`Conn::on_event`] and [`Conn::read`], and learns about
//! endings through [`End`]; what the connection observes goes to the [`Recorder`].

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::dial::{self, cause_of};
use super::record::Recorder;
use crate::recover::{self, RecoverTracker};
use crate::seq::{parse_sample, SeqTracker};
use crate::sseproto;
use crate::wsproto::{self, FrameHead};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for its turn to connect.
    Queued,
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for 101.
    Handshaking,
    /// Receiving messages.
    Open,
    /// Gave up (failed and not retried, or ended and not reconnected).
    Done,
}

/// Why a connection stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// An error, by cause (`refused`, `timeout`, `http_503`, `reset`, …).
    Failed(String),
    /// The server closed: its close code, or 1006 when it closed without a close frame.
    Closed(u16),
}

/// The request line pieces every connection of a worker shares.
pub struct Upgrade {
    /// `Host` header.
    pub host: String,
    /// Path and query.
    pub path: String,
    /// `GET` the path and read Server-Sent Events (ringcast's `/sse`) instead of
    /// upgrading to a WebSocket.
    pub sse: bool,
}

/// One subscriber.
pub struct Conn {
    /// Subscriber is slow (scenario `slow`).
    pub slow: bool,
    /// Where it is in its life.
    pub state: State,
    /// Bumped on every attempt, so stale timeouts are recognised.
    pub generation: u32,
    /// When the current attempt started.
    pub started: Instant,
    /// When it lost its connection, while waiting to be reconnected.
    pub down_since: Option<Instant>,
    /// Completed a handshake at least once.
    pub ever_open: bool,
    /// Set when the handshake completes; the worker clears it.
    pub just_opened: bool,
    /// Failed attempts in a row (reconnect backoff).
    pub attempts: u32,
    /// Delivery accounting across all of its connections.
    pub tracker: SeqTracker,
    /// Scenario `recover`: subscribes by command, recovers after reconnects, and is
    /// accounted for by offset instead of `tracker`.
    pub recover: Option<Box<RecoverTracker>>,
    stream: Option<TcpStream>,
    key: String,
    buf: Vec<u8>,
    frag: Vec<u8>,
    out: Vec<u8>,
    /// The current attempt reads Server-Sent Events.
    sse: bool,
}

impl Conn {
    /// A queued subscriber.
    pub fn new(slow: bool, recover: Option<RecoverTracker>, now: Instant) -> Conn {
        Conn {
            slow,
            state: State::Queued,
            generation: 0,
            started: now,
            down_since: None,
            ever_open: false,
            just_opened: false,
            attempts: 0,
            tracker: SeqTracker::new(),
            recover: recover.map(Box::new),
            stream: None,
            key: String::new(),
            buf: Vec::new(),
            frag: Vec::new(),
            out: Vec::new(),
            sse: false,
        }
    }

    /// Starts a non-blocking connect to `target` from `source` and registers the socket.
    ///
    /// # Errors
    /// The failure cause when the socket cannot even be created, bound or registered.
    pub fn connect(
        &mut self,
        target: SocketAddr,
        source: Option<IpAddr>,
        rcvbuf: Option<usize>,
        registry: &Registry,
        token: Token,
    ) -> Result<(), String> {
        self.generation = self.generation.wrapping_add(1);
        self.started = Instant::now();
        let socket = dial::start(target, source, rcvbuf)?;
        let mut stream = TcpStream::from_std(socket.into());
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| cause_of(&e))?;
        self.stream = Some(stream);
        self.state = State::Connecting;
        Ok(())
    }

    /// Handles a readiness event: finishes the connect, flushes pending writes, reads.
    ///
    /// # Errors
    /// How the connection ended, if it did.
    pub fn on_event(
        &mut self,
        writable: bool,
        upgrade: &Upgrade,
        scratch: &mut [u8],
        rec: &mut Recorder,
        read: bool,
    ) -> Result<(), End> {
        if self.state == State::Connecting {
            let stream = self
                .stream
                .as_ref()
                .ok_or_else(|| End::Failed("no_socket".into()))?;
            if let Ok(Some(err)) | Err(err) = stream.take_error() {
                return Err(End::Failed(cause_of(&err)));
            }
            match stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(End::Failed(cause_of(&e))),
            }
            self.state = State::Handshaking;
            self.sse = upgrade.sse;
            let request = if upgrade.sse {
                sseproto::request(&upgrade.host, &upgrade.path)
            } else {
                self.key = wsproto::new_key();
                wsproto::request(&upgrade.host, &upgrade.path, &self.key)
            };
            self.write(&request, rec);
        } else if writable && !self.out.is_empty() {
            self.flush(rec);
        }
        if read {
            self.read(scratch, rec, usize::MAX)
        } else {
            Ok(())
        }
    }

    /// Reads until the socket is drained or `budget` bytes were taken.
    ///
    /// # Errors
    /// How the connection ended, if it did.
    pub fn read(
        &mut self,
        scratch: &mut [u8],
        rec: &mut Recorder,
        budget: usize,
    ) -> Result<(), End> {
        let mut left = budget;
        while left > 0 {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(());
            };
            let want = scratch.len().min(left);
            match stream.read(&mut scratch[..want]) {
                Ok(0) if self.state == State::Handshaking => {
                    return Err(End::Failed("closed_during_handshake".into()))
                }
                Ok(0) => return Err(End::Closed(1006)),
                Ok(n) => {
                    left -= n;
                    rec.now_ns = crate::ipc::unix_nanos();
                    self.ingest(&scratch[..n], rec)?;
                    // A short read drained the socket. Stopping here saves the EAGAIN
                    // read (half the syscalls at one message per wakeup); data arriving
                    // later raises a new edge-triggered event.
                    if n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Failed(cause_of(&e))),
            }
        }
        Ok(())
    }

    fn ingest(&mut self, data: &[u8], rec: &mut Recorder) -> Result<(), End> {
        if self.state == State::Handshaking {
            self.buf.extend_from_slice(data);
            let parsed = if self.sse {
                sseproto::parse_response(&self.buf)
            } else {
                wsproto::parse_response(&self.buf, &self.key)
            };
            let head = match parsed {
                Ok(None) => return Ok(()),
                Ok(Some(head)) => head,
                Err(e) => return Err(End::Failed(e.cause())),
            };
            self.state = State::Open;
            self.tracker.new_connection();
            self.ever_open = true;
            self.just_opened = true;
            self.attempts = 0;
            self.key = String::new();
            if let Some(t) = self.recover.as_deref_mut() {
                let cmd = t.command();
                self.send(wsproto::OP_TEXT, &cmd, rec);
            }
            let rest = std::mem::take(&mut self.buf);
            return self.ingest_frames(&rest[head..], rec);
        }
        self.ingest_frames(data, rec)
    }

    fn ingest_frames(&mut self, data: &[u8], rec: &mut Recorder) -> Result<(), End> {
        if self.buf.is_empty() {
            let used = self.frames(data, rec)?;
            if used < data.len() {
                self.buf = data[used..].to_vec();
            }
        } else {
            let mut buf = std::mem::take(&mut self.buf);
            buf.extend_from_slice(data);
            let used = self.frames(&buf, rec)?;
            if used < buf.len() {
                buf.drain(..used);
                self.buf = buf;
            }
        }
        Ok(())
    }

    /// Handles every complete frame (or SSE event) in `data`; returns the bytes consumed.
    fn frames(&mut self, data: &[u8], rec: &mut Recorder) -> Result<usize, End> {
        if self.sse {
            return self.events(data, rec);
        }
        let mut pos = 0;
        loop {
            let head = match wsproto::parse_head(&data[pos..]) {
                Ok(Some(head)) if head.total_len() <= data.len() - pos => head,
                Ok(_) => return Ok(pos),
                Err(_) => return Err(End::Failed("protocol_error".into())),
            };
            let payload = &data[pos + head.header_len..pos + head.total_len()];
            self.frame(head, payload, rec)?;
            pos += head.total_len();
        }
    }

    /// Handles every complete SSE event in `data`: each `data:` is a message's JSON
    /// (accounted like a WebSocket text frame), a subscribe reply (not a delivery) or the
    /// server's close event; returns the bytes consumed.
    fn events(&mut self, data: &[u8], rec: &mut Recorder) -> Result<usize, End> {
        let mut pos = 0;
        while let Some(event) = sseproto::next_event(&data[pos..]) {
            pos += event.len;
            let Some(json) = event.data else {
                continue;
            };
            if let Some(code) = sseproto::close_code(json) {
                return Err(End::Closed(code));
            }
            if !sseproto::is_reply(json) {
                self.message(json, rec);
            }
        }
        Ok(pos)
    }

    fn frame(&mut self, head: FrameHead, payload: &[u8], rec: &mut Recorder) -> Result<(), End> {
        match head.opcode {
            wsproto::OP_TEXT | wsproto::OP_BINARY if head.fin => self.message(payload, rec),
            wsproto::OP_TEXT | wsproto::OP_BINARY => self.frag = payload.to_vec(),
            wsproto::OP_CONTINUATION => {
                self.frag.extend_from_slice(payload);
                if head.fin {
                    let whole = std::mem::take(&mut self.frag);
                    self.message(&whole, rec);
                }
            }
            wsproto::OP_PING => self.send(wsproto::OP_PONG, payload, rec),
            wsproto::OP_CLOSE => {
                self.send(wsproto::OP_CLOSE, &payload[..payload.len().min(2)], rec);
                return Err(End::Closed(wsproto::close_code(payload)));
            }
            _ => {}
        }
        Ok(())
    }

    fn message(&mut self, payload: &[u8], rec: &mut Recorder) {
        if let Some(t) = self.recover.as_deref_mut() {
            return recover_message(t, payload, rec);
        }
        let sample = parse_sample(payload);
        let Some(seq) = sample.seq else {
            rec.unparsed(self.slow);
            return;
        };
        self.tracker.observe(seq);
        if let Some(offset) = sample.offset {
            self.tracker.observe_offset(offset);
        }
        let latency = sample.ts_nanos.map(|ts| rec.now_ns.saturating_sub(ts));
        rec.delivery(self.slow, latency);
    }

    /// Sends one masked frame (pong, close, command).
    pub fn send(&mut self, opcode: u8, payload: &[u8], rec: &mut Recorder) {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        wsproto::encode_client_frame(opcode, payload, &mut frame);
        self.write(&frame, rec);
    }

    fn write(&mut self, bytes: &[u8], rec: &mut Recorder) {
        if !self.out.is_empty() {
            self.out.extend_from_slice(bytes);
            return;
        }
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        match stream.write(bytes) {
            Ok(n) if n < bytes.len() => self.out = bytes[n..].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => self.out = bytes.to_vec(),
            Err(_) => rec.write_errors += 1,
        }
    }

    fn flush(&mut self, rec: &mut Recorder) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        match stream.write(&self.out) {
            Ok(n) => {
                self.out.drain(..n);
                if self.out.is_empty() {
                    self.out = Vec::new();
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => {
                rec.write_errors += 1;
                self.out = Vec::new();
            }
        }
    }

    /// Stops (or resumes) readiness events for this socket.
    pub fn set_listening(&mut self, registry: &Registry, token: Token, on: bool) {
        if let Some(stream) = self.stream.as_mut() {
            let _ = if on {
                registry.register(stream, token, Interest::READABLE | Interest::WRITABLE)
            } else {
                registry.deregister(stream)
            };
        }
    }

    /// Closes the socket (after a polite close frame when `polite`; an SSE stream just
    /// closes) and frees buffers.
    pub fn shutdown(&mut self, registry: &Registry, polite: bool, rec: &mut Recorder) {
        if polite && self.state == State::Open && !self.sse {
            self.send(wsproto::OP_CLOSE, &1000u16.to_be_bytes(), rec);
        }
        if let Some(mut stream) = self.stream.take() {
            let _ = registry.deregister(&mut stream);
        }
        self.key = String::new();
        self.buf = Vec::new();
        self.frag = Vec::new();
        self.out = Vec::new();
    }
}

/// A `recover` subscriber's text frame: reply, gap notice or message.
fn recover_message(t: &mut RecoverTracker, payload: &[u8], rec: &mut Recorder) {
    match recover::classify(payload) {
        recover::Frame::Reply(reply) => {
            let event = t.on_reply(&reply);
            rec.recover_event(t, event);
        }
        recover::Frame::Gap => t.on_gap_notice(),
        recover::Frame::Message(sample) => {
            if let Some(event) = sample.offset.and_then(|o| t.on_message(o)) {
                rec.recover_event(t, event);
            }
            let latency = sample.ts_nanos.map(|ts| rec.now_ns.saturating_sub(ts));
            rec.delivery(false, latency);
        }
        recover::Frame::Other => rec.unparsed(false),
    }
}
