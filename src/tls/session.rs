//! One TLS connection, sans-io, on rustls' unbuffered API: the caller hands it the
//! ciphertext it read and slices of the connection's send backlog, and writes out what it
//! encrypted. The same session drives the handshake and the HTTP upgrade
//! ([`crate::tls::stream`]) and then the adopted connection ([`crate::shard::tls_io`]).
//!
//! Buffers are the caller's: records are decrypted in place in the buffer they were read
//! into, plaintext is appended to the caller's vector and ciphertext written into the
//! caller's. The session keeps bytes only while it must, and frees them once empty:
//! the start of a record that has not fully arrived (`partial`) and ciphertext the
//! socket did not take (`unsent`). An idle session is rustls' connection state (record
//! keys and sequence numbers, the TLS 1.3 key schedule for key updates) and nothing else.
//!
//! Output is encrypted from the backlog only when nothing earlier is unsent
//! ([`TlsSession::encrypt`]): the session then holds at most one feed on top of the
//! backlog, and the backlog's bounds and the slow-consumer policy see a stuck TLS peer
//! exactly like a stuck plain one.

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use rustls::{Error, ServerConfig};
use std::io::IoSlice;
use std::sync::Arc;

/// Plaintext encrypted per [`TlsSession::encrypt`] call at most (four full records).
pub const MAX_FEED: usize = 64 * 1024;

/// A TLS session (handshake done or not).
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// Received ciphertext not processed yet: the start of a record (or of a fragmented
    /// handshake message) waiting for the rest. Freed once empty.
    partial: Vec<u8>,
    /// Ciphertext produced but not written yet, from `sent` on. Freed once written.
    unsent: Vec<u8>,
    sent: usize,
    /// close_notify is queued: shut the socket's write side once it is written.
    shut_pending: bool,
    /// The peer's close_notify came: its end of the stream.
    peer_closed: bool,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("partial", &self.partial.len())
            .field("unsent", &(self.unsent.len() - self.sent))
            .field("peer_closed", &self.peer_closed)
            .finish()
    }
}

/// What [`TlsSession::receive`] found in the ciphertext besides plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Everything complete was processed; the rest waits for more ciphertext.
    Drained,
    /// The peer sent close_notify: its end of the stream (anything after it is ignored).
    PeerClosed,
}

/// How far one pass over a buffer got.
enum Step {
    /// Something was done (plaintext appended, output queued); call again.
    More,
    /// Nothing more to do with what is there.
    Drained,
    PeerClosed,
}

impl TlsSession {
    /// A new server session for `config`.
    ///
    /// # Errors
    /// rustls refused the configuration.
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, Error> {
        Ok(TlsSession {
            conn: UnbufferedServerConnection::new(config)?,
            partial: Vec::new(),
            unsent: Vec::new(),
            sent: 0,
            shut_pending: false,
            peer_closed: false,
        })
    }

    /// True until both sides' Finished messages are through.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The protocol ALPN chose, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The negotiated TLS version.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Bytes the session holds beyond rustls' own state (zero while idle).
    pub fn buffered(&self) -> usize {
        self.partial.capacity() + self.unsent.capacity()
    }

    /// Processes `cipher` (decrypting in place: its contents are garbage afterwards) and
    /// appends the plaintext it carried to `plain`. Records cut off at the end are kept
    /// until the rest arrives. Handshake messages, alerts and key updates the records
    /// call for are queued for writing ([`TlsSession::wants_write`]).
    ///
    /// # Errors
    /// A TLS protocol error (bad record, failed decryption, unexpected message): the
    /// connection is unusable; the alert rustls sends for it is queued.
    pub fn receive(&mut self, cipher: &mut [u8], plain: &mut Vec<u8>) -> Result<Input, Error> {
        if self.peer_closed {
            return Ok(Input::PeerClosed);
        }
        if self.partial.is_empty() {
            // Straight from the caller's buffer; what is left over is kept.
            let mut done = 0;
            let step = loop {
                match self.step(cipher, &mut done, plain) {
                    Ok(Step::More) => {}
                    other => break other,
                }
            };
            if matches!(step, Ok(Step::Drained)) && done < cipher.len() {
                self.partial.extend_from_slice(&cipher[done..]);
            }
            return self.finish(step);
        }
        self.partial.extend_from_slice(cipher);
        let mut partial = std::mem::take(&mut self.partial);
        let mut done = 0;
        let step = loop {
            match self.step(&mut partial, &mut done, plain) {
                Ok(Step::More) => {}
                other => break other,
            }
        };
        if matches!(step, Ok(Step::Drained)) && done < partial.len() {
            partial.drain(..done);
            self.partial = partial;
        }
        self.finish(step)
    }

    fn finish(&mut self, step: Result<Step, Error>) -> Result<Input, Error> {
        match step {
            Ok(Step::Drained) | Ok(Step::More) => Ok(Input::Drained),
            Ok(Step::PeerClosed) => {
                self.peer_closed = true;
                self.partial = Vec::new();
                Ok(Input::PeerClosed)
            }
            Err(e) => {
                self.partial = Vec::new();
                Err(e)
            }
        }
    }

    /// One call into rustls over `buf[*done..]`; advances `done` past what rustls is
    /// finished with.
    fn step(
        &mut self,
        buf: &mut [u8],
        done: &mut usize,
        plain: &mut Vec<u8>,
    ) -> Result<Step, Error> {
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut buf[*done..]);
        *done += discard;
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                // The alert rustls queued for it comes out before the error again.
                drop(state_alerts(
                    &mut self.conn,
                    &mut buf[*done..],
                    &mut self.unsent,
                ));
                return Err(e);
            }
        };
        match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    plain.extend_from_slice(record?.payload);
                }
                Ok(Step::More)
            }
            ConnectionState::EncodeTlsData(mut data) => {
                encode(&mut data, &mut self.unsent);
                Ok(Step::More)
            }
            // Encoded into `unsent`, which is written before anything newer.
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                Ok(Step::More)
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => Ok(Step::PeerClosed),
            ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => {
                Ok(Step::Drained)
            }
            // Early data is never enabled (`max_early_data_size` stays 0).
            _ => Err(Error::General("unexpected TLS connection state".into())),
        }
    }

    /// Runs `f` with rustls' application-data writer (after queueing whatever rustls had
    /// to send first); `None` when the session cannot send application data.
    fn with_writer<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> R,
    ) -> Result<Option<R>, Error> {
        let mut f = Some(f);
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.partial);
            let out = match state? {
                ConnectionState::EncodeTlsData(mut data) => {
                    encode(&mut data, &mut self.unsent);
                    None
                }
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::WriteTraffic(mut writer) => match f.take() {
                    Some(f) => Some(Some(f(&mut writer, &mut self.unsent))),
                    None => Some(None),
                },
                // `receive` leaves no complete record behind, so no plaintext can be
                // waiting here; should one be, it is an error rather than a loss.
                ConnectionState::ReadTraffic(_) => {
                    return Err(Error::General("plaintext pending while writing".into()))
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                _ => Some(None),
            };
            if discard > 0 {
                self.partial.drain(..discard);
            }
            if let Some(out) = out {
                return Ok(out);
            }
        }
    }

    /// Encrypts the start of `plain` (a backlog's slices, up to [`MAX_FEED`] bytes,
    /// gathered through `stage` into full records) into `out` when nothing earlier is
    /// unsent; returns the plaintext bytes taken (0 while earlier ciphertext is unsent).
    /// `out` is cleared first; write it after [`TlsSession::wants_write`]'s bytes, and
    /// give back what the socket did not take ([`TlsSession::keep_unsent`]).
    ///
    /// # Errors
    /// The session cannot send application data (it failed, or its keys are used up
    /// under TLS 1.2): the connection is unusable.
    pub fn encrypt(
        &mut self,
        plain: &[IoSlice<'_>],
        stage: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<usize, Error> {
        out.clear();
        if self.wants_write() {
            return Ok(0);
        }
        stage.clear();
        for slice in plain {
            let room = MAX_FEED - stage.len();
            if room == 0 {
                break;
            }
            stage.extend_from_slice(&slice[..slice.len().min(room)]);
        }
        if stage.is_empty() {
            return Ok(0);
        }
        let sealed = self.with_writer(|writer, _| {
            // Record overhead (header, content type, tag) is under 64 bytes a record.
            out.resize(stage.len() + (stage.len() / 16384 + 2) * 64, 0);
            loop {
                match writer.encrypt(stage, out) {
                    Ok(n) => {
                        out.truncate(n);
                        return Ok(());
                    }
                    Err(EncryptError::InsufficientSize(InsufficientSizeError {
                        required_size,
                    })) => {
                        out.resize(required_size, 0);
                    }
                    Err(e) => return Err(Error::General(format!("encrypt: {e}"))),
                }
            }
        })?;
        match sealed {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(Error::General("cannot send application data".into())),
        }
        if self.wants_write() {
            // rustls queued something first (a handshake message): it goes out first.
            self.unsent.extend_from_slice(out);
            out.clear();
        }
        Ok(stage.len())
    }

    /// True while ciphertext (records, alerts, close_notify) is waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.sent < self.unsent.len()
    }

    /// The ciphertext waiting to be written.
    pub fn unsent(&self) -> &[u8] {
        &self.unsent[self.sent..]
    }

    /// `n` bytes of [`TlsSession::unsent`] were written.
    pub fn sent(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.unsent.len());
        if self.sent == self.unsent.len() {
            self.unsent = Vec::new();
            self.sent = 0;
        }
    }

    /// Keeps ciphertext the socket did not take (the tail of [`TlsSession::encrypt`]'s
    /// output) to be written first next time.
    pub fn keep_unsent(&mut self, rest: &[u8]) {
        self.unsent.extend_from_slice(rest);
    }

    /// Queues close_notify; [`TlsSession::take_shutdown`] says when it is out.
    pub fn close(&mut self) {
        if self.shut_pending {
            return;
        }
        self.shut_pending = true;
        let _ = self.with_writer(|writer, unsent| {
            let at = unsent.len();
            unsent.resize(at + 64, 0);
            loop {
                match writer.queue_close_notify(&mut unsent[at..]) {
                    Ok(n) => return unsent.truncate(at + n),
                    Err(EncryptError::InsufficientSize(InsufficientSizeError {
                        required_size,
                    })) => {
                        unsent.resize(at + required_size, 0);
                    }
                    Err(_) => return unsent.truncate(at),
                }
            }
        });
    }

    /// True once, when close_notify (and all before it) has been written: time to shut
    /// the socket's write side.
    pub fn take_shutdown(&mut self) -> bool {
        if self.shut_pending && !self.wants_write() {
            self.shut_pending = false;
            return true;
        }
        false
    }
}

/// Appends a handshake record (or alert) rustls wants sent to `out`.
fn encode(data: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + 1024, 0);
    loop {
        match data.encode(&mut out[at..]) {
            Ok(n) => return out.truncate(at + n),
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(at + required_size, 0);
            }
            Err(_) => return out.truncate(at),
        }
    }
}

/// After an error: queues the alerts rustls has for it (it offers them before it reports
/// the error again).
fn state_alerts(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    loop {
        let UnbufferedStatus { state, .. } = conn.process_tls_records(buf);
        match state? {
            ConnectionState::EncodeTlsData(mut data) => encode(&mut data, out),
            ConnectionState::TransmitTlsData(data) => data.done(),
            _ => return Ok(()),
        }
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
    use std::io::{Read, Write};
    use std::sync::OnceLock;

    struct Pair {
        client: ClientConnection,
        server: TlsSession,
    }

    fn configs() -> &'static (Arc<ServerConfig>, Arc<ClientConfig>) {
        static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
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

    fn client_wire(client: &mut ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Client → server ciphertext, handed over in pieces cut at `cuts` (cycled); the
    /// plaintext, and whether the peer closed.
    fn deliver(
        server: &mut TlsSession,
        wire: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, bool), Error> {
        let mut got = Vec::new();
        let mut closed = false;
        let mut at = 0;
        let mut i = 0;
        while at < wire.len() {
            let n = cuts
                .get(i % cuts.len().max(1))
                .copied()
                .unwrap_or(usize::MAX)
                .max(1);
            let end = wire.len().min(at.saturating_add(n));
            let mut piece = wire[at..end].to_vec();
            at = end;
            i += 1;
            if server.receive(&mut piece, &mut got)? == Input::PeerClosed {
                closed = true;
            }
        }
        Ok((got, closed))
    }

    fn to_server(pair: &mut Pair, cuts: &[usize]) -> Result<(Vec<u8>, bool), Error> {
        let wire = client_wire(&mut pair.client);
        deliver(&mut pair.server, &wire, cuts)
    }

    /// Feeds ciphertext to the client; the plaintext it reads.
    fn client_reads(client: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
        let mut rd = wire;
        let mut got = Vec::new();
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
            let _ = client.reader().read_to_end(&mut got);
        }
        got
    }

    /// Everything the server has queued, as the client reads it.
    fn to_client(pair: &mut Pair) -> Vec<u8> {
        let wire = pair.server.unsent().to_vec();
        pair.server.sent(wire.len());
        client_reads(&mut pair.client, &wire)
    }

    fn connected(cuts: &[usize]) -> Pair {
        let (server, client) = configs();
        let name = ServerName::try_from("localhost").unwrap();
        let mut pair = Pair {
            client: ClientConnection::new(client.clone(), name).unwrap(),
            server: TlsSession::new(server.clone()).unwrap(),
        };
        // The tests write up to ~100 KB before the server reads any of it; rustls' client
        // would refuse past its 64 KiB default send buffer.
        pair.client.set_buffer_limit(None);
        while pair.client.is_handshaking() || pair.server.is_handshaking() {
            to_server(&mut pair, cuts).unwrap();
            to_client(&mut pair);
        }
        assert_eq!(pair.server.alpn_protocol(), Some(&b"http/1.1"[..]));
        pair
    }

    /// Encrypts `frames` as the driver does; the ciphertext in write order.
    fn seal(server: &mut TlsSession, frames: &[IoSlice<'_>]) -> (usize, Vec<u8>) {
        let (mut stage, mut out) = (Vec::new(), Vec::new());
        let taken = server.encrypt(frames, &mut stage, &mut out).unwrap();
        let mut wire = server.unsent().to_vec();
        server.sent(wire.len());
        wire.extend_from_slice(&out);
        (taken, wire)
    }

    #[test]
    fn an_idle_session_holds_no_buffer() {
        let mut pair = connected(&[usize::MAX]);
        assert_eq!(pair.server.buffered(), 0);
        pair.client.writer().write_all(b"hello").unwrap();
        let wire = client_wire(&mut pair.client);
        // Half a record: kept until the rest comes.
        let (got, _) = deliver(&mut pair.server, &wire[..wire.len() / 2], &[usize::MAX]).unwrap();
        assert!(got.is_empty());
        assert!(pair.server.buffered() > 0);
        let (got, _) = deliver(&mut pair.server, &wire[wire.len() / 2..], &[usize::MAX]).unwrap();
        assert_eq!(got, b"hello");
        assert_eq!(
            pair.server.buffered(),
            0,
            "freed once the record is through"
        );
        let (taken, wire) = seal(&mut pair.server, &[IoSlice::new(b"back")]);
        assert_eq!(taken, 4);
        assert_eq!(client_reads(&mut pair.client, &wire), b"back");
        assert_eq!(pair.server.buffered(), 0);
    }

    #[test]
    fn backlog_bytes_go_out_only_when_everything_earlier_is_written() {
        let mut pair = connected(&[usize::MAX]);
        let (mut stage, mut out) = (Vec::new(), Vec::new());
        let frames = [IoSlice::new(b"one "), IoSlice::new(b"two")];
        assert_eq!(
            pair.server.encrypt(&frames, &mut stage, &mut out).unwrap(),
            7
        );
        // The socket took 3 bytes.
        pair.server.keep_unsent(&out[3..]);
        let mut wire = out[..3].to_vec();
        assert_eq!(
            pair.server.encrypt(&frames, &mut stage, &mut out).unwrap(),
            0
        );
        assert!(out.is_empty(), "nothing new while ciphertext is unsent");
        wire.extend_from_slice(pair.server.unsent());
        pair.server.sent(pair.server.unsent().len());
        assert_eq!(client_reads(&mut pair.client, &wire), b"one two");
        let (taken, wire) = seal(&mut pair.server, &frames[1..]);
        assert_eq!(taken, 3);
        assert_eq!(client_reads(&mut pair.client, &wire), b"two");
    }

    #[test]
    fn one_feed_is_bounded() {
        let mut pair = connected(&[usize::MAX]);
        let big = vec![7u8; 100_000];
        let (taken, wire) = seal(&mut pair.server, &[IoSlice::new(&big)]);
        assert_eq!(taken, MAX_FEED);
        assert_eq!(client_reads(&mut pair.client, &wire), &big[..MAX_FEED]);
    }

    #[test]
    fn close_notify_both_ways() {
        let mut pair = connected(&[usize::MAX]);
        pair.server.close();
        assert!(!pair.server.take_shutdown(), "close_notify not written yet");
        to_client(&mut pair);
        assert!(pair.server.take_shutdown());
        assert!(!pair.server.take_shutdown(), "only once");
        let mut buf = [0u8; 1];
        assert_eq!(
            pair.client.reader().read(&mut buf).unwrap(),
            0,
            "client saw the end"
        );
        pair.client.send_close_notify();
        let (got, closed) = to_server(&mut pair, &[5]).unwrap();
        assert!(got.is_empty() && closed);
        assert_eq!(pair.server.buffered(), 0);
    }

    #[test]
    fn key_updates_both_ways() {
        let mut pair = connected(&[usize::MAX]);
        // The client updates its keys and asks the server to update its own.
        pair.client.refresh_traffic_keys().unwrap();
        pair.client.writer().write_all(b"after update").unwrap();
        let (got, _) = to_server(&mut pair, &[3, 100]).unwrap();
        assert_eq!(got, b"after update");
        // The server's answering key_update goes out before its next record.
        let (taken, wire) = seal(&mut pair.server, &[IoSlice::new(b"reply")]);
        assert_eq!(taken, 5);
        assert_eq!(client_reads(&mut pair.client, &wire), b"reply");
        pair.client.writer().write_all(b"again").unwrap();
        assert_eq!(to_server(&mut pair, &[usize::MAX]).unwrap().0, b"again");
        let (_, wire) = seal(&mut pair.server, &[IoSlice::new(b"fine")]);
        assert_eq!(client_reads(&mut pair.client, &wire), b"fine");
    }

    #[test]
    fn a_bad_record_is_an_error_with_an_alert() {
        let mut pair = connected(&[usize::MAX]);
        pair.client.writer().write_all(b"hello").unwrap();
        let mut wire = client_wire(&mut pair.client);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(deliver(&mut pair.server, &wire, &[usize::MAX]).is_err());
        assert!(pair.server.wants_write(), "the alert is queued");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// However the network cuts the records, the plaintext is the same.
        #[test]
        fn record_splits_never_change_the_plaintext(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20000), 1..6),
            cuts in proptest::collection::vec(1usize..3000, 1..8),
            handshake_cuts in proptest::collection::vec(1usize..600, 1..4),
        ) {
            let mut pair = connected(&handshake_cuts);
            let mut sent = Vec::new();
            for m in &messages {
                pair.client.writer().write_all(m).unwrap();
                sent.extend_from_slice(m);
            }
            pair.client.send_close_notify();
            let (got, closed) = to_server(&mut pair, &cuts).unwrap();
            prop_assert!(closed);
            prop_assert_eq!(got, sent);
            prop_assert_eq!(pair.server.buffered(), 0);
        }

        /// Garbage from a peer is an error or a wait for more, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes: Vec<u8>,
            cuts in proptest::collection::vec(1usize..300, 1..4),
            after_handshake: bool,
        ) {
            let mut session = if after_handshake {
                connected(&[usize::MAX]).server
            } else {
                TlsSession::new(configs().0.clone()).unwrap()
            };
            let _ = deliver(&mut session, &bytes, &cuts);
            // Whatever state it is in, writing fails cleanly or works.
            let (mut stage, mut out) = (Vec::new(), Vec::new());
            let _ = session.encrypt(&[IoSlice::new(b"x")], &mut stage, &mut out);
            session.close();
        }

        /// Valid records followed by garbage: exactly the valid plaintext, then nothing
        /// from the garbage (an error, or a wait for more when it looks like the start of
        /// a record), never a panic.
        #[test]
        fn garbage_after_records_never_panics(
            message in proptest::collection::vec(any::<u8>(), 1..5000),
            garbage: Vec<u8>,
            cuts in proptest::collection::vec(1usize..2000, 1..4),
        ) {
            let mut pair = connected(&[usize::MAX]);
            pair.client.writer().write_all(&message).unwrap();
            let wire = client_wire(&mut pair.client);
            let (plain, closed) = deliver(&mut pair.server, &wire, &cuts).unwrap();
            prop_assert_eq!(plain, message);
            prop_assert!(!closed);
            if let Ok((plain, _)) = deliver(&mut pair.server, &garbage, &cuts) {
                prop_assert!(plain.is_empty(), "garbage decrypted to {} bytes", plain.len());
            }
        }
    }
}
