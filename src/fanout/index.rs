//! A shard's subscription index: channel -> subscribers and subscriber -> channels.
//!
//! Both directions are kept so that every operation is O(1) in the number of subscribers
//! of a channel: a subscriber remembers its position in each channel's member list, and
//! removal is a `swap_remove` that fixes up the one member that moved. (A 1M-subscriber
//! channel must not cost a scan when one of them disconnects.)

use crate::fanout::publisher::Publisher;
use slab::Slab;
use smallvec::SmallVec;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

/// Identifies a connection within its shard (its connection-table key).
pub type ConnKey = u32;

/// Told that a channel got its first subscriber on this shard (`true`) or lost its last
/// (`false`); the index's owner decides who hears of it (the cluster, in a server).
/// Reporting a transition costs one call, never an allocation.
pub type InterestSink = Box<dyn Fn(&str, bool)>;

struct ChannelMembers {
    name: Arc<str>,
    members: Vec<ConnKey>,
    /// The last offset of the channel every subscriber on this shard was offered (its
    /// fan-out here ended), or that one was told it is at: where a heal after a ring
    /// overrun starts, and where a released SSE stream that keeps up is.
    position: Cell<u64>,
    /// The channel's epoch as last attached here (0 until an attach told it): with
    /// `position`, where a subscriber that keeps up is (an SSE stream's `id:`).
    epoch: Cell<u64>,
}

/// (channel id, position in that channel's member list)
type SubRef = (u32, u32);

/// The subscription index of one shard.
#[derive(Default)]
pub struct SubscriptionIndex {
    ids: HashMap<Arc<str>, u32>,
    channels: Slab<ChannelMembers>,
    by_conn: Vec<SmallVec<[SubRef; 2]>>,
    /// Told when a channel gets its first subscriber here and loses its last, so that
    /// channel state nobody publishes leaves with its subscribers.
    publisher: Option<Arc<Publisher>>,
    /// Told of the same transitions, for whoever follows channels beyond this process.
    interest: Option<InterestSink>,
}

impl SubscriptionIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index that tells `publisher` which channels have subscribers here
    /// ([`Publisher::occupy`], [`Publisher::vacate`]) and reports the same transitions
    /// to `interest`.
    pub fn holding_for(publisher: Arc<Publisher>, interest: Option<InterestSink>) -> Self {
        SubscriptionIndex {
            publisher: Some(publisher),
            interest,
            ..Self::default()
        }
    }

    /// Subscribes `conn` to `channel`; returns false when it already was.
    pub fn subscribe(&mut self, conn: ConnKey, channel: &str) -> bool {
        let id = match self.ids.get(channel) {
            Some(&id) => id,
            None => {
                let name: Arc<str> = Arc::from(channel);
                let id = self.channels.insert(ChannelMembers {
                    name: name.clone(),
                    members: Vec::new(),
                    position: Cell::new(0),
                    epoch: Cell::new(0),
                }) as u32;
                self.ids.insert(name, id);
                // This shard's first subscriber: the owner's sink hears of it (in a
                // server, the cluster follows the channel here).
                if let Some(interest) = &self.interest {
                    interest(channel, true);
                }
                if let Some(publisher) = &self.publisher {
                    publisher.occupy(channel);
                }
                id
            }
        };
        let slot = conn as usize;
        if self.by_conn.len() <= slot {
            self.by_conn.resize_with(slot + 1, SmallVec::new);
        }
        if self.by_conn[slot].iter().any(|&(c, _)| c == id) {
            return false;
        }
        let members = &mut self.channels[id as usize].members;
        self.by_conn[slot].push((id, members.len() as u32));
        members.push(conn);
        true
    }

    /// Unsubscribes `conn` from `channel`; returns false when it was not subscribed.
    pub fn unsubscribe(&mut self, conn: ConnKey, channel: &str) -> bool {
        let Some(&id) = self.ids.get(channel) else {
            return false;
        };
        let Some(subs) = self.by_conn.get_mut(conn as usize) else {
            return false;
        };
        let Some(i) = subs.iter().position(|&(c, _)| c == id) else {
            return false;
        };
        let (_, pos) = subs.swap_remove(i);
        self.remove_member(id, pos);
        true
    }

    /// Removes every subscription of `conn` (on disconnect).
    pub fn remove_conn(&mut self, conn: ConnKey) {
        self.remove_conn_each(conn, |_| {});
    }

    /// Removes every subscription of `conn`, calling `removed` with each channel's name
    /// (on disconnect, for presence).
    pub fn remove_conn_each(&mut self, conn: ConnKey, mut removed: impl FnMut(&str)) {
        let Some(subs) = self.by_conn.get_mut(conn as usize) else {
            return;
        };
        for (id, pos) in std::mem::take(subs) {
            removed(&self.channels[id as usize].name);
            self.remove_member(id, pos);
        }
    }

    fn remove_member(&mut self, id: u32, pos: u32) {
        let ch = &mut self.channels[id as usize];
        ch.members.swap_remove(pos as usize);
        if let Some(&moved) = ch.members.get(pos as usize) {
            // The former last member now sits at `pos`: update its back-reference.
            if let Some(r) = self.by_conn[moved as usize]
                .iter_mut()
                .find(|(c, _)| *c == id)
            {
                r.1 = pos;
            }
        } else if ch.members.is_empty() {
            let gone = self.channels.remove(id as usize);
            self.ids.remove(&gone.name);
            if let Some(interest) = &self.interest {
                interest(&gone.name, false);
            }
            if let Some(publisher) = &self.publisher {
                publisher.vacate(&gone.name);
            }
        }
    }

    /// The subscribers of `channel` on this shard.
    pub fn members(&self, channel: &str) -> &[ConnKey] {
        self.ids
            .get(channel)
            .map_or(&[], |&id| &self.channels[id as usize].members)
    }

    /// Notes that every subscriber of `channel` on this shard was offered its message
    /// `offset` (its fan-out here ended): a subscriber that keeps up is now there.
    pub fn delivered(&self, channel: &str, offset: u64) {
        if let Some(&id) = self.ids.get(channel) {
            self.channels[id as usize].position.set(offset);
        }
    }

    /// Notes that `channel`'s subscribers here are at least at `offset` (a subscriber
    /// was attached there).
    pub fn note_position(&self, channel: &str, offset: u64) {
        if let Some(&id) = self.ids.get(channel) {
            let position = &self.channels[id as usize].position;
            position.set(position.get().max(offset));
        }
    }

    /// Notes `channel`'s epoch (an attach in that epoch).
    pub fn note_epoch(&self, channel: &str, epoch: u64) {
        if let Some(&id) = self.ids.get(channel) {
            self.channels[id as usize].epoch.set(epoch);
        }
    }

    /// The channels of `conn`, in the order it subscribed to them (while it never
    /// unsubscribed), each with the position its subscribers were given up to and its
    /// epoch.
    pub fn subscriptions_of(&self, conn: ConnKey) -> impl Iterator<Item = (&str, u64, u64)> {
        self.by_conn
            .get(conn as usize)
            .map_or(&[][..], |subs| subs.as_slice())
            .iter()
            .map(|&(id, _)| {
                let ch = &self.channels[id as usize];
                (&*ch.name, ch.position.get(), ch.epoch.get())
            })
    }

    /// Every channel with subscribers here: its name, the position its subscribers were
    /// given up to, and its members.
    pub fn positions(&self) -> impl Iterator<Item = (&Arc<str>, u64, &[ConnKey])> {
        self.channels
            .iter()
            .map(|(_, ch)| (&ch.name, ch.position.get(), ch.members.as_slice()))
    }

    /// True when `conn` is subscribed to `channel`.
    pub fn is_subscribed(&self, conn: ConnKey, channel: &str) -> bool {
        let Some(&id) = self.ids.get(channel) else {
            return false;
        };
        self.by_conn
            .get(conn as usize)
            .is_some_and(|subs| subs.iter().any(|&(c, _)| c == id))
    }

    /// The id of `channel` while it has subscribers here; an id is reused for another
    /// channel once this one has none, so resolve it again after any change to the index.
    pub fn channel_id(&self, channel: &str) -> Option<u32> {
        self.ids.get(channel).copied()
    }

    /// True when `conn` is subscribed to the channel `id` (from [`Self::channel_id`]).
    pub fn is_member(&self, conn: ConnKey, id: u32) -> bool {
        self.by_conn
            .get(conn as usize)
            .is_some_and(|subs| subs.iter().any(|&(c, _)| c == id))
    }

    /// How many channels `conn` is subscribed to.
    pub fn count_of(&self, conn: ConnKey) -> usize {
        self.by_conn.get(conn as usize).map_or(0, SmallVec::len)
    }

    /// Number of channels with at least one subscriber on this shard.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap as Map};

    #[derive(Debug, Clone)]
    enum Op {
        Sub(u32, u8),
        Unsub(u32, u8),
        Drop(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..20, 0u8..5).prop_map(|(c, ch)| Op::Sub(c, ch)),
            (0u32..20, 0u8..5).prop_map(|(c, ch)| Op::Unsub(c, ch)),
            (0u32..20).prop_map(Op::Drop),
        ]
    }

    thread_local! {
        static HEARD: std::cell::RefCell<Vec<(String, bool)>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn hear(channel: &str, subscribed: bool) {
        HEARD.with(|h| h.borrow_mut().push((channel.to_string(), subscribed)));
    }

    #[test]
    fn the_sink_hears_only_the_first_subscriber_and_the_last_leaving() {
        use crate::fanout::ring::Ring;
        use crate::fanout::wake::IdleFlags;
        let publisher = Arc::new(Publisher::new(
            Arc::new(Ring::new(16)),
            Arc::new(IdleFlags::new(1)),
        ));
        let mut index = SubscriptionIndex::holding_for(publisher, Some(Box::new(hear)));
        index.subscribe(1, "a");
        index.subscribe(2, "a");
        index.subscribe(2, "b");
        index.unsubscribe(1, "a");
        index.remove_conn(2);
        let heard = HEARD.with(|h| h.take());
        let expected = [("a", true), ("b", true), ("a", false), ("b", false)];
        let expected: Vec<(String, bool)> = expected
            .iter()
            .map(|&(c, on)| (c.to_string(), on))
            .collect();
        assert_eq!(heard, expected);
    }

    proptest! {
        /// The index always agrees with a naive model of who is subscribed to what.
        #[test]
        fn matches_a_naive_model(ops in proptest::collection::vec(op(), 0..300)) {
            let mut index = SubscriptionIndex::new();
            let mut model: Map<String, BTreeSet<u32>> = Map::new();
            for op in ops {
                match op {
                    Op::Sub(c, ch) => {
                        let name = format!("ch{ch}");
                        let fresh = model.entry(name.clone()).or_default().insert(c);
                        prop_assert_eq!(index.subscribe(c, &name), fresh);
                    }
                    Op::Unsub(c, ch) => {
                        let name = format!("ch{ch}");
                        let was = model.get_mut(&name).is_some_and(|s| s.remove(&c));
                        prop_assert_eq!(index.unsubscribe(c, &name), was);
                    }
                    Op::Drop(c) => {
                        index.remove_conn(c);
                        model.values_mut().for_each(|s| { s.remove(&c); });
                    }
                }
                for (name, set) in &model {
                    let got: BTreeSet<u32> = index.members(name).iter().copied().collect();
                    prop_assert_eq!(&got, set);
                    prop_assert_eq!(index.members(name).len(), set.len());
                }
                prop_assert_eq!(index.channel_count(), model.values().filter(|s| !s.is_empty()).count());
            }
        }
    }
}
