//! What an idle TLS session keeps on the heap, counted by the allocator: after the
//! handshake, a request and an answer, the session holds rustls' connection state and no
//! buffer (the buffered API kept a 4 KiB receive buffer for the connection's life).
//! docs/benchmarks.md has the RSS figure for the whole server.

use ringcast::tls::session::Input;
use ringcast::tls::{load_server_config, TlsSession};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{IoSlice, Read, Write};
use std::sync::Arc;

/// The e2e binary's allocator: the system's, counting the bytes each thread holds.
///
/// Counted per thread because the other end-to-end tests run in this process at the same
/// time; a test thread's own count moves only with what it allocates and frees itself,
/// and the exchanges measured here run wholly on the test's thread.
struct Counting;

thread_local! {
    /// Bytes allocated minus bytes freed by this thread. A `const` `Cell` with no
    /// destructor: reading it never allocates, as an allocator must not.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    // try_with: a thread being torn down may still free memory.
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

/// The bytes this thread holds now (see [`Counting`]).
fn live() -> isize {
    LIVE.with(Cell::get)
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What `conn` has to send, as one piece of ciphertext.
fn drain<T>(conn: &mut rustls::ConnectionCommon<T>) -> Vec<u8> {
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire).expect("write_tls");
    }
    wire
}

/// Hands `conn` the ciphertext `wire` and processes it (rustls' buffered API).
fn feed<T>(conn: &mut rustls::ConnectionCommon<T>, mut wire: &[u8]) {
    while !wire.is_empty() {
        conn.read_tls(&mut wire).expect("read_tls");
        conn.process_new_packets().expect("process_new_packets");
    }
}

fn to_server(client: &mut ClientConnection, server: &mut TlsSession, plain: &mut Vec<u8>) {
    let mut wire = drain(client);
    if !wire.is_empty() {
        assert_eq!(
            server.receive(&mut wire, plain).expect("server receive"),
            Input::Drained
        );
    }
}

fn to_client(client: &mut ClientConnection, server: &mut TlsSession, out: &[u8]) -> Vec<u8> {
    let mut wire = server.unsent().to_vec();
    server.sent(wire.len());
    wire.extend_from_slice(out);
    let mut rd = &wire[..];
    let mut got = Vec::new();
    while !rd.is_empty() {
        client.read_tls(&mut rd).expect("client read");
        client.process_new_packets().expect("client process");
        let _ = client.reader().read_to_end(&mut got);
    }
    got
}

/// The server's config without its session cache (the cache is shared by all
/// connections and bounded at 256 entries, so it would blur one session's figure), and a
/// client config that accepts the self-signed certificate.
fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = crate::common::tls::self_signed(dir.path(), "c");
    let mut config = (*load_server_config(&cert, &key).expect("server config")).clone();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    (Arc::new(config), Arc::new(client_config))
}

#[test]
fn an_idle_tls_session_keeps_only_rustls_state() {
    let (config, client_config) = configs();
    for round in 0..3 {
        let before = live();
        let (mut stage, mut out, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = ClientConnection::new(client_config.clone(), name).expect("client");
        let mut server = Box::new(TlsSession::new(config.clone()).expect("session"));
        while client.is_handshaking() || server.is_handshaking() {
            to_server(&mut client, &mut server, &mut plain);
            to_client(&mut client, &mut server, &[]);
        }
        client
            .writer()
            .write_all(b"GET /ws HTTP/1.1\r\n\r\n")
            .expect("write");
        to_server(&mut client, &mut server, &mut plain);
        let answer = b"HTTP/1.1 101 \r\n\r\n";
        let taken = server
            .encrypt(&[IoSlice::new(answer)], &mut stage, &mut out)
            .expect("encrypt");
        assert_eq!(taken, answer.len());
        assert_eq!(to_client(&mut client, &mut server, &out), answer);
        assert_eq!(server.buffered(), 0, "no buffer held while idle");
        // The client's own state is dropped; what is left is the session's.
        drop((client, stage, out, plain));
        let idle = live() - before;
        println!(
            "round {round}: idle session {idle} B on the heap ({:?}, {} B inline)",
            server.protocol_version(),
            std::mem::size_of::<TlsSession>()
        );
        // The first round also pays one-time initialisations.
        assert!(
            round == 0 || idle < 4096,
            "an idle session holds {idle} B, more than the old receive buffer alone"
        );
        drop(server);
    }
}

/// The same exchange over rustls' buffered `ServerConnection` (what sessions used before):
/// the figure the unbuffered session is compared with in docs/benchmarks.md.
#[test]
fn the_buffered_api_keeps_more() {
    let (config, client_config) = configs();
    let mut figures = Vec::new();
    for round in 0..3 {
        let before = live();
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = ClientConnection::new(client_config.clone(), name).expect("client");
        let mut server = Box::new(rustls::ServerConnection::new(config.clone()).expect("server"));
        while client.is_handshaking() || server.is_handshaking() {
            feed(&mut server, &drain(&mut client));
            feed(&mut client, &drain(&mut server));
        }
        client
            .writer()
            .write_all(b"GET /ws HTTP/1.1\r\n\r\n")
            .expect("write");
        feed(&mut server, &drain(&mut client));
        let mut got = Vec::new();
        let _ = server.reader().read_to_end(&mut got);
        server
            .writer()
            .write_all(b"HTTP/1.1 101 \r\n\r\n")
            .expect("write");
        let wire = drain(&mut server);
        drop((client, wire, got));
        let idle = live() - before;
        println!("round {round}: idle buffered ServerConnection {idle} B on the heap");
        figures.push(idle);
        drop(server);
    }
    assert!(figures[1..].iter().all(|&b| b > 4096), "{figures:?}");
}
