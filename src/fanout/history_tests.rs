use super::*;
use proptest::prelude::*;

const KEEP: Limits = Limits {
    size: 1000,
    ttl: 3600,
};

fn entry(offset: u64, seq: u64, at: u64) -> Entry {
    Entry {
        offset,
        seq,
        at,
        frame: Bytes::from(format!("m{offset}")),
    }
}

fn window(offsets: std::ops::RangeInclusive<u64>) -> Window {
    let mut w = Window::default();
    for o in offsets {
        w.insert(entry(o, o * 10, 0), KEEP, 0);
    }
    w
}

fn texts(frames: &[Bytes]) -> Vec<String> {
    frames
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

#[test]
fn replays_exactly_the_missed_offsets() {
    let w = window(1..=10);
    assert_eq!(texts(&w.since(7, 10, 100).unwrap()), ["m8", "m9", "m10"]);
    assert_eq!(w.since(10, 10, 100).unwrap().len(), 0);
    assert_eq!(w.since(0, 10, 100).unwrap().len(), 10);
    assert_eq!(w.since(11, 10, 100), Err(Unrecoverable::Ahead));
    assert_eq!(w.since(2, 10, 5), Err(Unrecoverable::TooMany));
}

#[test]
fn a_history_that_no_longer_reaches_is_not_a_recovery() {
    let mut w = window(1..=10);
    w.trim(Limits { size: 4, ttl: 3600 }, 0);
    assert_eq!(w.front_offset(), Some(7));
    assert_eq!(w.since(5, 10, 100), Err(Unrecoverable::TooOld));
    assert_eq!(
        texts(&w.since(6, 10, 100).unwrap()),
        ["m7", "m8", "m9", "m10"]
    );
    assert_eq!(
        Window::default().since(0, 3, 100),
        Err(Unrecoverable::TooOld)
    );
}

#[test]
fn position_is_the_newest_offset_the_follower_has_passed() {
    let w = window(1..=10); // seq = offset * 10
    assert_eq!(w.position(71), 7, "seq 80.. not read yet: live");
    assert_eq!(w.position(1_000), 10);
    // Nothing retained before the cursor: 0 (errs low).
    assert_eq!(w.position(5), 0);
    assert_eq!(Window::default().position(5), 0);
}

#[test]
fn out_of_order_inserts_keep_offset_order() {
    let mut w = Window::default();
    for o in [1, 3, 2, 5, 4] {
        w.insert(entry(o, o, 0), KEEP, 0);
    }
    assert_eq!(
        texts(&w.since(0, 5, 10).unwrap()),
        ["m1", "m2", "m3", "m4", "m5"]
    );
}

#[test]
fn ttl_drops_old_messages() {
    let mut w = Window::default();
    let limits = Limits { size: 100, ttl: 10 };
    w.insert(entry(1, 1, 0), limits, 0);
    w.insert(entry(2, 2, 5), limits, 5);
    assert_eq!(w.insert(entry(3, 3, 12), limits, 12), (1, 2));
    assert_eq!(w.front_offset(), Some(2));
    assert_eq!(w.trim(limits, 100), (2, 4));
    assert!(w.is_empty());
    assert_eq!(w.bytes(), 0);
}

#[test]
fn the_budget_evicts_the_oldest_messages_of_the_process_first() {
    let stats = Arc::new(HistoryStats::default());
    // Frames are "m1".."m9": 2 bytes each; room for 5.
    let budget = Budget::new(10, stats.clone());
    let a = Arc::new(ChannelHistory::new(KEEP));
    let b = Arc::new(ChannelHistory::new(KEEP));
    for o in 1..=4 {
        budget.retain(&a, entry(o, o, 0), 0);
        budget.retain(&b, entry(o, o, 0), 0);
    }
    assert_eq!(stats.bytes.load(Relaxed), 10);
    assert_eq!(stats.messages.load(Relaxed), 5);
    assert_eq!(stats.evicted.load(Relaxed), 3);
    // Publish order was a1 b1 a2 b2 a3 b3 a4 b4: a1, b1, a2 went.
    assert_eq!(a.lock().front_offset(), Some(3));
    assert_eq!(b.lock().front_offset(), Some(2));
    budget.release(&a);
    assert_eq!(stats.messages.load(Relaxed), 3);
    assert_eq!(stats.bytes.load(Relaxed), 6);
}

#[test]
fn the_eviction_log_stays_near_the_retained_count() {
    let stats = Arc::new(HistoryStats::default());
    let budget = Budget::new(u64::MAX, stats.clone());
    // One long-lived message, then a busy channel that keeps only 3.
    let pinned = Arc::new(ChannelHistory::new(KEEP));
    budget.retain(&pinned, entry(1, 0, 0), 0);
    let busy = Arc::new(ChannelHistory::new(Limits { size: 3, ttl: 3600 }));
    for o in 1..=10_000 {
        budget.retain(&busy, entry(o, o, 0), 0);
    }
    assert_eq!(stats.messages.load(Relaxed), 4);
    let logged = budget.log.lock().len();
    assert!(logged <= 2 * 4 + 64 + 2, "log holds {logged} entries");
}

proptest! {
    /// `since` against a naive model: the retained offsets are a consecutive run
    /// `first..first + len`; a recovery is served whole or refused, never partly.
    #[test]
    fn since_matches_a_model(
        first in 1u64..50, len in 0u64..50, back in 0u64..50, since in 0u64..120,
        max in 0usize..60,
    ) {
        let mut w = Window::default();
        for o in first..first + len {
            w.insert(entry(o, o, 0), KEEP, 0);
        }
        // The position: somewhere in the retained run (or just before it).
        let upto = (first + len - 1).saturating_sub(back).max(first - 1);
        match w.since(since, upto, max) {
            Ok(frames) => {
                let want: Vec<String> = (since + 1..=upto).map(|o| format!("m{o}")).collect();
                prop_assert_eq!(texts(&frames), want);
                prop_assert!(frames.len() <= max);
            }
            Err(Unrecoverable::Ahead) => prop_assert!(since > upto),
            Err(Unrecoverable::TooMany) => prop_assert!(upto - since > max as u64),
            Err(Unrecoverable::TooOld) => prop_assert!(len == 0 || since + 1 < first),
            Err(Unrecoverable::EpochChanged) => prop_assert!(false, "a window knows no epoch"),
        }
    }
}

#[test]
fn catch_up_serves_in_chunks_with_a_gap_for_what_is_gone() {
    let mut w = window(1..=10);
    w.trim(Limits { size: 6, ttl: 3600 }, 0); // 5..=10 retained, 2 bytes each
    let first = w.catch_up(2, 10, 4);
    assert_eq!(first.gap, Some((3, 4)));
    assert_eq!(texts(&first.frames), ["m5", "m6"]);
    assert_eq!((first.reached, first.done), (6, false));
    let rest = w.catch_up(6, 10, 100);
    assert_eq!(
        (rest.gap, texts(&rest.frames).len(), rest.reached, rest.done),
        (None, 4, 10, true)
    );
    // Never moves a subscriber backwards, whatever the estimate of its position.
    let ahead = w.catch_up(8, 3, 100);
    assert_eq!(
        (ahead.reached, ahead.done, ahead.frames.len()),
        (8, true, 0)
    );
    // Nothing retained up to the position: all of it is a gap.
    let gone = Window::default().catch_up(2, 7, 100);
    assert_eq!((gone.gap, gone.reached, gone.done), (Some((3, 7)), 7, true));
}
