//! The server's certificate and key: PEM files in, a rustls `ServerConfig` out.
//!
//! TLS 1.2 and 1.3 with rustls' safe defaults (AEAD suites and key exchanges of the `ring`
//! provider), ALPN `http/1.1` (WebSocket upgrades, SSE and long-poll are all HTTP/1.1),
//! no client certificates. Every failure names the config key an operator has to fix.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::Path;
use std::sync::Arc;

/// Why the certificate or key could not be used; `key` is the config key at fault.
#[derive(Debug, thiserror::Error)]
#[error("`{key}` ({path}): {message}")]
pub struct TlsConfigError {
    /// `tls_cert_file` or `tls_key_file`.
    pub key: &'static str,
    /// The file named by that key.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

fn error(key: &'static str, path: &Path, message: impl Into<String>) -> TlsConfigError {
    TlsConfigError {
        key,
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Reads the certificate chain (leaf first) and the private key (PKCS#8, PKCS#1 RSA or
/// SEC1 EC) from PEM files and builds the server's TLS configuration.
///
/// # Errors
/// [`TlsConfigError`] naming `tls_cert_file` (missing, unreadable, no certificate, not
/// PEM) or `tls_key_file` (missing, unreadable, no key, unsupported, or not the key of the
/// certificate).
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let cert_pem =
        std::fs::read(cert).map_err(|e| error("tls_cert_file", cert, format!("reading: {e}")))?;
    let key_pem =
        std::fs::read(key).map_err(|e| error("tls_key_file", key, format!("reading: {e}")))?;
    server_config_from_pem(&cert_pem, &key_pem).map_err(|(which, message)| {
        let path = if which == "tls_cert_file" { cert } else { key };
        error(which, path, message)
    })
}

/// [`load_server_config`] on PEM bytes; the error names the key at fault.
fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, (&'static str, String)> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ("tls_cert_file", format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(("tls_cert_file", "no `BEGIN CERTIFICATE` block found".into()));
    }
    let private_key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        (
            "tls_key_file",
            format!("no PKCS#8, RSA or EC private key found: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls_cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => (
                "tls_key_file",
                "is not the private key of the first certificate in tls_cert_file".to_string(),
            ),
            rustls::Error::InvalidCertificate(e) => {
                ("tls_cert_file", format!("invalid certificate: {e}"))
            }
            e => ("tls_key_file", format!("unusable key: {e}")),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// A self-signed certificate for `localhost` made by the `openssl` CLI: (dir, cert,
    /// key). Fails loudly when openssl is missing.
    pub(crate) fn self_signed(kind: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let newkey = match kind {
            "ec" => "ec",
            _ => "rsa:2048",
        };
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // An end-entity certificate: webpki (the unit tests' rustls client) refuses a CA
        // certificate as a server's, which `req -x509` makes by default.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-newkey")
        .arg(newkey);
        if kind == "ec" {
            cmd.args(["-pkeyopt", "ec_paramgen_curve:prime256v1"]);
        }
        let out = cmd
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the openssl CLI is needed for the TLS tests (apt-get install openssl)");
        assert!(out.status.success(), "openssl req failed: {out:?}");
        (dir, cert, key)
    }

    #[test]
    fn a_matching_pair_loads_with_http11_alpn() {
        for kind in ["rsa", "ec"] {
            let (_dir, cert, key) = self_signed(kind);
            let config = load_server_config(&cert, &key).expect("loads");
            assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        }
    }

    #[test]
    fn every_failure_names_the_key_at_fault() {
        let (dir, cert, key) = self_signed("ec");
        let (_other, _, other_key) = self_signed("ec");
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let cases = [
            (missing.clone(), key.clone(), "tls_cert_file"),
            (cert.clone(), missing, "tls_key_file"),
            (junk.clone(), key.clone(), "tls_cert_file"),
            (cert.clone(), junk, "tls_key_file"),
            (key.clone(), key.clone(), "tls_cert_file"),
            (cert.clone(), cert.clone(), "tls_key_file"),
            (cert, other_key, "tls_key_file"),
        ];
        for (c, k, which) in cases {
            let err = load_server_config(&c, &k).expect_err("refused");
            assert_eq!(err.key, which, "{err}");
            assert!(err.to_string().contains(which), "{err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_pem_bytes_never_panic(cert: Vec<u8>, key: Vec<u8>) {
            let _ = server_config_from_pem(&cert, &key);
        }
    }
}
