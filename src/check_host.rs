//! `ringcast check-host`: reads this host's limits and sysctls and says what to change to
//! hold a target number of connections, with the memory math behind it and, for every
//! finding, the fix (a `sysctl` line, a systemd unit setting or a firewall rule).
//!
//! [`assess`] is pure: a [`HostSnapshot`] and a [`Target`] in, an [`Assessment`] of
//! `OK` / `WARN` / `BLOCK` lines out. Only `BLOCK` fails the check: a setting that stops the
//! host from holding the requested connections at all (descriptors, conntrack table,
//! io_uring, RAM). `WARN` is worth changing (reconnect storms, bursts, restarts) but the
//! connections fit without it, so a stock host asked for a few thousand connections passes
//! with warnings. [`read_host`] is the only part that touches `/proc`. Recommended values
//! are those of `kernel-tuning/99-ringcast.conf` and `ringcast.service`, scaled to the
//! target and to the host's RAM; per-connection costs are the ones derived in
//! `kernel-tuning/README.md`.

use std::fmt::{self, Display};
use std::io;
use std::process::ExitCode;
use thiserror::Error;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// tcp_mem counts 4 KiB pages; the kernel charges socket memory in whole pages.
const PAGE: u64 = 4096;
/// Kernel bytes per idle socket (6.x x86-64 slabs): tcp_sock 2368, socket inode 832, file
/// 192, dentry 192, readiness entry 256 at most, fd table and hash share 16. With the tuned
/// tcp_rmem/tcp_wmem an idle socket holds no buffer memory.
pub const KERNEL_BYTES_PER_IDLE_SOCKET: u64 = 3856;
/// ringcast's bytes per idle connection: 409 B RSS measured at 15k idle connections.
pub const USER_BYTES_PER_IDLE_CONNECTION: u64 = 410;
/// One nf_conntrack entry (the `nf_conntrack` slab object, 6.x x86-64), when the module is
/// loaded and the listener is tracked.
pub const CONNTRACK_BYTES_PER_CONNECTION: u64 = 320;
const TUNED_TCP_RMEM: [u64; 3] = [4096, 8192, 1 << 20];
const TUNED_TCP_WMEM: [u64; 3] = [4096, 16384, 1 << 20];
/// SO_RCVBUF the UDP ingest socket asks for (capped by net.core.rmem_max).
const UDP_INGEST_RCVBUF: u64 = 4 * MIB;
/// Locked memory per shard besides glommio's io memory: rings before kernel 5.12, eventfds.
const MEMLOCK_RINGS_PER_SHARD: u64 = 768 * KIB;
/// Where the sysctl lines go to survive a reboot.
const SYSCTL_FILE: &str = "/etc/sysctl.d/99-ringcast.conf";

/// The limits and sysctls that decide how many connections a host can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    /// RLIMIT_NOFILE of this process, soft and hard (`u64::MAX` = unlimited).
    pub nofile: [u64; 2],
    /// RLIMIT_MEMLOCK (soft) in bytes (`u64::MAX` = unlimited).
    pub memlock: u64,
    /// fs.file-max.
    pub file_max: u64,
    /// fs.nr_open.
    pub nr_open: u64,
    /// net.core.somaxconn.
    pub somaxconn: u64,
    /// net.ipv4.tcp_max_syn_backlog.
    pub tcp_max_syn_backlog: u64,
    /// net.ipv4.ip_local_port_range.
    pub ip_local_port_range: [u64; 2],
    /// net.ipv4.ip_local_reserved_ports as inclusive ranges.
    pub ip_local_reserved_ports: Vec<[u64; 2]>,
    /// net.ipv4.tcp_mem in 4 KiB pages: low, pressure, max.
    pub tcp_mem_pages: [u64; 3],
    /// net.ipv4.tcp_rmem in bytes: min, default, max.
    pub tcp_rmem: [u64; 3],
    /// net.ipv4.tcp_wmem in bytes: min, default, max.
    pub tcp_wmem: [u64; 3],
    /// net.core.rmem_max.
    pub rmem_max: u64,
    /// fs.epoll.max_user_watches, if the kernel has it.
    pub epoll_max_user_watches: Option<u64>,
    /// kernel.io_uring_disabled, if the kernel has it (6.6+).
    pub io_uring_disabled: Option<u64>,
    /// net.netfilter.nf_conntrack_max and nf_conntrack_count, when nf_conntrack is loaded.
    pub conntrack: Option<[u64; 2]>,
    /// MemTotal from /proc/meminfo, in bytes.
    pub mem_total: u64,
    /// CPUs this process may run on (ringcast's default shard count).
    pub cpus: u64,
}

/// What the host should hold: the connection count and what ringcast is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Connections to hold.
    pub connections: u64,
    /// Shards (one io_uring executor each).
    pub shards: u64,
    /// glommio's io memory per shard (`io_memory`), locked.
    pub io_memory: u64,
    /// ringcast's own ports (WebSocket, ingest, admin), sorted, without duplicates.
    pub ports: Vec<u16>,
    /// The WebSocket listener's port (the one conntrack sees every connection on).
    pub ws_port: u16,
}

impl Target {
    /// `connections` with the default configuration on a host with `cpus` CPUs.
    pub fn defaults(connections: u64, cpus: u64) -> Target {
        Target {
            connections,
            shards: cpus,
            io_memory: 256 * KIB,
            ports: vec![8080, 9000, 9001, 9090],
            ws_port: 8080,
        }
    }
}

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// The current value is enough.
    Ok,
    /// Worth changing (storms, bursts, restarts), but the target fits without it.
    Warn,
    /// The host cannot hold the target until this changes; fails the check.
    Block,
}

/// One setting: its value now, the value to set, why, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The verdict.
    pub status: Status,
    /// The setting, as `sysctl`, `ulimit` or /proc/meminfo names it.
    pub name: &'static str,
    /// The value now.
    pub current: String,
    /// The value to set.
    pub recommended: String,
    /// Why, in one short phrase.
    pub why: String,
    /// The command or unit setting that makes the change.
    pub fix: String,
}

/// The verdicts and the memory estimate for one host and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// What the host should hold.
    pub target: Target,
    /// The host as read.
    pub host: HostSnapshot,
    /// One entry per setting, in print order.
    pub checks: Vec<Check>,
}

impl Assessment {
    /// The checks that concluded `status`.
    pub fn with(&self, status: Status) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(move |c| c.status == status)
    }

    /// How many checks block the target; any makes the exit code 1.
    pub fn blockers(&self) -> usize {
        self.with(Status::Block).count()
    }

    /// Kernel plus ringcast memory (plus conntrack entries when tracked) for the idle
    /// connections, in bytes.
    pub fn idle_bytes(&self) -> u64 {
        self.target.connections * (per_connection_bytes(&self.host))
    }

    /// RAM left to the OS and page cache: an eighth of the host, at least 512 MiB, at most
    /// 8 GiB.
    pub fn os_reserve(&self) -> u64 {
        (self.host.mem_total / 8).clamp(512 * MIB, 8 * GIB)
    }

    /// The buffer memory every socket is guaranteed under pressure: tcp_rmem[0] +
    /// tcp_wmem[0]. Above tcp_mem's max even that allocation fails.
    pub fn buffer_floor(&self) -> u64 {
        self.host.tcp_rmem[0] + self.host.tcp_wmem[0]
    }
}

/// Idle bytes per connection on `host`: socket, ringcast, and a conntrack entry if loaded.
fn per_connection_bytes(host: &HostSnapshot) -> u64 {
    let conntrack = host.conntrack.map_or(0, |_| CONNTRACK_BYTES_PER_CONNECTION);
    KERNEL_BYTES_PER_IDLE_SOCKET + USER_BYTES_PER_IDLE_CONNECTION + conntrack
}

/// Bytes as GiB, MiB or KiB (powers of 1024); `u64::MAX` is "unlimited".
pub fn human(bytes: u64) -> String {
    match bytes {
        u64::MAX => "unlimited".into(),
        b if b >= GIB => format!("{:.1} GiB", b as f64 / GIB as f64),
        b if b >= MIB => format!("{:.0} MiB", b as f64 / MIB as f64),
        b => format!("{} KiB", b >> 10),
    }
}

/// `sysctl -w name=value` (quoted when the value has spaces).
fn sysctl_fix(name: &str, value: impl Display) -> String {
    let value = value.to_string();
    if value.contains(' ') {
        format!("sysctl -w {name}=\"{value}\"")
    } else {
        format!("sysctl -w {name}={value}")
    }
}

/// Port ranges as the kernel writes them: `8080,9000-9001`.
pub fn port_list(ranges: &[[u64; 2]]) -> String {
    let one = |[a, b]: &[u64; 2]| {
        if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        }
    };
    ranges.iter().map(one).collect::<Vec<_>>().join(",")
}

/// Parses `net.ipv4.ip_local_reserved_ports` (`""`, `8080`, `8080,9000-9001`).
pub fn parse_port_list(text: &str) -> Option<Vec<[u64; 2]>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a <= b).then_some([a, b])
        })
        .collect()
}

/// A row: `status` with its fields.
struct Row<'a> {
    name: &'static str,
    current: String,
    recommended: String,
    why: &'a str,
    fix: String,
}

impl Row<'_> {
    fn is(self, status: Status) -> Check {
        let Row {
            name,
            current,
            recommended,
            why,
            fix,
        } = self;
        Check {
            status,
            name,
            current,
            recommended,
            why: why.into(),
            fix,
        }
    }

    /// `Ok` when `ok`, else `otherwise`.
    fn when(self, ok: bool, otherwise: Status) -> Check {
        self.is(if ok { Status::Ok } else { otherwise })
    }
}

fn row<'a>(
    name: &'static str,
    cur: impl Display,
    rec: impl Display,
    why: &'a str,
    fix: String,
) -> Row<'a> {
    Row {
        name,
        current: cur.to_string(),
        recommended: rec.to_string(),
        why,
        fix,
    }
}

/// Decides what `host` must change to hold `target`. Pure: no I/O.
// rustfmt would give every row of the table below seven lines.
#[rustfmt::skip]
pub fn assess(host: &HostSnapshot, target: &Target) -> Assessment {
    let (n, h) = (target.connections, host);
    let mut a = Assessment { target: target.clone(), host: h.clone(), checks: Vec::new() };
    // Sockets past max_connections are accepted, answered 503 and closed (5%); the server
    // itself holds listeners, rings and eventfds (the allowance the shards warn with).
    let fds = n + n / 20 + 64 + 8 * target.shards;
    let nofile = 16_000_000u64.max(fds.div_ceil(1_000_000) * 1_000_000);
    let nr_open = 16_777_216u64.max(nofile.next_power_of_two());
    let backlog = n.min(65_535);
    let memlock = target.shards * (target.io_memory + MEMLOCK_RINGS_PER_SHARD);
    // Memory: what the idle connections take, what the OS keeps, and the room left for
    // socket buffers (tcp_mem). A burst to every connection needs each socket's floor.
    let (idle, reserve, floor) = (a.idle_bytes(), a.os_reserve(), a.buffer_floor());
    let room = h.mem_total.saturating_sub(idle + reserve);
    let burst = n * floor;
    let tcp_mem_max = h.tcp_mem_pages[2] * PAGE;
    let want = burst.max(256 * MIB).min(room.max(n * PAGE)).div_ceil(PAGE);
    let mut rec_mem = [want / 2, want * 3 / 4, want];
    // Below one page per socket a broadcast to everyone stalls in the kernel; still only a
    // warning: the idle connections themselves hold no buffer memory.
    let tcp_mem_status = if h.tcp_mem_pages[2] < n || tcp_mem_max < burst.min(room) || (tcp_mem_max > room && room >= n * PAGE) {
        Status::Warn
    } else {
        Status::Ok
    };
    if tcp_mem_status == Status::Ok {
        rec_mem = h.tcp_mem_pages;
    }
    let [lo, hi] = h.ip_local_port_range;
    let triple = |v: [u64; 3]| format!("{} {} {}", v[0], v[1], v[2]);
    let within = |cur: [u64; 3], max: [u64; 3]| cur.iter().zip(max).all(|(c, m)| *c <= m);
    let fd_text = |v: u64| if v == u64::MAX { "unlimited".into() } else { v.to_string() };
    let soft_hard = format!("{}/{} (soft/hard)", fd_text(h.nofile[0]), fd_text(h.nofile[1]));
    let why_fds = format!("needs >= {fds}: one descriptor per connection; ringcast raises soft to hard");
    let why_nr_open = format!("needs >= {fds}: LimitNOFILE cannot exceed fs.nr_open");
    let why_file_max = format!("needs >= {fds} plus the rest of the host (64k)");
    let why_lock = format!("needs >= {}: {} shards x io_memory {} + rings, locked", human(memlock), target.shards, human(target.io_memory));
    let why_backlog = format!("accept queue per shard; a reconnect storm of {n} overflows below {backlog}");
    let default_burst = human(n * (h.tcp_rmem[1] + h.tcp_wmem[1]));
    let why_rmem = format!("clients send only small commands; {n} x default buffers = {default_burst} in a burst");
    let why_mem = format!(
        "pages; a broadcast to all stalls below {n} pages (one per socket with data queued), a burst needs {}, RAM leaves {}",
        human(burst), human(room));
    let why_ram = format!("{} idle + {} for the OS; blocks when the connections alone do not fit", human(idle), human(reserve));
    let ram_status = if idle > h.mem_total.saturating_sub(reserve / 2) {
        Status::Block
    } else if idle + reserve + burst.min(tcp_mem_max) > h.mem_total {
        Status::Warn
    } else {
        Status::Ok
    };
    let limit_nofile = format!("systemd: LimitNOFILE={nofile} (ringcast.service); shell: ulimit -Hn {nofile} as root, or kernel-tuning/limits.conf");
    let mut rows = vec![
        row("RLIMIT_NOFILE", soft_hard, nofile, &why_fds, limit_nofile).when(h.nofile[1] >= fds, Status::Block),
        row("fs.nr_open", h.nr_open, nr_open, &why_nr_open, sysctl_fix("fs.nr_open", nr_open)).when(h.nr_open >= fds, Status::Block),
        row("fs.file-max", h.file_max, nofile + 4_000_000, &why_file_max, sysctl_fix("fs.file-max", nofile + 4_000_000))
            .is(if h.file_max < fds { Status::Block } else if h.file_max < fds + 65_536 { Status::Warn } else { Status::Ok }),
        row("RLIMIT_MEMLOCK", human(h.memlock), "unlimited", &why_lock, "systemd: LimitMEMLOCK=infinity (ringcast.service); shell: ulimit -l unlimited".into())
            .when(h.memlock >= memlock, Status::Block),
        row("net.core.somaxconn", h.somaxconn, 65_535, &why_backlog, sysctl_fix("net.core.somaxconn", 65_535)).when(h.somaxconn >= backlog, Status::Warn),
        row("net.ipv4.tcp_max_syn_backlog", h.tcp_max_syn_backlog, 65_535, "half-open connections held while the accept queues drain", sysctl_fix("net.ipv4.tcp_max_syn_backlog", 65_535))
            .when(h.tcp_max_syn_backlog >= backlog, Status::Warn),
        row("net.ipv4.tcp_rmem", triple(h.tcp_rmem), triple(TUNED_TCP_RMEM), &why_rmem, sysctl_fix("net.ipv4.tcp_rmem", triple(TUNED_TCP_RMEM)))
            .when(within(h.tcp_rmem, TUNED_TCP_RMEM), Status::Warn),
        row("net.ipv4.tcp_wmem", triple(h.tcp_wmem), triple(TUNED_TCP_WMEM), "bounds what a burst or a slow consumer pins per socket", sysctl_fix("net.ipv4.tcp_wmem", triple(TUNED_TCP_WMEM)))
            .when(within(h.tcp_wmem, TUNED_TCP_WMEM), Status::Warn),
        row("net.ipv4.tcp_mem", triple(h.tcp_mem_pages), triple(rec_mem), &why_mem, sysctl_fix("net.ipv4.tcp_mem", triple(rec_mem))).is(tcp_mem_status),
        row("net.core.rmem_max", h.rmem_max, 16_777_216, "caps the 4 MiB UDP ingest buffer; datagrams past it are dropped", sysctl_fix("net.core.rmem_max", 16_777_216))
            .when(h.rmem_max >= UDP_INGEST_RCVBUF, Status::Warn),
    ];
    if let Some(w) = h.epoll_max_user_watches {
        let why = "idle connections wait in a per-shard epoll set: one watch each, per user";
        rows.push(row("fs.epoll.max_user_watches", w, nofile, why, sysctl_fix("fs.epoll.max_user_watches", nofile)).when(w >= fds, Status::Block));
    }
    if let Some(d) = h.io_uring_disabled {
        rows.push(row("kernel.io_uring_disabled", d, 0, "ringcast's shards run on io_uring", sysctl_fix("kernel.io_uring_disabled", 0)).when(d == 0, Status::Block));
    }
    rows.push(conntrack_check(h, target));
    rows.push(row("net.ipv4.ip_local_port_range", format!("{lo} {hi}"), "1024 65535",
        "outbound only: load harness and bus links, not accepted connections", sysctl_fix("net.ipv4.ip_local_port_range", "1024 65535"))
        .when(hi + 1 - lo.min(hi) >= 60_000, Status::Warn));
    rows.push(reserved_ports_check(h, target));
    rows.push(row("MemTotal", human(h.mem_total), format!("at least {}", human(idle + reserve)), &why_ram,
        format!("a host with more RAM, or fewer connections per host (about {} each)", human(per_connection_bytes(h)))).is(ram_status));
    a.checks = rows;
    a
}

/// nf_conntrack: every accepted connection takes an entry; a full table drops new SYNs
/// ("nf_conntrack: table full, dropping packet"). Not loaded: nothing to do.
#[rustfmt::skip]
fn conntrack_check(h: &HostSnapshot, target: &Target) -> Check {
    let n = target.connections;
    let Some([max, count]) = h.conntrack else {
        let why = "module not loaded: connections are not tracked";
        return row("net.netfilter.nf_conntrack_max", "-", "-", why, String::new()).is(Status::Ok);
    };
    let rec = 262_144u64.max((2 * n).next_power_of_two());
    let port = target.ws_port;
    let fix = format!(
        "{} (and hashsize {} in /sys/module/nf_conntrack/parameters/hashsize), or do not track the listener: \
         iptables -t raw -A PREROUTING -p tcp --dport {port} -j NOTRACK; iptables -t raw -A OUTPUT -p tcp --sport {port} -j NOTRACK",
        sysctl_fix("net.netfilter.nf_conntrack_max", rec), rec / 4);
    let status = if max < n {
        Status::Block
    } else if max < n + count + n / 10 {
        Status::Warn
    } else {
        Status::Ok
    };
    let why = format!("{count} tracked now; each connection takes an entry ({CONNTRACK_BYTES_PER_CONNECTION} B); a full table drops new SYNs");
    Check { status, name: "net.netfilter.nf_conntrack_max", current: max.to_string(), recommended: rec.to_string(), why, fix }
}

/// ringcast's ports inside the ephemeral range can be taken by an outbound connection
/// (any process's) while ringcast restarts; its bind then fails with EADDRINUSE.
#[rustfmt::skip]
fn reserved_ports_check(h: &HostSnapshot, target: &Target) -> Check {
    let [lo, hi] = h.ip_local_port_range;
    let reserved = |p: u64| h.ip_local_reserved_ports.iter().any(|[a, b]| (*a..=*b).contains(&p));
    let exposed: Vec<u64> = target.ports.iter().map(|&p| u64::from(p)).filter(|p| (lo..=hi).contains(p) && !reserved(*p)).collect();
    let mut wanted = h.ip_local_reserved_ports.clone();
    wanted.extend(exposed.iter().map(|&p| [p, p]));
    wanted.sort_unstable();
    let list = |r: &[[u64; 2]]| if r.is_empty() { "(none)".to_string() } else { port_list(r) };
    let current = list(&h.ip_local_reserved_ports);
    let ports = target.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
    let why = if exposed.is_empty() {
        format!("ringcast's ports {ports} are outside the ephemeral range {lo}-{hi} or reserved")
    } else {
        let list = exposed.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
        format!("ports {list} are inside the ephemeral range {lo}-{hi}: an outbound connection can take one while ringcast restarts")
    };
    let fix = sysctl_fix("net.ipv4.ip_local_reserved_ports", port_list(&wanted));
    Check { status: if exposed.is_empty() { Status::Ok } else { Status::Warn }, name: "net.ipv4.ip_local_reserved_ports",
        current, recommended: list(&wanted), why, fix }
}

impl Display for Assessment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, cpus, t) = (self.target.connections, self.host.cpus, &self.target);
        let ports = t
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            f,
            "ringcast check-host: {n} connections, {cpus} CPUs, {} shards, ports {ports}",
            t.shards
        )?;
        for c in &self.checks {
            let (name, cur, rec, why) = (c.name, &c.current, &c.recommended, &c.why);
            match c.status {
                Status::Ok => writeln!(f, "OK     {name} = {cur} (recommended {rec}; {why})")?,
                Status::Warn => writeln!(f, "WARN   {name} = {cur} -> {rec} ({why})")?,
                Status::Block => writeln!(f, "BLOCK  {name} = {cur} -> {rec} ({why})")?,
            }
            if c.status != Status::Ok {
                writeln!(f, "       fix: {}", c.fix)?;
            }
        }
        let (k, u) = (KERNEL_BYTES_PER_IDLE_SOCKET, USER_BYTES_PER_IDLE_CONNECTION);
        let (kernel, user) = (human(n * k), human(n * u));
        let (idle, ram) = (human(self.idle_bytes()), human(self.host.mem_total));
        let (floor, cap) = (self.buffer_floor(), self.host.tcp_mem_pages[2] * PAGE);
        let (floor_total, os) = (human(n * floor), human(self.os_reserve()));
        let covered = cap >= n * floor;
        let covers = if covered { "covers" } else { "does NOT cover" };
        let cap = human(cap);
        let conntrack = match self.host.conntrack {
            Some(_) => format!("  conntrack {n} x {CONNTRACK_BYTES_PER_CONNECTION} B = {} (one entry per tracked connection)\n",
                human(n * CONNTRACK_BYTES_PER_CONNECTION)),
            None => String::new(),
        };
        write!(
            f,
            "\nmemory for {n} idle connections:\n  \
             kernel    {n} x {k} B = {kernel} (no socket buffers while idle)\n  \
             ringcast  {n} x {u} B = {user} (409 B RSS measured at 15k)\n\
             {conntrack}  \
             total     {idle} of {ram} MemTotal, keeping {os} for the OS (an eighth of RAM, 512 MiB..8 GiB)\n  \
             tcp_mem   max {cap} {covers} {n} x {floor} B floor = {floor_total}\n  \
             (floor: tcp_rmem[0] + tcp_wmem[0], what each socket keeps under pressure)\n\
             sysctl lines: apply with sysctl -w, keep in {SYSCTL_FILE} (kernel-tuning/99-ringcast.conf)\n\
             RLIMIT_* above are this process's; the service's own limits:\n  \
             systemctl show ringcast -p LimitNOFILE -p LimitMEMLOCK\n"
        )?;
        let warnings = self.with(Status::Warn).count();
        match self.blockers() {
            0 => writeln!(f, "\nresult: OK for {n} connections ({warnings} warnings)"),
            _ => {
                let names: Vec<_> = self.with(Status::Block).map(|c| c.name).collect();
                writeln!(
                    f,
                    "\nresult: BLOCKED for {n} connections by {} ({warnings} warnings)",
                    names.join(", ")
                )
            }
        }
    }
}

/// Reading the host failed: which file or limit, and why.
#[derive(Debug, Error)]
#[error("reading {0}: {1}")]
pub struct HostReadError(String, #[source] io::Error);

fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> HostReadError {
    |source| HostReadError(what.into(), source)
}

fn sysctl<const K: usize>(name: &str) -> Result<[u64; K], HostReadError> {
    let path = format!("/proc/sys/{name}");
    let values = std::fs::read_to_string(&path).and_then(|t| {
        let v: Option<Vec<u64>> = t.split_whitespace().map(|w| w.parse().ok()).collect();
        let bad = || io::Error::new(io::ErrorKind::InvalidData, t.trim().to_string());
        v.and_then(|v| v.try_into().ok()).ok_or_else(bad)
    });
    values.map_err(failed(path))
}

fn optional(name: &str) -> Result<Option<u64>, HostReadError> {
    let exists = std::path::Path::new("/proc/sys").join(name).exists();
    exists.then(|| sysctl(name).map(|[v]| v)).transpose()
}

fn reserved_ports() -> Result<Vec<[u64; 2]>, HostReadError> {
    let path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let text = std::fs::read_to_string(path).map_err(failed(path))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, text.trim().to_string());
    parse_port_list(&text).ok_or_else(|| failed(path)(bad()))
}

/// nf_conntrack_max and nf_conntrack_count, when the module is loaded.
fn conntrack() -> Result<Option<[u64; 2]>, HostReadError> {
    let max = optional("net/netfilter/nf_conntrack_max")?;
    let count = optional("net/netfilter/nf_conntrack_count")?;
    Ok(max.map(|m| [m, count.unwrap_or(0)]))
}

fn mem_total() -> Result<u64, HostReadError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(failed("/proc/meminfo"))?;
    let line = text.lines().find_map(|l| l.strip_prefix("MemTotal:"));
    let kib = line.and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    let missing = io::Error::new(io::ErrorKind::InvalidData, "no MemTotal line");
    kib.map(|k| k << 10)
        .ok_or_else(|| failed("/proc/meminfo")(missing))
}

/// Reads this process's limits and the host's sysctls.
///
/// # Errors
/// [`HostReadError`] naming the /proc file or limit that could not be read.
pub fn read_host() -> Result<HostSnapshot, HostReadError> {
    use nix::sys::resource::{getrlimit, Resource};
    let rlimit = |resource, what: &str| getrlimit(resource).map_err(|e| failed(what)(e.into()));
    let (soft, hard) = rlimit(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE")?;
    Ok(HostSnapshot {
        nofile: [soft, hard],
        memlock: rlimit(Resource::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK")?.0,
        file_max: sysctl::<1>("fs/file-max")?[0],
        nr_open: sysctl::<1>("fs/nr_open")?[0],
        somaxconn: sysctl::<1>("net/core/somaxconn")?[0],
        tcp_max_syn_backlog: sysctl::<1>("net/ipv4/tcp_max_syn_backlog")?[0],
        ip_local_port_range: sysctl("net/ipv4/ip_local_port_range")?,
        ip_local_reserved_ports: reserved_ports()?,
        tcp_mem_pages: sysctl("net/ipv4/tcp_mem")?,
        tcp_rmem: sysctl("net/ipv4/tcp_rmem")?,
        tcp_wmem: sysctl("net/ipv4/tcp_wmem")?,
        rmem_max: sysctl::<1>("net/core/rmem_max")?[0],
        epoll_max_user_watches: optional("fs/epoll/max_user_watches")?,
        io_uring_disabled: optional("kernel/io_uring_disabled")?,
        conntrack: conntrack()?,
        mem_total: mem_total()?,
        cpus: std::thread::available_parallelism().map_or(1, |c| c.get() as u64),
    })
}

/// `ringcast check-host`: prints the assessment. Exit code 0 when nothing blocks the
/// target (warnings allowed), 1 when something does, 3 when the host could not be read
/// (2 is clap's, for bad arguments).
pub fn run(target: &Target) -> ExitCode {
    match read_host() {
        Ok(host) => {
            let assessment = assess(&host, target);
            print!("{assessment}");
            ExitCode::from(u8::from(assessment.blockers() > 0))
        }
        Err(e) => {
            eprintln!("ringcast check-host: {e}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Debian 12 on a 16 GiB, 8-CPU box as installed (systemd raises fs.file-max), with
    /// nf_conntrack loaded by a firewall.
    #[rustfmt::skip]
    fn debian() -> HostSnapshot {
        HostSnapshot {
            nofile: [1024, 524_288], memlock: 8 * MIB, file_max: i64::MAX as u64, nr_open: 1 << 20,
            somaxconn: 4096, tcp_max_syn_backlog: 512, ip_local_port_range: [32_768, 60_999],
            ip_local_reserved_ports: Vec::new(),
            tcp_mem_pages: [188_508, 251_345, 377_016], tcp_rmem: [4096, 131_072, 6_291_456],
            tcp_wmem: [4096, 16_384, 4_194_304], rmem_max: 212_992, mem_total: 16 * GIB, cpus: 8,
            epoll_max_user_watches: Some(3_617_000), io_uring_disabled: Some(0),
            conntrack: Some([262_144, 120]),
        }
    }

    /// A 64 GiB, 32-CPU host with 99-ringcast.conf and ringcast.service applied, no
    /// conntrack module.
    #[rustfmt::skip]
    fn tuned() -> HostSnapshot {
        HostSnapshot {
            nofile: [16_000_000; 2], memlock: u64::MAX, file_max: 20_000_000, nr_open: 1 << 24,
            somaxconn: 65_535, tcp_max_syn_backlog: 65_535, ip_local_port_range: [1024, 65_535],
            ip_local_reserved_ports: vec![[8080, 8080], [9000, 9001], [9090, 9090]],
            tcp_mem_pages: [2_097_152, 3_145_728, 4_194_304], tcp_rmem: TUNED_TCP_RMEM,
            tcp_wmem: TUNED_TCP_WMEM, rmem_max: 16_777_216, mem_total: 64 * GIB, cpus: 32,
            epoll_max_user_watches: Some(16_000_000), io_uring_disabled: Some(0), conntrack: None,
        }
    }

    fn target(h: &HostSnapshot, connections: u64) -> Target {
        Target::defaults(connections, h.cpus)
    }

    /// The names of the checks that concluded `status`, space-separated.
    fn names(a: &Assessment, status: Status) -> String {
        a.with(status).map(|c| c.name).collect::<Vec<_>>().join(" ")
    }

    fn find<'a>(a: &'a Assessment, name: &str) -> &'a Check {
        let found = a.checks.iter().find(|c| c.name == name);
        found.unwrap_or_else(|| panic!("no {name} check in\n{a}"))
    }

    #[test]
    fn stock_host_passes_five_thousand_with_warnings() {
        let a = assess(&debian(), &target(&debian(), 5000));
        assert_eq!(a.blockers(), 0, "{a}");
        let warned = names(&a, Status::Warn);
        assert_eq!(
            warned,
            "net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_rmem net.ipv4.tcp_wmem \
             net.core.rmem_max net.ipv4.ip_local_port_range"
        );
        let text = a.to_string();
        assert!(
            text.contains("result: OK for 5000 connections (6 warnings)"),
            "{text}"
        );
        assert!(
            text.contains("       fix: sysctl -w net.ipv4.tcp_rmem=\"4096 8192 1048576\""),
            "{text}"
        );
    }

    #[test]
    fn stock_host_is_blocked_at_a_million_and_says_by_what() {
        let h = debian();
        let a = assess(&h, &target(&h, 1_000_000));
        let blocked = "RLIMIT_NOFILE fs.nr_open net.netfilter.nf_conntrack_max";
        assert_eq!(names(&a, Status::Block), blocked, "{a}");
        let text = a.to_string();
        assert!(
            text.contains("BLOCK  fs.nr_open = 1048576 -> 16777216 (needs >= 1050128"),
            "{text}"
        );
        assert!(
            text.contains("fix: systemd: LimitNOFILE=16000000 (ringcast.service)"),
            "{text}"
        );
        assert!(
            text.contains("result: BLOCKED for 1000000 connections by RLIMIT_NOFILE, fs.nr_open,"),
            "{text}"
        );
        // 1 M x 8 KiB floor = 7.6 GiB of burst; 16 GiB - 4.3 GiB idle - 2 GiB reserve leaves
        // 9.7 GiB, so the recommendation is the whole burst.
        assert_eq!(
            find(&a, "net.ipv4.tcp_mem").recommended,
            "1000000 1500000 2000000"
        );
        assert!(text.contains("max 1.4 GiB does NOT cover 1000000 x 8192 B floor = 7.6 GiB"));
        // Conntrack: the fix names the sysctl and the NOTRACK rules for the WebSocket port.
        let ct = find(&a, "net.netfilter.nf_conntrack_max");
        assert_eq!(ct.recommended, "2097152");
        assert!(ct.fix.contains("--dport 8080 -j NOTRACK"), "{}", ct.fix);
        assert!(text.contains("conntrack 1000000 x 320 B"), "{text}");
    }

    #[test]
    fn tuned_host_passes_at_one_and_ten_million() {
        let h = tuned();
        let a = assess(&h, &target(&h, 1_000_000));
        assert_eq!(
            names(&a, Status::Block) + &names(&a, Status::Warn),
            "",
            "{a}"
        );
        assert!(a.to_string().contains("max 16.0 GiB covers"), "{a}");
        // 10 M idle connections take 39.7 GiB: they fit, a burst to all of them would not.
        let a = assess(&h, &target(&h, 10_000_000));
        assert_eq!(
            (a.blockers(), a.idle_bytes()),
            (0, 10_000_000 * 4266),
            "{a}"
        );
        assert!(a.to_string().contains("max 16.0 GiB does NOT cover"), "{a}");
        assert_eq!(names(&a, Status::Warn), "net.ipv4.tcp_mem", "{a}");
        // Past the shipped files, the descriptor limits grow with the target.
        let a = assess(&h, &target(&h, 20_000_000));
        let rec: Vec<_> = a.checks.iter().map(|c| c.recommended.as_str()).collect();
        assert_eq!(rec[..3], ["22000000", "33554432", "26000000"]);
        assert!(a.checks[0].why.starts_with("needs >= 21000320: one"));
        assert!(names(&a, Status::Block).contains("MemTotal"), "{a}");
    }

    #[test]
    fn memory_advice_scales_with_ram_and_count() {
        let mut h = tuned();
        // A 4 GiB host keeps 512 MiB for the OS; 300k connections take 1.2 GiB idle and fit,
        // but the shipped 16 GiB tcp_mem would let socket buffers take what they need.
        h.mem_total = 4 * GIB;
        let a = assess(&h, &target(&h, 300_000));
        assert_eq!(find(&a, "MemTotal").status, Status::Ok, "{a}");
        let c = find(&a, "net.ipv4.tcp_mem");
        assert_eq!(c.status, Status::Warn, "{a}");
        // The recommendation: a burst to all (300k x 8 KiB), within what RAM leaves.
        let room = 4 * GIB - 300_000 * 4266 - 512 * MIB;
        let want = (300_000 * 8192u64).min(room) / PAGE;
        assert_eq!(
            c.recommended,
            format!("{} {} {want}", want / 2, want * 3 / 4)
        );
        // A million connections (4.3 GiB idle) do not fit in 4 GiB at all.
        let a = assess(&h, &target(&h, 1_000_000));
        assert_eq!(find(&a, "MemTotal").status, Status::Block, "{a}");
        // The same count on a 64 GiB host is fine, and the reserve is capped at 8 GiB.
        let a = assess(&tuned(), &target(&tuned(), 1_000_000));
        assert_eq!(
            (find(&a, "MemTotal").status, a.os_reserve()),
            (Status::Ok, 8 * GIB)
        );
        h.mem_total = 16 * GIB;
        assert_eq!(
            assess(&h, &target(&h, 1)).os_reserve(),
            2 * GIB,
            "an eighth of RAM"
        );
    }

    #[test]
    fn conntrack_blocks_below_the_count_and_warns_near_it() {
        let mut h = tuned();
        h.conntrack = Some([262_144, 0]);
        let status = |h: &HostSnapshot, n| {
            find(&assess(h, &target(h, n)), "net.netfilter.nf_conntrack_max").status
        };
        assert_eq!(status(&h, 100_000), Status::Ok);
        assert_eq!(status(&h, 250_000), Status::Warn);
        assert_eq!(status(&h, 300_000), Status::Block);
        // Others' tracked connections count too.
        h.conntrack = Some([262_144, 200_000]);
        assert_eq!(status(&h, 100_000), Status::Warn);
        h.conntrack = None;
        assert_eq!(status(&h, 10_000_000), Status::Ok);
    }

    #[test]
    fn own_ports_in_the_ephemeral_range_need_reserving() {
        let mut h = debian();
        let mut t = target(&h, 1000);
        t.ports = vec![8080, 40_000, 50_000];
        h.ip_local_reserved_ports = vec![[50_000, 50_010]];
        let a = assess(&h, &t);
        let c = find(&a, "net.ipv4.ip_local_reserved_ports");
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.why
                .starts_with("ports 40000 are inside the ephemeral range 32768-60999"),
            "{}",
            c.why
        );
        assert_eq!(
            c.fix,
            "sysctl -w net.ipv4.ip_local_reserved_ports=40000,50000-50010"
        );
        assert_eq!(a.blockers(), 0, "a restart risk, not a blocker");
        // Default ports (8080, 9000, 9001, 9090) sit below Debian's range.
        let a = assess(&debian(), &target(&debian(), 1000));
        assert_eq!(
            find(&a, "net.ipv4.ip_local_reserved_ports").status,
            Status::Ok
        );
    }

    #[test]
    fn io_uring_locked_memory_and_epoll_are_required() {
        let (mut h, expected) = (
            tuned(),
            "RLIMIT_MEMLOCK fs.epoll.max_user_watches kernel.io_uring_disabled",
        );
        (h.memlock, h.cpus, h.epoll_max_user_watches) = (64 << 10, 128, Some(9));
        h.io_uring_disabled = Some(2);
        assert_eq!(
            names(&assess(&h, &target(&h, 1000)), Status::Block),
            expected
        );
        (h.io_uring_disabled, h.epoll_max_user_watches) = (None, None);
        let a = assess(&h, &target(&h, 1000));
        assert_eq!(a.checks.len(), 14, "older kernels lack both sysctls");
        // Locked memory follows io_memory and the shard count.
        let mut t = target(&h, 1000);
        (t.shards, t.io_memory, h.memlock) = (2, 4 * MIB, 8 * MIB);
        assert_eq!(
            find(&assess(&h, &t), "RLIMIT_MEMLOCK").status,
            Status::Block
        );
        t.io_memory = MIB;
        assert_eq!(find(&assess(&h, &t), "RLIMIT_MEMLOCK").status, Status::Ok);
    }

    #[test]
    fn every_finding_says_its_fix() {
        let h = debian();
        for n in [1, 5000, 1_000_000, 100_000_000] {
            let a = assess(&h, &target(&h, n));
            for c in a.checks.iter().filter(|c| c.status != Status::Ok) {
                assert!(!c.fix.is_empty(), "{} at {n} has no fix", c.name);
            }
        }
    }

    #[test]
    fn reserved_ports_parse() {
        assert_eq!(parse_port_list("\n"), Some(vec![]));
        assert_eq!(
            parse_port_list("8080,9000-9001\n"),
            Some(vec![[8080, 8080], [9000, 9001]])
        );
        assert_eq!(parse_port_list("9-1"), None);
        assert_eq!(parse_port_list("x"), None);
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused(text in ".*") {
            let _ = parse_port_list(&text);
        }

        #[test]
        fn port_lists_round_trip(ranges in proptest::collection::vec((0u64..65_536, 0u64..100), 0..8)) {
            let ranges: Vec<[u64; 2]> = ranges.into_iter().map(|(a, w)| [a, a + w]).collect();
            prop_assert_eq!(parse_port_list(&port_list(&ranges)), Some(ranges));
        }

        #[test]
        fn any_host_and_count_assess_without_panic(
            n in 1u64..100_000_000, mem in 0u64..(1 << 42), nofile in 0u64..u64::MAX,
            pages in 0u64..(1 << 30), ct in proptest::option::of((0u64..1 << 24, 0u64..1 << 24)),
        ) {
            let mut h = debian();
            (h.mem_total, h.nofile, h.tcp_mem_pages[2]) = (mem, [nofile, nofile], pages);
            h.conntrack = ct.map(|(m, c)| [m, c]);
            let a = assess(&h, &target(&h, n));
            let _ = a.to_string();
        }
    }
}
