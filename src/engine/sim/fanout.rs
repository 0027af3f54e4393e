//! A deterministic simulation of the fan-out path and the control plane: publishers, the
//! shared ring (no history: what a subscriber cannot take becomes a gap notice), two
//! shards that are the real [`Engine`] (rounds, ticks, input, closes), connections that
//! are the real machines, and simulated sockets. Clients read at random speeds, send
//! pings, commands and floods, close, or fall silent, interleaved by a seeded schedule
//! with a fake clock.
//!
//! Invariants, checked as bytes arrive and at the end:
//! - per channel, each client's sequence is exactly the published one except where a gap
//!   notice said otherwise (no shard-wide allowance: every missing offset is announced);
//! - a backlog never holds more than the configured bounds allow;
//! - client pings are answered by pongs in order, and every ping of a client still open
//!   once everything is written has its pong;
//! - a close frame is the last thing on the wire, and its code matches why it closed
//!   (1000 client close, 1008 flood, 1013 slow consumer, 1001 drain);
//! - a silent peer is closed as dead exactly `dead_after` seconds after its last byte, by
//!   the heartbeat (or earlier as a slow consumer), never left to the final drain;
//! - the backlog gauge equals the bytes queued whenever the engine has counted them, and
//!   is zero once every socket drained.

use super::{Peer, SimWire};
use crate::engine::round::{Delivery, Next};
use crate::engine::table::Conn;
use crate::engine::{CloseOrder, Engine};
use crate::fanout::publisher::Publisher;
use crate::fanout::ring::Ring;
use crate::fanout::wake::IdleFlags;
use crate::metrics::CloseCause;
use crate::proto::backlog::BacklogLimits;
use crate::proto::close::{CloseCode, CloseReason};
use crate::proto::conn::{ConnConfig, Connection};
use crate::proto::frame::{encode_frame, opcode};
use proptest::prelude::*;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

const CHANNELS: [&str; 3] = ["news", "room:1", "user:7"];
const CONNS_PER_SHARD: u32 = 6;
/// The client of this key never says anything.
const SILENT: u32 = 5;

/// Upper bound on the frames this simulation publishes (small JSON payloads).
const MAX_FRAME: usize = 80;

const CONFIG: ConnConfig = ConnConfig {
    max_message_size: 4096,
    max_inbound_per_sec: 12,
    backlog: BacklogLimits {
        max_bytes: 600,
        max_frames: 64,
        drop_limit: 40,
    },
    ping_after: 5,
    dead_after: 9,
    linger: 2,
    stall_after: 10,
};

/// A masked client frame.
fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9, 8, 7, 6];
    let mut out = vec![0x80 | op, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Whether connection `key` of a shard subscribes to `CHANNELS[channel]`.
fn subscribed(key: u32, channel: usize) -> bool {
    (key as usize + channel) % 2 == 0 || channel == 0
}

struct Shard {
    engine: Engine<Peer>,
    /// The fake second of each client's last byte.
    last_rx: Vec<u32>,
}

struct Sim {
    seed: u64,
    shards: Vec<Shard>,
}

impl Sim {
    fn engine(&self, s: usize) -> &Engine<Peer> {
        &self.shards[s].engine
    }

    /// Carries out the closes the engine decided, as the driver does, checking each
    /// cause against what happened.
    fn carry_out(&self, s: usize, orders: Vec<CloseOrder>, now: u32) {
        let engine = self.engine(s);
        for order in orders {
            engine.index.borrow_mut().remove_conn(order.key);
            let mut conns = engine.conns.borrow_mut();
            let Some(conn) = conns.get_current(order.key, order.generation) else {
                continue;
            };
            let cause = order.decision.cause;
            if cause == CloseCause::Dead {
                assert_eq!(
                    now - self.shards[s].last_rx[order.key as usize],
                    CONFIG.dead_after,
                    "dead on time (seed {})",
                    self.seed
                );
            }
            conn.fd.closed = Some(cause);
            let reason = order.decision.reason.as_ref();
            engine.begin_close(&SimWire { engine }, order.key, conn, reason, now);
        }
    }

    fn settle(&self, s: usize, now: u32) {
        let engine = self.engine(s);
        self.carry_out(s, engine.end_round(&SimWire { engine }), now);
    }

    /// A fan-out round of up to `n` ring slots on shard `s`.
    fn round(&self, s: usize, n: u64, now: u32) {
        let engine = self.engine(s);
        for _ in 0..n {
            let msg = match engine.next_from_ring() {
                Next::Message(msg) => msg,
                Next::Healed => continue,
                Next::Empty => break,
            };
            assert!(msg.frame.len() <= MAX_FRAME);
            let mut snapshot = Vec::new();
            let done = engine.deliver_start(&msg, &mut snapshot, usize::MAX, || false);
            assert!(matches!(done, Delivery::Done(_)), "no pause here");
        }
        // Messages are queued only under the bound; control frames may take it to twice
        // the bound before a flood closes.
        for (key, conn) in engine.conns.borrow().iter() {
            let limit = 2 * CONFIG.backlog.max_bytes + MAX_FRAME;
            assert!(
                conn.machine.backlog().bytes() <= limit,
                "conn {key}: backlog {} (seed {})",
                conn.machine.backlog().bytes(),
                self.seed
            );
        }
        self.settle(s, now);
    }

    /// Client `key` sends `bytes`: the engine reads them as the driver does (commands
    /// get a fixed reply).
    fn client_sends(&mut self, s: usize, key: u32, now: u32, mut bytes: Vec<u8>) {
        self.shards[s].last_rx[key as usize] = now;
        let engine = self.engine(s);
        {
            let mut conns = engine.conns.borrow_mut();
            let conn = conns.get_mut(key).expect("a connection per key");
            let mut reply = |_: &str, _: Option<&mut crate::auth::session::Session>| {
                encode_frame(opcode::TEXT, br#"{"code":200}"#).into()
            };
            engine.receive(&SimWire { engine }, key, conn, now, &mut bytes, &mut reply);
        }
        self.carry_out(s, engine.take_closes(), now);
    }

    /// The client of `key` on shard `s` reads up to `take` bytes ([`super::read`]); the
    /// closes that decided are carried out.
    fn read(&self, s: usize, key: u32, take: usize, now: u32) {
        let engine = self.engine(s);
        super::read(engine, key, take, self.seed);
        self.carry_out(s, engine.take_closes(), now);
    }

    fn client(&self, s: usize, key: u32) -> (bool, bool, u32) {
        let conns = self.engine(s).conns.borrow();
        let conn = conns.get(key).expect("a connection per key");
        let client = &conn.fd.client;
        (
            key == SILENT,
            client.close_seen.is_some() || conn.fd.closed.is_some(),
            client.server_pings,
        )
    }

    /// The backlog gauge is what the engine counted: after bringing every connection in
    /// step (as a flush does), it equals the bytes queued.
    fn check_gauge(&self, s: usize) {
        let engine = self.engine(s);
        let mut conns = engine.conns.borrow_mut();
        let mut queued = 0;
        for key in 0..CONNS_PER_SHARD {
            if let Some(conn) = conns.get_mut(key) {
                engine.count_backlog(conn);
                queued += conn.machine.backlog().bytes() as u64;
            }
        }
        assert_eq!(
            engine.metrics.backlog_bytes.load(Relaxed),
            queued,
            "backlog gauge (seed {})",
            self.seed
        );
    }
}

fn run(seed: u64, steps: usize, ring_capacity: usize) {
    let ring = Arc::new(Ring::new(ring_capacity));
    let publisher = Arc::new(Publisher::new(ring, Arc::new(IdleFlags::new(2))));
    let mut rng = seed | 1;
    let mut next = move |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    let mut now = 0u32;
    let mut sim = Sim {
        seed,
        shards: (0..2)
            .map(|id| Shard {
                engine: Engine::new(
                    id,
                    publisher.clone(),
                    Box::leak(Box::default()),
                    CONFIG,
                    CONNS_PER_SHARD as usize,
                    false,
                    None,
                ),
                last_rx: vec![0; CONNS_PER_SHARD as usize],
            })
            .collect(),
    };
    for shard in &sim.shards {
        for key in 0..CONNS_PER_SHARD {
            let inserted = shard.engine.conns.borrow_mut().insert(Conn {
                fd: Peer::default(),
                generation: 1,
                machine: Connection::new(now),
                tls: (),
            });
            assert_eq!(inserted, key);
            for (c, ch) in CHANNELS.iter().enumerate() {
                if subscribed(key, c) {
                    let mut index = shard.engine.index.borrow_mut();
                    index.subscribe(key, ch);
                    index.note_position(ch, 0);
                }
            }
        }
    }
    let mut published = [0u64; CHANNELS.len()];
    for _ in 0..steps {
        let s = next(2) as usize;
        let key = next(u64::from(CONNS_PER_SHARD)) as u32;
        match next(20) {
            0..=7 => {
                let c = next(3) as usize;
                let payload = format!("{{\"n\":{}}}", next(1000));
                let p = publisher.publish_quiet(CHANNELS[c], payload.as_bytes());
                assert_eq!(p.offset, published[c] + 1, "publisher offsets step by one");
                published[c] = p.offset;
            }
            8..=11 => sim.round(s, 1 + next(8), now),
            12..=15 => sim.read(s, key, next(400) as usize, now),
            16 => {
                // The client pings (or, rarely, floods or closes).
                let (silent, closed, _) = sim.client(s, key);
                if silent || closed {
                    continue;
                }
                let bytes = match next(30) {
                    0 => client_frame(opcode::CLOSE, &1000u16.to_be_bytes()),
                    1 => (0..=CONFIG.max_inbound_per_sec)
                        .flat_map(|_| client_frame(opcode::PONG, b""))
                        .collect(),
                    2..=9 => client_frame(opcode::TEXT, br#"{"cmd":"ping"}"#),
                    _ => {
                        let engine = sim.engine(s);
                        let mut conns = engine.conns.borrow_mut();
                        let client = &mut conns.get_mut(key).expect("conn").fd.client;
                        client.pings_sent += 1;
                        client_frame(opcode::PING, &(client.pings_sent - 1).to_be_bytes())
                    }
                };
                sim.client_sends(s, key, now, bytes);
            }
            17 => {
                // A second passes: the shard's sweep ticks every machine, and most live
                // clients say something (a pong) within it.
                now += 1;
                for s in 0..2 {
                    let (pings, _lingered) = sim.engine(s).tick(now, 0..CONNS_PER_SHARD);
                    let _ = pings;
                    sim.settle(s, now);
                    for key in 0..CONNS_PER_SHARD {
                        let (silent, closed, _) = sim.client(s, key);
                        if !silent && !closed && next(4) != 0 {
                            sim.client_sends(s, key, now, client_frame(opcode::PONG, b""));
                        }
                    }
                }
            }
            _ => {
                // A well-behaved client answers the server's pings.
                let (silent, closed, server_pings) = sim.client(s, key);
                if !silent && !closed && server_pings > 0 {
                    sim.client_sends(s, key, now, client_frame(opcode::PONG, b""));
                }
            }
        }
        if next(3) == 0 {
            sim.check_gauge(s);
        }
    }
    // Everything published reaches the sockets and is read; every client still open has
    // the pong of every ping it sent.
    for _ in 0..1000 {
        for s in 0..2 {
            sim.round(s, 4096, now);
            for key in 0..CONNS_PER_SHARD {
                sim.read(s, key, usize::MAX, now);
            }
        }
    }
    for (s, shard) in sim.shards.iter().enumerate() {
        for (key, conn) in shard.engine.conns.borrow().iter() {
            if conn.fd.closed.is_none() {
                let client = &conn.fd.client;
                assert_eq!(
                    client.pongs, client.pings_sent,
                    "shard {s} conn {key}: every ping answered (seed {seed})"
                );
            }
            if key == SILENT && now > CONFIG.dead_after {
                // Dead on time (checked when it closed), unless it fell behind first.
                assert!(
                    matches!(
                        conn.fd.closed,
                        Some(CloseCause::Dead | CloseCause::SlowConsumer)
                    ),
                    "shard {s}: the silent peer is found by the heartbeat, not left to the \
                     drain: {:?} (seed {seed})",
                    conn.fd.closed
                );
            }
        }
    }
    // Drain: every connection still open is closed with 1001, then every socket drains.
    for s in 0..2 {
        let engine = sim.engine(s);
        {
            let mut conns = engine.conns.borrow_mut();
            for key in 0..CONNS_PER_SHARD {
                let conn = conns.get_mut(key).expect("conn");
                let reason = CloseReason::new(CloseCode::GoingAway, "reconnect after 1ms");
                engine.schedule_close(key, conn, Some(reason), CloseCause::Drain);
            }
        }
        sim.carry_out(s, engine.take_closes(), now);
        for _ in 0..100 {
            for key in 0..CONNS_PER_SHARD {
                sim.read(s, key, usize::MAX, now);
            }
        }
        sim.check_gauge(s);
        assert_eq!(
            engine.metrics.backlog_bytes.load(Relaxed),
            0,
            "every backlog drained (seed {seed})"
        );
    }
    for shard in &sim.shards {
        for (key, conn) in shard.engine.conns.borrow().iter() {
            let client = &conn.fd.client;
            let expected = match conn.fd.closed.expect("every connection closed") {
                CloseCause::ClientClose => Some(1000),
                CloseCause::Policy => Some(1008),
                CloseCause::SlowConsumer => Some(1013),
                CloseCause::Drain => Some(1001),
                CloseCause::Dead | CloseCause::PeerGone => None,
                other => panic!("unexpected close cause {other:?} (seed {seed})"),
            };
            assert_eq!(
                client.close_seen, expected,
                "conn {key}: close code (seed {seed})"
            );
            if expected.is_some() {
                assert!(conn.fd.shut, "conn {key}: write side shut (seed {seed})");
            }
            assert!(client.pongs <= client.pings_sent);
            for (c, ch) in CHANNELS.iter().enumerate() {
                if subscribed(key, c) && conn.fd.closed == Some(CloseCause::Drain) {
                    assert_eq!(
                        client.last.get(*ch).copied().unwrap_or(0),
                        published[c],
                        "conn {key} {ch}: open to the end, it has every offset or a gap \
                         notice for it (seed {seed})"
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(super::SEEDS))]

    #[test]
    fn offsets_stay_exact_and_backlogs_bounded(seed in any::<u64>()) {
        run(seed, 4000, 1024);
    }

    #[test]
    fn a_lapped_shard_announces_every_offset_it_lost(seed in any::<u64>()) {
        // A ring smaller than a burst forces overruns.
        run(seed, 4000, 16);
    }
}
