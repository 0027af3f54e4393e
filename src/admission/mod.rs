//! Admission control, the pure half: what the accept loop and the upgrade decide about a
//! new socket, with the clock passed in. The glommio side is in [`crate::shard`]
//! ([`crate::shard::accept`], [`crate::shard::admission`]).
//!
//! - [`accept_backoff`]: out of descriptors or kernel memory on `accept`, the shard stops
//!   accepting for a growing pause instead of spinning, counts the error and logs it at
//!   most once per interval. Open connections are not touched; new ones wait in the
//!   kernel's accept queue.
//! - [`fair_share`]: a shard's upgrade places shared between source addresses: once all
//!   are taken, a newcomer from an address holding fewer takes the oldest place of the
//!   address holding the most (`handshake_fair_share`).
//! - [`log_budget`]: one log line per interval for refusals that can come by the
//!   thousand.
//! - [`per_ip`]: per source address caps on connections, new connections per second and
//!   upgrades in progress, in one bounded process-wide table.
//! - [`token_bucket`]: the rate limiter of `per_ip` and of `accept_rate_per_shard` (the
//!   accept loop waits for a token before each `accept`).

pub mod accept_backoff;
pub mod fair_share;
pub mod log_budget;
pub mod per_ip;
pub mod token_bucket;
