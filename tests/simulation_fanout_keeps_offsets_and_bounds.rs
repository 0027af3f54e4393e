//! A deterministic simulation of the fan-out path without sockets, threads or clocks:
//! publishers, the shared ring, several shards each with a subscription index, and
//! connections that are the server's real sans-io state machines
//! ([`ringcast::proto::conn::Connection`]), driven the way a shard drives them, with
//! clients that read at random speeds, send pings, commands and floods, close, or fall
//! silent, all interleaved by a seeded schedule with a fake clock.
//!
//! Invariants checked for every connection:
//! - per channel, offsets strictly increase (nothing arrives twice or out of order);
//! - every offset missing from what it received is explained by its own backlog skips or
//!   its shard's ring overruns;
//! - its backlog never holds more than the configured bounds allow;
//! - client pings are answered by pongs in order (a close may drop unsent ones);
//! - a close frame is the last thing on the wire, and its code matches why it closed
//!   (1000 client close, 1008 flood, 1013 slow consumer, 1001 drain); a silent peer is
//!   closed as dead no earlier than `dead_after` and no later than one tick after it.

use proptest::prelude::*;
use ringcast::fanout::backlog::{BacklogLimits, Offer};
use ringcast::fanout::index::SubscriptionIndex;
use ringcast::fanout::publisher::Publisher;
use ringcast::fanout::ring::{Poll, Ring};
use ringcast::fanout::wake::IdleFlags;
use ringcast::proto::close::{CloseCause, CloseCode, CloseReason};
use ringcast::proto::conn::{CloseDecision, ConnConfig, Connection, Tick, Written};
use ringcast::proto::frame::{encode_frame, opcode, FrameHeader};
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::Arc;

const CHANNELS: [&str; 3] = ["news", "room:1", "user:7"];

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

/// What the simulated client saw.
#[derive(Default)]
struct Client {
    /// Bytes "on the wire" not yet parsed into frames.
    wire: Vec<u8>,
    last_offset: HashMap<String, u64>,
    received: u64,
    /// Pings sent and pongs received (payloads are sequence numbers).
    pings_sent: u32,
    pongs: u32,
    /// The close frame's code, once one arrived.
    close_seen: Option<u16>,
    /// Pings from the server.
    server_pings: u32,
    /// Stops sending anything (to be found dead).
    silent: bool,
}

struct SimConn {
    machine: Connection,
    client: Client,
    skipped: u64,
    /// Why the server closed it, once decided.
    closed: Option<CloseCause>,
    /// The fake second of the client's last byte.
    last_rx: u32,
}

struct SimShard {
    cursor: u64,
    index: SubscriptionIndex,
    conns: Vec<SimConn>,
    overrun: u64,
    /// The shard's send-backlog gauge, fed the way the driver feeds it (only through
    /// `backlog_gauge_delta`, at arbitrary points).
    backlog_gauge: i64,
}

/// A masked client frame.
fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9, 8, 7, 6];
    let mut out = vec![0x80 | op, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

impl SimShard {
    /// Brings the gauge in step, as the driver's flush does, and checks it equals the
    /// bytes it claims to count and never went negative.
    fn check_backlog_gauge(&mut self, seed: u64) {
        for conn in &mut self.conns {
            self.backlog_gauge += conn.machine.backlog_gauge_delta();
            assert!(
                self.backlog_gauge >= 0,
                "backlog gauge below zero (seed {seed})"
            );
        }
        let queued: usize = self.conns.iter().map(|c| c.machine.backlog().bytes()).sum();
        assert_eq!(
            self.backlog_gauge, queued as i64,
            "backlog gauge (seed {seed})"
        );
    }

    /// Carries out a close the machine decided, as the shard driver does.
    fn close(&mut self, key: usize, decision: CloseDecision, now: u32) {
        self.index.remove_conn(key as u32);
        let conn = &mut self.conns[key];
        conn.closed = Some(decision.cause);
        conn.machine.start_close(now, decision.reason.as_ref());
    }

    /// The client sends `bytes`; the machine answers (commands get a fixed reply).
    fn client_sends(&mut self, key: usize, now: u32, mut bytes: Vec<u8>) {
        let conn = &mut self.conns[key];
        conn.last_rx = now;
        let mut reply = |_: &str, _: Option<&mut ringcast::auth::session::Session>| {
            encode_frame(opcode::TEXT, br#"{"code":200}"#).into()
        };
        if let Some(close) = conn.machine.on_input(now, &mut bytes, &CONFIG, &mut reply) {
            self.close(key, close, now);
        }
    }

    /// The socket takes up to `take` bytes; the client parses what arrived.
    fn transmit(&mut self, key: usize, take: usize, seed: u64) {
        let conn = &mut self.conns[key];
        let mut slices = [IoSlice::new(&[]); 16];
        let n = conn.machine.backlog().io_slices(&mut slices);
        let pending: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
        let take = take.min(pending.len());
        conn.client.wire.extend_from_slice(&pending[..take]);
        let written = conn.machine.on_written(take);
        if written == Written::ShutWrite {
            assert!(conn.closed.is_some(), "write side shut without a close");
        }
        parse_wire(&mut conn.client, seed);
    }
}

fn parse_wire(client: &mut Client, seed: u64) {
    while let Some(h) = FrameHeader::parse(&client.wire) {
        let end = h.header_len + h.len as usize;
        if client.wire.len() < end {
            break;
        }
        let payload = client.wire[h.header_len..end].to_vec();
        client.wire.drain(..end);
        assert!(
            client.close_seen.is_none(),
            "a frame after the close frame (seed {seed})"
        );
        match h.opcode {
            opcode::TEXT => {
                let v: serde_json::Value = serde_json::from_slice(&payload).expect("JSON frames");
                if let Some(ch) = v["channel"].as_str() {
                    let offset = v["offset"].as_u64().expect("offset");
                    let last = client
                        .last_offset
                        .insert(ch.to_string(), offset)
                        .unwrap_or(0);
                    assert!(
                        offset > last,
                        "{ch}: offset {offset} after {last} (seed {seed})"
                    );
                    client.received += 1;
                }
            }
            opcode::PONG => {
                let n = u32::from_be_bytes(payload[..4].try_into().expect("4-byte pong"));
                assert_eq!(n, client.pongs, "pongs in order (seed {seed})");
                client.pongs += 1;
            }
            opcode::PING => client.server_pings += 1,
            opcode::CLOSE => {
                client.close_seen = Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            other => panic!("unexpected opcode {other} (seed {seed})"),
        }
    }
}

/// Whether connection `key` of a shard subscribes to `CHANNELS[channel]`.
fn subscribed(key: usize, channel: usize) -> bool {
    (key + channel) % 2 == 0 || channel == 0
}

fn run(seed: u64, steps: usize, ring_capacity: usize) {
    let ring = Arc::new(Ring::new(ring_capacity));
    let publisher = Publisher::new(ring.clone(), Arc::new(IdleFlags::new(2)));
    let mut rng = seed | 1;
    let mut next = move |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    let mut now = 0u32;
    let mut shards: Vec<SimShard> = (0..2)
        .map(|_| SimShard {
            cursor: ring.head(),
            index: SubscriptionIndex::new(),
            conns: Vec::new(),
            overrun: 0,
            backlog_gauge: 0,
        })
        .collect();
    for shard in shards.iter_mut() {
        for key in 0..6u32 {
            for (c, ch) in CHANNELS.iter().enumerate() {
                if subscribed(key as usize, c) {
                    shard.index.subscribe(key, ch);
                }
            }
            shard.conns.push(SimConn {
                machine: Connection::new(now),
                client: Client {
                    silent: key == 5,
                    ..Client::default()
                },
                skipped: 0,
                closed: None,
                last_rx: now,
            });
        }
    }
    let mut published: HashMap<&str, u64> = HashMap::new();
    for _ in 0..steps {
        let s = next(2) as usize;
        let key = next(6) as usize;
        match next(20) {
            0..=7 => {
                let ch = CHANNELS[next(3) as usize];
                let payload = format!("{{\"n\":{}}}", next(1000));
                let p = publisher.publish_quiet(ch, payload.as_bytes());
                let last = published.entry(ch).or_insert(0);
                assert_eq!(p.offset, *last + 1, "publisher offsets step by one");
                *last = p.offset;
            }
            8..=11 => {
                // A fan-out round on one shard.
                let shard = &mut shards[s];
                for _ in 0..1 + next(8) {
                    match ring.poll(&mut shard.cursor) {
                        Poll::Message(msg) => {
                            assert!(msg.frame.len() <= MAX_FRAME);
                            let members = shard.index.members(&msg.channel).to_vec();
                            for key in members {
                                let conn = &mut shard.conns[key as usize];
                                let offer = conn.machine.offer(&msg.frame, &CONFIG);
                                let close = (offer == Offer::Disconnect)
                                    .then(|| conn.machine.close_slow_consumer())
                                    .flatten();
                                if offer != Offer::Queued {
                                    conn.skipped += 1;
                                }
                                // Messages are queued only under the bound; control frames
                                // may take it to twice the bound before a flood closes.
                                let limit = 2 * CONFIG.backlog.max_bytes + MAX_FRAME;
                                assert!(conn.machine.backlog().bytes() <= limit);
                                if let Some(close) = close {
                                    assert_eq!(close.cause, CloseCause::SlowConsumer);
                                    shard.close(key as usize, close, now);
                                }
                            }
                        }
                        Poll::Overrun { lost } => shard.overrun += lost,
                        Poll::Empty => break,
                    }
                }
            }
            12..=15 => shards[s].transmit(key, next(400) as usize, seed),
            16 => {
                // The client pings (or, rarely, floods or closes).
                let shard = &mut shards[s];
                let client = &mut shard.conns[key].client;
                if client.silent || client.close_seen.is_some() {
                    continue;
                }
                let bytes = match next(30) {
                    0 => client_frame(opcode::CLOSE, &1000u16.to_be_bytes()),
                    1 => (0..=CONFIG.max_inbound_per_sec)
                        .flat_map(|_| client_frame(opcode::PONG, b""))
                        .collect(),
                    2..=9 => client_frame(opcode::TEXT, br#"{"cmd":"ping"}"#),
                    _ => {
                        client.pings_sent += 1;
                        client_frame(opcode::PING, &(client.pings_sent - 1).to_be_bytes())
                    }
                };
                shard.client_sends(key, now, bytes);
            }
            17 => {
                // A second passes: the shard's sweep ticks every machine, and most live
                // clients say something (a pong) within it.
                now += 1;
                for shard in shards.iter_mut() {
                    for key in 0..shard.conns.len() {
                        let conn = &mut shard.conns[key];
                        match conn.machine.on_tick(now, &CONFIG) {
                            Tick::Close(close) => {
                                assert_eq!(close.cause, CloseCause::Dead);
                                assert_eq!(now - conn.last_rx, CONFIG.dead_after, "dead on time");
                                shard.close(key, close, now);
                            }
                            Tick::Ping => {
                                assert!(now - conn.last_rx >= CONFIG.ping_after);
                            }
                            Tick::Idle | Tick::LingerOver => {}
                        }
                        let client = &shard.conns[key].client;
                        if !client.silent && client.close_seen.is_none() && next(4) != 0 {
                            shard.client_sends(key, now, client_frame(opcode::PONG, b""));
                        }
                    }
                }
            }
            _ => {
                // A well-behaved client answers the server's pings.
                let shard = &mut shards[s];
                let client = &shard.conns[key].client;
                if !client.silent && client.close_seen.is_none() && client.server_pings > 0 {
                    shard.client_sends(key, now, client_frame(opcode::PONG, b""));
                }
            }
        }
        // Counted at random points, as the driver counts only when it flushes.
        if next(3) == 0 {
            shards[s].check_backlog_gauge(seed);
        }
    }
    // Drain: every connection still open is closed with 1001, then every socket drains.
    for shard in shards.iter_mut() {
        for key in 0..shard.conns.len() {
            let reason = CloseReason::new(CloseCode::GoingAway, "reconnect after 1ms");
            if let Some(close) = shard.conns[key]
                .machine
                .close(Some(reason), CloseCause::Drain)
            {
                shard.close(key, close, now);
            }
            shard.transmit(key, usize::MAX, seed);
        }
        shard.check_backlog_gauge(seed);
        assert_eq!(shard.backlog_gauge, 0, "every backlog drained");
    }
    for shard in &shards {
        for (key, conn) in shard.conns.iter().enumerate() {
            let client = &conn.client;
            let expected = match conn.closed.expect("every connection closed") {
                CloseCause::ClientClose => Some(1000),
                CloseCause::Policy => Some(1008),
                CloseCause::SlowConsumer => Some(1013),
                CloseCause::Drain => Some(1001),
                CloseCause::Dead | CloseCause::PeerGone => None,
                other => panic!("unexpected close cause {other:?} (seed {seed})"),
            };
            assert_eq!(client.close_seen, expected, "close code (seed {seed})");
            // Pongs arrive in order (checked as they arrive); a close may drop unsent ones.
            assert!(client.pongs <= client.pings_sent);
            // Every offset up to the last one received on each subscribed channel was either
            // received, skipped by this connection's backlog, or lost to its shard's overrun.
            let spanned: u64 = (0..CHANNELS.len())
                .filter(|&c| subscribed(key, c))
                .map(|c| client.last_offset.get(CHANNELS[c]).copied().unwrap_or(0))
                .sum();
            assert!(
                spanned <= client.received + conn.skipped + shard.overrun,
                "unexplained gap (seed {seed}): spanned {spanned}, received {}, skipped {}, overrun {}",
                client.received,
                conn.skipped,
                shard.overrun
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn offsets_stay_ordered_and_backlogs_bounded(seed in any::<u64>()) {
        run(seed, 4000, 1024);
    }

    #[test]
    fn a_lapped_shard_only_loses_what_it_counts(seed in any::<u64>()) {
        // A ring smaller than a burst forces overruns.
        run(seed, 4000, 16);
    }
}
