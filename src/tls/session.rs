//! One TLS connection after the upgrade, sans-io: the shard hands it ciphertext it read
//! and slices of the connection's send backlog, and writes out what it encrypted.
//!
//! Output is fed from the backlog only when rustls has no ciphertext left unsent
//! ([`TlsSession::encrypt`]): rustls then holds at most one feed (its 64 KiB buffer
//! limit) on top of the backlog, and the backlog's bounds and the slow-consumer policy
//! see a stuck TLS peer exactly like a stuck plain one.
//!
//! Idle cost: rustls keeps its record layer (the two traffic keys) and a 4 KiB receive
//! buffer that its buffered API never frees (docs/benchmarks.md has the measured bytes).

use rustls::ServerConnection;
use std::io::{self, IoSlice, Read, Write};

/// A TLS session of an adopted connection.
#[derive(Debug)]
pub struct TlsSession {
    conn: ServerConnection,
    /// close_notify is queued: shut the socket's write side once it is written.
    shut_pending: bool,
}

/// What [`TlsSession::receive`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// This many plaintext bytes are at the start of the buffer (more may follow: call
    /// again with the rest of the ciphertext).
    Plain(usize),
    /// All the ciphertext was taken and no plaintext is ready.
    Drained,
    /// The peer sent close_notify: its end of the stream.
    PeerClosed,
}

impl TlsSession {
    /// Wraps a server connection (handshake done or not).
    pub fn new(conn: ServerConnection) -> TlsSession {
        TlsSession {
            conn,
            shut_pending: false,
        }
    }

    /// The rustls connection (negotiated version, ALPN, ...).
    pub fn connection(&self) -> &ServerConnection {
        &self.conn
    }

    /// Takes ciphertext from the front of `cipher` until some plaintext is ready, then
    /// copies up to `plain.len()` bytes of it into `plain`. Call again while it answers
    /// [`Input::Plain`]: rustls may hold more plaintext or `cipher` more records.
    ///
    /// # Errors
    /// A TLS protocol error (bad record, failed decryption, unexpected message): the
    /// connection is unusable; rustls has queued an alert ([`TlsSession::write_tls`]).
    pub fn receive(
        &mut self,
        cipher: &mut &[u8],
        plain: &mut [u8],
    ) -> Result<Input, rustls::Error> {
        if plain.is_empty() {
            return Ok(Input::Drained);
        }
        loop {
            match self.conn.reader().read(plain) {
                Ok(0) => return Ok(Input::PeerClosed),
                Ok(n) => return Ok(Input::Plain(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // UnexpectedEof: the transport ended without close_notify. Never here (the
                // driver does not hand rustls the socket's EOF), but an end all the same.
                Err(_) => return Ok(Input::PeerClosed),
            }
            if cipher.is_empty() {
                return Ok(Input::Drained);
            }
            // Reading from a slice fails only when rustls' receive buffer is full, which
            // processing after every read prevents; should it happen, it is a peer error.
            if let Err(e) = self.conn.read_tls(cipher) {
                return Err(rustls::Error::General(format!("receive buffer: {e}")));
            }
            self.conn.process_new_packets()?;
        }
    }

    /// Appends the plaintext rustls already holds (read past the request head during the
    /// upgrade) to `out`.
    ///
    /// # Errors
    /// A TLS protocol error in records rustls had read but not yet processed.
    pub fn take_buffered(&mut self, out: &mut Vec<u8>) -> Result<(), rustls::Error> {
        self.conn.process_new_packets()?;
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = self.conn.reader().read(&mut chunk) {
            out.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    /// Encrypts the start of `plain` (a backlog's slices) when rustls has nothing left to
    /// send; returns the plaintext bytes taken (0 while earlier ciphertext is unsent).
    pub fn encrypt(&mut self, plain: &[IoSlice<'_>]) -> usize {
        if self.conn.wants_write() {
            return 0;
        }
        // rustls' Writer never fails after the handshake; it takes what fits its limit.
        self.conn.writer().write_vectored(plain).unwrap_or(0)
    }

    /// True while rustls holds ciphertext (records, alerts, close_notify) not yet written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes rustls' pending ciphertext to `out` (one vectored write).
    ///
    /// # Errors
    /// The writer's error (`WouldBlock` when the socket is full).
    pub fn write_tls(&mut self, out: &mut dyn Write) -> io::Result<usize> {
        self.conn.write_tls(out)
    }

    /// Queues close_notify; [`TlsSession::take_shutdown`] says when it is out.
    pub fn close(&mut self) {
        if !self.shut_pending {
            self.conn.send_close_notify();
            self.shut_pending = true;
        }
    }

    /// True once, when close_notify (and all before it) has been written: time to shut
    /// the socket's write side.
    pub fn take_shutdown(&mut self) -> bool {
        if self.shut_pending && !self.conn.wants_write() {
            self.shut_pending = false;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::config::tests::self_signed;
    use crate::tls::load_server_config;
    use proptest::prelude::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use std::sync::{Arc, OnceLock};

    struct Pair {
        client: ClientConnection,
        server: TlsSession,
    }

    fn configs() -> &'static (Arc<rustls::ServerConfig>, Arc<ClientConfig>) {
        static CONFIGS: OnceLock<(Arc<rustls::ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
        CONFIGS.get_or_init(|| {
            let (_dir, cert, key) = self_signed("ec");
            let server = load_server_config(&cert, &key).unwrap();
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&cert).unwrap())
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut client = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            client.alpn_protocols = vec![b"http/1.1".to_vec()];
            (server, Arc::new(client))
        })
    }

    /// Client → server ciphertext, handed over in `chunk`-byte pieces; the plaintext.
    fn to_server(pair: &mut Pair, chunk: usize) -> Result<(Vec<u8>, bool), rustls::Error> {
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        let mut closed = false;
        let mut plain = [0u8; 700];
        for piece in wire.chunks(chunk.max(1)) {
            let mut cipher = piece;
            loop {
                match pair.server.receive(&mut cipher, &mut plain)? {
                    Input::Plain(n) => got.extend_from_slice(&plain[..n]),
                    Input::Drained => break,
                    Input::PeerClosed => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        Ok((got, closed))
    }

    /// Server → client ciphertext; the plaintext the client reads.
    fn to_client(pair: &mut Pair) -> Vec<u8> {
        let mut wire = Vec::new();
        while pair.server.wants_write() {
            pair.server.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            pair.client.read_tls(&mut rd).unwrap();
            pair.client.process_new_packets().unwrap();
        }
        let mut got = Vec::new();
        let _ = pair.client.reader().read_to_end(&mut got);
        got
    }

    fn connected(chunk: usize) -> Pair {
        let (server, client) = configs();
        let name = ServerName::try_from("localhost").unwrap();
        let mut pair = Pair {
            client: ClientConnection::new(client.clone(), name).unwrap(),
            server: TlsSession::new(ServerConnection::new(server.clone()).unwrap()),
        };
        while pair.client.is_handshaking() || pair.server.connection().is_handshaking() {
            to_server(&mut pair, chunk).unwrap();
            to_client(&mut pair);
        }
        assert_eq!(
            pair.server.connection().alpn_protocol(),
            Some(&b"http/1.1"[..])
        );
        pair
    }

    #[test]
    fn backlog_bytes_go_out_only_when_rustls_has_sent_everything() {
        let mut pair = connected(1 << 20);
        let frames = [IoSlice::new(b"one "), IoSlice::new(b"two")];
        assert_eq!(pair.server.encrypt(&frames), 7);
        assert_eq!(pair.server.encrypt(&frames), 0, "ciphertext still unsent");
        assert_eq!(to_client(&mut pair), b"one two");
        assert_eq!(pair.server.encrypt(&frames[1..]), 3);
        assert_eq!(to_client(&mut pair), b"two");
    }

    #[test]
    fn close_notify_both_ways() {
        let mut pair = connected(1 << 20);
        pair.server.close();
        assert!(!pair.server.take_shutdown(), "close_notify not written yet");
        to_client(&mut pair);
        assert!(pair.server.take_shutdown());
        assert!(!pair.server.take_shutdown(), "only once");
        pair.client.send_close_notify();
        let (got, closed) = to_server(&mut pair, 5).unwrap();
        assert!(got.is_empty() && closed);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// However the records are cut by the network, the plaintext is the same.
        #[test]
        fn chunking_never_changes_the_plaintext(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 1..6),
            chunk in 1usize..600,
        ) {
            let mut pair = connected(chunk);
            let mut sent = Vec::new();
            for m in &messages {
                pair.client.writer().write_all(m).unwrap();
                sent.extend_from_slice(m);
            }
            let (got, closed) = to_server(&mut pair, chunk).unwrap();
            prop_assert!(!closed);
            prop_assert_eq!(got, sent);
        }

        /// Garbage from a peer is an error or a wait for more, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>, after_handshake: bool) {
            let mut session = if after_handshake {
                connected(1 << 20).server
            } else {
                TlsSession::new(ServerConnection::new(configs().0.clone()).unwrap())
            };
            let mut cipher = &bytes[..];
            let mut plain = [0u8; 64];
            for _ in 0..bytes.len() + 1 {
                match session.receive(&mut cipher, &mut plain) {
                    Ok(Input::Plain(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
