//! The presence registry against a naive model, and under concurrent shards.

use super::member::{ConnId, Member};
use super::registry::{Change, Presence};
use crate::auth::session::User;
use crate::fanout::ring::{Poll, Ring, RingKind};
use crate::fanout::wake::IdleFlags;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

fn presence() -> Presence {
    Presence::new(Arc::new(Ring::new(1 << 16)), Arc::new(IdleFlags::new(2)))
}

/// Every event in the ring from `cursor` on, as (type, channel, member JSON).
fn events(ring: &Ring, cursor: &mut u64) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    loop {
        match ring.poll(cursor) {
            Poll::Message(m) => {
                assert_eq!(m.kind, RingKind::Event);
                let v: serde_json::Value =
                    serde_json::from_slice(&m.frame[2..]).expect("event JSON");
                assert_eq!(v["channel"].as_str(), Some(&*m.channel));
                out.push((
                    v["type"].as_str().unwrap_or("?").to_string(),
                    m.channel.to_string(),
                    v["member"].to_string(),
                ));
            }
            Poll::Empty => return out,
            Poll::Overrun { lost } => panic!("ring overrun of {lost}"),
        }
    }
}

fn user(id: &str) -> Member {
    Member::User(Arc::new(User::new(id)))
}

fn anon(shard: u32, key: u32) -> Member {
    Member::Conn(ConnId {
        shard,
        key,
        generation: 1,
    })
}

#[test]
fn first_in_joins_last_out_leaves_and_empty_channels_go() {
    let ring = Arc::new(Ring::new(64));
    let p = Presence::new(ring.clone(), Arc::new(IdleFlags::new(1)));
    let mut cursor = 0;
    let alice = user("alice");
    assert_eq!(p.join("room:1", &alice, true), Change::Joined);
    assert_eq!(p.join("room:1", &alice, true), Change::Unchanged);
    assert_eq!(p.join("room:1", &anon(1, 3), true), Change::Joined);
    let snap = p.snapshot("room:1", 10);
    assert_eq!((snap.count, snap.connections), (2, 3));
    let mut members = snap.members.expect("listed");
    members.sort_by_key(|(_, n)| *n);
    assert_eq!(members, vec![(anon(1, 3), 1), (alice.clone(), 2)]);
    assert_eq!(
        p.snapshot("room:1", 1).members,
        None,
        "count only past the limit"
    );
    assert_eq!((p.channel_count(), p.member_count()), (1, 2));
    assert_eq!(p.leave("room:1", &alice, true), Change::Unchanged);
    assert_eq!(p.leave("room:1", &alice, true), Change::Left);
    assert_eq!(
        p.leave("room:1", &alice, true),
        Change::Unchanged,
        "not a member"
    );
    assert_eq!(p.leave("room:1", &anon(1, 3), true), Change::Left);
    assert_eq!((p.channel_count(), p.member_count()), (0, 0));
    assert_eq!(p.snapshot("room:1", 10).count, 0);
    let got = events(&ring, &mut cursor);
    let want = [
        ("join", r#"{"user":"alice"}"#),
        ("join", r#"{"conn":"1-3-1"}"#),
        ("leave", r#"{"user":"alice"}"#),
        ("leave", r#"{"conn":"1-3-1"}"#),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for ((kind, channel, member), (want_kind, want_member)) in got.iter().zip(want) {
        assert_eq!((kind.as_str(), channel.as_str()), (want_kind, "room:1"));
        assert_eq!(member, want_member);
    }
    let stats = p.stats();
    assert_eq!(
        (
            stats.joins.load(std::sync::atomic::Ordering::Relaxed),
            stats.leaves.load(std::sync::atomic::Ordering::Relaxed)
        ),
        (2, 2)
    );
}

#[test]
fn without_announce_nothing_enters_the_ring() {
    let ring = Arc::new(Ring::new(8));
    let p = Presence::new(ring.clone(), Arc::new(IdleFlags::new(1)));
    assert_eq!(p.join("quiet:1", &user("a"), false), Change::Joined);
    assert_eq!(p.leave("quiet:1", &user("a"), false), Change::Left);
    assert_eq!(ring.head(), 0);
}

/// Connections of the model: (shard, key, user or anonymous).
const CONNS: [(u32, u32, Option<&str>); 8] = [
    (0, 0, Some("u0")),
    (1, 0, Some("u0")),
    (0, 1, Some("u1")),
    (1, 1, Some("u1")),
    (1, 2, Some("u2")),
    (0, 2, None),
    (1, 3, None),
    (0, 3, None),
];
const CHANNELS: [&str; 3] = ["room:a", "room:b", "quiet:c"];

#[derive(Debug, Clone)]
enum Op {
    Sub(usize, usize),
    Unsub(usize, usize),
    /// Every subscription of the connection ends; it reconnects as a new connection
    /// (anonymous: a new generation, so a new member).
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..CONNS.len(), 0..CHANNELS.len()).prop_map(|(c, ch)| Op::Sub(c, ch)),
        2 => (0..CONNS.len(), 0..CHANNELS.len()).prop_map(|(c, ch)| Op::Unsub(c, ch)),
        1 => (0..CONNS.len()).prop_map(Op::Close),
    ]
}

/// The naive model: which connection (with its generation) is subscribed where.
struct Model {
    generation: [u32; CONNS.len()],
    subs: BTreeSet<(usize, usize)>,
}

impl Model {
    fn member(&self, conn: usize) -> Member {
        let (shard, key, user) = CONNS[conn];
        match user {
            Some(id) => Member::User(Arc::new(User::new(id))),
            None => Member::Conn(ConnId {
                shard,
                key,
                generation: self.generation[conn],
            }),
        }
    }

    fn json(&self, conn: usize) -> String {
        let mut out = String::new();
        self.member(conn).write_json(&mut out, None);
        out
    }

    /// member JSON -> connections, for one channel.
    fn members(&self, ch: usize) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for &(c, _) in self.subs.iter().filter(|(_, x)| *x == ch) {
            *out.entry(self.json(c)).or_insert(0) += 1;
        }
        out
    }
}

proptest! {
    /// Random subscribe/unsubscribe/close sequences over two shards: the registry's
    /// members always equal the model's, the gauges match, and join/leave events come
    /// exactly when a member's first connection arrives and its last one goes.
    #[test]
    fn agrees_with_a_naive_model(ops in proptest::collection::vec(op(), 0..200)) {
        let ring = Arc::new(Ring::new(1 << 12));
        let p = Presence::new(ring.clone(), Arc::new(IdleFlags::new(2)));
        let mut cursor = 0;
        let mut model = Model { generation: [1; CONNS.len()], subs: BTreeSet::new() };
        let announce = |ch: usize| CHANNELS[ch] != "quiet:c";
        for op in ops {
            // (conn, channel, subscribed?) steps, as the shard's index would report them.
            let steps: Vec<(usize, usize, bool)> = match op {
                Op::Sub(c, ch) if !model.subs.contains(&(c, ch)) => vec![(c, ch, true)],
                Op::Unsub(c, ch) if model.subs.contains(&(c, ch)) => vec![(c, ch, false)],
                Op::Close(c) => model
                    .subs
                    .iter()
                    .filter(|(x, _)| *x == c)
                    .map(|&(_, ch)| (c, ch, false))
                    .collect(),
                _ => Vec::new(),
            };
            let mut want_events = Vec::new();
            for (c, ch, subscribe) in steps {
                let before = model.members(ch);
                let member = model.member(c);
                let change = if subscribe {
                    model.subs.insert((c, ch));
                    p.join(CHANNELS[ch], &member, announce(ch))
                } else {
                    model.subs.remove(&(c, ch));
                    p.leave(CHANNELS[ch], &member, announce(ch))
                };
                let after = model.members(ch);
                let json = model.json(c);
                let want = match (before.contains_key(&json), after.contains_key(&json)) {
                    (false, true) => Change::Joined,
                    (true, false) => Change::Left,
                    _ => Change::Unchanged,
                };
                prop_assert_eq!(change, want);
                if announce(ch) && want != Change::Unchanged {
                    let kind = if want == Change::Joined { "join" } else { "leave" };
                    want_events.push((kind.to_string(), CHANNELS[ch].to_string(), json));
                }
            }
            if let Op::Close(c) = op {
                model.generation[c] += 1;
            }
            prop_assert_eq!(events(&ring, &mut cursor), want_events);
            let mut total_members = 0;
            let mut channels = 0;
            for (ch, name) in CHANNELS.iter().enumerate() {
                let want = model.members(ch);
                let snap = p.snapshot(name, usize::MAX);
                let got: BTreeMap<String, u32> = snap
                    .members
                    .unwrap_or_default()
                    .iter()
                    .map(|(m, n)| {
                        let mut json = String::new();
                        m.write_json(&mut json, None);
                        (json, *n)
                    })
                    .collect();
                prop_assert_eq!(snap.count, want.len());
                prop_assert_eq!(snap.connections, want.values().map(|&n| u64::from(n)).sum::<u64>());
                prop_assert_eq!(got, want.clone());
                total_members += want.len() as u64;
                channels += u64::from(!want.is_empty());
            }
            prop_assert_eq!(p.member_count(), total_members);
            prop_assert_eq!(p.channel_count(), channels);
        }
    }
}

/// Shards join and leave one channel at once with connections of the same users: the
/// events in the ring alternate join, leave, join, ... per user (the slot is claimed
/// under the stripe lock, so no leave overtakes its join), and everything ends empty.
#[test]
fn concurrent_shards_keep_each_members_events_in_order() {
    let p = Arc::new(presence());
    let ring = p.ring().clone();
    std::thread::scope(|s| {
        for shard in 0..4u32 {
            let p = p.clone();
            s.spawn(move || {
                for i in 0..2_000u32 {
                    let member = user(&format!("u{}", i % 5));
                    assert_ne!(p.join("room:x", &member, true), Change::Left);
                    let other = anon(shard, i % 3);
                    p.join("room:x", &other, true);
                    p.leave("room:x", &member, true);
                    p.leave("room:x", &other, true);
                }
            });
        }
    });
    assert_eq!((p.channel_count(), p.member_count()), (0, 0));
    let mut cursor = 0;
    let mut inside: BTreeMap<String, bool> = BTreeMap::new();
    let all = events(&ring, &mut cursor);
    assert!(!all.is_empty());
    for (kind, _, member) in all {
        let was = inside
            .insert(member.clone(), kind == "join")
            .unwrap_or(false);
        assert_eq!(was, kind == "leave", "{member}: {kind} out of order");
    }
    assert!(
        inside.values().all(|&now_in| !now_in),
        "a member never left"
    );
}
