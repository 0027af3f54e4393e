//! A shard's connection table: each connection's sans-io state machine
//! ([`Connection`]) next to what the driver keeps for it ([`Driver`]: the socket and TLS
//! session of a served connection, the simulated socket of a test).
//!
//! There is no task, future or buffer per connection. An idle connection is its entry here
//! (the driver's part, a generation, and the machine with an empty backlog and no input
//! buffer) plus its slot in the subscription index.
//!
//! The table reserves its capacity up front: growing a slab by doubling at a million
//! entries copies ~200 MB while an accept waits. Untouched capacity costs address space,
//! not resident memory.

use crate::proto::conn::Connection;
use slab::Slab;

/// What a driver keeps per connection beside the machine; the engine never looks inside.
/// Two parts, so a 4-byte descriptor packs with the generation: an idle connection's
/// entry is what a million connections cost.
pub trait Driver {
    /// The socket (a served connection's descriptor).
    type Fd;
    /// The TLS session of a `tls_listen` connection, or nothing.
    type Tls;
}

/// One connection.
pub struct Conn<D: Driver> {
    /// Its socket.
    pub fd: D::Fd,
    /// Generation of this table slot, so events for a previous occupant are ignored.
    pub generation: u32,
    /// Protocol state: input, limits, backlog, heartbeat, close.
    pub machine: Connection,
    /// Its TLS session, if any.
    pub tls: D::Tls,
}

/// The connections of one shard, keyed by slot.
pub struct ConnTable<D: Driver> {
    slots: Slab<Conn<D>>,
    /// One past the highest key ever used: the range a cursor walk covers.
    high: u32,
}

impl<D: Driver> ConnTable<D> {
    /// A table with room for `capacity` connections before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        ConnTable {
            slots: Slab::with_capacity(capacity),
            high: 0,
        }
    }

    /// Stores a connection; returns its key.
    pub fn insert(&mut self, conn: Conn<D>) -> u32 {
        let key = self.slots.insert(conn) as u32;
        self.high = self.high.max(key + 1);
        key
    }

    /// The key the next [`ConnTable::insert`] will use.
    pub fn next_key(&self) -> u32 {
        self.slots.vacant_key() as u32
    }

    /// The connection in slot `key`, whatever its generation.
    pub fn get(&self, key: u32) -> Option<&Conn<D>> {
        self.slots.get(key as usize)
    }

    /// The connection in slot `key`, whatever its generation, to change.
    pub fn get_mut(&mut self, key: u32) -> Option<&mut Conn<D>> {
        self.slots.get_mut(key as usize)
    }

    /// The connection in slot `key` if it is still generation `generation`.
    pub fn get_current(&mut self, key: u32, generation: u32) -> Option<&mut Conn<D>> {
        self.slots
            .get_mut(key as usize)
            .filter(|c| c.generation == generation)
    }

    /// Removes and returns the connection in slot `key`.
    pub fn remove(&mut self, key: u32) -> Option<Conn<D>> {
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

    /// Every connection with its key.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Conn<D>)> {
        self.slots.iter().map(|(k, c)| (k as u32, c))
    }
}
