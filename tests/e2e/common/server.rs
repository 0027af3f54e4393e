//! One real `ringcast` process per test, on free loopback ports.
//!
//! [`Server::start`] spawns the binary (`RINGCAST_BIN`, else the one cargo built for this
//! test), sends its stdout and stderr to a log file, and waits for `GET /readyz` to
//! answer 200. Dropping the [`Server`] kills the process; when the test is failing, or
//! the process died on its own, the log is printed so the failure explains itself.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::http::{self, HttpResponse};
use super::metrics::Metrics;
use super::raw_ws::RawWs;
use super::subscriber::Subscriber;
use super::{free_tcp_port, free_udp_port};

/// How long ringcast gets to answer 200 on `/readyz` after spawning.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Shards every test server runs unless a test passes `--shards` itself: two, so that
/// connections and ingest land on more than one core even on a 2-vCPU CI machine.
pub const DEFAULT_SHARDS: &str = "2";

static LOG_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The four loopback ports of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// WebSocket listener (`--listen`).
    pub ws: u16,
    /// UDP ingest (`--udp-ingest`).
    pub udp: u16,
    /// TCP ingest (`--tcp-ingest`).
    pub tcp: u16,
    /// Admin HTTP (`--admin`).
    pub admin: u16,
}

/// A running ringcast process and the loopback ports it was told to use.
pub struct Server {
    child: Child,
    /// WebSocket listener port (`--listen`).
    pub ws_port: u16,
    /// UDP ingest port (`--udp-ingest`).
    pub udp_port: u16,
    /// TCP ingest port (`--tcp-ingest`).
    pub tcp_port: u16,
    /// Admin HTTP port (`--admin`).
    pub admin_port: u16,
    /// The command line it was started with, for failure messages.
    pub args: Vec<String>,
    log_path: PathBuf,
    udp: UdpSocket,
    signalled: bool,
    exit: Option<ExitStatus>,
}

impl Server {
    /// The binary under test: `$RINGCAST_BIN`, or the one cargo built with this test.
    pub fn binary() -> PathBuf {
        std::env::var_os("RINGCAST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ringcast")))
    }

    /// Starts ringcast with `extra` flags appended to the port flags (and `--shards 2`
    /// unless `extra` sets `--shards`), and waits until `/readyz` answers 200: every
    /// shard serves (`/healthz` answers as soon as the admin port is up, before that).
    ///
    /// # Panics
    /// When the process exits or is not ready within [`STARTUP_TIMEOUT`]; the panic
    /// message carries its log.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    /// [`Server::start`] with `env` set for the process (e.g. an `LD_PRELOAD` fault
    /// shim, or systemd's `NOTIFY_SOCKET`). The test process's own environment is left
    /// alone: the tests share one process, and a variable set there would reach every
    /// server started meanwhile.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_program(&Server::binary(), extra, env)
    }

    /// [`Server::start`] running `program` instead of [`Server::binary`] (a wrapper that
    /// execs ringcast under a tracer, say); `program` gets the same arguments.
    pub fn start_program(program: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            // Three TCP ports found one after another may repeat: drawn until distinct.
            let (ws, tcp, admin) = loop {
                let (a, b, c) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
                if a != b && b != c && a != c {
                    break (a, b, c);
                }
            };
            let ports = Ports {
                ws,
                udp: free_udp_port(),
                tcp,
                admin,
            };
            match Server::try_start(program, ports, extra, env) {
                Ok(server) => return server,
                Err(log) if attempt < ATTEMPTS && mentions_port_clash(&log) => {
                    eprintln!("ringcast could not bind a port another process took; retrying with new ports");
                }
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Starts ringcast on exactly `ports` (those of a server that has exited, to restart
    /// it in place), like [`Server::start`] otherwise.
    ///
    /// A port of the old server can stay taken for a while after it exited (a free
    /// loopback port is drawn from the ephemeral range, so another process's outgoing
    /// connection may hold it as its local port): the start waits until no port is held
    /// and tries again after a clash, for [`RESTART_PATIENCE`] in all.
    ///
    /// # Panics
    /// When it does not become healthy, or a port is still taken after
    /// [`RESTART_PATIENCE`] (the message names the ports held).
    pub fn start_on(ports: Ports, extra: &[&str]) -> Server {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            while !ports_held(ports).is_empty() && started.elapsed() < RESTART_PATIENCE {
                thread::sleep(Duration::from_millis(100));
            }
            attempts += 1;
            match Server::try_start(&Server::binary(), ports, extra, &[]) {
                Ok(server) => return server,
                Err(log) if mentions_port_clash(&log) && started.elapsed() < RESTART_PATIENCE => {
                    eprintln!(
                        "ringcast could not bind one of {ports:?} (attempt {attempts}); \
                         waiting for it to be released"
                    );
                }
                Err(log) if mentions_port_clash(&log) => panic!(
                    "ringcast could not restart in place: its ports were still taken after \
                     {RESTART_PATIENCE:?} and {attempts} attempts (held now: {:?} of {ports:?})\n\
                     last attempt: {log}",
                    ports_held(ports)
                ),
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// The ports this server was told to use.
    pub fn ports(&self) -> Ports {
        Ports {
            ws: self.ws_port,
            udp: self.udp_port,
            tcp: self.tcp_port,
            admin: self.admin_port,
        }
    }

    fn try_start(
        binary: &Path,
        ports: Ports,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        if !binary.exists() {
            return Err(format!(
                "ringcast binary {} does not exist; build it with `cargo build --release` \
                 or point RINGCAST_BIN at it",
                binary.display()
            ));
        }
        let (ws_port, udp_port, tcp_port, admin_port) =
            (ports.ws, ports.udp, ports.tcp, ports.admin);
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{ws_port}"),
            "--udp-ingest".into(),
            format!("127.0.0.1:{udp_port}"),
            "--tcp-ingest".into(),
            format!("127.0.0.1:{tcp_port}"),
            "--admin".into(),
            format!("127.0.0.1:{admin_port}"),
        ];
        if !extra.contains(&"--shards") {
            args.extend(["--shards".into(), DEFAULT_SHARDS.into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));

        let log_path = std::env::temp_dir().join(format!(
            "ringcast-test-{}-{}-{}.log",
            std::process::id(),
            LOG_COUNTER.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        let log =
            File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cloning log handle: {e}"))?;
        let mut command = Command::new(binary);
        // Only the flags below configure the server: no stray RINGCAST_* settings from
        // the caller's environment, and plain (uncoloured) log lines in the log file.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RINGCAST_") {
                command.env_remove(&name);
            }
        }
        command.env("NO_COLOR", "1");
        command.envs(env.iter().copied());
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", binary.display()))?;
        let udp = UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| format!("binding a UDP publisher socket: {e}"))?;
        let mut server = Server {
            child,
            ws_port,
            udp_port,
            tcp_port,
            admin_port,
            args,
            log_path,
            udp,
            signalled: false,
            exit: None,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                server.exit = Some(status);
                // Reported here (and retried on a port clash): not a death during a test.
                server.signalled = true;
                return Err(format!(
                    "ringcast exited with {status} before it became healthy\n{}",
                    server.describe()
                ));
            }
            if matches!(http::get(server.admin_addr(), "/readyz"), Ok(r) if r.status == 200) {
                return Ok(server);
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                return Err(format!(
                    "ringcast did not answer 200 on GET /readyz within {STARTUP_TIMEOUT:?}\n{}",
                    server.describe()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where clients connect.
    pub fn ws_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ws_port))
    }

    /// The admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    /// The UDP ingest address.
    pub fn udp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.udp_port))
    }

    /// The TCP ingest address.
    pub fn tcp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tcp_port))
    }

    /// `ws://…/ws`, with `?channels=a,b` when `channels` is not empty.
    pub fn ws_url(&self, channels: &[&str]) -> String {
        format!("ws://127.0.0.1:{}{}", self.ws_port, ws_target(channels))
    }

    /// A tungstenite subscriber connected to `channels`.
    pub fn subscribe(&self, channels: &[&str]) -> Subscriber {
        Subscriber::connect(&self.ws_url(channels))
    }

    /// A hand-driven WebSocket that has completed the handshake on `/ws?channels=…`.
    pub fn raw_ws(&self, channels: &[&str]) -> RawWs {
        RawWs::connect(self.ws_addr(), &ws_target(channels))
    }

    /// Publishes one message as one UDP datagram `<channel> <payload>`.
    ///
    /// All datagrams of one server go out from one socket, so they arrive in order.
    pub fn udp_publish(&self, channel: &str, payload: &[u8]) {
        let mut datagram = Vec::with_capacity(channel.len() + 1 + payload.len());
        datagram.extend_from_slice(channel.as_bytes());
        datagram.push(b' ');
        datagram.extend_from_slice(payload);
        self.udp_send_raw(&datagram);
    }

    /// Sends `datagram` to the UDP ingest port as it is.
    pub fn udp_send_raw(&self, datagram: &[u8]) {
        self.udp
            .send_to(datagram, self.udp_addr())
            .unwrap_or_else(|e| panic!("sending a UDP datagram to {}: {e}", self.udp_addr()));
    }

    /// A new connection to the TCP ingest port.
    pub fn tcp_ingest(&self) -> TcpIngest {
        TcpIngest::connect(self.tcp_addr())
    }

    /// `POST /publish?channel=<channel>` (no query at all when `channel` is `None`).
    pub fn http_publish(&self, channel: Option<&str>, payload: &[u8]) -> HttpResponse {
        let target = match channel {
            Some(c) => format!("/publish?channel={c}"),
            None => "/publish".to_string(),
        };
        http::request(self.admin_addr(), "POST", &target, &[], payload)
            .unwrap_or_else(|e| panic!("POST {target} on the admin port: {e}\n{}", self.describe()))
    }

    /// `GET path` on the admin port.
    pub fn admin_get(&self, path: &str) -> io::Result<HttpResponse> {
        http::get(self.admin_addr(), path)
    }

    /// The current `/metrics` page, parsed.
    ///
    /// # Panics
    /// When `/metrics` does not answer 200.
    pub fn metrics(&self) -> Metrics {
        match self.admin_get("/metrics") {
            Ok(r) if r.status == 200 => Metrics::parse(&r.text()),
            Ok(r) => panic!("GET /metrics answered {} {:?}", r.status, r.text()),
            Err(e) => panic!("GET /metrics failed: {e}\n{}", self.describe()),
        }
    }

    /// Waits until the sum of metric `name` satisfies `ok`, and returns that value.
    pub fn wait_for_metric(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let start = Instant::now();
        loop {
            let last = self.metrics();
            let value = last.sum(name);
            if ok(value) {
                return value;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting until {what}; {}",
                    last.describe(name)
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until `ringcast_connections` (summed over shards) equals `n`.
    pub fn wait_for_connections(&self, n: usize, timeout: Duration) {
        self.wait_for_metric(
            "ringcast_connections",
            &format!("ringcast_connections == {n}"),
            timeout,
            |v| v == n as f64,
        );
    }

    /// Sends SIGTERM (starts a drain).
    pub fn sigterm(&mut self) {
        self.signal(libc::SIGTERM);
        self.signalled = true;
    }

    /// Kills the process with SIGKILL (no drain, no goodbye to its clients) and reaps it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.signalled = true;
        let _ = self.wait_exit(Duration::from_secs(10));
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
        // which is not reaped before this struct drops, so the pid cannot be reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }

    /// Sends SIGHUP and waits up to `timeout` until
    /// `ringcast_config_reloads_total{result}` reaches `count`.
    pub fn hup_and_wait(&self, result: &str, count: f64, timeout: Duration) {
        self.signal(libc::SIGHUP);
        super::wait_until(
            timeout,
            &format!("ringcast_config_reloads_total{{result=\"{result}\"}} == {count}"),
            || {
                let m = self.metrics();
                (m.sum_where("ringcast_config_reloads_total", &[("result", result)]) == count)
                    .then_some(())
            },
        );
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit {
                return Some(status);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// Everything the process has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// The command line and log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- ringcast {} ---\n{}--- end of ringcast log ---",
            self.args.join(" "),
            self.log()
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let died_on_its_own = !self.signalled && self.wait_exit(Duration::ZERO).is_some();
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
        if thread::panicking() {
            eprintln!("\n{}", self.describe());
        } else if died_on_its_own {
            let status = self.exit.map(|s| s.to_string()).unwrap_or_default();
            let description = self.describe();
            let _ = fs::remove_file(&self.log_path);
            panic!("ringcast exited on its own ({status}) during the test\n{description}");
        }
        let _ = fs::remove_file(&self.log_path);
    }
}

/// `/ws`, with `?channels=a,b` when `channels` is not empty.
pub fn ws_target(channels: &[&str]) -> String {
    if channels.is_empty() {
        "/ws".to_string()
    } else {
        format!("/ws?channels={}", channels.join(","))
    }
}

/// How long [`Server::start_on`] waits for the ports of a server that exited.
pub const RESTART_PATIENCE: Duration = Duration::from_secs(30);

/// Those of `ports` that some socket holds now: a probe bind (with SO_REUSEADDR, as
/// ringcast's own check) fails on them. Named as `"ws 8080"`.
fn ports_held(ports: Ports) -> Vec<String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let held = |port: u16, ty: Type, protocol: Protocol| {
        let probe = || -> io::Result<()> {
            let socket = Socket::new(Domain::IPV4, ty, Some(protocol))?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        };
        probe().is_err()
    };
    [
        ("ws", ports.ws, Type::STREAM, Protocol::TCP),
        ("tcp", ports.tcp, Type::STREAM, Protocol::TCP),
        ("admin", ports.admin, Type::STREAM, Protocol::TCP),
        ("udp", ports.udp, Type::DGRAM, Protocol::UDP),
    ]
    .into_iter()
    .filter(|&(_, port, ty, protocol)| held(port, ty, protocol))
    .map(|(name, port, _, _)| format!("{name} {port}"))
    .collect()
}

fn mentions_port_clash(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address in use")
        || log.contains("address already in use")
        || log.contains("eaddrinuse")
}

/// Makes the child die with SIGKILL when the test thread that spawned it ends, so a test
/// binary aborted by [`super::Deadline`] or a panic never leaves servers behind.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A connection to the TCP ingest port: newline-delimited `<channel> <payload>` lines.
pub struct TcpIngest {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpIngest {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> TcpIngest {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to TCP ingest {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        let writer = stream.try_clone().expect("cloning TCP ingest stream");
        TcpIngest {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Sends `<channel> <payload>\n`.
    pub fn publish(&mut self, channel: &str, payload: &[u8]) {
        let mut line = Vec::with_capacity(channel.len() + payload.len() + 2);
        line.extend_from_slice(channel.as_bytes());
        line.push(b' ');
        line.extend_from_slice(payload);
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("writing to TCP ingest: {e}"));
    }

    /// Reads one reply line (without its `\n`); `None` when nothing arrives in `timeout`
    /// or the server closed the connection.
    pub fn read_line(&mut self, timeout: Duration) -> Option<String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading from TCP ingest: {e}"),
        }
    }

    /// Half-closes the write side, telling the server no more lines follow.
    pub fn finish(&mut self) {
        let _ = self.writer.shutdown(Shutdown::Write);
    }
}

/// Waits until `server` has counted `n` published messages (`ringcast_messages_in_total`).
///
/// UDP on loopback can still drop datagrams when the receive buffer overflows; the panic
/// message then says so, quoting the kernel's UDP error counters.
pub fn wait_for_messages_in(server: &Server, n: usize, timeout: Duration) {
    let reached = super::try_wait_until(timeout, || {
        (server.metrics().sum("ringcast_messages_in_total") >= n as f64).then_some(())
    });
    if reached.is_none() {
        let m = server.metrics();
        panic!(
            "ringcast counted {} of {n} published messages within {timeout:?}\n{}\n{}\n\
             kernel UDP counters (RcvbufErrors > 0 means the kernel dropped datagrams):\n{}",
            m.sum("ringcast_messages_in_total"),
            m.describe("ringcast_messages_in_total"),
            m.describe("ringcast_ingest_rejected_total"),
            fs::read_to_string("/proc/net/snmp")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("Udp:"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
}
