use super::*;
use crate::proto::backlog::BacklogLimits;
use crate::proto::frame::FrameHeader;
use proptest::prelude::*;
use std::io::IoSlice;

const CONFIG: ConnConfig = ConnConfig {
    max_message_size: 65536,
    max_inbound_per_sec: 50,
    backlog: BacklogLimits {
        max_bytes: 1000,
        max_frames: 100,
        drop_limit: 3,
    },
    ping_after: 25,
    dead_after: 45,
    linger: 5,
    stall_after: 10,
};

/// A masked client frame.
fn client_frame(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![(u8::from(fin) << 7) | op];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Echoes short texts; long ones are answered with their length.
fn echo(text: &str, _session: Option<&mut Session>) -> Answer {
    let reply = if text.len() > 16 {
        format!("re:{} bytes", text.len())
    } else {
        format!("re:{text}")
    };
    encode_frame(opcode::TEXT, reply.as_bytes()).into()
}

/// Everything queued, as (opcode, payload) frames.
fn queued(conn: &Connection) -> Vec<(u8, Vec<u8>)> {
    let mut slices = [IoSlice::new(&[]); 256];
    let n = conn.backlog().io_slices(&mut slices);
    let mut wire: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
    let mut out = Vec::new();
    while let Some(h) = FrameHeader::parse(&wire) {
        let end = h.header_len + h.len as usize;
        out.push((h.opcode, wire[h.header_len..end].to_vec()));
        wire.drain(..end);
    }
    out
}

fn feed(conn: &mut Connection, now: u32, bytes: &[u8]) -> Option<CloseDecision> {
    let mut buf = bytes.to_vec();
    conn.on_input(now, &mut buf, &CONFIG, &mut echo)
}

#[test]
fn commands_and_pings_are_answered_in_order() {
    let mut conn = Connection::new(0);
    let mut input = client_frame(opcode::TEXT, true, b"a");
    input.extend(client_frame(opcode::PING, true, b"p"));
    input.extend(client_frame(opcode::PONG, true, b""));
    input.extend(client_frame(opcode::TEXT, true, b"b"));
    assert_eq!(feed(&mut conn, 1, &input), None);
    assert_eq!(
        queued(&conn),
        vec![
            (opcode::TEXT, b"re:a".to_vec()),
            (opcode::PONG, b"p".to_vec()),
            (opcode::TEXT, b"re:b".to_vec()),
        ]
    );
}

/// Regression: a frame split over many reads was re-copied whole on every read (O(n²)).
#[test]
fn a_frame_split_byte_by_byte_is_appended_in_place() {
    let mut conn = Connection::new(0);
    let payload = vec![b'x'; 60_000];
    let frame = client_frame(opcode::TEXT, true, &payload);
    let mut last_capacity = 0;
    let mut reallocations = 0;
    for (i, b) in frame.iter().enumerate() {
        assert_eq!(feed(&mut conn, 1, &[*b]), None);
        if i + 1 < frame.len() {
            assert_eq!(conn.buffered_input(), i + 1);
            if conn.input_capacity() != last_capacity {
                reallocations += 1;
                last_capacity = conn.input_capacity();
            }
        }
    }
    // Amortized growth: a handful of reallocations, not one per byte.
    assert!(reallocations < 40, "{reallocations} reallocations");
    assert_eq!(queued(&conn).len(), 1);
    assert_eq!(conn.input_capacity(), 0, "idle again: no input memory held");
}

/// Regression: empty non-final continuation frames did not count toward the rate limit.
#[test]
fn every_frame_counts_toward_the_rate_limit() {
    let mut conn = Connection::new(0);
    let mut input = client_frame(opcode::TEXT, false, b"");
    for _ in 0..CONFIG.max_inbound_per_sec {
        input.extend(client_frame(opcode::CONTINUATION, false, b""));
    }
    let close = feed(&mut conn, 3, &input).expect("flood closes");
    assert_eq!(close.cause, CloseCause::Policy);
    assert_eq!(close.reason.map(|r| r.code), Some(CloseCode::Policy));
    assert_eq!(
        conn.phase(),
        Phase::Doomed {
            answer_first: false
        }
    );
}

#[test]
fn the_rate_window_restarts_every_second() {
    let mut conn = Connection::new(0);
    for second in 0..5 {
        for _ in 0..CONFIG.max_inbound_per_sec {
            assert_eq!(
                feed(&mut conn, second, &client_frame(opcode::PONG, true, b"")),
                None
            );
        }
    }
    assert!(conn.is_open());
}

#[test]
fn a_protocol_error_decides_a_close_and_keeps_earlier_replies() {
    let mut conn = Connection::new(0);
    let mut input = client_frame(opcode::TEXT, true, b"a");
    input.extend(client_frame(opcode::BINARY, true, b"\x00"));
    let close = feed(&mut conn, 1, &input).expect("binary closes");
    assert_eq!(close.cause, CloseCause::ProtocolError);
    assert_eq!(close.reason.map(|r| r.code.code()), Some(1003));
    assert_eq!(queued(&conn), vec![(opcode::TEXT, b"re:a".to_vec())]);
    // Further input is ignored once a close is decided.
    assert_eq!(
        feed(&mut conn, 1, &client_frame(opcode::TEXT, true, b"b")),
        None
    );
    assert_eq!(queued(&conn).len(), 1);
}

#[test]
fn a_client_close_is_answered_then_the_write_side_shut() {
    let mut conn = Connection::new(0);
    let close = feed(
        &mut conn,
        1,
        &client_frame(opcode::CLOSE, true, &1000u16.to_be_bytes()),
    )
    .expect("close");
    assert_eq!(close.cause, CloseCause::ClientClose);
    assert!(conn.start_close(2, close.reason.as_ref()));
    assert_eq!(conn.phase(), Phase::Closing { since: 2 });
    let frames = queued(&conn);
    assert_eq!(
        frames,
        vec![(opcode::CLOSE, 1000u16.to_be_bytes().to_vec())]
    );
    assert_eq!(conn.on_written(1), Written::More);
    assert_eq!(conn.on_written(3), Written::ShutWrite);
    assert_eq!(conn.on_eof(), Eof::Finished);
}

/// Regression: ten text+ping pairs and a close in one read got the close but none of the
/// pongs (start_close dropped every reply queued before the client's close).
#[test]
fn frames_before_a_client_close_are_answered_before_it() {
    let mut conn = Connection::new(0);
    let mut input = Vec::new();
    for i in 0..10u8 {
        input.extend(client_frame(opcode::TEXT, true, br#"{"cmd":"ping"}"#));
        input.extend(client_frame(opcode::PING, true, &[i]));
    }
    input.extend(client_frame(opcode::CLOSE, true, &1000u16.to_be_bytes()));
    let close = feed(&mut conn, 1, &input).expect("close");
    assert_eq!(close.cause, CloseCause::ClientClose);
    assert!(conn.start_close(1, close.reason.as_ref()));
    let frames = queued(&conn);
    let pongs: Vec<_> = frames
        .iter()
        .filter(|(op, _)| *op == opcode::PONG)
        .map(|(_, payload)| payload.clone())
        .collect();
    assert_eq!(pongs, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    assert_eq!(
        frames.last(),
        Some(&(opcode::CLOSE, 1000u16.to_be_bytes().to_vec())),
        "the close goes last"
    );
}

#[test]
fn a_close_finishes_a_partly_written_frame_and_drops_the_rest() {
    let mut conn = Connection::new(0);
    let frame = Bytes::from(vec![7u8; 10]);
    for _ in 0..3 {
        assert_eq!(conn.offer(&frame, &CONFIG), Offer::Queued);
    }
    assert_eq!(conn.on_written(4), Written::More);
    let close = conn.close(
        Some(CloseReason::new(CloseCode::GoingAway, "bye")),
        CloseCause::Drain,
    );
    assert!(close.is_some());
    assert!(
        conn.close(None, CloseCause::IoError).is_none(),
        "decided once"
    );
    assert_eq!(conn.offer(&frame, &CONFIG), Offer::Skipped);
    assert!(conn.start_close(1, close.and_then(|c| c.reason).as_ref()));
    assert_eq!(conn.backlog().bytes(), 6 + 2 + 2 + 3);
}

#[test]
fn a_peer_that_left_is_closed_without_a_frame() {
    let mut conn = Connection::new(0);
    match conn.on_eof() {
        Eof::Close(close) => {
            assert_eq!(close.cause, CloseCause::PeerGone);
            assert!(!conn.start_close(0, close.reason.as_ref()));
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

#[test]
fn silence_gets_one_ping_then_a_close() {
    let mut conn = Connection::new(0);
    assert_eq!(conn.wake_at(&CONFIG), Some(25));
    assert_eq!(conn.on_tick(24, &CONFIG), Tick::Idle);
    assert_eq!(conn.on_tick(25, &CONFIG), Tick::Ping);
    assert_eq!(queued(&conn), vec![(opcode::PING, vec![])]);
    assert_eq!(
        conn.on_tick(30, &CONFIG),
        Tick::Idle,
        "one ping per silence"
    );
    assert_eq!(conn.wake_at(&CONFIG), Some(45));
    match conn.on_tick(45, &CONFIG) {
        Tick::Close(close) => assert_eq!(close.cause, CloseCause::Dead),
        other => panic!("expected dead, got {other:?}"),
    }
}

#[test]
fn any_input_keeps_the_connection_alive() {
    let mut conn = Connection::new(0);
    assert_eq!(conn.on_tick(25, &CONFIG), Tick::Ping);
    assert_eq!(
        feed(&mut conn, 40, &client_frame(opcode::PONG, true, b"")),
        None
    );
    assert_eq!(conn.on_tick(60, &CONFIG), Tick::Idle);
    assert_eq!(conn.on_tick(65, &CONFIG), Tick::Ping);
}

#[test]
fn a_closing_connection_lingers_at_most_the_bound() {
    let mut conn = Connection::new(0);
    let close = conn.close(
        Some(CloseReason::new(CloseCode::Policy, "x")),
        CloseCause::Policy,
    );
    assert!(conn.start_close(10, close.and_then(|c| c.reason).as_ref()));
    assert_eq!(conn.wake_at(&CONFIG), Some(15));
    assert_eq!(conn.on_tick(14, &CONFIG), Tick::Idle);
    assert_eq!(conn.on_tick(15, &CONFIG), Tick::LingerOver);
    // Lingering input is discarded.
    assert_eq!(
        feed(&mut conn, 12, &client_frame(opcode::TEXT, true, b"a")),
        None
    );
}

#[test]
fn a_slow_consumer_is_skipped_then_closed_with_1013() {
    let mut conn = Connection::new(0);
    let frame = Bytes::from(vec![0u8; 600]);
    assert_eq!(conn.offer(&frame, &CONFIG), Offer::Queued);
    assert_eq!(conn.offer(&frame, &CONFIG), Offer::Queued);
    assert_eq!(conn.offer(&frame, &CONFIG), Offer::Skipped);
    assert_eq!(conn.offer(&frame, &CONFIG), Offer::Skipped);
    assert_eq!(conn.offer(&frame, &CONFIG), Offer::Disconnect);
    let close = conn.close_slow_consumer().expect("closed");
    assert!(conn.close_slow_consumer().is_none(), "decided once");
    assert_eq!(close.cause, CloseCause::SlowConsumer);
    assert_eq!(close.reason.map(|r| r.code.code()), Some(1013));
}

#[test]
fn unread_replies_past_the_bound_are_a_flood() {
    let mut conn = Connection::new(0);
    let text = "y".repeat(16);
    let mut input = Vec::new();
    for _ in 0..30 {
        input.extend(client_frame(opcode::TEXT, true, text.as_bytes()));
    }
    // 21-byte replies, never read: past 2 x 1000 bytes within the fourth second.
    let closes: Vec<_> = (1..=4).filter_map(|s| feed(&mut conn, s, &input)).collect();
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].cause, CloseCause::Policy);
}

proptest! {
    /// Arbitrary bytes in arbitrary chunks never panic, and once a close is decided
    /// nothing more is answered.
    #[test]
    fn arbitrary_input_never_panics(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
    ) {
        let mut conn = Connection::new(0);
        let mut closed = false;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let before = conn.backlog().frame_count();
            let close = feed(&mut conn, i as u32 / 4, &chunk);
            if closed {
                prop_assert_eq!(conn.backlog().frame_count(), before);
            }
            closed |= close.is_some();
        }
    }

    /// How the bytes are split across reads never changes what is answered.
    #[test]
    fn chunking_does_not_change_the_answers(
        texts in proptest::collection::vec("[a-z]{0,200}", 1..8),
        cuts in proptest::collection::vec(1usize..97, 1..40),
    ) {
        let mut wire = Vec::new();
        for t in &texts {
            // Each text as two fragments, the second possibly empty.
            let (a, b) = t.split_at(t.len() / 2);
            wire.extend(client_frame(opcode::TEXT, false, a.as_bytes()));
            wire.extend(client_frame(opcode::CONTINUATION, true, b.as_bytes()));
        }
        let mut whole = Connection::new(0);
        prop_assert_eq!(feed(&mut whole, 0, &wire), None);
        let mut split = Connection::new(0);
        let mut at = 0;
        for cut in cuts.iter().cycle() {
            if at >= wire.len() {
                break;
            }
            let end = (at + cut).min(wire.len());
            prop_assert_eq!(feed(&mut split, 0, &wire[at..end]), None);
            at = end;
        }
        prop_assert_eq!(queued(&whole), queued(&split));
        prop_assert_eq!(queued(&whole).len(), texts.len());
        prop_assert_eq!(split.buffered_input(), 0);
    }

    /// Messages of any bytes, fragmented at any byte (a UTF-8 sequence may be cut in
    /// two) and read in any pieces: the same answers and the same close as when read
    /// whole; a close (1007) exactly when some message is not UTF-8, after the answers
    /// to the messages before it.
    #[test]
    fn any_bytes_fragmented_anywhere_close_exactly_on_invalid_utf8(
        texts in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..12),
                "\\PC{0,6}".prop_map(|t| t.into_bytes()),
            ],
            1..6,
        ),
        at in any::<proptest::sample::Index>(),
        cuts in proptest::collection::vec(1usize..23, 1..20),
    ) {
        let mut wire = Vec::new();
        for t in &texts {
            let (a, b) = t.split_at(at.index(t.len() + 1));
            wire.extend(client_frame(opcode::TEXT, false, a));
            wire.extend(client_frame(opcode::CONTINUATION, true, b));
        }
        let mut whole = Connection::new(0);
        let whole_close = feed(&mut whole, 0, &wire).map(|c| (c.cause, c.reason.map(|r| r.code)));
        let mut split = Connection::new(0);
        let (mut split_close, mut from) = (None, 0);
        for cut in cuts.iter().cycle() {
            if from >= wire.len() || split_close.is_some() {
                break;
            }
            let end = (from + cut).min(wire.len());
            split_close = feed(&mut split, 0, &wire[from..end]).map(|c| (c.cause, c.reason.map(|r| r.code)));
            from = end;
        }
        prop_assert_eq!(&whole_close, &split_close);
        prop_assert_eq!(queued(&whole), queued(&split));
        let valid = texts.iter().take_while(|t| std::str::from_utf8(t).is_ok()).count();
        let expected = (valid < texts.len()).then_some((CloseCause::ProtocolError, Some(CloseCode::InvalidPayload)));
        prop_assert_eq!(whole_close, expected);
        prop_assert_eq!(queued(&whole).len(), valid);
    }
}

/// A recovery's replay follows its reply, in order, even past the backlog bound that
/// would make a live message be skipped.
#[test]
fn replayed_frames_follow_the_reply_whatever_the_backlog_holds() {
    let mut conn = Connection::new(0);
    let big = encode_frame(opcode::TEXT, &vec![b'x'; CONFIG.backlog.max_bytes]);
    assert_eq!(conn.offer(&big, &CONFIG), Offer::Queued);
    let mut buf = client_frame(opcode::TEXT, true, b"recover");
    let mut recover = |_: &str, _: Option<&mut Session>| Answer {
        reply: encode_frame(opcode::TEXT, b"reply"),
        replay: vec![
            encode_frame(opcode::TEXT, b"m1"),
            encode_frame(opcode::TEXT, b"m2"),
        ],
    };
    assert_eq!(conn.on_input(0, &mut buf, &CONFIG, &mut recover), None);
    let texts: Vec<Vec<u8>> = queued(&conn).into_iter().skip(1).map(|(_, p)| p).collect();
    assert_eq!(texts, [b"reply".to_vec(), b"m1".to_vec(), b"m2".to_vec()]);
    assert_eq!(
        conn.offer(&big, &CONFIG),
        Offer::Skipped,
        "live ones still bounded"
    );
}

fn session_until(expires_at: u32) -> Option<Box<Session>> {
    Some(Box::new(Session {
        user: std::sync::Arc::new(crate::auth::session::User::new("alice")),
        grants: None,
        conn_id: 0,
        expires_at,
    }))
}

#[test]
fn an_expired_token_closes_with_4401_on_the_tick() {
    let mut conn = Connection::with_session(0, session_until(10));
    assert_eq!(conn.wake_at(&CONFIG), Some(10));
    assert_eq!(conn.on_tick(9, &CONFIG), Tick::Idle);
    match conn.on_tick(10, &CONFIG) {
        Tick::Close(CloseDecision {
            reason: Some(reason),
            cause: CloseCause::TokenExpired,
        }) => assert_eq!(reason.code.code(), 4401),
        other => panic!("expected a 4401 close, got {other:?}"),
    }
    assert_eq!(conn.on_tick(11, &CONFIG), Tick::Idle);
}

#[test]
fn a_refreshed_session_moves_the_deadline() {
    let mut conn = Connection::with_session(0, session_until(10));
    // The command handler sees the session and may move its expiry (a refresh).
    let mut input = client_frame(opcode::TEXT, true, b"refresh");
    let mut refresh = |_: &str, session: Option<&mut Session>| {
        if let Some(s) = session {
            s.expires_at = 100;
        }
        encode_frame(opcode::TEXT, b"ok").into()
    };
    assert_eq!(conn.on_input(5, &mut input, &CONFIG, &mut refresh), None);
    assert_eq!(conn.wake_at(&CONFIG), Some(5 + CONFIG.ping_after));
    assert_eq!(conn.on_tick(10, &CONFIG), Tick::Idle);
    assert_eq!(conn.session().map(|s| s.expires_at), Some(100));
    // An anonymous connection never expires.
    let anon = Connection::new(0);
    assert_eq!(anon.wake_at(&CONFIG), Some(CONFIG.ping_after));
}

/// A message the backlog has no room for makes the connection lag instead of losing it;
/// catch-up steps queue a gap notice and frames, and it follows live again when done.
#[test]
fn a_full_backlog_lags_then_catches_up() {
    let mut conn = Connection::new(0);
    let chan: std::sync::Arc<str> = std::sync::Arc::from("c");
    let big = encode_frame(opcode::TEXT, &vec![b'x'; CONFIG.backlog.max_bytes]);
    assert_eq!(conn.offer_on(&chan, 1, &big, &CONFIG), Offer::Queued);
    assert_eq!(conn.offer_on(&chan, 2, &big, &CONFIG), Offer::Skipped);
    assert_eq!(conn.offer_on(&chan, 3, &big, &CONFIG), Offer::Skipped);
    assert!(conn.is_lagging());
    assert_eq!(
        conn.catch_up_next(),
        Some((chan.clone(), 1)),
        "it has offset 1"
    );
    assert!(!conn.wants_catch_up(&CONFIG), "no room yet");
    let all = conn.backlog().bytes();
    conn.on_written(all);
    assert!(conn.wants_catch_up(&CONFIG));
    let step = CatchUp {
        gap: Some((2, 2)),
        frames: vec![encode_frame(opcode::TEXT, b"m3")],
        reached: 3,
        done: true,
    };
    assert_eq!(conn.apply_catch_up("c", step, &CONFIG), None);
    assert!(!conn.is_lagging());
    let texts: Vec<Vec<u8>> = queued(&conn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        texts,
        [
            br#"{"type":"gap","channel":"c","from":2,"to":2}"#.to_vec(),
            b"m3".to_vec()
        ]
    );
    // Live again.
    let small = encode_frame(opcode::TEXT, b"m4");
    assert_eq!(conn.offer_on(&chan, 4, &small, &CONFIG), Offer::Queued);
}

/// A lagging connection that takes no byte for `stall_after` seconds is closed with
/// 1013; one that loses more than `drop_limit` messages to gaps too.
#[test]
fn a_stalled_or_hopelessly_behind_connection_is_closed_with_1013() {
    let chan: std::sync::Arc<str> = std::sync::Arc::from("c");
    let big = encode_frame(opcode::TEXT, &vec![b'x'; CONFIG.backlog.max_bytes]);
    let mut stuck = Connection::new(0);
    stuck.offer_on(&chan, 1, &big, &CONFIG);
    stuck.offer_on(&chan, 2, &big, &CONFIG);
    assert_eq!(stuck.on_tick(1, &CONFIG), Tick::Idle);
    assert_eq!(
        stuck.on_tick(1 + CONFIG.stall_after - 1, &CONFIG),
        Tick::Idle
    );
    match stuck.on_tick(1 + CONFIG.stall_after, &CONFIG) {
        Tick::Close(CloseDecision {
            reason: Some(r),
            cause: CloseCause::SlowConsumer,
        }) => {
            assert_eq!(r.code.code(), 1013)
        }
        other => panic!("expected 1013, got {other:?}"),
    }
    let mut behind = Connection::new(0);
    behind.offer_on(&chan, 1, &big, &CONFIG);
    behind.offer_on(&chan, 2, &big, &CONFIG);
    let lost = u64::from(CONFIG.backlog.drop_limit) + 1;
    let step = CatchUp {
        gap: Some((2, 1 + lost)),
        frames: Vec::new(),
        reached: 1 + lost,
        done: true,
    };
    let close = behind.apply_catch_up("c", step, &CONFIG).expect("closed");
    assert_eq!(close.cause, CloseCause::SlowConsumer);
}

/// Everything queued, as one string (an HTTP transport's bytes).
fn wire(conn: &Connection) -> String {
    let mut slices = [IoSlice::new(&[]); 64];
    let n = conn.backlog().io_slices(&mut slices);
    slices[..n]
        .iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// An idle SSE stream drops its encoder and gets its position back from the driver; a
/// channel it lags on is at its own offset, not the one the driver gives.
#[test]
fn an_idle_sse_stream_releases_its_encoder_and_is_restored() {
    use crate::proto::message::{encode_message, EncodedData};
    use crate::proto::position::Position;
    use crate::proto::sse::{HttpStream, Mode};
    let chans = ["a".to_string(), "b".to_string()];
    let mut conn = Connection::new(0).with_stream(HttpStream::new(Mode::Sse, &chans, None));
    let reply = r#"{"reply":"subscribe","code":200,"channel":"a","offset":4,"epoch":"7"}"#;
    conn.queue_control(encode_frame(opcode::TEXT, reply.as_bytes()), &CONFIG)
        .unwrap();
    assert!(!conn.release_position(), "something is queued");
    let all = conn.backlog().bytes();
    conn.on_written(all);
    assert!(conn.release_position());
    assert!(conn.http_stream().is_none() && conn.needs_position());
    // Heartbeats and input need no encoder.
    assert_eq!(conn.on_tick(30, &CONFIG), Tick::Ping);
    assert_eq!(wire(&conn), ":\n\n");
    assert!(conn.http_stream().is_none());
    let all = conn.backlog().bytes();
    conn.on_written(all);
    // Lagging on `b`: its position is the last offset it was given there.
    let b: Arc<str> = Arc::from("b");
    conn.lag_from(&b, 2);
    conn.restore_position(Position::parse("a~5~7,b~9~8").unwrap());
    assert!(!conn.needs_position());
    let msg = encode_message("a", 6, &EncodedData::new(b"1"));
    assert_eq!(
        conn.offer_on(&Arc::from("a"), 6, &msg, &CONFIG),
        Offer::Queued
    );
    let text = wire(&conn);
    let id = text
        .strip_prefix("id: ")
        .and_then(|t| t.split_once("\ndata: "))
        .map(|(id, _)| id)
        .unwrap_or_default();
    let names = ["a".to_string(), "b".to_string()];
    assert_eq!(
        Position::parse_for(id, &names).map(|p| p.encode()),
        Ok("a~6~7,b~2~8".to_string()),
        "{text}"
    );
    assert!(!conn.release_position(), "lagging");
    // The close event needs none either.
    let mut conn = Connection::new(0).with_stream(HttpStream::new(Mode::Sse, &chans, None));
    assert!(conn.release_position());
    let close = conn.close(None, CloseCause::Drain).unwrap();
    let reason = CloseReason::new(CloseCode::GoingAway, "reconnect after 9ms");
    assert!(conn.start_close(1, Some(&reason)));
    assert_eq!(close.cause, CloseCause::Drain);
    assert!(wire(&conn).contains(r#""code":1001"#), "{}", wire(&conn));
    // One that keeps its encoder never releases it.
    let mut conn = Connection::new(0).with_stream(HttpStream::new(Mode::Sse, &chans, None));
    conn.keep_position();
    assert!(!conn.release_position());
}

/// A poll's answer is held until it ends, then goes out whole: head (with the length),
/// events, end.
#[test]
fn a_poll_answer_goes_out_whole_with_its_length() {
    use crate::proto::message::{encode_message, EncodedData};
    use crate::proto::sse::HttpStream;
    let chans = ["a".to_string()];
    let mut conn = Connection::new(0).with_stream(HttpStream::poll(30, &chans, None, ""));
    assert!(!conn.poll_answer_due());
    let reply = r#"{"reply":"subscribe","code":200,"channel":"a","offset":4,"epoch":"7"}"#;
    conn.queue_control(encode_frame(opcode::TEXT, reply.as_bytes()), &CONFIG)
        .unwrap();
    let chan: Arc<str> = Arc::from("a");
    for offset in 5..8 {
        let msg = encode_message("a", offset, &EncodedData::new(b"1"));
        assert_eq!(conn.offer_on(&chan, offset, &msg, &CONFIG), Offer::Queued);
    }
    assert!(conn.poll_answer_due() && conn.holds_output());
    let decision = conn
        .close(
            Some(CloseReason::new(CloseCode::Normal, "")),
            CloseCause::PollAnswered,
        )
        .unwrap();
    assert!(conn.start_close(1, decision.reason.as_ref()));
    assert!(!conn.holds_output());
    let answer = wire(&conn);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(doc["events"].as_array().unwrap().len(), 4, "{body}");
    assert_eq!(doc["position"], "a~7~7");
    // Its deadline answers it empty.
    let mut conn = Connection::new(0).with_stream(HttpStream::poll(30, &chans, None, ""));
    assert!(matches!(conn.on_tick(30, &CONFIG), Tick::Close(_)));
}
