//! Datapath load test, driven by `cargo xtask loadtest datapath` (root needed).
//!
//! Two pod namespaces joined through a node namespace by veths (10.77.{1,2}.0/24, nothing
//! routes out of them, names carry the PID and are deleted on exit, also on panic), then,
//! in one run and in this order:
//!
//! - `none`: no program attached;
//! - `allow`: Ward's TC programs on both pod veths, both endpoints default-deny in both
//!   directions, and the entries that allow pod1 -> pod2 on the test ports (so every
//!   packet is looked up in policy and conntrack);
//! - `allow+1k`: the same plus 1,000 further policy entries (other identities and ports)
//!   for both endpoints;
//! - `redirect`: pod1's egress to the test ports redirected (`sk_assign`) to a
//!   transparent listener in the node namespace, a plain relay (two copying threads per
//!   connection, upstream sockets marked as the egress proxy's) that connects to the
//!   original destination: the datapath's L7 path without any L7 work.
//!
//! Each scenario measures iperf3 throughput (one TCP stream) and a netperf-style TCP_RR
//! rate (one connection, one byte each way, client and server on different CPUs; netperf
//! is in Debian's non-free section, so this is written here). It prints one line per
//! scenario: `RESULT <scenario> <iperf3 Mbit/s> <transactions/s>`. With ROUNDS > 1 the
//! three scenarios repeat in turn (programs detached and attached again, the 1,000
//! entries removed and inserted again), so that the machine's drift touches all alike.
//!
//! Usage: `datapath_load SECONDS [ROUNDS]`

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, setns, CloneFlags, CpuSet};
use nix::unistd::Pid;
use redirect_bpf::common::{action, endpoint_flags, EndpointInfo, DIR_EGRESS, DIR_INGRESS};
use redirect_bpf::common::{MARK_FROM_EGRESS_PROXY, PROTO_TCP};
use redirect_bpf::{Datapath, PolicyEntry};

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// The relay's transparent listener in the node namespace.
const PROXY_PORT: u16 = 15001;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread that joined the network namespace `ns` (and, if given, a CPU).
fn in_ns<T: Send + 'static>(
    ns: &str,
    cpu: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
        if let Some(cpu) = cpu {
            let mut set = CpuSet::new();
            set.set(cpu).expect("cpu");
            // best effort: a machine with one CPU still runs the test
            let _ = sched_setaffinity(Pid::from_raw(0), &set);
        }
        f()
    })
}

struct Pod {
    ns: String,
    ip: Ipv4Addr,
    veth: String,
    identity: u32,
    endpoint_id: u32,
}

/// The namespaces and the bpffs pins of this run; all deleted on drop.
struct Lab {
    node: String,
    pods: Vec<Pod>,
    root: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let node = format!("ward-lt-{pid}-node");
        let mut lab = Lab {
            node: node.clone(),
            pods: Vec::new(),
            root: PathBuf::from(format!("/sys/fs/bpf/ward-loadtest-{pid}")),
        };
        sh(&["ip", "netns", "add", &node]);
        sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ]);
        for i in 1..=2u8 {
            let ns = format!("ward-lt-{pid}-pod{i}");
            sh(&["ip", "netns", "add", &ns]);
            let veth = format!("veth{i}");
            let ip = Ipv4Addr::new(10, 77, i, 2);
            lab.pods.push(Pod {
                ns: ns.clone(),
                ip,
                veth: veth.clone(),
                identity: 1000 * u32::from(i),
                endpoint_id: u32::from(i),
            });
            sh(&[
                "ip", "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            let gw = format!("10.77.{i}.1");
            sh(&[
                "ip",
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                &veth,
            ]);
            sh(&["ip", "-n", &node, "link", "set", &veth, "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "route", "add", "default", "via", &gw]);
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &p.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A child process killed (by its PID) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn entry(endpoint_id: u32, direction: u8, identity: u32, port: u16) -> PolicyEntry {
    PolicyEntry {
        endpoint_id,
        identity,
        direction,
        protocol: PROTO_TCP,
        port,
        port_prefix_len: 16,
        action: action::ALLOW,
        proxy_port: 0,
        cookie: 1,
    }
}

/// Routes packets the datapath marked for the proxy to local sockets, in the node.
fn proxy_routing(node: &str) {
    sh(&[
        "ip",
        "-n",
        node,
        "rule",
        "add",
        "fwmark",
        "0x200/0xf00",
        "lookup",
        "100",
        "pref",
        "90",
    ]);
    sh(&[
        "ip",
        "-n",
        node,
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);
}

/// Copies one direction until EOF, then half-closes the other side.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A transparent relay in the node namespace: each redirected connection is accepted
/// (its local address is the original destination) and relayed to that destination
/// from a socket carrying the egress proxy's mark.
fn relay(node: &str) {
    let listener = in_ns(node, None, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_ip_transparent(true).expect("IP_TRANSPARENT");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PROXY_PORT);
        s.bind(&any.into()).expect("bind");
        s.listen(64).expect("listen");
        TcpListener::from(s)
    })
    .join()
    .expect("listener thread");
    in_ns(node, Some(1), move || {
        for conn in listener.incoming() {
            let Ok(down) = conn else { return };
            let Ok(orig) = down.local_addr() else {
                continue;
            };
            let up = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .and_then(|s| {
                    s.set_mark(MARK_FROM_EGRESS_PROXY)?;
                    s.connect(&orig.into())?;
                    Ok(TcpStream::from(s))
                });
            let Ok(up) = up else { continue };
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            let (Ok(d2), Ok(u2)) = (down.try_clone(), up.try_clone()) else {
                continue;
            };
            thread::spawn(move || pump(down, up));
            thread::spawn(move || pump(u2, d2));
        }
    });
}

/// iperf3, one TCP stream pod1 -> pod2 for `secs`: the receiver's Mbit/s.
fn iperf(lab: &Lab, secs: u64) -> f64 {
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let out = Command::new("ip")
        .args(["netns", "exec", &a.ns, "taskset", "-c", "0", "iperf3", "-c"])
        .arg(b.ip.to_string())
        .args([
            "-p",
            &IPERF_PORT.to_string(),
            "-f",
            "m",
            "-t",
            &secs.to_string(),
        ])
        .output()
        .expect("iperf3 (Debian iperf3)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter(|l| l.contains("receiver"))
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|t| *t == "Mbits/sec")?;
            w.get(i.checked_sub(1)?)?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no receiver line in iperf3's output: {text}"))
}

/// One connection, one byte each way, as many round trips as fit in `secs`.
fn tcp_rr(lab: &Lab, secs: u64) -> f64 {
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let to = SocketAddr::new(IpAddr::V4(b.ip), RR_PORT);
    let client = in_ns(&a.ns, Some(0), move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut byte = [1u8];
        let mut n: u64 = 0;
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        while Instant::now() < end {
            for _ in 0..64 {
                s.write_all(&byte).expect("write");
                s.read_exact(&mut byte).expect("read");
            }
            n += 64;
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    client.join().expect("client thread")
}

/// The TCP_RR server in pod2: echoes each byte, one connection after the other.
fn rr_server(lab: &Lab, stop: Arc<AtomicBool>) {
    let ip = lab.pods[1].ip;
    let listener = in_ns(&lab.pods[1].ns, Some(1), move || {
        TcpListener::bind((ip, RR_PORT)).expect("bind")
    })
    .join()
    .expect("bind thread");
    let ns = lab.pods[1].ns.clone();
    in_ns(&ns, Some(1), move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_nodelay(true);
            let mut byte = [0u8];
            while conn.read_exact(&mut byte).is_ok() {
                if conn.write_all(&byte).is_err() {
                    break;
                }
            }
        }
    });
}

fn wait_listening(ns: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()
            .expect("ss");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} in {ns}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn measure(lab: &Lab, name: &str, secs: u64) {
    let mbps = iperf(lab, secs);
    let rr = tcp_rr(lab, secs);
    println!("RESULT {name} {mbps:.0} {rr:.0}");
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rounds: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the datapath load test needs root (network namespaces, BPF)"
    );
    assert!(
        redirect_bpf::loader::object_embedded(),
        "no eBPF object embedded: run `cargo xtask build-ebpf` first"
    );
    let lab = Lab::new();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let _iperf = Proc(
        Command::new("ip")
            .args([
                "netns", "exec", &b.ns, "taskset", "-c", "1", "iperf3", "-s", "-B",
            ])
            .arg(b.ip.to_string())
            .args(["-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 server"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    rr_server(&lab, stop.clone());
    wait_listening(&b.ns, IPERF_PORT);

    let root = lab.root.clone();
    let mut dp = in_ns(&lab.node, None, move || {
        Datapath::load(&root).expect("load the datapath")
    })
    .join()
    .expect("load thread");
    for p in &lab.pods {
        dp.set_ipcache(ipnet::IpNet::from(IpAddr::V4(p.ip)), p.identity)
            .expect("ipcache");
        let info = EndpointInfo {
            endpoint_id: p.endpoint_id,
            identity: p.identity,
            ifindex: 0,
            flags: endpoint_flags::DEFAULT_DENY_INGRESS | endpoint_flags::DEFAULT_DENY_EGRESS,
        };
        dp.set_endpoint(IpAddr::V4(p.ip), info).expect("endpoint");
    }
    let mut allow = Vec::new();
    for port in [IPERF_PORT, RR_PORT] {
        allow.push(entry(a.endpoint_id, DIR_EGRESS, b.identity, port));
        allow.push(entry(b.endpoint_id, DIR_INGRESS, a.identity, port));
    }
    dp.insert_policy(&allow).expect("policy");
    let mut more = Vec::new();
    for i in 0..500u16 {
        let identity = 50_000 + u32::from(i);
        more.push(entry(a.endpoint_id, DIR_EGRESS, identity, 10_000 + i));
        more.push(entry(b.endpoint_id, DIR_INGRESS, identity, 10_000 + i));
    }
    // pod1's egress to the test ports through the relay instead
    let mut redirect: Vec<PolicyEntry> = allow
        .iter()
        .filter(|e| e.direction == DIR_EGRESS)
        .copied()
        .collect();
    for e in &mut redirect {
        e.action = action::REDIRECT;
        e.proxy_port = PROXY_PORT;
    }
    let allow_egress: Vec<PolicyEntry> = allow
        .iter()
        .filter(|e| e.direction == DIR_EGRESS)
        .copied()
        .collect();
    proxy_routing(&lab.node);
    relay(&lab.node);
    let veths: Vec<String> = lab.pods.iter().map(|p| p.veth.clone()).collect();
    for _ in 0..rounds {
        measure(&lab, "none", secs);
        let v = veths.clone();
        dp = in_ns(&lab.node, None, move || {
            for v in &v {
                dp.attach(v).expect("attach");
            }
            dp
        })
        .join()
        .expect("attach thread");
        measure(&lab, "allow", secs);
        dp.insert_policy(&more).expect("policy");
        measure(&lab, "allow+1k", secs);
        dp.remove_policy(&more).expect("policy");
        dp.update_policy(&allow_egress, &redirect).expect("policy");
        measure(&lab, "redirect", secs);
        dp.update_policy(&redirect, &allow_egress).expect("policy");
        let v = veths.clone();
        dp = in_ns(&lab.node, None, move || {
            for v in &v {
                dp.detach(v).expect("detach");
            }
            dp
        })
        .join()
        .expect("detach thread");
    }
    stop.store(true, Ordering::Relaxed);
}
