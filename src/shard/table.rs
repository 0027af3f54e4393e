//! A shard's connection table: everything one upgraded WebSocket connection owns.
//!
//! There is no task, future or buffer per connection. An idle connection is this entry
//! (about 200 bytes: the socket, an empty send backlog, the frame decoder, liveness
//! stamps) plus its slot in the subscription index; its socket waits in the shard's epoll
//! set ([`crate::shard::readiness`]). Input is read into the shard's scratch buffer; a
//! partial frame is kept only while it is split across reads.

use crate::fanout::backlog::SendBacklog;
use crate::proto::frame::FrameDecoder;
use std::os::fd::OwnedFd;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Serving.
    Open,
    /// A close was decided (queued in the shard's close list); nothing more is sent.
    Doomed,
    /// Close frame sent and write side shut since this shard second; waiting for the
    /// peer's EOF so unread input does not turn our close into a reset.
    Closing(u32),
}

/// One WebSocket connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket (closed when the entry is dropped).
    pub fd: OwnedFd,
    /// Generation of this table slot, so epoll events for a previous occupant are ignored.
    pub generation: u32,
    /// Frames waiting to be written.
    pub backlog: SendBacklog,
    /// Inbound frame state.
    pub decoder: FrameDecoder,
    /// Bytes of a frame split across reads; empty (unallocated) otherwise.
    pub pending_input: Vec<u8>,
    /// Shard clock second of the last byte received.
    pub last_rx: u32,
    /// (second, frames received in it) for the inbound rate limit.
    pub inbound_window: (u32, u32),
    /// A ping went out since `last_rx`.
    pub pinged: bool,
    /// In the shard's list of connections to flush after this fan-out round.
    pub dirty: bool,
    /// Lifecycle state.
    pub state: ConnState,
}

impl Conn {
    /// A fresh connection entry for `fd`, alive as of `now`.
    pub fn new(fd: OwnedFd, generation: u32, max_message_size: usize, now: u32) -> Self {
        Conn {
            fd,
            generation,
            backlog: SendBacklog::default(),
            decoder: FrameDecoder::new(max_message_size),
            pending_input: Vec::new(),
            last_rx: now,
            inbound_window: (now, 0),
            pinged: false,
            dirty: false,
            state: ConnState::Open,
        }
    }

    /// True while frames may still be queued to this connection.
    pub fn is_open(&self) -> bool {
        self.state == ConnState::Open
    }
}

/// The epoll token of a connection: slot key and generation.
pub fn token(key: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(key)
}

/// Splits an epoll token into (key, generation).
pub fn untoken(token: u64) -> (u32, u32) {
    (token as u32, (token >> 32) as u32)
}
