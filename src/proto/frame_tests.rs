use super::*;
use proptest::prelude::*;

/// Builds a masked client frame the way a browser would.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0u8; header_len(payload.len())];
    write_header(&mut out, opcode, payload.len());
    if !fin {
        out[0] &= 0x7F;
    }
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
    out
}

/// `bytes` as one text message in `split` fragments (at least one), masked with `mask`.
fn fragmented_text(bytes: &[u8], split: usize, mask: [u8; 4]) -> Vec<u8> {
    let chunk = bytes.len().div_ceil(split).max(1);
    let pieces: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(chunk).collect()
    };
    let mut wire = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let op = if i == 0 {
            opcode::TEXT
        } else {
            opcode::CONTINUATION
        };
        wire.extend(client_frame(i + 1 == pieces.len(), op, p, mask));
    }
    wire
}

fn decode_all(dec: &mut FrameDecoder, mut buf: Vec<u8>) -> Result<Vec<String>, FrameError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match dec.decode(&mut buf[at..])? {
            None => break,
            Some((used, ev)) => {
                if let Some(ev) = ev {
                    out.push(format!("{ev:?}"));
                }
                at += used;
            }
        }
    }
    Ok(out)
}

#[test]
fn text_frame_decodes() {
    let mut dec = FrameDecoder::new(1024);
    let mut buf = client_frame(true, opcode::TEXT, b"{\"cmd\":\"ping\"}", [1, 2, 3, 4]);
    let len = buf.len();
    let (used, ev) = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(used, len);
    assert_eq!(ev, Some(Inbound::Text("{\"cmd\":\"ping\"}")));
}

#[test]
fn incomplete_frame_consumes_nothing() {
    let mut dec = FrameDecoder::new(1024);
    let full = client_frame(true, opcode::TEXT, b"hello world", [9, 8, 7, 6]);
    for cut in 0..full.len() {
        let mut part = full[..cut].to_vec();
        assert_eq!(dec.decode(&mut part), Ok(None), "cut at {cut}");
    }
}

#[test]
fn fragmented_text_is_reassembled() {
    let mut dec = FrameDecoder::new(1024);
    let mut buf = client_frame(false, opcode::TEXT, b"hel", [1, 1, 1, 1]);
    buf.extend(client_frame(true, opcode::PING, b"p", [2, 2, 2, 2]));
    buf.extend(client_frame(
        false,
        opcode::CONTINUATION,
        b"lo ",
        [3, 3, 3, 3],
    ));
    buf.extend(client_frame(
        true,
        opcode::CONTINUATION,
        b"you",
        [4, 4, 4, 4],
    ));
    let events = decode_all(&mut dec, buf).unwrap();
    assert_eq!(
        events,
        vec!["Ping([112])".to_string(), "Text(\"hello you\")".to_string()]
    );
    assert!(!dec.in_fragmented_message());
}

#[test]
fn rule_violations_are_reported() {
    let cases: Vec<(Vec<u8>, FrameError)> = vec![
        (
            {
                let mut f = client_frame(true, opcode::TEXT, b"x", [1, 2, 3, 4]);
                f[1] &= 0x7F;
                f
            },
            FrameError::Unmasked,
        ),
        (
            {
                let mut f = client_frame(true, opcode::TEXT, b"x", [1, 2, 3, 4]);
                f[0] |= 0x40;
                f
            },
            FrameError::ReservedBits,
        ),
        (
            client_frame(true, 0x3, b"x", [1, 2, 3, 4]),
            FrameError::UnknownOpcode(3),
        ),
        (
            client_frame(false, opcode::PING, b"x", [1, 2, 3, 4]),
            FrameError::BadControlFrame,
        ),
        (
            client_frame(true, opcode::CONTINUATION, b"x", [1, 2, 3, 4]),
            FrameError::BadContinuation,
        ),
        (
            client_frame(true, opcode::TEXT, &[0xff, 0xfe], [1, 2, 3, 4]),
            FrameError::InvalidUtf8,
        ),
        (
            client_frame(true, opcode::BINARY, b"x", [1, 2, 3, 4]),
            FrameError::BinaryMessage,
        ),
        (
            client_frame(true, opcode::TEXT, &[b'a'; 200], [1, 2, 3, 4]),
            FrameError::TooBig {
                size: 200,
                limit: 100,
            },
        ),
        (
            client_frame(true, opcode::CLOSE, &[3, 0xE8 - 1], [1, 2, 3, 4]),
            FrameError::BadClose,
        ),
    ];
    for (frame, want) in cases {
        let mut dec = FrameDecoder::new(100);
        assert_eq!(decode_all(&mut dec, frame), Err(want));
    }
}

#[test]
fn oversized_length_is_refused_before_payload_arrives() {
    let mut dec = FrameDecoder::new(100);
    let mut head = vec![0x81, 0x80 | 127];
    head.extend_from_slice(&(u64::MAX / 2).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    assert!(matches!(
        dec.decode(&mut head),
        Err(FrameError::TooBig { .. })
    ));
}

#[test]
fn fragments_over_the_limit_are_refused() {
    let mut dec = FrameDecoder::new(10);
    let mut buf = client_frame(false, opcode::TEXT, b"123456", [1, 2, 3, 4]);
    buf.extend(client_frame(
        true,
        opcode::CONTINUATION,
        b"789012",
        [1, 2, 3, 4],
    ));
    assert!(matches!(
        decode_all(&mut dec, buf),
        Err(FrameError::TooBig { size: 12, .. })
    ));
}

#[test]
fn close_frame_with_reason() {
    let mut dec = FrameDecoder::new(100);
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    let mut buf = client_frame(true, opcode::CLOSE, &payload, [5, 6, 7, 8]);
    let (_, ev) = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(ev, Some(Inbound::Close(Some(1000))));
}

#[test]
fn close_reason_is_cut_on_a_char_boundary() {
    let frame = encode_close(1001, &"é".repeat(100));
    let payload = &frame[4..];
    assert!(payload.len() <= 125);
    assert!(std::str::from_utf8(&payload[2..]).is_ok());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut dec = FrameDecoder::new(64);
        let mut at = 0;
        while at < data.len() {
            match dec.decode(&mut data[at..]) {
                Ok(Some((used, _))) => { prop_assert!(used > 0); at += used; }
                _ => break,
            }
        }
    }

    #[test]
    fn encode_then_decode_round_trips(text in "\\PC{0,300}", mask in any::<[u8; 4]>(),
                                      split in 1usize..8) {
        // Encode as a client would (fragmented into `split` pieces), decode, compare.
        let wire = fragmented_text(text.as_bytes(), split, mask);
        let mut dec = FrameDecoder::new(100_000);
        let events = decode_all(&mut dec, wire).unwrap();
        prop_assert_eq!(events, vec![format!("{:?}", Inbound::Text(&text))]);
    }

    /// Any bytes as a fragmented text message, fed in arbitrary pieces: decoded to the
    /// same text exactly when they are UTF-8, else refused as InvalidUtf8 (never a
    /// panic, never text that is not UTF-8). The round trip above only ever generated
    /// valid UTF-8 in one buffer.
    #[test]
    fn fragmented_text_of_any_bytes_is_text_or_invalid_utf8(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "\\PC{0,60}".prop_map(|t| t.into_bytes()),
        ],
        mask in any::<[u8; 4]>(),
        split in 1usize..8,
        feed in 1usize..40,
    ) {
        let wire = fragmented_text(&bytes, split, mask);
        let mut dec = FrameDecoder::new(100_000);
        // Fed `feed` bytes at a time, as reads would bring them.
        let (mut have, mut sent, mut events) = (Vec::new(), 0, Vec::new());
        let outcome = loop {
            if sent < wire.len() {
                let end = (sent + feed).min(wire.len());
                have.extend_from_slice(&wire[sent..end]);
                sent = end;
            }
            match dec.decode(&mut have) {
                Ok(Some((used, ev))) => {
                    if let Some(ev) = ev {
                        events.push(format!("{ev:?}"));
                    }
                    have.drain(..used);
                }
                Ok(None) if sent < wire.len() => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        match std::str::from_utf8(&bytes) {
            Ok(text) => {
                prop_assert_eq!(outcome, Ok(()));
                prop_assert_eq!(events, vec![format!("{:?}", Inbound::Text(text))]);
            }
            Err(_) => {
                prop_assert_eq!(outcome, Err(FrameError::InvalidUtf8));
                prop_assert!(events.is_empty());
            }
        }
    }

    /// Close frames with any code and any reason bytes: accepted only with a code a
    /// client may send and a UTF-8 reason.
    #[test]
    fn close_frames_with_any_reason_are_accepted_only_when_valid(
        code in any::<u16>(),
        reason in proptest::collection::vec(any::<u8>(), 0..120),
        mask in any::<[u8; 4]>(),
    ) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason);
        let mut buf = client_frame(true, opcode::CLOSE, &payload, mask);
        let mut dec = FrameDecoder::new(1024);
        let result = dec.decode(&mut buf);
        let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
        match (allowed, std::str::from_utf8(&reason).is_ok()) {
            (true, true) => prop_assert!(matches!(result, Ok(Some((_, Some(Inbound::Close(_))))))),
            (true, false) => prop_assert_eq!(result, Err(FrameError::InvalidUtf8)),
            (false, _) => prop_assert!(result.is_err(), "code {} accepted", code),
        }
    }

    #[test]
    fn server_frames_parse_back(payload in proptest::collection::vec(any::<u8>(), 0..70_000)) {
        let frame = encode_frame(opcode::BINARY, &payload);
        let h = FrameHeader::parse(&frame).unwrap();
        prop_assert!(h.fin && h.mask.is_none());
        prop_assert_eq!(h.len as usize, payload.len());
        prop_assert_eq!(&frame[h.header_len..], &payload[..]);
    }
}
