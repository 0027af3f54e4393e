//! The shards' interest in channels, on its way to a NATS-side thread: coalesced per
//! channel instead of queued per change.
//!
//! A shard reports each channel's 0 ↔ 1 subscriber transitions; the thread keeps a
//! channel's live subscription while the count of shards with subscribers is above 0.
//! A queue of every transition grows with churn (a loop of subscribe and unsubscribe)
//! whenever the thread is busy; here a channel holds one net change (the sum of the
//! +1/-1 not taken yet), so what waits is bounded by the channels with subscribers, and
//! taking it gives the thread the same counts as reading every change would.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// A board that takes the interest in the channels under one prefix instead of the
/// cluster bridge (the JetStream inbox's `user:` channels), set once when it runs.
static PREFIX_ROUTE: OnceLock<(&'static str, Arc<InterestBoard>)> = OnceLock::new();

/// Sends the interest in channels named `prefix<something>` to `board` from now on.
pub fn route_prefix(prefix: &'static str, board: Arc<InterestBoard>) {
    let _ = PREFIX_ROUTE.set((prefix, board));
}

/// Notes a shard's interest in `channel` on the board its prefix is routed to; false
/// when no board takes it.
pub fn note_routed(channel: &str, on: bool) -> bool {
    match PREFIX_ROUTE.get() {
        Some((prefix, board)) if channel.len() > prefix.len() && channel.starts_with(prefix) => {
            board.note(channel, on);
            true
        }
        _ => false,
    }
}

/// Interest changes not taken yet, per channel, and a wake-up for the taker.
#[derive(Default)]
pub struct InterestBoard {
    pending: Mutex<HashMap<Arc<str>, i64>>,
    ready: tokio::sync::Notify,
}

impl InterestBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shard gained (`on`) or lost its subscribers on `channel`. Never waits.
    pub fn note(&self, channel: &str, on: bool) {
        let step = if on { 1 } else { -1 };
        let mut pending = self.pending.lock();
        match pending.get_mut(channel) {
            Some(net) => *net += step,
            None => {
                pending.insert(Arc::from(channel), step);
            }
        }
        drop(pending);
        self.ready.notify_one();
    }

    /// Every channel whose count changed since the last call, with the change; waits
    /// until there is one.
    pub async fn changes(&self) -> Vec<(Arc<str>, i64)> {
        loop {
            let taken = self.take();
            if !taken.is_empty() {
                return taken;
            }
            self.ready.notified().await;
        }
    }

    /// [`InterestBoard::changes`] without waiting (empty when nothing changed).
    pub fn take(&self) -> Vec<(Arc<str>, i64)> {
        let taken = std::mem::take(&mut *self.pending.lock());
        taken.into_iter().filter(|&(_, net)| net != 0).collect()
    }

    /// Channels with a change waiting (the bound: at most the channels with
    /// subscribers, plus those that just lost them).
    pub fn waiting(&self) -> usize {
        self.pending.lock().len()
    }
}

/// A channel's shard count after a net change: never below 0.
pub fn apply(count: usize, net: i64) -> usize {
    if net >= 0 {
        count.saturating_add(net as usize)
    } else {
        count.saturating_sub(net.unsigned_abs() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn churn_on_one_channel_waits_as_one_entry() {
        let board = InterestBoard::new();
        for _ in 0..10_000 {
            board.note("churn", true);
            board.note("churn", false);
        }
        board.note("kept", true);
        assert_eq!(board.waiting(), 2);
        assert_eq!(board.take(), vec![(Arc::from("kept"), 1)]);
        assert!(board.take().is_empty());
    }

    proptest! {
        /// Taking coalesced changes at any points gives the counts reading every change
        /// one by one gives.
        #[test]
        fn coalesced_counts_equal_counts_of_every_change(
            steps in proptest::collection::vec((0usize..3, any::<bool>(), any::<bool>()), 0..200)
        ) {
            let names = ["a", "b", "c"];
            let board = InterestBoard::new();
            let mut shards_on = [0usize; 3]; // what the shards did (one change at a time)
            let mut seen: HashMap<Arc<str>, usize> = HashMap::new();
            for (ch, on, take) in steps {
                // A channel's transitions alternate per shard: an off needs an on first.
                if !on && shards_on[ch] == 0 {
                    continue;
                }
                shards_on[ch] = if on { shards_on[ch] + 1 } else { shards_on[ch] - 1 };
                board.note(names[ch], on);
                if take {
                    for (name, net) in board.take() {
                        let c = seen.entry(name).or_default();
                        *c = apply(*c, net);
                    }
                }
            }
            for (name, net) in board.take() {
                let c = seen.entry(name).or_default();
                *c = apply(*c, net);
            }
            for (i, name) in names.iter().enumerate() {
                prop_assert_eq!(seen.get(*name).copied().unwrap_or(0), shards_on[i]);
            }
        }
    }
}
