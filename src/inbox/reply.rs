//! The one way an answer goes back to whoever asked, for both backends: a waiting task
//! (HTTP `?ack=1`, TCP ack mode) gets the offset, a connection on a shard gets an
//! [`InboxAnswer`] on that shard's own unbounded queue, tagged with the connection's
//! slot, generation and command id ([`ShardTag`]) so the shard finds it (or sees it
//! left). The queue needs no bound of its own: every answer is for a request that passed
//! the bounded request queue. Its receiver is awaited by a task on the shard, which
//! glommio wakes from the backend's thread through its cross-thread waker (eventfd).
//!
//! The backend also wakes idle shards after it gave messages to the publisher
//! ([`ReplyPath::wake_idle`]), one token at most per shard.

use crate::fanout::publisher::Publisher;
use crate::inbox::handle::Request;
use crate::inbox::{ErrorKind, StoreError};
use crate::proto::recovery::Since;
use bytes::Bytes;
use std::sync::Arc;

/// Unacked messages sent to one subscriber at once; past it the reply says how many more
/// wait (ack, then subscribe again).
pub const MAX_DELIVERY: usize = 10_000;

/// Who is told the outcome of a request.
#[derive(Debug)]
pub enum InboxReply {
    /// Nobody (UDP, TCP without ack mode): failures are counted and logged.
    None,
    /// A waiting task (HTTP `?ack=1`, TCP ack mode): the offset, or why not.
    Wait(flume::Sender<Result<u64, StoreError>>),
    /// A connection on a shard: answered through that shard's answer queue.
    Shard {
        /// The shard.
        shard: usize,
        /// What the shard needs to find the connection and render the reply.
        tag: ShardTag,
    },
}

/// Identifies the connection and command an answer is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTag {
    /// Connection slot.
    pub key: u32,
    /// Its generation (the slot may have been reused by then).
    pub generation: u32,
    /// The command's id, rendered JSON.
    pub id: Option<String>,
    /// `since` of a subscribe.
    pub since: Option<Since>,
    /// How many times this subscribe was tried.
    pub attempt: u8,
}

/// The unacked messages of a channel as frames, up to its last offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// The channel's last offset when read.
    pub last: u64,
    /// The store's epoch.
    pub epoch: u64,
    /// (offset, frame), oldest first.
    pub frames: Vec<(u64, Bytes)>,
    /// Unacked messages not included ([`MAX_DELIVERY`]).
    pub more: u64,
}

/// What the store answers a shard.
#[derive(Debug)]
pub enum AnswerKind {
    /// A client publish to a user channel was committed at this offset.
    Published(Result<u64, StoreError>),
    /// An ack up to `upto` was applied: messages removed, or the channel's last offset
    /// when the ack was ahead of it.
    Acked {
        /// The acked offset.
        upto: u64,
        /// `Ok(Ok(removed))`, `Ok(Err(last))` when ahead, or the store error.
        result: Result<Result<u64, u64>, StoreError>,
    },
    /// A subscriber's unacked messages.
    Unacked(Result<Backlog, StoreError>),
}

/// An answer for a connection on a shard.
#[derive(Debug)]
pub struct InboxAnswer {
    /// The connection and command.
    pub tag: ShardTag,
    /// The channel.
    pub channel: Arc<str>,
    /// The outcome.
    pub kind: AnswerKind,
}

/// What a backend's `start` hands each shard: its wake-up and answer queues.
pub struct ShardQueues {
    /// A token whenever the store published while the shard was idle.
    pub wake: flume::Receiver<()>,
    /// Answers for this shard's connections.
    pub answers: flume::Receiver<InboxAnswer>,
}

/// What a request came to, as a backend found it.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A publish was stored at this offset.
    Published(u64),
    /// An ack removed this many messages, or was ahead of the channel's last offset.
    Acked(Result<u64, u64>),
    /// A read's unacked messages.
    Read(Backlog),
}

/// The backend's end of every shard's queues: answers and wake-ups go out here.
pub(crate) struct ReplyPath {
    wakes: Vec<flume::Sender<()>>,
    answers: Vec<flume::Sender<InboxAnswer>>,
}

impl ReplyPath {
    /// One wake queue (a token at most) and one answer queue per shard: the backend's
    /// end, and each shard's.
    pub(crate) fn new(shards: usize) -> (ReplyPath, Vec<ShardQueues>) {
        let mut wakes = Vec::with_capacity(shards);
        let mut answers = Vec::with_capacity(shards);
        let mut queues = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (wake_tx, wake_rx) = flume::bounded(1);
            let (answer_tx, answer_rx) = flume::unbounded();
            wakes.push(wake_tx);
            answers.push(answer_tx);
            queues.push(ShardQueues {
                wake: wake_rx,
                answers: answer_rx,
            });
        }
        (ReplyPath { wakes, answers }, queues)
    }

    /// Tells `request`'s requester what it came to. Acks and reads are answered only to
    /// shards; nobody waits for them elsewhere.
    pub(crate) fn answer(&self, request: Request, outcome: Result<Outcome, StoreError>) {
        let (channel, reply, kind) = match request {
            Request::Publish { channel, reply, .. } => {
                let offset = outcome.and_then(|o| match o {
                    Outcome::Published(offset) => Ok(offset),
                    _ => Err(lost("append")),
                });
                if let InboxReply::Wait(tx) = reply {
                    let _ = tx.send(offset);
                    return;
                }
                (channel, reply, AnswerKind::Published(offset))
            }
            Request::Ack {
                channel,
                upto,
                reply,
            } => {
                let result = outcome.and_then(|o| match o {
                    Outcome::Acked(r) => Ok(r),
                    _ => Err(lost("ack")),
                });
                (channel, reply, AnswerKind::Acked { upto, result })
            }
            Request::Read { channel, reply } => {
                let result = outcome.and_then(|o| match o {
                    Outcome::Read(backlog) => Ok(backlog),
                    _ => Err(lost("read")),
                });
                (channel, reply, AnswerKind::Unacked(result))
            }
        };
        if let InboxReply::Shard { shard, tag } = reply {
            if let Some(tx) = self.answers.get(shard) {
                // Fails only when the shard is gone (process exit).
                let _ = tx.send(InboxAnswer { tag, channel, kind });
            }
        }
    }

    /// Wakes the shards `publisher` marked idle, so they deliver what it just published.
    pub(crate) fn wake_idle(&self, publisher: &Publisher) {
        let wakes = &self.wakes;
        publisher.idle_flags().claim_idle(|shard| {
            if let Some(tx) = wakes.get(shard) {
                // Full: a token is already pending.
                let _ = tx.try_send(());
            }
        });
    }
}

/// A backend answered a request with another request's outcome.
fn lost(what: &str) -> StoreError {
    StoreError::new(ErrorKind::Io, format!("inbox: {what} lost (bug)"))
}
