//! FQDN at scale: the real `ward agent` (`--source files`, node `node-1`) in a node
//! namespace with 500 local endpoints (a namespace and a veth each, as a CNI wires a pod)
//! and 10,000 allowed names, under a steady 2,000 DNS queries/s of answers that keep
//! changing, with 200,000 flows in conntrack. What it runs, per subject (the current
//! build, and with `--ward-base PATH` a build from before, in turn):
//!
//! - the cluster: namespaces `fq0`..`fq9` of 50 pods (`10.81.G.2`..`10.81.G.51`), each
//!   namespace one CNP that allows DNS to the DNS pod (`dns/dns-0`, 10.81.250.2, `*`)
//!   and, on TCP 443, toFQDNs with 1,000 names: 900 `matchName`s and 100
//!   `matchPattern`s (`fqdn_dns::query_name`);
//! - the upstream: `xtask fqdn-upstream` in the DNS pod, an authoritative server whose
//!   answers rotate through 100,000 distinct addresses (10 a name, two an answer, TTL
//!   1-30 s; `fqdn_dns`). The addresses are data in answers and entries in the maps;
//!   nothing routes to them;
//! - warm-up: dnsperf from the client endpoints (two per namespace by default, each
//!   through its namespace's names) for [`WARMUP`];
//! - conntrack: 200,000 established flows written to the pinned map (the
//!   `ct_fill` example of redirect-bpf) from the client endpoints to addresses they
//!   learned (read from `/v1/fqdn`), so that every expiry sweep reads them and the
//!   addresses they use stay held;
//! - the measured phase: dnsperf `-Q` at 2,000 queries/s in all from the clients for the
//!   duration, `-v` (every answer's latency); in the same run dnsperf straight to the
//!   upstream from the node namespace at [`DIRECT_QPS`] (the baseline of "added"
//!   latency), and two paced probes of [`PROBE_QPS`] (`xtask fqdn-probe`, one through
//!   the proxy from an endpoint, one direct) whose queries carry their time, read
//!   against the agent's expiry sweeps (`ward_dns_cache_sweep_seconds`, scraped every
//!   [`SCRAPE`]); the agent's RSS and CPU sampled at each scrape.
//!
//! The agent runs on the subject CPU, everything else on the load CPU.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::agent::{self, RemoveDir, ADMIN};
use super::fqdn_dns::{self, MATCH_NAMES_PER_NS, NAMESPACES, NAMES_PER_NS};
use super::{parse, Ctx, Netns, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::{cargo, root, run, Result};

/// Pods a namespace: 500 endpoints in all.
const PODS_PER_NS: usize = 50;
/// The DNS pod's address (its gateway: .1).
const DNS_IP: &str = "10.81.250.2";
/// Queries a second from the client endpoints, in all.
const QPS: usize = 2_000;
/// Flows written to conntrack.
const CT_FLOWS: usize = 200_000;
/// Queries a second straight to the upstream (the baseline), and per probe.
const DIRECT_QPS: usize = 200;
const PROBE_QPS: usize = 50;
/// Load before conntrack is filled and the measure starts.
const WARMUP: Duration = Duration::from_secs(20);
/// How often the agent's metrics, RSS and CPU are read.
const SCRAPE: Duration = Duration::from_millis(250);
/// Targets of the issue: added p99 and max latency, ms.
const TARGET_P99_MS: f64 = 1.0;
const TARGET_MAX_MS: f64 = 10.0;

/// What the part runs.
#[derive(Clone, Debug, PartialEq)]
pub struct FqdnOpts {
    /// Length of the measured phase.
    pub secs: u64,
    /// Client endpoints that send the load (at most 500; spread over the namespaces).
    pub clients: usize,
    /// The `ward` measured, built beforehand (default: the checkout's `dist` build).
    pub ward: Option<PathBuf>,
    /// A `ward` from before the change, measured the same way in the same run.
    pub ward_base: Option<PathBuf>,
    /// The agent is killed once its RSS passes this (MiB), and the run reports it.
    pub rss_limit_mib: f64,
}

impl Default for FqdnOpts {
    fn default() -> FqdnOpts {
        FqdnOpts {
            secs: 180,
            clients: 20,
            ward: None,
            ward_base: None,
            rss_limit_mib: 4096.0,
        }
    }
}

/// Latency figures of one set of queries, microseconds.
#[derive(Clone, Debug, Default)]
struct Lat {
    n: usize,
    lost: u64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Lat {
    fn of(mut v: Vec<f64>, lost: u64) -> Lat {
        let n = v.len();
        let max = v.iter().copied().fold(0.0, f64::max);
        Lat {
            n,
            lost,
            p50: parse::percentile(&mut v, 50.0).unwrap_or(0.0),
            p99: parse::percentile(&mut v, 99.0).unwrap_or(0.0),
            max,
        }
    }
}

/// One scrape of the agent.
#[derive(Clone, Debug, Default)]
struct Sample {
    unix_ms: u64,
    rss_mib: f64,
    cpu_s: f64,
    /// `ward_dns_cache_sweep_seconds` count and sum (absent in builds without it).
    sweeps: Option<(f64, f64)>,
    /// `ward_dns_cache_ips`, `ward_fqdn_names` and `ward_policy_pushes_total`; None
    /// when the metrics did not answer in time.
    held: Option<(f64, f64, f64)>,
}

/// The figures of one subject.
#[derive(Clone, Debug, Default)]
struct Figures {
    failed: Option<String>,
    ready_s: f64,
    endpoints: u64,
    conntrack_written: u64,
    /// dnsperf through the proxy (all clients) and straight to the upstream.
    proxied: Lat,
    direct: Lat,
    achieved_qps: f64,
    /// The probes: through the proxy, all and while a sweep ran; direct.
    probe: Lat,
    probe_in_sweeps: Lat,
    probe_direct: Lat,
    /// Sweeps in the measured phase: count, mean and longest (ms, from the scrapes).
    sweeps: u64,
    sweep_mean_ms: f64,
    sweep_max_ms: f64,
    /// Answer to datapath (`ward_dns_datapath_update_seconds`), ms; bounded waits
    /// exceeded.
    dp_p50_ms: Option<f64>,
    dp_p99_ms: Option<f64>,
    dp_timeouts: f64,
    dp_updates: f64,
    rss_start_mib: f64,
    rss_max_mib: f64,
    rss_end_mib: f64,
    cpu_s: f64,
    /// The agent's busiest second (CPU seconds per second, over four scrapes).
    cpu_peak: f64,
    cache_ips: f64,
    cache_zombies: f64,
    cache_names: f64,
    evictions: f64,
    expirations: f64,
    ipcache: f64,
    policy: f64,
    classes: f64,
    conntrack_end: u64,
    pushes: f64,
}

/// Runs the part; returns its section of the report.
pub fn run_fqdn(ctx: &mut Ctx, o: &FqdnOpts) -> Result<String> {
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "redirect-bpf",
        "--example",
        "ct_fill",
    ]))?;
    let after = ctx.ward.clone();
    if !after.is_file() {
        return Err(format!("--ward {}: no such file", after.display()));
    }
    let mut subjects: Vec<(String, PathBuf)> = Vec::new();
    if let Some(base) = &o.ward_base {
        if !base.is_file() {
            return Err(format!("--ward-base {}: no such file", base.display()));
        }
        subjects.push(("before".to_string(), base.clone()));
    }
    subjects.push(("after".to_string(), after));
    let src = ctx.work.join("fqdn-src");
    std::fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    write(&src.join("cluster.yaml"), &cluster())?;
    write(&src.join("policies.yaml"), &policies())?;
    for g in 0..NAMESPACES {
        let names: String = (0..NAMES_PER_NS)
            .map(|k| format!("{} A\n", fqdn_dns::query_name(g, k)))
            .collect();
        write(&ctx.work.join(format!("names-{g}")), &names)?;
    }
    let secs = if ctx.quick { o.secs.min(30) } else { o.secs };
    let mut rows = Vec::new();
    for (n, (name, bin)) in subjects.iter().enumerate() {
        eprintln!("fqdn: {name} ({})", bin.display());
        let f = measure(ctx, o, bin, &src, n, secs).unwrap_or_else(|e| {
            eprintln!("fqdn: {name}: {e}");
            Figures {
                failed: Some(e),
                ..Figures::default()
            }
        });
        rows.push((name.clone(), f));
    }
    Ok(report(o, secs, &rows))
}

fn write(path: &Path, text: &str) -> Result {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn pod_ip(g: usize, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 81, g as u8, (i + 2) as u8)
}

/// The generated node: 500 pods in ten namespaces and the DNS pod.
fn cluster() -> String {
    let mut s = String::from("namespaces:\n- {name: dns}\n");
    for g in 0..NAMESPACES {
        let _ = writeln!(s, "- {{name: fq{g}}}");
    }
    s.push_str("nodes: [{name: node-1, ip: 203.0.113.1}]\npods:\n");
    let _ = writeln!(
        s,
        "- {{namespace: dns, name: dns-0, ip: {DNS_IP}, node: node-1, labels: {{app: dns}}}}"
    );
    for g in 0..NAMESPACES {
        for i in 0..PODS_PER_NS {
            let _ = writeln!(
                s,
                "- {{namespace: fq{g}, name: p{i}, ip: {}, node: node-1, labels: {{app: client}}}}",
                pod_ip(g, i)
            );
        }
    }
    s
}

/// One CNP a namespace: DNS to the DNS pod (every name), and its 1,000 names on 443.
fn policies() -> String {
    let mut s = String::new();
    for g in 0..NAMESPACES {
        let _ = write!(
            s,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
             metadata: {{name: fqdn-{g}, namespace: fq{g}}}\nspec:\n  \
             endpointSelector: {{}}\n  egress:\n  \
             - toEndpoints: [{{matchLabels: {{\"k8s:io.kubernetes.pod.namespace\": dns, app: dns}}}}]\n    \
             toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      \
             rules:\n        dns: [{{matchPattern: \"*\"}}]\n  - toFQDNs:\n"
        );
        for k in 0..NAMES_PER_NS {
            if k < MATCH_NAMES_PER_NS {
                let _ = writeln!(s, "    - {{matchName: {}}}", fqdn_dns::query_name(g, k));
            } else {
                let _ = writeln!(s, "    - {{matchPattern: \"*.p{k}.g{g}.fqdn.test\"}}");
            }
        }
        s.push_str("    toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n");
    }
    s
}

/// The client endpoints: `clients` pods spread over the namespaces (namespace, pod).
fn clients(n: usize) -> Vec<(usize, usize)> {
    (0..n.clamp(1, NAMESPACES * (PODS_PER_NS - 1)))
        .map(|c| (c % NAMESPACES, c / NAMESPACES))
        .collect()
}

/// The namespaces of one subject's node, deleted on drop (the node's last).
struct Node {
    pods: Vec<Netns>,
    dns: Netns,
    node: Netns,
}

impl Node {
    /// The node namespace, the DNS pod and 500 pods, each wired as a CNI does (a veth,
    /// a /32 route in the node).
    fn build(n: usize) -> Result<Node> {
        let node = Netns::new(&format!("fq{n}"))?;
        testkit::sysctl(node.name(), &["net.ipv4.ip_forward=1"]).map_err(|e| e.to_string())?;
        let link = |pod: &Netns, veth: &str, ip: Ipv4Addr| -> Result {
            let o = ip.octets();
            let gw = Ipv4Addr::new(o[0], o[1], o[2], 1);
            let subnet = testkit::Subnet {
                ip: ip.into(),
                gateway: gw.into(),
                prefix: 32,
            };
            testkit::link_pod(node.name(), veth, pod.name(), &[subnet])
                .map(drop)
                .map_err(|e| format!("{veth}: {e}"))
        };
        let dns = Netns::new(&format!("fq{n}-dns"))?;
        link(&dns, "fqdns", DNS_IP.parse().map_err(|e| format!("{e}"))?)?;
        let mut pods = Vec::new();
        for g in 0..NAMESPACES {
            for i in 0..PODS_PER_NS {
                let pod = Netns::new(&format!("fq{n}-{g}-{i}"))?;
                link(&pod, &format!("fq{g}x{i}"), pod_ip(g, i))?;
                pods.push(pod);
            }
        }
        Ok(Node { pods, dns, node })
    }

    fn pod(&self, g: usize, i: usize) -> &Netns {
        &self.pods[g * PODS_PER_NS + i]
    }
}

/// Runs one agent on the generated node and measures it; a run that stops short says
/// why, with what the scrapes saw until then.
fn measure(
    ctx: &mut Ctx,
    o: &FqdnOpts,
    ward: &Path,
    src: &Path,
    n: usize,
    secs: u64,
) -> Result<Figures> {
    let monitor = Monitor::default();
    let r = measure_with(ctx, o, ward, src, n, secs, &monitor);
    let samples = monitor.finish();
    let killed = monitor.killed.lock().ok().and_then(|k| k.clone());
    match (r, killed) {
        (Ok(f), None) => Ok(f),
        (Ok(_), Some(k)) => Err(format!("{k}{}", trajectory(&samples))),
        (Err(e), Some(k)) => Err(format!("{k} ({e}){}", trajectory(&samples))),
        (Err(e), None) => Err(format!("{e}{}", trajectory(&samples))),
    }
}

#[allow(clippy::too_many_arguments)]
fn measure_with(
    ctx: &mut Ctx,
    o: &FqdnOpts,
    ward: &Path,
    src: &Path,
    n: usize,
    secs: u64,
    monitor: &Monitor,
) -> Result<Figures> {
    let dir = ctx.work.join(format!("fqdn-run-{n}"));
    let source = agent::copy_source(src, &dir)?;
    let built = Instant::now();
    let node = Node::build(n)?;
    eprintln!(
        "fqdn: 501 pods wired in {:.1} s",
        built.elapsed().as_secs_f64()
    );
    let ns = &node.node;
    let xtask = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let mut up_cmd = node.dns.cmd(LOAD_CPU, &xtask.display().to_string());
    up_cmd.args(["fqdn-upstream", &format!("{DNS_IP}:53")]);
    let up_log = dir.join("upstream.log");
    let mut upstream = Proc::spawn(ctx, "fqdn upstream", &mut up_cmd, &up_log)?;

    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/ward-loadtest-{}-fq{n}",
        std::process::id()
    ));
    let _pins = RemoveDir(pins.clone());
    let log = dir.join("agent.log");
    let mut cmd = agent::command(ward, ns, &source, &pins, &dir);
    let start = Instant::now();
    let mut agent = Proc::spawn(ctx, "ward agent", &mut cmd, &log)?;
    let pid = agent.pid();
    monitor.start(ns, pid, o.rss_limit_mib);
    let mut f = Figures::default();
    let all = NAMESPACES * PODS_PER_NS + 1;
    wait(&format!("ward agent ready ({})", log.display()), || {
        agent.alive(&log)?;
        upstream.alive(&up_log)?;
        let Some(m) = admin(ns, "/metrics") else {
            return Ok(false);
        };
        Ok(admin(ns, "/readyz").is_some()
            && gauge(&m, "ward_endpoints_attached").is_some_and(|a| a >= all as f64))
    })?;
    f.ready_s = start.elapsed().as_secs_f64();
    f.endpoints = gauge(
        &admin(ns, "/metrics").unwrap_or_default(),
        "ward_endpoints_attached",
    )
    .unwrap_or(0.0) as u64;
    eprintln!(
        "fqdn: agent ready with {} endpoints in {:.1} s",
        f.endpoints, f.ready_s
    );

    let clients = clients(o.clients);
    let per_client = (QPS / clients.len()).max(1);
    // A query through the proxy is answered and counted by it (the redirect works).
    let probe_out = dir.join("probe-check");
    let (g0, i0) = clients[0];
    let mut check = node.pod(g0, i0).cmd(LOAD_CPU, &xtask.display().to_string());
    check
        .arg("fqdn-probe")
        .arg(format!("{DNS_IP}:53"))
        .arg(ctx.work.join(format!("names-{g0}")))
        .args(["20", "2"])
        .arg(&probe_out);
    super::output(ctx, &mut check)?;
    let answered = std::fs::read_to_string(&probe_out)
        .map_err(|e| format!("{}: {e}", probe_out.display()))?
        .lines()
        .filter(|l| !l.ends_with(" -1"))
        .count();
    let forwarded = counter_sum(
        &admin(ns, "/metrics").unwrap_or_default(),
        "ward_dns_queries_total{",
        "verdict=\"forwarded\"",
    );
    if answered == 0 || forwarded < 1.0 {
        return Err(format!(
            "the check queries were not answered through the DNS proxy ({answered} answered, \
             {forwarded} forwarded by the proxy)"
        ));
    }

    // Warm-up
    let work = ctx.work.clone();
    let dnsperf = |g: usize, i: usize, secs: u64, qps: usize, verbose: bool| {
        let mut c = node.pod(g, i).cmd(LOAD_CPU, "dnsperf");
        c.args(["-s", DNS_IP, "-d"])
            .arg(work.join(format!("names-{g}")))
            .args(["-l", &secs.to_string(), "-Q", &qps.to_string(), "-q", "500"]);
        if verbose {
            c.arg("-v");
        }
        c
    };
    let warm = if ctx.quick {
        Duration::from_secs(8)
    } else {
        WARMUP
    };
    eprintln!("fqdn: warm-up {} s", warm.as_secs());
    let mut warming: Vec<Child> = Vec::new();
    for &(g, i) in &clients {
        let mut c = dnsperf(g, i, warm.as_secs(), per_client, false);
        ctx.log(&c);
        warming.push(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("dnsperf: {e}"))?,
        );
    }
    for mut c in warming {
        let _ = c.wait();
    }
    agent.alive(&log)?;

    // Conntrack: flows from the clients to what they learned.
    // a large answer from a busy agent: a longer wait, a few tries
    let learned = (0..3)
        .find_map(|_| admin_within(ns, "/v1/fqdn", 60))
        .ok_or_else(|| format!("no /v1/fqdn; the agent's log ends: {}", tail(&log)))?;
    let pairs = flow_pairs(&learned)?;
    if pairs.is_empty() {
        return Err("the clients learned nothing during the warm-up".into());
    }
    let fill = root().join("target/release/examples/ct_fill");
    let mut fill_cmd = Command::new("taskset");
    fill_cmd
        .args(["-c", LOAD_CPU])
        .arg(&fill)
        .arg(&pins)
        .arg(CT_FLOWS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    ctx.log(&fill_cmd);
    let mut child = fill_cmd.spawn().map_err(|e| format!("ct_fill: {e}"))?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().ok_or("ct_fill: no stdin")?;
        let text: String = pairs.iter().map(|(s, d)| format!("{s} {d}\n")).collect();
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("ct_fill: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ct_fill: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ct_fill failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    f.conntrack_written = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    eprintln!(
        "fqdn: conntrack holds {} flows ({} client/address pairs)",
        f.conntrack_written,
        pairs.len()
    );

    // The measured phase.
    let before = admin(ns, "/metrics").ok_or("no /metrics")?;
    let measure_from = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let cpu0 = agent.cpu_seconds()?;
    eprintln!("fqdn: measuring {secs} s at {QPS} queries/s");
    let mut loads: Vec<(Child, PathBuf)> = Vec::new();
    let spawn_out = |c: &mut Command, out: PathBuf, ctx: &mut Ctx| -> Result<(Child, PathBuf)> {
        ctx.log(c);
        let file = std::fs::File::create(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let child = c
            .stdout(file)
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {c:?}: {e}"))?;
        Ok((child, out))
    };
    for (k, &(g, i)) in clients.iter().enumerate() {
        let mut c = dnsperf(g, i, secs, per_client, true);
        loads.push(spawn_out(&mut c, dir.join(format!("dnsperf-{k}")), ctx)?);
    }
    let mut direct = ns.cmd(LOAD_CPU, "dnsperf");
    direct
        .args(["-s", DNS_IP, "-d"])
        .arg(ctx.work.join("names-0"))
        .args(["-l", &secs.to_string(), "-Q", &DIRECT_QPS.to_string(), "-v"]);
    let direct = spawn_out(&mut direct, dir.join("dnsperf-direct"), ctx)?;
    // the probe through the proxy runs from a pod that sends no other load
    let probe_pod = node.pod(NAMESPACES - 1, PODS_PER_NS - 1);
    let probe = |netns: &Netns, out: &Path| {
        let mut c = netns.cmd(LOAD_CPU, &xtask.display().to_string());
        c.arg("fqdn-probe")
            .arg(format!("{DNS_IP}:53"))
            .arg(work.join(format!("names-{}", NAMESPACES - 1)))
            .arg(PROBE_QPS.to_string())
            .arg(secs.to_string())
            .arg(out);
        c
    };
    let probe_file = dir.join("probe-proxied");
    let direct_probe_file = dir.join("probe-direct");
    let mut p1 = probe(probe_pod, &probe_file);
    let mut p2 = probe(ns, &direct_probe_file);
    let probes = [
        spawn_out(&mut p1, dir.join("probe-proxied.out"), ctx)?,
        spawn_out(&mut p2, dir.join("probe-direct.out"), ctx)?,
    ];
    let mut proxied_lat = Vec::new();
    let mut lost = 0;
    let mut completed = 0.0;
    for (mut c, out) in loads {
        let _ = c.wait();
        let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let (done, l, qps) =
            parse::dnsperf(&text).ok_or_else(|| format!("cannot read {}", out.display()))?;
        let _ = done;
        lost += l;
        completed += qps;
        proxied_lat.extend(parse::dnsperf_latencies(&text));
    }
    let (mut c, out) = direct;
    let _ = c.wait();
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let direct_lost = parse::dnsperf(&text).map_or(0, |r| r.1);
    f.direct = Lat::of(parse::dnsperf_latencies(&text), direct_lost);
    for (mut c, _) in probes {
        let _ = c.wait();
    }
    let cpu1 = agent.cpu_seconds()?;
    agent.alive(&log)?;
    let after = admin(ns, "/metrics").ok_or("no /metrics")?;
    f.proxied = Lat::of(proxied_lat, lost);
    f.achieved_qps = completed;
    f.cpu_s = cpu1 - cpu0;

    let samples: Vec<Sample> = monitor
        .samples
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.unix_ms >= measure_from)
        .collect();
    let windows = sweep_windows(&samples);
    let probe_rows = probe_lines(&probe_file)?;
    let all_probe: Vec<f64> = probe_rows.iter().filter_map(|r| r.1).collect();
    let probe_lost = probe_rows.iter().filter(|r| r.1.is_none()).count() as u64;
    f.probe = Lat::of(all_probe, probe_lost);
    let in_sweeps: Vec<f64> = probe_rows
        .iter()
        .filter(|(t, _)| windows.iter().any(|(a, b)| *t >= *a && *t <= *b))
        .filter_map(|r| r.1)
        .collect();
    f.probe_in_sweeps = Lat::of(in_sweeps, 0);
    let direct_rows = probe_lines(&direct_probe_file)?;
    f.probe_direct = Lat::of(
        direct_rows.iter().filter_map(|r| r.1).collect(),
        direct_rows.iter().filter(|r| r.1.is_none()).count() as u64,
    );
    let durations: Vec<f64> = sweep_durations(&samples);
    f.sweeps = durations.len() as u64;
    f.sweep_mean_ms = if durations.is_empty() {
        0.0
    } else {
        durations.iter().sum::<f64>() / durations.len() as f64
    };
    f.sweep_max_ms = durations.iter().copied().fold(0.0, f64::max);
    let dp = "ward_dns_datapath_update_seconds";
    let (b, a) = (
        parse::histogram_buckets(&before, dp),
        parse::histogram_buckets(&after, dp),
    );
    f.dp_p50_ms = parse::histogram_percentile(&b, &a, 50.0).map(|s| s * 1e3);
    f.dp_p99_ms = parse::histogram_percentile(&b, &a, 99.0).map(|s| s * 1e3);
    f.dp_updates = a.last().map_or(0.0, |x| x.1) - b.last().map_or(0.0, |x| x.1);
    let delta =
        |name: &str| gauge(&after, name).unwrap_or(0.0) - gauge(&before, name).unwrap_or(0.0);
    f.dp_timeouts = delta("ward_dns_datapath_update_timeouts_total");
    f.evictions = delta("ward_dns_cache_evictions_total");
    f.expirations = delta("ward_dns_cache_expirations_total");
    f.pushes = delta("ward_policy_pushes_total");
    f.cache_ips = gauge(&after, "ward_dns_cache_ips").unwrap_or(0.0);
    f.cache_zombies = gauge(&after, "ward_dns_cache_zombies").unwrap_or(0.0);
    f.cache_names = gauge(&after, "ward_dns_cache_names").unwrap_or(0.0);
    let status = admin(ns, "/v1/status").unwrap_or_default();
    f.ipcache = parse::json_number(&status, "ipcache").unwrap_or(0.0);
    f.policy = parse::json_number(&status, "policy").unwrap_or(0.0);
    f.classes = parse::json_number(&status, "classes").unwrap_or(0.0);
    f.cpu_peak = samples
        .windows(5)
        .map(|w| {
            let dt = (w[4].unix_ms.saturating_sub(w[0].unix_ms)) as f64 / 1e3;
            if dt > 0.0 {
                (w[4].cpu_s - w[0].cpu_s) / dt
            } else {
                0.0
            }
        })
        .fold(0.0, f64::max);
    f.rss_start_mib = samples.first().map_or(0.0, |s| s.rss_mib);
    f.rss_max_mib = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    f.rss_end_mib = samples.last().map_or(0.0, |s| s.rss_mib);
    let mut count = Command::new(&fill);
    count.arg(&pins).arg("0").stdin(Stdio::null());
    f.conntrack_end = super::output(ctx, &mut count)?.trim().parse().unwrap_or(0);
    drop(agent);
    drop(upstream);
    drop(node);
    Ok(f)
}

/// (client pod IP, learned address) for every address the client endpoints learned, from
/// the agent's `/v1/fqdn` (`{"fq0/p1": {"name.": ["10.128.0.1", ...]}}`).
fn flow_pairs(json: &str) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("/v1/fqdn: {e}"))?;
    let mut out = Vec::new();
    let Some(endpoints) = v.as_object() else {
        return Err("/v1/fqdn: not an object".into());
    };
    for (endpoint, names) in endpoints {
        let Some((g, i)) = endpoint
            .strip_prefix("fq")
            .and_then(|r| r.split_once("/p"))
            .and_then(|(g, i)| Some((g.parse::<usize>().ok()?, i.parse::<usize>().ok()?)))
        else {
            continue;
        };
        let src = pod_ip(g, i);
        for ips in names.as_object().into_iter().flat_map(|m| m.values()) {
            for ip in ips.as_array().into_iter().flatten() {
                if let Some(dst) = ip.as_str().and_then(|s| s.parse().ok()) {
                    out.push((src, dst));
                }
            }
        }
    }
    Ok(out)
}

/// One scrape: metrics, RSS and CPU of the agent.
fn sample(ns: &str, pid: u32, ticks: f64) -> Option<Sample> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "taskset", "-c", LOAD_CPU, "curl", "-sf",
        ])
        .args(["--max-time", "2"])
        .arg(format!("http://127.0.0.1:{ADMIN}/metrics"))
        .output()
        .ok()?;
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&out.stdout);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let sweeps = gauge(&text, "ward_dns_cache_sweep_seconds_count")
        .zip(gauge(&text, "ward_dns_cache_sweep_seconds_sum"));
    Some(Sample {
        unix_ms,
        rss_mib: parse::status_kib(&status, "VmRSS")? / 1024.0,
        cpu_s: parse::stat_cpu_ticks(&stat)? as f64 / ticks,
        sweeps,
        held: out.status.success().then(|| {
            (
                gauge(&text, "ward_fqdn_names").unwrap_or(0.0),
                gauge(&text, "ward_dns_cache_ips").unwrap_or(0.0),
                gauge(&text, "ward_policy_pushes_total").unwrap_or(0.0),
            )
        }),
    })
}

/// The stretches of time (unix ms) in which a sweep ran: between two scrapes where the
/// sweep count moved, widened back by the sweeps' own time.
fn sweep_windows(samples: &[Sample]) -> Vec<(u64, u64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let ((c0, s0), (c1, s1)) = (w[0].sweeps?, w[1].sweeps?);
            (c1 > c0).then(|| {
                let took_ms = ((s1 - s0) * 1e3).round() as u64;
                (w[0].unix_ms.saturating_sub(took_ms), w[1].unix_ms)
            })
        })
        .collect()
}

/// Each scrape interval's sweeps' mean time, ms (one value per sweep).
fn sweep_durations(samples: &[Sample]) -> Vec<f64> {
    let mut out = Vec::new();
    for w in samples.windows(2) {
        if let (Some((c0, s0)), Some((c1, s1))) = (w[0].sweeps, w[1].sweeps) {
            let n = (c1 - c0).round() as usize;
            for _ in 0..n {
                out.push((s1 - s0) * 1e3 / n as f64);
            }
        }
    }
    out
}

/// A probe's lines: (unix ms sent, latency in µs or None when unanswered).
fn probe_lines(path: &Path) -> Result<Vec<(u64, Option<f64>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (t, us) = l.split_once(' ')?;
            let us: f64 = us.trim().parse().ok()?;
            Some((t.parse().ok()?, (us >= 0.0).then_some(us)))
        })
        .collect())
}

/// A gauge's or counter's value (a line `name value`, or the first line starting with
/// `name` and a label set).
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

/// The sum of the series whose line starts with `prefix` and holds `label`.
fn counter_sum(text: &str, prefix: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(label))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Polls `f` every 50 ms for at most three minutes.
fn wait(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result {
    let start = Instant::now();
    while !f()? {
        if start.elapsed() > Duration::from_secs(180) {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The last lines of a log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// A GET to the agent's admin endpoint; None when it does not answer 200.
fn admin(ns: &Netns, path: &str) -> Option<String> {
    admin_within(ns, path, 10)
}

/// [`admin`] with a time limit in seconds.
fn admin_within(ns: &Netns, path: &str, secs: u32) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "curl", "-sf", "--max-time"])
        .arg(secs.to_string())
        .arg(format!("http://127.0.0.1:{ADMIN}{path}"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Watches the agent from its start: scrapes every [`SCRAPE`] (the figures of the run),
/// and a guard that kills it (SIGKILL, by its PID) once its RSS passes the limit, so that
/// a runaway agent cannot take the shared machine's memory.
#[derive(Default)]
struct Monitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    /// Why the guard killed the agent.
    killed: Arc<Mutex<Option<String>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Monitor {
    fn start(&self, ns: &Netns, pid: u32, limit_mib: f64) {
        let (samples, stop, ns_name) = (
            self.samples.clone(),
            self.stop.clone(),
            ns.name().to_string(),
        );
        let ticks = super::clock_ticks() as f64;
        let scraper = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let next = Instant::now() + SCRAPE;
                if let Some(s) = sample(&ns_name, pid, ticks) {
                    if let Ok(mut v) = samples.lock() {
                        v.push(s);
                    }
                }
                if let Some(left) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(left);
                }
            }
        });
        let (stop, killed) = (self.stop.clone(), self.killed.clone());
        let started = Instant::now();
        let guard = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
                let Some(rss) = status.ok().and_then(|s| parse::status_kib(&s, "VmRSS")) else {
                    return;
                };
                if rss / 1024.0 > limit_mib {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                    if let Ok(mut k) = killed.lock() {
                        *k = Some(format!(
                            "RSS {:.0} MiB passed the limit of {limit_mib:.0} MiB {:.0} s after the start; the agent was killed",
                            rss / 1024.0,
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        if let Ok(mut t) = self.threads.lock() {
            t.extend([scraper, guard]);
        }
    }

    fn finish(&self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t));
        for t in threads.unwrap_or_default() {
            let _ = t.join();
        }
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What the scrapes say about a run that stopped short: RSS against what the agent held.
fn trajectory(samples: &[Sample]) -> String {
    let Some(first) = samples.first() else {
        return String::new();
    };
    let step = (samples.len() / 8).max(1);
    let points: Vec<String> = samples
        .iter()
        .step_by(step)
        .chain(samples.last())
        .map(|s| {
            let held = match s.held {
                Some((names, ips, pushes)) => {
                    format!("{names:.0} names learned, {ips:.0} cache IPs, {pushes:.0} pushes")
                }
                None => "metrics did not answer within 2 s".to_string(),
            };
            format!(
                "{:.0} s: {:.0} MiB, {held}",
                (s.unix_ms - first.unix_ms) as f64 / 1e3,
                s.rss_mib,
            )
        })
        .collect();
    format!("; from the agent's start: {}", points.join("; "))
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1e3)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn report(o: &FqdnOpts, secs: u64, rows: &[(String, Figures)]) -> String {
    let clients = clients(o.clients).len();
    let mut s = String::from("## FQDN: the DNS proxy and the datapath at scale\n\n");
    let _ = writeln!(
        s,
        "`ward agent --source files --node node-1` on CPU {SUBJECT_CPU} with {} local \
         endpoints (a namespace and a veth each) in {NAMESPACES} namespaces, each namespace \
         one CNP allowing DNS (`*`) and {NAMES_PER_NS} toFQDNs names on TCP 443 \
         ({MATCH_NAMES_PER_NS} matchName, {} matchPattern): {} names. Upstream: `xtask \
         fqdn-upstream` in the DNS pod, 100,000 distinct addresses (10.128.0.0/15, data \
         only; 10 a name, two an answer, moving by one each query), TTL 1-30 s. Load: dnsperf \
         from {clients} endpoints, {QPS} queries/s in all, for {secs} s after a warm-up of \
         {} s; {CT_FLOWS} conntrack flows written before the measure from the clients to \
         addresses they learned. Baseline in the same run: dnsperf from the node straight \
         to the upstream at {DIRECT_QPS}/s. Probes: one query at a time at {PROBE_QPS}/s, \
         through the proxy from an endpoint without other load, and direct; \"in sweeps\" \
         are the probe's queries sent while an expiry sweep ran (scrapes every {} ms of \
         `ward_dns_cache_sweep_seconds`; builds without it show none). Latency in ms.\n",
        NAMESPACES * PODS_PER_NS,
        NAMES_PER_NS - MATCH_NAMES_PER_NS,
        NAMESPACES * NAMES_PER_NS,
        WARMUP.as_secs(),
        SCRAPE.as_millis(),
    );
    s.push_str(
        "| subject | ready s | endpoints | q/s | proxied p50 / p99 / max | lost | direct p50 / p99 / max | added p50 / p99 | probe p50 / p99 / max | probe in sweeps (n) p50 / p99 / max | probe direct p50 / p99 / max |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, f) in rows {
        if let Some(e) = &f.failed {
            let _ = writeln!(s, "| {name} | failed: {} ||||||||||", e.replace('\n', " "));
            continue;
        }
        let l3 = |l: &Lat| format!("{} / {} / {}", ms(l.p50), ms(l.p99), ms(l.max));
        let _ = writeln!(
            s,
            "| {name} | {:.1} | {} | {:.0} | {} | {} | {} | {} / {} | {} | ({}) {} | {} |",
            f.ready_s,
            f.endpoints,
            f.achieved_qps,
            l3(&f.proxied),
            f.proxied.lost,
            l3(&f.direct),
            ms(f.proxied.p50 - f.direct.p50),
            ms(f.proxied.p99 - f.direct.p99),
            l3(&f.probe),
            f.probe_in_sweeps.n,
            l3(&f.probe_in_sweeps),
            l3(&f.probe_direct),
        );
    }
    s.push_str(
        "\n| subject | answer -> datapath p50 / p99 ms | updates | bounded waits exceeded | sweeps | sweep mean / max ms | expired | evicted | cache names / IPs / zombies | ipcache | policy entries | classes | conntrack written / at end | pushes | RSS start / max / end MiB | CPU s (per s; busiest s) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, f) in rows {
        if f.failed.is_some() {
            continue;
        }
        let _ = writeln!(
            s,
            "| {name} | {} / {} | {:.0} | {:.0} | {} | {:.1} / {:.1} | {:.0} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {} / {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.1} ({:.2}; {:.2}) |",
            opt_ms(f.dp_p50_ms),
            opt_ms(f.dp_p99_ms),
            f.dp_updates,
            f.dp_timeouts,
            f.sweeps,
            f.sweep_mean_ms,
            f.sweep_max_ms,
            f.expirations,
            f.evictions,
            f.cache_names,
            f.cache_ips,
            f.cache_zombies,
            f.ipcache,
            f.policy,
            f.classes,
            f.conntrack_written,
            f.conntrack_end,
            f.pushes,
            f.rss_start_mib,
            f.rss_max_mib,
            f.rss_end_mib,
            f.cpu_s,
            f.cpu_s / secs.max(1) as f64,
            f.cpu_peak,
        );
    }
    if let Some((_, f)) = rows
        .iter()
        .find(|(n, f)| n == "after" && f.failed.is_none())
    {
        let added_p99 = (f.proxied.p99 - f.direct.p99) / 1e3;
        let added_max = (f.proxied.max - f.direct.p50) / 1e3;
        let sweep_max = (f.probe_in_sweeps.max - f.probe_direct.p50) / 1e3;
        let _ =
            writeln!(
            s,
            "\nTargets (the current build): added p99 under {TARGET_P99_MS} ms: {added_p99:.2} \
             ms, {}; added max under {TARGET_MAX_MS} ms (the slowest answer less the direct \
             median): {added_max:.2} ms, {}; during sweeps (the probe's slowest less the \
             direct median): {sweep_max:.2} ms, {}.",
            if added_p99 < TARGET_P99_MS { "met" } else { "MISSED" },
            if added_max < TARGET_MAX_MS { "met" } else { "MISSED" },
            if sweep_max < TARGET_MAX_MS { "met" } else { "MISSED" },
        );
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_node_parses_as_the_agent_reads_it() {
        let c: serde_yaml::Value = serde_yaml::from_str(&cluster()).expect("cluster yaml");
        assert_eq!(c["pods"].as_sequence().map(Vec::len), Some(501));
        let docs: Vec<serde_yaml::Value> = policies()
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).expect("policy yaml"))
            .collect();
        assert_eq!(docs.len(), NAMESPACES);
        let fqdns = docs[3]["spec"]["egress"][1]["toFQDNs"]
            .as_sequence()
            .expect("toFQDNs");
        assert_eq!(fqdns.len(), NAMES_PER_NS);
        assert_eq!(fqdns[0]["matchName"].as_str(), Some("n0.g3.fqdn.test"));
        assert_eq!(
            fqdns[999]["matchPattern"].as_str(),
            Some("*.p999.g3.fqdn.test")
        );
    }

    #[test]
    fn clients_spread_over_the_namespaces_and_leave_the_probe_pod() {
        let c = clients(20);
        assert_eq!(c.len(), 20);
        assert_eq!(c[0], (0, 0));
        assert_eq!(c[10], (0, 1));
        assert!(c
            .iter()
            .all(|&(g, i)| g < NAMESPACES && i < PODS_PER_NS - 1));
        assert_eq!(clients(10_000).len(), NAMESPACES * (PODS_PER_NS - 1));
    }

    #[test]
    fn flows_pair_each_client_with_what_it_learned() {
        let pairs = flow_pairs(
            r#"{"fq3/p1": {"n1.g3.fqdn.test.": ["10.128.0.1", "10.128.0.2"]}, "dns/dns-0": {}}"#,
        )
        .expect("pairs");
        let src = Ipv4Addr::new(10, 81, 3, 3);
        assert_eq!(
            pairs,
            vec![
                (src, Ipv4Addr::new(10, 128, 0, 1)),
                (src, Ipv4Addr::new(10, 128, 0, 2))
            ]
        );
        assert!(flow_pairs("[").is_err());
    }

    #[test]
    fn sweeps_are_read_from_scrapes() {
        let s = |t: u64, c: f64, sum: f64| Sample {
            unix_ms: t,
            sweeps: Some((c, sum)),
            ..Sample::default()
        };
        let samples = [s(1_000, 1.0, 0.1), s(1_250, 1.0, 0.1), s(1_500, 2.0, 0.15)];
        assert_eq!(sweep_windows(&samples), vec![(1_200, 1_500)]);
        let d = sweep_durations(&samples);
        assert_eq!(d.len(), 1);
        assert!((d[0] - 50.0).abs() < 1e-6);
        let text = "ward_x 3\nward_dns_queries_total{rcode=\"NoError\",verdict=\"forwarded\"} 7\n\
                    ward_dns_queries_total{rcode=\"Refused\",verdict=\"denied\"} 2\n\
                    ward_dns_queries_total{rcode=\"ServFail\",verdict=\"forwarded\"} 1\n";
        assert_eq!(gauge(text, "ward_x"), Some(3.0));
        assert_eq!(gauge(text, "ward_dns_queries_total"), Some(7.0));
        assert_eq!(gauge(text, "ward_y"), None);
        assert_eq!(
            counter_sum(text, "ward_dns_queries_total{", "verdict=\"forwarded\""),
            8.0
        );
    }
}
