//! A minimal HTTP/1.1 client over `std::net::TcpStream`.
//!
//! Enough for ringcast's admin API (`/healthz`, `/readyz`, `/metrics`, `/publish`) and for
//! sending deliberately broken upgrade requests to the WebSocket port. Every request is
//! sent with `Connection: close`; a response ends at its `Content-Length` or at EOF.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one request may take, connect to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response head this client accepts before calling the answer broken.
const MAX_HEAD: usize = 64 * 1024;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Reason phrase from the status line.
    pub reason: String,
    /// Header fields in arrival order (names as sent).
    pub headers: Vec<(String, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    /// When the body is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body from a {} response, got {:?} ({e})",
                self.status,
                self.text()
            )
        })
    }
}

/// Sends `method target` with `headers` and `body` to `addr` and reads the response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    request_waiting(addr, method, target, headers, body, REQUEST_TIMEOUT)
}

/// [`request`], waiting up to `wait` for the answer: for requests the server may
/// legitimately answer late (a cluster publish it re-sends while JetStream is held).
pub fn request_waiting(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    wait: Duration,
) -> io::Result<HttpResponse> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    send_waiting(addr, &bytes, wait)
}

/// `GET target` on `addr`.
pub fn get(addr: SocketAddr, target: &str) -> io::Result<HttpResponse> {
    request(addr, "GET", target, &[], b"")
}

/// Writes `bytes` as they are (no framing added) and reads one response.
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> io::Result<HttpResponse> {
    send_waiting(addr, bytes, REQUEST_TIMEOUT)
}

fn send_waiting(addr: SocketAddr, bytes: &[u8], wait: Duration) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.write_all(bytes)?;
    read_response(&mut stream, Instant::now() + wait)
}

/// Reads one response from `stream`, giving up at `deadline`.
///
/// Bytes after the response are left unread only if they arrived in a later segment;
/// callers that keep the stream (the WebSocket handshake) use [`read_head`] instead.
pub fn read_response(stream: &mut TcpStream, deadline: Instant) -> io::Result<HttpResponse> {
    let (mut response, mut rest) = read_head(stream, deadline)?;
    match response
        .header("content-length")
        .map(|v| v.trim().parse::<usize>())
    {
        Some(Ok(len)) => {
            while rest.len() < len {
                let n = read_some(stream, &mut rest, deadline)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body ended after {} of {len} bytes", rest.len()),
                    ));
                }
            }
            rest.truncate(len);
        }
        Some(Err(e)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad Content-Length: {e}"),
            ))
        }
        None => {
            // No length: the body runs to EOF. A reset after the body is the server
            // closing with unread request bytes, not a failure of the response.
            loop {
                match read_some(stream, &mut rest, deadline) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    response.body = rest;
    Ok(response)
}

/// Reads a response head; returns it (with an empty body) and the bytes that followed it.
pub fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<(HttpResponse, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        if read_some(stream, &mut buf, deadline)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a full response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP/1.x status line: {status_line:?}"),
        ));
    };
    let reason = parts.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((
        HttpResponse {
            status,
            reason,
            headers,
            body: Vec::new(),
        },
        rest,
    ))
}

/// One `read` into the tail of `buf`, bounded by `deadline`; returns the byte count.
pub fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "HTTP read timed out",
        ));
    }
    stream.set_read_timeout(Some(left))?;
    let mut chunk = [0u8; 16 * 1024];
    let n = match stream.read(&mut chunk) {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP read timed out",
            ))
        }
        Err(e) => return Err(e),
    };
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}
