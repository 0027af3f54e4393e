//! The admin HTTP port: `/metrics`, `/healthz`, `/readyz`, `POST /publish` and
//! `POST /admin/disconnect?user=ID` (closes every connection of a user on every shard
//! with 4403, through [`crate::shard::control`]).
//!
//! A deliberately small HTTP/1.1 server on shard 0: scrapes and publishes are rare next
//! to WebSocket traffic, and keeping it on one shard keeps it out of every other shard's
//! way. Connections are kept alive (HTTP/1.1 unless `Connection: close`; HTTP/1.0 with
//! `Connection: keep-alive`), up to 1000 requests, so a publisher or scraper need not
//! connect per request; requests are answered in order. The read-only endpoints
//! (`/metrics`, `/healthz`, `/readyz`) answer `HEAD` too. With `ingest_key` set, the
//! endpoints that change something (`POST /publish`, `POST /admin/disconnect`) need it as
//! a Bearer token, the read-only ones never do; it is checked as soon as the request head
//! is read, so an unauthorized body is never waited for.
//!
//! Bounds: each request must be whole within `admin_request_timeout` of when the server
//! starts waiting for it (accept, or the previous answer written), and its answer written
//! within as long again: a connection that sent nothing of a next request is closed
//! quietly, a half-sent request is answered `408`. At most `max_admin_connections` are
//! open; past it a new one is answered `503` at once. Errors are JSON `{"error":...}`.
//!
//! `POST /publish?channel=user:<id>` with the inbox on goes through the store thread:
//! with `&ack=1` the answer (200 with the offset) comes only after the message is
//! committed to disk, or 503 with the reason; without it, 202 as soon as it is queued.
//! On a cluster node other channels go through the NATS thread: `&ack=1` is answered 200
//! only once JetStream stored the message (503 `cluster: ...` while it cannot); without
//! it, NATS unreachable for 2 s gives 200 with a local-epoch offset (docs/cluster.md).

use crate::cluster::ClusterStats;
use crate::config::Settings;
use crate::fanout::publisher::channels_full;
use crate::inbox::{Inbox, InboxReply};
use crate::ingest::key::{bearer, IngestKey};
use crate::ingest::line::validate_payload;
use crate::ingest::route::{Routes, Target};
use crate::metrics::{AdminRefusal, Metrics, ShardMetrics, Source};
use crate::proto::channel::{is_valid_channel, CHANNEL_RULE};
use crate::proto::upgrade::{percent_decode, status_text, MAX_REQUEST_HEAD};
use crate::shard::admission::{ConnectionSlots, RETRY_AFTER_SECS};
use crate::shard::control::ShardControl;
use crate::shard::lifecycle::Lifecycle;
use crate::shard::listener::{accept_allowed, linger_close, PortCap, PortSlot};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long `POST /admin/disconnect` waits for every shard to report.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the input of a request that could not be read is discarded before the close.
const ERROR_LINGER: Duration = Duration::from_secs(1);

/// What the admin port answers from: the handles of the shard that serves it.
pub struct AdminPort {
    /// Where `POST /publish` sends a message.
    pub routes: Routes,
    /// The settings of the start.
    pub settings: Arc<Settings>,
    /// The serving shard's counters.
    pub metrics: &'static ShardMetrics,
    /// Every counter of the process (`/metrics`).
    pub all_metrics: &'static Metrics,
    /// Requests to every shard (`/admin/disconnect`).
    pub control: Rc<ShardControl>,
    /// Serving, stopping or draining (`/readyz`).
    pub lifecycle: Arc<Lifecycle>,
}

/// Accepts admin connections forever.
pub async fn serve(listener: TcpListener, port: AdminPort) {
    let port = Rc::new(port);
    let (settings, metrics) = (port.settings.clone(), port.metrics);
    let mut full = json_error(
        503,
        "too many admin connections (max_admin_connections are open); retry later",
    );
    full.headers = format!("Retry-After: {RETRY_AFTER_SECS}\r\n");
    let cap = PortCap {
        // Only shard 0 serves the admin port: a count of its own.
        slots: ConnectionSlots::new(settings.live.max_admin_connections),
        limit: |live| live.max_admin_connections,
        refusal: encode(&full, false, false),
        refused: &metrics.admin_refused[AdminRefusal::MaxConnections as usize],
        open: &metrics.admin_connections,
        setting: "max_admin_connections",
    };
    accept_allowed(listener, "admin", &settings, cap, |stream, slot| {
        handle(stream, slot, port.clone())
    })
    .await
}

struct Response {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, each ending in `\r\n`.
    headers: String,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        headers: String::new(),
        body: body.into(),
    }
}

fn json(status: u16, body: String) -> Response {
    Response {
        status,
        content_type: "application/json",
        headers: String::new(),
        body,
    }
}

/// One request as read: method, target, the `Authorization` header and the body.
struct Request {
    method: String,
    target: String,
    authorization: Option<Vec<u8>>,
    /// Whether the connection stays open after the answer.
    keep_alive: bool,
    body: Vec<u8>,
}

/// Whether `method path` changes something, so needs `ingest_key` when it is set.
fn needs_key(method: &str, target: &str) -> bool {
    let path = target.split('?').next().unwrap_or("");
    method == "POST" && (path == "/publish" || path == "/admin/disconnect")
}

/// True when `key` is set and `authorization` does not carry it as a Bearer token.
fn key_refuses(key: Option<&IngestKey>, authorization: Option<&[u8]>) -> bool {
    key.is_some_and(|key| {
        !authorization
            .and_then(bearer)
            .is_some_and(|given| key.matches(given))
    })
}

/// The 401 for a missing or wrong key (counted by the caller).
fn unauthorized_response() -> Response {
    let mut response = json_error(
        401,
        "unauthorized: send the ingest key as Authorization: Bearer <ingest_key>",
    );
    response.headers = "WWW-Authenticate: Bearer realm=\"ringcast ingest\"\r\n".into();
    response
}

/// `None` when `ingest_key` is unset or the request's `Authorization: Bearer` carries
/// it; otherwise the 401 to answer (the key in force now, after any reload).
fn unauthorized(request: &Request) -> Option<Response> {
    let key = crate::live::current().and_then(|l| l.ingest_key.clone());
    key_refuses(key.as_ref(), request.authorization.as_deref()).then(unauthorized_response)
}

/// What a connection gets when `admin_request_timeout` passes before its request is
/// whole (sans-io): nothing when none of a request came (an idle kept-alive connection
/// is closed quietly), else a 408.
fn on_request_timeout(buffered: &[u8], timeout: Duration) -> Option<Response> {
    if buffered.is_empty() {
        return None;
    }
    Some(json_error(
        408,
        &format!(
            "request not received whole within admin_request_timeout ({} s)",
            timeout.as_secs()
        ),
    ))
}

/// The bytes of `response`: status line, headers, and the body unless `head_only`.
fn encode(response: &Response, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: {}\r\n\r\n",
        response.status,
        status_text(response.status),
        response.content_type,
        response.body.len(),
        response.headers,
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    out
}

fn json_error(status: u16, error: &str) -> Response {
    json(
        status,
        format!(
            "{{\"error\":{}}}\n",
            serde_json::Value::String(error.to_string())
        ),
    )
}

/// Most requests served on one kept-alive connection before it is closed.
const MAX_REQUESTS_PER_CONNECTION: usize = 1000;

async fn handle(mut stream: TcpStream, _slot: PortSlot, port: Rc<AdminPort>) {
    let settings = &port.settings;
    let timeout = settings.admin_request_timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 16 * 1024];
    for served in 1..=MAX_REQUESTS_PER_CONNECTION {
        // The key in force now, after any reload.
        let key = crate::live::current().and_then(|l| l.ingest_key.clone());
        let read = async {
            let max_body = settings.max_message_size;
            Some(read_request(&mut stream, &mut buf, &mut chunk, max_body, key.as_ref()).await)
        };
        let deadline = async {
            glommio::timer::sleep(timeout).await;
            None
        };
        // `unframed`: the request could not be read whole, its rest may still come.
        let (response, keep_alive, head_only, unframed) =
            match futures_lite::future::or(read, deadline).await {
                None => match on_request_timeout(&buf, timeout) {
                    None => break,
                    Some(response) => {
                        port.metrics.admin_refused[AdminRefusal::RequestTimeout as usize]
                            .fetch_add(1, Ordering::Relaxed);
                        (response, false, false, true)
                    }
                },
                // The peer closed between requests.
                Some(Ok(None)) => break,
                Some(Ok(Some(req))) => {
                    let keep_alive = req.keep_alive && served < MAX_REQUESTS_PER_CONNECTION;
                    let head_only = req.method == "HEAD";
                    let response = answer(req, &port).await;
                    (response, keep_alive, head_only, false)
                }
                // A request that could not be read leaves the stream unframed: close.
                Some(Err(response)) => {
                    if response.status == 401 {
                        port.all_metrics.ingest_unauthorized[1].fetch_add(1, Ordering::Relaxed);
                    }
                    (response, false, false, true)
                }
            };
        let out = encode(&response, keep_alive, head_only);
        let written =
            futures_lite::future::or(async { stream.write_all(&out).await.is_ok() }, async {
                glommio::timer::sleep(timeout).await;
                false
            })
            .await;
        if written && unframed {
            linger_close(&mut stream, ERROR_LINGER).await;
        }
        if !written || !keep_alive {
            break;
        }
    }
    let _ = stream.close().await;
}

/// Routes one request to its answer.
async fn answer(req: Request, port: &AdminPort) -> Response {
    let AdminPort {
        routes,
        settings,
        metrics,
        all_metrics,
        control,
        ..
    } = port;
    let unauthorized = |req: &Request| {
        let refused = unauthorized(req);
        if refused.is_some() {
            all_metrics.ingest_unauthorized[1].fetch_add(1, Ordering::Relaxed);
        }
        refused
    };
    let path = req.target.split('?').next().unwrap_or("");
    if path == "/admin/disconnect" {
        return match unauthorized(&req) {
            Some(refused) if req.method == "POST" => refused,
            _ => disconnect(&req.method, &req.target, control).await,
        };
    }
    if req.method == "POST" && path == "/publish" {
        return match unauthorized(&req) {
            Some(refused) => refused,
            None => {
                let query = req.target.split_once('?').map_or("", |(_, q)| q);
                publish(query, &req.body, routes, settings, metrics).await
            }
        };
    }
    route(&req.method, &req.target, port)
}

/// Reads one request (method, target, `Authorization`, a Content-Length body) from
/// `stream`, starting with what `buf` kept from the previous read; leaves in `buf` what
/// follows it (a pipelined next request). `Ok(None)`: the peer closed before sending a
/// byte of a new request. A request that needs `key` and does not carry it is answered
/// 401 once its head is read, without waiting for its body.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    max_body: usize,
    key: Option<&IngestKey>,
) -> Result<Option<Request>, Response> {
    loop {
        if !buf.is_empty() {
            match parse_request(buf, max_body, key)? {
                Parsed::Complete(req) => return Ok(Some(req)),
                Parsed::Unauthorized => return Err(unauthorized_response()),
                Parsed::NeedMore => {}
            }
        }
        let n = match stream.read(chunk).await {
            Ok(n) => n,
            Err(_) if buf.is_empty() => return Ok(None),
            Err(_) => return Err(text(400, "incomplete request\n")),
        };
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(text(400, "incomplete request\n"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Parsed {
    Complete(Request),
    NeedMore,
    /// The head is whole, the request needs the ingest key and does not carry it, and its
    /// body has not all arrived: answer 401 without buffering it.
    Unauthorized,
}

/// Parses one request from the start of `buf` (sans-io); on success removes it from
/// `buf`, leaving what follows. `key`: the ingest key, when set.
fn parse_request(
    buf: &mut Vec<u8>,
    max_body: usize,
    key: Option<&IngestKey>,
) -> Result<Parsed, Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => {
            return Ok(Parsed::NeedMore)
        }
        Ok(httparse::Status::Partial) => return Err(text(431, "request head too large\n")),
        Err(e) => return Err(text(400, format!("malformed HTTP request: {e}\n"))),
    };
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("/").to_string();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let authorization = header("authorization").map(<[u8]>::to_vec);
    // HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked.
    let connection = header("connection").map(|v| v.to_ascii_lowercase());
    let has = |token: &[u8]| {
        connection
            .as_deref()
            .is_some_and(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii() == token))
    };
    let keep_alive = if req.version == Some(1) {
        !has(b"close")
    } else {
        has(b"keep-alive")
    };
    if header("transfer-encoding").is_some() {
        return Err(json_error(
            411,
            "chunked bodies are not supported: send Content-Length",
        ));
    }
    let length = content_length(req.headers)?;
    if length > max_body {
        return Err(json_error(
            413,
            &format!("body of {length} bytes exceeds the {max_body}-byte limit"),
        ));
    }
    if buf.len() < head_len + length {
        // A whole body is answered 401 in order (the connection stays framed); one still
        // coming is not waited for.
        if needs_key(&method, &target) && key_refuses(key, authorization.as_deref()) {
            return Ok(Parsed::Unauthorized);
        }
        return Ok(Parsed::NeedMore);
    }
    let body = buf[head_len..head_len + length].to_vec();
    buf.drain(..head_len + length);
    Ok(Parsed::Complete(Request {
        method,
        target,
        authorization,
        keep_alive,
        body,
    }))
}

/// The body length a request declares: none is 0. Strict, as RFC 9112 6.3 asks of a
/// server: only digits (no sign, no list), and one value, since two that differ mean a
/// proxy and this server could split the stream differently (request smuggling).
fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, Response> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value.trim_ascii());
    let Some(first) = values.next() else {
        return Ok(0);
    };
    if values.next().is_some() {
        return Err(json_error(400, "more than one Content-Length header"));
    }
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return Err(json_error(400, "malformed Content-Length: digits only"));
    }
    std::str::from_utf8(first)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| json_error(400, "malformed Content-Length: too large"))
}

/// [`parse_request`] for the fuzz targets (`fuzz/`), not an API: `Ok(Some(body length))`
/// for a whole request (removed from `buf`), `Ok(None)` when more bytes are needed,
/// `Err(status)` for the error answer.
#[doc(hidden)]
pub fn fuzz_parse_request(buf: &mut Vec<u8>, max_body: usize) -> Result<Option<usize>, u16> {
    match parse_request(buf, max_body, None) {
        Ok(Parsed::Complete(request)) => Ok(Some(request.body.len())),
        Ok(Parsed::NeedMore) => Ok(None),
        // Only with an ingest key, which the fuzz target does not give.
        Ok(Parsed::Unauthorized) => Err(401),
        Err(response) => Err(response.status),
    }
}

fn route(method: &str, target: &str, port: &AdminPort) -> Response {
    let (settings, lifecycle, all_metrics) = (&port.settings, &port.lifecycle, port.all_metrics);
    let cluster = port.routes.cluster.as_deref();
    let cluster_stats = cluster.map(|c| &**c.stats());
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let draining = lifecycle.shutting_down();
    // HEAD answers what GET would, without the body (written by the caller).
    let method = if method == "HEAD" { "GET" } else { method };
    match (method, path) {
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            headers: String::new(),
            body: all_metrics.render(draining, cluster),
        },
        ("GET", "/healthz") => text(200, "ok\n"),
        ("GET", "/readyz") if draining => text(503, "draining\n"),
        ("GET", "/readyz") if lifecycle.shards_ready() < settings.shards => text(503, "starting\n"),
        ("GET", "/readyz") if cluster_stats.is_some_and(ClusterStats::is_not_ready) => {
            // Connected, but the stream cannot be used: cluster publishes are refused
            // (never served locally); subscribers keep what they have.
            text(
                200,
                "ready (cluster not ready: connected to NATS, JetStream stream not usable; publishes refused)\n",
            )
        }
        ("GET", "/readyz") if cluster_stats.is_some_and(ClusterStats::is_down) => {
            // Still serving local clients and publishes: only cross-node delivery is down.
            text(
                200,
                "ready (cluster down: NATS unreachable, cross-node delivery stopped)\n",
            )
        }
        ("GET", "/readyz") => text(200, "ready\n"),
        (_, "/metrics" | "/healthz" | "/readyz" | "/publish") => text(405, "method not allowed\n"),
        _ => text(
            404,
            "not found: try /metrics, /healthz, /readyz, POST /publish or POST /admin/disconnect\n",
        ),
    }
}

/// `POST /admin/disconnect?user=ID`: closes every connection of the user on every shard
/// with 4403; answers how many were closed.
async fn disconnect(method: &str, target: &str, control: &ShardControl) -> Response {
    if method != "POST" {
        return text(405, "method not allowed: POST /admin/disconnect?user=ID\n");
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let user = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "user")
        .and_then(|(_, v)| percent_decode(v))
        .filter(|u| !u.is_empty());
    let Some(user) = user else {
        return json_error(
            400,
            "missing query parameter user (POST /admin/disconnect?user=<id>, percent-encoded)",
        );
    };
    let (closed, unreached) = control.disconnect_user(&user, DISCONNECT_TIMEOUT).await;
    let user_json = serde_json::Value::String(user).to_string();
    if unreached > 0 {
        return json(
            503,
            format!(
                "{{\"user\":{user_json},\"closed\":{closed},\"error\":\"{unreached} shard(s) did not answer in time; retry\"}}\n"
            ),
        );
    }
    json(
        200,
        format!("{{\"user\":{user_json},\"closed\":{closed}}}\n"),
    )
}

async fn publish(
    query: &str,
    body: &[u8],
    routes: &Routes,
    settings: &Settings,
    metrics: &ShardMetrics,
) -> Response {
    let source = Source::Http as usize;
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| percent_decode(v))
    };
    let ack = match param("ack").as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return json_error(
                400,
                &format!("ack must be 1 or 0 (or true/false), got {other:?}"),
            )
        }
    };
    let channel = param("channel");
    let Some(channel) = channel else {
        metrics.ingest_rejected[source][1].fetch_add(1, Ordering::Relaxed);
        return json_error(
            400,
            "missing query parameter channel (POST /publish?channel=<name>)",
        );
    };
    if !is_valid_channel(channel.as_bytes()) {
        metrics.ingest_rejected[source][1].fetch_add(1, Ordering::Relaxed);
        return json_error(
            400,
            &format!("invalid channel name {channel:?}: {CHANNEL_RULE}"),
        );
    }
    if let Err(e) = validate_payload(body, settings.max_message_size) {
        metrics.ingest_rejected[source][e.index()].fetch_add(1, Ordering::Relaxed);
        return json_error(400, &e.to_string());
    }
    if !routes
        .publisher
        .has_room_for(&channel, settings.max_channels)
    {
        metrics.channels_refused.fetch_add(1, Ordering::Relaxed);
        return json_error(503, &channels_full(settings.max_channels));
    }
    let cluster = match routes.target(&channel) {
        Target::Inbox(inbox) => return publish_to_inbox(inbox, &channel, body, ack, metrics).await,
        Target::Cluster(cluster) => cluster,
        Target::Local(publisher) => {
            let published = publisher.publish(&channel, body);
            metrics.messages_in[source].fetch_add(1, Ordering::Relaxed);
            return json(
                200,
                format!(
                    "{{\"channel\":\"{channel}\",\"offset\":{}}}\n",
                    published.offset
                ),
            );
        }
    };
    // Through the NATS thread: the offset is the cluster's, answered once stored;
    // without `ack=1`, a local-epoch offset while NATS is unreachable.
    let (tx, rx) = flume::bounded(1);
    let reply = if ack {
        crate::cluster::ClusterReply::Stored(tx)
    } else {
        crate::cluster::ClusterReply::Wait(tx)
    };
    if let Err(e) = cluster.publish(&channel, body, reply) {
        return json_error(503, e);
    }
    metrics.messages_in[source].fetch_add(1, Ordering::Relaxed);
    match rx.recv_async().await {
        Ok(Ok(offset)) => json(
            200,
            format!("{{\"channel\":\"{channel}\",\"offset\":{offset}}}\n"),
        ),
        Ok(Err(e)) => json_error(503, &e),
        Err(_) => json_error(503, "cluster: the NATS thread stopped"),
    }
}

/// `POST /publish` to a `user:` channel with the inbox on: stored before it is answered
/// (`ack=1`: with its offset once committed).
async fn publish_to_inbox(
    inbox: &Inbox,
    channel: &str,
    body: &[u8],
    ack: bool,
    metrics: &ShardMetrics,
) -> Response {
    let (tx, rx) = flume::bounded(1);
    let reply = if ack {
        InboxReply::Wait(tx)
    } else {
        InboxReply::None
    };
    if let Err(e) = inbox.publish(channel, body, reply) {
        return json_error(503, &format!("inbox: {}", e.to_store_error()));
    }
    metrics.messages_in[Source::Http as usize].fetch_add(1, Ordering::Relaxed);
    if !ack {
        return json(
            202,
            format!("{{\"channel\":\"{channel}\",\"queued\":true}}\n"),
        );
    }
    match rx.recv_async().await {
        Ok(Ok(offset)) => json(
            200,
            format!("{{\"channel\":\"{channel}\",\"offset\":{offset},\"durable\":true}}\n"),
        ),
        Ok(Err(e)) => json_error(503, &format!("inbox: {e}")),
        Err(_) => json_error(503, "inbox: the store thread stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(bytes: &[u8]) -> Result<Parsed, Response> {
        parse_request(&mut bytes.to_vec(), 1024, None)
    }

    #[test]
    fn pipelined_requests_are_split_and_keep_alive_follows_the_version() {
        let mut buf = b"POST /publish?channel=a HTTP/1.1\r\nContent-Length: 2\r\nAuthorization: Bearer k\r\n\r\n{}GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\nHEAD /".to_vec();
        let Ok(Parsed::Complete(first)) = parse_request(&mut buf, 1024, None) else {
            panic!("first request")
        };
        assert_eq!(
            (first.method.as_str(), first.body.as_slice()),
            ("POST", &b"{}"[..])
        );
        assert!(first.keep_alive);
        assert_eq!(first.authorization.as_deref(), Some(&b"Bearer k"[..]));
        let Ok(Parsed::Complete(second)) = parse_request(&mut buf, 1024, None) else {
            panic!("second request")
        };
        assert_eq!(second.target, "/healthz");
        assert!(!second.keep_alive);
        assert!(matches!(
            parse_request(&mut buf, 1024, None),
            Ok(Parsed::NeedMore)
        ));
        assert_eq!(buf, b"HEAD /");
        let Ok(Parsed::Complete(old)) = parse(b"GET / HTTP/1.0\r\n\r\n") else {
            panic!("1.0")
        };
        assert!(!old.keep_alive);
        let Ok(Parsed::Complete(old)) = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        else {
            panic!("1.0 keep-alive")
        };
        assert!(old.keep_alive);
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"),
            Err(Response { status: 413, .. })
        ));
    }

    /// Regression: two different `Content-Length` headers were accepted (the first won)
    /// and `+2` parsed as 2; RFC 9112 asks for 400 on both.
    #[test]
    fn content_length_is_strict() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: -0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: 0x2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head.as_bytes()), Err(Response { status: 400, .. })),
                "{head:?}"
            );
        }
        let Ok(Parsed::Complete(req)) = parse(b"POST / HTTP/1.1\r\nContent-Length:  2 \r\n\r\n{}")
        else {
            panic!("whitespace around the value is allowed")
        };
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn an_unauthorized_body_is_not_waited_for() {
        let key = IngestKey::new("admin-key-0123456789abcdef").unwrap();
        let head = "POST /publish?channel=a HTTP/1.1\r\nContent-Length: 60000\r\n\r\n";
        let mut buf = format!("{head}xx").into_bytes();
        assert!(matches!(
            parse_request(&mut buf, 65536, Some(&key)),
            Ok(Parsed::Unauthorized)
        ));
        let with_key = "POST /publish?channel=a HTTP/1.1\r\nAuthorization: Bearer admin-key-0123456789abcdef\r\nContent-Length: 60000\r\n\r\nxx";
        assert!(matches!(
            parse_request(&mut with_key.as_bytes().to_vec(), 65536, Some(&key)),
            Ok(Parsed::NeedMore)
        ));
        // Reads and a whole (small) body are left to the router, on a framed connection.
        let scrape = "GET /metrics HTTP/1.1\r\n\r\n";
        assert!(matches!(
            parse_request(&mut scrape.as_bytes().to_vec(), 65536, Some(&key)),
            Ok(Parsed::Complete(_))
        ));
        let whole = "POST /publish?channel=a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        assert!(matches!(
            parse_request(&mut whole.as_bytes().to_vec(), 65536, Some(&key)),
            Ok(Parsed::Complete(_))
        ));
    }

    #[test]
    fn a_timeout_is_quiet_when_idle_and_408_mid_request() {
        let timeout = Duration::from_secs(10);
        assert!(on_request_timeout(b"", timeout).is_none());
        let answer = on_request_timeout(b"GET /metr", timeout).expect("a 408");
        assert_eq!(answer.status, 408);
        let json: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|e| e.contains("admin_request_timeout (10 s)")),
            "{json}"
        );
    }

    #[test]
    fn head_answers_like_get() {
        use crate::fanout::publisher::Publisher;
        use crate::fanout::ring::Ring;
        use crate::fanout::wake::IdleFlags;
        let settings = crate::config::resolve(Default::default(), Default::default()).unwrap();
        let all_metrics = Metrics::leak(1);
        let port = AdminPort {
            routes: Routes {
                publisher: Arc::new(Publisher::new(
                    Arc::new(Ring::new(8)),
                    Arc::new(IdleFlags::new(1)),
                )),
                inbox: None,
                cluster: None,
            },
            settings: Arc::new(settings),
            metrics: all_metrics.shard(0),
            all_metrics,
            control: ShardControl::new(Vec::new()),
            lifecycle: Arc::default(),
        };
        assert_eq!(route("HEAD", "/healthz", &port).status, 200);
        assert_eq!(route("HEAD", "/publish", &port).status, 405);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = data.clone();
            if let Ok(Parsed::Complete(req)) = parse_request(&mut buf, 64, None) {
                prop_assert!(req.body.len() <= 64);
                prop_assert!(buf.len() < data.len());
            }
        }
    }
}
