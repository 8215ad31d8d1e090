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
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--busy-poll-us needs --threads 1"), "{err}");
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
