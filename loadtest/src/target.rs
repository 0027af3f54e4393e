//! Where the load goes: the subscriber URL (`ws://host:port/path?query`) and the publish
//! endpoint (`udp://`, `tcp://`, `http://…/publish`, or `ws`), parsed and checked.
//!
//! Only loopback addresses (127.0.0.0/8, ::1) are accepted unless `--allow-remote` is
//! given: a load test pointed at the wrong host is an outage, not a benchmark.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// A URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Wrong shape.
    #[error("bad URL {url:?}: {why}")]
    Bad {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {host:?} in {url:?}: {why}")]
    Resolve {
        /// The URL given.
        url: String,
        /// Its host part.
        host: String,
        /// The resolver's answer.
        why: String,
    },
    /// A `--targets` file could not be read.
    #[error("cannot read the --targets file {path:?}: {source}")]
    TargetsFile {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A `--targets` line does not have the shape `URL [source,source,...]`.
    #[error("{origin} line {line}: {why}")]
    TargetsLine {
        /// The file.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Not a loopback address and `--allow-remote` was not given.
    #[error(
        "{addr} (from {url:?}) is not a loopback address; pass --allow-remote to load a \
         remote host on purpose"
    )]
    Remote {
        /// The URL given.
        url: String,
        /// What it resolved to.
        addr: SocketAddr,
    },
}

/// A WebSocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsTarget {
    /// The URL as given.
    pub url: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// `Host` header (host and port as written).
    pub host: String,
    /// Path and query for the request line.
    pub path: String,
}

impl WsTarget {
    /// The first channel of a `channels=` query parameter, if any.
    pub fn channel(&self) -> Option<String> {
        let query = self.path.split_once('?')?.1;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "channels")
            .and_then(|(_, v)| v.split(',').next())
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
    }

    /// The same endpoint with every `channels=` query parameter removed.
    pub fn without_channels(&self) -> WsTarget {
        let (path, query) = self.path.split_once('?').unwrap_or((&self.path, ""));
        let kept = query
            .split('&')
            .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some("channels"))
            .collect::<Vec<_>>();
        WsTarget {
            path: if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            },
            ..self.clone()
        }
    }
}

/// One node of a `--targets` run: its subscriber URL and the source addresses its
/// connections are bound to (empty: the default for its address, see `limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Subscriber URL (`ws://…`).
    pub url: String,
    /// Source addresses, round-robin; empty for the default.
    pub sources: Vec<IpAddr>,
}

/// Splits a comma-separated list of endpoints. After a URL with a query, a comma starts
/// a new item only when what follows is an endpoint itself (`scheme://…`, or `ws`
/// alone); otherwise it belongs to that query, as in `ws://host/ws?channels=a,b`.
pub fn split_list(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in list.split(',') {
        let starts_new = part.trim() == "ws" || part.contains("://");
        match out.last_mut() {
            Some(last) if !starts_new && last.contains("://") && last.contains('?') => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.to_owned()),
        }
    }
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Expands `--targets` values: each is a `ws://` URL or a file of lines
/// `URL [source,source,...]` (`#` starts a comment; blank lines are skipped).
///
/// # Errors
/// An unreadable file or a malformed line.
pub fn read_targets(values: &[String]) -> Result<Vec<NodeSpec>, UrlError> {
    let mut out = Vec::new();
    for value in values.iter().flat_map(|v| split_list(v)) {
        let value = value.as_str();
        if value.contains("://") {
            out.push(NodeSpec {
                url: value.to_owned(),
                sources: Vec::new(),
            });
            continue;
        }
        let text = std::fs::read_to_string(value).map_err(|source| UrlError::TargetsFile {
            path: value.to_owned(),
            source,
        })?;
        out.extend(parse_target_lines(&text, value)?);
    }
    Ok(out)
}

/// Parses the lines of a `--targets` file (`origin` names it in errors).
///
/// # Errors
/// A line with more than two fields or an unparsable source address.
pub fn parse_target_lines(text: &str, origin: &str) -> Result<Vec<NodeSpec>, UrlError> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let err = |why: String| UrlError::TargetsLine {
            origin: origin.to_owned(),
            line: n + 1,
            why,
        };
        let mut fields = line.split_whitespace();
        let url = fields.next().unwrap_or_default().to_owned();
        let sources = match fields.next() {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<IpAddr>()
                        .map_err(|_| err(format!("bad source address {s:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if let Some(extra) = fields.next() {
            return Err(err(format!(
                "unexpected {extra:?}: expected `URL [source,source,...]`"
            )));
        }
        out.push(NodeSpec { url, sources });
    }
    Ok(out)
}

/// Whether `ip` is an address of this host (network namespace): one a socket can bind.
/// A loopback-range address that is not (e.g. 127.200.1.1 given to a network namespace
/// behind a bridge) is reached through a route instead, from that route's source address.
pub fn is_local_ip(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Where and how messages are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishTarget {
    /// One `<channel> <payload>` datagram per message.
    Udp(SocketAddr),
    /// `<channel> <payload>\n` lines on one TCP connection.
    Tcp(SocketAddr),
    /// `POST <path>?channel=<ch>` with the payload as body, one request per message.
    Http {
        /// Resolved address.
        addr: SocketAddr,
        /// `Host` header.
        host: String,
        /// Path without query, e.g. `/publish`.
        path: String,
    },
    /// Masked text frames on a dedicated WebSocket connection.
    Ws(WsTarget),
}

impl PublishTarget {
    /// The address messages go to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            PublishTarget::Udp(a) | PublishTarget::Tcp(a) => *a,
            PublishTarget::Http { addr, .. } => *addr,
            PublishTarget::Ws(t) => t.addr,
        }
    }
}

/// Parses `ws://host[:port][/path][?query]`.
///
/// # Errors
/// Another scheme, a missing host, a bad port or an unresolvable name.
pub fn parse_ws(url: &str) -> Result<WsTarget, UrlError> {
    let rest = strip_scheme(url, "ws")?;
    let (authority, path) = split_authority(rest);
    let addr = resolve(url, authority, 80)?;
    Ok(WsTarget {
        url: url.to_owned(),
        addr,
        host: authority.to_owned(),
        path: match path {
            "" => "/".into(),
            query if query.starts_with('?') => format!("/{query}"),
            path => path.to_owned(),
        },
    })
}

/// Parses a publish endpoint; `ws` alone means a publisher connection to `subscribe`.
///
/// # Errors
/// An unknown scheme or a bad address.
pub fn parse_publish(url: &str, subscribe: &WsTarget) -> Result<PublishTarget, UrlError> {
    if url == "ws" {
        return Ok(PublishTarget::Ws(subscribe.clone()));
    }
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "ws" => Ok(PublishTarget::Ws(parse_ws(url)?)),
        "udp" | "tcp" => {
            let (authority, _) = split_authority(strip_scheme(url, scheme)?);
            let addr = resolve(url, authority, 0)?;
            Ok(if scheme == "udp" {
                PublishTarget::Udp(addr)
            } else {
                PublishTarget::Tcp(addr)
            })
        }
        "http" => {
            let (authority, path) = split_authority(strip_scheme(url, "http")?);
            let path = path.split('?').next().unwrap_or_default();
            Ok(PublishTarget::Http {
                addr: resolve(url, authority, 80)?,
                host: authority.to_owned(),
                path: if path.is_empty() {
                    "/publish".into()
                } else {
                    path.to_owned()
                },
            })
        }
        _ => Err(bad(
            url,
            "expected udp://host:port, tcp://host:port, http://host:port/publish or ws",
        )),
    }
}

/// Refuses non-loopback addresses unless `allow_remote`.
///
/// # Errors
/// [`UrlError::Remote`] for a non-loopback address without permission.
pub fn check_local(url: &str, addr: SocketAddr, allow_remote: bool) -> Result<(), UrlError> {
    if allow_remote || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(UrlError::Remote {
            url: url.to_owned(),
            addr,
        })
    }
}

fn bad(url: &str, why: &str) -> UrlError {
    UrlError::Bad {
        url: url.to_owned(),
        why: why.to_owned(),
    }
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Result<&'a str, UrlError> {
    match url.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case(scheme) => Ok(rest),
        Some(("wss", _)) => Err(bad(url, "wss:// (TLS) is not supported; use ws://")),
        _ => Err(bad(url, &format!("expected a {scheme}:// URL"))),
    }
}

/// The `GET /sse` path for a subscriber URL's path and query: ringcast's SSE endpoint
/// with the same query (channels, token).
pub fn sse_path(path: &str) -> String {
    match path.split_once('?') {
        Some((_, query)) => format!("/sse?{query}"),
        None => "/sse".to_owned(),
    }
}

/// Splits `host:port/path?q` into the authority and the rest (starting at `/` or `?`).
fn split_authority(rest: &str) -> (&str, &str) {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    rest.split_at(end)
}

fn resolve(url: &str, authority: &str, default_port: u16) -> Result<SocketAddr, UrlError> {
    if authority.is_empty() {
        return Err(bad(url, "missing host"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| bad(url, &format!("bad port {port:?}")))?;
            (host, port)
        }
        _ if default_port == 0 => return Err(bad(url, "missing port")),
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let resolved = (host, port)
        .to_socket_addrs()
        .map_err(|e| UrlError::Resolve {
            url: url.to_owned(),
            host: host.to_owned(),
            why: e.to_string(),
        })?;
    let all: Vec<SocketAddr> = resolved.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| bad(url, "host resolved to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_parse() -> Result<(), UrlError> {
        let t = parse_ws("ws://127.0.0.1:8080/ws?channels=bench,other")?;
        assert_eq!(t.addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(t.path, "/ws?channels=bench,other");
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.channel().as_deref(), Some("bench"));
        let bare = parse_ws("ws://[::1]:9")?;
        assert_eq!((bare.path.as_str(), bare.addr.port()), ("/", 9));
        assert_eq!(bare.channel(), None);
        assert!(parse_ws("http://127.0.0.1/").is_err());
        assert!(parse_ws("wss://127.0.0.1/").is_err());
        assert!(parse_ws("ws://127.0.0.1:notaport/").is_err());
        assert_eq!(t.without_channels().path, "/ws");
        let mixed = parse_ws("ws://127.0.0.1:8080/ws?token=x&channels=a&v=1")?;
        assert_eq!(mixed.without_channels().path, "/ws?token=x&v=1");
        assert_eq!(mixed.without_channels().channel(), None);
        Ok(())
    }

    #[test]
    fn publish_urls_parse() -> Result<(), UrlError> {
        let sub = parse_ws("ws://127.0.0.1:8080/ws")?;
        assert_eq!(
            parse_publish("udp://127.0.0.1:9000", &sub)?,
            PublishTarget::Udp(([127, 0, 0, 1], 9000).into())
        );
        assert!(matches!(
            parse_publish("tcp://127.0.0.1:9001", &sub)?,
            PublishTarget::Tcp(_)
        ));
        match parse_publish("http://127.0.0.1:9090/publish", &sub)? {
            PublishTarget::Http { path, .. } => assert_eq!(path, "/publish"),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_publish("ws", &sub)?, PublishTarget::Ws(sub.clone()));
        assert!(parse_publish("udp://127.0.0.1", &sub).is_err());
        assert!(parse_publish("ftp://x", &sub).is_err());
        Ok(())
    }

    #[test]
    fn target_files_parse() -> Result<(), UrlError> {
        let text = "# nodes\nws://127.200.1.1:8080/ws?channels=b\n\n  ws://127.200.1.2:8080/ws 127.200.0.1,127.200.0.2 # two\n";
        let nodes = parse_target_lines(text, "t.txt")?;
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].url, "ws://127.200.1.1:8080/ws?channels=b");
        assert!(nodes[0].sources.is_empty());
        assert_eq!(
            nodes[1].sources,
            vec![
                IpAddr::from([127, 200, 0, 1]),
                IpAddr::from([127, 200, 0, 2])
            ]
        );
        assert!(parse_target_lines("ws://a:1/ 127.0.0.x", "t").is_err());
        assert!(parse_target_lines("ws://a:1/ 127.0.0.1 extra", "t").is_err());
        let urls = read_targets(&["ws://127.0.0.1:1/".into(), " ".into()])?;
        assert_eq!(urls.len(), 1);
        assert!(read_targets(&["/nonexistent/targets.txt".into()]).is_err());
        Ok(())
    }

    #[test]
    fn lists_split_between_endpoints_only() {
        assert_eq!(
            split_list("udp://127.0.0.1:9000, udp://127.0.0.2:9000"),
            vec!["udp://127.0.0.1:9000", "udp://127.0.0.2:9000"]
        );
        assert_eq!(
            split_list("ws://a:1/ws?channels=x,y,ws://b:1/ws?channels=z"),
            vec!["ws://a:1/ws?channels=x,y", "ws://b:1/ws?channels=z"]
        );
        assert_eq!(split_list("ws,nodes.txt"), vec!["ws", "nodes.txt"]);
        assert_eq!(
            split_list("ws://a:1/ws,nodes.txt"),
            vec!["ws://a:1/ws", "nodes.txt"]
        );
        assert_eq!(
            split_list("ws://a:1/?channels=x,y"),
            vec!["ws://a:1/?channels=x,y"]
        );
        assert!(split_list(" , ").is_empty());
    }

    #[test]
    fn local_addresses_are_told_apart() {
        assert!(is_local_ip(IpAddr::from([127, 0, 0, 1])));
        assert!(!is_local_ip(IpAddr::from([192, 0, 2, 123])));
    }

    #[test]
    fn remote_needs_permission() {
        let remote: SocketAddr = ([10, 0, 0, 1], 80).into();
        assert!(check_local("ws://10.0.0.1/", remote, false).is_err());
        assert!(check_local("ws://10.0.0.1/", remote, true).is_ok());
        assert!(check_local("ws://127.0.0.9/", ([127, 0, 0, 9], 80).into(), false).is_ok());
    }
}
