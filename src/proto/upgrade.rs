//! The HTTP/1.1 upgrade request: parse it, decide, and render the answer.
//!
//! The same parser reads the HTTP transports of the WebSocket port: `GET /sse` and
//! `GET /poll` (channels, token and the position to resume from: `Last-Event-ID` over
//! `?since=` for SSE, and the poll's `timeout`) and their CORS preflights
//! (`OPTIONS`); see [`Endpoint`].
//!
//! [`parse_upgrade`] takes the bytes received so far and returns `Ok(None)` until the
//! request head is complete, then either an [`Upgrade`] (answer with [`accept_response`])
//! or an [`HttpReject`] whose [`HttpReject::response`] is the complete error answer.
//!
//! The `channels` query parameter is checked whole: a list naming more channels than a
//! connection may hold, or with an empty name in it (`a,,b`, `a,`), is refused with `400`
//! rather than trimmed, so a client never believes it subscribed to something it did not.
//! An empty value (`channels=`) means "no channels", so clients can render an empty list
//! without special-casing it.
//!
//! A token is taken from the first of: the `token` query parameter, an
//! `Authorization: Bearer` header, the configured cookie. Whether it is any good is not
//! decided here ([`crate::auth`] does that, before the `101`); other `Authorization`
//! schemes are ignored, so a proxy's Basic credentials do not break anonymous access.

use crate::proto::channel::{is_valid_channel, CHANNEL_RULE};
use crate::proto::position::Position;
use base64::Engine;

/// Largest request head accepted.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

const MAX_HEADERS: usize = 32;

/// Which endpoint of the WebSocket port a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /ws` with a valid WebSocket upgrade.
    WebSocket,
    /// `GET /sse`: a Server-Sent Events stream.
    Sse,
    /// `GET /poll`: one long-poll answer, held at most `timeout` seconds.
    Poll {
        /// `?timeout=`, 1..=60 (default 25).
        timeout: u32,
    },
    /// `OPTIONS /sse` or `OPTIONS /poll`: a CORS preflight.
    Preflight,
}

/// Default `timeout` of a long poll, in seconds.
pub const POLL_TIMEOUT_DEFAULT: u32 = 25;
/// Longest `timeout` of a long poll, in seconds.
pub const POLL_TIMEOUT_MAX: u32 = 60;

/// A valid request: a WebSocket upgrade, an SSE stream, a long poll or a preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// What the request is for.
    pub endpoint: Endpoint,
    /// `Sec-WebSocket-Key` as sent (empty for the HTTP transports).
    pub key: String,
    /// Channels named in the `channels` query parameter, validated.
    pub channels: Vec<String>,
    /// The token, if the request carried one (not verified here).
    pub token: Option<String>,
    /// The `Origin` header, if any (checked against `allowed_origins` by the shard).
    pub origin: Option<String>,
    /// The position to resume from (`/sse`: `Last-Event-ID`, else `?since=`; `/poll` and
    /// `/ws`: `?since=`).
    pub since: Option<Position>,
    /// Length of the request head, including the blank line.
    pub head_len: usize,
}

/// A request that gets an HTTP error instead of an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReject {
    /// HTTP status code.
    pub status: u16,
    /// One-line explanation sent as the body.
    pub reason: String,
    /// For `/sse` and `/poll`: the request's `Origin` (`Some(None)`: it had none), so the
    /// answer can carry CORS headers when the origin is allowed. `None` elsewhere.
    pub cors: Option<Option<String>>,
}

impl HttpReject {
    /// A rejection with `status` and a one-line `reason` for the body.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        HttpReject {
            status,
            reason: reason.into(),
            cors: None,
        }
    }

    /// The complete HTTP response for this rejection.
    pub fn response(&self) -> Vec<u8> {
        self.response_with("")
    }

    /// The complete HTTP response, with `headers` (CRLF-terminated lines) added.
    pub fn response_with(&self, headers: &str) -> Vec<u8> {
        let extra = match self.status {
            405 => "Allow: GET\r\n",
            401 => "WWW-Authenticate: Bearer realm=\"ringcast\"\r\n",
            426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            _ => "",
        };
        http_response(
            self.status,
            &format!("{extra}{headers}"),
            &format!("{}\n", self.reason),
        )
    }
}

/// Renders a complete `Connection: close` HTTP/1.1 response with a plain-text body.
pub fn http_response(status: u16, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra_headers}\r\n{body}",
        status_text(status),
        body.len()
    )
    .into_bytes()
}

/// The reason phrase for the status codes ringcast sends.
pub fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Parses the upgrade request at the front of `buf`, allowing at most `max_channels`
/// distinct channels in the `channels` query parameter.
///
/// `Ok(None)` means the head is not complete yet.
///
/// # Errors
/// An [`HttpReject`] describing the HTTP answer when the request cannot be upgraded.
pub fn parse_upgrade(buf: &[u8], max_channels: usize) -> Result<Option<Upgrade>, HttpReject> {
    parse_upgrade_with_cookie(buf, max_channels, None)
}

/// [`parse_upgrade`], also reading the token from the cookie named `token_cookie`.
///
/// # Errors
/// An [`HttpReject`] describing the HTTP answer when the request cannot be upgraded.
pub fn parse_upgrade_with_cookie(
    buf: &[u8],
    max_channels: usize,
    token_cookie: Option<&str>,
) -> Result<Option<Upgrade>, HttpReject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => {
            return Err(HttpReject::new(431, "request head larger than 8 KiB"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpReject::new(431, "more than 32 request headers"));
        }
        Err(e) => return Err(HttpReject::new(400, format!("malformed HTTP request: {e}"))),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let origin = header("origin").map(|o| o.trim().to_string());
    let http = matches!(path, "/sse" | "/poll");
    if http {
        let reject = |status, reason: String| HttpReject {
            cors: Some(origin.clone()),
            ..HttpReject::new(status, reason)
        };
        return match parse_http_transport(&req, path, query, max_channels, token_cookie) {
            Ok((endpoint, channels, token, since)) => Ok(Some(Upgrade {
                endpoint,
                key: String::new(),
                channels,
                token,
                origin,
                since,
                head_len,
            })),
            Err(e) => Err(reject(e.status, e.reason)),
        };
    }
    if path != "/ws" {
        return Err(HttpReject::new(
            404,
            format!("no such path: {path} (endpoints: /ws, /sse, /poll)"),
        ));
    }
    if req.method != Some("GET") {
        return Err(HttpReject::new(
            405,
            "the WebSocket endpoint accepts GET only",
        ));
    }
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(HttpReject::new(
            426,
            "expected Upgrade: websocket and Connection: Upgrade",
        ));
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HttpReject::new(
            426,
            "unsupported Sec-WebSocket-Version (only 13)",
        ));
    }
    let key = header("sec-websocket-key").map(str::trim).unwrap_or("");
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|raw| raw.len() == 16);
    if !key_ok {
        return Err(HttpReject::new(
            400,
            "missing or malformed Sec-WebSocket-Key",
        ));
    }
    let channels = parse_channels(query, max_channels)?;
    let token = request_token(&req, query, token_cookie)?;
    let since = query_since(query, &channels)?;
    Ok(Some(Upgrade {
        endpoint: Endpoint::WebSocket,
        key: key.to_string(),
        channels,
        token,
        origin,
        since,
        head_len,
    }))
}

/// The parts of a `/sse` or `/poll` request: endpoint, channels, token, position.
type HttpTransport = (Endpoint, Vec<String>, Option<String>, Option<Position>);

fn parse_http_transport(
    req: &httparse::Request<'_, '_>,
    path: &str,
    query: &str,
    max_channels: usize,
    token_cookie: Option<&str>,
) -> Result<HttpTransport, HttpReject> {
    match req.method {
        Some("OPTIONS") => return Ok((Endpoint::Preflight, Vec::new(), None, None)),
        Some("GET") => {}
        _ => {
            return Err(HttpReject::new(
                405,
                format!("{path} accepts GET only (and OPTIONS for CORS preflights)"),
            ))
        }
    }
    let channels = parse_channels(query, max_channels)?;
    let token = request_token(req, query, token_cookie)?;
    let last_event_id = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("last-event-id"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .map(|v| v.trim().to_string())
                .map_err(|_| HttpReject::new(400, "Last-Event-ID is not UTF-8"))
        })
        .transpose()?;
    let since = match (path, last_event_id) {
        // An EventSource resends Last-Event-ID on its own reconnects with the original
        // URL, whose `since` is older.
        ("/sse", Some(id)) => Some(parse_position(&id, &channels)?),
        _ => query_since(query, &channels)?,
    };
    let endpoint = if path == "/sse" {
        Endpoint::Sse
    } else {
        let timeout = match query_param(query, "timeout") {
            None => POLL_TIMEOUT_DEFAULT,
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|t| (1..=POLL_TIMEOUT_MAX).contains(t))
                .ok_or_else(|| {
                    HttpReject::new(
                        400,
                        format!(
                            "timeout must be a whole number of seconds from 1 to {POLL_TIMEOUT_MAX}, got {raw:?}"
                        ),
                    )
                })?,
        };
        Endpoint::Poll { timeout }
    };
    Ok((endpoint, channels, token, since))
}

/// The `since` query parameter (percent-decoded), as a position token of a request for
/// `channels`.
fn query_since(query: &str, channels: &[String]) -> Result<Option<Position>, HttpReject> {
    query_param(query, "since")
        .map(|raw| {
            percent_decode(raw)
                .ok_or_else(|| HttpReject::new(400, "malformed percent-encoding in since"))
                .and_then(|text| parse_position(&text, channels))
        })
        .transpose()
}

/// A position token of either form (full, or the compact form of SSE ids) for a request
/// naming `channels`.
fn parse_position(text: &str, channels: &[String]) -> Result<Position, HttpReject> {
    Position::parse_for(text, channels)
        .map_err(|e| HttpReject::new(400, format!("bad position: {e}")))
}

/// The token from the query, the `Authorization: Bearer` header or the cookie, in that
/// order; an empty one counts as none.
fn request_token(
    req: &httparse::Request<'_, '_>,
    query: &str,
    token_cookie: Option<&str>,
) -> Result<Option<String>, HttpReject> {
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let bearer = header("authorization").and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let cookie = || {
        let name = token_cookie?;
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.trim_matches('"'))
    };
    let token = match query_param(query, "token") {
        Some(raw) => Some(
            percent_decode(raw)
                .ok_or_else(|| HttpReject::new(400, "malformed percent-encoding in token"))?,
        ),
        None => bearer.or_else(cookie).map(str::to_string),
    }
    .filter(|t| !t.is_empty());
    Ok(token)
}

/// The raw (still percent-encoded) value of the first `name=` query parameter.
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn parse_channels(query: &str, max_channels: usize) -> Result<Vec<String>, HttpReject> {
    let mut out: Vec<String> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "channels" {
            continue;
        }
        let value = percent_decode(value)
            .ok_or_else(|| HttpReject::new(400, "malformed percent-encoding in channels"))?;
        if value.is_empty() {
            // `channels=`: an explicitly empty list.
            continue;
        }
        for ch in value.split(',') {
            if ch.is_empty() {
                return Err(HttpReject::new(
                    400,
                    "empty channel name in channels (check for `,,` or a trailing comma)",
                ));
            }
            if !is_valid_channel(ch.as_bytes()) {
                return Err(HttpReject::new(
                    400,
                    format!("invalid channel name {ch:?}: {CHANNEL_RULE}"),
                ));
            }
            if out.iter().any(|c| c == ch) {
                continue;
            }
            if out.len() == max_channels {
                return Err(HttpReject::new(
                    400,
                    format!("more than {max_channels} channels in one connection"),
                ));
            }
            out.push(ch.to_string());
        }
    }
    Ok(out)
}

/// Decodes `%XX` escapes; `None` for a broken escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `101 Switching Protocols` answer for `key`.
pub fn accept_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "GET /ws?channels=news,room%3A42 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                        Sec-WebSocket-Version: 13\r\n\r\n";

    /// The limit used by tests that are not about the limit.
    const MAX: usize = 64;

    fn parse(req: &str) -> Result<Option<Upgrade>, HttpReject> {
        parse_upgrade(req.as_bytes(), MAX)
    }

    fn with_channels(value: &str) -> String {
        GOOD.replace("channels=news,room%3A42", &format!("channels={value}"))
    }

    #[test]
    fn parses_a_browser_request() {
        let up = parse(GOOD).unwrap().unwrap();
        assert_eq!(up.channels, vec!["news", "room:42"]);
        assert_eq!(up.head_len, GOOD.len());
        let resp = String::from_utf8(accept_response(&up.key)).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn partial_head_needs_more() {
        for cut in 0..GOOD.len() - 1 {
            assert_eq!(
                parse_upgrade(&GOOD.as_bytes()[..cut], MAX),
                Ok(None),
                "cut {cut}"
            );
        }
    }

    fn status_of(req: &str) -> u16 {
        parse(req).unwrap_err().status
    }

    #[test]
    fn more_channels_than_the_limit_are_refused_not_trimmed() {
        // Regression: extras past max_subscriptions_per_connection used to be dropped
        // silently after the upgrade.
        let three = with_channels("a,b,c");
        assert_eq!(
            parse_upgrade(three.as_bytes(), 3)
                .unwrap()
                .unwrap()
                .channels,
            ["a", "b", "c"]
        );
        let reject = parse_upgrade(three.as_bytes(), 2).unwrap_err();
        assert_eq!(reject.status, 400);
        assert!(reject.reason.contains("more than 2 channels"), "{reject:?}");
        // Repeats name one channel and the limit counts channels, not mentions.
        let repeated = with_channels("a,b,a&channels=b");
        assert_eq!(
            parse_upgrade(repeated.as_bytes(), 2)
                .unwrap()
                .unwrap()
                .channels,
            ["a", "b"]
        );
    }

    #[test]
    fn empty_channel_names_are_refused() {
        for value in ["news,,x", "news,", ",news", ","] {
            let reject = parse(&with_channels(value)).unwrap_err();
            assert_eq!(reject.status, 400, "{value}");
            assert!(
                reject.reason.contains("empty channel name"),
                "{value}: {reject:?}"
            );
        }
    }

    #[test]
    fn an_empty_channels_value_means_no_channels() {
        let up = parse(&with_channels("")).unwrap().unwrap();
        assert!(up.channels.is_empty());
        let none = GOOD.replace("?channels=news,room%3A42", "");
        assert!(parse(&none).unwrap().unwrap().channels.is_empty());
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        assert_eq!(status_of(&GOOD.replace("/ws?", "/nope?")), 404);
        assert_eq!(status_of(&GOOD.replace("GET", "POST")), 405);
        assert_eq!(status_of(&GOOD.replace("Upgrade: websocket\r\n", "")), 426);
        assert_eq!(status_of(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(
            status_of(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")),
            400
        );
        assert_eq!(status_of(&GOOD.replace("news", "bad name")), 400);
        assert_eq!(status_of("\x16\x03\x01garbage\r\n\r\n"), 400);
        let huge = format!(
            "GET /ws HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_REQUEST_HEAD)
        );
        assert_eq!(status_of(&huge), 431);
    }

    #[test]
    fn the_token_comes_from_query_header_or_cookie_in_that_order() {
        let token_of = |req: &str, cookie: Option<&str>| {
            parse_upgrade_with_cookie(req.as_bytes(), MAX, cookie)
                .unwrap()
                .unwrap()
                .token
        };
        let query = GOOD.replace("channels=news", "token=a%2Eb.c&channels=news");
        assert_eq!(token_of(&query, None).as_deref(), Some("a.b.c"));
        let header = GOOD.replace(
            "Host: x\r\n",
            "Host: x\r\nAuthorization: Bearer  h.h.h \r\n",
        );
        assert_eq!(token_of(&header, None).as_deref(), Some("h.h.h"));
        let both = query.replace("Host: x\r\n", "Host: x\r\nAuthorization: Bearer h.h.h\r\n");
        assert_eq!(token_of(&both, None).as_deref(), Some("a.b.c"));
        let basic = GOOD.replace(
            "Host: x\r\n",
            "Host: x\r\nAuthorization: Basic dXNlcg==\r\n",
        );
        assert_eq!(token_of(&basic, None), None);
        let cookie = GOOD.replace(
            "Host: x\r\n",
            "Host: x\r\nCookie: a=1; rc_token=\"c.c.c\"; b=2\r\n",
        );
        assert_eq!(
            token_of(&cookie, Some("rc_token")).as_deref(),
            Some("c.c.c")
        );
        assert_eq!(token_of(&cookie, Some("other")), None);
        assert_eq!(token_of(&cookie, None), None);
        assert_eq!(
            token_of(&GOOD.replace("channels=news", "token=&channels=news"), None),
            None
        );
        assert_eq!(
            status_of(&GOOD.replace("channels=news", "token=%zz&channels=news")),
            400
        );
    }

    #[test]
    fn unauthorized_answers_say_bearer() {
        let text = String::from_utf8(HttpReject::new(401, "token expired").response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("WWW-Authenticate: Bearer"), "{text}");
        assert!(text.ends_with("\r\n\r\ntoken expired\n"), "{text}");
    }

    #[test]
    fn rejections_render_complete_responses() {
        let text = String::from_utf8(HttpReject::new(405, "GET only").response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Allow: GET\r\n"));
        assert!(text.ends_with("\r\n\r\nGET only\n"));
    }

    fn http(method: &str, target: &str, headers: &str) -> Result<Option<Upgrade>, HttpReject> {
        let req = format!("{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        parse_upgrade_with_cookie(req.as_bytes(), MAX, Some("jwt"))
    }

    #[test]
    fn sse_requests_take_last_event_id_over_since() {
        let up = http(
            "GET",
            "/sse?channels=news,b&since=news~1~2",
            "Origin: https://a.test\r\nLast-Event-ID: news~7~2,b~3~4\r\nCookie: jwt=t.t.t\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(up.endpoint, Endpoint::Sse);
        assert_eq!(up.channels, ["news", "b"]);
        assert_eq!(up.origin.as_deref(), Some("https://a.test"));
        assert_eq!(up.token.as_deref(), Some("t.t.t"));
        assert_eq!(up.since.unwrap().encode(), "news~7~2,b~3~4");
        // An SSE id (compact) is read against the request's channels.
        let compact = Position::parse("b~3~4,news~7~2").unwrap().encode_compact();
        let up = http(
            "GET",
            "/sse?channels=news,b",
            &format!("Last-Event-ID: {compact}\r\n"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(up.since.unwrap().encode(), "b~3~4,news~7~2");
        let up = http("GET", "/sse?channels=news&since=news~1~2", "")
            .unwrap()
            .unwrap();
        assert_eq!(up.since.unwrap().encode(), "news~1~2");
        let up = http("GET", "/sse?channels=news&since=news%7E1%7E2", "")
            .unwrap()
            .unwrap();
        assert_eq!(up.since.unwrap().encode(), "news~1~2");
        assert_eq!(
            http("GET", "/sse?channels=a", "").unwrap().unwrap().since,
            None
        );
    }

    #[test]
    fn poll_requests_check_their_timeout_and_position() {
        let poll = |q: &str| http("GET", &format!("/poll?channels=a{q}"), "");
        assert_eq!(
            poll("").unwrap().unwrap().endpoint,
            Endpoint::Poll { timeout: 25 }
        );
        assert_eq!(
            poll("&timeout=60").unwrap().unwrap().endpoint,
            Endpoint::Poll { timeout: 60 }
        );
        for bad in ["0", "61", "-1", "x", "", "1.5"] {
            let reject = poll(&format!("&timeout={bad}")).unwrap_err();
            assert_eq!(reject.status, 400, "{bad}");
            assert!(reject.reason.contains("timeout"), "{reject:?}");
        }
        let reject = poll("&since=a~1").unwrap_err();
        assert_eq!((reject.status, reject.cors.clone()), (400, Some(None)));
        assert!(reject.reason.contains("bad position"), "{reject:?}");
        // A poll does not read Last-Event-ID.
        let up = http("GET", "/poll?channels=a", "Last-Event-ID: junk\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(up.since, None);
    }

    #[test]
    fn http_transports_answer_preflights_and_refuse_other_methods() {
        let pre = http("OPTIONS", "/sse?channels=a", "Origin: https://a.test\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(pre.endpoint, Endpoint::Preflight);
        let reject = http("POST", "/poll", "Origin: https://a.test\r\n").unwrap_err();
        assert_eq!(reject.status, 405);
        assert_eq!(reject.cors, Some(Some("https://a.test".into())));
        let reject = http("GET", "/sse?channels=bad%20name", "").unwrap_err();
        assert_eq!(reject.status, 400);
        // The WebSocket endpoint is unchanged: no upgrade headers, no stream.
        assert_eq!(http("GET", "/ws?channels=a", "").unwrap_err().status, 426);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse_upgrade(&data, MAX);
        }

        #[test]
        fn arbitrary_http_transport_queries_never_panic(
            path in "/(sse|poll)", q in "[ -~]{0,200}", id in "[ -~]{0,80}",
        ) {
            let _ = http("GET", &format!("{path}?{q}"), &format!("Last-Event-ID: {id}\r\n"));
        }

        #[test]
        fn arbitrary_query_never_panics(q in "[ -~]{0,200}") {
            let _ = parse(&GOOD.replace("channels=news,room%3A42", &q));
        }

        #[test]
        fn accepted_channel_lists_respect_the_limit(
            names in proptest::collection::vec("[a-e]{1,2}", 0..12),
            limit in 1usize..6,
        ) {
            let req = with_channels(&names.join(","));
            let mut distinct = names.clone();
            distinct.sort();
            distinct.dedup();
            match parse_upgrade(req.as_bytes(), limit) {
                Ok(Some(up)) => {
                    prop_assert!(distinct.len() <= limit);
                    prop_assert_eq!(up.channels.len(), distinct.len());
                }
                Ok(None) => prop_assert!(false, "complete request reported partial"),
                Err(reject) => {
                    prop_assert_eq!(reject.status, 400);
                    prop_assert!(distinct.len() > limit);
                }
            }
        }
    }
}
