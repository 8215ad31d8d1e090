//! Datapath load test, driven by `cargo xtask loadtest datapath` (root needed).
//!
//! Two pod namespaces joined through a node namespace by veths (10.77.{1,2}.0/24, nothing
//! routes out of them, names carry the PID and are deleted on exit, also on panic).
//!
//! First, what the programs cost: `BPF_PROG_TEST_RUN` of the loaded `ward_from_pod` and
//! `ward_to_pod` on the frames of a TCP_RR request and response (conntrack hits) and on
//! new flows' SYNs, with the maps of `allow` and of `allow+1k`, and of an empty program
//! as the floor: `PROG <scenario> <case> <median ns> <least ns>`.
//!
//! Then, by wall clock, the scenarios:
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
//! is in Debian's non-free section, so this is written here): `RESULT <round> <scenario>
//! <iperf3 Mbit/s> <transactions/s>`, and for the scenarios with programs how often each
//! ran per transaction, from the veths' packet counters: `HOOKS <round> <scenario>
//! <ward_from_pod runs> <ward_to_pod runs>`. ROUNDS rounds (0: the test runs only), the
//! order of the scenarios rotated each round (programs attached and entries written
//! before a scenario, removed after), so that the machine's drift touches all alike and
//! each round has its own `none` to compare with.
//!
//! Usage: `datapath_load SECONDS [ROUNDS]`

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use redirect_bpf::common::{action, endpoint_flags, EndpointInfo, DIR_EGRESS, DIR_INGRESS};
use redirect_bpf::common::{program_names, MARK_FROM_EGRESS_PROXY, PROTO_TCP};
use redirect_bpf::{Datapath, PolicyEntry};
use testkit::{link_pod, Netns, Poll, Subnet};

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// The relay's transparent listener in the node namespace.
const PROXY_PORT: u16 = 15001;

/// Runs `f` on a thread that joined the network namespace `ns` (and, if given, a CPU).
fn in_ns<T: Send + 'static>(
    ns: &str,
    cpu: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    testkit::spawn_in(ns, move || {
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
    /// The node's and the pods' namespaces, deleted with the lab.
    namespaces: Vec<Netns>,
}

impl Lab {
    fn new() -> Lab {
        let base = testkit::unique("ward-lt");
        let node = Netns::new(format!("{base}-node")).expect("node namespace");
        node.sysctl(&["net.ipv4.ip_forward=1"]).expect("forwarding");
        let mut lab = Lab {
            node: node.name().to_string(),
            pods: Vec::new(),
            root: PathBuf::from(format!("/sys/fs/bpf/{}", testkit::unique("ward-loadtest"))),
            namespaces: vec![node],
        };
        for i in 1..=2u8 {
            let pod = Netns::new(format!("{base}-pod{i}")).expect("pod namespace");
            let veth = format!("veth{i}");
            let ip = Ipv4Addr::new(10, 77, i, 2);
            let subnet = Subnet {
                ip: ip.into(),
                gateway: Ipv4Addr::new(10, 77, i, 1).into(),
                prefix: 24,
            };
            link_pod(&lab.node, &veth, pod.name(), &[subnet]).expect("pod link");
            lab.pods.push(Pod {
                ns: pod.name().to_string(),
                ip,
                veth,
                identity: 1000 * u32::from(i),
                endpoint_id: u32::from(i),
            });
            lab.namespaces.push(pod);
        }
        lab
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
        peer: identity,
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
    testkit::local_delivery(node, false, "0x200/0xf00", 100, 90).expect("proxy routing");
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
        s.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
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
    let out = testkit::ip_netns_exec(&a.ns, "taskset")
        .args(["-c", "0", "iperf3", "-c"])
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

/// One connection, one byte each way, as many round trips as fit in `secs`: (round
/// trips, round trips per second).
fn tcp_rr(lab: &Lab, secs: u64) -> (u64, f64) {
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
        (n, n as f64 / start.elapsed().as_secs_f64())
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
    Poll::within(Duration::from_secs(10)).expect(&format!("a listener on {port} in {ns}"), || {
        let out = testkit::ip_netns_exec(ns, "ss")
            .arg("-Hltn")
            .arg(format!("sport = :{port}"))
            .output()
            .expect("ss");
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
}

/// Packets the node saw on the pod veths: [veth1 rx, veth2 rx, veth1 tx, veth2 tx]. A
/// host-side veth's rx is its tc ingress (`ward_from_pod`), its tx its tc egress
/// (`ward_to_pod`).
fn veth_packets(lab: &Lab) -> [u64; 4] {
    let mut files = Vec::new();
    for dir in ["rx", "tx"] {
        for p in &lab.pods {
            files.push(format!(
                "/sys/class/net/{}/statistics/{dir}_packets",
                p.veth
            ));
        }
    }
    // `ip netns exec` mounts the namespace's own sysfs.
    let out = testkit::ip_netns_exec(&lab.node, "cat")
        .args(&files)
        .output()
        .expect("cat the veth counters");
    let text = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = text
        .lines()
        .map(|l| l.trim().parse().expect("counter"))
        .collect();
    n.try_into().expect("four counters")
}

/// Measures one scenario of one round: `RESULT <round> <scenario> <Mbit/s> <trans/s>`,
/// and for the scenarios with programs, how many times each program ran per TCP_RR
/// transaction: `HOOKS <round> <scenario> <ward_from_pod runs> <ward_to_pod runs>`.
fn measure(lab: &Lab, round: u32, name: &str, secs: u64) {
    let mbps = iperf(lab, secs);
    let before = veth_packets(lab);
    let (n, rr) = tcp_rr(lab, secs);
    let after = veth_packets(lab);
    println!("RESULT {round} {name} {mbps:.0} {rr:.0}");
    if name != "none" && n > 0 {
        let d: Vec<f64> = (0..4).map(|i| (after[i] - before[i]) as f64).collect();
        let per = |x: f64| x / n as f64;
        println!(
            "HOOKS {round} {name} {:.3} {:.3}",
            per(d[0] + d[1]),
            per(d[2] + d[3])
        );
    }
}

/// `BPF_PROG_TEST_RUN`'s member of `union bpf_attr` (`test`, linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `BPF_PROG_LOAD`'s member of `union bpf_attr`, up to the fields set here.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

const BPF_PROG_LOAD: nix::libc::c_long = 5;
const BPF_PROG_TEST_RUN: nix::libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// Runs a program `repeat` times on `packet` (an Ethernet frame) in the calling thread's
/// network namespace: (its return value, the kernel's mean ns per run). The kernel times
/// only the runs and stops its clock while the thread is rescheduled, so a loaded machine
/// moves this far less than a wall-clock rate.
#[allow(unsafe_code)] // the bpf(2) system call on a program fd of the loaded datapath
fn test_run(fd: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> (u32, u32) {
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(fd.as_raw_fd()).expect("fd"),
        data_size_in: u32::try_from(packet.len()).expect("packet size"),
        data_in: packet.as_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is the `test` member of bpf_attr (the size passed is its own); it
    // lives across the call and the kernel writes only into it. `data_in` points to
    // `packet.len()` readable bytes that outlive the call; `data_out`, `ctx_in` and
    // `ctx_out` are null, so the kernel reads and writes no other memory of ours.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    assert_eq!(
        r,
        0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    (attr.retval, attr.duration)
}

/// A TC program that only returns TC_ACT_OK: the floor of `test_run`'s own cost.
#[allow(unsafe_code)] // the bpf(2) system call and the fd it returns
fn empty_program() -> OwnedFd {
    // r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = b"GPL\0";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `attr` is a prefix of bpf_attr's `BPF_PROG_LOAD` member (its size passed);
    // `insns` and `license` point to live arrays of the sizes given; no log buffer.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new file descriptor the kernel just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

const TCP_ACK_PSH: u8 = 0x18;
const TCP_SYN: u8 = 0x02;

/// An Ethernet + IPv4 + TCP frame with `payload` bytes (checksums zero: the programs do
/// not check them).
fn tcp_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total = u16::try_from(40 + payload).expect("size");
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.resize(54 + payload, b'x');
    f
}

/// The mean ns per run of 200,000 runs, five times: (median, least); asserts the
/// verdict.
fn ns_per_run(fd: BorrowedFd<'_>, packet: &[u8], what: &str) -> (u32, u32) {
    let mut v: Vec<u32> = (0..5)
        .map(|_| {
            let (ret, ns) = test_run(fd, packet, 200_000);
            assert_eq!(ret, 0, "{what}: not TC_ACT_OK");
            ns
        })
        .collect();
    v.sort_unstable();
    (v[2], v[0])
}

/// What the programs cost per run, by `BPF_PROG_TEST_RUN` on the loaded programs with the
/// maps as the scenario left them, in the node namespace (where the programs run, so the
/// socket lookups search the sockets they search): one `PROG <scenario> <case> <median
/// ns> <least ns>` line per case. The request is pod1:40000 -> pod2:RR_PORT with one byte, the response its
/// reverse; the connection is opened by a SYN through `ward_from_pod` first, so both are
/// conntrack hits (the request on its own key, the response on the reverse one). A new
/// flow is a SYN from a port not seen before, one run each (its first run creates the
/// conntrack entry), the median of 2,000.
fn measure_programs(lab: &Lab, dp: &Datapath, scenario: &str) {
    let from_pod = dp
        .program_fd(program_names::FROM_POD)
        .expect("fd")
        .try_clone_to_owned()
        .expect("dup");
    let to_pod = dp
        .program_fd(program_names::TO_POD)
        .expect("fd")
        .try_clone_to_owned()
        .expect("dup");
    let (a, b) = (lab.pods[0].ip, lab.pods[1].ip);
    let scenario = scenario.to_string();
    in_ns(&lab.node, Some(0), move || {
        let empty = empty_program();
        let request = tcp_frame(a, b, 40_000, RR_PORT, TCP_ACK_PSH, 1);
        let response = tcp_frame(b, a, RR_PORT, 40_000, TCP_ACK_PSH, 1);
        let syn = tcp_frame(a, b, 40_000, RR_PORT, TCP_SYN, 0);
        assert_eq!(
            test_run(from_pod.as_fd(), &syn, 1).0,
            0,
            "the SYN is allowed"
        );
        let cases = [
            ("empty_program", empty.as_fd(), &request),
            ("request_from_pod", from_pod.as_fd(), &request),
            ("request_to_pod", to_pod.as_fd(), &request),
            ("response_from_pod", from_pod.as_fd(), &response),
            ("response_to_pod", to_pod.as_fd(), &response),
        ];
        for (case, fd, packet) in cases {
            let (median, least) = ns_per_run(fd, packet, case);
            println!("PROG {scenario} {case} {median} {least}");
        }
        let mut v: Vec<u32> = (0..2000u16)
            .map(|i| {
                let syn = tcp_frame(a, b, 20_000 + i, RR_PORT, TCP_SYN, 0);
                let (ret, ns) = test_run(from_pod.as_fd(), &syn, 1);
                assert_eq!(ret, 0, "a new flow's SYN is allowed");
                ns
            })
            .collect();
        v.sort_unstable();
        println!(
            "PROG {scenario} new_flow_from_pod {} {}",
            v[v.len() / 2],
            v[0]
        );
    })
    .join()
    .expect("test run thread");
}

/// The scenarios, in the order of the first round; later rounds rotate it.
const SCENARIOS: [&str; 4] = ["none", "allow", "allow+1k", "redirect"];

/// The policy states the scenarios switch between.
struct States {
    veths: Vec<String>,
    more: Vec<PolicyEntry>,
    allow_egress: Vec<PolicyEntry>,
    redirect: Vec<PolicyEntry>,
}

/// Runs `f` on the datapath in the node namespace (attach and detach look interfaces up
/// there).
fn in_node(
    lab: &Lab,
    mut dp: Datapath,
    f: impl FnOnce(&mut Datapath) + Send + 'static,
) -> Datapath {
    in_ns(&lab.node, None, move || {
        f(&mut dp);
        dp
    })
    .join()
    .expect("node thread")
}

/// From the base state (programs detached, the allow entries only) into `scenario`.
fn enter(lab: &Lab, mut dp: Datapath, st: &States, scenario: &str) -> Datapath {
    if scenario == "none" {
        return dp;
    }
    let v = st.veths.clone();
    dp = in_node(lab, dp, move |dp| {
        for v in &v {
            dp.attach(v).expect("attach");
        }
    });
    match scenario {
        "allow+1k" => dp.insert_policy(&st.more).expect("policy"),
        "redirect" => dp
            .update_policy(&st.allow_egress, &st.redirect)
            .expect("policy"),
        _ => {}
    }
    dp
}

/// Back from `scenario` to the base state.
fn leave(lab: &Lab, mut dp: Datapath, st: &States, scenario: &str) -> Datapath {
    if scenario == "none" {
        return dp;
    }
    match scenario {
        "allow+1k" => dp.remove_policy(&st.more).expect("policy"),
        "redirect" => dp
            .update_policy(&st.redirect, &st.allow_egress)
            .expect("policy"),
        _ => {}
    }
    let v = st.veths.clone();
    in_node(lab, dp, move |dp| {
        for v in &v {
            dp.detach(v).expect("detach");
        }
    })
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
        testkit::ip_netns_exec(&b.ns, "taskset")
            .args(["-c", "1", "iperf3", "-s", "-B"])
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
        let started = Instant::now();
        let dp = Datapath::load(&root).expect("load the datapath");
        eprintln!("datapath loaded (and verified) in {:?}", started.elapsed());
        dp
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
    let st = States {
        veths: lab.pods.iter().map(|p| p.veth.clone()).collect(),
        more,
        allow_egress,
        redirect,
    };

    // The programs' own cost first: noise-robust, and the rounds then run on a conntrack
    // that holds these flows too (about 4,000 idle entries of 262,144).
    measure_programs(&lab, &dp, "allow");
    dp.insert_policy(&st.more).expect("policy");
    measure_programs(&lab, &dp, "allow+1k");
    dp.remove_policy(&st.more).expect("policy");

    // Many short rounds, the order rotated each round, so that the machine's drift
    // touches every scenario alike and each round has its own `none` to compare with.
    for round in 0..rounds {
        for k in 0..SCENARIOS.len() {
            let scenario = SCENARIOS[(k + round as usize) % SCENARIOS.len()];
            dp = enter(&lab, dp, &st, scenario);
            measure(&lab, round, scenario, secs);
            dp = leave(&lab, dp, &st, scenario);
        }
    }
    stop.store(true, Ordering::Relaxed);
}
