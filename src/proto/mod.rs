//! Sans-io WebSocket protocol: everything between raw bytes and meaning, with no sockets,
//! rings or clocks.
//!
//! - [`upgrade`] parses the HTTP upgrade request and renders the answers to it.
//! - [`frame`] decodes client frames (masking, fragmentation, limits) and encodes server
//!   frames.
//! - [`mask`] applies the RFC 6455 XOR mask.
//! - [`command`] parses client JSON commands and renders replies.
//! - [`message`] renders a published message into its one shared frame.
//! - [`conn`] is one connection's state machine: input, limits, heartbeats, close.
//! - [`backlog`] is a connection's bounded send queue and the slow-consumer policy.
//! - [`close`] is the table of close codes and where each protocol error maps.
//! - [`channel`] validates channel names.
//! - [`position`] parses and renders position tokens (SSE `id:`, long-poll `since`).
//! - [`sse`] re-encodes the WebSocket frames for the HTTP transports (`/sse`, `/poll`).
//! - [`origin`] decides which browser origins may connect (and the CORS headers).
//! - [`proxy`] parses the PROXY protocol header (v1, v2) a load balancer sends first.
//! - [`recovery`] is a subscriber's claimed position ([`recovery::Since`]) and the next
//!   step of its catch-up from history ([`recovery::CatchUp`]).

pub mod backlog;
pub mod channel;
pub mod close;
pub mod command;
pub mod conn;
pub mod frame;
pub mod mask;
pub mod message;
pub mod origin;
pub mod position;
pub mod proxy;
pub mod recovery;
pub mod sse;
pub mod upgrade;
