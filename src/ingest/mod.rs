//! Ingest: how messages enter ringcast.
//!
//! - [`line`]: the `<channel> <payload>` format, pure parsing.
//! - [`key`]: the shared `ingest_key` TCP and HTTP publishers present, when set.
//! - [`udp`]: one datagram is one message.
//! - [`tcp`]: newline-delimited messages, many per connection; `ERR <reason>` replies.
//! - [`route`]: where a message goes: the inbox, the cluster or this node's publisher.
//!
//! HTTP `POST /publish` lives with the admin server ([`crate::admin`]). Every listener is
//! bound on every shard with SO_REUSEPORT, so ingest load spreads over cores.

pub mod key;
pub mod line;
pub mod route;
pub mod tcp;
pub mod udp;
