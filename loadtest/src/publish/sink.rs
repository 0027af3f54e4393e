//! The publish endpoints themselves: a UDP socket, a TCP line stream, keep-alive HTTP
//! `POST`s, or a WebSocket connection sending masked text frames. Each knows how to send
//! one payload to one of its channels and reports failures as text for the publisher's
//! error count. (A WebSocket publisher sends bare payloads: it has no channel.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::PublishError;
use crate::target::{PublishTarget, WsTarget};
use crate::wsproto;

/// One open publish endpoint.
pub enum Sink {
    Udp {
        socket: UdpSocket,
        prefixes: Vec<Vec<u8>>,
        what: String,
    },
    Tcp {
        stream: TcpStream,
        prefixes: Vec<Vec<u8>>,
        what: String,
    },
    Http {
        stream: Option<TcpStream>,
        target: PublishTarget,
        heads: Vec<String>,
        what: String,
    },
    Ws {
        stream: TcpStream,
        what: String,
    },
}

impl Sink {
    /// Connects to `target`; messages will go to `channels`.
    pub fn open(
        target: &PublishTarget,
        channels: &[String],
        errors: Arc<AtomicU64>,
    ) -> Result<Sink, PublishError> {
        let prefixes = channels
            .iter()
            .map(|c| format!("{c} ").into_bytes())
            .collect::<Vec<_>>();
        match target {
            PublishTarget::Udp(addr) => {
                let what = format!("udp://{addr}");
                let bind = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(bind)
                    .and_then(|s| s.connect(addr).map(|()| s))
                    .map_err(|source| connect_error(&what, source))?;
                Ok(Sink::Udp {
                    socket,
                    prefixes,
                    what,
                })
            }
            PublishTarget::Tcp(addr) => {
                let what = format!("tcp://{addr}");
                let stream = dial(*addr, &what)?;
                // The server answers only bad lines, with `ERR <reason>`; count them.
                let reader = stream
                    .try_clone()
                    .map_err(|source| connect_error(&what, source))?;
                std::thread::spawn(move || {
                    for line in BufReader::new(reader).lines() {
                        match line {
                            Ok(line) if line.starts_with("ERR") => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                Ok(Sink::Tcp {
                    stream,
                    prefixes,
                    what,
                })
            }
            PublishTarget::Http { addr, host, path } => {
                let what = format!("http://{host}{path}");
                let stream = Some(dial_http(*addr, &what)?);
                let heads = channels
                    .iter()
                    .map(|c| format!("POST {path}?channel={c} HTTP/1.1\r\nHost: {host}\r\n"))
                    .collect();
                Ok(Sink::Http {
                    stream,
                    target: target.clone(),
                    heads,
                    what,
                })
            }
            PublishTarget::Ws(ws) => Ok(Sink::Ws {
                stream: ws_publisher(ws)?,
                what: ws.url.clone(),
            }),
        }
    }

    /// The endpoint, for messages.
    pub fn what(&self) -> String {
        match self {
            Sink::Udp { what, .. }
            | Sink::Tcp { what, .. }
            | Sink::Http { what, .. }
            | Sink::Ws { what, .. } => what.clone(),
        }
    }

    /// Publishes one payload to channel number `channel` (of those given to `open`).
    pub fn send(&mut self, channel: usize, payload: &[u8]) -> Result<(), String> {
        let pick = |list: &[Vec<u8>]| list.get(channel).cloned().unwrap_or_default();
        match self {
            Sink::Udp {
                socket, prefixes, ..
            } => {
                let mut datagram = pick(prefixes);
                datagram.extend_from_slice(payload);
                socket.send(&datagram).map(drop).map_err(|e| e.to_string())
            }
            Sink::Tcp {
                stream, prefixes, ..
            } => {
                let mut line = pick(prefixes);
                line.extend_from_slice(payload);
                line.push(b'\n');
                stream.write_all(&line).map_err(|e| e.to_string())
            }
            Sink::Http {
                stream,
                target,
                heads,
                what,
            } => {
                let head = heads.get(channel).map_or("", String::as_str);
                http_post(stream, target, head, what, payload)
            }
            Sink::Ws { stream, .. } => {
                let mut frame = Vec::with_capacity(payload.len() + 14);
                wsproto::encode_client_frame(wsproto::OP_TEXT, payload, &mut frame);
                stream.write_all(&frame).map_err(|e| e.to_string())
            }
        }
    }

    /// Ends the stream politely where the protocol has a way to.
    pub fn finish(&mut self) {
        if let Sink::Ws { stream, .. } = self {
            let mut frame = Vec::new();
            wsproto::encode_client_frame(wsproto::OP_CLOSE, &1000u16.to_be_bytes(), &mut frame);
            let _ = stream.write_all(&frame);
        }
    }
}

fn connect_error(what: &str, source: std::io::Error) -> PublishError {
    let hint = if source.kind() == std::io::ErrorKind::ConnectionRefused {
        " (connection refused: is the server running and listening there?)"
    } else {
        ""
    };
    PublishError::Connect {
        what: what.to_owned(),
        source,
        hint,
    }
}

fn dial(addr: std::net::SocketAddr, what: &str) -> Result<TcpStream, PublishError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|source| connect_error(what, source))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    Ok(stream)
}

/// How long an HTTP publish may wait for its answer. A clustered node answers only after
/// JetStream stored the message, and on a starved box (67 nodes on one CPU) that took
/// more than 10 s.
const HTTP_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether a failed `POST` may be sent again: only when the server closed a kept-alive
/// connection (EOF, reset), never after a timeout — the server may be storing the message
/// right now, and a second `POST` would publish it twice.
fn may_resend(err: &std::io::Error) -> bool {
    !matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn dial_http(addr: std::net::SocketAddr, what: &str) -> Result<TcpStream, PublishError> {
    let stream = dial(addr, what)?;
    let _ = stream.set_read_timeout(Some(HTTP_ANSWER_TIMEOUT));
    Ok(stream)
}

/// One keep-alive `POST`; reconnects once if the server closed the previous connection.
fn http_post(
    stream: &mut Option<TcpStream>,
    target: &PublishTarget,
    head: &str,
    what: &str,
    body: &[u8],
) -> Result<(), String> {
    let mut request = format!("{head}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    request.extend_from_slice(body);
    for attempt in 0..2 {
        if stream.is_none() {
            *stream = Some(dial_http(target.addr(), what).map_err(|e| e.to_string())?);
        }
        let Some(conn) = stream.as_mut() else {
            continue;
        };
        match conn
            .write_all(&request)
            .and_then(|()| read_http_status(conn))
        {
            Ok((status, keep_alive)) => {
                if !keep_alive {
                    *stream = None;
                }
                return if status == 200 {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                };
            }
            Err(err) if attempt == 0 && may_resend(&err) => {
                *stream = None;
            }
            Err(err) => {
                *stream = None;
                return Err(err.to_string());
            }
        }
    }
    Err("no connection".into())
}

/// Reads one response; returns its status and whether the connection stays open.
fn read_http_status(conn: &mut TcpStream) -> std::io::Result<(u16, bool)> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 || head.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim() == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok((status, header("connection").as_deref() != Some("close")))
}

/// Opens the dedicated publisher WebSocket; whatever the server sends it is discarded.
fn ws_publisher(ws: &WsTarget) -> Result<TcpStream, PublishError> {
    let mut stream = dial(ws.addr, &ws.url)?;
    let key = wsproto::new_key();
    let fail = |why: String| PublishError::Handshake {
        what: ws.url.clone(),
        why,
    };
    stream
        .write_all(&wsproto::request(&ws.host, &ws.path, &key))
        .map_err(|e| fail(e.to_string()))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            return Err(fail("connection closed during the handshake".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match wsproto::parse_response(&buf, &key) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    if let Ok(mut reader) = stream.try_clone() {
        let _ = reader.set_read_timeout(None);
        std::thread::spawn(move || while matches!(reader.read(&mut chunk), Ok(n) if n > 0) {});
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// A `POST` whose answer does not come in time is not sent again (it may be stored).
    #[test]
    fn a_post_that_times_out_is_not_sent_twice() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a listener");
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let server = std::thread::spawn(move || {
            // Accept for 2 s, count requests, never answer.
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut open = Vec::new();
            while Instant::now() < deadline {
                if let Ok((mut conn, _)) = listener.accept() {
                    conn.set_read_timeout(Some(Duration::from_millis(500)))
                        .expect("read timeout");
                    let mut buf = [0u8; 4096];
                    if conn.read(&mut buf).is_ok_and(|n| n > 0) {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    open.push(conn);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let conn = TcpStream::connect(addr).expect("connecting");
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("client read timeout");
        let mut stream = Some(conn);
        let target = PublishTarget::Http {
            addr,
            host: addr.to_string(),
            path: "/publish".into(),
        };
        let head = format!("POST /publish?channel=c HTTP/1.1\r\nHost: {addr}\r\n");
        let result = http_post(&mut stream, &target, &head, "test", b"x");
        assert!(result.is_err(), "no answer must be an error: {result:?}");
        server.join().expect("server thread");
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "the POST was sent again"
        );
    }
}
