//! Upstream connections: the downstream protocol is the upstream protocol. An HTTP/1.1
//! upstream connection is bound to the downstream connection that opened or took it
//! (its requests are sequential, so the next one waits for the previous response to end
//! on the same connection: no pool, lock or task per request) and goes back to the
//! per-destination pool when the downstream connection ends; one HTTP/2 connection per
//! destination carries every stream. Upstream
//! sockets carry SO_MARK when configured, so the datapath does not redirect the proxy's
//! own traffic back to it. Requests of an intercepted TLS session go up over TLS
//! ([`UpstreamTls`]), in pools of their own per server name and trust.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::metrics::Metrics;

/// An HTTP/1.1 upstream connection bound to one downstream connection.
pub struct BoundH1 {
    key: Key,
    sender: http1::SendRequest<Incoming>,
}

impl std::fmt::Debug for BoundH1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundH1").field("key", &self.key).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("upstream {0} failed: {1}")]
    Request(SocketAddr, hyper::Error),
    #[error("upstream {0} switched protocols without a WebSocket request asking for it")]
    UnaskedSwitch(SocketAddr),
    #[error("TLS to {0} as {1} failed: {2}")]
    Tls(SocketAddr, String, io::Error),
    #[error("TLS handshake with {0} timed out")]
    TlsTimeout(SocketAddr),
}

impl UpstreamError {
    /// The label of `ward_proxy_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(..) => "connect",
            UpstreamError::ConnectTimeout(_) => "timeout",
            UpstreamError::Handshake(..)
            | UpstreamError::Request(..)
            | UpstreamError::UnaskedSwitch(_) => "protocol",
            UpstreamError::Tls(..) | UpstreamError::TlsTimeout(_) => "tls",
        }
    }

    /// Whether the request failed because the client's own body broke off or was
    /// malformed (the proxy read it as it forwarded it): the client's fault, 400.
    pub fn downstream_body_failed(&self) -> bool {
        match self {
            UpstreamError::Request(_, e) => {
                e.is_user()
                    && std::error::Error::source(e)
                        .is_some_and(|s| s.downcast_ref::<hyper::Error>().is_some())
            }
            _ => false,
        }
    }

    /// Whether the upstream could not be reached at all (503) rather than misbehaved (502).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(..) | UpstreamError::ConnectTimeout(_)
        )
    }
}

/// How the upstream connection of an intercepted session is secured: TLS with this
/// client configuration (its CA; its ALPN is the protocol the client chose) to this
/// server name (the client's SNI).
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    /// Identifies the trust of `config`: connections verified against other roots are
    /// not shared.
    pub trust: u64,
}

/// Upstream connections are shared only between requests with the same source address
/// (when the pod's address is kept), destination, and TLS server name and trust.
type Key = (Option<IpAddr>, SocketAddr, Option<(u64, String)>);

fn key(src: Option<IpAddr>, dst: SocketAddr, tls: Option<&UpstreamTls>) -> Key {
    (
        src,
        dst,
        tls.map(|t| (t.trust, t.name.to_str().into_owned())),
    )
}

/// An upstream connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
}
type H1Pool = Mutex<HashMap<Key, Vec<http1::SendRequest<Incoming>>>>;
type H2Pool = Mutex<HashMap<Key, http2::SendRequest<Incoming>>>;

/// Upstream settings.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub mark: Option<u32>,
    pub max_idle_per_destination: usize,
}

/// The upstream client shared by every connection of a proxy.
#[derive(Clone, Debug)]
pub struct Upstream {
    cfg: UpstreamConfig,
    h1: Arc<H1Pool>,
    h2: Arc<H2Pool>,
    metrics: Metrics,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig, metrics: Metrics) -> Upstream {
        Upstream {
            cfg,
            h1: Arc::default(),
            h2: Arc::default(),
            metrics,
        }
    }

    /// Connects to `dst` and, with `tls`, runs the TLS handshake (verified against
    /// `tls`'s roots for its server name; each within the connect timeout).
    pub async fn connect_io(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
        tls: Option<&UpstreamTls>,
    ) -> Result<UpstreamIo, UpstreamError> {
        let tcp = self.connect(src, dst).await?;
        let Some(t) = tls else {
            return Ok(UpstreamIo::Plain(tcp));
        };
        let connector = tokio_rustls::TlsConnector::from(t.config.clone());
        let stream = tokio::time::timeout(
            self.cfg.connect_timeout,
            connector.connect(t.name.clone(), tcp),
        )
        .await
        .map_err(|_| UpstreamError::TlsTimeout(dst))?
        .map_err(|e| UpstreamError::Tls(dst, t.name.to_str().into_owned(), e))?;
        Ok(UpstreamIo::Tls(Box::new(stream)))
    }

    /// Connects to `dst`, from `src` when given (transparent bind: the upstream sees the
    /// client's address; needs CAP_NET_ADMIN and, off loopback, the datapath to route the
    /// replies back to the proxy).
    pub(crate) async fn connect(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Result<TcpStream, UpstreamError> {
        let socket = if dst.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| UpstreamError::Connect(dst, e))?;
        if let Some(mark) = self.cfg.mark {
            SockRef::from(&socket)
                .set_mark(mark)
                .map_err(|e| UpstreamError::Connect(dst, e))?;
        }
        if let Some(ip) = src {
            let sock = SockRef::from(&socket);
            if ip.is_ipv4() {
                sock.set_ip_transparent_v4(true)
            } else {
                sock.set_ip_transparent_v6(true)
            }
            .map_err(|e| UpstreamError::Connect(dst, e))?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| UpstreamError::Connect(dst, e))?;
        }
        let stream = tokio::time::timeout(self.cfg.connect_timeout, socket.connect(dst))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(dst))?
            .map_err(|e| UpstreamError::Connect(dst, e))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn idle_h1(&self, key: Key) -> Option<http1::SendRequest<Incoming>> {
        let mut pool = self.h1.lock().ok()?;
        let idle = pool.get_mut(&key)?;
        while let Some(s) = idle.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Sends an HTTP/1.x request (origin-form URI) to `dst` over the upstream connection
    /// bound to the caller's downstream connection in `bound` when it goes to the same
    /// place and is still usable (waiting for its previous response to be read to the
    /// end), otherwise over a pooled or new one, which is then bound. Upgrades (101) are
    /// supported: the connection is then handed to the caller and not kept.
    pub async fn send_h1_bound(
        &self,
        bound: &Mutex<Option<BoundH1>>,
        src: Option<IpAddr>,
        dst: SocketAddr,
        tls: Option<&UpstreamTls>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = key(src, dst, tls);
        let taken = match bound.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let mut sender = None;
        if let Some(mut b) = taken {
            if b.key == key {
                if b.sender.ready().await.is_ok() {
                    sender = Some(b.sender);
                }
            } else {
                self.release_h1(b);
            }
        }
        let mut sender = match sender {
            Some(s) => s,
            None => self.checkout_h1(src, dst, tls).await?,
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Request(dst, e))?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let b = BoundH1 { key, sender };
            match bound.lock() {
                Ok(mut g) => *g = Some(b),
                Err(poisoned) => *poisoned.into_inner() = Some(b),
            }
        }
        Ok(resp)
    }

    /// Returns a bound upstream connection to the pool (its downstream connection
    /// ended), when it is idle and open; otherwise it is closed.
    pub fn release_h1(&self, b: BoundH1) {
        if !b.sender.is_ready() || b.sender.is_closed() {
            return;
        }
        if let Ok(mut pool) = self.h1.lock() {
            let idle = pool.entry(b.key).or_default();
            if idle.len() < self.cfg.max_idle_per_destination {
                idle.push(b.sender);
            }
        }
    }

    /// An idle pooled connection to `dst`, or a new one.
    async fn checkout_h1(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
        tls: Option<&UpstreamTls>,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        if let Some(s) = self.idle_h1(key(src, dst, tls)) {
            return Ok(s);
        }
        // Boxed: connecting is rare, and its future (a TLS handshake included) would
        // otherwise be laid out in every request's future, which is copied as it moves.
        // (A statement of its own: a temporary in the awaiting one would be laid out all
        // the same.)
        let connect = Box::pin(self.connect_h1(src, dst, tls));
        connect.await
    }

    /// A new HTTP/1.1 connection to `dst`, driven by a task of its own.
    async fn connect_h1(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
        tls: Option<&UpstreamTls>,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let io = TokioIo::new(self.connect_io(src, dst, tls).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(dst, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends an HTTP/2 request (absolute URI: its authority is the `:authority`) to `dst`.
    pub async fn send_h2(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
        tls: Option<&UpstreamTls>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = key(src, dst, tls);
        let existing = self
            .h2
            .lock()
            .ok()
            .and_then(|p| p.get(&key).filter(|s| !s.is_closed()).cloned());
        let mut sender = match existing {
            Some(s) => s,
            None => {
                // boxed, as in `checkout_h1`: a request's future is spawned per stream
                let connect = Box::pin(self.connect_h2(key, src, dst, tls));
                connect.await?
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::Request(dst, e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Request(dst, e))
    }

    /// A new HTTP/2 connection to `dst`, driven by a task of its own and shared as `key`.
    async fn connect_h2(
        &self,
        key: Key,
        src: Option<IpAddr>,
        dst: SocketAddr,
        tls: Option<&UpstreamTls>,
    ) -> Result<http2::SendRequest<Incoming>, UpstreamError> {
        let io = TokioIo::new(self.connect_io(src, dst, tls).await?);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(dst, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream h2 connection: {e}");
            }
        });
        if let Ok(mut p) = self.h2.lock() {
            p.insert(key, sender.clone());
        }
        Ok(sender)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_sockets_carry_the_configured_mark() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let up = Upstream::new(
            UpstreamConfig {
                connect_timeout: Duration::from_secs(2),
                mark: Some(0xb00),
                max_idle_per_destination: 1,
            },
            Metrics::new(),
        );
        match up.connect(None, dst).await {
            Ok(s) => assert_eq!(SockRef::from(&s).mark().unwrap(), 0xb00),
            // SO_MARK needs CAP_NET_ADMIN: without it, connecting must fail, not go
            // out unmarked
            Err(UpstreamError::Connect(_, e)) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}")
            }
            Err(e) => panic!("{e}"),
        }
        let plain = Upstream::new(
            UpstreamConfig {
                connect_timeout: Duration::from_secs(2),
                mark: None,
                max_idle_per_destination: 1,
            },
            Metrics::new(),
        );
        let s = plain.connect(None, dst).await.unwrap();
        assert_eq!(SockRef::from(&s).mark().unwrap(), 0);
    }
}
