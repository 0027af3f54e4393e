//! Where a subscriber is in a channel and the next step of its catch-up: the words the
//! client's commands, the connection machine and the channel history share.
//!
//! They live at the bottom floor, with the protocol that parses and applies them;
//! [`crate::fanout::history`] above produces them from what a channel retained.

use bytes::Bytes;

/// A client's claimed position in a channel: `subscribe` with `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// The last offset it received.
    pub offset: u64,
    /// The epoch that offset belongs to.
    pub epoch: u64,
}

/// What a lagging subscriber gets next from a channel's history (made by
/// [`crate::fanout::publisher::Publisher::catch_up`], applied by
/// [`crate::proto::conn::Connection`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Offsets it missed for good (no longer retained): it is told with a gap notice.
    pub gap: Option<(u64, u64)>,
    /// Frames to queue, oldest first.
    pub frames: Vec<Bytes>,
    /// The last offset those frames (or the gap) reach.
    pub reached: u64,
    /// True when `reached` is the subscriber's live position: it follows live again.
    pub done: bool,
}
