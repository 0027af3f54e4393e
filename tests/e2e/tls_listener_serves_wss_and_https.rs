//! The `tls_listen` port: Python `websockets` over `ssl` subscribes and receives over
//! wss://, the stdlib's `http.client` reads SSE over https://, `openssl s_client`
//! negotiates TLS 1.3 and 1.2 with ALPN `http/1.1`; plain HTTP, a broken ClientHello and
//! random bytes are closed with the handshake counted as failed while a subscriber stays
//! served; SIGHUP swaps the certificate for new handshakes while an open wss subscriber
//! keeps receiving; a missing or mismatched key stops the start naming the key, and a bad
//! certificate on SIGHUP is refused with the old one kept.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::python::run_script;
use crate::common::tls::self_signed;
use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn py(case: &str, server: &Server, port: u16, ca: &Path, extra: &[&str]) {
    let (port, admin) = (port.to_string(), server.admin_port.to_string());
    let mut args = vec![case, &port, &admin, path(ca)];
    args.extend_from_slice(extra);
    run_script("py_tls.py", &args).assert_cases(&[case], &server.describe());
}

/// `openssl s_client`'s session summary for a connection with `flags`.
fn s_client(port: u16, flags: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-alpn", "http/1.1"])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the openssl CLI is needed (scripts/test.sh installs it)");
    wait_until(TIMEOUT, "openssl s_client ends", || {
        child.try_wait().ok().flatten()
    });
    let out = child.wait_with_output().expect("s_client output");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn wss_https_and_openssl_over_the_tls_listener() {
    let _deadline = Deadline::new("wss_https_and_openssl", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = self_signed(dir.path(), "server");
    let (server, port) = tls::start(&cert, &key, &[]);
    py("wss", &server, port, &cert, &[]);
    py("sse", &server, port, &cert, &[]);
    py("garbage", &server, port, &cert, &[]);
    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let summary = s_client(port, &[flag]);
        assert!(
            summary.contains("ALPN protocol: http/1.1"),
            "{flag}: no ALPN http/1.1\n{summary}"
        );
        assert!(
            summary.contains(&format!("New, {version}")),
            "{flag}: not {version}\n{summary}"
        );
    }
    // The plain listener is untouched by the TLS one.
    let mut sub = server.subscribe(&["plain"]);
    server.wait_for_connections(1, TIMEOUT);
    server.http_publish(Some("plain"), b"{\"still\":\"plain\"}");
    let d = sub
        .next_delivery(TIMEOUT)
        .expect("plain subscriber got nothing");
    assert_eq!(d.data["still"], "plain");
    let m = server.metrics();
    assert!(m.sum_where("ringcast_tls_handshakes_total", &[("result", "ok")]) >= 4.0);
    assert!(m.sum_where("ringcast_tls_handshakes_total", &[("result", "failed")]) >= 3.0);
}

#[test]
fn sighup_swaps_the_certificate_and_keeps_connections() {
    let _deadline = Deadline::new("sighup_swaps_the_certificate", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = self_signed(dir.path(), "server");
    let (next_cert, next_key) = self_signed(dir.path(), "next");
    let first_ca = dir.path().join("first-ca.crt");
    std::fs::copy(&cert, &first_ca).expect("copy of the first certificate");
    let (mut server, port) = tls::start(&cert, &key, &[]);
    let pid = server.pid().to_string();
    let extra = [
        &pid,
        path(&next_cert),
        path(&next_key),
        path(&cert),
        path(&key),
    ];
    py("reload", &server, port, &first_ca, &extra);

    // A certificate file that is not one: refused, named, and the running one stays.
    std::fs::write(&cert, "not a certificate\n").expect("overwriting the certificate");
    server.signal(libc::SIGHUP);
    wait_until(TIMEOUT, "the bad reload is counted", || {
        let m = server.metrics();
        (m.sum_where("ringcast_config_reloads_total", &[("result", "error")]) == 1.0).then_some(())
    });
    assert!(
        server.log().contains("tls_cert_file"),
        "{}",
        server.describe()
    );
    py("wss", &server, port, &next_cert, &[]);
    server.sigterm();
}

#[test]
fn a_missing_or_mismatched_key_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, _key) = self_signed(dir.path(), "one");
    let (_, other_key) = self_signed(dir.path(), "two");
    let missing = dir.path().join("missing.key");
    for (key, what) in [
        (&other_key, "is not the private key"),
        (&missing, "reading"),
    ] {
        let port = free_tcp_port();
        let out = Command::new(Server::binary())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--udp-ingest", "off", "--tcp-ingest", "off"])
            .args(["--tls-listen", &format!("127.0.0.1:{port}")])
            .args(["--tls-cert-file", path(&cert), "--tls-key-file", path(key)])
            .output()
            .expect("running ringcast");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with a bad key: {stderr}");
        assert!(
            stderr.contains("tls_key_file") && stderr.contains(what),
            "the error names neither the key nor why: {stderr}"
        );
    }
}
