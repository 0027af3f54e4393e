//! The atomics of the wake protocol, swappable for loom's so the model checker runs the
//! code the server runs.
//!
//! [`crate::fanout::wake`] (idle flags) and [`crate::fanout::ring::RingHead`] (the claim
//! counter) take their atomics from here. With the `loom` cargo feature these are
//! `loom::sync::atomic` types, which only work inside `loom::model`: the feature exists for
//! `src/fanout/loom_wake.rs` alone and must never be enabled for a server build.

#[cfg(feature = "loom")]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicU64};
#[cfg(not(feature = "loom"))]
pub use std::sync::atomic::{fence, AtomicBool, AtomicU64};

pub use std::sync::atomic::Ordering;
