//! One WebSocket connection as a sans-io state machine: bytes and time in, frames and
//! decisions out.
//!
//! [`Connection`] never touches a socket or a clock. The shard's driver feeds it what the
//! socket delivered ([`Connection::on_input`]), the end of input ([`Connection::on_eof`]),
//! the passing of time ([`Connection::on_tick`], in shard seconds) and how much of its
//! output the socket took ([`Connection::on_written`]). It answers with frames queued in
//! its [`SendBacklog`] (read them with [`Connection::backlog`]) and with decisions the
//! driver carries out: a [`CloseDecision`] (remove from the index, then
//! [`Connection::start_close`]), [`Tick::Ping`] (flush), [`Written::ShutWrite`] (shut the
//! socket's write side), [`Eof::Finished`] (free the slot).
//!
//! Lifecycle: `Open` → (a close is decided) `Doomed` → (the driver starts it) `Closing`,
//! in which the close frame is written after what was already partly sent, the write
//! side is shut, and input is discarded until the peer's EOF or the linger bound.
//!
//! Identity: an authenticated connection carries its [`Session`] (boxed: an anonymous one
//! pays a null pointer). Its token's expiry is one more deadline of the machine's clock:
//! [`Connection::on_tick`] closes it with 4401 once the shard second in
//! `Session::expires_at` is reached, and [`Connection::wake_at`] reports it, so expiry
//! costs no timer of its own. Commands get the session to check permissions against and
//! to refresh.
//!
//! Inbound limits: every frame counts toward `max_inbound_per_sec` (empty continuation
//! frames included), and a frame split across reads is appended in place to one buffer,
//! so a 64 KiB frame arriving one byte per segment costs O(n), not O(n²).

use crate::auth::session::Session;
use crate::proto::backlog::{BacklogLimits, Offer, SendBacklog};
use crate::proto::close::{CloseCause, CloseCode, CloseReason};
use crate::proto::frame::{encode_close, encode_frame, opcode, FrameDecoder, Inbound};
use crate::proto::message::encode_gap;
use crate::proto::position::Position;
use crate::proto::recovery::CatchUp;
use crate::proto::sse::{encode_positionless, HttpStream, Mode, Parts};
use bytes::Bytes;
use std::sync::Arc;

/// The bounds and timers every connection of a shard shares.
#[derive(Debug, Clone, Copy)]
pub struct ConnConfig {
    /// Largest client frame or reassembled message. Default: 65536.
    pub max_message_size: usize,
    /// Client frames per second before close 1008. Default: 200.
    pub max_inbound_per_sec: u32,
    /// Send backlog bounds and slow-consumer policy.
    pub backlog: BacklogLimits,
    /// Seconds of silence before a ping.
    pub ping_after: u32,
    /// Seconds of silence before the peer counts as dead.
    pub dead_after: u32,
    /// Seconds a closing connection may take to answer our close with EOF.
    pub linger: u32,
    /// Seconds a lagging connection may write nothing before it is closed with 1013.
    pub stall_after: u32,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Open,
    /// A close was decided; nothing more is queued until the driver starts it.
    Doomed {
        /// The peer closed: what was queued before its close frame (pongs, replies)
        /// answers frames that came before it and goes out before our close (RFC 6455
        /// 5.5.1). Any other close drops what nobody started reading.
        answer_first: bool,
    },
    /// Close frame queued at this shard second; input is discarded until EOF.
    Closing {
        /// When the close started.
        since: u32,
    },
}

/// A close the machine decided, for the driver to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseDecision {
    /// The close frame to send; `None` closes the socket without one (peer gone, dead).
    pub reason: Option<CloseReason>,
    /// Why (metric label).
    pub cause: CloseCause,
}

/// What the passing of time asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do.
    Idle,
    /// A ping was queued: flush the connection.
    Ping,
    /// The peer is silent past the dead bound: close it.
    Close(CloseDecision),
    /// A closing peer never answered within the linger bound: free the slot.
    LingerOver,
}

/// What the end of input means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eof {
    /// Our close went out and the peer finished: free the slot.
    Finished,
    /// The peer left first: close without a frame.
    Close(CloseDecision),
    /// A close is already decided; nothing new.
    Ignored,
}

/// What a write left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Bytes remain queued.
    More,
    /// Everything queued went out.
    Drained,
    /// Everything went out, including our close frame: shut the write side.
    ShutWrite,
}

/// What a client command produced: the reply frame, then any message frames to send
/// right after it (a recovery's replay).
#[derive(Debug, Default)]
pub struct Answer {
    /// The reply.
    pub reply: Bytes,
    /// Message frames following the reply, oldest first; bounded by the command
    /// (`max_recovery_messages`), so they are queued whatever the backlog holds.
    pub replay: Vec<Bytes>,
}

impl From<Bytes> for Answer {
    fn from(reply: Bytes) -> Self {
        Answer {
            reply,
            replay: Vec::new(),
        }
    }
}

/// The command handler the driver passes to [`Connection::on_input`]: one text message
/// and the connection's session (`None`: anonymous) in, the reply frame (and any replay) out.
pub type CommandHandler<'a> = dyn FnMut(&str, Option<&mut Session>) -> Answer + 'a;

/// A pre-encoded empty ping frame.
const PING: [u8; 2] = [0x80 | opcode::PING, 0];

/// Inbound state that outlives one read: a frame split across reads, or a fragmented
/// message being reassembled. Boxed so that an idle connection pays one pointer for it.
#[derive(Debug)]
struct Partial {
    decoder: FrameDecoder,
    /// Bytes of a frame split across reads.
    input: Vec<u8>,
}

/// The state of one WebSocket connection (no socket, no clock).
///
/// Kept small: a million idle connections are a million of these (see the size test).
#[derive(Debug)]
pub struct Connection {
    backlog: SendBacklog,
    /// `None` (no memory) between complete frames, which is almost always.
    partial: Option<Box<Partial>>,
    /// Who the connection is; `None` when anonymous.
    session: Option<Box<Session>>,
    /// Shard second of the last byte received.
    last_rx: u32,
    /// (second, frames received in it) for the inbound rate limit.
    window: (u32, u32),
    phase: Phase,
    /// A ping went out since `last_rx`.
    pinged: bool,
    /// Channels it has fallen behind on; `None` (no memory) while it keeps up.
    lag: Option<Box<Lag>>,
    /// For `/sse` and `/poll` connections only: the re-encoder of every frame queued
    /// and the stream's position. `None` (a null pointer) on WebSocket connections, and
    /// on an idle SSE stream that released it ([`Connection::release_position`]).
    stream: Option<Box<HttpStream>>,
    /// An SSE stream (with or without its encoder), and whether it may release it.
    sse: Sse,
    /// The driver's own marks for this connection, kept here because they fit in this
    /// struct's padding (a served connection's table entry is 128 bytes; see the size
    /// test in `shard::table`).
    pub driver: DriverMarks,
}

/// Marks the shard's driver keeps per connection (not protocol state).
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverMarks {
    /// In the shard's list of connections to flush after this fan-out round.
    pub dirty: bool,
    /// In the shard's list of connections catching up from history.
    pub lagging: bool,
}

/// Whether a connection is an SSE stream (it has no encoder while released).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sse {
    /// WebSocket or long poll.
    No,
    /// SSE; releases its encoder while idle.
    Releasing,
    /// SSE; keeps its encoder for as long as it lives.
    Keeping,
}

/// The channels a connection fell behind on, each with the last offset it was given: it
/// gets their messages from history ([`Connection::catch_up_next`]), not live, until it
/// has caught up.
#[derive(Debug, Default)]
struct Lag {
    channels: Vec<(Arc<str>, u64)>,
    /// Bytes were written since the last tick.
    progressed: bool,
    /// Shard second since which nothing was written (set by the tick).
    stalled_since: Option<u32>,
    /// Offsets lost to gap notices since it started lagging.
    lost: u64,
}

impl Connection {
    /// A fresh open connection, alive as of `now`.
    pub fn new(now: u32) -> Self {
        Connection {
            backlog: SendBacklog::default(),
            partial: None,
            session: None,
            last_rx: now,
            window: (now, 0),
            phase: Phase::Open,
            pinged: false,
            lag: None,
            stream: None,
            sse: Sse::No,
            driver: DriverMarks::default(),
        }
    }

    /// Makes it an HTTP-transport connection (`/sse`, `/poll`): every frame queued from
    /// now on is re-encoded by `stream`, input is ignored, and silence is no sign of a
    /// dead peer (an SSE client never writes).
    pub fn with_stream(mut self, stream: HttpStream) -> Self {
        self.sse = if stream.mode() == Mode::Sse {
            Sse::Releasing
        } else {
            Sse::No
        };
        self.stream = Some(Box::new(stream));
        self
    }

    /// The HTTP transport's encoder; `None` on a WebSocket connection and on an idle SSE
    /// stream that released it.
    pub fn http_stream(&self) -> Option<&HttpStream> {
        self.stream.as_deref()
    }

    /// The HTTP transport, if any.
    fn mode(&self) -> Option<Mode> {
        match &self.stream {
            Some(stream) => Some(stream.mode()),
            None => (self.sse != Sse::No).then_some(Mode::Sse),
        }
    }

    /// True for an open long poll with an answer to give (something is queued): the
    /// driver then closes it, which completes the answer.
    pub fn poll_answer_due(&self) -> bool {
        self.is_open() && !self.backlog.is_empty() && self.is_poll()
    }

    /// True for a long poll.
    pub fn is_poll(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_poll())
    }

    /// True while nothing queued may be written yet: a long poll's answer goes out whole,
    /// head first, once the poll ends ([`Connection::start_close`]).
    pub fn holds_output(&self) -> bool {
        self.is_poll() && !matches!(self.phase, Phase::Closing { .. })
    }

    /// True for an open SSE stream that released its encoder: the driver restores its
    /// position ([`Connection::restore_position`]) before queuing an event.
    #[inline]
    pub fn needs_position(&self) -> bool {
        self.sse != Sse::No && self.stream.is_none() && self.is_open()
    }

    /// Gives a released SSE stream its encoder back, at `position`: where the
    /// subscription index says its channels are (what every subscriber that keeps up was
    /// given). A channel it lags on is at the last offset it was given instead.
    pub fn restore_position(&mut self, mut position: Position) {
        if self.sse == Sse::No || self.stream.is_some() {
            return;
        }
        if let Some(lag) = &self.lag {
            for (channel, given) in &lag.channels {
                if let Some(mut at) = position.get(channel) {
                    at.offset = *given;
                    position.set(channel, at);
                }
            }
        }
        self.stream = Some(Box::new(HttpStream::restored(position)));
    }

    /// Makes an SSE stream keep its encoder for as long as it lives (it has channels whose
    /// positions the driver cannot rebuild: inbox channels).
    pub fn keep_position(&mut self) {
        if self.sse != Sse::No {
            self.sse = Sse::Keeping;
        }
    }

    /// Drops an idle SSE stream's encoder (nothing queued, keeping up on every channel):
    /// its position is then the one [`Connection::restore_position`] rebuilds, and an
    /// idle SSE connection costs no more than a WebSocket one. True when released.
    pub fn release_position(&mut self) -> bool {
        let idle = self.sse == Sse::Releasing
            && self.is_open()
            && self.backlog.is_empty()
            && self.lag.is_none();
        idle && self.stream.take().is_some()
    }

    /// An open connection with an identity, alive as of `now`.
    pub fn with_session(now: u32, session: Option<Box<Session>>) -> Self {
        Connection {
            session,
            ..Connection::new(now)
        }
    }

    /// The connection's identity; `None` when anonymous.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_deref()
    }

    /// The connection's identity, to refresh.
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.session.as_deref_mut()
    }

    /// Takes the identity out (when the connection leaves the registry).
    pub fn take_session(&mut self) -> Option<Box<Session>> {
        self.session.take()
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// True while frames may be queued to it.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// The frames waiting to be written, oldest first.
    pub fn backlog(&self) -> &SendBacklog {
        &self.backlog
    }

    /// Handles bytes the client sent (unmasked in place). Text messages go to `command`,
    /// whose answer is queued as a reply frame. Returns a close when the input broke a
    /// rule; replies queued before the violation stay queued.
    pub fn on_input(
        &mut self,
        now: u32,
        bytes: &mut [u8],
        config: &ConnConfig,
        command: &mut CommandHandler<'_>,
    ) -> Option<CloseDecision> {
        if self.phase != Phase::Open || self.mode().is_some() {
            // Lingering or doomed: input is read only to reach EOF. An HTTP transport's
            // client has nothing to say after its request.
            return None;
        }
        self.last_rx = now;
        self.pinged = false;
        let Some(mut partial) = self.partial.take() else {
            // The common case: whole frames, decoded straight from the read buffer.
            let mut decoder = FrameDecoder::new(config.max_message_size);
            let used = self.consume(now, &mut decoder, bytes, config, command);
            if let Ok(used) = used {
                if self.is_open() && (used < bytes.len() || decoder.in_fragmented_message()) {
                    self.partial = Some(Box::new(Partial {
                        decoder,
                        input: bytes[used..].to_vec(),
                    }));
                }
            }
            return used.err();
        };
        // Append in place: the split frame's earlier bytes are never copied again.
        let result = if partial.input.is_empty() {
            self.consume(now, &mut partial.decoder, bytes, config, command)
                .map(|used| {
                    partial.input.extend_from_slice(&bytes[used..]);
                    0
                })
        } else {
            partial.input.extend_from_slice(bytes);
            let Partial { decoder, input } = &mut *partial;
            self.consume(now, decoder, input, config, command)
        };
        match result {
            Ok(used) if self.is_open() => {
                partial.input.drain(..used);
                if !partial.input.is_empty() || partial.decoder.in_fragmented_message() {
                    self.partial = Some(partial);
                }
            }
            // Closing: the partial input is of no use any more.
            _ => {}
        }
        result.err()
    }

    /// Decodes and handles every complete frame at the front of `input`; returns the bytes
    /// used, or the close a violation calls for.
    fn consume(
        &mut self,
        now: u32,
        decoder: &mut FrameDecoder,
        input: &mut [u8],
        config: &ConnConfig,
        command: &mut CommandHandler<'_>,
    ) -> Result<usize, CloseDecision> {
        let mut at = 0;
        while at < input.len() && self.is_open() {
            let (used, event) = match decoder.decode(&mut input[at..]) {
                Ok(Some(step)) => step,
                Ok(None) => break,
                Err(e) => {
                    return Err(self.decide(Some(CloseReason::from(e)), CloseCause::ProtocolError))
                }
            };
            at += used;
            // Every frame counts, events or not: empty non-final fragments are not free.
            if self.window.0 != now {
                self.window = (now, 0);
            }
            self.window.1 += 1;
            if self.window.1 > config.max_inbound_per_sec {
                let reason = CloseReason::new(CloseCode::Policy, "too many frames per second");
                return Err(self.decide(Some(reason), CloseCause::Policy));
            }
            let answer = match event {
                None | Some(Inbound::Pong) => continue,
                Some(Inbound::Ping(payload)) => Answer::from(encode_frame(opcode::PONG, payload)),
                Some(Inbound::Close(_)) => {
                    // The decoder refused codes a client may not send; answer with 1000.
                    let reason = CloseReason::new(CloseCode::Normal, "");
                    return Err(self.decide(Some(reason), CloseCause::ClientClose));
                }
                Some(Inbound::Text(text)) => command(text, self.session.as_deref_mut()),
            };
            // An empty reply: the command is answered later (an inbox commit or read).
            if !answer.reply.is_empty() {
                self.queue_control(answer.reply, config)?;
            }
            self.push_replay(answer.replay);
        }
        Ok(at)
    }

    /// Queues frames that follow a reply (a recovery, an inbox's unacked messages): like
    /// a recovery's replay, they are the client's own backlog, not a flood.
    pub fn queue_replay(&mut self, frames: Vec<Bytes>) {
        self.push_replay(frames);
    }

    /// Queues a recovery's replay of `channel` (its messages after offset `since`, in
    /// order). An HTTP transport takes it under its backlog bound, as it takes live
    /// messages: what does not fit it gets from history as the backlog drains (it lags on
    /// the channel from the last offset queued), so one request for many channels with
    /// long histories holds one backlog, not every history. A WebSocket connection
    /// queues it whole, as a command's answer (`max_recovery_messages` bounds it).
    pub fn queue_recovery(
        &mut self,
        channel: &Arc<str>,
        since: u64,
        frames: Vec<Bytes>,
        config: &ConnConfig,
    ) {
        if self.mode().is_none() {
            self.push_replay(frames);
            return;
        }
        if !self.is_open() || frames.is_empty() {
            return;
        }
        let limits = &config.backlog;
        let total = frames.len();
        let mut queued = 0;
        for frame in frames {
            if self.backlog.bytes() >= limits.max_bytes
                || self.backlog.frame_count() >= limits.max_frames
            {
                break;
            }
            self.push_replay(vec![frame]);
            queued += 1;
        }
        if queued < total {
            self.lag_from(channel, since + queued as u64);
        }
    }

    /// Queues replayed frames, re-encoded for an HTTP transport.
    fn push_replay(&mut self, frames: Vec<Bytes>) {
        self.ensure_encoder();
        push_replay_to(&mut self.backlog, self.stream.as_deref_mut(), frames);
    }

    /// Makes sure an HTTP transport has its encoder. A released SSE stream gets a new one at the position of its own events only (the driver restores
    /// the real one before queuing anything: see [`Connection::needs_position`]).
    fn ensure_encoder(&mut self) {
        if self.sse != Sse::No && self.stream.is_none() {
            self.stream = Some(Box::new(HttpStream::restored(Position::default())));
        }
    }

    /// `frame` re-encoded for the HTTP transport; `None` on a WebSocket connection. A
    /// heartbeat or close event of a released SSE stream needs no encoder.
    fn encode_for_stream(&mut self, frame: &Bytes) -> Option<Parts> {
        if self.sse != Sse::No && self.stream.is_none() {
            if let Some(parts) = encode_positionless(frame) {
                return Some(parts);
            }
        }
        self.ensure_encoder();
        self.stream
            .as_deref_mut()
            .map(|stream| stream.encode(frame))
    }

    /// Queues a control frame or reply; a peer whose unread replies pile up past twice
    /// the backlog bound is flooding us and is closed with 1008.
    ///
    /// # Errors
    /// The close decided for the flood.
    pub fn queue_control(
        &mut self,
        frame: Bytes,
        config: &ConnConfig,
    ) -> Result<(), CloseDecision> {
        let within = match self.encode_for_stream(&frame) {
            None => self.backlog.push_control(frame, &config.backlog),
            Some(parts) => {
                let mut within = true;
                for piece in parts.into_iter().filter(|p| !p.is_empty()) {
                    within &= self.backlog.push_control(piece, &config.backlog);
                }
                within
            }
        };
        if within {
            return Ok(());
        }
        let reason = CloseReason::new(
            CloseCode::Policy,
            "requests faster than their replies are read",
        );
        Err(self.decide(Some(reason), CloseCause::Policy))
    }

    /// Offers a published message's frame under the plain slow-consumer policy of its
    /// backlog (skip when full, [`Offer::Disconnect`] after `drop_limit` skips in a row),
    /// without catching up. The driver uses [`Connection::offer_on`] and
    /// [`Connection::offer_event`]; the deterministic simulation drives this one.
    #[inline]
    pub fn offer(&mut self, frame: &Bytes, config: &ConnConfig) -> Offer {
        if !self.is_open() {
            return Offer::Skipped;
        }
        self.offer_backlog(frame, config)
    }

    /// The backlog's slow-consumer policy for one message frame; an HTTP transport's
    /// frame is re-encoded only once admitted (its position must not move past a
    /// message it skips).
    #[inline]
    fn offer_backlog(&mut self, frame: &Bytes, config: &ConnConfig) -> Offer {
        if self.mode().is_none() {
            return self.backlog.offer(frame, &config.backlog);
        }
        let offer = self.backlog.admit(&config.backlog);
        if offer == Offer::Queued {
            for piece in self.encode_for_stream(frame).unwrap_or_default() {
                self.backlog.push_piece(piece);
            }
        }
        offer
    }

    /// True while it takes `channel` from history instead of live.
    pub fn lags_on(&self, channel: &str) -> bool {
        self.lag
            .as_ref()
            .is_some_and(|lag| lag.channels.iter().any(|(c, _)| &**c == channel))
    }

    /// Queues a live frame of `channel`: `Some(true)` when queued, `Some(false)` when the
    /// backlog has no room, `None` when closed or catching up on the channel.
    #[inline]
    fn queue_live(&mut self, channel: &str, frame: &Bytes, config: &ConnConfig) -> Option<bool> {
        if !self.is_open() || self.lags_on(channel) {
            return None;
        }
        Some(self.offer_backlog(frame, config) == Offer::Queued)
    }

    /// Offers message `offset` of `channel`: a message the backlog has no room for is not
    /// lost: the connection starts lagging on the channel and gets it, and what follows,
    /// from history once its backlog drains ([`Connection::catch_up_next`]). Returns
    /// [`Offer::Skipped`] for a message it will get that way. A lagging connection is
    /// closed with 1013 only when it writes nothing for `stall_after` seconds
    /// ([`Connection::on_tick`]) or loses more than `drop_limit` messages to gaps
    /// ([`Connection::apply_catch_up`]).
    #[inline]
    pub fn offer_on(
        &mut self,
        channel: &Arc<str>,
        offset: u64,
        frame: &Bytes,
        config: &ConnConfig,
    ) -> Offer {
        match self.queue_live(channel, frame, config) {
            Some(true) => Offer::Queued,
            // No room: this message and what follows come from history.
            Some(false) => {
                self.lag
                    .get_or_insert_with(Box::default)
                    .channels
                    .push((channel.clone(), offset.saturating_sub(1)));
                Offer::Skipped
            }
            None => Offer::Skipped,
        }
    }

    /// Offers a presence event of `channel`: queued when the backlog has room and the
    /// connection is not catching up on the channel (events are not in history), else
    /// skipped ([`Offer::Skipped`]); the `presence` command tells the current state.
    pub fn offer_event(&mut self, channel: &str, frame: &Bytes, config: &ConnConfig) -> Offer {
        match self.queue_live(channel, frame, config) {
            Some(true) => Offer::Queued,
            _ => Offer::Skipped,
        }
    }

    /// Makes it take `channel` from history after `since` (its shard's follower lost
    /// messages to a ring overrun); no change when it already lags on the channel.
    pub fn lag_from(&mut self, channel: &Arc<str>, since: u64) {
        if !self.is_open() {
            return;
        }
        if !self.lags_on(channel) {
            self.lag
                .get_or_insert_with(Box::default)
                .channels
                .push((channel.clone(), since));
        }
    }

    /// True when the connection lags on some channel and its backlog has room for more
    /// of it (under half its bound).
    pub fn wants_catch_up(&self, config: &ConnConfig) -> bool {
        self.is_open() && self.lag.is_some() && self.backlog.bytes() <= config.backlog.max_bytes / 2
    }

    /// True while it lags on some channel.
    pub fn is_lagging(&self) -> bool {
        self.lag.is_some()
    }

    /// The channel to catch up on next and the last offset it has of it.
    pub fn catch_up_next(&self) -> Option<(Arc<str>, u64)> {
        let lag = self.lag.as_ref()?;
        lag.channels.first().cloned()
    }

    /// Queues a catch-up step on `channel` (from [`Connection::catch_up_next`]): a gap
    /// notice for what history no longer holds, then the frames; the channel follows live
    /// again once `done`.
    ///
    /// Returns the 1013 close to carry out when its losses passed `drop_limit`.
    pub fn apply_catch_up(
        &mut self,
        channel: &str,
        step: CatchUp,
        config: &ConnConfig,
    ) -> Option<CloseDecision> {
        let lag = self.lag.as_mut()?;
        let at = lag.channels.iter().position(|(c, _)| &**c == channel)?;
        if let Some((from, to)) = step.gap {
            lag.lost += to + 1 - from;
            if lag.lost > u64::from(config.backlog.drop_limit) {
                return self.close_slow_consumer();
            }
            let gap = vec![encode_gap(channel, from, to)];
            self.push_replay(gap);
        }
        self.push_replay(step.frames);
        let lag = self.lag.as_mut()?;
        if step.done {
            lag.channels.remove(at);
        } else {
            lag.channels[at].1 = step.reached;
            // Round-robin over the lagging channels.
            lag.channels.rotate_left(1);
        }
        if lag.channels.is_empty() {
            self.lag = None;
        }
        None
    }

    /// The 1013 close an [`Offer::Disconnect`] calls for; `None` when a close was already
    /// decided.
    pub fn close_slow_consumer(&mut self) -> Option<CloseDecision> {
        let reason = CloseReason::new(
            CloseCode::TryAgainLater,
            "slow consumer: send backlog stayed full",
        );
        self.close(Some(reason), CloseCause::SlowConsumer)
    }

    /// Decides a close from outside the protocol (drain, I/O error, admin); `None` when a
    /// close was already decided.
    pub fn close(
        &mut self,
        reason: Option<CloseReason>,
        cause: CloseCause,
    ) -> Option<CloseDecision> {
        self.is_open().then(|| self.decide(reason, cause))
    }

    fn decide(&mut self, reason: Option<CloseReason>, cause: CloseCause) -> CloseDecision {
        self.phase = Phase::Doomed {
            answer_first: cause == CloseCause::ClientClose,
        };
        CloseDecision { reason, cause }
    }

    /// Starts a decided close at `now`: drops queued frames nobody started reading (the
    /// rest of a partly written frame stays, to keep the stream parseable) and queues the
    /// close frame. Returns false when there is no frame to send and the slot can be
    /// freed at once.
    pub fn start_close(&mut self, now: u32, reason: Option<&CloseReason>) -> bool {
        self.partial = None;
        let answer_first = matches!(self.phase, Phase::Doomed { answer_first: true });
        self.phase = Phase::Closing { since: now };
        let Some(reason) = reason else {
            return false;
        };
        let close = encode_close(reason.code.code(), &reason.reason);
        match self.mode() {
            None => {
                if !answer_first {
                    self.backlog.discard_unstarted();
                }
                self.backlog.push_close(close);
            }
            Some(Mode::Sse) => {
                // The rest of a partly written event, up to its blank line.
                self.backlog
                    .discard_unstarted_messages(|piece| piece.ends_with(b"\n\n"));
                for piece in self.encode_for_stream(&close).unwrap_or_default() {
                    self.backlog.push_piece(piece);
                }
            }
            Some(Mode::Poll { .. }) => {
                // A poll keeps every event: they are its answer, which goes out now, whole
                // (nothing of it was written: see `holds_output`).
                if let Some(stream) = self.stream.as_deref() {
                    let (head, end) = stream.finish_poll(self.backlog.bytes());
                    self.backlog.push_front(head);
                    self.backlog.push_piece(end);
                }
            }
        }
        true
    }

    /// What the shard's backlog gauge must add (negative: subtract) to count this
    /// connection's backlog as it is now ([`SendBacklog::gauge_delta`]).
    pub fn backlog_gauge_delta(&mut self) -> i64 {
        self.backlog.gauge_delta()
    }

    /// What the shard's backlog gauge counts of this connection, to subtract when it
    /// goes away ([`SendBacklog::uncount`]).
    pub fn backlog_uncount(&mut self) -> u64 {
        self.backlog.uncount()
    }

    /// Takes the whole backlog out, leaving it empty: for a driver that lost track of what
    /// the kernel holds of these bytes and must neither resend nor free them.
    pub fn take_backlog(&mut self) -> SendBacklog {
        std::mem::take(&mut self.backlog)
    }

    /// Records that the socket took the first `n` queued bytes.
    pub fn on_written(&mut self, n: usize) -> Written {
        self.backlog.advance(n);
        if let Some(lag) = self.lag.as_mut() {
            lag.progressed |= n > 0;
        }
        if n > 0 && self.sse != Sse::No {
            // The client reads: not stuck (see `stalled`).
            self.window = (0, 0);
        }
        match (self.backlog.is_empty(), self.phase) {
            (false, _) => Written::More,
            (true, Phase::Closing { .. }) => Written::ShutWrite,
            (true, _) => Written::Drained,
        }
    }

    /// The peer closed its side (EOF or reset).
    pub fn on_eof(&mut self) -> Eof {
        match self.phase {
            Phase::Closing { .. } => Eof::Finished,
            Phase::Open => Eof::Close(self.decide(None, CloseCause::PeerGone)),
            Phase::Doomed { .. } => Eof::Ignored,
        }
    }

    /// Liveness at `now`: a ping after `ping_after` silent seconds, a close after
    /// `dead_after`, 4401 once the token expired, the end of a close's linger.
    pub fn on_tick(&mut self, now: u32, config: &ConnConfig) -> Tick {
        match self.phase {
            Phase::Closing { since } if now.saturating_sub(since) >= config.linger => {
                Tick::LingerOver
            }
            Phase::Open if self.session.as_ref().is_some_and(|s| now >= s.expires_at) => {
                let reason = CloseReason::new(CloseCode::Unauthorized, "token expired");
                Tick::Close(self.decide(Some(reason), CloseCause::TokenExpired))
            }
            Phase::Open => {
                if self.stalled(now, config) {
                    if let Some(close) = self.close_slow_consumer() {
                        return Tick::Close(close);
                    }
                }
                if let Some(mode) = self.mode() {
                    return self.tick_stream(now, mode, config);
                }
                let silent = now.saturating_sub(self.last_rx);
                if silent >= config.dead_after {
                    Tick::Close(self.decide(None, CloseCause::Dead))
                } else if silent >= config.ping_after && !self.pinged {
                    self.pinged = true;
                    match self.queue_control(Bytes::from_static(&PING), config) {
                        Ok(()) => Tick::Ping,
                        Err(close) => Tick::Close(close),
                    }
                } else {
                    Tick::Idle
                }
            }
            _ => Tick::Idle,
        }
    }

    /// [`Connection::on_tick`] for an HTTP transport: an SSE stream silent for
    /// `ping_after` gets a heartbeat comment (never a dead-peer close: its client never
    /// writes, a vanished one shows as a write error); a poll answers at its deadline.
    fn tick_stream(&mut self, now: u32, mode: Mode, config: &ConnConfig) -> Tick {
        match mode {
            Mode::Poll { deadline } if now >= deadline => {
                let reason = CloseReason::new(CloseCode::Normal, "");
                Tick::Close(self.decide(Some(reason), CloseCause::PollAnswered))
            }
            Mode::Poll { .. } => Tick::Idle,
            Mode::Sse if now.saturating_sub(self.last_rx) >= config.ping_after => {
                // `last_rx` counts from the last heartbeat here: nothing is received.
                self.last_rx = now;
                match self.queue_control(Bytes::from_static(&PING), config) {
                    Ok(()) => Tick::Ping,
                    Err(close) => Tick::Close(close),
                }
            }
            Mode::Sse => Tick::Idle,
        }
    }

    /// True when it lags and has written nothing for `stall_after` seconds: it is not
    /// reading at all; for an SSE stream, also when it has anything queued and took none
    /// of it for that long (its client never writes, so no dead-peer check finds one
    /// that stopped reading). Called once per tick: a tick notes progress since the last
    /// one.
    fn stalled(&mut self, now: u32, config: &ConnConfig) -> bool {
        let Some(lag) = self.lag.as_mut() else {
            return self.sse_stuck(now, config);
        };
        if std::mem::take(&mut lag.progressed) || self.backlog.is_empty() {
            lag.stalled_since = None;
            return false;
        }
        let since = *lag.stalled_since.get_or_insert(now);
        now.saturating_sub(since) >= config.stall_after
    }

    /// [`Connection::stalled`] for an SSE stream that does not lag. Its `window` (the
    /// inbound rate window, unused: an HTTP transport takes no input) holds the second
    /// since which nothing queued was written, and 1 while that is counted;
    /// [`Connection::on_written`] clears it.
    fn sse_stuck(&mut self, now: u32, config: &ConnConfig) -> bool {
        if self.sse == Sse::No {
            return false;
        }
        if self.backlog.is_empty() {
            self.window = (0, 0);
            return false;
        }
        if self.window.1 == 0 {
            self.window = (now, 1);
            return false;
        }
        now.saturating_sub(self.window.0) >= config.stall_after
    }

    /// The shard second at which [`Connection::on_tick`] next has something to do.
    pub fn wake_at(&self, config: &ConnConfig) -> Option<u32> {
        let expiry = self.session.as_ref().map_or(u32::MAX, |s| s.expires_at);
        match (self.phase, self.mode()) {
            (Phase::Open, Some(Mode::Poll { deadline })) => return Some(deadline.min(expiry)),
            (Phase::Open, Some(Mode::Sse)) => {
                return Some(self.last_rx.saturating_add(config.ping_after).min(expiry))
            }
            _ => {}
        }
        match self.phase {
            Phase::Open if self.pinged => {
                Some(self.last_rx.saturating_add(config.dead_after).min(expiry))
            }
            Phase::Open => Some(self.last_rx.saturating_add(config.ping_after).min(expiry)),
            Phase::Closing { since } => Some(since.saturating_add(config.linger)),
            Phase::Doomed { .. } => None,
        }
    }

    /// Bytes held for a split frame (for tests and accounting).
    pub fn buffered_input(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.input.len())
    }

    /// Bytes of the split-frame buffer's allocation (for tests: an idle connection holds
    /// none).
    pub fn input_capacity(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.input.capacity())
    }
}

/// Queues replayed frames on `backlog`, re-encoded by `stream` for an HTTP transport.
fn push_replay_to(backlog: &mut SendBacklog, stream: Option<&mut HttpStream>, frames: Vec<Bytes>) {
    match stream {
        None => backlog.push_replay(frames),
        Some(stream) => {
            let pieces = frames
                .iter()
                .flat_map(|f| stream.encode(f))
                .filter(|p| !p.is_empty());
            backlog.push_replay(pieces.collect());
        }
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
