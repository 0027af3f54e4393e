//! Per source address limits: open connections, new connections per second (token
//! bucket) and upgrades in progress, over the whole process.
//!
//! IPv4 addresses count one by one; IPv6 addresses by their first `ipv6_prefix_len` bits
//! (default 64: one customer's LAN, which can use every address in it). An IPv4-mapped
//! IPv6 peer counts as its IPv4 address.
//!
//! The table is a map from address to counters split into [`MAP_SHARDS`] mutexes by a
//! hash of the address, so cores admitting different addresses rarely meet. An entry
//! exists only while its address has a connection or an upgrade, or a rate bucket that has
//! not refilled yet: it is removed when its counts reach zero (rate limit off) or swept
//! once its bucket is full again (rate limit on). The table is therefore bounded by the
//! open connections plus the addresses seen within one refill time (burst / rate).
//!
//! A [`PerIpHold`] stands for one admitted socket: it counts as an upgrade in progress
//! until [`PerIpHold::upgraded`], and as a connection until dropped.

use crate::admission::token_bucket::TokenBucket;
use crossbeam_utils::CachePadded;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Mutexes the table is split into.
pub const MAP_SHARDS: usize = 16;

/// The per-address limits; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpLimits {
    /// Open connections (upgrades in progress included) per address.
    pub max_connections: u32,
    /// New connections per second per address (also the burst).
    pub max_new_per_sec: u32,
    /// Upgrades in progress per address.
    pub max_handshakes: u32,
    /// Leading bits of an IPv6 address that identify its source (1-128).
    pub ipv6_prefix_len: u8,
}

impl PerIpLimits {
    /// True when at least one limit is on (otherwise no table is kept at all).
    pub fn any(&self) -> bool {
        self.max_connections > 0 || self.max_new_per_sec > 0 || self.max_handshakes > 0
    }

    /// The key `ip` is counted under.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u32::from(self.ipv6_prefix_len.min(128));
                    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
                }
            },
        }
    }
}

/// Which per-address limit refused a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerIpRefusal {
    /// `max_connections_per_ip`.
    Connections,
    /// `max_new_connections_per_ip_per_sec`.
    Rate,
    /// `max_handshakes_per_ip`.
    Handshakes,
}

#[derive(Debug)]
struct Entry {
    connections: u32,
    handshakes: u32,
    bucket: TokenBucket,
}

#[derive(Debug, Default)]
struct Map {
    entries: HashMap<IpAddr, Entry>,
    /// Sweep idle entries when the map grows past this.
    sweep_at: usize,
}

/// The process-wide per-address table.
///
/// The three limits can change while it runs ([`PerIpTable::set_limits`], on SIGHUP): a
/// lowered limit refuses the next sockets over it and closes none. `ipv6_prefix_len`
/// stays as it was at start (it decides the keys entries are counted under).
#[derive(Debug)]
pub struct PerIpTable {
    ipv6_prefix_len: u8,
    max_connections: AtomicU32,
    max_new_per_sec: AtomicU32,
    max_handshakes: AtomicU32,
    hasher: RandomState,
    maps: Box<[CachePadded<Mutex<Map>>]>,
}

/// Entries below which a map is never swept.
const MIN_SWEEP: usize = 1024;

impl PerIpTable {
    /// An empty table enforcing `limits`.
    pub fn new(limits: PerIpLimits) -> Arc<PerIpTable> {
        Arc::new(PerIpTable {
            ipv6_prefix_len: limits.ipv6_prefix_len,
            max_connections: AtomicU32::new(limits.max_connections),
            max_new_per_sec: AtomicU32::new(limits.max_new_per_sec),
            max_handshakes: AtomicU32::new(limits.max_handshakes),
            hasher: RandomState::new(),
            maps: (0..MAP_SHARDS)
                .map(|_| {
                    CachePadded::new(Mutex::new(Map {
                        entries: HashMap::new(),
                        sweep_at: MIN_SWEEP,
                    }))
                })
                .collect(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> PerIpLimits {
        PerIpLimits {
            max_connections: self.max_connections.load(Ordering::Relaxed),
            max_new_per_sec: self.max_new_per_sec.load(Ordering::Relaxed),
            max_handshakes: self.max_handshakes.load(Ordering::Relaxed),
            ipv6_prefix_len: self.ipv6_prefix_len,
        }
    }

    /// Replaces the three limits for the sockets admitted from now on (a reload); the
    /// counts already kept stay, and `limits.ipv6_prefix_len` is ignored.
    pub fn set_limits(&self, limits: PerIpLimits) {
        self.max_connections
            .store(limits.max_connections, Ordering::Relaxed);
        self.max_new_per_sec
            .store(limits.max_new_per_sec, Ordering::Relaxed);
        self.max_handshakes
            .store(limits.max_handshakes, Ordering::Relaxed);
    }

    fn map(&self, key: &IpAddr) -> MutexGuard<'_, Map> {
        let i = (self.hasher.hash_one(key) as usize) % self.maps.len();
        // A poisoned map only means a panic elsewhere (which aborts the process anyway).
        self.maps[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one new socket from `ip` at `now`, or says which limit refuses it.
    ///
    /// # Errors
    /// The [`PerIpRefusal`] naming the limit; nothing is counted then.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<PerIpHold, PerIpRefusal> {
        let l = self.limits();
        let key = l.key(ip);
        let mut map = self.map(&key);
        if map.entries.len() >= map.sweep_at {
            map.entries.retain(|_, e| {
                e.connections > 0
                    || e.handshakes > 0
                    || !e.bucket.is_full(now, l.max_new_per_sec, l.max_new_per_sec)
            });
            map.sweep_at = (map.entries.len() * 2).max(MIN_SWEEP);
        }
        let entry = map.entries.entry(key).or_insert_with(|| Entry {
            connections: 0,
            handshakes: 0,
            bucket: TokenBucket::full(l.max_new_per_sec, now),
        });
        let refusal = if l.max_connections > 0 && entry.connections >= l.max_connections {
            Some(PerIpRefusal::Connections)
        } else if l.max_handshakes > 0 && entry.handshakes >= l.max_handshakes {
            Some(PerIpRefusal::Handshakes)
        } else if l.max_new_per_sec > 0
            && !entry
                .bucket
                .try_take(now, l.max_new_per_sec, l.max_new_per_sec)
        {
            Some(PerIpRefusal::Rate)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if entry.connections == 0 && entry.handshakes == 0 && l.max_new_per_sec == 0 {
                map.entries.remove(&key);
            }
            return Err(refusal);
        }
        entry.connections += 1;
        entry.handshakes += 1;
        Ok(PerIpHold {
            table: self.clone(),
            key,
            in_handshake: true,
        })
    }

    fn release(&self, key: &IpAddr, handshake: bool) {
        let rate_on = self.max_new_per_sec.load(Ordering::Relaxed) > 0;
        let mut map = self.map(key);
        let Some(entry) = map.entries.get_mut(key) else {
            return;
        };
        entry.connections = entry.connections.saturating_sub(1);
        if handshake {
            entry.handshakes = entry.handshakes.saturating_sub(1);
        }
        // With the rate limit on, the entry stays until a sweep finds its bucket full:
        // forgetting it now would let connect-and-close loops skip the rate limit.
        if entry.connections == 0 && entry.handshakes == 0 && !rate_on {
            map.entries.remove(key);
        }
    }

    fn end_handshake(&self, key: &IpAddr) {
        let mut map = self.map(key);
        if let Some(entry) = map.entries.get_mut(key) {
            entry.handshakes = entry.handshakes.saturating_sub(1);
        }
    }

    /// Addresses (or IPv6 prefixes) with an entry.
    pub fn len(&self) -> usize {
        self.maps
            .iter()
            .map(|m| m.lock().map_or(0, |m| m.entries.len()))
            .sum()
    }

    /// True when no address has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One admitted socket's place in the [`PerIpTable`]; given back on drop.
#[derive(Debug)]
pub struct PerIpHold {
    table: Arc<PerIpTable>,
    key: IpAddr,
    in_handshake: bool,
}

impl PerIpHold {
    /// The upgrade finished: the socket no longer counts against `max_handshakes_per_ip`
    /// (it still counts as a connection until dropped).
    pub fn upgraded(&mut self) {
        if std::mem::take(&mut self.in_handshake) {
            self.table.end_handshake(&self.key);
        }
    }
}

impl Drop for PerIpHold {
    fn drop(&mut self) {
        self.table.release(&self.key, self.in_handshake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(conns: u32, rate: u32, handshakes: u32) -> PerIpLimits {
        PerIpLimits {
            max_connections: conns,
            max_new_per_sec: rate,
            max_handshakes: handshakes,
            ipv6_prefix_len: 64,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_are_capped_per_address_and_entries_vanish_at_zero() {
        let t = PerIpTable::new(limits(2, 0, 0));
        let now = Instant::now();
        let a = t.admit(ip("127.0.0.2"), now).unwrap();
        let _b = t.admit(ip("127.0.0.2"), now).unwrap();
        assert_eq!(
            t.admit(ip("127.0.0.2"), now).unwrap_err(),
            PerIpRefusal::Connections
        );
        let c = t.admit(ip("127.0.0.3"), now).unwrap();
        drop(a);
        assert!(t.admit(ip("127.0.0.2"), now).is_ok());
        drop(c);
        assert_eq!(
            t.len(),
            1,
            "127.0.0.3 left the table with its last connection"
        );
    }

    #[test]
    fn handshakes_are_capped_until_upgraded() {
        let t = PerIpTable::new(limits(0, 0, 1));
        let now = Instant::now();
        let mut a = t.admit(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            t.admit(ip("10.0.0.1"), now).unwrap_err(),
            PerIpRefusal::Handshakes
        );
        a.upgraded();
        let b = t.admit(ip("10.0.0.1"), now).unwrap();
        drop(b); // dropped mid-upgrade: gives back both counts
        drop(a);
        assert!(t.is_empty());
    }

    #[test]
    fn the_rate_bucket_refuses_past_the_burst_and_refills() {
        let t = PerIpTable::new(limits(0, 2, 0));
        let now = Instant::now();
        drop(t.admit(ip("10.0.0.1"), now).unwrap());
        drop(t.admit(ip("10.0.0.1"), now).unwrap());
        assert_eq!(
            t.admit(ip("10.0.0.1"), now).unwrap_err(),
            PerIpRefusal::Rate,
            "connect-and-close does not reset the bucket"
        );
        assert!(t
            .admit(ip("10.0.0.1"), now + Duration::from_millis(500))
            .is_ok());
    }

    #[test]
    fn new_limits_apply_to_the_next_sockets_and_keep_the_counts() {
        let t = PerIpTable::new(limits(3, 0, 0));
        let now = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|_| t.admit(ip("10.0.0.1"), now).unwrap())
            .collect();
        t.set_limits(PerIpLimits {
            ipv6_prefix_len: 1,
            ..limits(2, 0, 0)
        });
        assert_eq!(t.limits().max_connections, 2);
        assert_eq!(
            t.limits().ipv6_prefix_len,
            64,
            "the prefix is fixed at start"
        );
        assert_eq!(
            t.admit(ip("10.0.0.1"), now).unwrap_err(),
            PerIpRefusal::Connections,
            "lowered below the open count: the next one is refused"
        );
        drop(held);
        assert!(t.admit(ip("10.0.0.1"), now).is_ok());
        t.set_limits(limits(0, 0, 0));
        let all: Vec<_> = (0..10).map(|_| t.admit(ip("10.0.0.1"), now)).collect();
        assert!(all.iter().all(Result::is_ok), "every limit off");
    }

    #[test]
    fn idle_rate_entries_are_swept() {
        let t = PerIpTable::new(limits(0, 1, 0));
        let now = Instant::now();
        for i in 0..(MIN_SWEEP as u32 * MAP_SHARDS as u32 * 2) {
            drop(t.admit(IpAddr::V4(i.into()), now).unwrap());
        }
        let later = now + Duration::from_secs(2);
        for i in 0..(MIN_SWEEP as u32 * MAP_SHARDS as u32 * 2) {
            drop(t.admit(IpAddr::V4((i + (1 << 30)).into()), later).unwrap());
        }
        assert!(
            t.len() < MIN_SWEEP * MAP_SHARDS * 3,
            "entries whose bucket refilled are forgotten: {}",
            t.len()
        );
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let l = limits(1, 0, 0);
        assert_eq!(l.key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(l.key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        let t = PerIpTable::new(l);
        let now = Instant::now();
        let _a = t.admit(ip("2001:db8:1:2::1"), now).unwrap();
        assert!(t.admit(ip("2001:db8:1:2::ffff"), now).is_err());
        assert!(t.admit(ip("2001:db8:1:3::1"), now).is_ok());
        let full = PerIpLimits {
            ipv6_prefix_len: 128,
            ..l
        };
        assert_eq!(full.key(ip("2001:db8::5")), ip("2001:db8::5"));
    }
}
