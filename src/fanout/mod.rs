//! Fan-out: from one published message to every subscriber on every shard.
//!
//! - [`publisher`] takes a channel's next offset, encodes the frame once and pushes it
//!   into the ring, keeping per-channel offset order equal to ring order.
//! - [`ring`] is the shared lock-free multi-producer ring every shard follows.
//! - [`wake`] wakes idle shards when the ring advances, coalescing wake-ups.
//! - [`sync`] picks std or loom atomics for the wake protocol (model-checked).
//! - [`index`] is a shard's channel -> subscribers index.

pub mod history;
pub mod index;
pub mod publisher;
pub mod ring;
pub mod spin;
pub mod sync;
pub mod wake;

// The wake-up handshake, model-checked: `cargo test --release --features loom --lib
// fanout::loom_wake`. A unit test rather than an integration test, so the run does not
// rebuild the `ringcast` binary with loom's atomics (which work only inside a model).
#[cfg(all(test, feature = "loom"))]
mod loom_wake;
