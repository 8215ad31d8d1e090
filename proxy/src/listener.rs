//! Where connections come from: a listener gives, per accepted connection, the peer
//! address and the original destination. Behind a trait so the whole proxy runs in tests
//! without root or a datapath.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// The listen backlog: the system's maximum (`net.core.somaxconn` of the network
/// namespace; the kernel caps any larger value to it), or 4096 when it cannot be read.
/// Bursts of connections wait in the accept queue instead of being refused.
pub fn system_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(4096)
}

/// One accepted downstream connection.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    /// The client.
    pub peer: SocketAddr,
    /// Where the client meant to connect: the upstream of this connection.
    pub orig_dst: SocketAddr,
}

/// A source of downstream connections.
pub trait Listener: Send + Sync + 'static {
    fn accept(&self) -> impl Future<Output = io::Result<Accepted>> + Send;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// The node proxy's listener: `IP_TRANSPARENT` (`IPV6_TRANSPARENT` for an IPv6 address),
/// so connections the datapath assigned to it (sk_assign / TPROXY) for any destination are
/// accepted; the original destination is the accepted socket's local address. An IPv6
/// listener is `IPV6_V6ONLY`: the node binds one listener per family on the same port
/// (the datapath looks up `127.0.0.1:port` for IPv4 flows and `[::1]:port` for IPv6 ones).
/// Needs CAP_NET_ADMIN.
#[derive(Debug)]
pub struct TransparentListener {
    inner: TcpListener,
}

impl TransparentListener {
    /// Binds `addr` with `IP_TRANSPARENT` (and `SO_REUSEPORT` when `reuse_port`, so
    /// several proxy processes can share the port); IPv6 addresses only take IPv6.
    pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TransparentListener> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(system_backlog())?;
        let inner = TcpListener::from_std(socket.into())?;
        Ok(TransparentListener { inner })
    }

    /// A listener [`TransparentListener::bind`] made, received from another process (a
    /// planned restart hands the agent's sockets over): its options came with it.
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<TransparentListener> {
        listener.set_nonblocking(true)?;
        Ok(TransparentListener {
            inner: TcpListener::from_std(listener)?,
        })
    }

    /// The listening socket, to hand to another process.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.inner.as_fd()
    }
}

impl Listener for TransparentListener {
    async fn accept(&self) -> io::Result<Accepted> {
        let (stream, peer) = self.inner.accept().await?;
        let orig_dst = stream.local_addr()?;
        Ok(Accepted {
            stream,
            peer,
            orig_dst,
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A plain listener whose connections all go to one upstream: standalone mode (a
/// policy-enforcing reverse proxy in front of one workload) and tests.
#[derive(Debug)]
pub struct FixedListener {
    inner: TcpListener,
    upstream: SocketAddr,
}

impl FixedListener {
    pub async fn bind(addr: SocketAddr, upstream: SocketAddr) -> io::Result<FixedListener> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(system_backlog())?;
        Ok(FixedListener {
            inner: TcpListener::from_std(socket.into())?,
            upstream,
        })
    }
}

impl Listener for FixedListener {
    async fn accept(&self) -> io::Result<Accepted> {
        let (stream, peer) = self.inner.accept().await?;
        Ok(Accepted {
            stream,
            peer,
            orig_dst: self.upstream,
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_listener_reports_peer_and_upstream() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let l = FixedListener::bind("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let a = l.accept().await.unwrap();
        assert_eq!(a.orig_dst, up);
        assert_eq!(a.peer, client.local_addr().unwrap());
    }

    #[tokio::test]
    async fn transparent_listener_orig_dst_is_local_addr() {
        // IP_TRANSPARENT needs CAP_NET_ADMIN: without it, the error must be the
        // permission error and nothing else.
        let l = match TransparentListener::bind("127.0.0.1:0".parse().unwrap(), true) {
            Ok(l) => l,
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                return;
            }
        };
        let addr = l.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let a = l.accept().await.unwrap();
        assert_eq!(a.orig_dst, addr);
    }

    #[tokio::test]
    async fn transparent_ipv6_listener_takes_ipv6_only_and_shares_the_port() {
        let v6 = match TransparentListener::bind("[::]:0".parse().unwrap(), false) {
            Ok(l) => l,
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                return;
            }
        };
        let port = v6.local_addr().unwrap().port();
        // The IPv4 listener of the node on the same port (no SO_REUSEPORT to hide a
        // conflict): without IPV6_V6ONLY the IPv6 wildcard would own it.
        let v4 = TransparentListener::bind(SocketAddr::from(([0, 0, 0, 0], port)), false).unwrap();
        let _c4 = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let a = v4.accept().await.unwrap();
        assert!(a.peer.is_ipv4());
        let addr6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        let c6 = TcpStream::connect(addr6).await.unwrap();
        let a = v6.accept().await.unwrap();
        assert_eq!(a.orig_dst, addr6);
        assert_eq!(a.peer, c6.local_addr().unwrap());
    }
}
