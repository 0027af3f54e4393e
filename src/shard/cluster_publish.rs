//! A client's `{"cmd":"publish"}` with the cluster on: answered with the stream's offset
//! once JetStream acknowledged, as HTTP `ack=1` is, without the shard waiting; refused
//! (503 `cluster: ...`) while the cluster cannot store, never served in a local epoch.
//!
//! The NATS thread answers on a flume channel per publish; its async receive is woken
//! from that thread through glommio's cross-thread waker. Each pending answer is awaited
//! by a small task of its own on this shard (spawned by [`serve`], which owns the
//! `Rc<Shard>`); the answer goes to the connection if it is still there, like an inbox
//! answer.

use crate::cluster::{Cluster, ClusterReply};
use crate::inbox::ShardTag;
use crate::proto::command::Reply;
use crate::shard::state::Shard;
use std::cell::RefCell;
use std::rc::Rc;

/// One publish waiting for the stream's acknowledgement.
pub struct Pending {
    tag: ShardTag,
    channel: String,
    rx: flume::Receiver<Result<u64, String>>,
}

thread_local! {
    /// This shard's queue of pending publishes (set by [`serve`]; one shard per thread).
    static PENDING: RefCell<Option<flume::Sender<Pending>>> = const { RefCell::new(None) };
}

/// Runs on each shard while the cluster is on: gives every pending publish a task that
/// answers its connection when the stream acknowledged (or refused) it.
pub async fn serve(shard: Rc<Shard>) {
    let (tx, rx) = flume::unbounded::<Pending>();
    PENDING.with(|p| *p.borrow_mut() = Some(tx));
    while let Ok(pending) = rx.recv_async().await {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let Pending { tag, channel, rx } = pending;
            let result = rx.recv_async().await;
            let id = tag.id.as_deref();
            let refuse = |error: &str| {
                Reply::Refused {
                    kind: "publish",
                    id,
                    channel: Some(&channel),
                    code: 503,
                    error,
                }
                .to_json()
            };
            let reply = match result {
                Ok(Ok(offset)) => Reply::Published {
                    id,
                    channel: &channel,
                    offset,
                }
                .to_json(),
                Ok(Err(e)) => refuse(&e),
                Err(_) => refuse("cluster: the NATS thread stopped"),
            };
            shard.answer_later(tag.key, tag.generation, reply, Vec::new());
            shard.settle();
        })
        .detach();
    }
}

/// Queues a client publish to the cluster; the reply comes when the stream answers.
///
/// # Errors
/// Why it was not queued (the refusal's text).
pub fn publish(
    cluster: &Cluster,
    tag: ShardTag,
    channel: &str,
    data: &[u8],
) -> Result<(), &'static str> {
    let queue = PENDING.with(|p| p.borrow().clone());
    let Some(queue) = queue else {
        return Err("cluster: this shard is not ready for cluster publishes yet");
    };
    let (tx, rx) = flume::bounded(1);
    cluster.publish(channel, data, ClusterReply::Stored(tx))?;
    let _ = queue.send(Pending {
        tag,
        channel: channel.to_string(),
        rx,
    });
    Ok(())
}
