//! WebSocket frames: decoding what clients send, encoding what the server sends.
//!
//! [`FrameDecoder`] is the per-connection inbound state machine. It takes the bytes read so
//! far, unmasks in place and yields at most one [`Inbound`] event per call, or `Ok(None)`
//! when it needs more bytes (consuming nothing of an incomplete frame). It enforces every
//! rule RFC 6455 puts on a client: masking, reserved bits, known opcodes, control-frame
//! limits, continuation order, UTF-8 text, and ringcast's message size limit.
//!
//! Server frames are never masked; [`encode_frame`] writes one into a buffer.

use crate::proto::mask::apply_mask;
use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Opcodes (RFC 6455 section 5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text data frame.
    pub const TEXT: u8 = 0x1;
    /// Binary data frame.
    pub const BINARY: u8 = 0x2;
    /// Connection close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// A rule the client broke; each maps to a close code in [`crate::proto::close`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The client sent a frame without the mask bit.
    #[error("client frame not masked")]
    Unmasked,
    /// RSV1-3 set without a negotiated extension.
    #[error("reserved bits set without an extension")]
    ReservedBits,
    /// Opcode 3-7 or 0xB-0xF.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// Control frame fragmented or over 125 bytes.
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControlFrame,
    /// Continuation with no message started, or a new message inside a fragmented one.
    #[error("unexpected continuation frame")]
    BadContinuation,
    /// Frame or reassembled message over the configured limit.
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooBig {
        /// Size announced or reached.
        size: u64,
        /// The configured `max_message_size`.
        limit: usize,
    },
    /// A text message or close reason that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A close frame with a one-byte payload or a code that may not be sent.
    #[error("malformed close frame")]
    BadClose,
    /// A binary data message: ringcast commands are JSON text.
    #[error("binary messages are not accepted; commands are JSON text")]
    BinaryMessage,
}

/// One meaningful thing a client said.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A complete text message (already validated UTF-8).
    Text(&'a str),
    /// A ping with its payload, to be echoed in a pong.
    Ping(&'a [u8]),
    /// A pong (any payload).
    Pong,
    /// A close frame: the code if one was given.
    Close(Option<u16>),
}

/// A parsed frame header (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN bit.
    pub fin: bool,
    /// RSV1..3 as the low three bits.
    pub rsv: u8,
    /// Opcode nibble.
    pub opcode: u8,
    /// Masking key, when the mask bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Header length in bytes.
    pub header_len: usize,
}

impl FrameHeader {
    /// Parses a header from the front of `buf`; `Ok(None)` when more bytes are needed.
    pub fn parse(buf: &[u8]) -> Option<FrameHeader> {
        if buf.len() < 2 {
            return None;
        }
        let (b0, b1) = (buf[0], buf[1]);
        let masked = b1 & 0x80 != 0;
        let (len, mut at) = match b1 & 0x7F {
            126 => {
                let ext = buf.get(2..4)?;
                (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
            }
            127 => {
                let ext: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
                (u64::from_be_bytes(ext), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            Some(key)
        } else {
            None
        };
        Some(FrameHeader {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0F,
            mask,
            len,
            header_len: at,
        })
    }
}

/// Per-connection inbound state: limits plus the reassembly buffer of a fragmented message.
///
/// Holds no memory while no fragmented message is in flight.
#[derive(Debug)]
pub struct FrameDecoder {
    max_message_size: usize,
    /// Fragments of a message in progress; `None` outside a fragmented message.
    partial: Option<Vec<u8>>,
    /// A completed fragmented message, returned last call and freed on the next.
    finished: Option<Vec<u8>>,
}

impl FrameDecoder {
    /// A decoder enforcing `max_message_size` on frames and reassembled messages.
    pub fn new(max_message_size: usize) -> Self {
        FrameDecoder {
            max_message_size,
            partial: None,
            finished: None,
        }
    }

    /// True while a fragmented message is being reassembled.
    pub fn in_fragmented_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Decodes the next frame from `input`, unmasking it in place.
    ///
    /// Returns the bytes consumed and the event, if the frame completed one (a non-final
    /// fragment consumes bytes but yields no event). `Ok(None)` means `input` holds no
    /// complete frame yet; nothing was consumed.
    ///
    /// # Errors
    /// Any rule violation, as a [`FrameError`]; the connection must then be closed.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a mut [u8],
    ) -> Result<Option<(usize, Option<Inbound<'a>>)>, FrameError> {
        self.finished = None;
        let Some(header) = FrameHeader::parse(input) else {
            // Oversized frames are refused from the header alone; a 2^63-byte length must
            // not make us wait for bytes that will never fit.
            return self.precheck_partial_header(input).map(|()| None);
        };
        self.check_header(&header)?;
        let total = header.header_len + header.len as usize;
        if input.len() < total {
            return Ok(None);
        }
        let payload = &mut input[header.header_len..total];
        if let Some(mask) = header.mask {
            apply_mask(payload, mask, 0);
        }
        let event = self.on_frame(header, payload)?;
        Ok(Some((total, event)))
    }

    fn precheck_partial_header(&self, input: &[u8]) -> Result<(), FrameError> {
        if let Some(&b0) = input.first() {
            if b0 & 0x70 != 0 {
                return Err(FrameError::ReservedBits);
            }
        }
        if let Some(&b1) = input.get(1) {
            if b1 & 0x80 == 0 {
                return Err(FrameError::Unmasked);
            }
        }
        Ok(())
    }

    fn check_header(&self, h: &FrameHeader) -> Result<(), FrameError> {
        if h.rsv != 0 {
            return Err(FrameError::ReservedBits);
        }
        if h.mask.is_none() {
            return Err(FrameError::Unmasked);
        }
        let is_control = h.opcode & 0x8 != 0;
        match h.opcode {
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
            opcode::CLOSE | opcode::PING | opcode::PONG => {}
            other => return Err(FrameError::UnknownOpcode(other)),
        }
        if is_control && (!h.fin || h.len > 125) {
            return Err(FrameError::BadControlFrame);
        }
        let already = self.partial.as_ref().map_or(0, Vec::len) as u64;
        if h.len.saturating_add(already) > self.max_message_size as u64 {
            return Err(FrameError::TooBig {
                size: h.len.saturating_add(already),
                limit: self.max_message_size,
            });
        }
        match (h.opcode, self.partial.is_some()) {
            (opcode::CONTINUATION, false) => Err(FrameError::BadContinuation),
            (opcode::TEXT | opcode::BINARY, true) => Err(FrameError::BadContinuation),
            _ => Ok(()),
        }
    }

    fn on_frame<'a>(
        &'a mut self,
        h: FrameHeader,
        payload: &'a [u8],
    ) -> Result<Option<Inbound<'a>>, FrameError> {
        match h.opcode {
            opcode::PING => Ok(Some(Inbound::Ping(payload))),
            opcode::PONG => Ok(Some(Inbound::Pong)),
            opcode::CLOSE => parse_close(payload).map(|code| Some(Inbound::Close(code))),
            opcode::BINARY => Err(FrameError::BinaryMessage),
            opcode::TEXT if h.fin => std::str::from_utf8(payload)
                .map(|text| Some(Inbound::Text(text)))
                .map_err(|_| FrameError::InvalidUtf8),
            opcode::TEXT => {
                self.partial = Some(payload.to_vec());
                Ok(None)
            }
            _ => {
                // Continuation: check_header guaranteed a message is in progress.
                let mut buf = self.partial.take().unwrap_or_default();
                buf.extend_from_slice(payload);
                if !h.fin {
                    self.partial = Some(buf);
                    return Ok(None);
                }
                let done = self.finished.insert(buf);
                std::str::from_utf8(done)
                    .map(|text| Some(Inbound::Text(text)))
                    .map_err(|_| FrameError::InvalidUtf8)
            }
        }
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(FrameError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                return Err(FrameError::BadClose);
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// Length of the header of an unmasked server frame carrying `len` payload bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes an unmasked, final frame header for `len` payload bytes into `out`.
pub fn write_header(out: &mut [u8], opcode: u8, len: usize) {
    out[0] = 0x80 | opcode;
    match len {
        0..=125 => out[1] = len as u8,
        126..=65535 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Encodes one unmasked final frame.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let hl = header_len(payload.len());
    let mut buf = BytesMut::with_capacity(hl + payload.len());
    buf.resize(hl, 0);
    write_header(&mut buf, opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a close frame with `code` and `reason` (cut to the 123 bytes RFC 6455 allows,
/// on a UTF-8 boundary).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(opcode::CLOSE, &payload)
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
