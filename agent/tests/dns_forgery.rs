//! Forged DNS answers against `ward dns-proxy` (root): in a network namespace made by
//! the test, dnsmasq is the proxy's upstream at 198.51.100.53:53 and is slow for
//! `slow.example.com` (it forwards that name to a server of the test that answers after
//! [`DELAY`]); a spoofer on a raw socket sends answers from the upstream's address and
//! port to the proxy's upstream sockets, carrying `slow.example.com A 203.0.113.66` (TTL
//! 3600) with the question echoed exactly. The client, a UDP socket of the test, must
//! get the real answer (192.0.2.10), and neither the audit log nor the persisted FQDN
//! cache may ever hold the forged IP.
//!
//! The spoofer knows what an attacker outside the proxy can: the upstream's address and
//! port, the question, the client's query id (it sent the query), and the ports the proxy
//! has open towards the upstream (read from the namespace's `/proc/net/udp`, as a port
//! scan would find them).
//!
//! Names carry the PID; Drop kills what the test started (by PID) and deletes the
//! namespace.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use testkit::{spawn_in, Netns, Poll};

const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const LISTEN: &str = "127.0.0.1:5353";
const REAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const FORGED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
/// How long the slow name's answer takes.
const DELAY: Duration = Duration::from_secs(2);
const SLOW_PORT: u16 = 5399;

const CLUSTER: &str = r#"
namespaces: [{name: app}]
pods:
- {namespace: app, name: client, labels: {app: client}, ip: 10.0.1.10}
"#;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-client, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [198.51.100.53/32]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
  - toFQDNs: [{matchPattern: "*.example.com"}]
"#;

fn wait_for(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    Poll::within(within)
        .every(Duration::from_millis(5))
        .expect(what, cond);
}

/// The namespace with dnsmasq, the slow server and `ward dns-proxy` in it.
struct World {
    ns: Netns,
    dir: tempfile::TempDir,
    children: Vec<Child>,
    ward: Option<Child>,
    stop: Arc<AtomicBool>,
    /// Queries the slow server received.
    slow_queries: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl World {
    fn start(tag: &str) -> World {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the DNS forgery tests need root (a network namespace, raw sockets)"
        );
        for tool in ["dnsmasq", "ip"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{tool} is not installed (cargo xtask test installs it)"
            );
        }
        let ns = Netns::new(testkit::unique(&format!("wdf-{tag}"))).unwrap();
        ns.addr("lo", "198.51.100.53/32").unwrap();
        let name = ns.name().to_string();
        let mut w = World {
            ns,
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
            ward: None,
            stop: Arc::new(AtomicBool::new(false)),
            slow_queries: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
        };
        w.start_slow_server();
        let dir = w.dir.path().to_owned();
        w.children.push(
            w.ns.exec("dnsmasq")
                .arg("--keep-in-foreground")
                .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
                .args(["--bind-interfaces", "--listen-address=198.51.100.53"])
                .args(["--port=53", "--user=root", "--cache-size=0"])
                .arg("--host-record=warm.example.com,192.0.2.20")
                .arg(format!("--server=/slow.example.com/127.0.0.1#{SLOW_PORT}"))
                .arg(format!("--pid-file={}/dnsmasq.pid", dir.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
        std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
        w.ward = Some(
            w.ns.exec(env!("CARGO_BIN_EXE_ward"))
                .arg("dns-proxy")
                .args(["--listen", LISTEN, "--upstream", "198.51.100.53:53"])
                .arg("--cluster")
                .arg(dir.join("cluster.yaml"))
                .arg("--policies")
                .arg(dir.join("policy.yaml"))
                .args(["--endpoint", "app/client", "--audit-log"])
                .arg(dir.join("audit.log"))
                .arg("--state-dir")
                .arg(dir.join("state"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Up when a name dnsmasq holds comes back through the proxy.
        wait_for("the proxy and dnsmasq", Duration::from_secs(20), || {
            testkit::run_in(&name, || {
                query(0x1000, "warm.example.com", Duration::from_millis(300))
            })
            .is_some()
        });
        w
    }

    /// The name's real server: answers `slow.example.com A 192.0.2.10` after [`DELAY`].
    fn start_slow_server(&mut self) {
        let (stop, count) = (self.stop.clone(), self.slow_queries.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        self.threads.push(self.ns.spawn(move || {
            let sock = UdpSocket::bind(("127.0.0.1", SLOW_PORT)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let reply = answer_to(&q, REAL, 300);
                let sock = sock.try_clone().unwrap();
                thread::spawn(move || {
                    thread::sleep(DELAY);
                    let _ = sock.send_to(&reply, peer);
                });
            }
        }));
        ready_rx.recv().unwrap();
    }

    /// Runs `f` on a thread in the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run(f)
    }

    /// The proxy's UDP sockets towards the upstream: (local address, local port).
    fn upstream_sockets(&self) -> Vec<SocketAddrV4> {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/udp").unwrap();
            let want = SocketAddrV4::new(UPSTREAM, 53);
            text.lines()
                .skip(1)
                .filter_map(|l| {
                    let mut f = l.split_whitespace().skip(1);
                    let local = proc_addr(f.next()?)?;
                    let remote = proc_addr(f.next()?)?;
                    (remote == want).then_some(local)
                })
                .collect()
        })
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    /// Stops the proxy (SIGINT: it persists its cache) and returns the cache file.
    fn stop_ward_and_read_cache(&mut self) -> String {
        let mut ward = self.ward.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(ward.id()).unwrap()),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while ward.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "ward did not stop on SIGINT");
            thread::sleep(Duration::from_millis(10));
        }
        std::fs::read_to_string(self.dir.path().join("state/fqdn-cache.json")).unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.ward.iter_mut().chain(self.children.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // the namespace goes with `self.ns`, after everything in it stopped
    }
}

/// `0100007F:0035` (as /proc/net/udp writes them) as an address.
fn proc_addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_le_bytes()), port))
}

fn query_bytes(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// The answer to `q` with one A record.
fn answer_to(q: &Message, ip: Ipv4Addr, ttl: u32) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_recursion_available(true);
    m.add_queries(q.queries().iter().cloned());
    let name = q.queries()[0].name().clone();
    m.add_answer(Record::from_rdata(name, ttl, RData::A(A(ip))));
    m.to_vec().unwrap()
}

/// A query through the proxy from a fresh socket in the calling thread's namespace: the
/// IPs of the reply, or None without one within `within`.
fn query(id: u16, name: &str, within: Duration) -> Option<Vec<Ipv4Addr>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.send_to(&query_bytes(id, name), LISTEN).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.id(), id, "the reply carries the client's id");
    Some(
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect(),
    )
}

/// Sends forged answers to `slow.example.com` from 198.51.100.53:53 over a raw socket.
struct Spoofer {
    sock: Socket,
    /// An IPv4 + UDP + DNS datagram; the UDP destination port and DNS id are patched in.
    packet: Vec<u8>,
    sent: usize,
}

impl Spoofer {
    /// In the calling thread's namespace.
    fn new() -> Spoofer {
        // IPPROTO_RAW: the IP header is ours (the kernel fills in its length, checksum
        // and id).
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))).unwrap();
        let q = Message::from_vec(&query_bytes(0, "slow.example.com")).unwrap();
        let dns = answer_to(&q, FORGED, 3600);
        let udp_len = u16::try_from(8 + dns.len()).unwrap();
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&UPSTREAM.octets());
        p.extend_from_slice(&[0, 0, 0, 0]); // destination, per send
        p.extend_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&[0, 0]); // destination port, per send
        p.extend_from_slice(&udp_len.to_be_bytes());
        p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
        p.extend_from_slice(&dns);
        Spoofer {
            sock,
            packet: p,
            sent: 0,
        }
    }

    fn send(&mut self, to: SocketAddrV4, id: u16) {
        self.packet[16..20].copy_from_slice(&to.ip().octets());
        self.packet[22..24].copy_from_slice(&to.port().to_be_bytes());
        self.packet[28..30].copy_from_slice(&id.to_be_bytes());
        let dst = SockAddr::from(SocketAddr::V4(SocketAddrV4::new(*to.ip(), 0)));
        // A full socket buffer drops the datagram, as the network would.
        if self.sock.send_to(&self.packet, &dst).is_ok() {
            self.sent += 1;
        }
    }

    /// `first`, then every other id.
    fn every_id(&mut self, to: SocketAddrV4, first: u16) {
        self.send(to, first);
        for id in 0..=u16::MAX {
            if id != first {
                self.send(to, id);
            }
        }
    }
}

/// Checks that nothing of the forged answer reached the client, the audit log or the
/// cache, and that the real one did.
fn assert_not_poisoned(w: &mut World, got: Option<Vec<Ipv4Addr>>) {
    let got = got.expect("the client got a reply");
    assert!(
        !got.contains(&FORGED),
        "the client got the forged IP: {got:?}"
    );
    assert_eq!(got, [REAL], "the client got the real answer");
    let end = Instant::now() + Duration::from_secs(5);
    while !w.audit().contains("slow.example.com") {
        assert!(Instant::now() < end, "no audit record:\n{}", w.audit());
        thread::sleep(Duration::from_millis(10));
    }
    let audit = w.audit();
    assert!(
        !audit.contains(&FORGED.to_string()),
        "the proxy learned the forged IP:\n{audit}"
    );
    let cache = w.stop_ward_and_read_cache();
    assert!(cache.contains(&REAL.to_string()), "{cache}");
    assert!(
        !cache.contains(&FORGED.to_string()),
        "the forged IP is in the cache: {cache}"
    );
}

/// Finding 5 of issue 18: while a query for a slow name is upstream, the spoofer sends
/// answers for all 65,536 ids to every port the proxy had open towards the upstream
/// before the query, and the client's id to every such port open while the query is
/// upstream, again and again until the real answer came.
#[test]
fn forged_answers_for_every_id_do_not_poison() {
    let mut w = World::start("flight");
    // Queries before: a proxy that keeps upstream sockets open has some now.
    for i in 0..3 {
        let ips = w.run(move || query(0x2000 + i, "warm.example.com", Duration::from_secs(5)));
        assert_eq!(ips, Some(vec![Ipv4Addr::new(192, 0, 2, 20)]));
    }
    let before = w.upstream_sockets();
    let client_id = 0x4242;
    let asked = w.slow_queries.clone();
    let client = spawn_in(w.ns.name(), move || {
        query(client_id, "slow.example.com", DELAY * 5)
    });
    wait_for(
        "the query at the slow server",
        Duration::from_secs(10),
        || asked.load(Ordering::SeqCst) > 0,
    );
    let start = Instant::now();
    let in_flight = w.upstream_sockets();
    let sent = w.run(move || {
        let mut s = Spoofer::new();
        for &port in &before {
            s.every_id(port, client_id);
        }
        let mut ports = in_flight;
        while start.elapsed() < DELAY + Duration::from_secs(1) {
            for &port in &ports {
                s.send(port, client_id);
            }
            thread::sleep(Duration::from_millis(20));
            ports = std::fs::read_to_string("/proc/thread-self/net/udp")
                .unwrap()
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let mut f = l.split_whitespace().skip(1);
                    let local = proc_addr(f.next()?)?;
                    let remote = proc_addr(f.next()?)?;
                    (remote == SocketAddrV4::new(UPSTREAM, 53)).then_some(local)
                })
                .collect();
        }
        s.sent
    });
    assert!(sent > 0, "nothing was spoofed");
    let got = client.join().unwrap();
    assert_not_poisoned(&mut w, got);
}

/// Finding 5 of issue 18: forged answers sent before the query (the client's id first,
/// then every other id) to every port the proxy has open towards the upstream are never
/// served to the query that follows.
#[test]
fn forged_answers_queued_before_the_query_are_not_served() {
    let mut w = World::start("queued");
    for i in 0..3 {
        let ips = w.run(move || query(0x3000 + i, "warm.example.com", Duration::from_secs(5)));
        assert_eq!(ips, Some(vec![Ipv4Addr::new(192, 0, 2, 20)]));
    }
    let before = w.upstream_sockets();
    let client_id = 0x4343;
    w.run(move || {
        let mut s = Spoofer::new();
        for &port in &before {
            s.every_id(port, client_id);
        }
    });
    let got = w.run(move || query(client_id, "slow.example.com", DELAY * 5));
    assert_not_poisoned(&mut w, got);
}
