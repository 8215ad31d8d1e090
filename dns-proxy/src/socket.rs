//! Transparent-mode sockets (need CAP_NET_ADMIN): a UDP listener that reports each
//! datagram's original destination (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`),
//! replies sent from that original address (`IP_TRANSPARENT` / `IPV6_TRANSPARENT` +
//! `SO_REUSEADDR`), and a TCP listener whose accepted sockets carry the original
//! destination as their local address. IPv6 sockets are `IPV6_V6ONLY`: the node binds one
//! listener per family on the same port. Control
//! messages are read through nix's safe `recvmsg`, so no `unsafe` is needed here.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{
    recv, recvfrom, recvmsg, send, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn,
    SockaddrIn6, SockaddrStorage,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};

fn new_socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        // One socket per family on the port: IPv4 traffic never reaches an IPv6 socket.
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A UDP listener in transparent mode that receives the original destination.
pub fn transparent_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    // A receive buffer for a burst of queries (every pod of the node asking at once, or
    // the moment two agents hand the socket over): the default (rmem_default, about
    // 200 KiB) holds a few hundred datagrams. Beyond rmem_max needs CAP_NET_ADMIN, which
    // the transparent socket needs anyway; without it the plain request is capped.
    if setsockopt(&s, sockopt::RcvBufForce, &QUERY_BUFFER).is_err() {
        setsockopt(&s, sockopt::RcvBuf, &QUERY_BUFFER)?;
    }
    if addr.is_ipv4() {
        setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true)?;
    } else {
        setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true)?;
    }
    s.bind(&SockAddr::from(addr))?;
    UdpSocket::from_std(s.into())
}

/// The receive buffer of the DNS proxy's UDP sockets, in bytes.
const QUERY_BUFFER: usize = 4 << 20;

/// A TCP listener in transparent mode.
pub fn transparent_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Receives one datagram: (length, client, original destination).
pub async fn recv_orig_dst(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    sock.async_io(Interest::READABLE, || recv_orig_dst_now(sock, buf))
        .await
}

/// Receives one datagram if one is waiting (`WouldBlock` if none), with the system call
/// made whatever the runtime last saw of the socket (busy polling).
pub fn recv_orig_dst_now(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    let mut cmsg = [0u8; 128];
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut orig = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                orig = Some(SocketAddr::from(SockaddrIn::from(a)));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                orig = Some(SocketAddr::from(SockaddrIn6::from(a)));
            }
            _ => {}
        }
    }
    let client = msg
        .address
        .and_then(|a| storage_to_std(&a))
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    Ok((msg.bytes, client, orig))
}

/// Receives one datagram and its source if one is waiting (`WouldBlock` if none), with
/// the system call made whatever the runtime last saw of the socket (busy polling).
pub fn recv_from_now(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    let (n, from) = recvfrom::<SockaddrStorage>(sock.as_raw_fd(), buf).map_err(io::Error::from)?;
    let from = from
        .and_then(|a| storage_to_std(&a))
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    Ok((n, from))
}

/// Receives one datagram on a connected socket if one is waiting (`WouldBlock` if none),
/// with the system call made whatever the runtime last saw of the socket (busy polling).
pub fn recv_now(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<usize> {
    recv(sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

/// Receives one datagram on the socket `fd` if one is waiting (`WouldBlock` if none).
pub fn recv_fd_now(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

/// Sends one datagram on the connected socket `fd` if it takes it at once (`WouldBlock`
/// if not), whatever the runtime last saw of the socket.
pub fn send_fd_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send(fd, buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

fn storage_to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// [`send_from`] without waiting: `WouldBlock` if the new socket does not take the
/// datagram at once (it has an empty buffer, so it does unless the system is short of
/// memory). Not registered with the runtime: two system calls fewer than [`send_from`].
pub fn send_from_now(data: &[u8], client: SocketAddr, from: SocketAddr) -> io::Result<()> {
    let s = new_socket(from, Type::DGRAM, Protocol::UDP)?;
    s.bind(&SockAddr::from(from))?;
    s.send_to(data, &SockAddr::from(client)).map(|_| ())
}

/// Sends `data` to `client` from `from` (an address that is not local: the server the
/// client asked), through a transparent socket bound to it.
pub async fn send_from(data: &[u8], client: SocketAddr, from: SocketAddr) -> io::Result<()> {
    let s = new_socket(from, Type::DGRAM, Protocol::UDP)?;
    s.bind(&SockAddr::from(from))?;
    let s = UdpSocket::from_std(s.into())?;
    s.send_to(data, client).await.map(|_| ())
}
