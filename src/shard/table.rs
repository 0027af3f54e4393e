//! What the driver keeps per connection beside the engine's machine: the socket, and the
//! TLS session of a `tls_listen` connection. The table itself is the engine's
//! ([`crate::engine::table`]); an idle socket waits in the shard's epoll set
//! ([`crate::shard::readiness`]).

use crate::tls::TlsSession;
use std::os::fd::OwnedFd;

/// The driver's part of one connection: the socket (closed when the entry is dropped),
/// and the TLS session of a `tls_listen` connection: its bytes in and out of the socket
/// go through it ([`crate::shard::tls_io`]); `None` for a plain one.
#[derive(Debug)]
pub struct Socket;

impl crate::engine::table::Driver for Socket {
    type Fd = OwnedFd;
    type Tls = Option<Box<TlsSession>>;
}

/// One served connection: its socket and its machine.
pub type Conn = crate::engine::table::Conn<Socket>;

/// The connections of one shard.
pub type ConnTable = crate::engine::table::ConnTable<Socket>;

/// The epoll token of a connection: slot key and generation.
pub fn token(key: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(key)
}

/// Splits an epoll token into (key, generation).
pub fn untoken(token: u64) -> (u32, u32) {
    (token as u32, (token >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection is this entry plus its index slots: a field added here costs a
    /// megabyte per million connections. Raise the bound only deliberately
    /// (docs/benchmarks.md has the measured bytes per idle connection). 128: the machine
    /// holds four boxes that are `None` while idle (split-frame input, the session of an
    /// authenticated connection, the channels it lags on, an HTTP transport's encoder) and
    /// the driver's two marks (in the machine's padding); the entry adds the TLS session
    /// box (`None` for a plain connection).
    #[test]
    fn an_idle_connection_entry_stays_small() {
        assert!(
            std::mem::size_of::<Conn>() <= 128,
            "Conn is {} bytes",
            std::mem::size_of::<Conn>()
        );
    }

    #[test]
    fn tokens_round_trip() {
        assert_eq!(untoken(token(7, u32::MAX)), (7, u32::MAX));
    }
}
