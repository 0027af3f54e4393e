//! A WebSocket client driven by hand, for what well-behaved libraries refuse to do.
//!
//! [`RawWs`] performs the RFC 6455 handshake itself, then lets a test write any frame it
//! likes ([`OutFrame`]: unmasked, reserved bits, bad opcodes, a length header larger
//! than the payload) and read the server's frames and close code ([`CloseSeen`]). It is
//! also the "peer that never reads" and "peer that never answers pings" of the slow
//! consumer and dead peer tests.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::http;

/// The RFC 6455 sample key and the accept value the server must derive from it.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `base64(sha1(SAMPLE_KEY + GUID))`, from RFC 6455 section 1.3.
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Frame opcodes (RFC 6455 section 5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A frame to send, valid or not.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// FIN bit.
    pub fin: bool,
    /// The three RSV bits, as a value 0..=7.
    pub rsv: u8,
    /// Opcode, 0..=15.
    pub opcode: u8,
    /// Masking key; `None` sends the frame unmasked (forbidden for clients).
    pub mask: Option<[u8; 4]>,
    /// Payload bytes actually written after the header.
    pub payload: Vec<u8>,
}

impl OutFrame {
    /// A final, masked frame with `opcode` and `payload`.
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> OutFrame {
        OutFrame {
            fin: true,
            rsv: 0,
            opcode,
            mask: Some([0x37, 0xfa, 0x21, 0x3d]),
            payload: payload.into(),
        }
    }

    /// A final, masked text frame.
    pub fn text(text: impl Into<Vec<u8>>) -> OutFrame {
        OutFrame::new(opcode::TEXT, text)
    }

    /// The same frame without a mask.
    pub fn unmasked(mut self) -> OutFrame {
        self.mask = None;
        self
    }

    /// The same frame with RSV bits `rsv` (0..=7) set.
    pub fn rsv(mut self, rsv: u8) -> OutFrame {
        self.rsv = rsv;
        self
    }

    /// The same frame with FIN cleared.
    pub fn not_final(mut self) -> OutFrame {
        self.fin = false;
        self
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.payload.len() as u64;
        let mut out = Vec::with_capacity(14 + self.payload.len());
        out.push((u8::from(self.fin) << 7) | ((self.rsv & 0x7) << 4) | (self.opcode & 0xF));
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= u64::from(u16::MAX) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        match self.mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
        out
    }
}

/// A frame received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV bits, 0..=7.
    pub rsv: u8,
    /// Opcode.
    pub opcode: u8,
    /// Whether the server (wrongly) masked it.
    pub masked: bool,
    /// Payload, unmasked.
    pub payload: Vec<u8>,
}

/// How a connection ended, as seen from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseSeen {
    /// A close frame; `code` is `None` for an empty close payload.
    Frame {
        /// The status code.
        code: Option<u16>,
        /// The UTF-8 reason.
        reason: String,
    },
    /// The server closed the TCP connection without a close frame.
    Eof,
    /// The connection was reset (or another socket error).
    Reset(String),
    /// Nothing conclusive arrived in time.
    TimedOut,
}

impl CloseSeen {
    /// The close code, if a close frame carried one.
    pub fn code(&self) -> Option<u16> {
        match self {
            CloseSeen::Frame { code, .. } => *code,
            _ => None,
        }
    }
}

/// A client-side WebSocket over a plain `TcpStream`, frames written and read by hand.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Connects to `addr` and upgrades `target` (e.g. `/ws?channels=a`).
    ///
    /// # Panics
    /// When the server does not answer `101` with the right `Sec-WebSocket-Accept`.
    pub fn connect(addr: SocketAddr, target: &str) -> RawWs {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        RawWs::upgrade(stream, target)
    }

    /// Upgrades an already connected `stream` (tests that need socket options set
    /// before connecting create the socket themselves).
    pub fn upgrade(mut stream: TcpStream, target: &str) -> RawWs {
        let addr = stream.peer_addr().expect("peer address");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("sending the upgrade request to {addr}: {e}"));
        let (head, rest) = http::read_head(&mut stream, Instant::now() + Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("reading the upgrade response from {addr}: {e}"));
        assert_eq!(
            head.status, 101,
            "upgrade of {target} answered {} {} with headers {:?}",
            head.status, head.reason, head.headers
        );
        assert_eq!(
            head.header("sec-websocket-accept"),
            Some(SAMPLE_ACCEPT),
            "wrong Sec-WebSocket-Accept in {:?}",
            head.headers
        );
        RawWs { stream, buf: rest }
    }

    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes one frame. Errors are returned, not raised: a server that closes on a bad
    /// frame may reset the connection while the frame is still being written.
    pub fn send(&mut self, frame: &OutFrame) -> io::Result<()> {
        self.send_bytes(&frame.encode())
    }

    /// Writes raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next frame. `Ok(None)` when the server closed the connection;
    /// `Err(TimedOut)` when no complete frame arrived in `timeout`.
    pub fn read_frame(&mut self, timeout: Duration) -> io::Result<Option<InFrame>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            if http::read_some(&mut self.stream, &mut self.buf, deadline)? == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads (and discards) frames until the connection ends or a close frame arrives.
    pub fn read_close(&mut self, timeout: Duration) -> CloseSeen {
        self.read_close_counting(timeout).0
    }

    /// Like [`RawWs::read_close`], also returning the data frames read before the end.
    pub fn read_close_counting(&mut self, timeout: Duration) -> (CloseSeen, Vec<InFrame>) {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(Some(f)) if f.opcode == opcode::CLOSE => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default())
                        .into_owned();
                    return (CloseSeen::Frame { code, reason }, before);
                }
                Ok(Some(f)) => {
                    if f.opcode == opcode::TEXT || f.opcode == opcode::BINARY {
                        before.push(f);
                    }
                }
                Ok(None) => return (CloseSeen::Eof, before),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return (CloseSeen::TimedOut, before)
                }
                Err(e) => return (CloseSeen::Reset(e.to_string()), before),
            }
        }
    }
}

/// Parses one server frame from the front of `buf`; `Ok(None)` when more bytes are
/// needed.
fn parse_frame(buf: &[u8]) -> io::Result<Option<(InFrame, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut pos) = match buf[1] & 0x7F {
        126 if buf.len() < 4 => return Ok(None),
        126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= 64 * 1024 * 1024)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("server frame of {len} bytes"),
            )
        })?;
    let key = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let k = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(k)
    } else {
        None
    };
    if buf.len() < pos + len {
        return Ok(None);
    }
    let mut payload = buf[pos..pos + len].to_vec();
    if let Some(k) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    let frame = InFrame {
        fin: buf[0] & 0x80 != 0,
        rsv: (buf[0] >> 4) & 0x7,
        opcode: buf[0] & 0x0F,
        masked,
        payload,
    };
    Ok(Some((frame, pos + len)))
}
