//! The subscriber side of ringcast's Server-Sent Events transport (`GET /sse`), sans-io:
//! the request, the answer's head, and the events of the stream (docs/protocol.md).
//!
//! An event ends at a blank line; its `data:` lines (joined with `\n`) are its data, the
//! very JSON a WebSocket text frame would carry. `id:`, `retry:`, `event:` lines and
//! comments (heartbeats, `:`) carry nothing the accounting needs.

use crate::wsproto::HandshakeError;

/// Largest answer head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The `GET` request for `path` (path and query) on `host`.
pub fn request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n").into_bytes()
}

/// Parses the answer head from the start of `buf`: `Ok(None)` while incomplete, the
/// head's length (the stream starts after it) once a `200` came.
///
/// # Errors
/// Any other status, a malformed or oversized head.
pub fn parse_response(buf: &[u8]) -> Result<Option<usize>, HandshakeError> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let line_end = buf.windows(2).position(|w| w == b"\r\n");
    let Some(line_end) = line_end else {
        return if buf.len() > MAX_RESPONSE_HEAD {
            Err(HandshakeError::TooLarge)
        } else {
            Ok(None)
        };
    };
    // A complete status line that is not 200 is enough to fail fast.
    let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| HandshakeError::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HandshakeError::Malformed);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HandshakeError::Malformed);
    }
    let status: u16 = code.parse().map_err(|_| HandshakeError::Malformed)?;
    if status != 200 {
        return Err(HandshakeError::Status { status });
    }
    match end {
        Some(end) => Ok(Some(end + 4)),
        None if buf.len() > MAX_RESPONSE_HEAD => Err(HandshakeError::TooLarge),
        None => Ok(None),
    }
}

/// One complete event at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// Bytes the event took, its blank line included.
    pub len: usize,
    /// Its data (the `data:` field), `None` for an event without one (a heartbeat
    /// comment, a `retry:`). Several `data:` lines are not joined: ringcast sends one.
    pub data: Option<&'a [u8]>,
}

/// The first complete event of `buf`; `None` until its blank line arrived.
pub fn next_event(buf: &[u8]) -> Option<Event<'_>> {
    let mut at = 0;
    let mut data = None;
    loop {
        let nl = buf[at..].iter().position(|&b| b == b'\n')?;
        let mut line = &buf[at..at + nl];
        at += nl + 1;
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        if line.is_empty() {
            return Some(Event { len: at, data });
        }
        if let Some(value) = line.strip_prefix(b"data:") {
            data = Some(value.strip_prefix(b" ").unwrap_or(value));
        }
    }
}

/// The close code of ringcast's last event (`{"type":"close","code":C,...}`), if `data`
/// is one.
pub fn close_code(data: &[u8]) -> Option<u16> {
    let rest = data.strip_prefix(br#"{"type":"close","code":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// True for a subscribe reply (`{"reply":...}`): not a delivery.
pub fn is_reply(data: &[u8]) -> bool {
    data.starts_with(br#"{"reply":"#)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_an_sse_answer_head() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nretry: 1500\n\n";
        assert_eq!(parse_response(head).unwrap(), Some(head.len() - 13));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Ty").unwrap(),
            None
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Err(HandshakeError::Status { status: 503 })
        ));
        assert!(parse_response(b"SSH-2.0\r\n").is_err());
    }

    #[test]
    fn splits_events_at_blank_lines() {
        let stream = b"retry: 1500\n\n:\n\nid: a~1~2\ndata: {\"channel\":\"a\"}\n\npartial";
        let first = next_event(stream).unwrap();
        assert_eq!(first.data, None);
        let rest = &stream[first.len..];
        let beat = next_event(rest).unwrap();
        assert_eq!((beat.len, beat.data), (3, None));
        let rest = &rest[beat.len..];
        let event = next_event(rest).unwrap();
        assert_eq!(event.data, Some(&b"{\"channel\":\"a\"}"[..]));
        assert_eq!(next_event(&rest[event.len..]), None);
        let close = br#"{"type":"close","code":1001,"reason":"reconnect after 5ms"}"#;
        assert_eq!(close_code(close), Some(1001));
        assert_eq!(close_code(b"{\"channel\":\"a\"}"), None);
        assert!(is_reply(br#"{"reply":"subscribe","code":200}"#));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_response(&buf);
            let mut rest = &buf[..];
            while let Some(event) = next_event(rest) {
                prop_assert!(event.len > 0 && event.len <= rest.len());
                if let Some(data) = event.data {
                    let _ = close_code(data);
                }
                rest = &rest[event.len..];
            }
        }
    }
}
