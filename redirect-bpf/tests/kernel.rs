//! Kernel tests: real programs in real network namespaces. They need root (CI runs as
//! root) and fail with a clear message otherwise.
//!
//! Each test builds its own lab: a "node" namespace holding the programs and one veth per
//! "pod" namespace, with 10.77.x.0/24 addresses that exist only inside those namespaces
//! (nothing routes out of them), names made unique by test name and PID, and a Drop guard
//! that deletes the namespaces and the test's bpffs pins.

// Test helpers, not only #[test] functions, fail by panicking.
#![allow(clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use redirect_bpf::common::{action, drop_reason, endpoint_flags, EndpointInfo, DIR_EGRESS};
use redirect_bpf::common::{
    map_names, CLASS_FIRST, DIR_INGRESS, IDENTITY_ANY, POLICY_MAX, PROTO_ICMP, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP,
};
use redirect_bpf::{Datapath, MapSizes, PolicyEntry};
use testkit::{link_pod, run_in as in_ns, Netns, Poll, Subnet};

const ALLOWED: Duration = Duration::from_secs(5);
/// The marks of packets the datapath steers to a proxy (value/mask), as the agent routes
/// them.
const PROXY_MARK: &str = "0x200/0xf00";
/// How long a denied connect is given: the SYN is retransmitted after 1 s, so this sees
/// at least two attempts dropped.
const DENIED: Duration = Duration::from_millis(2500);

/// fd77 for net 77: the decimal digits read as hex.
fn v6_prefix(net: u8) -> u16 {
    u16::from_str_radix(&format!("fd{net}"), 16).expect("hex")
}

fn require_root() {
    testkit::require_root("kernel tests", "network namespaces, BPF");
    assert!(
        redirect_bpf::loader::object_embedded(),
        "no eBPF object embedded: run `cargo xtask build-ebpf` first (cargo xtask test does)"
    );
}

/// `ip -n NS ARGS`, for a test's own set-up.
fn ip(ns: &str, args: &[&str]) {
    testkit::ip(ns, args).expect("set-up");
}

struct Pod {
    ns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    /// Host-side veth name, inside the node namespace.
    veth: String,
    identity: u32,
    endpoint_id: u32,
}

/// A node namespace with pods attached by veths, and the test's bpffs root.
struct Lab {
    node: String,
    pods: Vec<Pod>,
    root: PathBuf,
    /// The namespaces (node, pods, other nodes), deleted when the lab is dropped.
    namespaces: Vec<Netns>,
}

impl Lab {
    fn new(test: &str, npods: u8) -> Lab {
        Lab::with_net(test, npods, 77)
    }

    /// A lab whose pods live in 10.`net`.x.0/24 and fd`net`:x::/64, with identities
    /// offset by (`net` - 77) * 100, so that two labs can stand for two nodes.
    fn with_net(test: &str, npods: u8, net: u8) -> Lab {
        require_root();
        let base = testkit::unique(&format!("ward-{test}"));
        let node = Netns::new(format!("{base}-node")).expect("node namespace");
        node.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
            .expect("forwarding");
        let mut lab = Lab {
            node: node.name().to_string(),
            pods: Vec::new(),
            root: PathBuf::from(format!(
                "/sys/fs/bpf/{}",
                testkit::unique(&format!("ward-test-{test}"))
            )),
            namespaces: vec![node],
        };
        for i in 1..=npods {
            let pod = Netns::new(format!("{base}-pod{i}")).expect("pod namespace");
            let veth = format!("veth{i}");
            let ip = Ipv4Addr::new(10, net, i, 2);
            let ip6 = Ipv6Addr::new(v6_prefix(net), u16::from(i), 0, 0, 0, 0, 0, 2);
            let subnets = [
                Subnet {
                    ip: ip.into(),
                    gateway: Ipv4Addr::new(10, net, i, 1).into(),
                    prefix: 24,
                },
                Subnet {
                    ip: ip6.into(),
                    gateway: Ipv6Addr::new(v6_prefix(net), u16::from(i), 0, 0, 0, 0, 0, 1).into(),
                    prefix: 64,
                },
            ];
            link_pod(&lab.node, &veth, pod.name(), &subnets).expect("pod link");
            lab.pods.push(Pod {
                ns: pod.name().to_string(),
                ip,
                ip6,
                veth,
                identity: 1000 * u32::from(i) + 100 * u32::from(net - 77),
                endpoint_id: u32::from(i),
            });
            lab.namespaces.push(pod);
        }
        lab
    }

    /// Loads the datapath (maps pinned under the test's root), attaches it to every pod
    /// veth, and declares the pods: endpoints and ipcache.
    fn datapath(&self) -> Datapath {
        let mut dp = in_ns(&self.node, || {
            let mut dp = Datapath::load(&self.root).expect("load");
            for p in &self.pods {
                dp.attach(&p.veth).expect("attach");
                // A second attach is a no-op.
                dp.attach(&p.veth).expect("attach again");
            }
            dp
        });
        for p in &self.pods {
            dp.set_ipcache(ipnet::IpNet::from(IpAddr::V4(p.ip)), p.identity)
                .expect("ipcache");
            dp.set_ipcache(ipnet::IpNet::from(IpAddr::V6(p.ip6)), p.identity)
                .expect("ipcache");
        }
        dp
    }

    fn set_endpoint(&self, dp: &mut Datapath, pod: usize, flags: u32) {
        let p = &self.pods[pod];
        let info = EndpointInfo {
            endpoint_id: p.endpoint_id,
            identity: p.identity,
            ifindex: 0,
            flags,
        };
        dp.set_endpoint(IpAddr::V4(p.ip), info).expect("endpoint");
        dp.set_endpoint(IpAddr::V6(p.ip6), info).expect("endpoint");
    }

    /// Routes marked packets to local sockets, as the agent will do on a node.
    fn proxy_routing(&self) {
        testkit::local_delivery(&self.node, false, PROXY_MARK, 100, 90).expect("proxy routing");
    }
}

impl Lab {
    /// A namespace standing for another node (and a pod on it) behind the node's uplink
    /// `up0`: 10.78.0.2 there, 10.78.0.1 on the node.
    fn add_remote(&mut self) -> (String, Ipv4Addr) {
        let remote = Netns::new(self.node.replace("-node", "-remote")).expect("remote namespace");
        let ip = Ipv4Addr::new(10, 78, 0, 2);
        let uplink = Subnet {
            ip: ip.into(),
            gateway: Ipv4Addr::new(10, 78, 0, 1).into(),
            prefix: 24,
        };
        link_pod(&self.node, "up0", remote.name(), &[uplink]).expect("uplink");
        let name = remote.name().to_string();
        self.namespaces.push(remote);
        (name, ip)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // the last made first: other nodes and pods, then the node
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn entry(
    endpoint_id: u32,
    direction: u8,
    identity: u32,
    port: Option<u16>,
    act: u8,
    proxy_port: u16,
) -> PolicyEntry {
    entry_proto(
        PROTO_TCP,
        endpoint_id,
        direction,
        identity,
        port,
        act,
        proxy_port,
    )
}

fn entry_proto(
    protocol: u8,
    endpoint_id: u32,
    direction: u8,
    identity: u32,
    port: Option<u16>,
    act: u8,
    proxy_port: u16,
) -> PolicyEntry {
    PolicyEntry {
        endpoint_id,
        peer: identity,
        direction,
        protocol,
        port: port.unwrap_or(0),
        port_prefix_len: if port.is_some() { 16 } else { 0 },
        action: act,
        proxy_port,
        cookie: 7,
    }
}

/// A TCP server in `ns` that echoes what it reads, until the test ends.
fn echo_server(ns: &str, ip: impl Into<IpAddr>, port: u16) {
    let ip = ip.into();
    let listener = in_ns(ns, || TcpListener::bind((ip, port)).expect("bind"));
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn connect(ns: &str, to: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    in_ns(ns, || {
        let addr = SocketAddr::V4(SocketAddrV4::new(to, port));
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(ALLOWED))?;
        Ok(s)
    })
}

/// Sends a line and expects it back.
fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).expect("read back");
    assert_eq!(buf, msg);
}

fn assert_denied(ns: &str, to: Ipv4Addr, port: u16) {
    let started = Instant::now();
    match connect(ns, to, port, DENIED) {
        Ok(_) => panic!("{ns} -> {to}:{port} connected but must be denied"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "{ns} -> {to}:{port}: a drop times out, got {e} after {:?}",
            started.elapsed()
        ),
    }
}

/// Polls `f` until it holds or the deadline passes.
fn eventually(what: &str, f: impl FnMut() -> bool) {
    Poll::within(ALLOWED).expect(what, f);
}

#[test]
fn allow_and_deny_by_identity() {
    let lab = Lab::new("allowdeny", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    // b: ingress default deny; a may reach every TCP port, but port 81 is denied to all.
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[
        entry(
            b.endpoint_id,
            DIR_INGRESS,
            a.identity,
            None,
            action::ALLOW,
            0,
        ),
        entry(
            b.endpoint_id,
            DIR_INGRESS,
            IDENTITY_ANY,
            Some(81),
            action::DENY,
            0,
        ),
    ])
    .expect("policy");
    echo_server(&b.ns, b.ip, 80);
    echo_server(&b.ns, b.ip, 81);

    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80 is allowed");
    round_trip(&mut s, b"hello");
    assert_denied(&c.ns, b.ip, 80);
    assert!(dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") >= 1);
    // The deny entry wins over a's allow-all.
    assert_denied(&a.ns, b.ip, 81);
    assert!(dp.drops(drop_reason::POLICY_DENY).expect("drops") >= 1);

    let events = dp.drain_events();
    let c_to_b = events
        .iter()
        .find(|e| e.saddr == c.ip.octets() && e.reason == drop_reason::POLICY_DEFAULT_DENY)
        .expect("an event for the c -> b drop");
    assert_eq!(c_to_b.daddr, b.ip.octets());
    assert_eq!(u16::from_be_bytes(c_to_b.dport), 80);
    assert_eq!(c_to_b.src_identity, c.identity);
    assert_eq!(c_to_b.direction, DIR_INGRESS);
    assert!(events
        .iter()
        .any(|e| e.reason == drop_reason::POLICY_DENY && e.cookie == 7));
    assert_eq!(dp.events_suppressed().expect("suppressed"), 0);
    // Detach is idempotent and stops enforcement.
    in_ns(&lab.node, || {
        dp.detach(&lab.pods[2].veth).expect("detach");
        dp.detach(&lab.pods[2].veth).expect("detach again");
    });
}

#[test]
fn peers_in_a_class_share_its_entries() {
    let lab = Lab::new("classes", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    const CLASS: u32 = CLASS_FIRST + 5;
    // b: ingress default deny; one entry for a class, none for a or c themselves
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[entry(
        b.endpoint_id,
        DIR_INGRESS,
        CLASS,
        Some(80),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    echo_server(&b.ns, b.ip, 80);
    assert_denied(&a.ns, b.ip, 80);
    dp.set_peer_class(a.identity, CLASS).expect("class of a");
    dp.set_peer_class(c.identity, CLASS).expect("class of c");
    for peer in [a, c] {
        let mut s = connect(&peer.ns, b.ip, 80, ALLOWED).expect("a class member is allowed");
        round_trip(&mut s, b"hello");
    }
    let mut classes = dp.peer_classes().expect("read back");
    classes.sort_unstable();
    let mut want = vec![(a.identity, CLASS), (c.identity, CLASS)];
    want.sort_unstable();
    assert_eq!(classes, want);
    // out of the class, c is only itself again: default deny
    dp.remove_peer_class(c.identity).expect("remove");
    assert_denied(&c.ns, b.ip, 80);
    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a still is");
    round_trip(&mut s, b"again");
}

/// The agent's way of reading drop events: the ring buffer handed out of the datapath
/// and awaited on tokio. The reader sleeps while nothing is dropped and wakes for a drop.
#[test]
fn drop_events_wake_an_async_reader() {
    let lab = Lab::new("asyncevents", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    let events = dp.take_drop_events().expect("the ring buffer");
    assert!(dp.take_drop_events().is_none(), "one consumer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut events = rt.block_on(async { events.into_async() }).expect("async");
    let idle = rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(200), events.next_batch()).await
    });
    assert!(idle.is_err(), "no drop, no batch: {idle:?}");

    let (ns, to) = (a.ns.clone(), b.ip);
    let denied = thread::spawn(move || connect(&ns, to, 80, Duration::from_secs(1)));
    let batch = rt
        .block_on(async { tokio::time::timeout(ALLOWED, events.next_batch()).await })
        .expect("a batch before the deadline")
        .expect("reading the ring buffer");
    assert!(
        batch.iter().any(|e| e.saddr == a.ip.octets()
            && e.daddr == b.ip.octets()
            && u16::from_be_bytes(e.dport) == 80
            && e.reason == drop_reason::POLICY_DEFAULT_DENY),
        "the a -> b:80 drop: {batch:?}"
    );
    assert!(denied.join().expect("connect thread").is_err());
    assert!(dp.drain_events().is_empty(), "the datapath handed it out");
}

#[test]
fn replies_pass_and_reverse_flow_is_denied() {
    let lab = Lab::new("replies", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    // a: nothing may come in (no rule at all), egress to b:80 allowed explicitly.
    lab.set_endpoint(
        &mut dp,
        0,
        endpoint_flags::DEFAULT_DENY_INGRESS | endpoint_flags::DEFAULT_DENY_EGRESS,
    );
    dp.insert_policy(&[entry(
        a.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(80),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    echo_server(&b.ns, b.ip, 80);
    echo_server(&a.ns, a.ip, 80);

    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80 is allowed");
    for _ in 0..3 {
        round_trip(&mut s, b"replies come back without a reverse rule");
    }
    assert_denied(&b.ns, a.ip, 80);
    assert!(dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") >= 1);
    // The established connection still works after the denied attempt.
    round_trip(&mut s, b"still up");
    assert!(dp.in_live_connection(IpAddr::V4(b.ip)));
    // The view of the conntrack maps the DNS proxy's expiry reads apart from the
    // datapath sees the same flows.
    let mut view = dp.conntrack_view().expect("conntrack view");
    let live = view.live_ips().expect("live IPs");
    assert!(
        live.contains(&IpAddr::V4(a.ip)) && live.contains(&IpAddr::V4(b.ip)),
        "{live:?}"
    );
    // Idle expiry keeps a live flow; once closed (FIN seen both ways), it goes. The
    // agent's conntrack task prunes through the view, apart from the datapath.
    let long = Duration::from_secs(3600);
    dp.expire_conntrack(long, long).expect("expire");
    assert_eq!(view.expire(long, long).expect("expire"), 0);
    assert_eq!(
        view.revoke(|f| f.protocol == 17).expect("revoke"),
        0,
        "no UDP flow"
    );
    assert!(dp.in_live_connection(IpAddr::V4(b.ip)));
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("the server closes too");
    drop(s);
    eventually("the closed flow expires", || {
        view.expire(long, Duration::ZERO).expect("expire");
        !dp.in_live_connection(IpAddr::V4(b.ip))
    });
    assert!(
        !view
            .live_ips()
            .expect("live IPs")
            .contains(&IpAddr::V4(b.ip)),
        "the view follows the maps"
    );
}

/// A transparent listener on 0.0.0.0:`port` in `ns` (IP_TRANSPARENT, as the proxy).
fn transparent_listener(ns: &str, port: u16) -> TcpListener {
    in_ns(ns, || {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        socket::setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::new(0, 0, 0, 0, port),
        )
        .expect("bind");
        socket::listen(&fd, socket::Backlog::new(16).expect("backlog")).expect("listen");
        TcpListener::from(fd)
    })
}

#[test]
fn redirect_to_transparent_listener_sees_original_destination() {
    const PROXY_PORT: u16 = 15001;
    let lab = Lab::new("redirect", 2);
    lab.proxy_routing();
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 0, 0);
    dp.insert_policy(&[entry(
        a.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(80),
        action::REDIRECT,
        PROXY_PORT,
    )])
    .expect("policy");
    // Nothing listens on b:80: only the proxy can answer.
    let proxy = transparent_listener(&lab.node, PROXY_PORT);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (mut conn, peer) = proxy.accept().expect("accept");
        let orig_dst = conn.local_addr().expect("local addr");
        tx.send((peer, orig_dst)).expect("send");
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).expect("read");
        conn.write_all(&buf[..n]).expect("write");
    });
    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80 reaches the proxy");
    let (peer, orig_dst) = rx.recv_timeout(ALLOWED).expect("the proxy accepted");
    assert_eq!(orig_dst, SocketAddr::V4(SocketAddrV4::new(b.ip, 80)));
    assert_eq!(peer, s.local_addr().expect("local addr"));
    round_trip(&mut s, b"through the proxy");
    assert_eq!(dp.drops(drop_reason::PROXY_UNAVAILABLE).expect("drops"), 0);
}

#[test]
fn redirect_without_listener_fails_closed() {
    let lab = Lab::new("failclosed", 2);
    lab.proxy_routing();
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 0, 0);
    dp.insert_policy(&[entry(
        a.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(80),
        action::REDIRECT,
        15002,
    )])
    .expect("policy");
    // b listens on 80: a pass would connect, the fail-closed drop must not.
    echo_server(&b.ns, b.ip, 80);
    assert_denied(&a.ns, b.ip, 80);
    eventually("a PROXY_UNAVAILABLE drop", || {
        dp.drops(drop_reason::PROXY_UNAVAILABLE).unwrap_or(0) >= 1
    });
    // Other ports are not redirected and stay allowed (no default deny).
    echo_server(&b.ns, b.ip, 8080);
    connect(&a.ns, b.ip, 8080, ALLOWED).expect("a -> b:8080 is allowed");
}

#[test]
fn enforcement_survives_a_loader_restart() {
    let lab = Lab::new("restart", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(80),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    echo_server(&b.ns, b.ip, 80);
    echo_server(&b.ns, b.ip, 81);
    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80 is allowed");
    round_trip(&mut s, b"before");

    // The first loader reads the events so far: the pinned ring buffer's consumer
    // position is no longer 0 for the next one.
    assert_denied(&a.ns, b.ip, 81);
    assert!(
        !dp.drain_events().is_empty(),
        "the denied connect is an event"
    );

    // The loader goes away: pinned links and maps keep enforcing.
    drop(dp);
    round_trip(&mut s, b"while no loader runs");
    assert_denied(&a.ns, b.ip, 81);

    // A new loader finds the pinned maps with their content and the attached programs.
    let dp = in_ns(&lab.node, || {
        let mut dp = Datapath::load(&lab.root).expect("load again");
        for p in &lab.pods {
            dp.attach(&p.veth).expect("attach is a no-op");
        }
        dp
    });
    assert!(dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") >= 1);
    round_trip(&mut s, b"after");
    connect(&a.ns, b.ip, 80, ALLOWED).expect("a new a -> b:80 is allowed");
    assert_denied(&a.ns, b.ip, 81);
    // It reads the events from where the first one stopped: those of the drops while no
    // loader ran and since, each once. (A reader that assumes the producer position
    // starts at 0, as aya 0.13's did, loops forever here.) Drained on a thread with a
    // deadline, so that a reader that spins fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let drained = thread::spawn(move || {
        let mut dp = dp;
        let events = dp.drain_events();
        let _ = tx.send(events);
        dp
    });
    let events = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("draining the reopened ring buffer ends");
    let dp = drained.join().expect("drain thread");
    let to_81: Vec<_> = events
        .iter()
        .filter(|e| e.saddr == a.ip.octets() && u16::from_be_bytes(e.dport) == 81)
        .collect();
    assert!(
        !to_81.is_empty() && events.iter().all(|e| e.family == 4),
        "the drops to 81 since the first loader read: {events:?}"
    );

    // A policy update: 80 -> 81. New flows follow it; the established one is tracked.
    let mut dp = dp;
    let old = [entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(80),
        action::ALLOW,
        0,
    )];
    let new = [entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(81),
        action::ALLOW,
        0,
    )];
    dp.update_policy(&old, &new).expect("update");
    connect(&a.ns, b.ip, 81, ALLOWED).expect("a -> b:81 is allowed now");
    assert_denied(&a.ns, b.ip, 80);
}

/// A release that sizes a map otherwise (here: the policy map) finds the earlier
/// agent's pinned map: it replaces it with one of its own size, carries every entry over
/// (the policy in force, the endpoints, the tracked flows), and moves the pinned links to
/// its programs, which read the new maps: a policy written after the restart takes
/// effect, the established connection goes on, and what was denied stays denied. A
/// restart with the same sizes replaces nothing.
#[test]
fn a_map_of_another_size_is_replaced_with_its_entries_and_the_links_follow() {
    let lab = Lab::new("resize", 2);
    let small = MapSizes { policy: 1024 };
    let mut dp = in_ns(&lab.node, || {
        let mut dp = Datapath::load_sized(&lab.root, small).expect("load");
        for p in &lab.pods {
            dp.attach(&p.veth).expect("attach");
        }
        dp
    });
    for p in &lab.pods {
        dp.set_ipcache(ipnet::IpNet::from(IpAddr::V4(p.ip)), p.identity)
            .expect("ipcache");
    }
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    let to_80 = entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(80),
        action::ALLOW,
        0,
    );
    dp.insert_policy(&[to_80]).expect("policy");
    echo_server(&b.ns, b.ip, 80);
    echo_server(&b.ns, b.ip, 81);
    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80 is allowed");
    round_trip(&mut s, b"before");
    assert_denied(&a.ns, b.ip, 81);
    let policy_pin = lab.root.join(map_names::POLICY);
    let pinned_size = |p: &std::path::Path| {
        aya::maps::MapInfo::from_pin(p)
            .expect("pinned policy map")
            .max_entries()
    };
    assert_eq!(pinned_size(&policy_pin), 1024);
    drop(dp);

    let mut dp = in_ns(&lab.node, || {
        let mut dp = Datapath::load(&lab.root).expect("load with the default sizes");
        for p in &lab.pods {
            dp.attach(&p.veth).expect("attach moves the links");
        }
        dp
    });
    let replaced = dp.replaced_maps();
    assert_eq!(
        replaced.len(),
        1,
        "only the policy map differs: {replaced:?}"
    );
    assert_eq!(replaced[0].name, map_names::POLICY);
    assert_eq!(
        (
            replaced[0].pinned.max_entries,
            replaced[0].loaded.max_entries
        ),
        (1024, POLICY_MAX)
    );
    assert_eq!(replaced[0].carried, Some(1), "{replaced:?}");
    assert_eq!(pinned_size(&policy_pin), POLICY_MAX);
    assert_eq!(dp.policy_entries().expect("entries"), vec![to_80]);

    round_trip(&mut s, b"the tracked flow goes on");
    assert_denied(&a.ns, b.ip, 81);
    // Written only into the new map: enforced only if the programs read it.
    let to_81 = entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(81),
        action::ALLOW,
        0,
    );
    dp.insert_policy(&[to_81]).expect("policy");
    let mut s81 = connect(&a.ns, b.ip, 81, ALLOWED).expect("a -> b:81 after the restart");
    round_trip(&mut s81, b"new map");
    dp.remove_policy(&[to_80]).expect("remove");
    assert_denied(&a.ns, b.ip, 80);
    drop(dp);

    let dp = in_ns(&lab.node, || Datapath::load(&lab.root).expect("load again"));
    assert!(
        dp.replaced_maps().is_empty(),
        "same sizes: nothing replaced: {:?}",
        dp.replaced_maps()
    );
}

/// Connects from the node namespace with `SO_MARK` = `mark` (0: none).
fn connect_marked(ns: &str, to: Ipv4Addr, port: u16, mark: u32) -> std::io::Result<TcpStream> {
    in_ns(ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if mark != 0 {
            s.set_mark(mark)?;
        }
        let addr = SocketAddr::V4(SocketAddrV4::new(to, port));
        let timeout = if mark != 0 { ALLOWED } else { DENIED };
        s.connect_timeout(&addr.into(), timeout)?;
        Ok(TcpStream::from(s))
    })
}

#[test]
fn proxy_marked_traffic_is_not_redirected_again() {
    let lab = Lab::new("marked", 2);
    let mut dp = lab.datapath();
    let b = &lab.pods[1];
    // b's ingress port 80 goes through the proxy, whoever connects.
    lab.set_endpoint(&mut dp, 1, 0);
    dp.insert_policy(&[entry(
        b.endpoint_id,
        DIR_INGRESS,
        IDENTITY_ANY,
        Some(80),
        action::REDIRECT,
        15003,
    )])
    .expect("policy");
    echo_server(&b.ns, b.ip, 80);
    // From the node without a mark: a redirect at tc egress cannot be done: dropped.
    let err = connect_marked(&lab.node, b.ip, 80, 0).expect_err("unmarked is not passed");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(dp.drops(drop_reason::REDIRECT_UNSUPPORTED).expect("drops") >= 1);
    // The proxies' own upstream connections carry their mark and pass.
    for mark in [0xa00, 0xb00] {
        let mut s = connect_marked(&lab.node, b.ip, 80, mark).expect("marked upstream passes");
        s.set_read_timeout(Some(ALLOWED)).expect("timeout");
        round_trip(&mut s, b"from the proxy");
    }
}

/// A UDP server in `ns` that echoes every datagram, until the test ends.
fn udp_echo_server(ns: &str, ip: Ipv4Addr, port: u16) {
    let sock = in_ns(ns, || UdpSocket::bind((ip, port)).expect("bind"));
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// Sends a datagram from `ns` and waits up to `timeout` for the echo.
fn udp_exchange(ns: &str, to: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let sock = in_ns(ns, || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind")
    });
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    sock.send_to(b"ping", (to, port)).expect("send");
    let mut buf = [0u8; 16];
    matches!(sock.recv_from(&mut buf), Ok((4, _)))
}

#[test]
fn udp_allow_deny_and_replies() {
    let lab = Lab::new("udp", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    // Both directions default deny for b; a may send to b:5353 only. b's answers pass
    // through conntrack although b's egress allows nothing.
    lab.set_endpoint(
        &mut dp,
        1,
        endpoint_flags::DEFAULT_DENY_INGRESS | endpoint_flags::DEFAULT_DENY_EGRESS,
    );
    dp.insert_policy(&[entry_proto(
        PROTO_UDP,
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(5353),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    udp_echo_server(&b.ns, b.ip, 5353);
    udp_echo_server(&b.ns, b.ip, 5354);
    udp_echo_server(&a.ns, a.ip, 5353);
    assert!(
        udp_exchange(&a.ns, b.ip, 5353, ALLOWED),
        "a -> b:5353/udp and its reply"
    );
    assert!(
        !udp_exchange(&a.ns, b.ip, 5354, DENIED),
        "a -> b:5354/udp is denied"
    );
    assert!(
        !udp_exchange(&b.ns, a.ip, 5353, DENIED),
        "b's egress is denied"
    );
    assert!(dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") >= 2);
}

/// One ICMP echo from `ns` to `to` over a raw socket; whether the reply came in time.
fn ping(ns: &str, to: Ipv4Addr, timeout: Duration) -> bool {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = in_ns(ns, || {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw socket")
    });
    let id = (std::process::id() & 0xffff) as u16;
    let mut pkt = [
        8u8,
        0,
        0,
        0,
        (id >> 8) as u8,
        id as u8,
        0,
        1,
        b'w',
        b'a',
        b'r',
        b'd',
    ];
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    sock.send_to(&pkt, &SocketAddr::V4(SocketAddrV4::new(to, 0)).into())
        .expect("send");
    let deadline = Instant::now() + timeout;
    let sock = std::net::UdpSocket::from(sock); // only for its safe recv API
    let mut buf = [0u8; 128];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        let Ok(n) = sock.recv(&mut buf) else {
            return false;
        };
        // Raw IPv4 sockets deliver the IP header; the echo reply (type 0) follows it.
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n >= ihl + 8 && buf[ihl] == 0 && buf[ihl + 4..ihl + 6] == id.to_be_bytes() {
            return true;
        }
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn icmp_echo_by_type_with_replies() {
    let lab = Lab::new("icmp", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_INGRESS);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    // a may send echo requests (type 8) to b; the echo reply goes back as a reply.
    dp.insert_policy(&[entry_proto(
        PROTO_ICMP,
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(8),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    assert!(ping(&a.ns, b.ip, ALLOWED), "a pings b");
    assert!(!ping(&c.ns, b.ip, DENIED), "c may not ping b");
    // b's own echo request to a is no reply of a's (the echo identifier is tracked).
    assert!(!ping(&b.ns, a.ip, DENIED), "b may not ping a");
}

/// Adds an address to a pod's interface (the pod keeps answering on both).
fn add_address(lab: &Lab, pod: usize, addr: Ipv4Addr) {
    let p = &lab.pods[pod];
    ip(
        &p.ns,
        &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
    );
}

fn ipnet(s: &str) -> ipnet::IpNet {
    s.parse().expect("prefix")
}

#[test]
fn cidr_identities_with_except_and_port_ranges() {
    let lab = Lab::new("cidr", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    // b is no endpoint of this node: its identity comes from the ipcache alone.
    // 10.77.2.0/24 is identity 5000 ("cidr 10.77.2.0/24 except 10.77.2.2/32"), the
    // excepted /32 (b's first address) has its own identity 6000.
    dp.remove_ipcache(ipnet("10.77.2.2/32")).expect("remove");
    dp.set_ipcache(ipnet("10.77.2.0/24"), 5000)
        .expect("ipcache");
    dp.set_ipcache(ipnet("10.77.2.2/32"), 6000)
        .expect("ipcache");
    let second = Ipv4Addr::new(10, 77, 2, 3);
    add_address(&lab, 1, second);
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_EGRESS);
    // a may reach identity 5000 on TCP 8000-8003 (one /14 port prefix) and on 9000.
    let mut e = entry(
        a.endpoint_id,
        DIR_EGRESS,
        5000,
        Some(8000),
        action::ALLOW,
        0,
    );
    e.port_prefix_len = 14;
    dp.insert_policy(&[
        e,
        entry(
            a.endpoint_id,
            DIR_EGRESS,
            5000,
            Some(9000),
            action::ALLOW,
            0,
        ),
    ])
    .expect("policy");
    for port in [8000, 8003, 8004, 9000] {
        echo_server(&b.ns, Ipv4Addr::UNSPECIFIED, port);
    }
    connect(&a.ns, second, 8000, ALLOWED).expect("identity 5000, port 8000");
    connect(&a.ns, second, 8003, ALLOWED).expect("identity 5000, port 8003");
    connect(&a.ns, second, 9000, ALLOWED).expect("identity 5000, port 9000");
    assert_denied(&a.ns, second, 8004);
    // The excepted address resolves to 6000, which nothing allows.
    assert_denied(&a.ns, b.ip, 8000);
    let events = dp.drain_events();
    assert!(events
        .iter()
        .any(|e| e.daddr == b.ip.octets() && e.dst_identity == 6000));
}

#[test]
fn large_maps_load_and_enforce() {
    let lab = Lab::new("large", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    // 100,000 ipcache prefixes (outside the lab's addresses) and 1,000 policy entries.
    for i in 0..100_000u32 {
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(0x6400_0000 + (i << 8)), 24).expect("net");
        dp.set_ipcache(net.into(), 100_000 + i).expect("ipcache");
    }
    let many: Vec<PolicyEntry> = (0..1_000u32)
        .map(|i| {
            entry(
                b.endpoint_id,
                DIR_INGRESS,
                100_000 + i,
                Some(80),
                action::ALLOW,
                0,
            )
        })
        .collect();
    dp.insert_policy(&many).expect("policy");
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(80),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    echo_server(&b.ns, b.ip, 80);
    echo_server(&b.ns, b.ip, 81);
    connect(&a.ns, b.ip, 80, ALLOWED).expect("allowed among 1,001 entries");
    assert_denied(&a.ns, b.ip, 81);
}

/// A UDP socket in `ns` with IP_TRANSPARENT and SO_REUSEADDR bound to `addr`, as the DNS
/// proxy uses them: to listen (any address) and to answer as the original server.
fn transparent_udp(ns: &str, addr: SocketAddrV4) -> UdpSocket {
    in_ns(ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket");
        s.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        s.bind(&SocketAddr::V4(addr).into()).expect("bind");
        UdpSocket::from(s)
    })
}

#[test]
fn udp_redirect_to_transparent_listener_sees_original_destination() {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;

    const DNS_PROXY: u16 = 15053;
    let lab = Lab::new("udpredirect", 2);
    lab.proxy_routing();
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 0, 0);
    dp.insert_policy(&[entry_proto(
        PROTO_UDP,
        a.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(53),
        action::REDIRECT,
        DNS_PROXY,
    )])
    .expect("policy");
    let listener = transparent_udp(
        &lab.node,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DNS_PROXY),
    );
    socket::setsockopt(&listener, sockopt::Ipv4OrigDstAddr, &true).expect("IP_RECVORIGDSTADDR");
    listener.set_read_timeout(Some(ALLOWED)).expect("timeout");

    // Nothing listens on b:53; the pod's query reaches the proxy.
    let client = in_ns(&a.ns, || UdpSocket::bind((a.ip, 0)).expect("bind"));
    client.set_read_timeout(Some(ALLOWED)).expect("timeout");
    client.send_to(b"query", (b.ip, 53)).expect("send");

    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<SockaddrIn>(
        listener.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .expect("the proxy received the query");
    let from = msg.address.expect("source address");
    assert_eq!(
        SocketAddrV4::from(from),
        client
            .local_addr()
            .map(|a| match a {
                SocketAddr::V4(v4) => v4,
                SocketAddr::V6(_) => panic!("v6"),
            })
            .expect("local addr")
    );
    let orig = msg
        .cmsgs()
        .expect("cmsgs")
        .find_map(|c| match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sa) => Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )),
            _ => None,
        })
        .expect("original destination");
    assert_eq!(orig, SocketAddrV4::new(b.ip, 53));

    // The answer comes from the server the pod asked.
    let answer = transparent_udp(&lab.node, orig);
    answer
        .send_to(b"answer", SocketAddrV4::from(from))
        .expect("answer");
    let mut buf = [0u8; 16];
    let (n, peer) = client.recv_from(&mut buf).expect("the pod got the answer");
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(peer, SocketAddr::V4(SocketAddrV4::new(b.ip, 53)));
}

/// A raw SCTP socket in `ns` (this kernel has no SCTP stack: raw sockets still see and
/// send SCTP-headed packets).
fn raw_sctp(ns: &str) -> socket2::Socket {
    in_ns(ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from(PROTO_SCTP))),
        )
        .expect("raw SCTP socket")
    })
}

/// Sends one SCTP-headed packet (common header and an empty DATA chunk) to `to:port`
/// from `ns`, and whether `receiver` sees it before `timeout`.
fn sctp_delivered(
    ns: &str,
    to: Ipv4Addr,
    port: u16,
    receiver: &socket2::Socket,
    timeout: Duration,
) -> bool {
    let sender = raw_sctp(ns);
    let mut pkt = vec![0u8; 16];
    pkt[0..2].copy_from_slice(&40000u16.to_be_bytes());
    pkt[2..4].copy_from_slice(&port.to_be_bytes());
    pkt[12] = 0; // DATA
    pkt[15] = 4; // chunk length
    sender
        .send_to(&pkt, &SocketAddr::V4(SocketAddrV4::new(to, 0)).into())
        .expect("send");
    let receiver = receiver.try_clone().expect("clone");
    let receiver = UdpSocket::from(receiver); // only for its safe recv API
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        receiver.set_read_timeout(Some(left)).expect("timeout");
        let Ok(n) = receiver.recv(&mut buf) else {
            return false;
        };
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n >= ihl + 4 && buf[ihl + 2..ihl + 4] == port.to_be_bytes() {
            return true;
        }
    }
}

#[test]
fn sctp_by_port() {
    let lab = Lab::new("sctp", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[entry_proto(
        PROTO_SCTP,
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(3868),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    let receiver = raw_sctp(&b.ns);
    assert!(
        sctp_delivered(&a.ns, b.ip, 3868, &receiver, ALLOWED),
        "SCTP to 3868 is allowed"
    );
    assert!(
        !sctp_delivered(&a.ns, b.ip, 3869, &receiver, DENIED),
        "SCTP to 3869 is denied"
    );
    assert!(dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") >= 1);
}

fn connect6(ns: &str, to: Ipv6Addr, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    in_ns(ns, || {
        let addr = SocketAddr::V6(SocketAddrV6::new(to, port, 0, 0));
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(ALLOWED))?;
        Ok(s)
    })
}

#[test]
fn ipv6_allow_deny_and_replies() {
    let lab = Lab::new("ipv6", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_INGRESS);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[entry(
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(80),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    let v6_server = in_ns(&b.ns, || TcpListener::bind((b.ip6, 80)).expect("bind v6"));
    thread::spawn(move || {
        for conn in v6_server.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let v6_a = in_ns(&a.ns, || TcpListener::bind((a.ip6, 80)).expect("bind v6"));

    let mut s = connect6(&a.ns, b.ip6, 80, ALLOWED).expect("a -> b:80 over IPv6 is allowed");
    round_trip(&mut s, b"replies pass over IPv6");
    let err = connect6(&c.ns, b.ip6, 80, DENIED).expect_err("c -> b:80 over IPv6 is denied");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    let err = connect6(&b.ns, a.ip6, 80, DENIED).expect_err("b -> a:80, the reverse, is denied");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    drop(v6_a);
    let events = dp.drain_events();
    assert!(events.iter().any(|e| e.family == 6
        && e.saddr6 == c.ip6.octets()
        && e.daddr6 == b.ip6.octets()
        && e.reason == drop_reason::POLICY_DEFAULT_DENY));
    assert!(dp.in_live_connection(IpAddr::V6(b.ip6)));
}

#[test]
fn uplink_ingress_policy_and_redirect() {
    const PROXY_PORT: u16 = 15004;
    let mut lab = Lab::new("uplink", 1);
    let (remote, remote_ip) = lab.add_remote();
    lab.proxy_routing();
    let mut dp = lab.datapath();
    in_ns(&lab.node, || {
        dp.attach_uplink("up0").expect("attach uplink");
        dp.attach_uplink("up0").expect("attach uplink again");
    });
    dp.set_ipcache(ipnet("10.78.0.2/32"), 7000)
        .expect("ipcache");
    let a = &lab.pods[0];
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[
        entry(a.endpoint_id, DIR_INGRESS, 7000, Some(80), action::ALLOW, 0),
        entry(
            a.endpoint_id,
            DIR_INGRESS,
            7000,
            Some(8080),
            action::REDIRECT,
            PROXY_PORT,
        ),
    ])
    .expect("policy");
    echo_server(&a.ns, a.ip, 80);
    echo_server(&a.ns, a.ip, 81);

    let mut s = connect(&remote, a.ip, 80, ALLOWED).expect("remote -> a:80 is allowed");
    round_trip(&mut s, b"across the uplink");
    assert_denied(&remote, a.ip, 81);
    let events = dp.drain_events();
    assert!(events.iter().any(|e| e.saddr == remote_ip.octets()
        && e.src_identity == 7000
        && u16::from_be_bytes(e.dport) == 81
        && e.direction == DIR_INGRESS));

    // A redirect decided at the uplink's ingress reaches the node's proxy.
    let proxy = transparent_listener(&lab.node, PROXY_PORT);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (conn, peer) = proxy.accept().expect("accept");
        tx.send((peer, conn.local_addr().expect("local addr")))
            .expect("send");
    });
    connect(&remote, a.ip, 8080, ALLOWED).expect("remote -> a:8080 reaches the proxy");
    let (peer, orig_dst) = rx.recv_timeout(ALLOWED).expect("the proxy accepted");
    assert_eq!(orig_dst, SocketAddr::V4(SocketAddrV4::new(a.ip, 8080)));
    assert_eq!(peer.ip(), IpAddr::V4(remote_ip));
}

#[test]
fn ipv6_redirect_to_transparent_listener() {
    const PROXY_PORT: u16 = 15006;
    let lab = Lab::new("ipv6redirect", 2);
    lab.proxy_routing();
    testkit::local_delivery(&lab.node, true, PROXY_MARK, 100, 90).expect("proxy routing");
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 0, 0);
    dp.insert_policy(&[entry(
        a.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(80),
        action::REDIRECT,
        PROXY_PORT,
    )])
    .expect("policy");
    // A dual-stack transparent listener on [::], found by the lookup of [::1]:port.
    let proxy = in_ns(&lab.node, || {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_only_v6(false).expect("dual stack");
        // IP_TRANSPARENT sets the same flag as IPV6_TRANSPARENT on an IPv6 socket.
        s.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        let any = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PROXY_PORT, 0, 0));
        s.bind(&any.into()).expect("bind");
        s.listen(16).expect("listen");
        TcpListener::from(s)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (conn, peer) = proxy.accept().expect("accept");
        tx.send((peer, conn.local_addr().expect("local addr")))
            .expect("send");
    });
    let s = connect6(&a.ns, b.ip6, 80, ALLOWED).expect("a -> b:80 over IPv6 reaches the proxy");
    let (peer, orig_dst) = rx.recv_timeout(ALLOWED).expect("the proxy accepted");
    assert_eq!(orig_dst, SocketAddr::V6(SocketAddrV6::new(b.ip6, 80, 0, 0)));
    assert_eq!(peer, s.local_addr().expect("local addr"));
}

/// Joins two labs' node namespaces by a veth named `up0` on both sides (10.80.0.1 on
/// `a`, 10.80.0.2 on `b`) and routes each node's pod range to the other: two nodes of a
/// cluster and the link between them. The link goes with the namespaces.
fn connect_nodes(a: &Lab, b: &Lab) {
    testkit::veth(&a.node, "up0", &b.node, "up0").expect("node link");
    for (lab, addr, other) in [(a, "10.80.0.1/24", b), (b, "10.80.0.2/24", a)] {
        ip(&lab.node, &["addr", "add", addr, "dev", "up0"]);
        ip(&lab.node, &["link", "set", "up0", "up"]);
        let via = if addr.starts_with("10.80.0.1") {
            "10.80.0.2"
        } else {
            "10.80.0.1"
        };
        let net = other.pods[0].ip.octets()[1];
        let range = format!("10.{net}.0.0/16");
        ip(&lab.node, &["route", "add", &range, "via", via]);
        // IPv6 beside: fd80::1 and fd80::2 on the link, fdNN::/16 to the other node.
        let (addr6, via6) = if via == "10.80.0.2" {
            ("fd80::1/64", "fd80::2")
        } else {
            ("fd80::2/64", "fd80::1")
        };
        testkit::addr(&lab.node, "up0", addr6).expect("node link address");
        let range6 = format!("{:x}::/16", v6_prefix(net));
        ip(&lab.node, &["-6", "route", "add", &range6, "via", via6]);
    }
}

#[test]
fn cross_node_through_uplinks() {
    // Node A: pods a1 (10.77.1.2, identity 1000) and a2 (10.77.2.2, identity 2000).
    // Node B: pod b (10.79.1.2, identity 1200). Each node runs its own programs with its
    // own bpffs root; each knows the other's pods from its ipcache only.
    let la = Lab::with_net("xnodea", 2, 77);
    let lb = Lab::with_net("xnodeb", 1, 79);
    connect_nodes(&la, &lb);
    let mut dpa = la.datapath();
    let mut dpb = lb.datapath();
    in_ns(&la.node, || {
        dpa.attach_uplink("up0").expect("attach A's uplink")
    });
    in_ns(&lb.node, || {
        dpb.attach_uplink("up0").expect("attach B's uplink")
    });
    let (a1, a2, b) = (&la.pods[0], &la.pods[1], &lb.pods[0]);
    for ip in [IpAddr::V4(b.ip), IpAddr::V6(b.ip6)] {
        dpa.set_ipcache(ipnet::IpNet::from(ip), b.identity)
            .expect("ipcache");
    }
    for p in &la.pods {
        for ip in [IpAddr::V4(p.ip), IpAddr::V6(p.ip6)] {
            dpb.set_ipcache(ipnet::IpNet::from(ip), p.identity)
                .expect("ipcache");
        }
    }
    // A: a1 may only send to b's identity on port 80 and takes nothing in; a2 is open.
    la.set_endpoint(
        &mut dpa,
        0,
        endpoint_flags::DEFAULT_DENY_EGRESS | endpoint_flags::DEFAULT_DENY_INGRESS,
    );
    la.set_endpoint(&mut dpa, 1, 0);
    dpa.insert_policy(&[entry(
        a1.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(80),
        action::ALLOW,
        0,
    )])
    .expect("policy A");
    // B: b takes ports 80 and 81 from a1's identity only.
    lb.set_endpoint(&mut dpb, 0, endpoint_flags::DEFAULT_DENY_INGRESS);
    dpb.insert_policy(&[
        entry(
            b.endpoint_id,
            DIR_INGRESS,
            a1.identity,
            Some(80),
            action::ALLOW,
            0,
        ),
        entry(
            b.endpoint_id,
            DIR_INGRESS,
            a1.identity,
            Some(81),
            action::ALLOW,
            0,
        ),
    ])
    .expect("policy B");
    echo_server(&lb.pods[0].ns, b.ip, 80);
    echo_server(&lb.pods[0].ns, b.ip, 81);
    echo_server(&lb.pods[0].ns, b.ip6, 80);
    echo_server(&a1.ns, a1.ip, 80);

    // Allowed by A's egress and B's ingress; the replies pass both nodes' programs
    // although a1 takes nothing in and no rule allows the reverse direction.
    let mut s = connect(&a1.ns, b.ip, 80, ALLOWED).expect("a1 -> b:80 across nodes");
    for _ in 0..3 {
        round_trip(&mut s, b"node A to node B and back");
    }
    // B's ingress allows 81, A's egress does not: dropped on A.
    let before_b = dpb.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops");
    assert_denied(&a1.ns, b.ip, 81);
    assert!(dpa.drain_events().iter().any(|e| e.saddr == a1.ip.octets()
        && u16::from_be_bytes(e.dport) == 81
        && e.dst_identity == b.identity
        && e.direction == DIR_EGRESS));
    // A lets a2 out; B's ingress denies a2's identity (learnt from B's ipcache).
    assert_denied(&a2.ns, b.ip, 80);
    assert!(dpb.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") > before_b);
    assert!(dpb.drain_events().iter().any(|e| e.saddr == a2.ip.octets()
        && e.src_identity == a2.identity
        && e.direction == DIR_INGRESS));
    // The reverse direction, b -> a1, is a new flow: A's uplink denies it.
    assert_denied(&lb.pods[0].ns, a1.ip, 80);
    assert!(dpa.drain_events().iter().any(|e| e.saddr == b.ip.octets()
        && e.src_identity == b.identity
        && e.direction == DIR_INGRESS));
    round_trip(&mut s, b"still up");

    // The same over IPv6.
    let mut s6 = connect6(&a1.ns, b.ip6, 80, ALLOWED).expect("a1 -> b:80 over IPv6");
    round_trip(&mut s6, b"across nodes over IPv6");
    let err = connect6(&a2.ns, b.ip6, 80, DENIED).expect_err("a2 -> b:80 over IPv6");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(dpb
        .drain_events()
        .iter()
        .any(|e| e.family == 6 && e.saddr6 == a2.ip6.octets() && e.src_identity == a2.identity));
}

/// Prefix of the lines a loader process prints for the test that spawned it.
const LOADER_LINE: &str = "WARD-LOADER ";

/// Not a test of its own: the body of the separate loader process that
/// `enforcement_survives_a_loader_process_restart` spawns (this test binary re-executed
/// with `WARD_TEST_LOADER=mode;root;node`). Without that variable it does nothing.
/// `setup` loads, attaches to veth1 and veth2, writes the lab's policy (pod 2 takes TCP
/// 80 from pod 1 only) and exits; `serve` loads on the pinned maps, attaches (no-ops),
/// prints the default-deny drop count and waits to be killed.
#[test]
fn loader_process() {
    let Ok(spec) = std::env::var("WARD_TEST_LOADER") else {
        return;
    };
    let mut parts = spec.split(';');
    let (mode, root, node) = (
        parts.next().expect("mode"),
        PathBuf::from(parts.next().expect("root")),
        parts.next().expect("node").to_string(),
    );
    let mut dp = in_ns(&node, || {
        let mut dp = Datapath::load(&root).expect("load");
        for veth in ["veth1", "veth2"] {
            dp.attach(veth).expect("attach");
        }
        dp
    });
    if mode == "setup" {
        for i in 1..=2u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 77, i, 2));
            let identity = 1000 * u32::from(i);
            dp.set_ipcache(ipnet::IpNet::from(ip), identity)
                .expect("ipcache");
            let flags = if i == 2 {
                endpoint_flags::DEFAULT_DENY_INGRESS
            } else {
                0
            };
            let info = EndpointInfo {
                endpoint_id: u32::from(i),
                identity,
                ifindex: 0,
                flags,
            };
            dp.set_endpoint(ip, info).expect("endpoint");
        }
        dp.insert_policy(&[entry(2, DIR_INGRESS, 1000, Some(80), action::ALLOW, 0)])
            .expect("policy");
        println!("{LOADER_LINE}ready");
        return;
    }
    let drops = dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops");
    println!("{LOADER_LINE}ready");
    println!("{LOADER_LINE}drops={drops}");
    // Until the test kills this process.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    thread::park();
}

/// A loader process, killed (by its PID) when dropped.
struct LoaderProcess {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl LoaderProcess {
    /// Starts this test binary as a loader process and waits for its `ready` line.
    fn start(mode: &str, lab: &Lab) -> LoaderProcess {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "loader_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "WARD_TEST_LOADER",
                format!("{mode};{};{}", lab.root.display(), lab.node),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the loader process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // libtest may have begun the line ("test loader_process ... ").
                if let Some(at) = line.find(LOADER_LINE) {
                    if tx.send(line[at + LOADER_LINE.len()..].to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        let mut p = LoaderProcess { child, lines };
        p.expect_line("ready");
        p
    }

    /// Waits for the next line of the process; returns it when it starts with `what`.
    fn expect_line(&mut self, what: &str) -> String {
        let line = self
            .lines
            .recv_timeout(ALLOWED)
            .unwrap_or_else(|e| panic!("loader process: no `{what}` line: {e}"));
        assert!(line.starts_with(what), "loader process said {line}");
        line
    }

    fn kill(mut self) {
        self.child.kill().expect("kill the loader process");
        self.child.wait().expect("wait");
    }
}

impl Drop for LoaderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn enforcement_survives_a_loader_process_restart() {
    let lab = Lab::new("procrestart", 2);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    echo_server(&b.ns, b.ip, 80);
    echo_server(&b.ns, b.ip, 81);

    // A first loader process sets everything up and exits.
    let mut setup = LoaderProcess::start("setup", &lab);
    let status = setup.child.wait().expect("wait");
    assert!(
        status.success(),
        "the setup loader process failed: {status}"
    );
    let mut s = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80 is allowed");
    round_trip(&mut s, b"no loader process runs");
    assert_denied(&a.ns, b.ip, 81);

    // A new process starts on the pinned maps (its load and attach change nothing).
    let mut serve = LoaderProcess::start("serve", &lab);
    let drops = serve.expect_line("drops=");
    let n: u64 = drops["drops=".len()..].parse().expect("a count");
    assert!(n >= 1, "the new process reads the pinned counters: {n}");
    round_trip(&mut s, b"a new loader process runs");
    connect(&a.ns, b.ip, 80, ALLOWED).expect("a new a -> b:80 is allowed");
    assert_denied(&a.ns, b.ip, 81);

    // Killed in turn: the kernel keeps enforcing.
    serve.kill();
    round_trip(&mut s, b"the loader process was killed");
    assert_denied(&a.ns, b.ip, 81);
    drop(setup);
}

#[test]
fn dns_over_tcp_redirect_sees_original_destination() {
    const DNS_PROXY: u16 = 15054;
    let lab = Lab::new("dnstcp", 2);
    lab.proxy_routing();
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_EGRESS);
    dp.insert_policy(&[entry(
        a.endpoint_id,
        DIR_EGRESS,
        b.identity,
        Some(53),
        action::REDIRECT,
        DNS_PROXY,
    )])
    .expect("policy");
    // The proxy answers every query over TCP with an empty NOERROR answer.
    let proxy = transparent_listener(&lab.node, DNS_PROXY);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let Ok((mut conn, peer)) = proxy.accept() else {
            return;
        };
        let _ = tx.send((peer, conn.local_addr().expect("local addr")));
        let mut len = [0u8; 2];
        while conn.read_exact(&mut len).is_ok() {
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if conn.read_exact(&mut query).is_err() || query.len() < 12 {
                return;
            }
            // QR, RA; the question is echoed, no answers.
            query[2] |= 0x80;
            query[3] = 0x80;
            let mut reply = len.to_vec();
            reply.extend_from_slice(&query);
            if conn.write_all(&reply).is_err() {
                return;
            }
        }
    });
    // Nothing listens on b:53; dig's TCP query reaches the proxy.
    let b_ip = b.ip.to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &a.ns, "dig", "+tcp", "+tries=1", "+time=5"])
        .arg(format!("@{b_ip}"))
        .arg("ward.test")
        .output()
        .expect("run dig");
    let (peer, orig_dst) = rx.recv_timeout(ALLOWED).expect("the proxy accepted");
    assert_eq!(orig_dst, SocketAddr::V4(SocketAddrV4::new(b.ip, 53)));
    assert_eq!(peer.ip(), IpAddr::V4(a.ip));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("status: NOERROR") && stdout.contains(&format!("{b_ip}#53")),
        "dig over TCP got the proxy's answer as from {b_ip}: {stdout}"
    );
}

#[test]
fn closed_tcp_flow_expires_under_the_closing_timeout() {
    let lab = Lab::new("ctclose", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    echo_server(&b.ns, b.ip, 80);
    let mut open = connect(&a.ns, b.ip, 80, ALLOWED).expect("a -> b:80");
    round_trip(&mut open, b"stays open");
    // a's second flow is half-closed: a sends its FIN, b keeps sending.
    let half_server = in_ns(&b.ns, || TcpListener::bind((b.ip, 90)).expect("bind"));
    let (eof_tx, eof_rx) = std::sync::mpsc::channel();
    let (late_tx, late_rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let Ok((mut conn, _)) = half_server.accept() else {
            return;
        };
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        let _ = eof_tx.send(());
        if late_rx.recv().is_ok() {
            let _ = conn.write_all(b"after your FIN");
        }
    });
    let mut half = connect(&a.ns, b.ip, 90, ALLOWED).expect("a -> b:90");
    half.shutdown(std::net::Shutdown::Write).expect("shutdown");
    eof_rx.recv_timeout(ALLOWED).expect("b saw a's FIN");
    let long = Duration::from_secs(3600);
    // Closing only once both sides sent their FIN: the half-closed flow stays under a
    // zero closing timeout.
    assert_eq!(
        dp.expire_conntrack(long, Duration::ZERO).expect("expire"),
        0
    );

    let mut closed = connect(&c.ns, b.ip, 80, ALLOWED).expect("c -> b:80");
    round_trip(&mut closed, b"closes");
    closed
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    // The server answers the FIN with its own; c's kernel acknowledges it and the socket
    // waits in TIME_WAIT: both FINs crossed the programs.
    let mut rest = Vec::new();
    closed
        .read_to_end(&mut rest)
        .expect("the server closes too");
    drop(closed);
    eventually("c's socket in TIME_WAIT", || {
        let out = Command::new("ip")
            .args(["netns", "exec", &c.ns, "ss", "-Htn", "state", "time-wait"])
            .output()
            .expect("ss");
        !out.stdout.is_empty()
    });
    // Under a long closing timeout both stay; under a zero one only the closed flow goes.
    dp.expire_conntrack(long, long).expect("expire");
    assert!(dp.in_live_connection(IpAddr::V4(c.ip)));
    let removed = dp.expire_conntrack(long, Duration::ZERO).expect("expire");
    assert_eq!(removed, 1, "exactly the closed flow expires");
    assert!(!dp.in_live_connection(IpAddr::V4(c.ip)));
    assert!(dp.in_live_connection(IpAddr::V4(a.ip)));
    round_trip(&mut open, b"the open flow is untouched");
    late_tx.send(()).expect("the half-close server waits");
    let mut late = [0u8; 14];
    half.read_exact(&mut late)
        .expect("the half-closed flow still carries data");
    assert_eq!(&late, b"after your FIN");
}

/// An ICMP (v4) or ICMPv6 error of `kind` (type, code) sent from `ns` to `to`, quoting a
/// UDP packet `quoted_src:sport -> quoted_dst:dport`.
fn send_icmp_error(
    ns: &str,
    to: IpAddr,
    kind: (u8, u8),
    quoted_src: IpAddr,
    quoted_dst: IpAddr,
    ports: (u16, u16),
) {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut udp = Vec::new();
    udp.extend_from_slice(&ports.0.to_be_bytes());
    udp.extend_from_slice(&ports.1.to_be_bytes());
    udp.extend_from_slice(&[0, 8, 0, 0]);
    let (sock, pkt) = match (quoted_src, quoted_dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let sock = in_ns(ns, || {
                Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw")
            });
            // The ICMP header, then the quoted IPv4 header and UDP header.
            let mut pkt = vec![kind.0, kind.1, 0, 0, 0, 0, 0x05, 0xdc];
            let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            pkt.extend_from_slice(&ip);
            pkt.extend_from_slice(&udp);
            let sum = checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
            (sock, pkt)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let sock = in_ns(ns, || {
                Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).expect("raw")
            });
            // The kernel fills ICMPv6 checksums of raw sockets; 1280: an MTU for the
            // packet-too-big error, unused by the others.
            let mut pkt = vec![kind.0, kind.1, 0, 0, 0, 0, 0x05, 0x00];
            pkt.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, PROTO_UDP, 64]);
            pkt.extend_from_slice(&s.octets());
            pkt.extend_from_slice(&d.octets());
            pkt.extend_from_slice(&udp);
            (sock, pkt)
        }
        _ => panic!("mixed families"),
    };
    let dst = SocketAddr::new(to, 0);
    sock.send_to(&pkt, &dst.into())
        .expect("send the ICMP error");
}

/// A raw ICMP socket of `ns` for `family` (4 or 6).
fn icmp_receiver(ns: &str, v6: bool) -> UdpSocket {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = in_ns(ns, || {
        if v6 {
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).expect("raw")
        } else {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw")
        }
    });
    UdpSocket::from(s) // only for its safe recv API
}

/// Whether `sock` receives an ICMP error of `error_type` quoting destination port `dport`
/// in time.
fn icmp_error_seen(
    sock: &UdpSocket,
    v6: bool,
    error_type: u8,
    dport: u16,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        let Ok(n) = sock.recv(&mut buf) else {
            return false;
        };
        // IPv4 raw sockets deliver the IP header, IPv6 ones do not.
        let off = if v6 {
            0
        } else {
            usize::from(buf[0] & 0x0f) * 4
        };
        let quoted_l4 = if v6 { off + 8 + 40 } else { off + 8 + 20 };
        if n >= quoted_l4 + 4
            && buf[off] == error_type
            && buf[quoted_l4 + 2..quoted_l4 + 4] == dport.to_be_bytes()
        {
            return true;
        }
    }
}

#[test]
fn icmp_errors_pass_with_their_flow_only() {
    let lab = Lab::new("icmperr", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    // a takes nothing in: an ICMP error reaches it only as part of a flow of its own
    // (an unrelated one is decided by policy, and its drop counted as unrelated).
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_INGRESS);
    lab.set_endpoint(&mut dp, 1, 0);
    for (src, dst) in [
        (IpAddr::V4(a.ip), IpAddr::V4(b.ip)),
        (IpAddr::V6(a.ip6), IpAddr::V6(b.ip6)),
    ] {
        // Nothing listens on b:9999: b's kernel answers port unreachable, which the
        // programs let back to a, whose connected socket sees the refusal.
        let client = in_ns(&a.ns, || {
            UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind")
        });
        client.connect(SocketAddr::new(dst, 9999)).expect("connect");
        client.set_read_timeout(Some(ALLOWED)).expect("timeout");
        client.send(b"anyone?").expect("send");
        let mut buf = [0u8; 16];
        let err = client.recv(&mut buf).expect_err("nothing answers");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{src} -> {dst}:9999: the port unreachable error comes back"
        );

        // Forged errors from c: one quoting a's tracked flow passes, one quoting a flow
        // a never had is dropped and counted.
        let v6 = src.is_ipv6();
        let sport = match client.local_addr().expect("local addr") {
            SocketAddr::V4(x) => x.port(),
            SocketAddr::V6(x) => x.port(),
        };
        let receiver = icmp_receiver(&a.ns, v6);
        let c_ip = if v6 {
            IpAddr::V6(c.ip6)
        } else {
            IpAddr::V4(c.ip)
        };
        // Destination unreachable, then fragmentation needed / packet too big, then time
        // exceeded.
        let kinds = if v6 {
            [(1, 4), (2, 0), (3, 0)]
        } else {
            [(3, 3), (3, 4), (11, 0)]
        };
        let before = dp.drops(drop_reason::ICMP_ERROR_UNRELATED).expect("drops");
        send_icmp_error(&c.ns, src, kinds[0], src, dst, (sport, 7777));
        assert!(
            !icmp_error_seen(&receiver, v6, kinds[0].0, 7777, DENIED),
            "{c_ip}: an error quoting no flow of a's is dropped"
        );
        assert!(dp.drops(drop_reason::ICMP_ERROR_UNRELATED).expect("drops") > before);
        // Unrelated errors are ICMP like any other for policy: b takes everything in.
        let b_receiver = icmp_receiver(&b.ns, v6);
        send_icmp_error(&c.ns, dst, kinds[0], dst, src, (7777, 7777));
        assert!(
            icmp_error_seen(&b_receiver, v6, kinds[0].0, 7777, ALLOWED),
            "b, without ingress policy, gets an unrelated error"
        );
        for kind in kinds {
            send_icmp_error(&c.ns, src, kind, src, dst, (sport, 9999));
            assert!(
                icmp_error_seen(&receiver, v6, kind.0, 9999, ALLOWED),
                "{c_ip}: an error {kind:?} quoting a's flow passes"
            );
        }
    }
}

/// A raw IPv6 socket of `ns` that sends whole packets (IPPROTO_RAW: header included).
fn raw_ipv6_sender(ns: &str) -> socket2::Socket {
    in_ns(ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(255)),
        )
        .expect("raw IPv6 socket")
    })
}

/// An IPv6 packet `src -> dst` whose SCTP header (to `port`) follows hop-by-hop,
/// destination options, routing (no segments left) and fragment headers. `frag_offset`
/// (in 8-byte units) other than 0 makes it a later fragment.
fn sctp6_with_extension_headers(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    port: u16,
    frag_offset: u16,
) -> Vec<u8> {
    const SCTP: u8 = PROTO_SCTP;
    let mut ext = Vec::new();
    // hop-by-hop -> destination options: PadN of 4 bytes
    ext.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    // destination options -> routing
    ext.extend_from_slice(&[43, 0, 1, 4, 0, 0, 0, 0]);
    // routing (type 253, experimental, 0 segments left) -> fragment
    ext.extend_from_slice(&[44, 0, 253, 0, 0, 0, 0, 0]);
    // fragment -> SCTP: offset, M = 0, identification
    let fo = (frag_offset << 3).to_be_bytes();
    ext.extend_from_slice(&[SCTP, 0, fo[0], fo[1], 0, 0, 0x12, 0x34]);
    let mut sctp = vec![0u8; 16];
    sctp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    sctp[2..4].copy_from_slice(&port.to_be_bytes());
    sctp[15] = 4; // an empty DATA chunk
    let payload_len = (ext.len() + sctp.len()) as u16;
    let mut pkt = vec![0x60, 0, 0, 0];
    pkt.extend_from_slice(&payload_len.to_be_bytes());
    pkt.extend_from_slice(&[0, 64]); // next: hop-by-hop; hop limit
    pkt.extend_from_slice(&src.octets());
    pkt.extend_from_slice(&dst.octets());
    pkt.extend_from_slice(&ext);
    pkt.extend_from_slice(&sctp);
    pkt
}

/// An IPv6 packet `src -> dst` whose SCTP header (to `port`) follows `n` destination
/// options headers.
fn sctp6_with_dstopts(src: Ipv6Addr, dst: Ipv6Addr, port: u16, n: usize) -> Vec<u8> {
    let mut ext = Vec::new();
    for i in 0..n {
        let next = if i + 1 == n { PROTO_SCTP } else { 60 };
        ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let mut sctp = vec![0u8; 16];
    sctp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    sctp[2..4].copy_from_slice(&port.to_be_bytes());
    sctp[15] = 4;
    let payload_len = (ext.len() + sctp.len()) as u16;
    let mut pkt = vec![0x60, 0, 0, 0];
    pkt.extend_from_slice(&payload_len.to_be_bytes());
    pkt.extend_from_slice(&[60, 64]); // next: destination options; hop limit
    pkt.extend_from_slice(&src.octets());
    pkt.extend_from_slice(&dst.octets());
    pkt.extend_from_slice(&ext);
    pkt.extend_from_slice(&sctp);
    pkt
}

/// Whether a raw SCTP socket (IPv6: no IP header delivered) sees a packet to `port`.
fn sctp6_seen(receiver: &UdpSocket, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        receiver.set_read_timeout(Some(left)).expect("timeout");
        let Ok(n) = receiver.recv(&mut buf) else {
            return false;
        };
        if n >= 4 && buf[2..4] == port.to_be_bytes() {
            return true;
        }
    }
}

#[test]
fn sctp_over_ipv6_with_extension_headers() {
    let lab = Lab::new("ipv6ext", 2);
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 1, endpoint_flags::DEFAULT_DENY_INGRESS);
    dp.insert_policy(&[entry_proto(
        PROTO_SCTP,
        b.endpoint_id,
        DIR_INGRESS,
        a.identity,
        Some(3868),
        action::ALLOW,
        0,
    )])
    .expect("policy");
    let receiver = in_ns(&b.ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from(PROTO_SCTP))),
        )
        .expect("raw SCTP socket")
    });
    let receiver = UdpSocket::from(receiver); // only for its safe recv API
    let to = SocketAddr::V6(SocketAddrV6::new(b.ip6, 0, 0, 0));

    // Plain SCTP over IPv6, by port.
    let plain = in_ns(&a.ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from(PROTO_SCTP))),
        )
        .expect("raw SCTP socket")
    });
    for (port, allowed) in [(3868u16, true), (3869, false)] {
        let mut sctp = vec![0u8; 16];
        sctp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        sctp[2..4].copy_from_slice(&port.to_be_bytes());
        sctp[15] = 4;
        plain.send_to(&sctp, &to.into()).expect("send");
        let wait = if allowed { ALLOWED } else { DENIED };
        assert_eq!(
            sctp6_seen(&receiver, port, wait),
            allowed,
            "plain SCTP/IPv6 to {port}"
        );
    }

    // The same behind four extension headers: the programs find the SCTP header.
    let sender = raw_ipv6_sender(&a.ns);
    for (port, allowed) in [(3868u16, true), (3869, false)] {
        let pkt = sctp6_with_extension_headers(a.ip6, b.ip6, port, 0);
        sender.send_to(&pkt, &to.into()).expect("send");
        let wait = if allowed { ALLOWED } else { DENIED };
        assert_eq!(
            sctp6_seen(&receiver, port, wait),
            allowed,
            "SCTP/IPv6 to {port} behind extension headers"
        );
    }
    // Eight extension headers are followed; a ninth would hide the ports from policy and
    // the packet is dropped as malformed.
    sender
        .send_to(&sctp6_with_dstopts(a.ip6, b.ip6, 3868, 8), &to.into())
        .expect("send");
    assert!(
        sctp6_seen(&receiver, 3868, ALLOWED),
        "8 headers, allowed port"
    );
    let malformed = dp.drops(drop_reason::MALFORMED).expect("drops");
    sender
        .send_to(&sctp6_with_dstopts(a.ip6, b.ip6, 3868, 9), &to.into())
        .expect("send");
    assert!(
        !sctp6_seen(&receiver, 3868, DENIED),
        "9 headers are dropped"
    );
    assert!(dp.drops(drop_reason::MALFORMED).expect("drops") > malformed);

    // A later fragment has no ports: only a port-wildcard entry could let it through.
    let before = dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops");
    let pkt = sctp6_with_extension_headers(a.ip6, b.ip6, 3868, 100);
    sender.send_to(&pkt, &to.into()).expect("send");
    eventually("the later fragment is dropped", || {
        dp.drops(drop_reason::POLICY_DEFAULT_DENY).expect("drops") > before
    });
    assert!(dp.drain_events().iter().any(|e| e.family == 6
        && e.protocol == PROTO_SCTP
        && e.dport == [0, 0]
        && e.saddr6 == a.ip6.octets()));
}

/// An ICMPv6 error of `kind` from the raw socket of `ns` to `to`, quoting a UDP packet
/// `quoted_src -> quoted_dst` (`ports`) whose UDP header follows a hop-by-hop and a
/// destination options header.
fn send_icmpv6_error_quoting_ext_headers(
    ns: &str,
    to: Ipv6Addr,
    kind: (u8, u8),
    quoted_src: Ipv6Addr,
    quoted_dst: Ipv6Addr,
    ports: (u16, u16),
) {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = in_ns(ns, || {
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).expect("raw")
    });
    // The kernel fills the checksum; 1280: the MTU of a packet-too-big error.
    let mut pkt = vec![kind.0, kind.1, 0, 0, 0, 0, 0x05, 0x00];
    // payload: hop-by-hop (8) + destination options (8) + UDP (8); next: hop-by-hop
    pkt.extend_from_slice(&[0x60, 0, 0, 0, 0, 24, 0, 64]);
    pkt.extend_from_slice(&quoted_src.octets());
    pkt.extend_from_slice(&quoted_dst.octets());
    // hop-by-hop -> destination options, destination options -> UDP: PadN of 4 bytes
    pkt.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    pkt.extend_from_slice(&[PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
    pkt.extend_from_slice(&ports.0.to_be_bytes());
    pkt.extend_from_slice(&ports.1.to_be_bytes());
    pkt.extend_from_slice(&[0, 8, 0, 0]);
    let dst = SocketAddr::new(IpAddr::V6(to), 0);
    sock.send_to(&pkt, &dst.into())
        .expect("send the ICMPv6 error");
}

/// Whether the raw ICMPv6 socket `sock` receives an error of `error_type` whose quoted
/// packet (with two extension headers of 8 bytes) has destination port `dport`, in time.
fn icmpv6_error_with_ext_headers_seen(
    sock: &UdpSocket,
    error_type: u8,
    dport: u16,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    let quoted_l4 = 8 + 40 + 16;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        let Ok(n) = sock.recv(&mut buf) else {
            return false;
        };
        if n >= quoted_l4 + 4
            && buf[0] == error_type
            && buf[quoted_l4 + 2..quoted_l4 + 4] == dport.to_be_bytes()
        {
            return true;
        }
    }
}

#[test]
fn icmpv6_error_quoting_extension_headers_passes_with_its_flow() {
    const PACKET_TOO_BIG: (u8, u8) = (2, 0);
    let lab = Lab::new("icmp6ext", 3);
    let mut dp = lab.datapath();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    // a takes nothing in: an ICMP error reaches it only as part of a flow of its own.
    lab.set_endpoint(&mut dp, 0, endpoint_flags::DEFAULT_DENY_INGRESS);
    lab.set_endpoint(&mut dp, 1, 0);
    // a's UDP flow to b:9999, tracked by its first datagram.
    let client = in_ns(&a.ns, || {
        UdpSocket::bind(SocketAddr::new(IpAddr::V6(a.ip6), 0)).expect("bind")
    });
    client
        .connect(SocketAddr::new(IpAddr::V6(b.ip6), 9999))
        .expect("connect");
    client.send(b"anyone?").expect("send");
    let sport = client.local_addr().expect("local addr").port();
    let receiver = icmp_receiver(&a.ns, true);

    // A packet too big from a router (c) quoting a's packet, extension headers and all:
    // matched to a's flow, it passes.
    send_icmpv6_error_quoting_ext_headers(
        &c.ns,
        a.ip6,
        PACKET_TOO_BIG,
        a.ip6,
        b.ip6,
        (sport, 9999),
    );
    assert!(
        icmpv6_error_with_ext_headers_seen(&receiver, PACKET_TOO_BIG.0, 9999, ALLOWED),
        "a packet too big quoting a's flow behind extension headers passes"
    );
    // The same quoting a flow a never had is dropped and counted as unrelated.
    let before = dp.drops(drop_reason::ICMP_ERROR_UNRELATED).expect("drops");
    send_icmpv6_error_quoting_ext_headers(
        &c.ns,
        a.ip6,
        PACKET_TOO_BIG,
        a.ip6,
        b.ip6,
        (sport, 7777),
    );
    assert!(
        !icmpv6_error_with_ext_headers_seen(&receiver, PACKET_TOO_BIG.0, 7777, DENIED),
        "an error quoting no flow of a's is dropped"
    );
    assert!(dp.drops(drop_reason::ICMP_ERROR_UNRELATED).expect("drops") > before);
}

/// A proxy's upstream connection that keeps the client's address (IP_TRANSPARENT bound
/// to `src`, marked `mark`), from the node namespace to `to`.
fn transparent_upstream(
    ns: &str,
    src: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    mark: u32,
) -> std::io::Result<TcpStream> {
    in_ns(ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_ip_transparent_v4(true)?;
        s.set_mark(mark)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
        let addr = SocketAddr::V4(SocketAddrV4::new(to, port));
        s.connect_timeout(&addr.into(), ALLOWED)?;
        let s = TcpStream::from(s);
        s.set_read_timeout(Some(ALLOWED))?;
        Ok(s)
    })
}

#[test]
fn replies_to_a_transparent_upstream_reach_the_proxy_not_the_client() {
    let lab = Lab::new("tproxyup", 2);
    lab.proxy_routing();
    let mut dp = lab.datapath();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    lab.set_endpoint(&mut dp, 0, 0);
    echo_server(&b.ns, b.ip, 80);
    // The proxies' upstream connections from a's address to b: b's replies are for the
    // proxy's socket in the node. The conntrack entry of such a flow must not let them
    // pass on to a, whose kernel knows no such connection (the fast path for established
    // flows skips the socket lookup only for flows without a proxy).
    for mark in [0xa00, 0xb00] {
        let mut s = transparent_upstream(&lab.node, a.ip, b.ip, 80, mark)
            .expect("the upstream connects: b's SYN-ACK reaches the proxy");
        for i in 0..3 {
            round_trip(
                &mut s,
                format!("packet {i} of an established flow").as_bytes(),
            );
        }
    }
}
