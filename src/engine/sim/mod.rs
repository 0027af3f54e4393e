//! Seeded simulations that drive the real [`Engine`](crate::engine::Engine) against
//! simulated sockets and clients (see each module's doc for its invariants).
//!
//! Each run is one seed: a failing case prints it, and `trace_one` replays it.

mod fanout;
mod recovery;

use crate::engine::table::{Conn, Driver};
use crate::engine::{Engine, Flush, Wire};
use crate::metrics::CloseCause;
use crate::proto::conn::Written;
use crate::proto::frame::{opcode, FrameHeader};
use std::collections::HashMap;
use std::io::IoSlice;

/// Seeds per property: each a whole schedule of thousands of steps. Every CI run tries
/// this many new ones; a failure prints its seed (and proptest keeps it in
/// `proptest-regressions/engine/sim/`), and `trace_one` replays one.
pub(crate) const SEEDS: u32 = 1024;

/// What a simulated socket's kernel buffer holds at most: small, so writes block often
/// and writability comes back as an edge.
pub(crate) const SNDBUF: usize = 256;

/// What one simulated client has, per channel, and what it was told.
#[derive(Debug, Default)]
pub(crate) struct Client {
    /// Bytes read from the socket not yet parsed into frames.
    pub wire: Vec<u8>,
    /// The last offset it has of each channel (received, or declared lost to it).
    pub last: HashMap<String, u64>,
    pub received: u64,
    pub gap_notices: u64,
    pub not_recovered: u64,
    pub recovered: u64,
    pub close_seen: Option<u16>,
    /// Command replies received.
    pub replies: u64,
    /// Pings sent and pongs received (payloads are sequence numbers).
    pub pings_sent: u32,
    pub pongs: u32,
    /// Pings from the server.
    pub server_pings: u32,
}

/// The simulated socket of one connection: the driver's part of its table entry.
#[derive(Debug, Default)]
pub(crate) struct Peer {
    /// Written by the engine, not yet read by the client (at most [`SNDBUF`]).
    pub kernel: Vec<u8>,
    /// The last write found the buffer full: the client's next read is a writable edge.
    pub blocked: bool,
    pub client: Client,
    /// Closed by the server (decided); the client reconnects once it notices.
    pub closed: Option<CloseCause>,
    /// The write side was shut (the close frame is out).
    pub shut: bool,
}

impl Driver for Peer {
    type Fd = Peer;
    type Tls = ();
}

/// Writes backlogs into the simulated sockets' buffers.
pub(crate) struct SimWire<'a> {
    pub engine: &'a Engine<Peer>,
}

impl Wire<Peer> for SimWire<'_> {
    fn flush(&self, _key: u32, conn: &mut Conn<Peer>) -> Flush {
        if conn.machine.holds_output() {
            return Flush::Done;
        }
        let flush = loop {
            if conn.machine.backlog().is_empty() {
                break Flush::Done;
            }
            let room = SNDBUF.saturating_sub(conn.fd.kernel.len());
            let mut slices = [IoSlice::new(&[]); 64];
            let n = conn.machine.backlog().io_slices(&mut slices);
            let mut took = 0;
            let mut asked = 0;
            for slice in &slices[..n] {
                asked += slice.len();
                let part = slice.len().min(room - took);
                conn.fd.kernel.extend_from_slice(&slice[..part]);
                took += part;
            }
            if took > 0 && conn.machine.on_written(took) == Written::ShutWrite {
                assert!(conn.fd.closed.is_some(), "write side shut without a close");
                conn.fd.shut = true;
            }
            if took < asked {
                conn.fd.blocked = true;
                break Flush::Blocked;
            }
        };
        self.engine.count_backlog(conn);
        flush
    }

    fn flush_listed(&self, keys: &[u32]) {
        self.engine.flush_each(self, keys);
    }
}

/// The client of `key` reads up to `take` bytes of what its socket holds. Space freed in
/// a full buffer is a writable edge, served as the driver serves one: write what is
/// queued, then a lagging connection takes its next part from history. The closes this
/// decides are left in the engine's list for the caller to carry out.
pub(crate) fn read(engine: &Engine<Peer>, key: u32, take: usize, seed: u64) {
    let mut conns = engine.conns.borrow_mut();
    let Some(conn) = conns.get_mut(key) else {
        return;
    };
    let take = take.min(conn.fd.kernel.len());
    let read: Vec<u8> = conn.fd.kernel.drain(..take).collect();
    conn.fd.client.wire.extend_from_slice(&read);
    parse_wire(&mut conn.fd.client, seed);
    if take > 0 && std::mem::take(&mut conn.fd.blocked) {
        let wire = SimWire { engine };
        engine.flush_or_close(&wire, key, conn);
        if conn.machine.is_open() {
            engine.catch_up(&wire, key, conn);
        }
    }
}

/// Parses the frames that arrived, checking each channel's sequence: the next offset, or
/// a gap notice starting at it.
pub(crate) fn parse_wire(client: &mut Client, seed: u64) {
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
                let Some(ch) = v["channel"].as_str().map(str::to_string) else {
                    client.replies += 1;
                    continue;
                };
                let last = client.last.get(&ch).copied().unwrap_or(0);
                if v["type"] == "gap" {
                    let from = v["from"].as_u64().expect("from");
                    let to = v["to"].as_u64().expect("to");
                    assert_eq!(
                        from,
                        last + 1,
                        "{ch}: gap notice starts at its next offset (seed {seed})"
                    );
                    assert!(to >= from, "{ch}: gap {from}..{to} (seed {seed})");
                    client.gap_notices += 1;
                    client.last.insert(ch, to);
                } else {
                    let offset = v["offset"].as_u64().expect("offset");
                    assert_eq!(
                        offset,
                        last + 1,
                        "{ch}: offset {offset} after {last} with no notice (seed {seed})"
                    );
                    client.received += 1;
                    client.last.insert(ch, offset);
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

/// The backlog gauge counts what is queued, once: a frame offered and written leaves it
/// where it was.
#[test]
fn the_backlog_gauge_counts_a_delivered_frame_once() {
    use crate::engine::round::{Delivery, Next};
    use crate::fanout::publisher::Publisher;
    use crate::fanout::ring::Ring;
    use crate::fanout::wake::IdleFlags;
    use crate::proto::conn::{ConnConfig, Connection};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    let publisher = Arc::new(Publisher::new(
        Arc::new(Ring::new(64)),
        Arc::new(IdleFlags::new(1)),
    ));
    let metrics: &'static crate::metrics::ShardMetrics = Box::leak(Box::default());
    let config = ConnConfig {
        max_message_size: 4096,
        max_inbound_per_sec: 100,
        backlog: crate::proto::backlog::BacklogLimits {
            max_bytes: 4096,
            max_frames: 64,
            drop_limit: 8,
        },
        ping_after: 5,
        dead_after: 9,
        linger: 2,
        stall_after: 3,
    };
    let engine: Engine<Peer> = Engine::new(0, publisher.clone(), metrics, config, 8, false, None);
    let key = engine.conns.borrow_mut().insert(Conn {
        fd: Peer::default(),
        generation: 1,
        machine: Connection::new(0),
        tls: (),
    });
    engine.index.borrow_mut().subscribe(key, "news");
    publisher.publish_quiet("news", b"{\"n\":1}");
    let Next::Message(msg) = engine.next_from_ring() else {
        panic!("a message");
    };
    let mut snapshot = Vec::new();
    assert!(matches!(
        engine.deliver_start(&msg, &mut snapshot, 16, || false),
        Delivery::Done(1)
    ));
    let wire = SimWire { engine: &engine };
    assert!(engine.end_round(&wire).is_empty());
    let queued = engine.conns.borrow().get(key).map(|c| c.fd.kernel.len());
    assert_eq!(queued, Some(msg.frame.len()), "written to the socket");
    assert_eq!(metrics.deliveries.load(Relaxed), 1);
    assert_eq!(
        metrics.backlog_bytes.load(Relaxed),
        0,
        "nothing is left queued"
    );
}
