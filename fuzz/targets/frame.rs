//! Client bytes on a WebSocket connection: `FrameHeader::parse`, `FrameDecoder::decode`,
//! and `Connection::on_input` fed the same bytes whole, one byte per read and seven bytes
//! per read.
//!
//! Checks, besides never panicking: a header never claims more bytes than it was given;
//! a decode step consumes at least a header and never more than its input (so the
//! connection's loop always ends); messages fit `max_message_size`; and the connection
//! hears the same messages, answers the same pongs and decides the same close however
//! the bytes were split across reads.

use ringcast::auth::session::Session;
use ringcast::proto::backlog::BacklogLimits;
use ringcast::proto::close::{CloseCode, CloseReason};
use ringcast::proto::conn::{Answer, ConnConfig, Connection};
use ringcast::proto::frame::{encode_frame, opcode, FrameDecoder, FrameHeader, Inbound};
use std::io::IoSlice;

const MAX_MESSAGE: usize = 1024;

const CONFIG: ConnConfig = ConnConfig {
    max_message_size: MAX_MESSAGE,
    // Neither limit may cut a run short: the comparison is about framing alone.
    max_inbound_per_sec: u32::MAX,
    backlog: BacklogLimits {
        max_bytes: 1 << 30,
        max_frames: 1 << 20,
        drop_limit: u32::MAX,
    },
    ping_after: 25,
    dead_after: 45,
    linger: 5,
    stall_after: 10,
};

/// What a connection made of a byte stream.
#[derive(Debug, PartialEq, Eq)]
struct Heard {
    texts: Vec<String>,
    /// The pong frames queued, back to back.
    pongs: Vec<u8>,
    /// The close decided, if any (`Some(None)`: closed without a frame).
    close: Option<Option<CloseReason>>,
}

/// Decodes `bytes` with one decoder, frame after frame: the reference the connection is
/// compared with.
fn decode_whole(mut bytes: Vec<u8>) -> Heard {
    let mut heard = Heard {
        texts: Vec::new(),
        pongs: Vec::new(),
        close: None,
    };
    let mut decoder = FrameDecoder::new(MAX_MESSAGE);
    let mut at = 0;
    while at < bytes.len() {
        let input = &mut bytes[at..];
        let given = input.len();
        if let Some(h) = FrameHeader::parse(input) {
            assert!(
                (2..=14).contains(&h.header_len) && h.header_len <= given,
                "{h:?} from {given} bytes"
            );
        }
        match decoder.decode(input) {
            Ok(None) => break,
            Ok(Some((used, event))) => {
                assert!((6..=given).contains(&used), "used {used} of {given} bytes");
                at += used;
                match event {
                    None | Some(Inbound::Pong) => {}
                    Some(Inbound::Text(text)) => {
                        assert!(text.len() <= MAX_MESSAGE, "{} bytes", text.len());
                        heard.texts.push(text.to_string());
                    }
                    Some(Inbound::Ping(payload)) => {
                        assert!(payload.len() <= 125);
                        heard
                            .pongs
                            .extend_from_slice(&encode_frame(opcode::PONG, payload));
                    }
                    Some(Inbound::Close(code)) => {
                        if let Some(code) = code {
                            assert!(matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999));
                        }
                        heard.close = Some(Some(CloseReason::new(CloseCode::Normal, "")));
                        break;
                    }
                }
            }
            Err(e) => {
                heard.close = Some(Some(CloseReason::from(e)));
                break;
            }
        }
    }
    heard
}

/// Feeds `bytes` to a fresh connection in reads of `read` bytes.
fn connection_hears(bytes: &[u8], read: usize) -> Heard {
    let mut conn = Connection::new(0);
    let mut texts = Vec::new();
    let mut close = None;
    let mut handler = |text: &str, _: Option<&mut Session>| {
        texts.push(text.to_string());
        Answer::default()
    };
    for chunk in bytes.chunks(read) {
        let mut chunk = chunk.to_vec();
        if let Some(decision) = conn.on_input(0, &mut chunk, &CONFIG, &mut handler) {
            close = Some(decision.reason);
            break;
        }
    }
    let backlog = conn.backlog();
    let mut slices = vec![IoSlice::new(&[]); backlog.frame_count()];
    let n = backlog.io_slices(&mut slices);
    let pongs = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
    Heard {
        texts,
        pongs,
        close,
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let reference = decode_whole(data.to_vec());
        for read in [data.len().max(1), 1, 7] {
            assert_eq!(
                connection_hears(data, read),
                reference,
                "reads of {read} bytes"
            );
        }
    });
}
