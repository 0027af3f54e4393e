//! A shard's upgrade places (`max_handshakes_per_shard`), shared fairly between source
//! addresses (`handshake_fair_share`). Pure: no socket, no clock.
//!
//! While places are free, anyone takes one, so a single address (a load balancer that
//! hides its clients, a large NAT, a load generator) can use the whole budget. Once every
//! place is taken, a newcomer from an address holding fewer places than the address
//! holding the most takes the oldest place of that address (of those addresses, when
//! several hold as many): its upgrade is closed (with 503 + `Retry-After`) and the
//! newcomer's starts. The oldest goes first because healthy
//! upgrades finish in about one round trip: the oldest are the slow ones.
//!
//! This is max-min fairness: one address that opens a thousand sockets and sends one byte
//! on each cannot lock other addresses out, yet it is never refused while there is room.
//! A newcomer evicts only when the holder has at least two places more than the
//! newcomer's address, so two addresses never take places back and forth.
//!
//! Handshakes without an address ([`HandshakeBudget::admit`] with `None`: the peer is a
//! trusted proxy whose client is not known yet) use places but are never evicted and
//! never evict.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// What [`HandshakeBudget::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// A place was free: the new handshake holds it under this id.
    Admitted(u64),
    /// Every place was taken; the new handshake (`id`) took the place of the oldest
    /// handshake of the address holding the most, whose payload is `victim`: the caller
    /// ends that handshake.
    Evicting {
        /// The new handshake's id.
        id: u64,
        /// The evicted handshake's payload.
        victim: T,
    },
    /// Every place is taken and no address holds two places more than the newcomer's.
    Full,
}

/// The places of one shard's upgrades in progress, by source address `K`, each carrying
/// a payload `T` (how to end it when it is evicted).
#[derive(Debug)]
pub struct HandshakeBudget<K, T> {
    limit: usize,
    fair_share: bool,
    next_id: u64,
    /// Handshakes in progress by id; ids grow, so the first of an address is its oldest.
    open: BTreeMap<u64, (Option<K>, T)>,
    /// Places held per address (entries with at least one).
    held: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone, T> HandshakeBudget<K, T> {
    /// `limit` places; `fair_share` turns eviction on.
    pub fn new(limit: usize, fair_share: bool) -> Self {
        HandshakeBudget {
            limit,
            fair_share,
            next_id: 0,
            open: BTreeMap::new(),
            held: HashMap::new(),
        }
    }

    /// Changes the number of places (a reload). Handshakes already in progress stay; a
    /// lowered limit only refuses (or evicts for) the next ones.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Turns eviction on or off (a reload).
    pub fn set_fair_share(&mut self, on: bool) {
        self.fair_share = on;
    }

    /// Handshakes in progress.
    pub fn in_flight(&self) -> usize {
        self.open.len()
    }

    /// Places held by `key`.
    pub fn held_by(&self, key: &K) -> usize {
        self.held.get(key).copied().unwrap_or(0)
    }

    /// A place for a new handshake from `key` (`None`: address not known), carrying
    /// `payload`.
    pub fn admit(&mut self, key: Option<K>, payload: T) -> Admission<T> {
        if self.open.len() < self.limit {
            return Admission::Admitted(self.insert(key, payload));
        }
        let Some(newcomer) = key.as_ref().filter(|_| self.fair_share) else {
            return Admission::Full;
        };
        let mine = self.held_by(newcomer);
        // The other addresses hold at most this many together: when it is less than
        // `mine + 2`, none of them can hold that many (the usual case when the newcomer
        // is the address that fills the shard), and no scan is needed.
        if self.open.len() - mine < mine + 2 {
            return Admission::Full;
        }
        let most = self.held.values().copied().max().unwrap_or(0);
        if most < mine + 2 {
            return Admission::Full;
        }
        // The oldest place of the addresses holding the most (ties go by age too).
        let victim_id = self
            .open
            .iter()
            .find(|(_, (k, _))| k.as_ref().is_some_and(|k| self.held_by(k) == most))
            .map(|(&id, _)| id);
        let Some((_, victim)) = victim_id.and_then(|id| self.remove(id)) else {
            return Admission::Full;
        };
        let id = self.insert(key, payload);
        Admission::Evicting { id, victim }
    }

    /// The handshake `id` ended (answered, failed, timed out): its place is free. Returns
    /// its payload, or `None` when it had already been evicted (its place was taken).
    pub fn leave(&mut self, id: u64) -> Option<T> {
        self.remove(id).map(|(_, payload)| payload)
    }

    fn insert(&mut self, key: Option<K>, payload: T) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(k) = &key {
            *self.held.entry(k.clone()).or_insert(0) += 1;
        }
        self.open.insert(id, (key, payload));
        id
    }

    fn remove(&mut self, id: u64) -> Option<(Option<K>, T)> {
        let (key, payload) = self.open.remove(&id)?;
        if let Some(k) = &key {
            if let Some(n) = self.held.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(k);
                }
            }
        }
        Some((key, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Budget = HandshakeBudget<&'static str, u64>;

    fn admitted(a: Admission<u64>) -> u64 {
        match a {
            Admission::Admitted(id) => id,
            other => panic!("expected a free place, got {other:?}"),
        }
    }

    #[test]
    fn one_address_may_take_every_free_place() {
        let mut b = Budget::new(3, true);
        for n in 0..3 {
            admitted(b.admit(Some("nat"), n));
        }
        assert_eq!(b.admit(Some("nat"), 9), Admission::Full, "its own 4th");
        assert_eq!(b.held_by(&"nat"), 3);
    }

    #[test]
    fn a_newcomer_takes_the_oldest_place_of_the_address_holding_most() {
        let mut b = Budget::new(4, true);
        let first = admitted(b.admit(Some("slow"), 100));
        for n in 1..4 {
            admitted(b.admit(Some("slow"), 100 + n));
        }
        match b.admit(Some("other"), 200) {
            Admission::Evicting { victim, id } => {
                assert_eq!(victim, 100, "the oldest of `slow`");
                assert!(id > first);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((b.held_by(&"slow"), b.held_by(&"other")), (3, 1));
        assert_eq!(b.in_flight(), 4);
        assert_eq!(
            b.leave(first),
            None,
            "the evicted one's place is not freed twice"
        );
        assert_eq!(b.in_flight(), 4);
    }

    #[test]
    fn places_are_not_passed_back_and_forth() {
        let mut b = Budget::new(4, true);
        for n in 0..3 {
            admitted(b.admit(Some("a"), n));
        }
        admitted(b.admit(Some("b"), 10));
        // a: 3, b: 1 -> b's next evicts (3 >= 1 + 2); then a: 2, b: 2 -> nobody evicts.
        assert!(matches!(
            b.admit(Some("b"), 11),
            Admission::Evicting { victim: 0, .. }
        ));
        assert_eq!(b.admit(Some("b"), 12), Admission::Full);
        assert_eq!(b.admit(Some("a"), 3), Admission::Full);
        // A third address holding none still evicts from one holding two...
        assert!(matches!(
            b.admit(Some("c"), 20),
            Admission::Evicting { victim: 1, .. }
        ));
        assert!(matches!(
            b.admit(Some("d"), 30),
            Admission::Evicting { victim: 10, .. }
        ));
        // ...until every address holds one: then nobody does.
        assert_eq!(b.admit(Some("e"), 40), Admission::Full);
        assert_eq!(["a", "b", "c", "d"].map(|k| b.held_by(&k)), [1, 1, 1, 1]);
    }

    #[test]
    fn off_or_unknown_addresses_never_evict_and_are_never_evicted() {
        let mut b = Budget::new(2, false);
        admitted(b.admit(Some("a"), 0));
        admitted(b.admit(Some("a"), 1));
        assert_eq!(b.admit(Some("b"), 2), Admission::Full, "fair share off");
        b.set_fair_share(true);
        assert!(matches!(
            b.admit(Some("b"), 2),
            Admission::Evicting { victim: 0, .. }
        ));

        let mut p = Budget::new(2, true);
        admitted(p.admit(None, 0));
        admitted(p.admit(None, 1));
        assert_eq!(
            p.admit(Some("b"), 2),
            Admission::Full,
            "proxied places stay"
        );
        assert_eq!(p.admit(None, 3), Admission::Full);
    }

    #[test]
    fn leaving_frees_the_place_and_a_lowered_limit_applies_to_the_next() {
        let mut b = Budget::new(2, true);
        let a = admitted(b.admit(Some("a"), 0));
        admitted(b.admit(Some("b"), 1));
        assert_eq!(b.leave(a), Some(0));
        assert_eq!(b.held_by(&"a"), 0);
        admitted(b.admit(Some("c"), 2));
        b.set_limit(1);
        assert_eq!(b.in_flight(), 2, "handshakes in progress stay");
        assert_eq!(b.admit(Some("d"), 3), Admission::Full);
    }

    proptest! {
        /// Whatever the order of arrivals and departures: the places in use never exceed
        /// the limit, the per-address counts add up, and an address that got a place
        /// evicted only from one holding at least two more.
        #[test]
        fn counts_stay_consistent(ops in proptest::collection::vec((0u8..6, any::<bool>()), 0..300)) {
            const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];
            let mut b = HandshakeBudget::<&str, u64>::new(8, true);
            // (id, payload) of the handshakes in progress.
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (i, (who, arrive)) in ops.into_iter().enumerate() {
                let payload = i as u64;
                if arrive || live.is_empty() {
                    let key = KEYS.get(usize::from(who)).copied();
                    let before: Vec<usize> = KEYS.iter().map(|k| b.held_by(k)).collect();
                    match b.admit(key, payload) {
                        Admission::Admitted(id) => live.push((id, payload)),
                        Admission::Evicting { id, victim } => {
                            let k = key.expect("only known addresses evict");
                            let mine = b.held_by(&k) - 1;
                            prop_assert!(before.iter().any(|&n| n >= mine + 2));
                            live.retain(|&(_, p)| p != victim);
                            live.push((id, payload));
                        }
                        Admission::Full => {}
                    }
                } else {
                    let (id, p) = live.remove(usize::from(who) % live.len());
                    prop_assert_eq!(b.leave(id), Some(p));
                }
                prop_assert_eq!(b.in_flight(), live.len());
                prop_assert!(b.in_flight() <= 8);
                let keyed: usize = KEYS.iter().map(|k| b.held_by(k)).sum();
                prop_assert!(keyed <= b.in_flight());
            }
        }
    }
}
