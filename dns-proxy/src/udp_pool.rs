//! UDP sockets towards the upstream servers: a port of its own for every query, on
//! sockets kept from one query to the next.
//!
//! A socket opened per query (socket, bind, connect, registration with the runtime, then
//! deregistration and close) costs more system time than the rest of the query. So the
//! file descriptors are kept, but not their ports: a kept socket has no port at all. A
//! query takes one and connects it to its server, which binds a port the kernel picks at
//! random from the ephemeral range (`inet_autobind`, as `bind` to port 0 does) just
//! before the query is sent; when the query ends the socket is disconnected (`connect`
//! with `AF_UNSPEC`, [`rustix::net::connect_unspec`]), which gives the port up, and
//! drained of whatever reached the port after the answer. So, as with a socket per
//! query:
//!
//! - every query leaves from a port chosen for it alone, held by no other query, with an
//!   id of its own ([`crate::forward::Sent`]); two queries in flight never share a port;
//! - a port exists only while its query is out: no port is open towards a server while no
//!   query is, so none can be found (scanned) before a query and fed forged answers
//!   ahead of it, and an answer that comes late to a port that was given up finds no
//!   socket (the kernel answers it with an ICMP port unreachable);
//! - nothing queued on a socket before its query is read as its answer: what reached the
//!   port after the answer is drained (and counted) while the socket has no port, before
//!   it serves again.
//!
//! Only the file descriptor and its registration with the runtime are reused. The
//! disconnect and the drain are the work of the pool's task, which runs after the
//! query's reply left (on a current-thread runtime: once the listener's task yields); on
//! the query's way there is one `connect`. A query that finds no kept socket takes one
//! that came back and still waits for the task, and gives its port up itself (cheaper
//! than opening a socket, and the number of sockets follows the queries in flight).
//!
//! Bounds: at most [`MAX_FREE`] kept sockets per address family (more are closed as they
//! come back), [`SPARE`] of them opened ahead while a family is in use, and a kept socket
//! unused for [`IDLE`] is closed, so a proxy at rest holds no upstream socket.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::socket;

/// Kept sockets per address family at most.
pub const MAX_FREE: usize = 64;
/// Sockets opened ahead for a family in use, so that a burst rarely opens one on a
/// query's way.
pub const SPARE: usize = 2;
/// A kept socket unused this long is closed.
pub const IDLE: Duration = Duration::from_secs(10);

/// The upstream UDP sockets of one forwarder.
#[derive(Debug)]
pub struct UdpPool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// `SO_MARK` of the sockets.
    mark: Option<u32>,
    /// Datagrams (and errors) on a socket that were not its query's answer.
    unexpected: IntCounter,
    /// How long a kept socket is kept unused.
    idle: Duration,
    /// Sockets opened so far.
    opened: AtomicU64,
    state: Mutex<State>,
    /// Wakes the pool's task: sockets came back, a family is short of spares, or the
    /// pool was dropped.
    wake: Notify,
}

/// An address family: the index of its kept sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4 = 0,
    V6 = 1,
}

impl Family {
    fn of(addr: SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn domain(self) -> Domain {
        match self {
            Family::V4 => Domain::IPV4,
            Family::V6 => Domain::IPV6,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Per family, the sockets without a port ready for a query, the most recently kept
    /// last.
    free: [Vec<Free>; 2],
    /// Sockets whose query ended, still on its port: the task gives the port up.
    returned: Vec<(Family, UdpSocket)>,
    /// Families whose kept sockets fell below [`SPARE`].
    short: [bool; 2],
    /// The pool's task runs.
    task: bool,
    /// The pool was dropped: the task closes everything and ends.
    closed: bool,
}

#[derive(Debug)]
struct Free {
    sock: UdpSocket,
    since: Instant,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UdpPool {
    /// A pool whose sockets carry `mark`; datagrams that are no query's answer are
    /// counted in `unexpected`.
    pub fn new(mark: Option<u32>, unexpected: IntCounter) -> UdpPool {
        UdpPool::with_idle(mark, unexpected, IDLE)
    }

    /// The same, closing kept sockets unused for `idle`.
    pub fn with_idle(mark: Option<u32>, unexpected: IntCounter, idle: Duration) -> UdpPool {
        UdpPool {
            shared: Arc::new(Shared {
                mark,
                unexpected,
                idle,
                opened: AtomicU64::new(0),
                state: Mutex::default(),
                wake: Notify::new(),
            }),
        }
    }

    /// A socket for one query to `server`: connected to it now, on a port the kernel
    /// just picked. A kept socket if there is one; else one that came back and still
    /// waits for the pool's task, its port given up here (two system calls, fewer than
    /// opening a socket); else a new one. Call from within the runtime that serves the
    /// sockets.
    pub fn take(&self, server: SocketAddr) -> io::Result<Lease<'_>> {
        let sh = &self.shared;
        let family = Family::of(server);
        let sock = match sh.reuse(family) {
            Some(Reuse::Kept(sock)) => sock,
            Some(Reuse::Back(sock)) => match sh.give_port_up(&sock) {
                Ok(()) => sock,
                Err(_) => sh.open(family)?,
            },
            None => sh.open(family)?,
        };
        // On an error the socket is closed (dropped), not kept.
        SockRef::from(&sock).connect(&server.into())?;
        Ok(Lease {
            pool: sh,
            family,
            sock: Some(sock),
        })
    }

    /// Sockets kept for `server`'s family now (without a port).
    pub fn kept(&self, server: SocketAddr) -> usize {
        lock(&self.shared.state).free[Family::of(server) as usize].len()
    }

    /// Sockets opened so far (each then serves query after query, a new port each).
    pub fn opened(&self) -> u64 {
        self.shared.opened.load(Ordering::Relaxed)
    }
}

impl Drop for UdpPool {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_one();
    }
}

/// A socket for the next query of a family, from the pool.
enum Reuse {
    /// Kept, without a port.
    Kept(UdpSocket),
    /// Back from its query, still on its port.
    Back(UdpSocket),
}

impl Shared {
    /// A kept socket of `family`, else one that came back; starts the pool's task when it
    /// does not run, and wakes it when the family runs short of spares.
    fn reuse(self: &Arc<Self>, family: Family) -> Option<Reuse> {
        let mut st = lock(&self.state);
        if !st.task {
            st.task = true;
            tokio::spawn(run(self.clone()));
        }
        let at = family as usize;
        let kept = st.free[at].pop();
        if st.free[at].len() < SPARE && !st.short[at] {
            st.short[at] = true;
            self.wake.notify_one();
        }
        if let Some(f) = kept {
            return Some(Reuse::Kept(f.sock));
        }
        let back = st.returned.iter().rposition(|(f, _)| *f == family)?;
        Some(Reuse::Back(st.returned.swap_remove(back).1))
    }

    /// A UDP socket of `family`, without a port yet, registered with the runtime.
    fn open(&self, family: Family) -> io::Result<UdpSocket> {
        let s = Socket::new(
            family.domain(),
            Type::DGRAM.nonblocking(),
            Some(Protocol::UDP),
        )?;
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        UdpSocket::from_std(s.into())
    }

    /// Gives `sock`'s port up (disconnected, it has none and nothing more reaches it),
    /// then reads whatever reached the port before, counting it as unexpected.
    fn give_port_up(&self, sock: &UdpSocket) -> io::Result<()> {
        rustix::net::connect_unspec(sock)?;
        let mut buf = [0u8; 512];
        loop {
            match socket::recv_fd_now(sock.as_raw_fd(), &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // A datagram, or a pending error (an ICMP unreachable) reported once and
                // cleared.
                Ok(_) | Err(_) => self.unexpected.inc(),
            }
        }
    }
}

/// One query's socket, connected to its server on a port of its own. When dropped (the
/// query ended, answered or not) the socket goes back to the pool, which gives its port
/// up before it serves again.
#[derive(Debug)]
pub struct Lease<'a> {
    pool: &'a Arc<Shared>,
    family: Family,
    sock: Option<UdpSocket>,
}

impl Lease<'_> {
    pub fn socket(&self) -> io::Result<&UdpSocket> {
        self.sock
            .as_ref()
            .ok_or_else(|| io::Error::other("upstream socket given back"))
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(sock) = self.sock.take() else { return };
        let mut st = lock(&self.pool.state);
        if st.task && !st.closed {
            st.returned.push((self.family, sock));
            drop(st);
            self.pool.wake.notify_one();
        }
    }
}

/// Marks the pool's task gone when it ends or is dropped with its runtime, so that
/// sockets are no longer given back to it (they are closed instead) and the next take
/// starts it again. The kept sockets are closed with it: they are registered with the
/// runtime that is going away.
struct TaskGone<'a>(&'a Shared);

impl Drop for TaskGone<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.task = false;
        st.returned.clear();
        st.free = Default::default();
    }
}

/// The pool's task: ports given up for the sockets that came back, spares for families
/// in use, and the closing of sockets unused for the idle time.
async fn run(sh: Arc<Shared>) {
    let _gone = TaskGone(&sh);
    let check = sh.idle.min(Duration::from_secs(1));
    let mut tick = pin!(tokio::time::sleep(check));
    loop {
        let (returned, short) = {
            let mut st = lock(&sh.state);
            if st.closed {
                st.free = Default::default();
                return;
            }
            (
                std::mem::take(&mut st.returned),
                std::mem::take(&mut st.short),
            )
        };
        for (family, sock) in returned {
            match sh.give_port_up(&sock) {
                Ok(()) => keep(&sh, family, sock),
                Err(e) => tracing::debug!("giving an upstream socket's port up: {e}"),
            }
        }
        for family in [Family::V4, Family::V6] {
            if short[family as usize] {
                open_spares(&sh, family);
            }
        }
        tokio::select! {
            () = sh.wake.notified() => {}
            () = tick.as_mut() => {
                expire(&sh);
                tick.as_mut().reset(Instant::now() + check);
            }
        }
    }
}

/// Opens sockets for `family` until it has [`SPARE`] kept.
fn open_spares(sh: &Shared, family: Family) {
    while lock(&sh.state).free[family as usize].len() < SPARE {
        match sh.open(family) {
            Ok(sock) => keep(sh, family, sock),
            Err(e) => {
                tracing::debug!("opening an upstream socket: {e}");
                return;
            }
        }
    }
}

/// Keeps a socket without a port for the next query, or closes it when its family has
/// enough.
fn keep(sh: &Shared, family: Family, sock: UdpSocket) {
    let mut st = lock(&sh.state);
    let free = &mut st.free[family as usize];
    if free.len() < MAX_FREE {
        free.push(Free {
            sock,
            since: Instant::now(),
        });
    }
}

/// Closes the kept sockets unused for the idle time (the oldest come first).
fn expire(sh: &Shared) {
    let now = Instant::now();
    let mut st = lock(&sh.state);
    for free in &mut st.free {
        let stale = free.partition_point(|f| now.duration_since(f.since) >= sh.idle);
        free.drain(..stale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::UdpSocket as StdUdp;
    use std::os::fd::RawFd;

    fn counter() -> IntCounter {
        IntCounter::new("unexpected", "test").unwrap()
    }

    /// Waits (bounded) until `cond` holds, letting the pool's task run.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn server() -> (StdUdp, SocketAddr) {
        let s = StdUdp::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    fn port(lease: &Lease<'_>) -> u16 {
        lease.socket().unwrap().local_addr().unwrap().port()
    }

    fn fd(lease: &Lease<'_>) -> RawFd {
        lease.socket().unwrap().as_raw_fd()
    }

    /// One exchange through `lease`: the query out, the server's echo back.
    async fn exchange(lease: &Lease<'_>, srv: &StdUdp) {
        let sock = lease.socket().unwrap();
        sock.send(b"query").await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = srv.recv_from(&mut buf).unwrap();
        assert_eq!(from.port(), port(lease), "sent from the lease's port");
        srv.send_to(&buf[..n], from).unwrap();
        let n = sock.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"query");
    }

    /// Whether a datagram is queued on `fd` (left there).
    fn queued(fd: RawFd) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let mut b = [0u8; 8];
        recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).is_ok()
    }

    /// The local ports of the kept sockets of `to`'s family.
    fn kept_ports(pool: &UdpPool, to: SocketAddr) -> Vec<u16> {
        lock(&pool.shared.state).free[Family::of(to) as usize]
            .iter()
            .map(|f| f.sock.local_addr().unwrap().port())
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_query_leaves_from_a_port_of_its_own_on_a_kept_socket() {
        let (srv, to) = server();
        let pool = UdpPool::new(None, counter());
        let mut ports = Vec::new();
        for _ in 0..100 {
            let lease = pool.take(to).unwrap();
            ports.push(port(&lease));
            exchange(&lease, &srv).await;
            drop(lease);
            // Kept again, without its port, before the next query (as after a reply).
            until("the socket kept", || pool.kept(to) == SPARE + 1).await;
        }
        let distinct: HashSet<_> = ports.iter().collect();
        // Ports are drawn at random from ~28,000: two of 100 may meet by chance.
        assert!(distinct.len() >= 97, "{} distinct of 100", distinct.len());
        // The first query's socket and the spares, each used again and again.
        assert_eq!(pool.opened(), 1 + SPARE as u64);
    }

    /// A query that comes before the pool's task ran takes a socket that came back (its
    /// port given up there and then) rather than opening one.
    #[tokio::test(flavor = "current_thread")]
    async fn a_socket_back_but_not_yet_kept_serves_the_next_query() {
        let (srv, to) = server();
        let unexpected = counter();
        let pool = UdpPool::new(None, unexpected.clone());
        let lease = pool.take(to).unwrap();
        let (old, sock_fd) = (port(&lease), fd(&lease));
        exchange(&lease, &srv).await;
        // Something reached the port after the answer.
        srv.send_to(b"late", ("127.0.0.1", old)).unwrap();
        until("the datagram queued", || queued(sock_fd)).await;
        drop(lease);
        // No await from here: the task has not seen it come back. The spares go first.
        let spares: Vec<_> = (0..SPARE).map(|_| pool.take(to).unwrap()).collect();
        let lease = pool.take(to).unwrap();
        assert_eq!(fd(&lease), sock_fd, "the socket that came back");
        assert!(spares.iter().all(|s| fd(s) != sock_fd));
        assert_ne!(port(&lease), old);
        assert!(!queued(sock_fd), "drained");
        assert_eq!(unexpected.get(), 1);
        assert_eq!(pool.opened(), 1 + SPARE as u64, "none opened for it");
        exchange(&lease, &srv).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn queries_in_flight_at_once_hold_distinct_ports_and_kept_sockets_none() {
        let (_srv, to) = server();
        let pool = UdpPool::new(None, counter());
        let leases: Vec<_> = (0..50).map(|_| pool.take(to).unwrap()).collect();
        let ports: HashSet<u16> = leases.iter().map(port).collect();
        assert_eq!(ports.len(), 50, "a port per query in flight");
        assert!(!ports.contains(&0));
        for l in &leases {
            assert_eq!(l.socket().unwrap().peer_addr().unwrap(), to, "connected");
        }
        drop(leases);
        // Back before the task ran: no spares were needed.
        until("the sockets kept", || pool.kept(to) == 50).await;
        // No port while no query is out: nothing can be sent to them ahead of a query.
        assert!(
            kept_ports(&pool, to).iter().all(|&p| p == 0),
            "{:?}",
            kept_ports(&pool, to)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_to_a_port_given_up_reaches_no_query() {
        let (srv, to) = server();
        let unexpected = counter();
        let pool = UdpPool::new(None, unexpected.clone());
        let lease = pool.take(to).unwrap();
        let (old, sock_fd) = (port(&lease), fd(&lease));
        exchange(&lease, &srv).await;
        drop(lease);
        until("the socket kept", || pool.kept(to) == SPARE + 1).await;
        // A late (or forged) answer to the port the query left from: no socket has it.
        srv.send_to(b"late", ("127.0.0.1", old)).unwrap();
        // The same socket (kept last, taken first) serves the next query, on a new port,
        // with nothing queued.
        let lease = pool.take(to).unwrap();
        assert_eq!(fd(&lease), sock_fd, "the kept socket is reused");
        assert_ne!(port(&lease), old);
        exchange(&lease, &srv).await;
        assert!(!queued(sock_fd));
        assert_eq!(unexpected.get(), 0, "nothing reached a socket");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn what_reached_the_port_after_its_answer_is_drained_not_read_by_the_next_query() {
        let (srv, to) = server();
        let unexpected = counter();
        let pool = UdpPool::new(None, unexpected.clone());
        let lease = pool.take(to).unwrap();
        let (old, sock_fd) = (port(&lease), fd(&lease));
        exchange(&lease, &srv).await;
        // Two more datagrams reach the port after the answer, before it is given up.
        srv.send_to(b"dup-1", ("127.0.0.1", old)).unwrap();
        srv.send_to(b"dup-2", ("127.0.0.1", old)).unwrap();
        until("the datagrams queued", || queued(sock_fd)).await;
        drop(lease);
        until("the socket kept", || pool.kept(to) == SPARE + 1).await;
        assert_eq!(unexpected.get(), 2, "drained and counted");
        let lease = pool.take(to).unwrap();
        assert_eq!(fd(&lease), sock_fd);
        assert!(
            !queued(sock_fd),
            "the next query finds nothing of the last one"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_query_dropped_without_its_answer_gives_its_port_up_too() {
        let (srv, to) = server();
        let pool = UdpPool::new(None, counter());
        let lease = pool.take(to).unwrap();
        lease.socket().unwrap().send(b"query").await.unwrap();
        let mut buf = [0u8; 16];
        let (_, from) = srv.recv_from(&mut buf).unwrap();
        // Timed out (dropped) before the answer; the answer comes after.
        drop(lease);
        until("the socket kept", || pool.kept(to) == SPARE + 1).await;
        srv.send_to(b"answer", from).unwrap();
        assert!(kept_ports(&pool, to).iter().all(|&p| p == 0));
        let lease = pool.take(to).unwrap();
        assert_ne!(port(&lease), from.port());
        assert!(!queued(fd(&lease)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unused_sockets_are_closed() {
        let (_srv, to) = server();
        let pool = UdpPool::with_idle(None, counter(), Duration::from_millis(200));
        // Back before the task ran: it and one spare are kept.
        drop(pool.take(to).unwrap());
        until("spares", || pool.kept(to) == SPARE).await;
        until("the kept sockets closed", || pool.kept(to) == 0).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_pool_ends_its_task_and_closes_its_sockets() {
        let (_srv, to) = server();
        let pool = UdpPool::new(None, counter());
        drop(pool.take(to).unwrap());
        until("spares", || pool.kept(to) == SPARE).await;
        let shared = pool.shared.clone();
        drop(pool);
        until("the task gone", || !lock(&shared.state).task).await;
        assert!(lock(&shared.state).free.iter().all(Vec::is_empty));
    }

    /// A pool outlives the runtime it ran on (a test's, say): the sockets registered
    /// with that runtime are not used on the next one.
    #[test]
    fn a_pool_serves_on_a_new_runtime_once_its_old_one_is_gone() {
        let (srv, to) = server();
        let pool = UdpPool::new(None, counter());
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let first = runtime();
        first.block_on(async {
            let lease = pool.take(to).unwrap();
            exchange(&lease, &srv).await;
            drop(lease);
            until("the socket kept", || pool.kept(to) == SPARE + 1).await;
        });
        drop(first);
        assert_eq!(pool.kept(to), 0, "closed with their runtime");
        runtime().block_on(async {
            let lease = pool.take(to).unwrap();
            exchange(&lease, &srv).await;
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn ipv6_servers_get_sockets_of_their_own_family() {
        let Ok(srv) = StdUdp::bind("[::1]:0") else {
            return; // no IPv6 loopback here
        };
        srv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = srv.local_addr().unwrap();
        let pool = UdpPool::new(None, counter());
        let lease = pool.take(to).unwrap();
        assert!(lease.socket().unwrap().local_addr().unwrap().is_ipv6());
        exchange(&lease, &srv).await;
        drop(lease);
        until("the socket kept", || pool.kept(to) == SPARE + 1).await;
        assert_eq!(pool.kept("127.0.0.1:53".parse().unwrap()), 0);
    }
}
