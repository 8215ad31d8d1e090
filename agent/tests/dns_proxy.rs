//! `ward dns-proxy` as a process: dnsmasq upstream, dig client, audit lines on a file.
//! Skipped when dnsmasq or dig is not installed. Every process is killed by its PID.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLUSTER: &str = r#"
namespaces:
- {name: app}
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
  - toCIDR: [127.0.0.1/32]
    toPorts:
    - ports: [{port: "PORT", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.allowed.test"
  - toFQDNs:
    - matchPattern: "*.allowed.test"
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string(), "+tries=1", "+time=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn standalone_proxy_filters_forwards_and_audits() {
    standalone(&[]);
}

/// Busy polling changes when the thread sleeps, nothing else: the same answers, refusals
/// and audit records.
#[test]
fn standalone_proxy_with_busy_polling_filters_forwards_and_audits() {
    standalone(&["--threads", "1", "--busy-poll-us", "1000"]);
}

#[test]
fn busy_polling_without_one_thread_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args([
            "dns-proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:53",
        ])
        .args(["--cluster", "/nonexistent", "--policies", "/nonexistent"])
        .args(["--endpoint", "app/client", "--busy-poll-us", "100"])
        .args(["--threads", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--busy-poll-us needs one worker thread"),
        "{err}"
    );
}

fn standalone(extra: &[&str]) {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let have_dig = Command::new("dig").arg("-v").output().is_ok();
    let Some(dnsmasq) = dnsmasq.filter(|_| have_dig) else {
        eprintln!("dnsmasq or dig not installed: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let up_port = free_port();
    let upstream: SocketAddr = ([127, 0, 0, 1], up_port).into();
    let _dnsmasq = Killed(
        Command::new(dnsmasq)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--host-record=www.allowed.test,192.0.2.30",
                "--host-record=www.denied.test,192.0.2.31",
            ])
            .arg(format!("--port={up_port}"))
            .arg(format!("--pid-file={}/dnsmasq.pid", dir.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_for(Duration::from_secs(5), || dig(
        upstream,
        &["www.allowed.test"]
    )
    .contains("192.0.2.30")));

    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        POLICY.replace("PORT", &up_port.to_string()),
    )
    .unwrap();
    let audit = dir.path().join("audit.log");
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _ward = Killed(
        Command::new(env!("CARGO_BIN_EXE_ward"))
            .arg("dns-proxy")
            .args(["--listen", &listen.to_string()])
            .args(["--upstream", &upstream.to_string()])
            .arg("--cluster")
            .arg(dir.path().join("cluster.yaml"))
            .arg("--policies")
            .arg(dir.path().join("policy.yaml"))
            .args(["--endpoint", "app/client", "--refuse-code", "nxdomain"])
            .arg("--audit-log")
            .arg(&audit)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_for(Duration::from_secs(10), || dig(
        listen,
        &["www.allowed.test"]
    )
    .contains("192.0.2.30")));
    let out = dig(listen, &["www.denied.test", "+tcp"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(wait_for(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.contains("\"verdict\":\"denied\"") && text.contains("\"192.0.2.30\"")
    }));
    let text = std::fs::read_to_string(&audit).unwrap();
    let forwarded = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["verdict"] == "forwarded")
        .unwrap();
    assert_eq!(forwarded["source"], "app/client");
    assert_eq!(forwarded["qtype"], "A");
    // RFC 3339 UTC with microseconds, e.g. 2026-11-26T14:30:00.123456Z
    let time = forwarded["time"].as_str().unwrap();
    assert!(
        time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
    assert_eq!(forwarded["selectors"][0], "*.allowed.test.");
}

/// Open file descriptors and resident memory (bytes) of process `pid`.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    (fds, rss_kb * 1024)
}

/// A plain HTTP/1.1 GET on a fresh connection; the whole response.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of an unlabelled counter or gauge in a text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Finding 8 of issue 18: a flood of queries (2,400 a second for 5 s from 8 clients) to an
/// allowed zone whose server never answers. With the default limits (1,024 queries in
/// hand, 256 per client) the proxy's open files and memory stay bounded while it lasts
/// (each forwarded query holds one socket, and a query past a limit gets SERVFAIL at
/// once), and both come back down once the held queries time out.
#[test]
fn a_flood_to_a_silent_zone_stays_within_the_limits() {
    // The silent server: bound, never read.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = silent.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        POLICY.replace("PORT", &upstream.port().to_string()),
    )
    .unwrap();
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let ward = Killed(
        Command::new(env!("CARGO_BIN_EXE_ward"))
            .arg("dns-proxy")
            .args(["--listen", &listen.to_string()])
            .args(["--upstream", &upstream.to_string()])
            .arg("--cluster")
            .arg(dir.path().join("cluster.yaml"))
            .arg("--policies")
            .arg(dir.path().join("policy.yaml"))
            .args(["--endpoint", "app/client", "--audit-log", "/dev/null"])
            .args(["--upstream-timeout-ms", "3000"])
            .args(["--metrics", &metrics.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = ward.0.id();
    // Up: a denied name is answered at once.
    assert!(wait_for(Duration::from_secs(10), || dig(
        listen,
        &["www.denied.test"]
    )
    .contains("status: REFUSED")));
    let (base_fds, base_rss) = fds_and_rss(pid);

    let clients: Vec<UdpSocket> = (2..10)
        .map(|i| {
            let s = UdpSocket::bind(SocketAddr::from(([127, 0, 0, i], 0))).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let (mut max_fds, mut max_rss, mut replies, mut sent) = (0, 0, 0usize, 0usize);
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let mut next_sample = start;
    while start.elapsed() < Duration::from_secs(5) {
        // 2,400 queries a second, paced by the clock.
        let due = (start.elapsed().as_secs_f64() * 2400.0) as usize;
        for _ in 0..due.saturating_sub(sent) {
            let c = &clients[sent % clients.len()];
            let q = query_bytes(sent as u16, &format!("q{sent}.allowed.test"));
            if c.send_to(&q, listen).is_ok() {
                sent += 1;
            }
        }
        for c in &clients {
            while c.recv_from(&mut buf).is_ok() {
                replies += 1;
            }
        }
        if Instant::now() >= next_sample {
            let (f, r) = fds_and_rss(pid);
            max_fds = max_fds.max(f);
            max_rss = max_rss.max(r);
            next_sample += Duration::from_millis(50);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let rate = sent as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "flood: {sent} queries at {rate:.0}/s, {replies} replies; peak {max_fds} open files \
         and {} MiB RSS (at rest {base_fds}, {} MiB)",
        max_rss >> 20,
        base_rss >> 20
    );
    assert!(rate >= 1500.0, "the flood was {rate:.0} queries/s");
    // Bounds: the queries in hand (1,024) hold a socket each, and the forwarder keeps at
    // most MAX_FREE sockets between queries; memory grows by far less than the 64 KiB a
    // query's buffer once was.
    let mib = 1024 * 1024;
    let kept = dns_proxy::udp_pool::MAX_FREE;
    assert!(
        max_fds <= base_fds + 1024 + kept + 16,
        "open files reached {max_fds} (at rest {base_fds})"
    );
    assert!(
        max_rss <= base_rss + 64 * mib,
        "RSS reached {} MiB (at rest {} MiB)",
        max_rss / mib,
        base_rss / mib
    );
    // Queries past a limit are answered (SERVFAIL) at once, while the held ones wait.
    assert!(replies > 1000, "{replies} replies to {sent} queries");
    let text = http_get(metrics, "/metrics").unwrap();
    let limited = metric(&text, "ward_dns_concurrency_limited_total").unwrap_or(0.0)
        + text
            .lines()
            .filter(|l| l.starts_with("ward_dns_concurrency_limited_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    assert!(limited > 0.0, "no query was limited:\n{text}");
    // Once the held queries timed out (3 s), the sockets are closed and the memory given
    // back.
    assert!(
        wait_for(Duration::from_secs(30), || {
            let (f, r) = fds_and_rss(pid);
            f <= base_fds + 4 && r <= base_rss + 16 * mib
        }),
        "after the flood: {:?} (at rest {base_fds} files, {} MiB)",
        fds_and_rss(pid),
        base_rss / mib
    );
    drop(silent);
}

/// A query for `name` with `id`, recursion desired.
fn query_bytes(id: u16, name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// Finding 10 of issue 18: the metrics endpoint of a `ward dns-proxy` that runs out of
/// file descriptors (its limit lowered to 40 with prlimit, then 60 idle connections)
/// keeps accepting once they are gone: it pauses after an accept error instead of
/// stopping for good.
#[test]
fn metrics_endpoint_survives_running_out_of_file_descriptors() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = silent.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        POLICY.replace("PORT", &upstream.port().to_string()),
    )
    .unwrap();
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _ward = Killed(
        Command::new("prlimit")
            .arg("--nofile=40:40")
            .arg(env!("CARGO_BIN_EXE_ward"))
            .arg("dns-proxy")
            .args(["--listen", &listen.to_string()])
            .args(["--upstream", &upstream.to_string()])
            .arg("--cluster")
            .arg(dir.path().join("cluster.yaml"))
            .arg("--policies")
            .arg(dir.path().join("policy.yaml"))
            .args(["--endpoint", "app/client", "--audit-log", "/dev/null"])
            .args(["--metrics", &metrics.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_for(Duration::from_secs(10), || http_get(
        metrics, "/metrics"
    )
    .is_ok_and(|t| t.contains("ward_dns_queries_total"))));
    // More idle connections than the process has descriptors left.
    let idle: Vec<std::net::TcpStream> = (0..60)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).ok())
        .collect();
    assert!(idle.len() >= 40, "{} connections", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    drop(idle);
    let mut text = String::new();
    assert!(
        wait_for(Duration::from_secs(20), || {
            text = http_get(metrics, "/metrics").unwrap_or_default();
            text.contains("ward_dns_queries_total")
        }),
        "the metrics endpoint no longer answers"
    );
    let errors = text
        .lines()
        .find(|l| l.starts_with("ward_endpoint_accept_errors_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(
        errors.is_some_and(|n| n > 0),
        "no accept error counted:\n{text}"
    );
    drop(silent);
}

/// `--port` names the port the policy allows for the upstream: the rules are checked
/// against it, not against the port the upstream listens on.
#[test]
fn port_flag_checks_rules_against_the_port_the_policy_names() {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let have_dig = Command::new("dig").arg("-v").output().is_ok();
    let Some(dnsmasq) = dnsmasq.filter(|_| have_dig) else {
        eprintln!("dnsmasq or dig not installed: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let up_port = free_port();
    let upstream: SocketAddr = ([127, 0, 0, 1], up_port).into();
    let _dnsmasq = Killed(
        Command::new(dnsmasq)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--host-record=www.allowed.test,192.0.2.30",
            ])
            .arg(format!("--port={up_port}"))
            .arg(format!("--pid-file={}/dnsmasq.pid", dir.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    // The policy names port 53, as a cluster's would for its DNS service.
    std::fs::write(dir.path().join("policy.yaml"), POLICY.replace("PORT", "53")).unwrap();
    let run = |extra: &[&str]| {
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let ward = Killed(
            Command::new(env!("CARGO_BIN_EXE_ward"))
                .arg("dns-proxy")
                .args(["--listen", &listen.to_string()])
                .args(["--upstream", &upstream.to_string()])
                .arg("--cluster")
                .arg(dir.path().join("cluster.yaml"))
                .arg("--policies")
                .arg(dir.path().join("policy.yaml"))
                .args(["--endpoint", "app/client", "--audit-log", "/dev/null"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut out = String::new();
        assert!(wait_for(Duration::from_secs(10), || {
            out = dig(listen, &["www.allowed.test"]);
            out.contains("status:")
        }));
        drop(ward);
        out
    };
    // Checked against the upstream's own port, which no rule allows: refused.
    let out = run(&[]);
    assert!(out.contains("status: REFUSED"), "{out}");
    // Against the port the policy names: allowed and forwarded.
    let out = run(&["--port", "53"]);
    assert!(out.contains("192.0.2.30"), "{out}");
}

/// The soft and hard open files limits of process `pid` (`/proc/PID/limits`).
fn open_files_limits(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// `ward dns-proxy` started under `prlimit --nofile=LIMITS`, its stderr in `log`; once
/// it serves (its log says so).
fn dns_proxy_under(limits: &str, log: &Path) -> Killed {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = silent.local_addr().unwrap();
    let dir = log.parent().unwrap();
    std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        POLICY.replace("PORT", &upstream.port().to_string()),
    )
    .unwrap();
    let ward = Killed(
        Command::new("prlimit")
            .arg(format!("--nofile={limits}"))
            .arg(env!("CARGO_BIN_EXE_ward"))
            .arg("dns-proxy")
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--upstream", &upstream.to_string()])
            .arg("--cluster")
            .arg(dir.join("cluster.yaml"))
            .arg("--policies")
            .arg(dir.join("policy.yaml"))
            .args(["--endpoint", "app/client", "--audit-log", "/dev/null"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("DNS proxy serving")),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    ward
}

/// Each upstream query in flight holds a socket: `ward dns-proxy` raises its soft limit
/// of open files to the hard one at start and logs it; when even the hard limit is below
/// what its concurrency limit lets it hold, it says so.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_one_and_a_low_one_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("raised.log");
    let ward = dns_proxy_under("256:4096", &log);
    assert_eq!(open_files_limits(ward.0.id()), Some((4096, 4096)));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("open files limit raised to the hard limit")
            && text.contains("from=256")
            && text.contains("to=4096"),
        "{text}"
    );
    assert!(!text.contains("is below"), "{text}");
    drop(ward);

    // The hard limit below the default 1,024 queries in hand (and the rest).
    let log = dir.path().join("low.log");
    let ward = dns_proxy_under("128:512", &log);
    assert_eq!(open_files_limits(ward.0.id()), Some((512, 512)));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN")
            && text
                .contains("the open files limit is below what the DNS proxy's concurrency limit")
            && text.contains("limit=512")
            && text.contains("wanted=1280"),
        "{text}"
    );
}
