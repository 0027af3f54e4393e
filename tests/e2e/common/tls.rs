//! TLS fixtures: a self-signed certificate for `localhost` and 127.0.0.1, made by the
//! `openssl` CLI (scripts/test.sh installs it; a missing CLI fails the test).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{free_tcp_port, Server};

/// Writes `NAME.crt` and `NAME.key` into `dir`: a P-256 key and a self-signed
/// certificate for `localhost` with subjectAltName `DNS:localhost,IP:127.0.0.1`.
/// Returns (certificate, key).
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl CLI is needed (scripts/test.sh installs it)");
    assert!(out.status.success(), "openssl req failed: {out:?}");
    (cert, key)
}

/// Starts ringcast with a TLS port on a free loopback port serving `cert` and `key`, plus
/// `extra` arguments; returns the server and its TLS port.
pub fn start(cert: &Path, key: &Path, extra: &[&str]) -> (Server, u16) {
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--tls-listen",
        &listen,
        "--tls-cert-file",
        cert.to_str().expect("utf-8 certificate path"),
        "--tls-key-file",
        key.to_str().expect("utf-8 key path"),
    ];
    args.extend_from_slice(extra);
    (Server::start(&args), port)
}
