//! The client half of RFC 6455, as little of it as a load generator needs, with no I/O.
//!
//! - [`request`] builds the upgrade request; [`parse_response`] checks the answer (status
//!   101 and a `Sec-WebSocket-Accept` matching our random key).
//! - [`parse_head`] decodes one server frame header. Server frames are unmasked; a masked
//!   one, reserved bits or an unknown opcode is a protocol error.
//! - [`encode_client_frame`] writes one masked client frame (pong, close, publish text).
//!
//! "Need more bytes" is `Ok(None)` and consumes nothing; callers keep the tail and retry.

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest response head accepted during the handshake.
pub const MAX_RESPONSE_HEAD: usize = 8192;
/// Largest frame payload accepted from a server (16 MiB).
pub const MAX_FRAME: u64 = 16 << 20;

/// Opcode of a continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Why an upgrade answer was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The server answered with a status other than 101.
    #[error("server answered HTTP {status} instead of 101 Switching Protocols")]
    Status {
        /// The HTTP status code.
        status: u16,
    },
    /// The answer is not an HTTP/1.1 response.
    #[error("malformed HTTP response to the upgrade request")]
    Malformed,
    /// 101 without a `Sec-WebSocket-Accept` header.
    #[error("101 response without Sec-WebSocket-Accept")]
    MissingAccept,
    /// `Sec-WebSocket-Accept` does not match the key that was sent.
    #[error("Sec-WebSocket-Accept does not match the key sent")]
    BadAccept,
    /// The response head did not end within [`MAX_RESPONSE_HEAD`] bytes.
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
}

impl HandshakeError {
    /// Short failure cause used as a counter key, e.g. `http_503`.
    pub fn cause(&self) -> String {
        match self {
            HandshakeError::Status { status } => format!("http_{status}"),
            HandshakeError::Malformed => "bad_response".into(),
            HandshakeError::MissingAccept | HandshakeError::BadAccept => "bad_accept".into(),
            HandshakeError::TooLarge => "response_too_large".into(),
        }
    }
}

/// A server frame that breaks RFC 6455.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Servers must not mask frames.
    #[error("masked frame from the server")]
    Masked,
    /// RSV1-3 set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcode 3-7 or 11-15.
    #[error("unknown opcode {0:#x}")]
    BadOpcode(u8),
    /// Control frames carry at most 125 bytes and are never fragmented.
    #[error("invalid control frame")]
    BadControl,
    /// Payload larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u64),
}

/// A fresh random `Sec-WebSocket-Key` (16 random bytes, base64).
pub fn new_key() -> String {
    let mut raw = [0u8; 16];
    raw.iter_mut().for_each(|b| *b = fastrand::u8(..));
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The `Sec-WebSocket-Accept` value a server must answer for `key`.
pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The upgrade request for `path` (path and query) on `host`.
pub fn request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Checks an upgrade answer. `Ok(Some(n))`: valid, the head is `n` bytes and anything after
/// it is already frame data. `Ok(None)`: the head is not complete yet.
///
/// # Errors
/// Any status but 101, a missing or wrong accept header, or an oversized head.
pub fn parse_response(buf: &[u8], key: &str) -> Result<Option<usize>, HandshakeError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(HandshakeError::TooLarge);
        }
        // A complete status line that is not 101 is enough to fail fast.
        return match find(buf, b"\r\n") {
            Some(line_end) => match status_of(&buf[..line_end])? {
                101 => Ok(None),
                status => Err(HandshakeError::Status { status }),
            },
            None => Ok(None),
        };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HandshakeError::Malformed)?;
    let mut lines = head.split("\r\n");
    let status = status_of(lines.next().unwrap_or_default().as_bytes())?;
    if status != 101 {
        return Err(HandshakeError::Status { status });
    }
    let accept = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, value)| value.trim())
        .ok_or(HandshakeError::MissingAccept)?;
    if accept != accept_for(key) {
        return Err(HandshakeError::BadAccept);
    }
    Ok(Some(end + 4))
}

fn status_of(line: &[u8]) -> Result<u16, HandshakeError> {
    let line = std::str::from_utf8(line).map_err(|_| HandshakeError::Malformed)?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => {
            code.parse().map_err(|_| HandshakeError::Malformed)
        }
        _ => Err(HandshakeError::Malformed),
    }
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// FIN bit: last frame of a message.
    pub fin: bool,
    /// Opcode (`OP_*`).
    pub opcode: u8,
    /// Bytes taken by the header itself.
    pub header_len: usize,
    /// Bytes of payload following the header.
    pub payload_len: usize,
}

impl FrameHead {
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Decodes the header of the server frame at the start of `buf`.
///
/// # Errors
/// A masked frame, reserved bits, unknown opcode, bad control frame or oversized frame.
pub fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let (len, header_len) = match b1 & 0x7F {
        126 if buf.len() < 4 => return Ok(None),
        126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(raw), 10)
        }
        small => (u64::from(small), 2),
    };
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG if fin && len <= 125 => {}
        OP_CLOSE | OP_PING | OP_PONG => return Err(FrameError::BadControl),
        other => return Err(FrameError::BadOpcode(other)),
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // MAX_FRAME fits in usize on every supported target.
    let payload_len = usize::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    Ok(Some(FrameHead {
        fin,
        opcode,
        header_len,
        payload_len,
    }))
}

/// Appends one masked, final client frame to `out`.
pub fn encode_client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | (opcode & 0x0F));
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let mask = fastrand::u32(..).to_be_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// The status code of a close frame payload; 1005 ("no status") when it carries none.
pub fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn response_is_checked_and_split() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_response(ok, key), Ok(Some(ok.len() - 2)));
        assert_eq!(parse_response(&ok[..20], key), Ok(None));
        let refused = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n";
        assert_eq!(
            parse_response(refused, key),
            Err(HandshakeError::Status { status: 503 })
        );
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(parse_response(wrong, key), Err(HandshakeError::BadAccept));
    }

    #[test]
    fn heads_decode_and_need_more() {
        assert_eq!(parse_head(&[0x81]), Ok(None));
        let head = parse_head(&[0x81, 5]).ok().flatten();
        assert_eq!(head.map(|h| (h.opcode, h.total_len())), Some((OP_TEXT, 7)));
        assert_eq!(parse_head(&[0x82, 126, 1]), Ok(None));
        let head = parse_head(&[0x82, 126, 1, 0]).ok().flatten();
        assert_eq!(head.map(|h| h.total_len()), Some(4 + 256));
        assert_eq!(parse_head(&[0x81, 0x85]), Err(FrameError::Masked));
        assert_eq!(parse_head(&[0xC1, 0]), Err(FrameError::ReservedBits));
        assert_eq!(parse_head(&[0x83, 0]), Err(FrameError::BadOpcode(3)));
        assert_eq!(parse_head(&[0x09, 0]), Err(FrameError::BadControl));
    }

    #[test]
    fn client_frames_are_masked_round_trip() {
        let mut out = Vec::new();
        encode_client_frame(OP_TEXT, b"hello", &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 5);
        let mask = [out[2], out[3], out[4], out[5]];
        let plain: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(plain, b"hello");
        assert_eq!(close_code(&[0x03, 0xF5]), 1013);
        assert_eq!(close_code(&[]), 1005);
    }
}
