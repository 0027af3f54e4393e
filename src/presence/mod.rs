//! Presence: who is subscribed to a channel, over every shard, and the join/leave events
//! that announce changes.
//!
//! Kept only for channels whose namespace has `presence = true`
//! ([`crate::auth::namespace::NamespaceRules`]).
//!
//! - [`member`] says who counts as a member: a user (token `sub`), however many
//!   connections it has on the channel, or one anonymous connection by its id.
//! - [`registry`] is the process-wide channel → members map, striped so that shards
//!   subscribing to different channels never wait for each other; it decides first-in and
//!   last-out and sends the join/leave events through the fan-out ring.
//!
//! The shard keeps it in step with its subscription index: every subscription that
//! takes effect on a presence channel (command or upgrade URL) is one connection in, and
//! every one that ends (unsubscribe, and every close path: client close, dead peer found
//! by the heartbeat, slow consumer, token expiry, admin disconnect, drain) is one out.

pub mod member;
pub mod registry;

#[cfg(test)]
mod registry_tests;

pub use member::{ConnId, Member};
pub use registry::{Change, Presence, PresenceStats, Snapshot};
