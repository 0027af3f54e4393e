//! The admin HTTP port: `/metrics`, `/healthz`, `/readyz`, `POST /publish` and
//! `POST /admin/disconnect?user=ID` (closes every connection of a user on every shard
//! with 4403, through [`crate::shard::control`]).
//!
//! A deliberately small HTTP/1.1 server (one request per connection, `Connection: close`)
//! on shard 0: scrapes and publishes are rare next to WebSocket traffic, and keeping it
//! on one shard keeps it out of every other shard's way.
//!
//! `POST /publish?channel=user:<id>` with the inbox on goes through the store thread:
//! with `&ack=1` the answer (200 with the offset) comes only after the message is
//! committed to disk, or 503 with the reason; without it, 202 as soon as it is queued.

use crate::config::Settings;
use crate::fanout::publisher::Publisher;
use crate::inbox::{is_user_channel, Inbox, InboxReply};
use crate::ingest::key::bearer;
use crate::ingest::line::validate_payload;
use crate::metrics::{self, ShardMetrics, Source};
use crate::proto::channel::{is_valid_channel, CHANNEL_RULE};
use crate::proto::upgrade::{percent_decode, status_text, MAX_REQUEST_HEAD};
use crate::shard::control::ShardControl;
use crate::shard::lifecycle::{shutting_down, SHARDS_READY};
use crate::shard::listener::accept_allowed;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long `POST /admin/disconnect` waits for every shard to report.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts admin connections forever.
pub async fn serve(
    listener: TcpListener,
    publisher: Arc<Publisher>,
    inbox: Option<Inbox>,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
    control: Rc<ShardControl>,
) {
    accept_allowed(listener, "admin", &settings.clone(), |stream| {
        handle(
            stream,
            publisher.clone(),
            inbox.clone(),
            settings.clone(),
            metrics,
            control.clone(),
        )
    })
    .await
}

struct Response {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, each ending in `\r\n`.
    headers: &'static str,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        headers: "",
        body: body.into(),
    }
}

fn json(status: u16, body: String) -> Response {
    Response {
        status,
        content_type: "application/json",
        headers: "",
        body,
    }
}

/// One request as read: method, target, the `Authorization` header and the body.
struct Request {
    method: String,
    target: String,
    authorization: Option<Vec<u8>>,
    body: Vec<u8>,
}

/// `None` when `ingest_key` is unset or the request's `Authorization: Bearer` carries
/// it; otherwise the 401 to answer (the key in force now, after any reload).
fn unauthorized(request: &Request) -> Option<Response> {
    let key = crate::live::current().and_then(|l| l.ingest_key.clone())?;
    let given = request.authorization.as_deref().and_then(bearer);
    if given.is_some_and(|g| key.matches(g)) {
        return None;
    }
    metrics::get().ingest_unauthorized[1].fetch_add(1, Ordering::Relaxed);
    let mut response = json_error(
        401,
        "unauthorized: send the ingest key as Authorization: Bearer <ingest_key>",
    );
    response.headers = "WWW-Authenticate: Bearer realm=\"ringcast ingest\"\r\n";
    Some(response)
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

async fn handle(
    mut stream: TcpStream,
    publisher: Arc<Publisher>,
    inbox: Option<Inbox>,
    settings: Arc<Settings>,
    metrics: &'static ShardMetrics,
    control: Rc<ShardControl>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let response = match read_request(&mut stream, settings.max_message_size).await {
        Ok(req) if req.target.split('?').next() == Some("/admin/disconnect") => {
            match unauthorized(&req) {
                Some(refused) if req.method == "POST" => refused,
                _ => disconnect(&req.method, &req.target, &control).await,
            }
        }
        Ok(req) if req.method == "POST" && req.target.split('?').next() == Some("/publish") => {
            match unauthorized(&req) {
                Some(refused) => refused,
                None => {
                    let query = req.target.split_once('?').map_or("", |(_, q)| q);
                    publish(
                        query,
                        &req.body,
                        &publisher,
                        inbox.as_ref(),
                        &settings,
                        metrics,
                    )
                    .await
                }
            }
        }
        Ok(req) => route(&req.method, &req.target, &settings),
        Err(resp) => resp,
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        response.status,
        status_text(response.status),
        response.content_type,
        response.body.len(),
        response.headers
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(response.body.as_bytes()).await;
    let _ = stream.close().await;
}

/// Reads one request: method, target and a Content-Length body.
async fn read_request(stream: &mut TcpStream, max_body: usize) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| text(400, "incomplete request\n"))?;
        if n == 0 {
            return Err(text(400, "incomplete request\n"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => continue,
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
        if header("transfer-encoding").is_some() {
            return Err(json_error(
                411,
                "chunked bodies are not supported: send Content-Length",
            ));
        }
        let length = match header("content-length") {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| json_error(400, "malformed Content-Length"))?,
        };
        if length > max_body {
            return Err(json_error(
                413,
                &format!("body of {length} bytes exceeds the {max_body}-byte limit"),
            ));
        }
        let mut body = buf.split_off(head_len);
        while body.len() < length {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|_| json_error(400, "body shorter than Content-Length"))?;
            if n == 0 {
                return Err(json_error(400, "body shorter than Content-Length"));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
        return Ok(Request {
            method,
            target,
            authorization,
            body,
        });
    }
}

fn route(method: &str, target: &str, settings: &Settings) -> Response {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let draining = shutting_down();
    match (method, path) {
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            headers: "",
            body: metrics::get().render(draining),
        },
        ("GET", "/healthz") => text(200, "ok\n"),
        ("GET", "/readyz") if draining => text(503, "draining\n"),
        ("GET", "/readyz") if SHARDS_READY.load(Ordering::Acquire) < settings.shards => {
            text(503, "starting\n")
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
    publisher: &Publisher,
    inbox: Option<&Inbox>,
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
    if let Some(inbox) = inbox.filter(|_| is_user_channel(&channel)) {
        let (tx, rx) = flume::bounded(1);
        let reply = if ack {
            InboxReply::Wait(tx)
        } else {
            InboxReply::None
        };
        if let Err(e) = inbox.publish(&channel, body, reply) {
            return json_error(503, &format!("inbox: {}", e.to_store_error()));
        }
        metrics.messages_in[source].fetch_add(1, Ordering::Relaxed);
        if !ack {
            return json(
                202,
                format!("{{\"channel\":\"{channel}\",\"queued\":true}}\n"),
            );
        }
        return match rx.recv_async().await {
            Ok(Ok(offset)) => json(
                200,
                format!("{{\"channel\":\"{channel}\",\"offset\":{offset},\"durable\":true}}\n"),
            ),
            Ok(Err(e)) => json_error(503, &format!("inbox: {e}")),
            Err(_) => json_error(503, "inbox: the store thread stopped"),
        };
    }
    let published = publisher.publish(&channel, body);
    metrics.messages_in[source].fetch_add(1, Ordering::Relaxed);
    json(
        200,
        format!(
            "{{\"channel\":\"{channel}\",\"offset\":{}}}\n",
            published.offset
        ),
    )
}
