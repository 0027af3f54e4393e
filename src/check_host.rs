//! `ringcast check-host`: reads this host's limits and sysctls and says what to change to
//! hold a target number of connections, with the memory math behind it.
//!
//! [`assess`] is pure: a [`HostSnapshot`] and a connection count in, an [`Assessment`] of
//! `OK` / `CHANGE` / `NOTE` lines out (`NOTE` never fails the check). [`read_host`] is the
//! only part that touches `/proc`. Recommended values are those of
//! `kernel-tuning/99-ringcast.conf` and `ringcast.service`, scaled up when the target needs
//! more; per-connection costs are the ones derived in `kernel-tuning/README.md`.

use std::fmt::{self, Display};
use std::io;
use std::process::ExitCode;
use thiserror::Error;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Kernel bytes per idle socket (6.x x86-64 slabs): tcp_sock 2368, socket inode 832, file
/// 192, dentry 192, readiness entry 256 at most, fd table and hash share 16. With the tuned
/// tcp_rmem/tcp_wmem an idle socket holds no buffer memory.
pub const KERNEL_BYTES_PER_IDLE_SOCKET: u64 = 3856;
/// ringcast's bytes per idle connection: 409 B RSS measured at 15k idle connections.
pub const USER_BYTES_PER_IDLE_CONNECTION: u64 = 410;
const TUNED_TCP_RMEM: [u64; 3] = [4096, 8192, 1 << 20];
const TUNED_TCP_WMEM: [u64; 3] = [4096, 16384, 1 << 20];
/// SO_RCVBUF the UDP ingest socket asks for (capped by net.core.rmem_max).
const UDP_INGEST_RCVBUF: u64 = 4 * MIB;
/// Locked memory per shard: 256 KiB of registered buffers, plus rings before kernel 5.12.
const MEMLOCK_PER_SHARD: u64 = MIB;

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
    /// MemTotal from /proc/meminfo, in bytes.
    pub mem_total: u64,
    /// CPUs this process may run on (ringcast's default shard count).
    pub cpus: u64,
}

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The current value is enough.
    Ok,
    /// The current value must change for the target; fails the check.
    Change,
    /// Worth changing, but the server does not depend on it.
    Note,
}

/// One setting: its value now, the value to set, and why.
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
}

/// The verdicts and the memory estimate for one host and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// Target connections.
    pub connections: u64,
    /// The host as read.
    pub host: HostSnapshot,
    /// One entry per setting, in print order.
    pub checks: Vec<Check>,
}

impl Assessment {
    /// How many checks say CHANGE; any makes the exit code 1.
    pub fn changes(&self) -> usize {
        let change = |c: &&Check| c.status == Status::Change;
        self.checks.iter().filter(change).count()
    }

    /// Kernel plus ringcast memory for the idle connections, in bytes.
    pub fn idle_bytes(&self) -> u64 {
        self.connections * (KERNEL_BYTES_PER_IDLE_SOCKET + USER_BYTES_PER_IDLE_CONNECTION)
    }

    /// RAM left to the OS and page cache: 8 GiB, or half of a smaller host.
    pub fn os_reserve(&self) -> u64 {
        (8 * GIB).min(self.host.mem_total / 2)
    }

    /// The buffer memory every socket is guaranteed under pressure: tcp_rmem[0] +
    /// tcp_wmem[0]. Above tcp_mem's max even that allocation fails.
    pub fn buffer_floor(&self) -> u64 {
        self.host.tcp_rmem[0] + self.host.tcp_wmem[0]
    }
}

// One line per field would make this helper longer than the table that calls it.
#[rustfmt::skip]
fn check(ok: bool, name: &'static str, cur: impl Display, rec: impl Display, why: &str) -> Check {
    let status = if ok { Status::Ok } else { Status::Change };
    Check { status, name, current: cur.to_string(), recommended: rec.to_string(), why: why.into() }
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

/// Decides what `host` must change to hold `connections`. Pure: no I/O.
// rustfmt would give every row of the table below seven lines.
#[rustfmt::skip]
pub fn assess(host: &HostSnapshot, connections: u64) -> Assessment {
    let (n, h) = (connections, host);
    let mut a = Assessment { connections: n, host: h.clone(), checks: Vec::new() };
    // Sockets past max_connections are accepted, answered 503 and closed (5%); the server
    // itself holds listeners, rings and eventfds (the allowance the shards warn with).
    let fds = n + n / 20 + 64 + 8 * h.cpus;
    let nofile = 16_000_000u64.max(fds.div_ceil(1_000_000) * 1_000_000);
    let nr_open = 16_777_216u64.max(nofile.next_power_of_two());
    let backlog = n.min(65_535);
    let memlock = h.cpus * MEMLOCK_PER_SHARD;
    // README rule of thumb: tcp_mem max = RAM - idle connections - OS reserve, in 256 MiB
    // steps, at most the shipped 16 GiB; at least enough for every socket's floor.
    let room = h.mem_total.saturating_sub(a.idle_bytes() + a.os_reserve());
    let tcp_mem = (room / (256 * MIB) * (256 * MIB)).clamp(256 * MIB, 16 * GIB);
    let tcp_mem_min = tcp_mem.min(n * a.buffer_floor());
    let tcp_mem_ok = (tcp_mem_min..=room.max(tcp_mem)).contains(&(h.tcp_mem_pages[2] * 4096));
    let (p, ram) = (tcp_mem / 4096, a.idle_bytes() + a.os_reserve());
    let [lo, hi] = h.ip_local_port_range;
    let triple = |v: [u64; 3]| format!("{} {} {}", v[0], v[1], v[2]);
    let within = |cur: [u64; 3], max: [u64; 3]| cur.iter().zip(max).all(|(c, m)| *c <= m);
    let fd_text = |v: u64| if v == u64::MAX { "unlimited".into() } else { v.to_string() };
    let soft_hard = format!("{}/{} (soft/hard)", fd_text(h.nofile[0]), fd_text(h.nofile[1]));
    let why_fds = format!("needs >= {fds}: one descriptor per connection; soft is raised to hard");
    let why_lock = format!("needs >= {}: io_uring rings and buffers are locked", human(memlock));
    let why_mem = format!("pages; max >= {} and <= {} (RAM - idle - OS)", human(tcp_mem_min), human(room));
    let why_ram = format!("idle connections + {} for the OS", human(a.os_reserve()));
    let note = |c: Check| Check { status: if c.status == Status::Ok { c.status } else { Status::Note }, ..c };
    let rows = [
        Some(check(h.nofile[1] >= fds, "RLIMIT_NOFILE", soft_hard, nofile, &why_fds)),
        Some(check(h.nr_open >= fds, "fs.nr_open", h.nr_open, nr_open, "each connection is one descriptor; LimitNOFILE cannot exceed fs.nr_open")),
        Some(check(h.file_max >= fds + 65_536, "fs.file-max", h.file_max, nofile + 4_000_000, "system-wide open files: every connection plus the rest of the host")),
        Some(check(h.memlock >= memlock, "RLIMIT_MEMLOCK", human(h.memlock), "unlimited", &why_lock)),
        Some(check(h.somaxconn >= backlog, "net.core.somaxconn", h.somaxconn, 65_535, "caps each shard's accept queue; a reconnect storm overflows it")),
        Some(check(h.tcp_max_syn_backlog >= backlog, "net.ipv4.tcp_max_syn_backlog", h.tcp_max_syn_backlog, 65_535, "half-open connections held while the accept queues drain")),
        Some(check(within(h.tcp_rmem, TUNED_TCP_RMEM), "net.ipv4.tcp_rmem", triple(h.tcp_rmem), triple(TUNED_TCP_RMEM), "clients send only small commands; big receive buffers multiply by N")),
        Some(check(within(h.tcp_wmem, TUNED_TCP_WMEM), "net.ipv4.tcp_wmem", triple(h.tcp_wmem), triple(TUNED_TCP_WMEM), "bounds what a burst or a slow consumer pins per socket")),
        Some(check(tcp_mem_ok, "net.ipv4.tcp_mem", triple(h.tcp_mem_pages), triple([p / 2, p * 3 / 4, p]), &why_mem)),
        Some(check(h.rmem_max >= UDP_INGEST_RCVBUF, "net.core.rmem_max", h.rmem_max, 16_777_216, "caps the 4 MiB UDP ingest buffer; datagrams past it are dropped")),
        h.epoll_max_user_watches.map(|w| check(w >= fds, "fs.epoll.max_user_watches", w, nofile, "idle connections wait in a per-shard epoll set: one watch each, per user")),
        h.io_uring_disabled.map(|d| check(d == 0, "kernel.io_uring_disabled", d, 0, "ringcast's shards run on io_uring")),
        Some(note(check(hi + 1 - lo.min(hi) >= 60_000, "net.ipv4.ip_local_port_range", format!("{lo} {hi}"), "1024 65535", "outbound only: load harness and bus links, not accepted connections"))),
        Some(check(h.mem_total >= ram, "MemTotal", human(h.mem_total), format!("at least {}", human(ram)), &why_ram)),
    ];
    a.checks = rows.into_iter().flatten().collect();
    a
}

impl Display for Assessment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, cpus) = (self.connections, self.host.cpus);
        writeln!(f, "ringcast check-host: {n} connections, {cpus} CPUs")?;
        for c in &self.checks {
            let (name, cur, rec, why) = (c.name, &c.current, &c.recommended, &c.why);
            match c.status {
                Status::Ok => writeln!(f, "OK     {name} = {cur} (recommended {rec}; {why})")?,
                Status::Change => writeln!(f, "CHANGE {name} = {cur} -> {rec} ({why})")?,
                Status::Note => writeln!(f, "NOTE   {name} = {cur} -> {rec} ({why})")?,
            }
        }
        let (k, u) = (KERNEL_BYTES_PER_IDLE_SOCKET, USER_BYTES_PER_IDLE_CONNECTION);
        let (kernel, user) = (human(n * k), human(n * u));
        let (idle, ram) = (human(self.idle_bytes()), human(self.host.mem_total));
        let (floor, cap) = (self.buffer_floor(), self.host.tcp_mem_pages[2] * 4096);
        let (floor_total, os) = (human(n * floor), human(self.os_reserve()));
        let covered = cap >= n * floor;
        let covers = if covered { "covers" } else { "does NOT cover" };
        let cap = human(cap);
        write!(
            f,
            "\nmemory for {n} idle connections:\n  \
             kernel    {n} x {k} B = {kernel} (no socket buffers while idle)\n  \
             ringcast  {n} x {u} B = {user} (409 B RSS measured at 15k)\n  \
             total     {idle} of {ram} MemTotal, keeping {os} for the OS\n  \
             tcp_mem   max {cap} {covers} {n} x {floor} B floor = {floor_total}\n  \
             (floor: tcp_rmem[0] + tcp_wmem[0], what each socket keeps under pressure)\n\
             RLIMIT_* above are this process's; the service's own limits:\n  \
             systemctl show ringcast -p LimitNOFILE -p LimitMEMLOCK\n"
        )?;
        match self.changes() {
            0 => writeln!(f, "\nresult: OK for {n} connections"),
            k => writeln!(f, "\nresult: {k} to change (files in kernel-tuning/)"),
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
        tcp_mem_pages: sysctl("net/ipv4/tcp_mem")?,
        tcp_rmem: sysctl("net/ipv4/tcp_rmem")?,
        tcp_wmem: sysctl("net/ipv4/tcp_wmem")?,
        rmem_max: sysctl::<1>("net/core/rmem_max")?[0],
        epoll_max_user_watches: optional("fs/epoll/max_user_watches")?,
        io_uring_disabled: optional("kernel/io_uring_disabled")?,
        mem_total: mem_total()?,
        cpus: std::thread::available_parallelism().map_or(1, |c| c.get() as u64),
    })
}

/// `ringcast check-host`: prints the assessment. Exit code 0 when everything is OK, 1 when
/// something must change or the host could not be read.
pub fn run(connections: u64) -> ExitCode {
    match read_host() {
        Ok(host) => {
            let assessment = assess(&host, connections);
            print!("{assessment}");
            ExitCode::from(u8::from(assessment.changes() > 0))
        }
        Err(e) => {
            eprintln!("ringcast check-host: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12 on a 16 GiB, 8-CPU box as installed (systemd raises fs.file-max).
    #[rustfmt::skip]
    fn debian() -> HostSnapshot {
        HostSnapshot {
            nofile: [1024, 524_288], memlock: 8 * MIB, file_max: i64::MAX as u64, nr_open: 1 << 20,
            somaxconn: 4096, tcp_max_syn_backlog: 512, ip_local_port_range: [32_768, 60_999],
            tcp_mem_pages: [188_508, 251_345, 377_016], tcp_rmem: [4096, 131_072, 6_291_456],
            tcp_wmem: [4096, 16_384, 4_194_304], rmem_max: 212_992, mem_total: 16 * GIB, cpus: 8,
            epoll_max_user_watches: Some(3_617_000), io_uring_disabled: Some(0),
        }
    }

    /// A 64 GiB, 32-CPU host with 99-ringcast.conf and ringcast.service applied.
    #[rustfmt::skip]
    fn tuned() -> HostSnapshot {
        HostSnapshot {
            nofile: [16_000_000; 2], memlock: u64::MAX, file_max: 20_000_000, nr_open: 1 << 24,
            somaxconn: 65_535, tcp_max_syn_backlog: 65_535, ip_local_port_range: [1024, 65_535],
            tcp_mem_pages: [2_097_152, 3_145_728, 4_194_304], tcp_rmem: TUNED_TCP_RMEM,
            tcp_wmem: TUNED_TCP_WMEM, rmem_max: 16_777_216, mem_total: 64 * GIB, cpus: 32,
            epoll_max_user_watches: Some(16_000_000), io_uring_disabled: Some(0),
        }
    }

    /// The names of the checks that concluded `status`, space-separated.
    fn names(a: &Assessment, status: Status) -> String {
        let named = a.checks.iter().filter(|c| c.status == status);
        named.map(|c| c.name).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn default_debian_host_needs_changes_for_a_million() {
        let a = assess(&debian(), 1_000_000);
        let (text, changed) = (a.to_string(), names(&a, Status::Change));
        let expected = "RLIMIT_NOFILE fs.nr_open net.core.somaxconn net.ipv4.tcp_max_syn_backlog \
                        net.ipv4.tcp_rmem net.ipv4.tcp_wmem net.ipv4.tcp_mem net.core.rmem_max";
        assert_eq!(changed, expected);
        assert_eq!(names(&a, Status::Note), "net.ipv4.ip_local_port_range");
        assert!(text.contains("CHANGE fs.nr_open = 1048576 -> 16777216 (each connection"));
        // 16 GiB - 3.6 GiB kernel - 0.4 GiB ringcast - 8 GiB OS = 4.03 GiB -> 4 GiB.
        assert!(text.contains("tcp_mem = 188508 251345 377016 -> 524288 786432 1048576"));
        assert!(text.contains("max 1.4 GiB does NOT cover 1000000 x 8192 B floor = 7.6 GiB"));
    }

    #[test]
    fn tuned_host_passes_at_one_and_ten_million() {
        let a = assess(&tuned(), 1_000_000);
        assert_eq!(names(&a, Status::Change) + &names(&a, Status::Note), "");
        assert!(a.to_string().contains("max 16.0 GiB covers"), "{a}");
        // 10 M idle connections take 39.7 GiB: they fit, a burst to all of them would not.
        let a = assess(&tuned(), 10_000_000);
        assert_eq!((a.changes(), a.idle_bytes()), (0, 10_000_000 * 4266), "{a}");
        assert!(a.to_string().contains("max 16.0 GiB does NOT cover"), "{a}");
        // Past the shipped files, the descriptor limits grow with the target.
        let a = assess(&tuned(), 20_000_000);
        let rec: Vec<_> = a.checks.iter().map(|c| c.recommended.as_str()).collect();
        assert_eq!(rec[..3], ["22000000", "33554432", "26000000"]);
        assert!(a.checks[0].why.starts_with("needs >= 21000320: one"));
    }

    #[test]
    fn shipped_tcp_mem_is_too_big_for_a_small_host() {
        let mut h = tuned();
        h.mem_total = 16 * GIB;
        assert_eq!(
            names(&assess(&h, 1_000_000), Status::Change),
            "net.ipv4.tcp_mem"
        );
        h.mem_total = 32 * GIB;
        let changed = names(&assess(&h, 10_000_000), Status::Change);
        assert_eq!(changed, "net.ipv4.tcp_mem MemTotal");
    }

    #[test]
    fn io_uring_locked_memory_and_epoll_are_required() {
        let (mut h, expected) = (
            tuned(),
            "RLIMIT_MEMLOCK fs.epoll.max_user_watches kernel.io_uring_disabled",
        );
        (h.memlock, h.cpus, h.epoll_max_user_watches) = (64 << 10, 128, Some(9));
        h.io_uring_disabled = Some(2);
        assert_eq!(names(&assess(&h, 1000), Status::Change), expected);
        (h.io_uring_disabled, h.epoll_max_user_watches) = (None, None);
        assert_eq!(
            assess(&h, 1000).checks.len(),
            12,
            "older kernels lack both sysctls"
        );
    }
}
