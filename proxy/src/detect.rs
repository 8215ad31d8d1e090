//! Protocol detection from the first bytes of a connection: a TLS handshake record, the
//! HTTP/2 prior-knowledge preface, or else HTTP/1.x. The bytes read are replayed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The client connection preface of HTTP/2 (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 (prior knowledge, or negotiated by ALPN inside TLS).
    H2c,
}

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS handshake record (content type 22) opens the connection.
    Tls,
    Http(HttpVersion),
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// [`detect`], after telling a TLS session (first byte 22, a handshake record: never the
/// first byte of an HTTP request) from plaintext.
pub async fn detect_protocol<S: AsyncRead + Unpin>(
    mut io: S,
) -> io::Result<(Protocol, Prefixed<S>)> {
    let mut first = [0u8; 1];
    if io.read(&mut first).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if first[0] == TLS_HANDSHAKE {
        return Ok((
            Protocol::Tls,
            Prefixed {
                prefix: Bytes::copy_from_slice(&first),
                inner: io,
            },
        ));
    }
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    buf.extend_from_slice(&first);
    let (v, io) = detect_after(buf, io).await?;
    Ok((Protocol::Http(v), io))
}

/// Reads until the bytes either are the HTTP/2 preface or cannot be; returns the
/// protocol and the stream with those bytes put back in front. EOF before a decision
/// is an error (nothing to serve).
pub async fn detect<S: AsyncRead + Unpin>(io: S) -> io::Result<(HttpVersion, Prefixed<S>)> {
    detect_after(BytesMut::with_capacity(H2_PREFACE.len()), io).await
}

/// [`detect`] with `buf` already read from `io`.
async fn detect_after<S: AsyncRead + Unpin>(
    mut buf: BytesMut,
    mut io: S,
) -> io::Result<(HttpVersion, Prefixed<S>)> {
    let version = loop {
        let n = buf.len();
        if buf[..] != H2_PREFACE[..n] {
            break HttpVersion::Http1;
        }
        if n == H2_PREFACE.len() {
            break HttpVersion::H2c;
        }
        // read no further than the preface: the rest belongs to the server
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - n;
        let got = io.read(&mut chunk[..want]).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..got]);
    };
    Ok((
        version,
        Prefixed {
            prefix: buf.freeze(),
            inner: io,
        },
    ))
}

/// A stream with bytes already read put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner` with `prefix` read first.
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream and the bytes not read yet.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn run(input: &[u8]) -> (HttpVersion, Vec<u8>) {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(input).await.unwrap();
        drop(a);
        let (v, mut s) = detect(b).await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        (v, all)
    }

    #[tokio::test]
    async fn preface_is_h2_and_bytes_are_replayed() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00\x04");
        let (v, all) = run(&input).await;
        assert_eq!(v, HttpVersion::H2c);
        assert_eq!(all, input);
    }

    #[tokio::test]
    async fn anything_else_is_http1() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (v, all) = run(input).await;
        assert_eq!(v, HttpVersion::Http1);
        assert_eq!(all, input);
        // starts like the preface, then diverges
        let (v, all) = run(b"PRI * HTTP/1.1\r\n\r\n").await;
        assert_eq!(v, HttpVersion::Http1);
        assert_eq!(all, b"PRI * HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_handshake_record_is_tls_and_replayed() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
        drop(a);
        let (p, mut s) = detect_protocol(b).await.unwrap();
        assert_eq!(p, Protocol::Tls);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"\x16\x03\x01\x00\x05hello");
        for (input, want) in [
            (
                &b"GET / HTTP/1.1\r\n\r\n"[..],
                Protocol::Http(HttpVersion::Http1),
            ),
            (H2_PREFACE, Protocol::Http(HttpVersion::H2c)),
        ] {
            let (mut a, b) = tokio::io::duplex(1024);
            a.write_all(input).await.unwrap();
            drop(a);
            let (p, mut s) = detect_protocol(b).await.unwrap();
            assert_eq!(p, want);
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, input);
        }
    }

    #[tokio::test]
    async fn eof_before_a_decision_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"PRI * ").await.unwrap();
        drop(a);
        assert!(detect(b).await.is_err());
    }
}
