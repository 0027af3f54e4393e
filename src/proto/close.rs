//! Close codes, and the one place protocol errors become them.

/// A WebSocket close code the server sends (RFC 6455 section 7.4 plus ringcast's 4xxx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: normal closure, echoing a client close.
    Normal,
    /// 1001: the server is draining; the reason carries a reconnect hint.
    GoingAway,
    /// 1002: the client broke the framing rules.
    Protocol,
    /// 1003: the client sent a binary message; commands are text.
    Unsupported,
    /// 1007: a text message that is not UTF-8.
    InvalidPayload,
    /// 1008: policy violation (inbound flood).
    Policy,
    /// 1009: frame or message over `max_message_size`.
    TooBig,
    /// 1013: try again later: the connection could not keep up (slow consumer).
    TryAgainLater,
    /// 4401: the connection's token expired (refresh it before `exp`).
    Unauthorized,
    /// 4403: an administrator disconnected the connection's user.
    Forbidden,
}

impl CloseCode {
    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Unauthorized => 4401,
            CloseCode::Forbidden => 4403,
        }
    }
}

/// Why the server closes a connection: a code plus a short reason for the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The close code sent.
    pub code: CloseCode,
    /// Human-readable reason; at most 123 bytes go on the wire.
    pub reason: String,
}

impl CloseReason {
    /// A reason with the given code and text.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}

impl From<crate::proto::frame::FrameError> for CloseReason {
    fn from(err: crate::proto::frame::FrameError) -> Self {
        use crate::proto::frame::FrameError as E;
        let code = match err {
            E::TooBig { .. } => CloseCode::TooBig,
            E::InvalidUtf8 => CloseCode::InvalidPayload,
            E::BinaryMessage => CloseCode::Unsupported,
            _ => CloseCode::Protocol,
        };
        CloseReason::new(code, err.to_string())
    }
}

/// Why a connection closed (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseCause {
    /// The client sent a close frame.
    ClientClose = 0,
    /// The peer vanished (EOF or reset).
    PeerGone,
    /// No traffic within ping interval + pong timeout.
    Dead,
    /// Slow consumer past its drop limit (1013).
    SlowConsumer,
    /// A framing violation (1002/1003/1007/1009).
    ProtocolError,
    /// Inbound flood (1008).
    Policy,
    /// Drained on shutdown (1001).
    Drain,
    /// I/O error on the socket.
    IoError,
    /// The token expired on a live connection (4401).
    TokenExpired,
    /// `POST /admin/disconnect` for the connection's user (4403).
    AdminDisconnect,
    /// A long poll gave its answer (an event came, or its timeout passed).
    PollAnswered,
}

impl CloseCause {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 11] = [
        "client_close",
        "peer_gone",
        "dead",
        "slow_consumer",
        "protocol_error",
        "policy",
        "drain",
        "io_error",
        "token_expired",
        "admin_disconnect",
        "poll_answered",
    ];
}
