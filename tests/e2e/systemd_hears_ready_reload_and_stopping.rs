//! Under systemd (`Type=notify`) ringcast reports its state on `$NOTIFY_SOCKET`: `READY=1`
//! only once the WebSocket port serves, `RELOADING=1` + `MONOTONIC_USEC=` then `READY=1`
//! around a SIGHUP reload, and `STOPPING=1` at SIGTERM. The test binds the Unix datagram
//! socket itself and plays systemd's part, once with a socket file and once with an
//! abstract-namespace name (`@...`, as systemd uses inside containers).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::common::*;

/// Every datagram arrives within this or the test fails naming what it waited for.
const RECV_TIMEOUT: Duration = Duration::from_secs(15);

/// The next datagram's assignments, one per line.
fn next_message(socket: &UnixDatagram, waiting_for: &str, server: &Server) -> Vec<String> {
    socket
        .set_read_timeout(Some(RECV_TIMEOUT))
        .expect("setting the notify socket's read timeout");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no datagram on NOTIFY_SOCKET within {RECV_TIMEOUT:?} while waiting for {waiting_for}: {e}\n{}",
            server.describe()
        )
    });
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().map(str::to_string).collect()
}

fn has(message: &[String], assignment: &str) -> bool {
    message.iter().any(|l| l == assignment)
}

/// Runs one server with `NOTIFY_SOCKET=notify_socket`, receiving on `socket`.
fn plays_systemd(socket: &UnixDatagram, notify_socket: &str) {
    let mut server = Server::start_with_env(
        &["--drain-grace", "0", "--drain-window", "1"],
        &[("NOTIFY_SOCKET", notify_socket)],
    );

    let ready = next_message(socket, "READY=1 at startup", &server);
    assert!(
        has(&ready, "READY=1"),
        "first message is not READY=1: {ready:?}"
    );
    assert!(
        ready.iter().any(|l| l.starts_with("STATUS=serving")),
        "READY=1 carries no STATUS=serving line: {ready:?}"
    );
    // READY=1 came: the WebSocket port must serve now, and /readyz must say so.
    let readyz = server
        .admin_get("/readyz")
        .expect("GET /readyz after READY=1");
    assert_eq!(readyz.status, 200, "/readyz right after READY=1");
    let mut sub = server.subscribe(&["notify"]);
    server.wait_for_connections(1, Duration::from_secs(10));
    server.udp_publish("notify", br#"{"n":1}"#);
    let delivery = sub
        .next_delivery(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "no message on the WebSocket after READY=1\n{}",
                server.describe()
            )
        });
    assert_eq!(delivery.data["n"], 1, "{}", delivery.raw);

    server.signal(libc::SIGHUP);
    let reloading = next_message(socket, "RELOADING=1 after SIGHUP", &server);
    assert!(has(&reloading, "RELOADING=1"), "{reloading:?}");
    let usec = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"));
    assert!(
        usec.parse::<u64>().is_ok_and(|v| v > 0),
        "MONOTONIC_USEC={usec}"
    );
    let reloaded = next_message(socket, "READY=1 after the reload", &server);
    assert!(has(&reloaded, "READY=1"), "{reloaded:?}");

    server.sigterm();
    let stopping = next_message(socket, "STOPPING=1 after SIGTERM", &server);
    assert!(has(&stopping, "STOPPING=1"), "{stopping:?}");
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "ringcast did not exit 0 after the drain: {status:?}\n{}",
        server.describe()
    );
}

#[test]
fn systemd_hears_ready_reload_and_stopping() {
    let _deadline = Deadline::new(
        "systemd_hears_ready_reload_and_stopping",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("binding the notify socket file");
    plays_systemd(&socket, path.to_str().expect("temporary path is UTF-8"));

    let name = format!("ringcast-notify-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract socket name");
    let socket = UnixDatagram::bind_addr(&addr).expect("binding the abstract notify socket");
    plays_systemd(&socket, &format!("@{name}"));
}
