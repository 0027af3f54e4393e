//! TLS termination for the `tls_listen` port (`wss://`, and `https://` for `/sse` and
//! `/poll`), with rustls and its `ring` provider.
//!
//! [`config`] turns the PEM files into a rustls `ServerConfig` (read at start and on every
//! SIGHUP; a bad pair is refused naming the key). [`session`] is the sans-io part the
//! shard drives after the upgrade: ciphertext in, plaintext out, and backlog bytes
//! encrypted only when rustls has nothing left to send, so the backlog stays the one
//! place that bounds a slow consumer.

pub mod config;
pub mod session;

pub use config::{load_server_config, TlsConfigError};
pub use session::TlsSession;
