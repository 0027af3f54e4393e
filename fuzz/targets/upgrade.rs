//! The request head on the WebSocket port: `parse_upgrade_with_cookie` for `/ws`, and the
//! HTTP transports `/sse` and `/poll` (`Last-Event-ID`, `?since=`, `?timeout=`) with
//! their preflights.
//!
//! Checks, besides never panicking: "need more" only below the 8 KiB head limit; an
//! accepted request's head alone gives the same answer (what follows it is not read);
//! its channels are valid, distinct and within the limit; its position re-encodes to
//! itself; a WebSocket key is 16 bytes of base64 and its `101` is a complete response;
//! every rejection renders a complete HTTP response whose body is its reason.

use base64::Engine;
use ringcast::proto::channel::is_valid_channel;
use ringcast::proto::position::Position;
use ringcast::proto::upgrade::{
    accept_response, parse_upgrade_with_cookie, Endpoint, HttpReject, MAX_REQUEST_HEAD,
    POLL_TIMEOUT_MAX,
};

const MAX_CHANNELS: usize = 8;

/// Parses a complete response; returns its status and body.
fn response(bytes: &[u8]) -> (u16, Vec<u8>) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = r.parse(bytes) else {
        panic!(
            "not a complete response: {:?}",
            String::from_utf8_lossy(bytes)
        );
    };
    let body = bytes[head..].to_vec();
    if let Some(h) = r.headers.iter().find(|h| h.name == "Content-Length") {
        let length: usize = std::str::from_utf8(h.value)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX);
        assert_eq!(length, body.len(), "Content-Length");
    }
    (r.code.unwrap_or(0), body)
}

fn check_reject(reject: &HttpReject) {
    assert!(
        [400, 404, 405, 426, 431].contains(&reject.status),
        "{reject:?}"
    );
    let (status, body) = response(&reject.response());
    assert_eq!(status, reject.status);
    assert_eq!(body, format!("{}\n", reject.reason).into_bytes());
}

fn check(data: &[u8], cookie: Option<&str>) {
    match parse_upgrade_with_cookie(data, MAX_CHANNELS, cookie) {
        Ok(None) => assert!(data.len() < MAX_REQUEST_HEAD, "{} bytes", data.len()),
        Err(reject) => check_reject(&reject),
        Ok(Some(up)) => {
            assert!(up.head_len > 0 && up.head_len <= data.len());
            let head_only = parse_upgrade_with_cookie(&data[..up.head_len], MAX_CHANNELS, cookie);
            assert_eq!(head_only, Ok(Some(up.clone())));
            assert!(up.channels.len() <= MAX_CHANNELS);
            for (i, ch) in up.channels.iter().enumerate() {
                assert!(is_valid_channel(ch.as_bytes()), "{ch:?}");
                assert!(!up.channels[..i].contains(ch), "{ch:?} twice");
            }
            assert!(up.token.as_ref().is_none_or(|t| !t.is_empty()));
            if let Some(since) = &up.since {
                assert_eq!(Position::parse(&since.encode()).as_ref(), Ok(since));
            }
            match up.endpoint {
                Endpoint::WebSocket => {
                    let key = base64::engine::general_purpose::STANDARD.decode(&up.key);
                    assert_eq!(key.map(|k| k.len()), Ok(16), "{:?}", up.key);
                    assert_eq!(response(&accept_response(&up.key)).0, 101);
                }
                Endpoint::Poll { timeout } => assert!((1..=POLL_TIMEOUT_MAX).contains(&timeout)),
                Endpoint::Sse | Endpoint::Preflight => assert!(up.key.is_empty()),
            }
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        check(data, None);
        check(data, Some("jwt"));
    });
}
