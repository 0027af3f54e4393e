//! Fitting N connections onto this box: file descriptors, worker processes, source ports.
//!
//! Each worker process holds at most `--conns-per-worker` sockets and never more than its
//! RLIMIT_NOFILE allows (the soft limit is first raised to the hard limit). Loopback
//! targets get source addresses 127.0.0.1..127.0.0.N by default: with
//! IP_BIND_ADDRESS_NO_PORT the kernel picks ports per (source, destination) pair, so every
//! source address brings a whole `ip_local_port_range` of its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// fds a worker keeps for itself (epoll, waker, stdio, a few spares).
const RESERVED_FDS: u64 = 64;

/// Why the requested load does not fit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// RLIMIT_NOFILE is too low to hold any meaningful number of sockets per process.
    #[error(
        "RLIMIT_NOFILE is {limit} (hard limit {hard}); a worker needs at least {need} file \
         descriptors; raise it with `ulimit -n` or LimitNOFILE="
    )]
    FdLimit {
        /// Soft limit after raising.
        limit: u64,
        /// Hard limit.
        hard: u64,
        /// Minimum needed.
        need: u64,
    },
    /// More worker processes would be needed than allowed.
    #[error(
        "{conns} connections need {workers} worker processes of at most {per_worker} \
         connections each (--conns-per-worker, capped by RLIMIT_NOFILE {limit}), more than \
         --max-workers {max}; raise --max-workers, or raise the fd limit (ulimit -n) and \
         --conns-per-worker"
    )]
    TooManyWorkers {
        /// Connections requested.
        conns: u64,
        /// Workers that would be needed.
        workers: u64,
        /// Connections per worker possible.
        per_worker: u64,
        /// Soft fd limit.
        limit: u64,
        /// Allowed workers.
        max: u64,
    },
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) afterwards.
pub fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (1024, 1024);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// How connections are split over worker processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    /// Connections for each worker, in order.
    pub per_worker: Vec<u64>,
    /// The fd limit each worker runs with.
    pub fd_limit: u64,
}

/// Splits `conns` over as few workers as the fd limit and `cap` allow (or exactly
/// `workers` when given).
///
/// # Errors
/// The fd limit is too low, or more than `max_workers` would be needed.
pub fn plan_workers(
    conns: u64,
    cap: u64,
    workers: Option<u64>,
    max_workers: u64,
    (soft, hard): (u64, u64),
) -> Result<WorkerPlan, LimitError> {
    if soft < RESERVED_FDS + 16 {
        return Err(LimitError::FdLimit {
            limit: soft,
            hard,
            need: RESERVED_FDS + 16,
        });
    }
    let per_worker = cap.clamp(1, soft - RESERVED_FDS);
    let needed = conns.div_ceil(per_worker).max(1);
    let count = workers.unwrap_or(needed).max(needed);
    if count > max_workers {
        return Err(LimitError::TooManyWorkers {
            conns,
            workers: count,
            per_worker,
            limit: soft,
            max: max_workers,
        });
    }
    let base = conns / count;
    let extra = conns % count;
    let per_worker = (0..count).map(|i| base + u64::from(i < extra)).collect();
    Ok(WorkerPlan {
        per_worker,
        fd_limit: soft,
    })
}

/// Source addresses for connections to `target`: the explicit list if given, else
/// 127.0.0.1..127.0.0.`count` for an IPv4 loopback target, else none (kernel's choice).
pub fn source_ips(target: SocketAddr, explicit: &[IpAddr], count: u8) -> Vec<IpAddr> {
    if !explicit.is_empty() {
        return explicit.to_vec();
    }
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => (1..=count.max(1))
            .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            .collect(),
        _ => Vec::new(),
    }
}

/// `conns` connections to one address from `sources` addresses need more local ports
/// than `ip_local_port_range` gives.
pub fn port_warning(conns: u64, sources: usize) -> Option<String> {
    let range = read_sys("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut parts = range
        .split_whitespace()
        .filter_map(|p| p.parse::<u64>().ok());
    let (lo, hi) = (parts.next()?, parts.next()?);
    let ports = (hi.saturating_sub(lo) + 1) * sources.max(1) as u64;
    (conns > ports).then(|| {
        format!(
            "{conns} connections to one address need more than the {ports} local ports \
             of {sources} source address(es) × ip_local_port_range {lo}-{hi}; add \
             --source-count/--source-ips or widen net.ipv4.ip_local_port_range"
        )
    })
}

/// Client and server sockets of `conns` connections (both on this host) exceed
/// `fs.file-max`.
pub fn file_max_warning(conns: u64) -> Option<String> {
    let max = read_sys("/proc/sys/fs/file-max")?
        .trim()
        .parse::<u64>()
        .ok()?;
    (conns * 2 > max).then(|| {
        format!(
            "fs.file-max is {max}; client and server sockets together need about {}",
            conns * 2
        )
    })
}

fn read_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_by_fd_limit() {
        let plan = plan_workers(50_000, 15_000, None, 64, (20_000, 20_000));
        assert_eq!(plan.ok().map(|p| p.per_worker), Some(vec![12_500; 4]));
        let small = plan_workers(200, 15_000, None, 64, (20_000, 20_000));
        assert_eq!(small.ok().map(|p| p.per_worker), Some(vec![200]));
        let forced = plan_workers(5, 15_000, Some(2), 64, (20_000, 20_000));
        assert_eq!(forced.ok().map(|p| p.per_worker), Some(vec![3, 2]));
    }

    #[test]
    fn refuses_what_cannot_fit() {
        let err = plan_workers(1_000_000, 15_000, None, 4, (20_000, 20_000));
        assert!(matches!(
            err,
            Err(LimitError::TooManyWorkers { workers: 67, .. })
        ));
        let err = plan_workers(10, 15_000, None, 4, (50, 50));
        assert!(matches!(err, Err(LimitError::FdLimit { .. })));
    }

    #[test]
    fn loopback_gets_spread_sources() {
        let target: SocketAddr = ([127, 0, 0, 1], 8080).into();
        let ips = source_ips(target, &[], 4);
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)));
        let v6: SocketAddr = "[::1]:8080".parse().unwrap_or(target);
        assert!(source_ips(v6, &[], 4).is_empty());
    }
}
