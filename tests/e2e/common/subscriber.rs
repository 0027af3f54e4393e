//! A ringcast subscriber built on tungstenite, the Rust client most services embed.
//!
//! [`Subscriber`] connects over a plain `TcpStream`, decodes each text frame into a
//! [`Delivery`] (`{"channel","offset","data"}`) or a command reply, and answers the
//! server's pings the way tungstenite always does (on the next read). [`OffsetLog`]
//! checks the per-channel offset rule of docs/protocol.md.

use std::collections::BTreeMap;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// One published message as a subscriber received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The channel it was published to.
    pub channel: String,
    /// Its per-channel offset.
    pub offset: u64,
    /// The payload (JSON as published, or a JSON string).
    pub data: Value,
    /// The frame text exactly as received.
    pub raw: String,
}

/// What the next read produced.
#[derive(Debug)]
pub enum Event {
    /// A published message.
    Delivery(Delivery),
    /// A command reply (an object with `reply`).
    Reply(Value),
    /// A ping from the server (tungstenite queues the pong for the next read or write).
    Ping,
    /// The server closed the connection, with its close frame if it sent one.
    Closed(Option<CloseFrame<'static>>),
    /// Nothing arrived in time.
    TimedOut,
}

/// A tungstenite WebSocket client speaking ringcast's protocol.
pub struct Subscriber {
    ws: WebSocket<TcpStream>,
    /// Pings received from the server so far.
    pub pings: usize,
}

impl Subscriber {
    /// Connects to `url` (`ws://host:port/ws?channels=…`).
    ///
    /// # Panics
    /// When the TCP connection or the handshake fails.
    pub fn connect(url: &str) -> Subscriber {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("not a ws:// URL: {url}"));
        let addr = authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve {authority}"));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .expect("write timeout");
        let (ws, response) = tungstenite::client::client(url, stream)
            .unwrap_or_else(|e| panic!("WebSocket handshake with {url} failed: {e}"));
        assert_eq!(response.status().as_u16(), 101, "upgrade of {url}");
        Subscriber { ws, pings: 0 }
    }

    /// Reads the next event, waiting at most `timeout`.
    ///
    /// # Panics
    /// On a frame that is neither a message, a reply, a ping nor a close, and on a read
    /// error.
    pub fn next_event(&mut self, timeout: Duration) -> Event {
        self.read_event(timeout, false)
    }

    /// Like [`Subscriber::next_event`], but a read error (the server was killed: the
    /// connection reset) is [`Event::Closed`] too.
    pub fn next_event_or_gone(&mut self, timeout: Duration) -> Event {
        self.read_event(timeout, true)
    }

    fn read_event(&mut self, timeout: Duration, error_is_close: bool) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Event::TimedOut;
            }
            self.ws
                .get_mut()
                .set_read_timeout(Some(left))
                .expect("read timeout");
            match self.ws.read() {
                Ok(Message::Text(text)) => return decode(text),
                Ok(Message::Ping(_)) => {
                    self.pings += 1;
                    return Event::Ping;
                }
                Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
                Ok(Message::Binary(b)) => panic!(
                    "server sent a binary frame ({} bytes); messages are text",
                    b.len()
                ),
                Ok(Message::Close(frame)) => return Event::Closed(frame),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Event::Closed(None)
                }
                Err(_) if error_is_close => return Event::Closed(None),
                Err(e) => panic!("reading from the server: {e}"),
            }
        }
    }

    /// The next published message, skipping pings and replies; `None` on timeout.
    ///
    /// # Panics
    /// When the server closes the connection.
    pub fn next_delivery(&mut self, timeout: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Delivery(d) => return Some(d),
                Event::Reply(_) | Event::Ping => {}
                Event::Closed(frame) => panic!("server closed the connection: {frame:?}"),
                Event::TimedOut => return None,
            }
        }
    }

    /// Collects `n` messages, failing if they do not all arrive within `timeout`.
    ///
    /// # Panics
    /// On timeout (saying how many arrived) or close.
    pub fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.next_delivery(deadline.saturating_duration_since(Instant::now())) {
                Some(d) => got.push(d),
                None => panic!(
                    "received {} of {n} messages within {timeout:?}; last: {:?}",
                    got.len(),
                    got.last().map(|d: &Delivery| snippet(&d.raw))
                ),
            }
        }
        got
    }

    /// Like [`Subscriber::collect`], but a command reply among the messages fails: for
    /// checks that a channel is delivered *without* a reply.
    ///
    /// # Panics
    /// On timeout, close, or a reply.
    pub fn collect_without_replies(&mut self, n: usize, timeout: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.next_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Delivery(d) => got.push(d),
                Event::Ping => {}
                Event::Reply(v) => panic!("a reply among the messages: {v}"),
                Event::Closed(frame) => panic!("server closed the connection: {frame:?}"),
                Event::TimedOut => {
                    panic!("received {} of {n} messages within {timeout:?}", got.len())
                }
            }
        }
        got
    }

    /// Sends a command (any JSON) as a text frame.
    pub fn send_command(&mut self, command: &Value) {
        self.send_text(&command.to_string());
    }

    /// Sends `text` as a text frame.
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string()))
            .unwrap_or_else(|e| panic!("sending {text:?}: {e}"));
    }

    /// The next command reply, skipping messages and pings.
    ///
    /// # Panics
    /// On timeout or close.
    pub fn next_reply(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Reply(v) => return v,
                Event::Delivery(_) | Event::Ping => {}
                Event::Closed(frame) => {
                    panic!("server closed the connection while a reply was expected: {frame:?}")
                }
                Event::TimedOut => panic!("no command reply within {timeout:?}"),
            }
        }
    }

    /// Sends `command` and returns its reply.
    pub fn request(&mut self, command: &Value, timeout: Duration) -> Value {
        self.send_command(command);
        self.next_reply(timeout)
    }

    /// Reads until the server's close frame; returns it (`None` when the connection
    /// ended without one). Messages and pings before it are skipped.
    ///
    /// # Panics
    /// When nothing closes the connection within `timeout`.
    pub fn wait_close(&mut self, timeout: Duration) -> Option<CloseFrame<'static>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Closed(frame) => return frame,
                Event::TimedOut => {
                    panic!("the server did not close the connection within {timeout:?}")
                }
                _ => {}
            }
        }
    }

    /// Starts a clean close from the client side.
    pub fn close(&mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// The start of `text`, short enough for a failure message.
pub fn snippet(text: &str) -> String {
    const MAX: usize = 160;
    match text.char_indices().nth(MAX) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()),
    }
}

fn decode(text: String) -> Event {
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("server text frame is not JSON ({e}): {:?}", snippet(&text)));
    if value.get("reply").is_some() {
        return Event::Reply(value);
    }
    let channel = value.get("channel").and_then(Value::as_str);
    let offset = value.get("offset").and_then(Value::as_u64);
    match (channel, offset, value.get("data")) {
        (Some(channel), Some(offset), Some(data)) => Event::Delivery(Delivery {
            channel: channel.to_string(),
            offset,
            data: data.clone(),
            raw: text,
        }),
        _ => panic!(
            "server text frame is neither a message nor a reply: {}",
            snippet(&text)
        ),
    }
}

/// Per-channel record of the offsets one subscriber saw, checking the +1 rule.
#[derive(Debug, Default, Clone)]
pub struct OffsetLog {
    /// channel -> (first offset, last offset, count)
    pub channels: BTreeMap<String, (u64, u64, u64)>,
    /// Every violation, in arrival order.
    pub errors: Vec<String>,
}

impl OffsetLog {
    /// Records `d`, noting a gap, duplicate or reordering.
    pub fn observe(&mut self, d: &Delivery) {
        match self.channels.get_mut(&d.channel) {
            None => {
                self.channels
                    .insert(d.channel.clone(), (d.offset, d.offset, 1));
            }
            Some((_, last, count)) => {
                if d.offset != *last + 1 {
                    self.errors
                        .push(format!("{}: offset {} after {}", d.channel, d.offset, last));
                }
                *last = (*last).max(d.offset);
                *count += 1;
            }
        }
    }

    /// Records every delivery in `ds`.
    pub fn observe_all(&mut self, ds: &[Delivery]) {
        for d in ds {
            self.observe(d);
        }
    }

    /// Asserts `channel` was seen exactly with offsets `first..=last`, each once, in
    /// order.
    pub fn assert_exactly(&self, who: &str, channel: &str, first: u64, last: u64) {
        assert!(
            self.errors.is_empty(),
            "{who}: offsets not strictly +1: {:?}",
            self.errors
        );
        let seen = self.channels.get(channel).copied();
        assert_eq!(
            seen,
            Some((first, last, last - first + 1)),
            "{who}: channel {channel} should be offsets {first}..={last} once each; \
             (first, last, count) seen: {seen:?}"
        );
    }
}
