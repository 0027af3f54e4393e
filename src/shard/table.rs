//! A shard's connection table: the socket of each upgraded connection next to its sans-io
//! state machine ([`Connection`]).
//!
//! There is no task, future or buffer per connection. An idle connection is its entry here
//! (the descriptor, a generation, and the machine with an empty backlog and no input
//! buffer) plus its slot in the subscription index; its socket waits in the shard's epoll
//! set ([`crate::shard::readiness`]).
//!
//! The table reserves its capacity up front: growing a slab by doubling at a million
//! entries copies ~200 MB while an accept waits. Untouched capacity costs address space,
//! not resident memory.

use crate::proto::conn::Connection;
use crate::tls::TlsSession;
use slab::Slab;
use std::os::fd::OwnedFd;

/// One WebSocket connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket (closed when the entry is dropped).
    pub fd: OwnedFd,
    /// Generation of this table slot, so events for a previous occupant are ignored.
    pub generation: u32,
    /// Protocol state: input, limits, backlog, heartbeat, close.
    pub machine: Connection,
    /// The TLS session of a `tls_listen` connection: its bytes in and out of the socket
    /// go through it ([`crate::shard::tls_io`]). `None` for a plain one.
    pub tls: Option<Box<TlsSession>>,
}

/// The connections of one shard, keyed by slot.
#[derive(Debug)]
pub struct ConnTable {
    slots: Slab<Conn>,
    /// One past the highest key ever used: the range a cursor walk covers.
    high: u32,
}

impl ConnTable {
    /// A table with room for `capacity` connections before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        ConnTable {
            slots: Slab::with_capacity(capacity),
            high: 0,
        }
    }

    /// Stores a connection; returns its key.
    pub fn insert(&mut self, conn: Conn) -> u32 {
        let key = self.slots.insert(conn) as u32;
        self.high = self.high.max(key + 1);
        key
    }

    /// The key the next [`ConnTable::insert`] will use.
    pub fn next_key(&self) -> u32 {
        self.slots.vacant_key() as u32
    }

    /// The connection in slot `key`, whatever its generation.
    pub fn get(&self, key: u32) -> Option<&Conn> {
        self.slots.get(key as usize)
    }

    /// The connection in slot `key`, whatever its generation, to change.
    pub fn get_mut(&mut self, key: u32) -> Option<&mut Conn> {
        self.slots.get_mut(key as usize)
    }

    /// The connection in slot `key` if it is still generation `generation`.
    pub fn get_current(&mut self, key: u32, generation: u32) -> Option<&mut Conn> {
        self.slots
            .get_mut(key as usize)
            .filter(|c| c.generation == generation)
    }

    /// Removes and returns the connection in slot `key`.
    pub fn remove(&mut self, key: u32) -> Option<Conn> {
        self.slots.try_remove(key as usize)
    }

    /// Open entries (any phase).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no connection is left.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// One past the highest key in use so far: cursor walks cover `0..high()`.
    pub fn high(&self) -> u32 {
        self.high
    }
}

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
