//! Publishing when NATS or JetStream fails (docs/cluster.md, "Failure modes").
//!
//! Two states are told apart:
//!
//! - **connection down** (no NATS server reachable since `Event::Disconnected`): after
//!   [`LOCAL_AFTER`] an un-acknowledged publish (UDP, TCP without `ACK ON`, HTTP without
//!   `ack=1`) is served on this node only, in a local epoch, so local service goes on; an
//!   acknowledged one (`ack=1`, `ACK ON`, a client `publish`) is refused: its answer
//!   means stored, and nothing is stored until the node has reconnected;
//! - **connected, JetStream not usable** (the stream cannot be created or read yet, e.g.
//!   a JetStream cluster still electing its leaders): a publish waits up to
//!   [`READY_WAIT`] from the connect for the stream, then is refused. Never served
//!   locally: an acknowledged message is always in the stream.
//!
//! Every message carries a `Nats-Msg-Id` of its own. A publish whose outcome is unknown
//! (the ack timed out, no responders while a stream leader moves, the connection broke)
//! is sent again with the same id for up to [`RESEND_FOR`]: JetStream's duplicate
//! window ([`DUPLICATE_WINDOW`]) answers a copy of a stored message with the first one's
//! sequence (`duplicate: true`) instead of storing it twice; the node then learns the
//! offset the first copy took and delivers it locally once (offsets at or below the last
//! applied one are dropped).

use super::{Node, LOCAL_AFTER, MAX_TRIES};
use crate::cluster::stored;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long publishes wait, while connected to NATS, for the stream to become usable
/// (counted from the connect) before they are refused.
pub const READY_WAIT: Duration = Duration::from_secs(5);
/// How long a publish whose outcome is unknown is sent again with the same
/// `Nats-Msg-Id` (and how long any transient JetStream failure is retried) before it is
/// refused.
pub const RESEND_FOR: Duration = Duration::from_secs(10);
/// The stream's `duplicate_window`: a re-sent copy within it is recognised. Far longer
/// than [`RESEND_FOR`].
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What a publish does next.
#[derive(Debug, PartialEq)]
enum Gate {
    /// The stream is usable.
    Stream,
    /// The connection has been down for [`LOCAL_AFTER`]: serve it locally.
    Local,
    /// Refuse it with this reason.
    Refuse(String),
}

/// What [`decide`] looks at, taken at one moment.
#[derive(Clone, Copy)]
struct GateView {
    /// Connected and the stream usable.
    up: bool,
    /// The NATS connection is up.
    connected: bool,
    /// How long the connection has been down (meaningful when not `connected`).
    down_for: Duration,
    /// How long the connection has been up (meaningful when `connected`).
    connected_for: Duration,
    /// A copy of the message may already be stored.
    sent: bool,
    /// The publish's resend deadline has passed.
    past_deadline: bool,
    /// Nobody was promised "stored": it may be served in a local epoch.
    may_serve_locally: bool,
}

/// Refusal of an acknowledged publish while the connection is down.
const UNREACHABLE: &str = "cluster: NATS is unreachable: the message was not stored \
     (acknowledged publishes are never served locally); retry later";

/// The publish's fate at this moment; `None`: wait and look again.
fn decide(v: GateView, ensure_error: &str) -> Option<Gate> {
    if v.up {
        return Some(Gate::Stream);
    }
    if !v.connected {
        if v.sent && v.past_deadline {
            return Some(Gate::Refuse(
                "cluster: the NATS connection was lost before the stream acknowledged; \
                 the message may be stored: retry"
                    .into(),
            ));
        }
        if !v.sent && v.down_for >= LOCAL_AFTER {
            return Some(if v.may_serve_locally {
                Gate::Local
            } else {
                Gate::Refuse(UNREACHABLE.into())
            });
        }
        return None;
    }
    if v.connected_for >= READY_WAIT || (v.sent && v.past_deadline) {
        return Some(Gate::Refuse(format!(
            "cluster: connected to NATS but the JetStream stream is not usable ({ensure_error}); retry"
        )));
    }
    None
}

impl Node {
    /// True while the NATS connection is up (whether or not the stream is usable).
    pub(super) fn connected(&self) -> bool {
        self.stats.connected.load(Relaxed) == 1
    }

    /// Waits until the stream is usable, or decides the publish's fate (see [`decide`]).
    /// `sent`: a copy may already be stored (then it is never served locally).
    /// `deadline`: when a publish that is waiting on a transient failure gives up.
    /// `may_serve_locally`: nobody was promised "stored".
    async fn gate(&self, sent: bool, deadline: Instant, may_serve_locally: bool) -> Gate {
        loop {
            let now = Instant::now();
            let view = GateView {
                up: self.up(),
                connected: self.connected(),
                down_for: now.saturating_duration_since(self.down_since.get()),
                connected_for: now.saturating_duration_since(self.connected_since.get()),
                sent,
                past_deadline: now >= deadline,
                may_serve_locally,
            };
            if let Some(gate) = decide(view, &self.ensure_error.borrow()) {
                return gate;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stores one message in the stream with the channel's next offset (retrying lost
    /// races and unknown outcomes), delivers it locally, publishes it live; or, when
    /// `may_serve_locally` (nobody was promised "stored"), serves it locally while the
    /// connection is down; or refuses it.
    pub(super) async fn publish_one(
        self: &Rc<Self>,
        channel: &Arc<str>,
        payload: Bytes,
        may_serve_locally: bool,
    ) -> Result<u64, String> {
        let msg_id = self.msg_ids.next();
        let deadline = Instant::now() + RESEND_FOR;
        let mut sent = false;
        let mut races = 0;
        let fail = |e: String| {
            self.stats.publish_errors.fetch_add(1, Relaxed);
            Err(e)
        };
        loop {
            match self.gate(sent, deadline, may_serve_locally).await {
                Gate::Stream => {}
                Gate::Local => return Ok(self.publish_local(channel, &payload)),
                Gate::Refuse(e) => return fail(e),
            }
            let known = self.chans.borrow().get(channel).and_then(|c| c.stream_last);
            let (last, epoch, seq) = match known {
                Some(k) => k,
                None => match self.read_last(channel).await {
                    Ok(k) => k,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "cluster: reading the last message; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => return fail(e),
                },
            };
            let offset = last + 1;
            let publish = Publish::build()
                .payload(payload.clone())
                .headers(stored::headers(offset, epoch, None))
                .expected_last_subject_sequence(seq)
                .message_id(msg_id.as_str());
            sent = true;
            let ack = match self
                .js
                .send_publish(self.stream_subject(channel), publish)
                .await
            {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            let ack = match ack {
                Ok(ack) => ack,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another node took the offset, or an earlier copy of this message
                    // did: read the last one again (the copy then comes back duplicate).
                    self.stats.retries.fetch_add(1, Relaxed);
                    self.forget_last(channel);
                    races += 1;
                    if races >= MAX_TRIES {
                        return fail(format!(
                            "cluster: other nodes took the next offset {MAX_TRIES} times in a row; retry"
                        ));
                    }
                    continue;
                }
                Err(e) if stored::transient(e.kind()) && Instant::now() < deadline => {
                    // Unknown outcome: the same message id again (the stream dedupes).
                    self.stats.resent.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, channel = %channel, "cluster: publish unacknowledged; sending it again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => {
                    self.forget_last(channel);
                    return fail(format!("cluster: publish not stored: {e}"));
                }
            };
            let (offset, epoch) = if ack.duplicate {
                self.stats.deduped.fetch_add(1, Relaxed);
                self.forget_last(channel);
                let stream = self.stream.borrow().clone();
                let position = match stream {
                    Some(stream) => {
                        let read = (last, epoch, seq);
                        stored::duplicate_position(
                            &stream,
                            ack.sequence,
                            read,
                            (offset, epoch),
                            races,
                        )
                        .await
                    }
                    None => (races == 0).then_some((offset, epoch)),
                };
                match position {
                    Some(p) => p,
                    None => {
                        return fail(format!(
                            "cluster: the message is stored (stream sequence {}) but its offset could not be read back",
                            ack.sequence
                        ))
                    }
                }
            } else {
                self.stats.published.fetch_add(1, Relaxed);
                self.chans
                    .borrow_mut()
                    .entry(channel.clone())
                    .or_default()
                    .stream_last = Some((offset, epoch, ack.sequence));
                (offset, epoch)
            };
            let headers = stored::headers(offset, epoch, Some(ack.sequence));
            let _ = self
                .client
                .publish_with_headers(self.live_subject(channel), headers, payload.clone())
                .await;
            // At or below the last applied offset (a copy already read back from the
            // stream): dropped there, so delivered once.
            self.deliver(channel, offset, epoch, ack.sequence, payload, true);
            return Ok(offset);
        }
    }

    fn forget_last(&self, channel: &Arc<str>) {
        if let Some(c) = self.chans.borrow_mut().get_mut(channel) {
            c.stream_last = None;
        }
    }

    /// Creates or updates the stream until it works or the connection `generation`
    /// ends; then the node is up. `first`: the node was not up with this stream before
    /// (it counts as connected but not ready until this succeeds).
    pub(super) async fn ensure_until_ready(self: Rc<Self>, generation: u64, first: bool) {
        let mut tries: u64 = 0;
        loop {
            if self.conn_generation.get() != generation || !self.connected() {
                return;
            }
            match self.ensure_stream().await {
                Ok(()) => break,
                Err(e) => {
                    if tries % 10 == 0 {
                        tracing::warn!(error = %e, stream = %self.settings.stream_name, "cluster: the JetStream stream is not usable yet; retrying");
                    }
                    *self.ensure_error.borrow_mut() = e;
                }
            }
            tries += 1;
            let pause = Duration::from_millis((250 * tries).min(2000));
            tokio::time::sleep(pause).await;
        }
        if first && self.conn_generation.get() == generation && self.connected() {
            self.ensure_error.borrow_mut().clear();
            self.stats.up.store(1, Relaxed);
            tracing::info!("cluster: connected to NATS, stream ready; cross-node delivery up");
            self.resync();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connection down for `down_for`, nothing sent yet.
    fn down(down_for: Duration, may_serve_locally: bool) -> GateView {
        GateView {
            up: false,
            connected: false,
            down_for,
            connected_for: Duration::ZERO,
            sent: false,
            past_deadline: false,
            may_serve_locally,
        }
    }

    #[test]
    fn a_usable_stream_takes_every_publish() {
        let mut v = down(Duration::ZERO, false);
        v.up = true;
        v.connected = true;
        assert_eq!(decide(v, ""), Some(Gate::Stream));
    }

    #[test]
    fn publishes_wait_for_a_connection_lost_less_than_local_after() {
        for local in [true, false] {
            assert_eq!(decide(down(LOCAL_AFTER / 2, local), ""), None);
        }
    }

    #[test]
    fn an_unacknowledged_publish_is_served_locally_once_the_connection_stays_down() {
        assert_eq!(decide(down(LOCAL_AFTER, true), ""), Some(Gate::Local));
    }

    /// Regression (open issue, item 11): an `ack=1` / `ACK ON` / client publish was
    /// answered 200 with a local-epoch offset while nothing was stored.
    #[test]
    fn an_acknowledged_publish_is_refused_never_served_locally_while_the_connection_is_down() {
        for down_for in [LOCAL_AFTER, LOCAL_AFTER * 30] {
            match decide(down(down_for, false), "") {
                Some(Gate::Refuse(why)) => {
                    assert!(why.starts_with("cluster: NATS is unreachable"), "{why}");
                }
                other => panic!("down {down_for:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_sent_publish_is_never_served_locally_and_refused_at_its_deadline() {
        let mut v = down(LOCAL_AFTER * 3, true);
        v.sent = true;
        assert_eq!(decide(v, ""), None, "waits for the connection");
        v.past_deadline = true;
        assert!(matches!(decide(v, ""), Some(Gate::Refuse(why)) if why.contains("may be stored")));
    }

    #[test]
    fn connected_without_a_usable_stream_waits_then_refuses_every_publish() {
        for local in [true, false] {
            let mut v = down(Duration::ZERO, local);
            v.connected = true;
            v.connected_for = READY_WAIT / 2;
            assert_eq!(decide(v, "no leader"), None);
            v.connected_for = READY_WAIT;
            assert!(
                matches!(decide(v, "no leader"), Some(Gate::Refuse(why)) if why.contains("(no leader)"))
            );
        }
    }
}
