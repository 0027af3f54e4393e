//! A [`TlsSession`] over an async byte stream, for the handshake and the HTTP upgrade
//! (the upgrade code is generic over `AsyncRead + AsyncWrite`). Its buffers live only as
//! long as this wrapper: [`TlsStream::into_parts`] hands the bare session to the
//! connection table with the plaintext already read past the request head.

use crate::tls::session::{Input, TlsSession};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use rustls::ServerConfig;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// Ciphertext read per call while handshaking and upgrading.
const READ_SIZE: usize = 8 * 1024;

/// A TLS server stream over `S`.
pub struct TlsStream<S> {
    inner: S,
    session: TlsSession,
    /// Ciphertext read buffer.
    rbuf: Vec<u8>,
    /// Decrypted plaintext not read yet, from `at` on.
    plain: Vec<u8>,
    at: usize,
    /// Encryption scratch (plaintext gathered, ciphertext produced).
    stage: Vec<u8>,
    out: Vec<u8>,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs the server side of the TLS handshake over `inner`.
///
/// # Errors
/// A TLS error (the alert for it is sent when the stream takes it), or the stream's.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ServerConfig>,
    inner: S,
) -> io::Result<TlsStream<S>> {
    let mut stream = TlsStream {
        inner,
        session: TlsSession::new(config).map_err(tls_error)?,
        rbuf: vec![0; READ_SIZE],
        plain: Vec::new(),
        at: 0,
        stage: Vec::new(),
        out: Vec::new(),
    };
    loop {
        stream.write_unsent().await?;
        if !stream.session.is_handshaking() {
            return Ok(stream);
        }
        let n = stream.inner.read(&mut stream.rbuf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match stream
            .session
            .receive(&mut stream.rbuf[..n], &mut stream.plain)
        {
            Ok(Input::Drained) => {}
            Ok(Input::PeerClosed) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) => {
                let _ = stream.write_unsent().await;
                return Err(tls_error(e));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// The session (negotiated protocol, ALPN).
    pub fn session(&self) -> &TlsSession {
        &self.session
    }

    /// The stream, the session and the plaintext read but not consumed.
    pub fn into_parts(mut self) -> (S, TlsSession, Vec<u8>) {
        self.plain.drain(..self.at);
        (self.inner, self.session, self.plain)
    }

    async fn write_unsent(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            let n = self.inner.write(self.session.unsent()).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.session.sent(n);
        }
        self.inner.flush().await
    }

    fn poll_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.wants_write() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, self.session.unsent()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.session.sent(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.at < this.plain.len() {
                let n = buf.len().min(this.plain.len() - this.at);
                buf[..n].copy_from_slice(&this.plain[this.at..this.at + n]);
                this.at += n;
                if this.at == this.plain.len() {
                    this.plain.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(n));
            }
            let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut this.rbuf))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            match this.session.receive(&mut this.rbuf[..n], &mut this.plain) {
                Ok(Input::Drained) => {}
                Ok(Input::PeerClosed) if this.plain.is_empty() => return Poll::Ready(Ok(0)),
                Ok(Input::PeerClosed) => {}
                Err(e) => return Poll::Ready(Err(tls_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_unsent(cx))?;
        let taken = this
            .session
            .encrypt(&[IoSlice::new(buf)], &mut this.stage, &mut this.out)
            .map_err(tls_error)?;
        let out = std::mem::take(&mut this.out);
        this.session.keep_unsent(&out);
        this.out = out;
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_unsent(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_unsent(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}
