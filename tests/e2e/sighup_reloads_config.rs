//! SIGHUP reads the configuration file again: runtime keys (here `max_connections`) take
//! effect without dropping a connection, a broken file is refused with the key's name in
//! the log while the old configuration stays, and every reload is counted in
//! `ringcast_config_reloads_total{result}`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The answer status to one upgrade attempt; a 101 socket is kept in `open`.
fn upgrade_status(addr: SocketAddr, open: &mut Vec<TcpStream>) -> u16 {
    let request = format!(
        "GET /ws?channels=hup HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending the upgrade to {addr}: {e}"));
    let (head, _) = http::read_head(&mut stream, Instant::now() + TIMEOUT)
        .unwrap_or_else(|e| panic!("no answer to an upgrade: {e}"));
    if head.status == 101 {
        open.push(stream);
    }
    head.status
}

/// Both subscribers get one message published after each step.
fn both_receive(server: &Server, subs: &mut [Subscriber], step: &str) {
    let payload = format!("{{\"step\":\"{step}\"}}");
    let r = server.http_publish(Some("hup"), payload.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    for (i, sub) in subs.iter_mut().enumerate() {
        let d = sub
            .next_delivery(TIMEOUT)
            .unwrap_or_else(|| panic!("subscriber {i} got nothing after {step}"));
        assert_eq!(d.data["step"], step, "subscriber {i}: {d:?}");
    }
}

#[test]
fn sighup_reloads_config() {
    let _deadline = Deadline::new("sighup_reloads_config", Duration::from_secs(90));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ringcast.toml");
    write_file(&path, "max_connections = 100\nping_interval = 25\n");
    let mut server = Server::start(&["--config", path.to_str().expect("utf-8 path")]);
    let mut subs = vec![server.subscribe(&["hup"]), server.subscribe(&["hup"])];
    server.wait_for_connections(2, TIMEOUT);
    both_receive(&server, &mut subs, "before");

    // Lowered to what is open: existing connections stay, the next upgrade is refused.
    // ping_interval needs a restart: logged, not applied, and not a failure.
    write_file(&path, "max_connections = 2\nping_interval = 30\n");
    server.hup_and_wait("ok", 1.0, TIMEOUT);
    let mut open = Vec::new();
    assert_eq!(
        upgrade_status(server.ws_addr(), &mut open),
        503,
        "upgrade after max_connections was reloaded down to 2"
    );
    both_receive(&server, &mut subs, "lowered");
    let log = server.log();
    assert!(log.contains("applied max_connections"), "{log}");
    assert!(
        log.contains("`ping_interval` changed but needs a restart"),
        "{log}"
    );

    // A bad value is refused with its key; the server and its limit stay as they were.
    write_file(&path, "max_connections = 0\nping_interval = 30\n");
    server.hup_and_wait("error", 1.0, TIMEOUT);
    assert!(server.is_running(), "a bad file must not stop the server");
    let log = server.log();
    assert!(
        log.contains("config reload refused") && log.contains("`max_connections`"),
        "{log}"
    );
    assert_eq!(upgrade_status(server.ws_addr(), &mut open), 503);
    both_receive(&server, &mut subs, "refused");

    // Not TOML, or an unknown key: refused the same way, named.
    write_file(&path, "max_connections = 3\nmax_conections = 4\n");
    server.hup_and_wait("error", 2.0, TIMEOUT);
    assert!(server.log().contains("max_conections"), "{}", server.log());

    // Raised again: the next upgrade is served.
    write_file(&path, "max_connections = 3\nping_interval = 30\n");
    server.hup_and_wait("ok", 2.0, TIMEOUT);
    assert_eq!(upgrade_status(server.ws_addr(), &mut open), 101);
    server.wait_for_connections(3, TIMEOUT);
    both_receive(&server, &mut subs, "raised");

    // The ingest key reloads too: from the next request on, publishing needs it.
    let key = "reloaded-ingest-key-0123456789";
    write_file(
        &path,
        &format!("max_connections = 3\nping_interval = 30\ningest_key = \"{key}\"\n"),
    );
    server.hup_and_wait("ok", 3.0, TIMEOUT);
    let refused = server.http_publish(Some("hup"), b"{\"step\":\"no key\"}");
    assert_eq!(refused.status, 401, "{}", refused.text());
    let bearer = format!("Bearer {key}");
    let r = http::request(
        server.admin_addr(),
        "POST",
        "/publish?channel=hup",
        &[("Authorization", bearer.as_str())],
        b"{\"step\":\"keyed\"}",
    )
    .expect("keyed publish");
    assert_eq!(r.status, 200, "{}", r.text());
    for (i, sub) in subs.iter_mut().enumerate() {
        let d = sub
            .next_delivery(TIMEOUT)
            .unwrap_or_else(|| panic!("subscriber {i} got nothing after the key reload"));
        assert_eq!(d.data["step"], "keyed", "subscriber {i}: {d:?}");
    }
    assert!(
        !server.log().contains(key),
        "the reload log shows the key's value"
    );
    assert!(server.is_running());
}
