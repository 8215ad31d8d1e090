//! `ward agent` end to end, on the real kernel datapath (root): a node namespace with
//! three dual-stack pod namespaces joined by veths (a /32 and a /128 route per pod, as a
//! CNI installs), a world namespace behind the node's uplink for outside addresses (IPv4
//! and IPv6), and the real `ward` binary running in the node namespace on a temporary
//! source directory.
//!
//! The agent runs with a `PATH` that holds no `ip` (an empty directory): it reaches the
//! kernel through netlink only. The tests' own set-up uses `ip`.
//!
//! Names carry the test name and the PID; Drop kills what the test started (by PID),
//! deletes the namespaces and the test's bpffs root.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use testkit::{link_pod, run_in as in_ns, Netns, Poll, Subnet};

#[path = "agent_netns/restart.rs"]
mod restart;

const CLIENT: &str = "10.80.1.2";
const SERVER: &str = "10.80.2.2";
const DNS: &str = "10.80.3.2";
const OUTSIDE: &str = "203.0.113.10";
const CLIENT6: &str = "fd00:80:1::2";
const SERVER6: &str = "fd00:80:2::2";
const DNS6: &str = "fd00:80:3::2";
const OUTSIDE6: &str = "2001:db8::10";

/// `ip:port`, bracketed for IPv6.
fn sockaddr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("an IP address"), port)
}

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

fn output(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Where `ip` is for the test's own use (the agent's `PATH` has none).
fn ip_binary() -> PathBuf {
    binary("ip").expect("ip (iproute2) on the test's PATH")
}

/// Where program `name` is on the test's `PATH`.
fn binary(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The soft and hard open files limits of process `pid` (`/proc/PID/limits`).
fn open_files_limits(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Waits for `cond` with a deadline; returns how long it took.
fn wait_for(what: &str, deadline: Duration, cond: impl FnMut() -> bool) -> Duration {
    Poll::within(deadline)
        .every(Duration::from_millis(2))
        .expect(what, cond)
}

struct Lab {
    name: String,
    node: String,
    pods: Vec<String>,
    world: String,
    root: PathBuf,
    dir: PathBuf,
    agent: Option<Child>,
    children: Vec<Child>,
    stop: Arc<AtomicBool>,
    servers: Vec<thread::JoinHandle<()>>,
    /// More arguments for `ward agent`.
    agent_args: Vec<String>,
    /// `prlimit --nofile=` for `ward agent` (SOFT:HARD), when set.
    open_files: Option<&'static str>,
    /// The namespaces (node, pods, world), deleted with the lab.
    namespaces: Vec<Netns>,
    /// When the last `add_pod` added the pod's /32 route.
    route_added: Option<Instant>,
}

const CLUSTER: &str = r#"
namespaces: [{name: app}]
nodes: [{name: n1, ip: 203.0.113.1}]
pods:
- {namespace: app, name: client, ip: 10.80.1.2, ips: [fd00:80:1::2], node: n1, labels: {app: client}}
- {namespace: app, name: server, ip: 10.80.2.2, ips: [fd00:80:2::2], node: n1, labels: {app: server}}
- {namespace: app, name: dns, ip: 10.80.3.2, ips: [fd00:80:3::2], node: n1, labels: {app: dns}}
"#;

/// Server ingress: TCP 8080 (and optionally 8081) from the client; HTTP on 80 with
/// `GET /v1/.*` only.
fn server_policy(allow_8081: bool) -> String {
    let extra = if allow_8081 {
        "\n      - {port: \"8081\", protocol: TCP}"
    } else {
        ""
    };
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: server-ingress, namespace: app}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports:
      - {{port: "8080", protocol: TCP}}{extra}
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http: [{{method: GET, path: "/v1/.*"}}]
"#
    )
}

const CLIENT_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*"}]
  - toFQDNs: [{matchName: ext.example.com}]
    toPorts:
    - ports: [{port: "8443", protocol: TCP}]
  - toEndpoints: [{matchLabels: {app: server}}]
  - toCIDR: [203.0.113.0/24]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/ok"}]
"#;

impl Lab {
    fn new(test: &str) -> Lab {
        testkit::require_root("agent netns tests", "namespaces, BPF");
        let name = testkit::unique(&format!("wa-{test}"));
        let dir = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("src")).unwrap();
        fs::create_dir_all(dir.join("state")).unwrap();
        let node = Netns::new(format!("{name}-node")).unwrap();
        // Forwarding for both families. No DAD on the node's fresh veths: neighbour
        // solicitations for a pod need a usable link-local source address, and a tentative
        // one would hold the first IPv6 packet to a pod for a second (as no CNI's
        // long-lived veth does).
        node.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.accept_dad=0",
        ])
        .unwrap();
        let mut lab = Lab {
            node: node.name().to_string(),
            world: format!("{name}-world"),
            pods: Vec::new(),
            root: PathBuf::from(format!(
                "/sys/fs/bpf/{}",
                testkit::unique(&format!("ward-test-{test}"))
            )),
            dir,
            name,
            agent: None,
            children: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            agent_args: Vec::new(),
            open_files: None,
            namespaces: vec![node],
            route_added: None,
        };
        for i in 1..=3u8 {
            lab.add_pod(i);
        }
        // The outside world behind the uplink, with routes back to the pods.
        let world = Netns::new(lab.world.clone()).unwrap();
        let node = lab.node.clone();
        testkit::veth(&node, "up0", world.name(), "eth0").unwrap();
        for a in ["203.0.113.1/24", "2001:db8::1/64"] {
            testkit::addr(&node, "up0", a).unwrap();
        }
        testkit::ip(&node, &["link", "set", "up0", "up"]).unwrap();
        for a in [format!("{OUTSIDE6}/64"), format!("{OUTSIDE}/24")] {
            world.addr("eth0", &a).unwrap();
        }
        world.ip(&["link", "set", "eth0", "up"]).unwrap();
        world
            .ip(&["route", "add", "10.80.0.0/16", "via", "203.0.113.1"])
            .unwrap();
        world
            .ip(&["route", "add", "fd00:80::/32", "via", "2001:db8::1"])
            .unwrap();
        let world = {
            let name = world.name().to_string();
            lab.namespaces.push(world);
            name
        };

        lab.write("cluster.yaml", CLUSTER);
        lab.write("server.yaml", &server_policy(false));
        lab.write("client.yaml", CLIENT_POLICY);

        // Servers: the server pod on 80, 8080, 8081; the outside host on 8443.
        let server_ns = lab.pods[1].clone();
        for port in [80, 8080, 8081] {
            lab.serve(&server_ns, SERVER, port);
        }
        lab.serve(&server_ns, SERVER6, 80);
        for ip in [OUTSIDE, OUTSIDE6] {
            lab.serve(&world, ip, 8443);
            lab.serve(&world, ip, 8080);
        }
        // The DNS pod: dnsmasq answering ext.example.com with the outside address.
        let dns = testkit::ip_netns_exec(&lab.pods[2], "dnsmasq")
            .arg("-k")
            .args([
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=10.80.3.2",
                "--listen-address=fd00:80:3::2",
                "--address=/ext.example.com/203.0.113.10",
                "--address=/ext6.example.com/2001:db8::10",
                "--user=root",
            ])
            .arg(format!("--pid-file={}/dnsmasq.pid", lab.dir.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base)");
        lab.children.push(dns);
        let dns_ns = lab.pods[2].clone();
        wait_for("dnsmasq listening", Duration::from_secs(10), || {
            let (_, out) = output(&["ip", "netns", "exec", &dns_ns, "ss", "-Hlun", "sport = :53"]);
            out.contains("10.80.3.2") && out.contains(DNS6)
        });
        lab
    }

    /// A pod namespace `pod{i}` with 10.80.{i}.2 and fd00:80:{i}::2, its veth `lxc{i}`
    /// and /32 and /128 routes (the node side has 10.80.{i}.1 and fd00:80:{i}::1, the
    /// pod's gateways).
    fn add_pod(&mut self, i: u8) {
        let pod = Netns::new(format!("{}-pod{i}", self.name)).unwrap();
        let subnets = [
            Subnet {
                ip: format!("10.80.{i}.2").parse().unwrap(),
                gateway: format!("10.80.{i}.1").parse().unwrap(),
                prefix: 32,
            },
            Subnet {
                ip: format!("fd00:80:{i}::2").parse().unwrap(),
                gateway: format!("fd00:80:{i}::1").parse().unwrap(),
                prefix: 128,
            },
        ];
        let routed = link_pod(&self.node, &format!("lxc{i}"), pod.name(), &subnets).unwrap();
        self.route_added = routed;
        self.pods.push(pod.name().to_string());
        self.namespaces.push(pod);
    }

    fn write(&self, file: &str, text: &str) {
        // Atomic: the agent never reads half a file.
        let tmp = self.dir.join("src").join(format!(".{file}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.dir.join("src").join(file)).unwrap();
    }

    /// A TCP server in `ns`: HTTP requests get `peer=IP path=PATH`, anything else is
    /// echoed.
    fn serve(&mut self, ns: &str, ip: &str, port: u16) {
        let addr = sockaddr(ip, port);
        let l = in_ns(ns, || TcpListener::bind(addr).expect("bind"));
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.servers.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, peer)) => {
                        thread::spawn(move || handle(s, peer));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    fn start_agent(&mut self) {
        self.start_agent_in(false);
    }

    /// Starts the agent in the node namespace: through `--netns`, or as the lab does,
    /// under `ip netns exec`.
    fn start_agent_in(&mut self, ip_netns_exec: bool) {
        let child = self.spawn_agent(ip_netns_exec, "agent.log");
        self.agent = Some(child);
        let node = self.node.clone();
        let log = self.dir.join("agent.log");
        let start = Instant::now();
        while admin_get(&node, "/readyz").0 != 200 {
            if let Some(c) = self.agent.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "ward agent exited ({status}):\n{}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent not ready within 30 s:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `ward agent` in the node namespace, its log in the lab's directory as `log`.
    fn spawn_agent(&self, ip_netns_exec: bool, log: &str) -> Child {
        let bin = env!("CARGO_BIN_EXE_ward");
        let log = File::create(self.dir.join(log)).unwrap();
        // The agent's PATH: an empty directory, so that any `ip` it ran would fail.
        let path = self.dir.join("no-ip");
        fs::create_dir_all(&path).unwrap();
        let mut cmd = match (ip_netns_exec, self.open_files) {
            (true, _) => {
                let mut c = Command::new(ip_binary());
                c.args(["netns", "exec", &self.node, bin, "agent"]);
                c
            }
            // prlimit sets the limits and execs the agent (the same PID).
            (false, Some(limits)) => {
                let mut c = Command::new(binary("prlimit").expect("prlimit (util-linux)"));
                c.arg(format!("--nofile={limits}"))
                    .args([bin, "agent", "--netns", &self.node]);
                c
            }
            (false, None) => {
                let mut c = Command::new(bin);
                c.args(["agent", "--netns", &self.node]);
                c
            }
        };
        cmd.env("PATH", &path)
            .args(["--node", "n1"])
            .arg("--source-dir")
            .arg(self.dir.join("src"))
            .arg("--bpf-root")
            .arg(&self.root)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--uplink", "up0"])
            .arg("--audit-log")
            .arg(self.dir.join("audit.log"))
            .args(
                // the loopback address unless the test binds another
                (!self.agent_args.iter().any(|a| a == "--admin"))
                    .then_some(["--admin", "127.0.0.1:9890"])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.agent_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ward agent")
    }

    fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn admin(&self, path: &str) -> (u16, String) {
        admin_get(&self.node, path)
    }

    fn client(&self) -> &str {
        &self.pods[0]
    }

    /// A TCP connect from the client pod, with a timeout.
    fn connects(&self, dst: &str, port: u16, timeout: Duration) -> bool {
        let addr = sockaddr(dst, port);
        in_ns(self.client(), || {
            TcpStream::connect_timeout(&addr, timeout).is_ok()
        })
    }

    fn curl(&self, url: &str) -> (String, String) {
        let (_, out) = output(&[
            "ip",
            "netns",
            "exec",
            self.client(),
            "curl",
            "-s",
            "-g",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            url,
        ]);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        (code.to_string(), body.to_string())
    }

    fn dig(&self, name: &str) -> String {
        let (_, out) = output(&[
            "ip",
            "netns",
            "exec",
            self.client(),
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            &format!("@{DNS}"),
            name,
        ]);
        out.trim().to_string()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

fn handle(mut s: TcpStream, peer: SocketAddr) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 4096];
    let Ok(n) = s.read(&mut buf) else { return };
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    if head.starts_with("GET ") || head.starts_with("POST ") {
        let path = head.split_whitespace().nth(1).unwrap_or("");
        let body = format!("peer={} path={path}\n", peer.ip());
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    if s.write_all(&buf[..n]).is_err() {
        return;
    }
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// One DNS A query for `name` to the DNS pod, sent from a thread in `ns`: the address
/// of the answer, if one came within `timeout`.
fn dns_a(ns: &str, name: &str, timeout: Duration) -> Option<String> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).ok()?);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    in_ns(ns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        s.send_to(&q, format!("{DNS}:53")).ok()?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).ok()?;
        let r = &buf[..n];
        // same id, no error, at least one answer; a lone A answer ends with its address
        if r.len() < 16 || r[0..2] != [0x12, 0x34] || r[3] & 0x0f != 0 || r[7] == 0 {
            return None;
        }
        let a = &r[n - 4..];
        Some(format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]))
    })
}

/// GET on the agent's admin endpoint, from inside the node namespace.
fn admin_get(node: &str, path: &str) -> (u16, String) {
    admin_get_with(node, path, "")
}

/// GET on the agent's admin endpoint with extra header lines (each ending in CRLF).
fn admin_get_with(node: &str, path: &str, headers: &str) -> (u16, String) {
    in_ns(node, || {
        let Ok(mut s) = TcpStream::connect_timeout(
            &"127.0.0.1:9890".parse().unwrap(),
            Duration::from_millis(500),
        ) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n{headers}\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_agent();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        // the last made first: the world and the pods, then the node
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
        let _ = fs::remove_dir_all(&self.root);
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
            // the logs of the agents that took over (`planned_restart`)
            let mut more: Vec<PathBuf> = fs::read_dir(&self.dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
                })
                .collect();
            more.sort();
            for p in more {
                let text = fs::read_to_string(&p).unwrap_or_default();
                eprintln!("{}:\n{text}", p.display());
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const ALLOWED: Duration = Duration::from_secs(3);
const DENIED: Duration = Duration::from_millis(1500);

#[test]
fn l3_l4_l7_and_an_invalid_policy() {
    let mut lab = Lab::new("l7");
    lab.start_agent();
    // the agent runs itself again with its allocator returning freed pages at once (the
    // same process: the PID this test started)
    let pid = lab.agent.as_ref().unwrap().id();
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    for option in ["MIMALLOC_PURGE_DELAY=0", "MIMALLOC_ALLOW_THP=0"] {
        assert!(
            environ.split(|b| *b == 0).any(|v| v == option.as_bytes()),
            "{option} in the agent's environment"
        );
    }

    // L3/L4
    assert!(lab.connects(SERVER, 8080, ALLOWED), "8080 is allowed");
    assert!(!lab.connects(SERVER, 8081, DENIED), "8081 is denied");
    // replies pass: an echo round trip
    in_ns(lab.client(), || {
        let mut s = TcpStream::connect_timeout(&format!("{SERVER}:8080").parse().unwrap(), ALLOWED)
            .unwrap();
        s.set_read_timeout(Some(ALLOWED)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
    });

    // L7 through the node proxy, with the client's own source address upstream
    let (code, body) = lab.curl(&format!("http://{SERVER}/v1/x"));
    assert_eq!(code, "200", "{body}\n{}", lab.log());
    assert!(
        body.contains(&format!("peer={CLIENT} ")),
        "transparent source: {body}"
    );
    let (code, body) = lab.curl(&format!("http://{SERVER}/admin"));
    assert_eq!(code, "403");
    assert_eq!(body, "Access denied\r\n");
    // Egress L7 to the outside: the replies come back through the uplink to the proxy's
    // transparent upstream socket.
    let (code, body) = lab.curl(&format!("http://{OUTSIDE}:8080/ok"));
    assert_eq!(code, "200", "{body}\n{}", lab.log());
    assert!(
        body.contains(&format!("peer={CLIENT} ")),
        "transparent source: {body}"
    );
    let (code, _) = lab.curl(&format!("http://{OUTSIDE}:8080/no"));
    assert_eq!(code, "403");

    // the admin endpoint explains
    let (code, eps) = lab.admin("/v1/endpoints");
    assert_eq!(code, 200);
    let eps: serde_json::Value = serde_json::from_str(&eps).unwrap();
    assert_eq!(eps.as_array().unwrap().len(), 3, "{eps}");
    assert!(
        eps.as_array()
            .unwrap()
            .iter()
            .all(|e| e["attached"] == true),
        "{eps}"
    );
    let (code, pol) = lab.admin("/v1/policy/app/server");
    assert_eq!(code, 200);
    assert!(
        pol.contains("server-ingress") && pol.contains("/v1/.*"),
        "{pol}"
    );
    let (_, metrics) = lab.admin("/metrics");
    for m in [
        "ward_agent_ready 1",
        "ward_endpoints 3",
        "ward_policies_invalid 0",
        "ward_policy_drops_total{reason=\"policy_default_deny\"}",
        "ward_proxy_requests_total",
        "ward_dns_cache_names",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    // the audit log has both requests
    let audit = lab.dir.join("audit.log");
    wait_for("audit records", Duration::from_secs(5), || {
        fs::read_to_string(&audit).is_ok_and(|a| a.contains("/admin") && a.contains("/v1/x"))
    });

    // An invalid new version: rejected with object and field; the old one stays.
    let bad = server_policy(true).replace("\"8081\"", "\"99999\"");
    lab.write("server.yaml", &bad);
    wait_for("the rejection", Duration::from_secs(5), || {
        let (_, status) = lab.admin("/v1/status");
        serde_json::from_str::<serde_json::Value>(&status)
            .is_ok_and(|v| v["errors"].as_array().is_some_and(|e| !e.is_empty()))
    });
    let (_, status) = lab.admin("/v1/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let err = status["errors"][0].as_str().unwrap();
    assert!(err.contains("server-ingress"), "{err}");
    assert!(
        err.contains("spec.ingress[0].toPorts[0].ports[1].port"),
        "{err}"
    );
    assert!(lab.admin("/metrics").1.contains("ward_policies_invalid 1"));
    assert!(
        lab.connects(SERVER, 8080, ALLOWED),
        "old version still allows 8080"
    );
    assert!(
        !lab.connects(SERVER, 8081, DENIED),
        "old version still denies 8081"
    );
}

#[test]
fn dns_teaches_to_fqdns() {
    let mut lab = Lab::new("fqdn");
    // A soft limit of open files below the DNS proxy's 1,024 queries in hand: the agent
    // raises it to the hard one at start, and says so.
    lab.open_files = Some("512:8192");
    lab.start_agent();
    let pid = lab.agent.as_ref().unwrap().id();
    assert_eq!(open_files_limits(pid), Some((8192, 8192)));
    let log = fs::read_to_string(lab.dir.join("agent.log")).unwrap();
    assert!(
        log.contains("open files limit raised to the hard limit")
            && log.contains("from=512")
            && log.contains("to=8192"),
        "{log}"
    );
    learns_ext_over_udp_and_tcp(&lab);
    let (_, fqdn) = lab.admin("/v1/fqdn");
    let v: serde_json::Value = serde_json::from_str(&fqdn).unwrap();
    assert_eq!(v["app/client"]["ext.example.com."][0], OUTSIDE, "{fqdn}");
    // the query was audited and is in the event stream
    let (_, events) = lab.admin("/v1/events?follow=false");
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"type\":\"dns\"") && l.contains("ext.example.com")),
        "{events}"
    );
    assert!(
        events.lines().any(|l| l.contains("\"type\":\"drop\"")),
        "the denied connect is a drop event: {events}"
    );

    // ward status and ward observe read the same endpoint
    let bin = env!("CARGO_BIN_EXE_ward");
    let (ok, out) = output(&[bin, "status", "--netns", &lab.node]);
    assert!(ok, "{out}");
    assert!(
        out.contains("READY") && out.contains("fqdn cache: 1 names, 1 IPs"),
        "{out}"
    );
    let (ok, out) = output(&[
        bin,
        "observe",
        "--netns",
        &lab.node,
        "--pod",
        "app/client",
        "--verdict",
        "denied",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.lines().any(|l| l.contains("DROP")
            && l.contains("app/client")
            && l.contains("203.0.113.10:8443")),
        "{out}"
    );
    assert!(!out.contains("DNS "), "only denied events: {out}");

    // --follow streams what happens from now on.
    let mut follow = Command::new(bin)
        .args([
            "observe", "--netns", &lab.node, "--follow", "--output", "json",
        ])
        .args(["--pod", "app/client"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    assert_eq!(lab.dig("other.example.com"), "", "no such name");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("other.example.com") => {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                assert_eq!(v["type"], "dns");
                seen = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "the new query was streamed");

    // The selector the IP was learned under vanishes (the rule now names another
    // host): the IP's own ipcache entry leaves the datapath and it is denied again.
    let ipcache = |lab: &Lab| {
        let (_, body) = lab.admin("/v1/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["map_entries"]["ipcache"].as_u64().unwrap()
    };
    let before = ipcache(&lab);
    lab.write(
        "client.yaml",
        &CLIENT_POLICY.replace("matchName: ext.example.com", "matchName: gone.example.com"),
    );
    wait_for(
        "the learned IP's entry to leave",
        Duration::from_secs(5),
        || ipcache(&lab) == before - 1,
    );
    assert!(
        !lab.connects(OUTSIDE, 8443, DENIED),
        "denied once its selector vanished"
    );
}

/// The outside address is denied until the client looks `ext.example.com` up (over UDP,
/// then TCP) through the agent's DNS proxy, and allowed after.
fn learns_ext_over_udp_and_tcp(lab: &Lab) {
    assert!(
        !lab.connects(OUTSIDE, 8443, DENIED),
        "the outside address is denied before the lookup"
    );
    assert_eq!(lab.dig("ext.example.com"), OUTSIDE, "{}", lab.log());
    let tcp = dig_with(
        lab,
        &["+tcp", "+short", &format!("@{DNS}"), "ext.example.com"],
    );
    assert_eq!(tcp.trim(), OUTSIDE, "DNS over TCP\n{}", lab.log());
    assert!(
        lab.connects(OUTSIDE, 8443, ALLOWED),
        "allowed once learned\n{}",
        lab.log()
    );
}

/// With busy polling on, the agent serves DNS on a thread of its own (a current-thread
/// runtime that polls): queries are answered over UDP and TCP, the answer's IP reaches the
/// datapath before the answer, and the poller sleeps once queries stop.
#[test]
fn dns_with_busy_polling_teaches_to_fqdns() {
    let mut lab = Lab::new("fqdnbp");
    let config = lab.dir.join("agent.yaml");
    fs::write(&config, "dns_proxy:\n  busy_poll_us: 1000\n").unwrap();
    lab.agent_args = vec!["--config".into(), config.display().to_string()];
    lab.start_agent();
    let pid = lab.agent.as_ref().map(Child::id).unwrap();
    let threads = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect::<Vec<_>>();
    assert!(
        threads.iter().any(|t| t.trim() == "ward-dns"),
        "a DNS thread: {threads:?}"
    );
    learns_ext_over_udp_and_tcp(&lab);
    // Idle again: the DNS thread stops using CPU (it polled only within the window).
    let cpu = || {
        let stat = fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let comm = fs::read_to_string(dir.join("comm")).ok()?;
                (comm.trim() == "ward-dns").then(|| fs::read_to_string(dir.join("stat")).ok())?
            })
            .next()
            .unwrap_or_default();
        // utime and stime: fields 14 and 15; after the command's closing paren the
        // fields start at 3 (the state)
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| {
            f.get(n - 3)
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(14) + field(15)
    };
    let mut last = cpu();
    wait_for("the DNS thread to go idle", Duration::from_secs(10), || {
        thread::sleep(Duration::from_millis(300));
        let now = cpu();
        let idle = now == last;
        last = now;
        idle
    });
}

/// `dig` in the client pod with `args`: its output.
fn dig_with(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec![
        "ip",
        "netns",
        "exec",
        lab.client(),
        "dig",
        "+time=2",
        "+tries=1",
    ];
    a.extend_from_slice(args);
    output(&a).1
}

/// The audit log's records (one JSON object a line), once `ready` holds for one of them.
fn audit_records(
    lab: &Lab,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let path = lab.dir.join("audit.log");
    let read = || -> Vec<serde_json::Value> {
        fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    wait_for(what, Duration::from_secs(5), || read().iter().any(&ready));
    read()
}

/// IPv6 through both proxies: an L7 HTTP rule on an IPv6 pod (allowed and denied, audited
/// with the IPv6 addresses, the client's own source address upstream), L7 egress to an
/// outside IPv6 address, DNS over IPv6 (UDP and TCP) allowed and refused by the DNS rule,
/// and an AAAA answer teaching a toFQDNs rule its IPv6 address.
#[test]
fn ipv6_l7_http_and_dns_through_the_proxies() {
    let mut lab = Lab::new("v6");
    lab.write(
        "client.yaml",
        &CLIENT_POLICY
            .replace("matchPattern: \"*\"", "matchPattern: \"*.example.com\"")
            .replace("matchName: ext.example.com", "matchName: ext6.example.com")
            .replace(
                "toCIDR: [203.0.113.0/24]",
                "toCIDR: [203.0.113.0/24, 2001:db8::/32]",
            ),
    );
    lab.start_agent();

    // Ingress L7 on the IPv6 server pod, through the node proxy's IPv6 listener.
    let (code, body) = lab.curl(&format!("http://[{SERVER6}]/v1/x"));
    assert_eq!(code, "200", "{body}\n{}", lab.log());
    assert!(
        body.contains(&format!("peer={CLIENT6} ")),
        "transparent IPv6 source: {body}"
    );
    let (code, body) = lab.curl(&format!("http://[{SERVER6}]/admin"));
    assert_eq!(code, "403", "{body}");
    assert_eq!(body, "Access denied\r\n");
    let records = audit_records(&lab, "the IPv6 HTTP audit records", |r| {
        r["HTTP"]["Path"] == "/admin"
    });
    for (path, verdict) in [("/v1/x", "Forwarded"), ("/admin", "Denied")] {
        let r = records
            .iter()
            .find(|r| r["HTTP"]["Path"] == path)
            .unwrap_or_else(|| panic!("no record of {path}: {records:?}"));
        assert_eq!(r["Verdict"], verdict, "{r}");
        assert_eq!(r["SourceEndpoint"]["IP"], CLIENT6, "{r}");
        assert_eq!(r["SourceEndpoint"]["Pod"], "app/client", "{r}");
        assert_eq!(r["DestinationEndpoint"]["IP"], SERVER6, "{r}");
        assert_eq!(r["DestinationEndpoint"]["Port"], 80, "{r}");
    }
    // Egress L7 to an outside IPv6 address: the replies come back through the uplink to
    // the proxy's transparent IPv6 upstream socket.
    let (code, body) = lab.curl(&format!("http://[{OUTSIDE6}]:8080/ok"));
    assert_eq!(code, "200", "{body}\n{}", lab.log());
    assert!(body.contains(&format!("peer={CLIENT6} ")), "{body}");
    let (code, _) = lab.curl(&format!("http://[{OUTSIDE6}]:8080/no"));
    assert_eq!(code, "403");

    // DNS over IPv6: the learned IPv6 address is denied before the lookup ...
    assert!(
        !lab.connects(OUTSIDE6, 8443, DENIED),
        "the outside IPv6 address is denied before the lookup"
    );
    let server = format!("@{DNS6}");
    // ... refused by the DNS rule over UDP and TCP ...
    for transport in ["+notcp", "+tcp"] {
        let out = dig_with(
            &lab,
            &["-6", transport, &server, "blocked.example.org", "AAAA"],
        );
        assert!(
            out.contains("status: REFUSED"),
            "{transport}: {out}\n{}",
            lab.log()
        );
    }
    // ... answered over UDP and TCP, and allowed once learned from the AAAA answer.
    for transport in ["+notcp", "+tcp"] {
        let out = dig_with(
            &lab,
            &[
                "-6",
                transport,
                "+short",
                &server,
                "ext6.example.com",
                "AAAA",
            ],
        );
        assert_eq!(out.trim(), OUTSIDE6, "{transport}\n{}", lab.log());
    }
    assert!(
        lab.connects(OUTSIDE6, 8443, ALLOWED),
        "allowed once learned\n{}",
        lab.log()
    );
    // Only what was learned: the IPv4 outside host stays denied on that port.
    assert!(!lab.connects(OUTSIDE, 8443, DENIED));
    let (_, fqdn) = lab.admin("/v1/fqdn");
    let v: serde_json::Value = serde_json::from_str(&fqdn).unwrap();
    assert_eq!(v["app/client"]["ext6.example.com."][0], OUTSIDE6, "{fqdn}");
    // The queries are audited with the client's IPv6 address.
    let records = audit_records(&lab, "the IPv6 DNS audit records", |r| {
        r.to_string().contains("blocked.example.org")
    });
    let dns: Vec<_> = records
        .iter()
        .filter(|r| r.to_string().contains("example."))
        .collect();
    assert_eq!(dns.len(), 4, "two names, UDP and TCP each: {dns:?}");
    for r in dns {
        let text = r.to_string();
        assert!(text.contains(&format!("[{CLIENT6}]:")), "{text}");
        assert!(text.contains(&format!("[{DNS6}]:53")), "{text}");
    }
}

/// IPv6 disabled in the node's namespace: the agent runs on IPv4 (routing and listeners),
/// says once why IPv6 flows that need a proxy are dropped, and IPv4 L7 works.
#[test]
fn ipv6_disabled_node_runs_on_ipv4() {
    let mut lab = Lab::new("nov6");
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]);
    lab.start_agent();
    let (code, body) = lab.curl(&format!("http://{SERVER}/v1/x"));
    assert_eq!(code, "200", "{body}\n{}", lab.log());
    assert_eq!(lab.curl(&format!("http://{SERVER}/admin")).0, "403");
    assert_eq!(lab.dig("ext.example.com"), OUTSIDE);
    let log = lab.log();
    assert_eq!(
        log.matches("IPv6 is disabled in this network namespace")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn policy_change_latency() {
    let mut lab = Lab::new("latency");
    lab.start_agent();
    assert!(!lab.connects(SERVER, 8081, DENIED));
    let probe = Duration::from_millis(20);
    let mut times = Vec::new();
    for i in 0..20 {
        let allow = i % 2 == 0;
        let t0 = Instant::now();
        lab.write("server.yaml", &server_policy(allow));
        loop {
            let ok = lab.connects(SERVER, 8081, probe);
            if ok == allow {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "change {i} not enforced within 5 s\n{}",
                lab.log()
            );
        }
        times.push(t0.elapsed());
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let max = times[times.len() - 1];
    println!(
        "policy change -> datapath enforcing over 20 changes: p50 {:.1} ms, max {:.1} ms",
        p50.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
    assert!(max < Duration::from_secs(5));
}

#[test]
fn sigkill_restart_keeps_enforcing_and_converges() {
    let mut lab = Lab::new("restart");
    lab.start_agent();
    assert_eq!(lab.dig("ext.example.com"), OUTSIDE);
    let (_, eps_before) = lab.admin("/v1/endpoints");

    // A long-lived allowed connection.
    let addr: SocketAddr = format!("{SERVER}:8080").parse().unwrap();
    let mut conn = in_ns(lab.client(), || {
        TcpStream::connect_timeout(&addr, ALLOWED).unwrap()
    });
    conn.set_read_timeout(Some(ALLOWED)).unwrap();
    let echo = |conn: &mut TcpStream, msg: &[u8]| {
        conn.write_all(msg).unwrap();
        let mut b = vec![0u8; msg.len()];
        conn.read_exact(&mut b).unwrap();
        assert_eq!(b, msg);
    };
    echo(&mut conn, b"before");

    // A prober of the denied flow, from the kill until the restarted agent is ready:
    // no connect may ever succeed (no gap while down, none while the agent converges).
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let ns = lab.client().to_string();
        let addr: SocketAddr = format!("{SERVER}:8081").parse().unwrap();
        thread::spawn(move || {
            in_ns(&ns, || {
                let (mut tries, mut leaks) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    tries += 1;
                    if TcpStream::connect_timeout(&addr, Duration::from_millis(20)).is_ok() {
                        leaks += 1;
                    }
                }
                (tries, leaks)
            })
        })
    };
    lab.kill_agent();
    echo(&mut conn, b"agent-down");
    assert!(
        !lab.connects(SERVER, 8081, DENIED),
        "denied while the agent is down"
    );
    assert!(
        lab.connects(OUTSIDE, 8443, ALLOWED),
        "learned name still allowed"
    );

    let t0 = Instant::now();
    lab.start_agent();
    let ready = t0.elapsed();
    // Queried from a thread in the client's namespace rather than by spawning dig, so
    // that the figure is the agent's and not the process start-up of a loaded machine.
    let dns = wait_for("DNS after the restart", Duration::from_secs(5), || {
        dns_a(lab.client(), "ext.example.com", Duration::from_millis(200)).as_deref()
            == Some(OUTSIDE)
    });
    assert_eq!(lab.dig("ext.example.com"), OUTSIDE, "and with dig");
    println!(
        "restart: ready after {:.0} ms, DNS answered {:.0} ms after ready",
        ready.as_secs_f64() * 1000.0,
        dns.as_secs_f64() * 1000.0
    );
    assert!(
        dns < Duration::from_secs(1),
        "DNS within a second of the restart"
    );
    echo(&mut conn, b"after");
    stop.store(true, Ordering::Relaxed);
    let (tries, leaks) = prober.join().unwrap();
    assert!(tries > 10, "the prober ran ({tries} tries)");
    assert_eq!(
        leaks, 0,
        "the denied flow got through {leaks} of {tries} times"
    );
    assert!(
        !lab.connects(SERVER, 8081, DENIED),
        "denied after the restart"
    );

    // Converged without duplicates: one rule, one set of links per veth, same ids.
    let (_, rules) = output(&["ip", "-n", &lab.node, "rule", "show"]);
    assert_eq!(
        rules.matches("fwmark 0x200/0xf00 lookup 100").count(),
        1,
        "{rules}"
    );
    let links: Vec<String> = fs::read_dir(lab.root.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for veth in ["lxc1", "lxc2", "lxc3"] {
        assert_eq!(
            links
                .iter()
                .filter(|l| l.starts_with(&format!("{veth}:")))
                .count(),
            2,
            "{links:?}"
        );
    }
    assert_eq!(links.iter().filter(|l| l.starts_with("up0:")).count(), 1);
    let (_, eps_after) = lab.admin("/v1/endpoints");
    assert_eq!(eps_before, eps_after, "same endpoint ids and identities");
    let (_, metrics) = lab.admin("/metrics");
    assert!(
        metrics.contains("ward_datapath_map_writes_total 0"),
        "the restarted agent found the maps right and rewrote nothing:\n{metrics}"
    );

    // A clean shutdown removes the routing.
    let pid = lab.agent.as_ref().unwrap().id();
    sh(&["kill", "-TERM", &pid.to_string()]);
    let mut c = lab.agent.take().unwrap();
    let status = c.wait().unwrap();
    assert!(status.success(), "{}", lab.log());
    for family in ["-4", "-6"] {
        let (_, rules) = output(&["ip", "-n", &lab.node, family, "rule", "show"]);
        assert!(!rules.contains("lookup 100"), "{family}: {rules}");
        let (_, routes) = output(&[
            "ip", "-n", &lab.node, family, "route", "show", "table", "all",
        ]);
        assert!(!routes.contains("table 100"), "{family}: {routes}");
    }
}

#[test]
fn pods_coming_and_going_are_attached_and_detached() {
    let mut lab = Lab::new("pods");
    // No periodic re-check within the test: only the netlink watch of routes and links
    // can find the late veth.
    lab.agent_args = vec!["--endpoint-recheck-ms".into(), "3600000".into()];
    lab.start_agent();
    let late = format!(
        "{CLUSTER}- {{namespace: app, name: late, ip: 10.80.4.2, node: n1, labels: {{app: late}}}}\n"
    );
    lab.write("cluster.yaml", &late);
    let listed = |lab: &Lab| {
        let (_, eps) = lab.admin("/v1/endpoints");
        let v: serde_json::Value = serde_json::from_str(&eps).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["pod"] == "app/late")
            .cloned()
    };
    wait_for("the new pod listed", Duration::from_secs(5), || {
        listed(&lab).is_some()
    });
    assert_eq!(listed(&lab).unwrap()["attached"], false, "no veth yet");
    // The CNI creates the veth later: its route announced over netlink wakes discovery.
    // Watched while it does, so that the time from its route to the attachment is
    // measured, not the rest of the pod's set-up.
    let attached = {
        let node = lab.node.clone();
        thread::spawn(move || {
            let start = Instant::now();
            loop {
                let (_, eps) = admin_get(&node, "/v1/endpoints");
                let v: serde_json::Value = serde_json::from_str(&eps).unwrap_or_default();
                let late = v.as_array().and_then(|a| {
                    a.iter()
                        .find(|e| e["pod"] == "app/late")
                        .map(|e| e["attached"] == true && e["interface"] == "lxc4")
                });
                if late == Some(true) {
                    return Instant::now();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "the new pod not attached within 5 s"
                );
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    lab.add_pod(4);
    let attached = attached.join().expect("the attachment watcher");
    let took = attached.duration_since(lab.route_added.unwrap());
    println!(
        "late pod: route added -> endpoint attached in {:.1} ms",
        took.as_secs_f64() * 1000.0
    );
    let pins = |lab: &Lab| {
        fs::read_dir(lab.root.join("links"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("lxc4:")
            })
            .count()
    };
    assert_eq!(pins(&lab), 2);
    // Pod churn updates the model incrementally, and what it changes is enforced: the
    // late pod is no client, then relabelled to one, the server's ingress takes it.
    let from_late = |lab: &Lab, timeout: Duration| {
        let addr: SocketAddr = format!("{SERVER}:8080").parse().unwrap();
        in_ns(lab.pods.last().unwrap(), || {
            TcpStream::connect_timeout(&addr, timeout).is_ok()
        })
    };
    assert!(!from_late(&lab, DENIED), "app=late is no client");
    lab.write("cluster.yaml", &late.replace("app: late", "app: client"));
    wait_for(
        "the relabelled pod allowed",
        Duration::from_secs(10),
        || from_late(&lab, Duration::from_millis(300)),
    );
    let (_, metrics) = lab.admin("/metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("ward_policy_compiles_total{kind=\"incremental\"}")
                && !l.ends_with(" 0")
        ),
        "pod churn went through the incremental path:\n{metrics}"
    );
    // The pod leaves: detached and gone from the endpoints.
    lab.write("cluster.yaml", CLUSTER);
    wait_for("the pod detached", Duration::from_secs(5), || {
        pins(&lab) == 0 && listed(&lab).is_none()
    });
    let (_, status) = lab.admin("/v1/status");
    assert!(status.contains("\"endpoints\": 3"), "{status}");

    // Back, then deleted while no agent runs: the restarted agent removes its links.
    lab.write("cluster.yaml", &late);
    wait_for("attached again", Duration::from_secs(5), || pins(&lab) == 2);
    lab.kill_agent();
    let pod4 = lab.pods.pop().unwrap();
    sh(&["ip", "netns", "del", &pod4]);
    lab.write("cluster.yaml", CLUSTER);
    lab.start_agent();
    assert_eq!(
        pins(&lab),
        0,
        "leftover links removed at start\n{}",
        lab.log()
    );
    assert!(lab.connects(SERVER, 8080, ALLOWED));
}

#[test]
fn runs_under_ip_netns_exec() {
    let mut lab = Lab::new("exec");
    lab.start_agent_in(true);
    assert!(lab.connects(SERVER, 8080, ALLOWED), "8080 is allowed");
    assert!(!lab.connects(SERVER, 8081, DENIED), "8081 is denied");
    assert!(
        lab.log().contains("no bpffs on /sys/fs/bpf"),
        "warns that the pins are private: {}",
        lab.log()
    );
}

/// A round trip on an open connection, with a short deadline: whether the echo came back.
fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> bool {
    let mut b = vec![0u8; msg.len()];
    conn.write_all(msg).is_ok() && conn.read_exact(&mut b).is_ok() && b == msg
}

#[test]
fn a_policy_change_stops_established_connections_it_denies() {
    let mut lab = Lab::new("revoke");
    lab.write("server.yaml", &server_policy(true));
    lab.start_agent();
    let open = |port: u16| {
        let addr = sockaddr(SERVER, port);
        in_ns(lab.client(), || {
            let s = TcpStream::connect_timeout(&addr, ALLOWED).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            s
        })
    };
    let mut kept = open(8080);
    let mut revoked = open(8081);
    assert!(round_trip(&mut kept, b"kept-1"));
    assert!(round_trip(&mut revoked, b"revoked-1"));
    let revoked_port = revoked.local_addr().unwrap().port();

    // 8081 leaves the server's ingress policy.
    lab.write("server.yaml", &server_policy(false));
    wait_for(
        "new connections to 8081 denied",
        Duration::from_secs(5),
        || !lab.connects(SERVER, 8081, Duration::from_millis(200)),
    );
    // The connection opened before the change stops too, and its packets are dropped
    // by policy (a drop event of that very connection: the source port is its own).
    wait_for(
        "the established 8081 connection to stop",
        Duration::from_secs(5),
        || !round_trip(&mut revoked, b"x"),
    );
    wait_for(
        "a drop event of the established connection",
        Duration::from_secs(5),
        || {
            let (_, events) = lab.admin("/v1/events?follow=false");
            events.lines().any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                v["type"] == "drop"
                    && v["source"]["port"] == revoked_port
                    && v["destination"]["port"] == 8081
            })
        },
    );
    // The still-allowed connection keeps working, on the same socket.
    assert!(round_trip(&mut kept, b"kept-2"), "{}", lab.log());
    let (_, metrics) = lab.admin("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ward_conntrack_revoked_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// TLS egress: secrets from the certificates directory
// ---------------------------------------------------------------------------------------

type Ca = rcgen::CertifiedIssuer<'static, rcgen::KeyPair>;

fn test_ca(name: &str) -> Ca {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// A server certificate for `names` signed by `issuer`: (cert PEM, key PEM).
fn test_leaf(names: &[&str], issuer: &Ca) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap();
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

/// The client's egress to the SaaS server on 443: `api.payments.example` intercepted
/// (terminatingTLS with a CA secret, originatingTLS with the public CA, GET
/// `/v1/charges...` only), `cdn.example` spliced (serverNames only).
const PAYMENTS_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: payments, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [203.0.113.10/32]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      serverNames: [api.payments.example]
      terminatingTLS: {secret: {name: payments-intercept}}
      originatingTLS: {secret: {name: payments-public}}
      rules:
        http: [{method: GET, path: "/v1/charges.*"}]
    - ports: [{port: "443", protocol: TCP}]
      serverNames: [cdn.example]
"#;

impl Lab {
    /// Writes `DIR/NAMESPACE/NAME/KEY` atomically (the agent never reads half a key).
    fn write_secret(&self, ns: &str, name: &str, keys: &[(&str, &str)]) {
        let dir = self.dir.join("certs").join(ns).join(name);
        fs::create_dir_all(&dir).unwrap();
        for (k, v) in keys {
            let tmp = dir.join(format!(".{k}.tmp"));
            fs::write(&tmp, v).unwrap();
            fs::rename(&tmp, dir.join(k)).unwrap();
        }
    }

    /// curl in the client pod over HTTPS to 203.0.113.10:443 as `name`, trusting `ca`
    /// only: (HTTP code, "000" when no answer; curl's exit code).
    fn https(&self, method: &str, name: &str, path: &str, ca: &Path) -> (String, i32) {
        let out = Command::new("ip")
            .args(["netns", "exec", self.client(), "curl", "-s", "--http1.1"])
            .args(["--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-X", method, "--cacert"])
            .arg(ca)
            .args(["--resolve", &format!("{name}:443:{OUTSIDE}")])
            .arg(format!("https://{name}{path}"))
            .output()
            .expect("curl");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.code().unwrap_or(-1),
        )
    }

    fn tls_broken(&self) -> Vec<serde_json::Value> {
        let (_, body) = self.admin("/v1/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["tls_broken_rules"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// `ward agent` with `--certificates-dir`: an HTTPS request of the client pod is
/// intercepted with a leaf minted from the CA secret, checked (GET allowed, DELETE 403),
/// sent on over TLS verified against the public CA secret, and audited with its scheme
/// and SNI; another name is spliced untouched; an unlisted SNI is reset. A broken key
/// fails that rule closed (reset, in the status, `ward status` exits 1) while the
/// spliced rule on the same port keeps working; fixing it and then rotating the CA apply
/// to new connections without a restart. The server is `openssl s_server` in the world.
#[test]
fn tls_egress_with_secrets_from_a_certificates_directory() {
    let mut lab = Lab::new("tls");
    let intercept = test_ca("Ward agent test interception CA");
    let public = test_ca("Ward agent test public CA");
    let (srv_crt, srv_key) = test_leaf(&["api.payments.example", "cdn.example"], &public);
    let dir = lab.dir.clone();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let intercept_pem = file("intercept.pem", &intercept.pem());
    let public_pem = file("public.pem", &public.pem());
    let (crt, key) = (file("srv.crt", &srv_crt), file("srv.key", &srv_key));
    let intercept_key = intercept.key().serialize_pem();
    lab.write_secret(
        "app",
        "payments-intercept",
        &[("tls.crt", &intercept.pem()), ("tls.key", &intercept_key)],
    );
    lab.write_secret("app", "payments-public", &[("ca.crt", &public.pem())]);
    lab.write("payments.yaml", PAYMENTS_POLICY);

    let server = Command::new("ip")
        .args([
            "netns", "exec", &lab.world, "openssl", "s_server", "-quiet", "-www",
        ])
        .args(["-accept", &format!("{OUTSIDE}:443"), "-cert"])
        .arg(&crt)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    lab.children.push(server);
    let world = lab.world.clone();
    wait_for(
        "openssl s_server listening",
        Duration::from_secs(10),
        || {
            output(&["ip", "netns", "exec", &world, "ss", "-Htln", "sport = :443"])
                .1
                .contains(OUTSIDE)
        },
    );

    lab.agent_args = vec![
        "--certificates-dir".into(),
        lab.dir.join("certs").display().to_string(),
    ];
    lab.start_agent();
    let pid = lab.agent.as_ref().unwrap().id();
    assert!(lab.tls_broken().is_empty(), "{:?}", lab.tls_broken());

    let api = "api.payments.example";
    // intercepted: the client trusts the interception CA only
    assert_eq!(
        lab.https("GET", api, "/v1/charges", &intercept_pem).0,
        "200"
    );
    assert_eq!(
        lab.https("DELETE", api, "/v1/charges/ch_1", &intercept_pem)
            .0,
        "403"
    );
    // spliced: the real server's certificate reaches the client
    assert_eq!(lab.https("GET", "cdn.example", "/", &public_pem).0, "200");
    assert_ne!(
        lab.https("GET", "cdn.example", "/", &intercept_pem).0,
        "200",
        "a spliced session is not intercepted"
    );
    // an SNI no rule lists: reset before any certificate
    let (code, exit) = lab.https("GET", "evil.example", "/", &public_pem);
    assert_eq!(code, "000");
    assert!([35, 56].contains(&exit), "curl exit {exit}");

    let records = audit_records(&lab, "the SNI reset's record", |r| {
        r["TLS"]["SNI"] == "evil.example"
    });
    let https: Vec<_> = records
        .iter()
        .filter(|r| r["HTTP"]["Scheme"] == "https")
        .collect();
    assert!(
        https.iter().any(|r| r["HTTP"]["Method"] == "GET"
            && r["HTTP"]["Code"] == 200
            && r["Verdict"] == "Forwarded"
            && r["TLS"]["SNI"] == api
            && r["TLS"]["Mode"] == "intercept"),
        "{records:?}"
    );
    assert!(
        https.iter().any(|r| r["HTTP"]["Method"] == "DELETE"
            && r["HTTP"]["Code"] == 403
            && r["Verdict"] == "Denied"),
        "{records:?}"
    );
    assert!(
        records.iter().any(|r| r["TLS"]["SNI"] == "cdn.example"
            && r["TLS"]["Mode"] == "splice"
            && r["Verdict"] == "Forwarded"),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["TLS"]["SNI"] == "evil.example" && r["Verdict"] == "Denied"),
        "{records:?}"
    );

    // a key that does not belong to the certificate: that rule fails closed
    let other = test_ca("another CA");
    lab.write_secret(
        "app",
        "payments-intercept",
        &[("tls.key", &other.key().serialize_pem())],
    );
    wait_for(
        "the broken rule in the status",
        Duration::from_secs(5),
        || lab.tls_broken().len() == 1,
    );
    let b = &lab.tls_broken()[0];
    assert_eq!(b["policy"], "CiliumNetworkPolicy app/payments");
    assert_eq!(b["rule"], "spec.egress[0].toPorts[0]");
    assert_eq!(b["secret"], "app/payments-intercept");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("does not belong to the certificate"),
        "{b}"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(["status", "--netns", &lab.node])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{text}");
    assert!(
        text.contains("tls:        1 rules with unusable material")
            && text.contains("spec.egress[0].toPorts[0] (secret app/payments-intercept)"),
        "{text}"
    );
    let (_, events) = lab.admin("/v1/events?follow=false");
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"type\":\"tls\"") && l.contains("app/payments-intercept")),
        "{events}"
    );
    assert_eq!(
        lab.https("GET", api, "/v1/charges", &intercept_pem).0,
        "000"
    );
    assert_eq!(
        lab.https("GET", "cdn.example", "/", &public_pem).0,
        "200",
        "the spliced rule on the same port is unaffected"
    );

    // fixed, then rotated to a new CA: new connections, the same agent
    lab.write_secret("app", "payments-intercept", &[("tls.key", &intercept_key)]);
    wait_for("the rule usable again", Duration::from_secs(5), || {
        lab.tls_broken().is_empty()
    });
    assert_eq!(
        lab.https("GET", api, "/v1/charges", &intercept_pem).0,
        "200"
    );
    let rotated = test_ca("Ward agent test interception CA 2");
    let rotated_pem = file("rotated.pem", &rotated.pem());
    lab.write_secret(
        "app",
        "payments-intercept",
        &[
            ("tls.crt", &rotated.pem()),
            ("tls.key", &rotated.key().serialize_pem()),
        ],
    );
    wait_for("the rotated CA in use", Duration::from_secs(5), || {
        lab.https("GET", api, "/v1/charges", &rotated_pem).0 == "200"
    });
    assert_ne!(
        lab.https("GET", api, "/v1/charges", &intercept_pem).0,
        "200"
    );
    assert_eq!(lab.agent.as_ref().unwrap().id(), pid, "no restart");
}

/// `ward observe ARGS` against the lab's agent (from outside its namespace): its stdout
/// lines, after checking it succeeded.
fn observe(lab: &Lab, args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(["observe", "--netns", &lab.node])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ward observe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A denied connection and two HTTP requests (one denied) through the real agent, then
/// `ward observe` with Hubble's filters and printers: each filter keeps exactly the
/// records it names, a drop names the policy decision, several agents merge, and
/// `--follow` prints what happens after it started.
#[test]
fn observe_filters_a_real_agent_s_drops_and_requests() {
    let mut lab = Lab::new("obs");
    lab.start_agent();
    assert!(!lab.connects(SERVER, 8081, DENIED), "8081 is denied");
    assert_eq!(lab.curl(&format!("http://{SERVER}/v1/x")).0, "200");
    assert_eq!(lab.curl(&format!("http://{SERVER}/admin")).0, "403");
    wait_for("the drop and both requests", Duration::from_secs(5), || {
        let all = observe(&lab, &["-o", "json"]).join("\n");
        all.contains("\"type\":\"drop\"") && all.contains("/v1/x") && all.contains("/admin")
    });

    // DROPPED: the datapath's drop and the proxy's denial, nothing forwarded
    let dropped = json_lines(&observe(
        &lab,
        &["--verdict", "DROPPED", "-o", "json", "--last", "10"],
    ));
    assert!(!dropped.is_empty() && dropped.len() <= 10, "{dropped:?}");
    assert!(
        dropped
            .iter()
            .all(|v| v["type"] == "drop" || v["Verdict"] == "Denied"),
        "{dropped:?}"
    );
    let drop = dropped
        .iter()
        .find(|v| v["type"] == "drop" && v["destination"]["port"] == 8081)
        .unwrap_or_else(|| panic!("the drop to 8081: {dropped:?}"));
    assert_eq!(drop["node"], "n1");
    assert_eq!(drop["destination"]["pod"], "app/server");
    let why = drop["explanation"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("ingress of app/server: denied at L4: default deny: selected by CiliumNetworkPolicy app/server-ingress"),
        "the trace's words: {drop}"
    );
    assert!(
        dropped.iter().any(|v| v["HTTP"]["Path"] == "/admin"),
        "{dropped:?}"
    );
    assert!(
        !dropped.iter().any(|v| v["HTTP"]["Path"] == "/v1/x"),
        "{dropped:?}"
    );
    // the lower-case name of today's flag is the same verdict
    assert_eq!(
        observe(&lab, &["--verdict", "denied", "-o", "json", "--last", "10"]).len(),
        dropped.len()
    );

    // L7 by path (a regular expression), by method, and the forwarded ones
    let l7 = json_lines(&observe(
        &lab,
        &["--type", "l7", "--http-path", "^/v1/", "-o", "json"],
    ));
    assert_eq!(l7.len(), 1, "{l7:?}");
    assert_eq!(l7[0]["HTTP"]["Path"], "/v1/x");
    assert_eq!(l7[0]["Verdict"], "Forwarded");
    let forwarded = observe(&lab, &["--verdict", "FORWARDED", "--type", "http"]);
    assert!(
        forwarded.len() == 1
            && forwarded[0].contains("http-request FORWARDED (HTTP/1.1 GET http://"),
        "{forwarded:?}"
    );
    assert!(observe(&lab, &["--verdict", "FORWARDED", "--type", "drop"]).is_empty());
    assert!(observe(&lab, &["--http-method", "POST"]).is_empty());

    // the compact line of the drop, by destination pod and port
    let lines = observe(&lab, &["--to-pod", "app/server", "--port", "8081"]);
    assert!(
        lines.iter().any(|l| l.contains("-> app/server:8081")
            && l.contains("drop DROPPED (TCP, policy_default_deny, ingress): ingress of app/server: denied at L4")),
        "{lines:?}"
    );
    assert!(
        observe(&lab, &["--from-pod", "app/server", "--type", "drop"]).is_empty(),
        "the server sent nothing that was dropped"
    );
    assert!(observe(&lab, &["--namespace", "other"]).is_empty());
    assert!(observe(
        &lab,
        &[
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2000-01-02T00:00:00Z"
        ]
    )
    .is_empty());

    // Hubble's flow shape
    let pb = json_lines(&observe(
        &lab,
        &[
            "-o",
            "jsonpb",
            "--type",
            "drop",
            "--to-port",
            "8081",
            "--last",
            "1",
        ],
    ));
    assert_eq!(pb.len(), 1, "{pb:?}");
    assert_eq!(pb[0]["flow"]["verdict"], "DROPPED");
    assert_eq!(pb[0]["flow"]["destination"]["pod_name"], "server");
    assert_eq!(pb[0]["flow"]["l4"]["TCP"]["destination_port"], 8081);

    // two agents (here the same one twice): merged, every record from each
    let once = observe(&lab, &["--type", "drop", "-o", "json"]).len();
    let twice = observe(
        &lab,
        &["--netns", &lab.node, "--type", "drop", "-o", "json"],
    )
    .len();
    assert_eq!(twice, 2 * once);

    // --follow with --last 0: nothing of what the agent holds, then the new drops
    let started = std::time::SystemTime::now();
    let mut follow = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args([
            "observe", "--netns", &lab.node, "-f", "--last", "0", "-o", "json",
        ])
        .args(["--type", "drop", "--to-port", "8081"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    // the follower prints nothing until a new drop comes: send drops until one is printed
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_none() && Instant::now() < deadline {
        assert!(!lab.connects(SERVER, 8081, Duration::from_millis(300)));
        got = rx.recv_timeout(Duration::from_millis(500)).ok();
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let got = got.expect("a new drop printed by the follower");
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["type"], "drop");
    assert_eq!(v["destination"]["port"], 8081);
    let at = humantime::parse_rfc3339_weak(v["time"].as_str().unwrap()).unwrap();
    assert!(
        at >= started,
        "a drop from after the follower started: {got}"
    );
}

/// `ward policy show` asks the running agent: the policy it enforces, the same listing
/// as from files.
#[test]
fn policy_show_asks_the_running_agent() {
    let mut lab = Lab::new("show");
    lab.start_agent();
    let bin = env!("CARGO_BIN_EXE_ward");
    let (ok, out) = output(&[bin, "policy", "show", "--netns", &lab.node, "app/server"]);
    assert!(ok, "{out}");
    for line in [
        "  ingress: isolated (default deny) by CiliumNetworkPolicy app/server-ingress",
        "    CiliumNetworkPolicy app/server-ingress [namespace, default deny]",
        "        spec.ingress[1].toPorts[0].rules.http[0]: method=GET path=/v1/.*",
        "  egress: not isolated: no policy selects it for egress; everything allowed",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
    }
    let (ok, out) = output(&[
        bin,
        "policy",
        "show",
        "--netns",
        &lab.node,
        "-n",
        "app",
        "-l",
        "app in (client,dns)",
        "-o",
        "json",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pods: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(pods, vec!["app/client", "app/dns"]);
    let o = Command::new(bin)
        .args(["policy", "show", "--netns", &lab.node, "app/nope"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no pod app/nope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Headless Chromium (Debian package `chromium`) inside the node namespace loads `url`
/// of the agent's admin listener, runs its scripts for a few seconds of virtual time and
/// prints the resulting DOM; with `screenshot`, saves a PNG there instead.
fn chromium(lab: &Lab, url: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = lab.dir.join("chromium");
    let mut cmd = testkit::ip_netns_exec(&lab.node, "chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--virtual-time-budget=5000",
        "--window-size=1400,700",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(url)
        .output()
        .expect("chromium (Debian package chromium)");
    assert!(
        out.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rows of the flow table in a dumped DOM: (class = verdict, text).
fn table_rows(dom: &str) -> Vec<(String, String)> {
    let body = dom.split("<tbody>").nth(1).unwrap_or("");
    let body = body.split("</tbody>").next().unwrap_or("");
    body.split("<tr class=\"")
        .skip(1)
        .map(|r| {
            let (class, rest) = r.split_once('"').unwrap();
            (class.to_string(), rest.to_string())
        })
        .collect()
}

/// The web view in a real browser: the flow table holds the agent's records and its
/// filters keep what `ward observe`'s do; the pod page lists the selecting policies.
#[test]
fn web_view_shows_flows_and_a_pod_s_policies_in_chromium() {
    let mut lab = Lab::new("ui");
    lab.start_agent();
    assert!(!lab.connects(SERVER, 8081, DENIED), "8081 is denied");
    assert_eq!(lab.curl(&format!("http://{SERVER}/v1/x")).0, "200");
    assert_eq!(lab.curl(&format!("http://{SERVER}/admin")).0, "403");
    wait_for("the drop and both requests", Duration::from_secs(5), || {
        let all = observe(&lab, &["-o", "json"]).join("\n");
        all.contains("\"type\":\"drop\"") && all.contains("/v1/x") && all.contains("/admin")
    });
    let (code, _) = lab.admin("/ui/app.js");
    assert_eq!(code, 200);

    let dom = chromium(&lab, "http://127.0.0.1:9890/ui/?verdict=DROPPED", None);
    assert!(dom.contains("data-flows-ready=\"1\""), "{dom}");
    assert!(dom.contains("node n1"), "{dom}");
    let rows = table_rows(&dom);
    assert!(rows.iter().all(|(v, _)| v == "DROPPED"), "{rows:?}");
    assert!(
        rows.iter()
            .any(|(_, t)| t.contains("app/server:8081") && t.contains("policy_default_deny")),
        "the drop: {rows:?}"
    );
    assert!(
        rows.iter().any(|(_, t)| t.contains("/admin")),
        "the denied request: {rows:?}"
    );
    let want = observe(&lab, &["--verdict", "DROPPED"]).len();
    assert_eq!(
        rows.len(),
        want,
        "the same records as ward observe: {rows:?}"
    );

    let dom = chromium(
        &lab,
        "http://127.0.0.1:9890/ui/?type=http&verdict=FORWARDED",
        None,
    );
    let rows = table_rows(&dom);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].1.contains("GET http://") && rows[0].1.contains("/v1/x"),
        "{rows:?}"
    );

    let dom = chromium(&lab, "http://127.0.0.1:9890/ui/#pod=app%2Fserver", None);
    assert!(dom.contains("data-pod-ready=\"1\""), "{dom}");
    let pod = dom.split("<section id=\"pod\"").nth(1).unwrap_or("");
    assert!(
        pod.contains("ingress: isolated by CiliumNetworkPolicy app/server-ingress")
            && pod.contains(
                "CiliumNetworkPolicy app/server-ingress [namespace]: allow TCP/8080 app/client"
            ),
        "{pod}"
    );

    // the map: the namespace's workloads as boxes, the pair's edge red (drops and a
    // denied request among its flows) with the counts ward observe finds
    let dom = chromium(&lab, "http://127.0.0.1:9890/ui/", None);
    for w in ["app/client", "app/server"] {
        assert!(
            dom.contains(&format!("data-workload=\"{w}\"")),
            "{w}: {dom}"
        );
    }
    assert!(dom.contains("data-namespace=\"app\""), "{dom}");
    let edge = dom
        .split("<path ")
        .find(|e| e.contains("data-from=\"app/client\" data-to=\"app/server\""))
        .unwrap_or_else(|| panic!("the client's edge to the server: {dom}"));
    assert!(edge.contains("class=\"edge DROPPED\""), "red: {edge}");
    let count = |verdict: &str| {
        observe(
            &lab,
            &[
                "--from-pod",
                "app/client",
                "--to-pod",
                "app/server",
                "--verdict",
                verdict,
            ],
        )
        .len()
    };
    assert!(
        edge.contains(&format!("data-dropped=\"{}\"", count("DROPPED"))),
        "{edge}"
    );
    assert!(
        edge.contains(&format!("data-forwarded=\"{}\"", count("FORWARDED"))),
        "{edge}"
    );
    // one edge's flows (what a click on it shows), here the forwarded one
    let dom = chromium(
        &lab,
        "http://127.0.0.1:9890/ui/?from=app/client&to=app/server&verdict=FORWARDED",
        None,
    );
    let rows = table_rows(&dom);
    assert_eq!(rows.len(), 1, "{rows:?}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ward-ui-flows.png");
    let _ = fs::remove_file(&shot);
    chromium(&lab, "http://127.0.0.1:9890/ui/", Some(&shot));
    let png = fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
}

/// `ward ARGS` (a client of the agent's admin endpoint) with `env`: success, stdout, stderr.
fn ward_client(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(args)
        .env_remove("WARD_ADMIN_TOKEN_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--admin-token-file` on the real agent: bound beyond loopback without a token it
/// serves as before and warns; with one, /v1 and /ui refuse requests without it (probes
/// and metrics stay open), curl's Bearer header and a browser's cookie (got by the 303
/// of /ui/?token=) are served, and `ward status`, `ward observe` and `ward policy show`
/// send it from their flag or WARD_ADMIN_TOKEN_FILE, or say that it is wanted.
#[test]
fn the_admin_token_guards_flows_and_policies_of_a_real_agent() {
    let mut lab = Lab::new("tok");
    lab.agent_args = vec!["--admin".into(), "0.0.0.0:9890".into()];
    lab.start_agent();
    assert_eq!(lab.admin("/v1/status").0, 200, "no token: open as before");
    assert!(
        lab.log().contains("without a token: /v1 and /ui") && lab.log().contains("0.0.0.0:9890"),
        "the warning names the address: {}",
        lab.log()
    );
    lab.kill_agent();

    let token = lab.dir.join("admin-token");
    fs::write(&token, "  t0ken-of-the-test\n").unwrap();
    lab.agent_args
        .extend(["--admin-token-file".into(), token.display().to_string()]);
    lab.start_agent();
    assert!(!lab.log().contains("without a token"), "{}", lab.log());
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(lab.admin(open).0, 200, "{open} stays open");
    }
    for guarded in ["/v1/status", "/v1/events?follow=false", "/ui/", "/ui"] {
        assert_eq!(lab.admin(guarded).0, 401, "{guarded} without the token");
    }
    let bearer = "Authorization: Bearer t0ken-of-the-test\r\n";
    let (code, body) = admin_get_with(&lab.node, "/v1/status", bearer);
    assert!(
        code == 200 && body.contains("\"node\": \"n1\""),
        "{code} {body}"
    );
    let wrong = "Authorization: Bearer t0ken-of-the-tesT\r\n";
    assert_eq!(admin_get_with(&lab.node, "/v1/status", wrong).0, 401);

    // the browser's way, with curl's cookie jar: the 303 sets the cookie, the page and
    // its requests to /v1 carry it
    let jar = lab.dir.join("cookies");
    let curl = |url: &str| {
        let out = testkit::ip_netns_exec(&lab.node, "curl")
            .args([
                "-s",
                "-L",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code} %{num_redirects}",
            ])
            .arg("-c")
            .arg(&jar)
            .arg("-b")
            .arg(&jar)
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let page = curl("http://127.0.0.1:9890/ui/?token=t0ken-of-the-test");
    assert!(
        page.ends_with("\n200 1") && page.contains("<html"),
        "{page}"
    );
    let status = curl("http://127.0.0.1:9890/v1/status");
    assert!(
        status.ends_with("\n200 0") && status.contains("\"ready\": true"),
        "{status}"
    );

    let node = lab.node.clone();
    let file = token.display().to_string();
    let (ok, out, err) = ward_client(
        &["status", "--netns", &node, "--admin-token-file", &file],
        &[],
    );
    assert!(ok && out.contains("node n1: READY"), "{out}{err}");
    let (ok, out, err) = ward_client(
        &["status", "--netns", &node],
        &[("WARD_ADMIN_TOKEN_FILE", &token)],
    );
    assert!(
        ok && out.contains("node n1: READY"),
        "from the environment: {out}{err}"
    );
    let (ok, _, err) = ward_client(&["status", "--netns", &node], &[]);
    assert!(
        !ok && err.contains("the agent at 127.0.0.1:9890 wants a token: --admin-token-file"),
        "{err}"
    );
    let (ok, out, err) = ward_client(
        &[
            "observe",
            "--netns",
            &node,
            "-o",
            "json",
            "--admin-token-file",
            &file,
        ],
        &[],
    );
    assert!(ok, "ward observe: {out}{err}");
    let (ok, _, err) = ward_client(&["observe", "--netns", &node], &[]);
    assert!(!ok && err.contains("wants a token"), "{err}");
    let (ok, out, err) = ward_client(
        &[
            "policy",
            "show",
            "app/server",
            "--netns",
            &node,
            "--admin-token-file",
            &file,
        ],
        &[],
    );
    assert!(
        ok && out.contains("app/server"),
        "ward policy show: {out}{err}"
    );
    let (ok, _, err) = ward_client(&["policy", "show", "app/server", "--netns", &node], &[]);
    assert!(!ok && err.contains("wants a token"), "{err}");
}
