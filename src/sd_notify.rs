//! systemd's readiness protocol (`sd_notify(3)`) without libsystemd: newline-separated
//! `KEY=value` assignments in one datagram to the Unix socket named by `$NOTIFY_SOCKET`.
//!
//! ringcast sends `READY=1` once every shard serves (the moment "ringcast started" is
//! logged and `/readyz` turns 200), `STOPPING=1` when a SIGTERM/SIGINT starts the
//! shutdown, `RELOADING=1` with `MONOTONIC_USEC=` before a SIGHUP reload and `READY=1`
//! after it (what `Type=notify-reload`, systemd 253+, waits for), and a `STATUS=` line with
//! each. Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) nothing is
//! sent.
//!
//! [`parse_address`] and [`message`] are pure; [`Notifier`] only sends.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddress {
    /// A socket file (`/run/systemd/notify`).
    Path(PathBuf),
    /// A Linux abstract-namespace name, written with a leading `@` (the `@` is not part of
    /// the name; on the wire it is a leading NUL byte).
    Abstract(Vec<u8>),
}

/// Reads a `$NOTIFY_SOCKET` value: an absolute path, or `@name` for the abstract namespace.
/// Anything else (empty, relative, `vsock:` addresses systemd uses for VMs) is `None`.
pub fn parse_address(value: &str) -> Option<NotifyAddress> {
    if let Some(name) = value.strip_prefix('@') {
        return (!name.is_empty()).then(|| NotifyAddress::Abstract(name.as_bytes().to_vec()));
    }
    value
        .starts_with('/')
        .then(|| NotifyAddress::Path(PathBuf::from(value)))
}

/// One state change to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// Every shard serves; `status` says what listens.
    Ready {
        /// The `STATUS=` text.
        status: &'a str,
    },
    /// A SIGHUP reload starts, at `monotonic_usec` (CLOCK_MONOTONIC, microseconds).
    Reloading {
        /// CLOCK_MONOTONIC now, in microseconds.
        monotonic_usec: u64,
    },
    /// The reload finished (applied or refused); serving again.
    Reloaded {
        /// The `STATUS=` text.
        status: &'a str,
    },
    /// A SIGTERM/SIGINT started the shutdown.
    Stopping {
        /// The `STATUS=` text.
        status: &'a str,
    },
    /// Only a new `STATUS=` line (drain progress).
    Status(&'a str),
}

/// The datagram for `event`. Newlines in a status would start a new assignment, so they
/// become spaces.
pub fn message(event: &Event<'_>) -> String {
    let status = |s: &str| format!("STATUS={}", s.replace(['\n', '\r'], " "));
    match event {
        Event::Ready { status: s } | Event::Reloaded { status: s } => {
            format!("READY=1\n{}\n", status(s))
        }
        Event::Reloading { monotonic_usec } => {
            format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=reloading the configuration\n")
        }
        Event::Stopping { status: s } => format!("STOPPING=1\n{}\n", status(s)),
        Event::Status(s) => format!("{}\n", status(s)),
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux,
    // so the call only writes `ts` and returns 0.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Sends to `$NOTIFY_SOCKET`, read once at start.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a missing or unusable value makes every send a no-op (logged
    /// once when the value was set but could not be used).
    pub fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        let value = value.to_string_lossy().into_owned();
        match Self::connect(&value) {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!(notify_socket = %value, error = %e, "NOTIFY_SOCKET is set but unusable; systemd will not hear READY=1");
                Notifier { target: None }
            }
        }
    }

    fn connect(value: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
        let addr = match parse_address(value) {
            Some(NotifyAddress::Path(p)) => SocketAddr::from_pathname(p)?,
            Some(NotifyAddress::Abstract(name)) => SocketAddr::from_abstract_name(name)?,
            None => {
                let e = "not an absolute path or @abstract name";
                return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
            }
        };
        Ok((UnixDatagram::unbound()?, addr))
    }

    /// Whether systemd listens (`$NOTIFY_SOCKET` was usable).
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `event`; a failed send is logged, never fatal (the server works without it).
    pub fn send(&self, event: &Event<'_>) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        let text = message(event);
        if let Err(e) = socket.send_to_addr(text.as_bytes(), addr) {
            tracing::warn!(error = %e, message = %text.trim_end(), "sd_notify send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn addresses() {
        let path = Some(NotifyAddress::Path("/run/systemd/notify".into()));
        assert_eq!(parse_address("/run/systemd/notify"), path);
        let name = Some(NotifyAddress::Abstract(b"ringcast/notify".to_vec()));
        assert_eq!(parse_address("@ringcast/notify"), name);
        for bad in ["", "@", "run/notify", "vsock:2:1234"] {
            assert_eq!(parse_address(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn messages() {
        let ready = message(&Event::Ready { status: "serving" });
        assert_eq!(ready, "READY=1\nSTATUS=serving\n");
        let reloading = message(&Event::Reloading { monotonic_usec: 42 });
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC=42\n"),
            "{reloading}"
        );
        let stopping = message(&Event::Stopping { status: "a\nb" });
        assert_eq!(stopping, "STOPPING=1\nSTATUS=a b\n");
        assert_eq!(message(&Event::Status("x")), "STATUS=x\n");
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let (a, b) = (monotonic_usec(), monotonic_usec());
        assert!(a > 0 && b >= a);
    }

    proptest! {
        #[test]
        fn any_value_parses_or_is_refused_without_panic(value in ".*") {
            let _ = parse_address(&value);
        }

        #[test]
        fn a_status_is_always_one_assignment(status in ".*") {
            let text = message(&Event::Status(&status));
            prop_assert_eq!(text.matches('\n').count(), 1);
            prop_assert!(text.starts_with("STATUS="));
        }
    }
}
