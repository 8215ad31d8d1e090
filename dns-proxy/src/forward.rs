//! Forwarding a query to the server the client asked, over the client's transport. The
//! query bytes go out unchanged (EDNS and all) and the answer comes back unchanged.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

use crate::busy_poll::{self, BusyPoll};
use crate::proxy::Transport;
use crate::sink::BoxFuture;
use crate::socket;

/// Where allowed queries go. The real one is [`Forwarder`]; tests and the fuzz target
/// plug in their own.
pub trait Upstream: Send + Sync + 'static {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>>;

    /// [`Upstream::forward`], showing `watch` the answer as soon as it is read, before
    /// the exchange winds down (pooled socket, timer) and returns it. By default it is
    /// not shown.
    fn forward_watching<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
        watch: &'a dyn WatchAnswer,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let _ = watch;
        self.forward(query, server, transport)
    }
}

/// Sees an upstream answer (one with the query's id) the moment it is read: the proxy
/// releases a known answer's repeat from there ([`crate::proxy::Proxy::serve_with`]).
pub trait WatchAnswer: Sync {
    fn answer(&self, answer: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("upstream {0} timed out")]
    Timeout(SocketAddr),
    #[error("query too short to carry an id")]
    ShortQuery,
}

impl ForwardError {
    pub fn reason(&self) -> &'static str {
        match self {
            ForwardError::Io { .. } => "io",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::ShortQuery => "short",
        }
    }
}

/// A connected UDP socket with its receive buffer (64 KiB, allocated once).
#[derive(Debug)]
struct Pooled {
    sock: UdpSocket,
    buf: Vec<u8>,
}

/// Connected UDP sockets kept per server for reuse (bounded).
const POOL_PER_SERVER: usize = 256;

#[derive(Debug, Default)]
pub struct Forwarder {
    pub timeout: Duration,
    /// `SO_MARK` of upstream sockets.
    pub mark: Option<u32>,
    /// Idle connected UDP sockets per server. A socket goes back only after it received
    /// the answer it waited for (a timed-out one is closed), so no stale answer is
    /// pending on a reused socket; answers are still matched by id.
    pool: Mutex<HashMap<SocketAddr, Vec<Pooled>>>,
    /// Busy polling: answers are read directly while the window is open.
    busy: Option<Arc<BusyPoll>>,
}

impl Upstream for Forwarder {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        Box::pin(self.exchange(query, server, transport, None))
    }

    fn forward_watching<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
        watch: &'a dyn WatchAnswer,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        Box::pin(self.exchange(query, server, transport, Some(watch)))
    }
}

impl Forwarder {
    pub fn new(timeout: Duration, mark: Option<u32>, busy: Option<Arc<BusyPoll>>) -> Forwarder {
        Forwarder {
            timeout,
            mark,
            pool: Mutex::new(HashMap::new()),
            busy,
        }
    }

    fn take(&self, server: SocketAddr) -> Option<Pooled> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.get_mut(&server)?.pop()
    }

    fn put(&self, server: SocketAddr, sock: Pooled) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(server).or_default();
        if idle.len() < POOL_PER_SERVER {
            idle.push(sock);
        }
    }

    /// Sends `query` to `server` and returns the answer with the query's id, shown to
    /// `watch` first.
    pub async fn exchange(
        &self,
        query: &[u8],
        server: SocketAddr,
        transport: Transport,
        watch: Option<&dyn WatchAnswer>,
    ) -> Result<Vec<u8>, ForwardError> {
        if query.len() < 2 {
            return Err(ForwardError::ShortQuery);
        }
        let io = |source| ForwardError::Io { server, source };
        let fut = async {
            match transport {
                Transport::Udp => self.udp(query, server, watch).await,
                Transport::Tcp => self.tcp(query, server, watch).await,
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(io),
            Err(_) => Err(ForwardError::Timeout(server)),
        }
    }

    async fn udp(
        &self,
        query: &[u8],
        server: SocketAddr,
        watch: Option<&dyn WatchAnswer>,
    ) -> io::Result<Vec<u8>> {
        let mut p = match self.take(server) {
            Some(p) => p,
            None => Pooled {
                sock: self.connect_udp(server).await?,
                buf: vec![0u8; 65_535],
            },
        };
        p.sock.send(query).await?;
        loop {
            let got = busy_poll::recv(self.busy.as_deref(), || {
                socket::recv_now(&p.sock, &mut p.buf)
            })
            .await;
            let n = match got {
                Ok(got) => got?,
                Err(wait) => {
                    let n = p.sock.recv(&mut p.buf).await?;
                    drop(wait);
                    n
                }
            };
            let answer = p.buf.get(..n).unwrap_or_default();
            // A datagram with another id is not our answer (stale or spoofed): keep waiting.
            if n >= 2 && answer.get(..2) == query.get(..2) {
                if let Some(w) = watch {
                    w.answer(answer);
                }
                let answer = answer.to_vec();
                self.put(server, p);
                return Ok(answer);
            }
        }
    }

    async fn connect_udp(&self, server: SocketAddr) -> io::Result<UdpSocket> {
        let s = Socket::new(
            Domain::for_address(server),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        s.set_nonblocking(true)?;
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        let any: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        s.bind(&any.into())?;
        let sock = UdpSocket::from_std(s.into())?;
        sock.connect(server).await?;
        Ok(sock)
    }

    async fn tcp(
        &self,
        query: &[u8],
        server: SocketAddr,
        watch: Option<&dyn WatchAnswer>,
    ) -> io::Result<Vec<u8>> {
        let sock = if server.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(m) = self.mark {
            SockRef::from(&sock).set_mark(m)?;
        }
        let mut stream = sock.connect(server).await?;
        stream.set_nodelay(true)?;
        let len = u16::try_from(query.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query over 65535 bytes"))?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        stream.write_all(&out).await?;
        loop {
            let n = usize::from(stream.read_u16().await?);
            let mut buf = vec![0u8; n];
            stream.read_exact(&mut buf).await?;
            if n >= 2 && buf.get(..2) == query.get(..2) {
                if let Some(w) = watch {
                    w.answer(&buf);
                }
                return Ok(buf);
            }
        }
    }
}
