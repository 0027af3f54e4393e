//! Where a published message goes: the durable inbox for `user:` channels when it is on,
//! else the cluster when this node is part of one, else this node's publisher. Every
//! ingest path (UDP, TCP, HTTP, a client's `publish`) asks the same [`Routes`].

use crate::cluster::Cluster;
use crate::fanout::publisher::Publisher;
use crate::inbox::{is_user_channel, Inbox};
use std::sync::Arc;

/// The process's publish destinations, handed to every ingest path at start.
#[derive(Clone)]
pub struct Routes {
    /// This node's offsets, history and ring.
    pub publisher: Arc<Publisher>,
    /// The durable inbox, when on: the owner of `user:` channels.
    pub inbox: Option<Inbox>,
    /// The cluster, when this node is part of one.
    pub cluster: Option<Arc<Cluster>>,
}

/// Where one message goes.
pub enum Target<'a> {
    /// The inbox (a `user:` channel with the inbox on).
    Inbox(&'a Inbox),
    /// The cluster's stream (through the NATS thread).
    Cluster(&'a Cluster),
    /// This node's publisher.
    Local(&'a Publisher),
}

impl Routes {
    /// Where a message to `channel` goes.
    pub fn target(&self, channel: &str) -> Target<'_> {
        match (&self.inbox, &self.cluster) {
            (Some(inbox), _) if is_user_channel(channel) => Target::Inbox(inbox),
            (_, Some(cluster)) => Target::Cluster(cluster),
            _ => Target::Local(&self.publisher),
        }
    }
}
