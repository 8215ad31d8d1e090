//! Reading a client's ClientHello with rustls' [`Acceptor`], without losing a byte: every
//! byte read is kept, so that a spliced session reaches the server exactly as the client
//! sent it, and an intercepted one continues from the parsed hello.

use std::io;

use rustls::server::{Accepted, Acceptor};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most a client may send before its ClientHello is complete. A ClientHello is at
/// most one handshake message (rustls caps it at 64 KiB) plus record headers.
pub const MAX_HELLO_BYTES: usize = 80 * 1024;

/// A ClientHello read off a connection.
pub struct Hello {
    pub accepted: Accepted,
    /// Every byte read from the client (the hello and whatever followed it in the reads).
    pub bytes: Vec<u8>,
    /// The bytes of `bytes` that rustls had not taken in when the hello was complete:
    /// they belong to the session after the hello.
    pub rest: usize,
    /// The SNI, lower-cased (rustls); None without one, also for an IP literal, which
    /// RFC 6066 does not allow as a server name.
    pub sni: Option<String>,
    /// The ALPN protocols offered.
    pub alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("sni", &self.sni)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// Why no ClientHello could be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("connection closed before a complete ClientHello")]
    Eof,
    #[error("ClientHello refused: {0}")]
    NotHello(String),
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// Reads until rustls has a complete ClientHello. The caller bounds the time.
pub async fn read_hello<S: AsyncRead + Unpin>(io: &mut S) -> Result<Hello, HelloError> {
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HelloError::Eof);
        }
        if bytes.len() + n > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut rd = &chunk[..n];
        while !rd.is_empty() {
            let taken = acceptor.read_tls(&mut rd)?;
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let hello = accepted.client_hello();
                    let sni = hello.server_name().map(str::to_string);
                    let alpn = hello
                        .alpn()
                        .map(|p| p.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default();
                    return Ok(Hello {
                        accepted,
                        rest: rd.len(),
                        bytes,
                        sni,
                        alpn,
                    });
                }
                Ok(None) if taken == 0 => {
                    return Err(HelloError::NotHello("rustls takes no more bytes".into()))
                }
                Ok(None) => {}
                Err((e, _alert)) => return Err(HelloError::NotHello(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn feed(input: Vec<u8>) -> Result<Hello, HelloError> {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            for piece in input.chunks(7) {
                if a.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        read_hello(&mut b).await
    }

    /// A ClientHello as rustls' own client writes it.
    fn client_hello(sni: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(std::iter::empty());
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut cfg = cfg;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_hello_is_read_in_pieces_and_every_byte_kept() {
        let mut input = client_hello("API.Example.COM");
        let len = input.len();
        input.extend_from_slice(b"after");
        let h = feed(input.clone()).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.example.com"), "lower-cased");
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(h.bytes.len() >= len);
        assert_eq!(h.bytes[..], input[..h.bytes.len()]);
    }

    #[tokio::test]
    async fn a_hello_without_sni_has_none() {
        // rustls sends no SNI for an IP address (openssl's IP literal SNI: tests/tls.rs)
        let h = feed(client_hello("192.0.2.7")).await.unwrap();
        assert_eq!(h.sni, None);
    }

    #[tokio::test]
    async fn garbage_eof_and_size_are_errors() {
        assert!(matches!(
            feed(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await,
            Err(HelloError::NotHello(_))
        ));
        assert!(matches!(
            feed(client_hello("a.example")[..20].to_vec()).await,
            Err(HelloError::Eof)
        ));
        // a record header announcing a huge handshake, then endless bytes
        let mut big = vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff];
        big.resize(MAX_HELLO_BYTES + 10, 0);
        assert!(feed(big).await.is_err());
    }
}
