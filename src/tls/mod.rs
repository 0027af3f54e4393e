//! TLS termination for the `tls_listen` port (`wss://`, and `https://` for `/sse` and
//! `/poll`), with rustls and its `ring` provider.
//!
//! [`config`] turns the PEM files into a rustls `ServerConfig` (read at start and on every
//! SIGHUP; a bad pair is refused naming the key). [`session`] is the sans-io part, on
//! rustls' unbuffered API: ciphertext in, plaintext out, and backlog bytes encrypted only
//! when nothing earlier is unsent, so the backlog stays the one place that bounds a slow
//! consumer; an idle session keeps no buffer. [`stream`] runs a session over an async
//! stream for the handshake and the HTTP upgrade.

pub mod config;
pub mod session;
pub mod stream;

pub use config::{load_server_config, TlsConfigError};
pub use session::TlsSession;
