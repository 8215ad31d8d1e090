//! UDP and TCP listeners on one port. Where the original server comes from and how the
//! reply leaves are behind traits, so the whole proxy runs unprivileged in tests
//! (standalone mode: one fixed upstream, replies from the listening socket).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::{Handle, RuntimeFlavor};

use crate::busy_poll::{self, BusyPoll};
use crate::proxy::{Proxy, QueryContext, ReplyNow, Transport};
use crate::sink::BoxFuture;
use crate::socket;

/// How long a TCP client may stay silent between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// One received datagram.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    pub len: usize,
    pub client: SocketAddr,
    /// The server the client asked.
    pub server: SocketAddr,
}

/// The UDP side: receive with the original server, reply as that server.
pub trait UdpTransport: Send + Sync + 'static {
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<Datagram>>;
    /// The next datagram if one is waiting, else `WouldBlock`; the system call is made
    /// whatever the runtime last saw of the socket (busy polling, [`BusyPoll::recv`]).
    fn recv_now(&self, buf: &mut [u8]) -> io::Result<Datagram>;
    /// Sends the reply at once if the socket takes it without waiting, else
    /// `WouldBlock` (then [`UdpTransport::send`] waits): a reply leaves without a future
    /// of its own.
    fn send_now(&self, data: &[u8], client: SocketAddr, server: SocketAddr) -> io::Result<()>;
    fn send<'a>(
        &'a self,
        data: &'a [u8],
        client: SocketAddr,
        server: SocketAddr,
    ) -> BoxFuture<'a, io::Result<()>>;
}

/// Standalone mode: every query goes to one upstream; replies leave the listening socket.
pub struct ForwarderUdp {
    pub socket: UdpSocket,
    pub upstream: SocketAddr,
}

impl UdpTransport for ForwarderUdp {
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<Datagram>> {
        Box::pin(async move {
            let (len, client) = self.socket.recv_from(buf).await?;
            Ok(Datagram {
                len,
                client,
                server: self.upstream,
            })
        })
    }

    fn recv_now(&self, buf: &mut [u8]) -> io::Result<Datagram> {
        let (len, client) = socket::recv_from_now(&self.socket, buf)?;
        Ok(Datagram {
            len,
            client,
            server: self.upstream,
        })
    }

    fn send_now(&self, data: &[u8], client: SocketAddr, _server: SocketAddr) -> io::Result<()> {
        self.socket.try_send_to(data, client).map(|_| ())
    }

    fn send<'a>(
        &'a self,
        data: &'a [u8],
        client: SocketAddr,
        _server: SocketAddr,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { self.socket.send_to(data, client).await.map(|_| ()) })
    }
}

/// Transparent mode: the original server from `IP_RECVORIGDSTADDR`, replies from a
/// transparent socket bound to it.
pub struct TransparentUdp {
    pub socket: UdpSocket,
    local: SocketAddr,
}

impl TransparentUdp {
    pub fn bind(addr: SocketAddr) -> io::Result<TransparentUdp> {
        let socket = socket::transparent_udp(addr)?;
        let local = socket.local_addr()?;
        Ok(TransparentUdp { socket, local })
    }

    /// A socket [`TransparentUdp::bind`] made, received from another process (a planned
    /// restart hands the agent's sockets over): its options came with it.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<TransparentUdp> {
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let local = socket.local_addr()?;
        Ok(TransparentUdp { socket, local })
    }
}

/// Whether `server` is the listener itself: a query sent straight to the proxy, not
/// redirected. Forwarding it would loop back into the proxy.
pub fn is_self(server: SocketAddr, listen: SocketAddr) -> bool {
    server.port() == listen.port() && (listen.ip().is_unspecified() || server.ip() == listen.ip())
}

impl TransparentUdp {
    /// The datagram, unless it was sent to the listener itself, not redirected: then
    /// there is no server to forward to (forwarding would loop into the proxy) and it is
    /// dropped.
    fn redirected(
        &self,
        (len, client, orig): (usize, SocketAddr, Option<SocketAddr>),
    ) -> Option<Datagram> {
        match orig {
            Some(server) if !is_self(server, self.local) => Some(Datagram {
                len,
                client,
                server,
            }),
            _ => {
                tracing::debug!(%client, "datagram not redirected: dropped");
                None
            }
        }
    }
}

impl UdpTransport for TransparentUdp {
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<Datagram>> {
        Box::pin(async move {
            loop {
                let got = socket::recv_orig_dst(&self.socket, buf).await?;
                if let Some(d) = self.redirected(got) {
                    return Ok(d);
                }
            }
        })
    }

    fn recv_now(&self, buf: &mut [u8]) -> io::Result<Datagram> {
        loop {
            let got = socket::recv_orig_dst_now(&self.socket, buf)?;
            if let Some(d) = self.redirected(got) {
                return Ok(d);
            }
        }
    }

    fn send_now(&self, data: &[u8], client: SocketAddr, server: SocketAddr) -> io::Result<()> {
        socket::send_from_now(data, client, server)
    }

    fn send<'a>(
        &'a self,
        data: &'a [u8],
        client: SocketAddr,
        server: SocketAddr,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(socket::send_from(data, client, server))
    }
}

/// The TCP side: the original server of an accepted connection.
pub trait OrigDst: Send + Sync + 'static {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// Standalone mode: one upstream.
pub struct FixedUpstream(pub SocketAddr);

impl OrigDst for FixedUpstream {
    fn orig_dst(&self, _stream: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

/// Transparent mode: the accepted socket's local address is the server the client asked.
pub struct LocalAddr;

impl OrigDst for LocalAddr {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }
}

/// Serves UDP until the socket fails or the proxy stops serving
/// ([`Proxy::stop_serving`]). On a current-thread runtime (`ward dns-proxy --threads 1`,
/// the agent's `ward-dns` thread) the queries in flight are futures of this task
/// ([`serve_udp_inline`]); on a multi-thread runtime each datagram is handled in a task
/// of its own, so queries spread over the workers.
pub async fn serve_udp(proxy: Proxy, io: Arc<dyn UdpTransport>) -> io::Result<()> {
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        return serve_udp_inline(proxy, io).await;
    }
    let mut buf = vec![0u8; 65_535];
    loop {
        let d = tokio::select! {
            d = recv_datagram(&*io, &mut buf, None) => d?,
            () = proxy.stopped() => return Ok(()),
        };
        let Some(d) = d else {
            continue;
        };
        let received = Instant::now();
        let query = buf.get(..d.len).unwrap_or_default().to_vec();
        tokio::spawn(answer(proxy.clone(), io.clone(), query, d, received));
    }
}

/// Serves UDP with every query in flight a future of this one task. A new query is
/// polled (parsed, checked, sent upstream) before the socket is read again, and an
/// upstream answer wakes this task, not a task of its own: no spawn, and no hop through
/// the scheduler, on the query's way. Only for a current-thread runtime, where a task per
/// query would run on the same thread anyway.
pub async fn serve_udp_inline(proxy: Proxy, io: Arc<dyn UdpTransport>) -> io::Result<()> {
    let mut buf = vec![0u8; 65_535];
    let mut in_flight = FuturesUnordered::new();
    let busy = proxy.busy_poll();
    loop {
        tokio::select! {
            // Queries first: a new one goes upstream before the next read, and answers
            // that came in are released before more queries are taken.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            () = proxy.stopped() => {
                while in_flight.next().await.is_some() {}
                return Ok(());
            }
            d = recv_datagram(&*io, &mut buf, busy.as_deref()) => {
                let d = match d {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(e) => {
                        // The queries in flight still get their replies and records,
                        // as they would in tasks of their own.
                        while in_flight.next().await.is_some() {}
                        return Err(e);
                    }
                };
                let received = Instant::now();
                let query = buf.get(..d.len).unwrap_or_default().to_vec();
                // Boxed: the future is moved in and out of the set as a pointer, not
                // copied (it is a kilobyte or more).
                let mut query = Box::pin(answer(proxy.clone(), io.clone(), query, d, received));
                // Polled here first, up to its upstream send (or to its reply): the query
                // leaves before the loop and the set are gone through. The set polls it
                // again once it holds it, with its own waker.
                let first = std::future::poll_fn(|cx| Poll::Ready(query.as_mut().poll(cx))).await;
                if first.is_pending() {
                    in_flight.push(query);
                }
            }
        }
    }
}

/// The next datagram; `None` after a transient receive error (logged), which does not
/// stop the listener. With busy polling the socket is read directly while the window is
/// open.
async fn recv_datagram(
    io: &dyn UdpTransport,
    buf: &mut [u8],
    busy: Option<&BusyPoll>,
) -> io::Result<Option<Datagram>> {
    let got = match busy_poll::recv(busy, || io.recv_now(buf)).await {
        Ok(got) => got,
        Err(wait) => {
            let got = io.recv(buf).await;
            drop(wait);
            got
        }
    };
    match got {
        Ok(d) => Ok(Some(d)),
        Err(e) if transient(&e) => {
            tracing::debug!("udp receive: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Handles one datagram's query and sends the reply, if any.
async fn answer(
    proxy: Proxy,
    io: Arc<dyn UdpTransport>,
    query: Vec<u8>,
    d: Datagram,
    received: Instant,
) {
    let _flight = proxy.in_flight();
    let ctx = QueryContext {
        client: d.client,
        server: d.server,
        transport: Transport::Udp,
    };
    let to = ReplyTo {
        io: &*io,
        client: d.client,
        server: d.server,
    };
    let handled = proxy.serve_with(&query, ctx, Some(&to)).await;
    if let Some(reply) = handled.reply.as_ref().filter(|_| !handled.replied) {
        let sent = match io.send_now(reply, d.client, d.server) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                io.send(reply, d.client, d.server).await
            }
            sent => sent,
        };
        if let Err(e) = sent {
            reply_failed(d.client, &e);
        }
    }
    proxy.record(handled, &query, Some(received));
}

/// Says that a UDP reply could not be sent: the client's answer is lost. Refused
/// permission is how the node runs the proxy, not load: a reply leaves from the server's
/// address and port through a socket bound to it, and a port below 1024 (DNS's 53) takes
/// CAP_NET_BIND_SERVICE. That is a warning, at most once a minute (every reply fails
/// alike); anything else (a full buffer) is debug.
pub(crate) fn reply_failed(client: SocketAddr, e: &io::Error) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if e.kind() == io::ErrorKind::PermissionDenied && warning_due(&LAST_REFUSED_WARNING, now) {
        tracing::warn!(
            %client,
            "udp reply failed: {e} (replying from a server's port below 1024 needs \
             CAP_NET_BIND_SERVICE)"
        );
    } else {
        tracing::debug!(%client, "udp reply failed: {e}");
    }
}

/// When the last refused reply was a warning (seconds since the epoch; 0: never).
static LAST_REFUSED_WARNING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a warning is due at `now` (seconds) after the one at `last`: the first, then
/// one a minute; claims it, so that one of several threads says it.
fn warning_due(last: &std::sync::atomic::AtomicU64, now: u64) -> bool {
    use std::sync::atomic::Ordering;
    let before = last.load(Ordering::Relaxed);
    (before == 0 || now >= before.saturating_add(60))
        && last
            .compare_exchange(before, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// A UDP query's client, to reply to at once.
struct ReplyTo<'a> {
    io: &'a dyn UdpTransport,
    client: SocketAddr,
    server: SocketAddr,
}

impl ReplyNow for ReplyTo<'_> {
    fn reply_now(&self, reply: &[u8]) -> io::Result<()> {
        self.io.send_now(reply, self.client, self.server)
    }

    fn failed(&self, e: &io::Error) {
        reply_failed(self.client, e);
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Accepts TCP connections until the proxy stops serving ([`Proxy::stop_serving`]); one
/// task per connection, queries answered in order (a connection outlives the stop).
pub async fn serve_tcp(
    proxy: Proxy,
    listener: TcpListener,
    orig: Arc<dyn OrigDst>,
) -> io::Result<()> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = proxy.stopped() => return Ok(()),
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let server = match orig.orig_dst(&stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%client, "no original destination: {e}");
                continue;
            }
        };
        if listener.local_addr().is_ok_and(|l| is_self(server, l)) {
            tracing::debug!(%client, "connection not redirected: closed");
            continue;
        }
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(proxy, stream, client, server).await {
                tracing::debug!(%client, "tcp connection: {e}");
            }
        });
    }
}

async fn serve_connection(
    proxy: Proxy,
    mut stream: TcpStream,
    client: SocketAddr,
    server: SocketAddr,
) -> io::Result<()> {
    let ctx = QueryContext {
        client,
        server,
        transport: Transport::Tcp,
    };
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let received = Instant::now();
        let _flight = proxy.in_flight();
        let handled = proxy.serve(&query, ctx).await;
        let sent = match handled.reply.as_deref() {
            Some(reply) => write_framed(&mut stream, reply).await,
            None => Ok(()),
        };
        // Recorded whether or not the reply could be written: the query happened.
        proxy.record(handled, &query, Some(received));
        sent?;
    }
}

/// Writes one DNS message with its two-byte length, in one write.
async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let n = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "reply over 65535 bytes"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A proxy that may not reply from port 53 says so at once, and then once a minute,
    /// not once per query.
    #[test]
    fn a_refused_reply_warns_at_first_and_then_once_a_minute() {
        let last = AtomicU64::new(0);
        assert!(warning_due(&last, 1_000));
        assert!(!warning_due(&last, 1_000));
        assert!(!warning_due(&last, 1_059));
        assert!(warning_due(&last, 1_060));
        assert!(!warning_due(&last, 1_061));
    }
}
