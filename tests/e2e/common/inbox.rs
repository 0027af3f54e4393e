//! A server with the durable inbox on, restarted on the same ports and data directory
//! while its clients wait behind a [`TcpGate`] (so the test, not a timer, decides when
//! they may come back).

use std::path::Path;
use std::time::Duration;

use super::{wait_until, Ports, Server, TcpGate};

/// A temporary data directory and the args of a server using it for the inbox, with
/// tokens signed by `secret` and a one-second drain window.
pub struct InboxServer {
    dir: tempfile::TempDir,
    secret: String,
}

impl InboxServer {
    /// A fresh data directory for a server whose tokens are signed with `secret`.
    pub fn new(secret: &str) -> InboxServer {
        InboxServer {
            dir: tempfile::tempdir().expect("temp dir"),
            secret: secret.to_string(),
        }
    }

    /// The server's args.
    pub fn args(&self) -> Vec<&str> {
        vec![
            "--jwt-secret",
            &self.secret,
            "--inbox",
            "true",
            "--data-dir",
            self.data_dir().to_str().expect("utf-8 temp dir"),
            "--drain-window",
            "1",
        ]
    }

    /// The inbox's data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server on free ports.
    pub fn start(&self) -> Server {
        Server::start(&self.args())
    }

    /// Starts it again on `ports` (those of the server it replaces), on the same data.
    pub fn restart_on(&self, ports: Ports) -> Server {
        Server::start_on(ports, &self.args())
    }
}

/// Shuts `gate` (its clients cannot come back), then drains `server` with SIGTERM and
/// waits for it to exit.
pub fn drain_behind_shut_gate(server: &mut Server, gate: &TcpGate) {
    gate.shut();
    server.sigterm();
    assert!(
        server.wait_exit(Duration::from_secs(30)).is_some(),
        "no exit within 30 s of SIGTERM\n{}",
        server.describe()
    );
}

/// Waits until a client tried to come back through the shut `gate`.
pub fn wait_for_refused_attempt(gate: &TcpGate) {
    wait_until(
        Duration::from_secs(30),
        "the client tried to reconnect while the gate was shut",
        || (gate.refused() >= 1).then_some(()),
    );
}
