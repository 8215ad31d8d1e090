//! End to end: HTTP and DNS between two pods of a `ward-lab` lab on two nodes, through
//! what enforces the client's egress policy on its node, in four configurations measured
//! in the same rounds:
//!
//! - (a) `no agents`: the lab without agents, nothing enforced;
//! - (b) `ward L3/L4`: the agents, an egress policy that allows the server's port with no
//!   HTTP rules (the TC programs alone);
//! - (c) `ward HTTP`: the same port with N HTTP rules, redirected to the agent's
//!   transparent proxy on node 1;
//! - (d) `haproxy`: the same policy and redirect, taken by HAProxy running transparent in
//!   node 1's namespace (`bind 127.0.0.1:15001 transparent`, upstream `usesrc clientip`)
//!   with the same N rules. The datapath hands a redirected flow to the listener the
//!   kernel finds for `127.0.0.1:PORT`; the agent listens on `0.0.0.0:PORT` with
//!   `SO_REUSEPORT`, so HAProxy's more specific listener on the same port (HAProxy sets
//!   `SO_REUSEPORT` too) takes every redirected connection while the agent keeps its
//!   datapath and DNS proxy. HAProxy 2.6 cannot mark its upstream sockets (`set-bc-mark`
//!   came later), so a mangle rule in node 1's `OUTPUT` chain gives them the egress
//!   proxy's mark, as the agent's own upstream sockets carry it.
//!
//! DNS (e): dnsperf from the client pod to the DNS pod's lab server, direct (a), allowed
//! by L3/L4 (b), and through the agent's DNS proxy (c, whose policy has DNS rules).
//!
//! Each point (configuration, rule count, connections) is a lab of its own (`ward-lab up`
//! of a scenario written here, `ward-lab down` of that lab only), so no measurement
//! leaves anything (programs, netfilter hooks, sockets, a process's state) in the next
//! one's way. Before any load, every
//! configuration is checked for what it must enforce and a failed check fails the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::parse::{self, percentile};
use super::proxy::{rules, DENIED_PATH, HEADER};
use super::{output, pid_cpu_seconds, Ctx, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::Result;

/// Connections and rule counts of a full run.
pub const CONNS: [usize; 4] = [1, 16, 64, 256];
pub const RULES: [usize; 4] = [10, 50, 100, 1000];
/// The point the sweeps start from.
const BASE_RULES: usize = 50;
const BASE_CONNS: usize = 64;

const CLIENT_IP: &str = "10.0.1.10";
const WEB_IP: &str = "10.0.2.20";
const DNS_IP: &str = "10.0.2.53";
/// The server's port the policy names, and one it serves that no policy allows.
const PORT: u16 = 80;
const CLOSED_PORT: u16 = 8081;
/// The agent's HTTP proxy port (its default), where the datapath's redirect looks.
const PROXY_PORT: u16 = 15001;
/// The egress proxy's mark (`redirect_bpf::common::MARK_FROM_EGRESS_PROXY`).
const EGRESS_PROXY_MARK: &str = "0xb00/0xf00";
/// Ward's 403 body, and HAProxy's (distinct, so that a check knows who answered).
const WARD_DENY: &str = "Access denied\r\n";
const HAPROXY_DENY: &str = "Access denied (haproxy)";
/// The name the DNS rules allow, and one they refuse.
const ALLOWED_NAME: &str = "web.e2e.svc.cluster.local";
const REFUSED_NAME: &str = "evil.example";
/// The query rate of the DNS latency run.
const DNS_LATENCY_QPS: &str = "1000";

/// `--rules`, `--conns` when the e2e part is named.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct E2eOpts {
    pub rules: Option<Vec<usize>>,
    pub conns: Option<Vec<usize>>,
}

impl E2eOpts {
    /// The rule counts and connections to measure, and the base point of each: the full
    /// lists by default, 50 rules and 64 connections with `quick`.
    fn axes(&self, quick: bool) -> Axes {
        let pick = |given: &Option<Vec<usize>>, full: &[usize], base: usize| {
            let v = match given {
                Some(v) => v.clone(),
                None if quick => vec![base],
                None => full.to_vec(),
            };
            let b = if v.contains(&base) { base } else { v[0] };
            (v, b)
        };
        let (rules, base_rules) = pick(&self.rules, &RULES, BASE_RULES);
        let (conns, base_conns) = pick(&self.conns, &CONNS, BASE_CONNS);
        Axes {
            rules,
            conns,
            base_rules,
            base_conns,
        }
    }
}

#[derive(Debug, PartialEq)]
struct Axes {
    rules: Vec<usize>,
    conns: Vec<usize>,
    base_rules: usize,
    base_conns: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Subject {
    NoAgent,
    L4,
    WardHttp,
    Haproxy,
}

const SUBJECTS: [Subject; 4] = [
    Subject::NoAgent,
    Subject::L4,
    Subject::WardHttp,
    Subject::Haproxy,
];

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::NoAgent => "(a) no agents",
            Subject::L4 => "(b) ward L3/L4",
            Subject::WardHttp => "(c) ward HTTP",
            Subject::Haproxy => "(d) haproxy",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Subject::NoAgent => "a",
            Subject::L4 => "b",
            Subject::WardHttp => "c",
            Subject::Haproxy => "d",
        }
    }

    /// Its line's colour in every panel of the chart.
    fn color(self) -> &'static str {
        match self {
            Subject::NoAgent => "#777777",
            Subject::L4 => "#1b9e77",
            Subject::WardHttp => "#d95f02",
            Subject::Haproxy => "#7570b3",
        }
    }

    /// Whether the subject applies HTTP rules (and so is measured along the rules axis).
    fn has_rules(self) -> bool {
        matches!(self, Subject::WardHttp | Subject::Haproxy)
    }

    fn agents(self) -> bool {
        self != Subject::NoAgent
    }
}

/// One lab of a round: a subject, a rule count and the connections to drive. Every
/// point gets a lab of its own: HAProxy measured after other points in the same process
/// and lab cost 2-3 times as much CPU per request as in a fresh one (50 rules, 64
/// connections after 1 and 16), so no point inherits another's state.
#[derive(Debug, PartialEq)]
struct LabRun {
    subject: Subject,
    rules: usize,
    conns: usize,
    /// Whether the DNS part runs in this lab (once per subject, at the base point; (d)'s
    /// DNS goes through the same DNS proxy as (c)'s).
    dns: bool,
}

/// The labs of round `round` (0-based): every subject, in an order that rotates from
/// round to round; the subjects with rules at every rule count, the connections swept at
/// the base rules only.
fn labs(axes: &Axes, round: usize) -> Vec<LabRun> {
    let mut order = SUBJECTS.to_vec();
    order.rotate_left(round % SUBJECTS.len());
    let mut out = Vec::new();
    for s in order {
        let counts = if s.has_rules() {
            axes.rules.clone()
        } else {
            vec![axes.base_rules]
        };
        for r in counts {
            let conns = if r == axes.base_rules {
                axes.conns.clone()
            } else {
                vec![axes.base_conns]
            };
            for c in conns {
                let base = r == axes.base_rules && c == axes.base_conns;
                out.push(LabRun {
                    subject: s,
                    rules: r,
                    conns: c,
                    dns: base && s != Subject::Haproxy,
                });
            }
        }
    }
    out
}

/// The benchmarked path: it matches the last of `n` rules (`GET /api/v1/svcN-1/.*`).
fn bench_path(n: usize) -> String {
    format!("/api/v1/svc{}/items", n - 1)
}

/// The lab scenario of `subject` with `n` HTTP rules: the client on node 1, the web
/// server and the DNS pod on node 2, and the client's egress policy.
fn scenario(subject: Subject, n: usize) -> String {
    let mut s = format!(
        "format: netpol-oracle/v1
id: e2e
name: e2e-loadtest
title: the e2e load test's lab (written by cargo xtask loadtest e2e)
semantics: cilium
cluster:
  namespaces:
  - {{name: e2e, labels: {{}}}}
  nodes:
  - {{name: node-1, ip: 172.18.0.2}}
  - {{name: node-2, ip: 172.18.0.3}}
  pods:
  - {{namespace: e2e, name: client, labels: {{app: client}}, ip: {CLIENT_IP}, node: node-1}}
  - {{namespace: e2e, name: web, labels: {{app: web}}, ip: {WEB_IP}, node: node-2}}
  - namespace: e2e
    name: dns
    labels: {{app: dns}}
    ip: {DNS_IP}
    node: node-2
    ports:
    - {{name: dns, port: 53, protocol: UDP}}
probes: []
policies:"
    );
    if subject == Subject::NoAgent {
        s.push_str(" []\n");
        return s;
    }
    let _ = write!(
        s,
        "
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {{name: client-egress, namespace: e2e}}
  spec:
    endpointSelector: {{matchLabels: {{app: client}}}}
    egress:
    - toEndpoints: [{{matchLabels: {{app: web}}}}]
      toPorts:
      - ports: [{{port: \"{PORT}\", protocol: TCP}}]
"
    );
    if subject.has_rules() {
        s.push_str("        rules:\n          http:\n");
        for r in rules(n) {
            let header = if r.header {
                format!(", headers: [\"{}: {}\"]", HEADER.0, HEADER.1)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "          - {{method: {}, path: \"{}\"{header}}}",
                r.method, r.path
            );
        }
    }
    s.push_str(
        "    - toEndpoints: [{matchLabels: {app: dns}}]
      toPorts:
      - ports: [{port: \"53\", protocol: UDP}]
",
    );
    if subject.has_rules() {
        s.push_str("        rules:\n          dns:\n          - {matchPattern: \"*.e2e.svc.cluster.local\"}\n");
    }
    s
}

/// HAProxy for (d): transparent on the agent's proxy port in node 1's namespace, the same
/// `n` rules (then 403), upstream to the original destination from the client's address.
fn haproxy_conf(n: usize) -> String {
    let mut s = format!(
        "global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe_e2e
  bind 127.0.0.1:{PROXY_PORT} transparent
"
    );
    s.push_str(&super::proxy::haproxy_allow_lines(n));
    let _ = write!(
        s,
        "  http-request deny deny_status 403 content-type text/plain string \"{HAPROXY_DENY}\"
  default_backend be_orig
backend be_orig
  # the original destination, from the client's address
  source 0.0.0.0 usesrc clientip
  server orig 0.0.0.0:0
"
    );
    s
}

/// The web server in the server pod: nginx, one worker, a 200 that names the client
/// address it saw (so the checks see the proxies' transparent source) on the policy's
/// port and on a port no policy allows.
fn nginx_conf(work: &Path) -> String {
    let w = work.display();
    format!(
        "daemon off; master_process off; worker_processes 1; pid {w}/e2e-web.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off; default_type text/plain;
  client_body_temp_path {w}/e2e-body; proxy_temp_path {w}/e2e-proxy;
  fastcgi_temp_path {w}/e2e-fcgi; uwsgi_temp_path {w}/e2e-uwsgi; scgi_temp_path {w}/e2e-scgi;
  keepalive_requests 100000000; keepalive_timeout 300s;
  server {{
    listen {PORT}; listen {CLOSED_PORT};
    location / {{ return 200 \"hello from the server to $remote_addr\\n\"; }}
  }}
}}
"
    )
}

/// wrk's script: the 50th, 99th and 99.9th percentiles of its latency histogram.
const WRK_SCRIPT: &str = "done = function(summary, latency, requests)
  io.write(string.format(\"LATENCY_US %d %d %d\\n\", latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9)))
end
";

/// A running lab, taken down (this lab only) when dropped.
struct Lab {
    bin: PathBuf,
    id: String,
    state: serde_json::Value,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["down", "--id", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Lab {
    fn up(ctx: &mut Ctx, bin: &Path, ward: &Path, scenario: &Path, agents: bool) -> Result<Lab> {
        // Started on the subject CPU alone, the agents size their runtimes for one CPU
        // (tokio's default: one worker per CPU they may use; HAProxy has one thread);
        // pinned only after they started, they would run two workers time-sliced on one
        // CPU. The lab's other processes move to the load CPU after.
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", SUBJECT_CPU])
            .arg(bin)
            .arg("up")
            .arg(scenario)
            .arg("--ward")
            .arg(ward);
        if !agents {
            cmd.arg("--no-agent");
        }
        let out = output(ctx, &mut cmd)?;
        let id = out.trim().to_string();
        if !id.starts_with("wl") {
            return Err(format!("ward-lab up printed no lab id: {out}"));
        }
        let mut lab = Lab {
            bin: bin.to_path_buf(),
            id,
            state: serde_json::Value::Null,
        };
        let path = Path::new("/run/ward-lab").join(&lab.id).join("state.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        lab.state = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(lab)
    }

    /// The namespace of the endpoint `key` (`e2e/client`).
    fn netns(&self, key: &str) -> Result<String> {
        self.state["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["key"] == key)
            .and_then(|e| e["netns"].as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("lab {}: no endpoint {key}", self.id))
    }

    /// The agent PID of node `name`.
    fn agent(&self, name: &str) -> Result<u32> {
        self.state["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name)
            .and_then(|n| n["agent_pid"].as_u64())
            .map(|p| p as u32)
            .ok_or_else(|| format!("lab {}: no agent on {name}", self.id))
    }

    /// Every process the lab started (agents, pod servers).
    fn pids(&self) -> Vec<u32> {
        self.state["pids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_u64().map(|p| p as u32))
            .collect()
    }
}

/// `prog` in namespace `ns`, pinned to `cpu`.
fn in_ns(ns: &str, cpu: &str, prog: &str) -> Command {
    let mut c = testkit::ip_netns_exec(ns, "taskset");
    c.args(["-c", cpu, prog]);
    c
}

/// Pins every thread of `pid` to `cpu` (logged once, with `$PID` for the process).
fn pin(ctx: &mut Ctx, pid: u32, cpu: &str) -> Result {
    output(
        ctx,
        Command::new("taskset").args(["-a", "-p", "-c", cpu, &pid.to_string()]),
    )?;
    let pid = format!(" {pid}");
    for c in &mut ctx.commands {
        if c.starts_with("taskset -a -p") && c.ends_with(&pid) {
            *c = format!("{}$PID", &c[..c.len() - pid.len() + 1]);
        }
    }
    dedup(&mut ctx.commands);
    Ok(())
}

/// Drops the later copies of every command.
fn dedup(commands: &mut Vec<String>) {
    let mut seen = Vec::new();
    commands.retain(|c| {
        let new = !seen.contains(c);
        seen.push(c.clone());
        new
    });
}

/// What curl got: the status (`000` when nothing answered) and the body.
fn curl(
    ctx: &mut Ctx,
    ns: &str,
    method: &str,
    url: &str,
    header: bool,
) -> Result<(String, String)> {
    let mut c = in_ns(ns, LOAD_CPU, "curl");
    c.args(["-s", "-m", "2", "-w", "\\n%{http_code}", "-X", method]);
    if header {
        c.args(["-H", &format!("{}: {}", HEADER.0, HEADER.1)]);
    }
    c.arg(url);
    ctx.log(&c);
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().to_string(), body.to_string()))
}

/// The status of `dig @DNS_IP name` (`NOERROR`, `REFUSED`, ...) and its answer.
fn dig(ctx: &mut Ctx, ns: &str, name: &str) -> Result<(String, String)> {
    let out = output(
        ctx,
        in_ns(ns, LOAD_CPU, "dig")
            .arg(format!("@{DNS_IP}"))
            .args(["+time=2", "+tries=1", name, "A"]),
    )
    .unwrap_or_default();
    Ok(dig_answer(&out))
}

/// The status of dig's answer (`no answer` when there is none) and the last field of the
/// first line of its answer section.
fn dig_answer(out: &str) -> (String, String) {
    let status = out
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap_or("no answer")
        .to_string();
    let answer = out
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("")
        .to_string();
    (status, answer)
}

/// What `subject` must do, checked through it before it is measured: the benchmarked
/// request answered by the server (seeing the client's address), a path no rule allows
/// denied with the enforcer's own 403 (passed where nothing enforces HTTP), a header rule
/// that needs its header, a port no policy allows dropped, and DNS names allowed or
/// refused.
fn check(ctx: &mut Ctx, client: &str, subject: Subject, n: usize) -> Result {
    let at = |what: &str| format!("{} with {n} rules: {what}", subject.name());
    let base = format!("http://{WEB_IP}:{PORT}");
    let want_body = format!("hello from the server to {CLIENT_IP}\n");
    let path = bench_path(n);
    let (code, body) = curl(ctx, client, "GET", &format!("{base}{path}"), false)?;
    if code != "200" || body != want_body {
        return Err(at(&format!(
            "GET {path} got {code} {body:?}, not 200 {want_body:?}"
        )));
    }
    let (code, body) = curl(ctx, client, "GET", &format!("{base}{DENIED_PATH}"), false)?;
    let want = match subject {
        Subject::NoAgent | Subject::L4 => ("200", want_body.as_str()),
        Subject::WardHttp => ("403", WARD_DENY),
        Subject::Haproxy => ("403", HAPROXY_DENY),
    };
    if (code.as_str(), body.as_str()) != want {
        return Err(at(&format!(
            "GET {DENIED_PATH} got {code} {body:?}, not {} {:?}",
            want.0, want.1
        )));
    }
    if subject.has_rules() {
        if let Some(r) = rules(n).iter().find(|r| r.header) {
            let url = format!("{base}{}", r.path);
            for (header, want) in [(true, "200"), (false, "403")] {
                let (code, _) = curl(ctx, client, r.method, &url, header)?;
                if code != want {
                    return Err(at(&format!(
                        "{} {} {} the header got {code}, not {want}",
                        r.method,
                        r.path,
                        if header { "with" } else { "without" }
                    )));
                }
            }
        }
    }
    let (code, _) = curl(
        ctx,
        client,
        "GET",
        &format!("http://{WEB_IP}:{CLOSED_PORT}/"),
        false,
    )?;
    let want = if subject.agents() { "000" } else { "200" };
    if code != want {
        return Err(at(&format!(
            "port {CLOSED_PORT} (no policy allows it) got {code}, not {want}"
        )));
    }
    let (status, answer) = dig(ctx, client, ALLOWED_NAME)?;
    if status != "NOERROR" || answer != WEB_IP {
        return Err(at(&format!(
            "{ALLOWED_NAME} got {status} {answer:?}, not NOERROR {WEB_IP}"
        )));
    }
    let (status, _) = dig(ctx, client, REFUSED_NAME)?;
    let refused = status == "REFUSED";
    if refused != subject.has_rules() {
        return Err(at(&format!(
            "{REFUSED_NAME} got {status}, {}",
            if subject.has_rules() {
                "not REFUSED by the DNS rules"
            } else {
                "refused where no DNS rule applies"
            }
        )));
    }
    Ok(())
}

/// One HTTP measurement.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    round: usize,
    subject: Subject,
    rules: usize,
    conns: usize,
    requests: u64,
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// CPU seconds of node 1's processes (the agent, HAProxy) over the load.
    cpu: f64,
    /// The agent's VmRSS once its lab was up and checked (idle) and its highest VmRSS
    /// during this load, KiB.
    rss_idle_kib: Option<f64>,
    rss_load_kib: Option<f64>,
}

impl Row {
    /// Microseconds of node 1's CPU per request.
    fn cpu_us_per_request(&self) -> f64 {
        if self.requests > 0 {
            self.cpu * 1e6 / self.requests as f64
        } else {
            f64::NAN
        }
    }

    /// Requests per CPU-second of node 1's processes.
    fn per_cpu(&self) -> f64 {
        if self.cpu > 0.0 {
            self.requests as f64 / self.cpu
        } else {
            f64::NAN
        }
    }
}

/// One DNS measurement.
#[derive(Clone, Debug, PartialEq)]
struct DnsRow {
    subject: Subject,
    qps: f64,
    lost: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// Microseconds of the node 1 agent's CPU per query of the throughput run.
    cpu_us_per_query: f64,
}

fn rss_kib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse::status_kib(&s, "VmRSS")
}

/// Samples the VmRSS of `pid` every 100 ms while `f` runs; returns `f`'s result and the
/// highest sample.
fn with_rss_peak<T>(pid: Option<u32>, f: impl FnOnce() -> T) -> (T, Option<f64>) {
    let Some(pid) = pid else {
        return (f(), None);
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak: Option<f64> = None;
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak = Some(peak.map_or(r, |p| p.max(r)));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().ok().flatten();
    (out, peak)
}

fn cpu_of(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| pid_cpu_seconds(p)).sum()
}

/// wrk for `secs` at `conns` connections against the benchmarked path; fails on more
/// than 1% errors or non-2xx answers (a subject that fails requests would look cheap).
#[allow(clippy::too_many_arguments)]
fn drive(
    ctx: &mut Ctx,
    client: &str,
    node_pids: &[u32],
    agent: Option<u32>,
    run: &LabRun,
    secs: u64,
    round: usize,
) -> Result<Row> {
    let conns = run.conns;
    let script = ctx.work.join("e2e-latency.lua");
    std::fs::write(&script, WRK_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    let url = format!("http://{WEB_IP}:{PORT}{}", bench_path(run.rules));
    let before = cpu_of(node_pids)?;
    let mut cmd = in_ns(client, LOAD_CPU, "wrk");
    cmd.args(["-t1", "-c", &conns.to_string(), "-d"])
        .arg(format!("{secs}s"))
        .arg("-s")
        .arg(&script)
        .arg(&url);
    let (out, rss_load_kib) = with_rss_peak(agent, || output(ctx, &mut cmd));
    let out = out?;
    let cpu = cpu_of(node_pids)? - before;
    let load = parse::wrk(&out).ok_or_else(|| format!("cannot read wrk's output: {out}"))?;
    let (p50_us, p99_us, p999_us) = parse::wrk_script_latency(&out)
        .ok_or_else(|| format!("no percentiles in wrk's output: {out}"))?;
    let at = format!("{} {} rules {conns} conns", run.subject.name(), run.rules);
    if load.errors * 100 > load.requests {
        return Err(format!(
            "{at}: {} errors in {} requests",
            load.errors, load.requests
        ));
    }
    Ok(Row {
        round,
        subject: run.subject,
        rules: run.rules,
        conns,
        requests: load.requests,
        per_second: load.per_second,
        p50_us,
        p99_us,
        p999_us,
        cpu,
        rss_idle_kib: None,
        rss_load_kib,
    })
}

fn dnsperf(client: &str, queries: &Path) -> Command {
    let mut c = in_ns(client, LOAD_CPU, "dnsperf");
    c.args(["-s", DNS_IP, "-d"]).arg(queries);
    c
}

/// dnsperf from the client: the most queries per second (4 sockets, 100 outstanding),
/// then latencies at a fixed rate.
fn drive_dns(
    ctx: &mut Ctx,
    client: &str,
    agent: Option<u32>,
    subject: Subject,
    secs: u64,
) -> Result<DnsRow> {
    let queries = ctx.work.join("e2e-queries.txt");
    std::fs::write(&queries, format!("{ALLOWED_NAME} A\n"))
        .map_err(|e| format!("{}: {e}", queries.display()))?;
    let pids: Vec<u32> = agent.into_iter().collect();
    let before = cpu_of(&pids)?;
    let out = output(
        ctx,
        dnsperf(client, &queries).args(["-l", &secs.to_string(), "-q", "100", "-c", "4"]),
    )?;
    let cpu = cpu_of(&pids)? - before;
    let (done, lost, qps) =
        parse::dnsperf(&out).ok_or_else(|| format!("cannot read dnsperf's output: {out}"))?;
    if lost * 100 > done + lost {
        return Err(format!(
            "{}: DNS lost {lost} of {} queries",
            subject.name(),
            done + lost
        ));
    }
    let out = output(
        ctx,
        dnsperf(client, &queries).args([
            "-l",
            &secs.to_string(),
            "-Q",
            DNS_LATENCY_QPS,
            "-q",
            "10",
            "-v",
        ]),
    )?;
    let mut lat = parse::dnsperf_latencies(&out);
    let p = |lat: &mut Vec<f64>, q: f64| percentile(lat, q).unwrap_or(f64::NAN);
    Ok(DnsRow {
        subject,
        qps,
        lost,
        p50_us: p(&mut lat, 50.0),
        p99_us: p(&mut lat, 99.0),
        p999_us: p(&mut lat, 99.9),
        cpu_us_per_query: if done > 0 && agent.is_some() {
            cpu * 1e6 / done as f64
        } else {
            f64::NAN
        },
    })
}

/// Brings up the lab of `run`, checks it, and measures it.
#[allow(clippy::too_many_arguments)]
fn measure_lab(
    ctx: &mut Ctx,
    bins: (&Path, &Path),
    run: &LabRun,
    round: usize,
    secs: u64,
    rows: &mut Vec<Row>,
    dns: &mut Vec<DnsRow>,
) -> Result {
    let (lab_bin, ward) = bins;
    let scenario = ctx.work.join("e2e-scenario.yaml");
    std::fs::write(&scenario, self::scenario(run.subject, run.rules))
        .map_err(|e| format!("{}: {e}", scenario.display()))?;
    let lab = Lab::up(ctx, lab_bin, ward, &scenario, run.subject.agents())?;
    let client = lab.netns("e2e/client")?;
    let web = lab.netns("e2e/web")?;
    let node1 = lab.netns("node:node-1")?;
    // everything of the lab on the load CPU, node 1's agent on the subject CPU
    for pid in lab.pids() {
        pin(ctx, pid, LOAD_CPU)?;
    }
    let agent = if run.subject.agents() {
        let pid = lab.agent("node-1")?;
        pin(ctx, pid, SUBJECT_CPU)?;
        Some(pid)
    } else {
        None
    };
    let conf = ctx.work.join("e2e-web.conf");
    std::fs::write(&conf, nginx_conf(&ctx.work)).map_err(|e| format!("{}: {e}", conf.display()))?;
    let log = ctx.work.join("e2e-web.log");
    let mut server = Proc::spawn(
        ctx,
        "nginx in the server pod",
        in_ns(&web, LOAD_CPU, "nginx")
            .args(["-e", "stderr", "-p"])
            .arg(&ctx.work)
            .arg("-c")
            .arg(&conf),
        &log,
    )?;
    let ip: std::net::Ipv4Addr = WEB_IP.parse().map_err(|e| format!("{WEB_IP}: {e}"))?;
    super::wait_until(&format!("nginx on {WEB_IP}:{PORT} in {web}"), || {
        testkit::run_in(&web, || {
            std::net::TcpStream::connect_timeout(&(ip, PORT).into(), Duration::from_secs(1))
        })
        .is_ok()
    })
    .or_else(|e| {
        server.alive(&log)?;
        Err(e)
    })?;
    let mut node_pids: Vec<u32> = agent.into_iter().collect();
    let _haproxy = if run.subject == Subject::Haproxy {
        let conf = ctx.work.join("e2e-haproxy.cfg");
        std::fs::write(&conf, haproxy_conf(run.rules))
            .map_err(|e| format!("{}: {e}", conf.display()))?;
        output(
            ctx,
            testkit::ip_netns_exec(&node1, "iptables").args([
                "-t",
                "mangle",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                WEB_IP,
                "--dport",
                &PORT.to_string(),
                "-j",
                "MARK",
                "--set-xmark",
                EGRESS_PROXY_MARK,
            ]),
        )?;
        let log = ctx.work.join("e2e-haproxy.log");
        let mut p = Proc::spawn(
            ctx,
            "haproxy in node 1",
            in_ns(&node1, SUBJECT_CPU, "haproxy")
                .args(["-db", "-f"])
                .arg(&conf),
            &log,
        )?;
        // a connection to 127.0.0.1:PORT proves nothing (the agent's wildcard listener
        // takes it): wait for HAProxy's own listener
        let mut ss = testkit::ip_netns_exec(&node1, "ss");
        ss.args(["-Hltn", "src", &format!("127.0.0.1:{PROXY_PORT}")]);
        super::wait_until(
            &format!("haproxy on 127.0.0.1:{PROXY_PORT} in {node1}"),
            || {
                p.alive(&log).is_ok()
                    && ss
                        .output()
                        .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            },
        )
        .or_else(|e| {
            p.alive(&log)?;
            Err(e)
        })?;
        node_pids.push(p.pid());
        Some(p)
    } else {
        None
    };
    check(ctx, &client, run.subject, run.rules)?;
    // idle: after the checks, before any load
    let rss_idle_kib = agent.and_then(rss_kib);
    if let Some(pid) = agent {
        // the agent's threads: its one worker, tokio's blocking pool, inotify
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
        eprintln!("loadtest e2e: node 1's agent runs {threads} threads");
    }
    eprintln!(
        "loadtest e2e: round {} {} {} rules {} conns",
        round + 1,
        run.subject.name(),
        run.rules,
        run.conns
    );
    let row = drive(ctx, &client, &node_pids, agent, run, secs, round)?;
    rows.push(Row {
        rss_idle_kib,
        ..row
    });
    if run.dns {
        eprintln!(
            "loadtest e2e: round {} {} DNS",
            round + 1,
            run.subject.name()
        );
        dns.push(drive_dns(ctx, &client, agent, run.subject, secs)?);
    }
    // the report's commands name no lab
    for c in &mut ctx.commands {
        *c = c.replace(&lab.id, "$LAB");
    }
    dedup(&mut ctx.commands);
    Ok(())
}

/// The median of `f` over the rounds at (subject, rules, conns).
fn median_of(
    rows: &[Row],
    s: Subject,
    rules: usize,
    conns: usize,
    f: impl Fn(&Row) -> f64,
) -> Option<f64> {
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r.subject == s && r.rules == rules && r.conns == conns)
        .map(f)
        .filter(|x| x.is_finite())
        .collect();
    percentile(&mut v, 50.0)
}

/// The median over the rounds of `f(a's row) / f(b's row)` for two subjects at one point,
/// pairing each round's rows.
fn median_ratio(
    rows: &[Row],
    (a, b): (Subject, Subject),
    (rules_a, rules_b): (usize, usize),
    conns: usize,
    f: impl Fn(&Row) -> f64,
) -> Option<f64> {
    let find = |s: Subject, rules: usize, round: usize| {
        rows.iter()
            .find(|r| r.subject == s && r.rules == rules && r.conns == conns && r.round == round)
    };
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r.subject == a && r.rules == rules_a && r.conns == conns)
        .filter_map(|ra| {
            let rb = find(b, rules_b, ra.round)?;
            let x = f(ra) / f(rb);
            x.is_finite().then_some(x)
        })
        .collect();
    percentile(&mut v, 50.0)
}

fn us(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.0}", x))
}

fn mib(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}", x / 1024.0))
}

/// The table of every subject at each point of one axis.
fn table(rows: &[Row], axes: &Axes, points: &[(usize, usize)], title: &str) -> String {
    let mut s = format!(
        "### {title}\n\n| rules | conns | subject | req/s | p50 us | p99 us | p99.9 us | \
         node 1 CPU us/req | req per node 1 CPU-s | agent RSS idle MiB | agent RSS load MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for &(rules, conns) in points {
        for subject in SUBJECTS {
            if !subject.has_rules() && rules != axes.base_rules {
                continue;
            }
            let m = |f: fn(&Row) -> f64| median_of(rows, subject, rules, conns, f);
            if m(|r| r.per_second).is_none() {
                continue;
            }
            let idle = median_of(rows, subject, rules, conns, |r| {
                r.rss_idle_kib.unwrap_or(f64::NAN)
            });
            let load = median_of(rows, subject, rules, conns, |r| {
                r.rss_load_kib.unwrap_or(f64::NAN)
            });
            let _ = writeln!(
                s,
                "| {rules} | {conns} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                subject.name(),
                us(m(|r| r.per_second)),
                us(m(|r| r.p50_us)),
                us(m(|r| r.p99_us)),
                us(m(|r| r.p999_us)),
                m(|r| r.cpu_us_per_request()).map_or("-".into(), |x| format!("{x:.1}")),
                us(m(|r| r.per_cpu())),
                mib(idle),
                mib(load),
            );
        }
    }
    s.push('\n');
    s
}

/// The targets, each at every point it applies to, with its verdict.
fn targets(rows: &[Row], axes: &Axes) -> (String, Vec<String>) {
    let mut s =
        String::from("### Targets\n\n| target | point | measured | verdict |\n|---|---|---|---|\n");
    let mut missed = Vec::new();
    let mut line = |target: &str, point: String, value: Option<f64>, ok: fn(f64) -> bool, unit| {
        let verdict = match value {
            Some(v) if ok(v) => "met",
            Some(_) => "MISSED",
            None => "not measured",
        };
        if verdict == "MISSED" {
            missed.push(format!("{target} at {point}"));
        }
        let _ = writeln!(
            s,
            "| {target} | {point} | {} | {verdict} |",
            value.map_or("-".into(), |v| format!("{v:.2}{unit}"))
        );
    };
    let mut points: Vec<(usize, usize)> =
        axes.conns.iter().map(|&c| (axes.base_rules, c)).collect();
    points.extend(
        axes.rules
            .iter()
            .filter(|&&r| r != axes.base_rules)
            .map(|&r| (r, axes.base_conns)),
    );
    for &(rules, conns) in &points {
        let v = median_ratio(
            rows,
            (Subject::WardHttp, Subject::Haproxy),
            (rules, rules),
            conns,
            Row::per_cpu,
        );
        line(
            "(c) / (d) requests per node 1 CPU-second >= 1.0",
            format!("{rules} rules, {conns} conns"),
            v,
            |v| v >= 1.0,
            "x",
        );
    }
    for &conns in &axes.conns {
        let v = median_ratio(
            rows,
            (Subject::L4, Subject::NoAgent),
            (axes.base_rules, axes.base_rules),
            conns,
            |r| r.per_second,
        );
        line(
            "(b) / (a) requests per second >= 0.95",
            format!("{conns} conns"),
            v,
            |v| v >= 0.95,
            "x",
        );
    }
    let max = |f: fn(&Row) -> Option<f64>| {
        rows.iter()
            .filter_map(f)
            .map(|k| k * 1024.0 / 1e6)
            .reduce(f64::max)
    };
    line(
        "agent RSS idle <= 30 MB",
        "highest of every lab".into(),
        max(|r| r.rss_idle_kib),
        |v| v <= 30.0,
        " MB",
    );
    line(
        "agent RSS under load <= 80 MB",
        "highest of every run".into(),
        max(|r| r.rss_load_kib),
        |v| v <= 80.0,
        " MB",
    );
    s.push('\n');
    (s, missed)
}

fn dns_table(dns: &[DnsRow]) -> String {
    let mut s = String::from(
        "### DNS (e)\n\nMedian of the rounds. q/s: dnsperf's most (4 sockets, 100 queries \
         outstanding); latencies at a fixed 1,000 q/s; CPU: node 1's agent per query of \
         the q/s run.\n\n| subject | path | q/s | lost | p50 us | p99 us | p99.9 us | \
         node 1 CPU us/query |\n|---|---|---|---|---|---|---|---|\n",
    );
    for subject in [Subject::NoAgent, Subject::L4, Subject::WardHttp] {
        let rs: Vec<&DnsRow> = dns.iter().filter(|d| d.subject == subject).collect();
        if rs.is_empty() {
            continue;
        }
        let m = |f: fn(&DnsRow) -> f64| {
            let mut v: Vec<f64> = rs.iter().map(|r| f(r)).filter(|x| x.is_finite()).collect();
            percentile(&mut v, 50.0)
        };
        let path = match subject {
            Subject::NoAgent => "direct, nothing enforced",
            Subject::L4 => "direct, allowed by L3/L4",
            _ => "through Ward's DNS proxy (DNS rules)",
        };
        let _ = writeln!(
            s,
            "| {} | {path} | {} | {} | {} | {} | {} | {} |",
            subject.name(),
            us(m(|r| r.qps)),
            us(m(|r| r.lost as f64)),
            us(m(|r| r.p50_us)),
            us(m(|r| r.p99_us)),
            us(m(|r| r.p999_us)),
            m(|r| r.cpu_us_per_query).map_or("-".into(), |x| format!("{x:.1}")),
        );
    }
    s.push('\n');
    s
}

fn rounds_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "### Every round\n\n| round | subject | rules | conns | req/s | p99 us | node 1 CPU us/req |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} |",
            r.round + 1,
            r.subject.name(),
            r.rules,
            r.conns,
            r.per_second,
            r.p99_us,
            r.cpu_us_per_request()
        );
    }
    s.push('\n');
    s
}

/// A chart panel's title, the figure of a row it draws, and whether only the HTTP
/// enforcers (c, d) are drawn (per CPU-second: (a) has no process and (b)'s agent idles).
type Metric = (&'static str, fn(&Row) -> f64, bool);

/// Per subject, (x, y) along one axis.
type Series = Vec<(Subject, Vec<(usize, f64)>)>;

/// One panel's series: `f` of the median round at each point of the axis, per subject.
fn series(rows: &[Row], axes: &Axes, by_rules: bool, (_, f, enforcers): Metric) -> Series {
    SUBJECTS
        .iter()
        .filter(|s| !(by_rules || enforcers) || s.has_rules())
        .map(|&s| {
            let xs = if by_rules { &axes.rules } else { &axes.conns };
            let xy = xs
                .iter()
                .filter_map(|&x| {
                    let (rules, conns) = if by_rules {
                        (x, axes.base_conns)
                    } else {
                        (axes.base_rules, x)
                    };
                    Some((x, median_of(rows, s, rules, conns, f)?))
                })
                .collect();
            (s, xy)
        })
        .filter(|(_, xy): &(Subject, Vec<(usize, f64)>)| xy.len() >= 2)
        .collect()
}

/// The gnuplot script of the chart: requests/s, p99 and requests per node 1 CPU-second
/// against connections (base rules) and against rules (base connections), one line per
/// subject; an axis with fewer than two points is left out. None: nothing to draw.
fn chart_script(rows: &[Row], axes: &Axes, png: &Path) -> Option<String> {
    let metrics: [Metric; 3] = [
        ("requests/s", |r| r.per_second, false),
        ("p99 latency (ms)", |r| r.p99_us / 1000.0, false),
        ("requests per node 1 CPU-second", Row::per_cpu, true),
    ];
    let mut panels: Vec<(String, String, Series)> = Vec::new();
    for (by_rules, xlabel) in [
        (false, format!("connections (at {} rules)", axes.base_rules)),
        (
            true,
            format!("HTTP rules (at {} connections)", axes.base_conns),
        ),
    ] {
        for m in metrics {
            let s = series(rows, axes, by_rules, m);
            if !s.is_empty() {
                panels.push((m.0.to_string(), xlabel.clone(), s));
            }
        }
    }
    if panels.is_empty() {
        return None;
    }
    let rows_n = panels.len().div_ceil(3);
    let mut g = String::new();
    for (i, (_, _, s)) in panels.iter().enumerate() {
        for (subject, xy) in s {
            let _ = writeln!(g, "$d{i}_{} << EOD", subject.tag());
            for (x, y) in xy {
                let _ = writeln!(g, "{x} {y:.3}");
            }
            g.push_str("EOD\n");
        }
    }
    let _ = writeln!(
        g,
        "set terminal pngcairo size 1440,{} font \",10\"\nset output \"{}\"",
        380 * rows_n,
        png.display()
    );
    let _ = writeln!(
        g,
        "set multiplot layout {rows_n},3 title \"End to end, HTTP/1.1 (wrk): client pod on node 1, \
         server pod on node 2\"\nset logscale x\nset yrange [0:*]\nset grid\n\
         set key outside bottom center horizontal"
    );
    for (i, (title, xlabel, s)) in panels.iter().enumerate() {
        let plots: Vec<String> = s
            .iter()
            .map(|(subject, _)| {
                format!(
                    "$d{i}_{} with linespoints lw 2 lc rgb \"{}\" title \"{}\"",
                    subject.tag(),
                    subject.color(),
                    subject.name()
                )
            })
            .collect();
        let _ = writeln!(
            g,
            "set title \"{title}\"\nset xlabel \"{xlabel}\"\nplot {}",
            plots.join(", ")
        );
    }
    g.push_str("unset multiplot\n");
    Some(g)
}

fn describe(secs: u64, rounds: usize, axes: &Axes) -> String {
    let mut s = String::from("## End to end (two nodes)\n\n");
    let _ = writeln!(
        s,
        "A `ward-lab` lab per point (configuration, rules, connections: nothing carries over \
         from one measurement to the next): the client pod ({CLIENT_IP}) on node 1, the \
         server pod ({WEB_IP}, nginx from Debian, one worker) and a DNS pod ({DNS_IP}, the \
         lab's own DNS server) on node 2; node 1 enforces the client's egress policy. \
         (a) no agents; (b) the agents and an egress policy allowing TCP/{PORT} to the server \
         and UDP/53 to the DNS pod, no L7 rules; (c) the same ports with N HTTP rules \
         (redirected to the agent's transparent proxy on node 1) and a DNS rule (the agent's \
         DNS proxy); (d) the policy of (c), its HTTP redirect taken by HAProxy 2.6 in node 1's \
         namespace (`bind 127.0.0.1:{PROXY_PORT} transparent`, more specific than the \
         agent's `0.0.0.0:{PROXY_PORT}`, so the datapath's listener lookup finds it; \
         `source 0.0.0.0 usesrc clientip` to the original destination; its upstream packets \
         marked {EGRESS_PROXY_MARK} by a mangle rule, as HAProxy 2.6 cannot mark backend \
         sockets) with the same N rules and a 403 of its own. N rules as in the proxy sweep: \
         every other rule but the last is `POST /api/v1/svcI/orders` with \
         `{}: {}`, the others `GET /api/v1/svcI/.*`; the request is `GET \
         /api/v1/svc(N-1)/items`, matching the last.\n",
        HEADER.0, HEADER.1
    );
    let _ = writeln!(
        s,
        "Checked in every lab before any load (a failed check fails the run): the request \
         answered 200 by the server, which saw the client's own address; `GET {DENIED_PATH}` \
         403 with the enforcer's own body in (c) and (d), 200 in (a) and (b); the first header \
         rule 200 with its header and 403 without; port {CLOSED_PORT} (served, allowed by no \
         policy) answered in (a) and dropped with agents; `{ALLOWED_NAME}` answered and \
         `{REFUSED_NAME}` REFUSED only where DNS rules apply.\n"
    );
    let _ = writeln!(
        s,
        "Pinning: `ward-lab up` runs on CPU {SUBJECT_CPU} alone, so the agents start on one \
         CPU and size their runtime for it (one tokio worker; HAProxy has one thread; pinned \
         after the start, the agent ran two workers time-sliced on one CPU); then wrk, dnsperf, nginx, node 2's agent \
         and the lab's servers move to CPU {LOAD_CPU}, node 1's agent and HAProxy stay on \
         CPU {SUBJECT_CPU}. Load: wrk `-t1 -cC` \
         HTTP/1.1 keep-alive for {secs} s per point (p50/p99/p99.9 from wrk's histogram by a \
         `done` script). CPU: utime+stime of node 1's processes (the agent; with HAProxy in \
         (d)) from /proc/PID/stat over the load: in (a) node 1 runs no process, and the TC \
         programs' and the kernel's forwarding work (softirq, charged to whatever runs) is in \
         no column. Agent RSS: node 1's agent's VmRSS before the load (idle) and the highest \
         VmRSS sampled every 100 ms during it. {rounds} round(s); within each, the \
         configurations in an order that rotates from round to round; tables show the \
         median over the rounds of each figure, and ratios the median of the per-round \
         ratios. Connections {:?} at {} rules; rules {:?} at {} connections. HTTP/2 (h2c) \
         is not measured here: the proxy sweep (`loadtest proxy`) compares h2c.\n",
        axes.conns, axes.base_rules, axes.rules, axes.base_conns
    );
    s
}

/// Runs the e2e part with the lab binary `lab_bin` and the agents' `ward`; the chart goes
/// to `chart_dir` (beside the report).
pub fn run(
    ctx: &mut Ctx,
    opts: &E2eOpts,
    lab_bin: &Path,
    ward: &Path,
    chart_dir: &Path,
) -> Result<String> {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    let axes = opts.axes(ctx.quick);
    let points = labs(&axes, 0).len();
    // a lab comes up, is checked and goes down in about 6 s
    eprintln!(
        "loadtest e2e: {rounds} round(s) x {points} points (a lab each) of {secs} s, about {} \
         min",
        ((rounds * points * (secs as usize + 6)) as f64 / 60.0).ceil()
    );
    let mut rows = Vec::new();
    let mut dns = Vec::new();
    for round in 0..rounds {
        for run in labs(&axes, round) {
            measure_lab(ctx, (lab_bin, ward), &run, round, secs, &mut rows, &mut dns)?;
        }
    }
    let mut s = describe(secs, rounds, &axes);
    let (t, missed) = targets(&rows, &axes);
    s.push_str(&t);
    if !missed.is_empty() {
        let _ = writeln!(
            s,
            "Missed in this run: {}. `loadtests/e2e-profile.sh c|d RULES CONNS` \
             profiles node 1's enforcer at a point (perf, by symbol and by DSO).\n",
            missed.join("; ")
        );
    }
    let conns_points: Vec<(usize, usize)> =
        axes.conns.iter().map(|&c| (axes.base_rules, c)).collect();
    s.push_str(&table(
        &rows,
        &axes,
        &conns_points,
        &format!("HTTP/1.1 against connections ({} rules)", axes.base_rules),
    ));
    if axes.rules.len() > 1 {
        let rules_points: Vec<(usize, usize)> =
            axes.rules.iter().map(|&r| (r, axes.base_conns)).collect();
        s.push_str(&table(
            &rows,
            &axes,
            &rules_points,
            &format!("HTTP/1.1 against rules ({} connections)", axes.base_conns),
        ));
    }
    s.push_str(&dns_table(&dns));
    let png = chart_dir.join("e2e-h1.png");
    if let Some(script) = chart_script(&rows, &axes, &png) {
        super::gnuplot(&script)?;
        let _ = writeln!(s, "![End to end, HTTP/1.1](e2e-h1.png)\n");
    }
    s.push_str(&rounds_table(&rows));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axes(rules: Option<Vec<usize>>, conns: Option<Vec<usize>>, quick: bool) -> Axes {
        E2eOpts { rules, conns }.axes(quick)
    }

    #[test]
    fn the_axes_are_the_full_lists_the_base_point_when_quick_or_what_was_given() {
        let full = axes(None, None, false);
        assert_eq!(full.rules, RULES);
        assert_eq!(full.conns, CONNS);
        assert_eq!((full.base_rules, full.base_conns), (50, 64));
        let quick = axes(None, None, true);
        assert_eq!((quick.rules, quick.conns), (vec![50], vec![64]));
        // a list without the base point sweeps from its first entry
        let given = axes(Some(vec![10, 1000]), Some(vec![16]), true);
        assert_eq!((given.base_rules, given.base_conns), (10, 16));
    }

    #[test]
    fn every_subject_runs_each_round_in_a_rotating_order_and_only_rules_subjects_sweep_rules() {
        let a = axes(None, None, false);
        let r0 = labs(&a, 0);
        // a lab per point: every subject at every connection count (base rules), (c) and
        // (d) also at every other rule count (base connections)
        assert_eq!(r0.len(), 4 * CONNS.len() + 2 * (RULES.len() - 1));
        let first = |r: &[LabRun]| r[0].subject;
        assert_eq!(first(&r0), Subject::NoAgent);
        assert_eq!(first(&labs(&a, 1)), Subject::L4);
        assert_eq!(first(&labs(&a, 2)), Subject::WardHttp);
        assert_eq!(first(&labs(&a, 4)), Subject::NoAgent);
        for l in &r0 {
            assert!(
                l.rules == 50 || (l.conns == 64 && l.subject.has_rules()),
                "{l:?}"
            );
        }
        let points = |s: Subject| r0.iter().filter(|l| l.subject == s).count();
        assert_eq!(points(Subject::NoAgent), 4);
        assert_eq!(points(Subject::Haproxy), 4 + 3);
        // no point twice
        for (i, l) in r0.iter().enumerate() {
            assert!(!r0[..i].contains(l), "{l:?}");
        }
        let dns: Vec<Subject> = r0.iter().filter(|l| l.dns).map(|l| l.subject).collect();
        assert_eq!(dns, [Subject::NoAgent, Subject::L4, Subject::WardHttp]);
        assert!(r0
            .iter()
            .filter(|l| l.dns)
            .all(|l| l.rules == 50 && l.conns == 64));
        let mut rules: Vec<usize> = r0
            .iter()
            .filter(|l| l.subject == Subject::Haproxy && l.conns == 64)
            .map(|l| l.rules)
            .collect();
        rules.sort();
        assert_eq!(rules, RULES);
    }

    #[test]
    fn the_scenario_gives_each_subject_its_policy() {
        let doc = |s: Subject, n: usize| -> serde_yaml::Value {
            serde_yaml::from_str(&scenario(s, n)).expect("valid YAML")
        };
        let a = doc(Subject::NoAgent, 50);
        assert_eq!(a["policies"], serde_yaml::Value::Sequence(vec![]));
        assert_eq!(a["cluster"]["pods"][0]["node"], "node-1");
        assert_eq!(a["cluster"]["pods"][1]["node"], "node-2");
        let b = doc(Subject::L4, 50);
        let egress = &b["policies"][0]["spec"]["egress"];
        assert_eq!(egress[0]["toPorts"][0]["ports"][0]["port"], "80");
        assert!(egress[0]["toPorts"][0]["rules"].is_null(), "no L7 in (b)");
        assert!(egress[1]["toPorts"][0]["rules"].is_null());
        for s in [Subject::WardHttp, Subject::Haproxy] {
            let c = doc(s, 50);
            let egress = &c["policies"][0]["spec"]["egress"];
            let http = egress[0]["toPorts"][0]["rules"]["http"]
                .as_sequence()
                .expect("http rules");
            assert_eq!(http.len(), 50);
            assert_eq!(http[49]["path"], "/api/v1/svc49/.*");
            assert_eq!(http[0]["headers"][0], "Content-Type: application/json");
            assert_eq!(
                egress[1]["toPorts"][0]["rules"]["dns"][0]["matchPattern"],
                "*.e2e.svc.cluster.local"
            );
        }
        assert_eq!(bench_path(50), "/api/v1/svc49/items");
    }

    #[test]
    fn haproxy_is_transparent_with_every_rule_and_haproxy_accepts_the_configuration() {
        let conf = haproxy_conf(10);
        assert!(conf.contains("bind 127.0.0.1:15001 transparent"));
        assert!(conf.contains("source 0.0.0.0 usesrc clientip"));
        assert!(conf.contains("server orig 0.0.0.0:0"));
        assert_eq!(conf.matches("http-request allow if").count(), 10);
        assert_eq!(conf.matches("req.hdr(content-type)").count(), 5);
        assert!(conf.contains("http-request allow if METH_GET { path_reg ^/api/v1/svc9/.*$ }"));
        assert!(conf.contains(&format!("string \"{HAPROXY_DENY}\"")));
        // the real HAProxy checks it
        let dir = std::env::temp_dir().join(format!("ward-e2e-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, &conf).expect("write");
        let out = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("haproxy is installed (cargo xtask loadtest installs it)");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "haproxy -c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_server_names_the_client_address_on_both_ports() {
        let c = nginx_conf(Path::new("/w"));
        assert!(c.contains("listen 80; listen 8081;"));
        assert!(c.contains("hello from the server to $remote_addr"));
        assert!(c.contains("pid /w/e2e-web.pid"));
    }

    #[test]
    fn dig_answers_are_read_by_status_and_first_address() {
        let ok = ";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n\
                  ;; ANSWER SECTION:\nweb.e2e.svc.cluster.local. 30 IN A 10.0.2.20\n";
        assert_eq!(
            dig_answer(ok),
            ("NOERROR".to_string(), "10.0.2.20".to_string())
        );
        let refused = ";; ->>HEADER<<- opcode: QUERY, status: REFUSED, id: 2\n";
        assert_eq!(dig_answer(refused), ("REFUSED".to_string(), String::new()));
        assert_eq!(dig_answer("").0, "no answer");
    }

    fn row(round: usize, subject: Subject, conns: usize, rps: f64, cpu: f64) -> Row {
        Row {
            round,
            subject,
            rules: 50,
            conns,
            requests: (rps * 5.0) as u64,
            per_second: rps,
            p50_us: 1000.0,
            p99_us: 2000.0,
            p999_us: 3000.0,
            cpu,
            rss_idle_kib: subject.agents().then_some(20_000.0),
            rss_load_kib: subject.agents().then_some(40_000.0),
        }
    }

    #[test]
    fn targets_pair_each_rounds_rows_and_name_what_was_missed() {
        let a = axes(None, Some(vec![64]), true);
        let mut rows = Vec::new();
        for round in 0..3 {
            rows.push(row(round, Subject::NoAgent, 64, 1000.0, 0.0));
            rows.push(row(round, Subject::L4, 64, 960.0, 0.1));
            // (c) twice as many requests per CPU-second as (d) in every round
            rows.push(row(round, Subject::WardHttp, 64, 500.0, 1.0));
            rows.push(row(round, Subject::Haproxy, 64, 500.0, 2.0));
        }
        let (t, missed) = targets(&rows, &a);
        assert!(missed.is_empty(), "{missed:?}\n{t}");
        assert!(t.contains("| 50 rules, 64 conns | 2.00x | met |"), "{t}");
        assert!(t.contains("| 64 conns | 0.96x | met |"), "{t}");
        assert!(t.contains("| 20.48 MB | met |"), "{t}");
        // (b) 10% under (a) in one round only: the median round still meets it
        rows[1].per_second = 900.0;
        assert!(targets(&rows, &a).1.is_empty());
        for r in rows.iter_mut().filter(|r| r.subject == Subject::L4) {
            r.per_second = 900.0;
        }
        for r in rows.iter_mut().filter(|r| r.subject == Subject::WardHttp) {
            r.cpu = 3.0;
        }
        let (_, missed) = targets(&rows, &a);
        assert_eq!(missed.len(), 2, "{missed:?}");
        assert!(missed[0].starts_with("(c) / (d)"));
        assert!(missed[1].starts_with("(b) / (a)"));
    }

    #[test]
    fn the_table_shows_each_subjects_median_round_and_the_chart_needs_two_points() {
        let a = axes(None, Some(vec![16, 64]), true);
        let mut rows = Vec::new();
        for (round, rps) in [(0, 100.0), (1, 300.0), (2, 200.0)] {
            for conns in [16, 64] {
                rows.push(row(round, Subject::WardHttp, conns, rps, 1.0));
            }
        }
        let t = table(&rows, &a, &[(50, 64)], "t");
        // the median round: 200 req/s, 1,000 requests on 1 CPU-second (1,000 us each)
        assert!(
            t.contains("| 50 | 64 | (c) ward HTTP | 200 | 1000 | 2000 | 3000 | 1000.0 | 1000 | 19.5 | 39.1 |"),
            "{t}"
        );
        assert!(!t.contains("(d) haproxy"), "no rows, no line");
        let png = Path::new("/w/e2e-h1.png");
        let g = chart_script(&rows, &a, png).expect("two connection counts");
        assert!(g.contains("set output \"/w/e2e-h1.png\""));
        assert!(
            g.contains("$d0_c << EOD\n16 200.000\n64 200.000\nEOD"),
            "{g}"
        );
        assert!(g.contains("lc rgb \"#d95f02\" title \"(c) ward HTTP\""));
        // per CPU-second: the HTTP enforcers only
        let per_cpu = g
            .split("requests per node 1 CPU-second")
            .nth(1)
            .expect("panel");
        let mut rows_b = rows.clone();
        rows_b.extend(rows.iter().map(|r| Row {
            subject: Subject::L4,
            ..r.clone()
        }));
        let g_b = chart_script(&rows_b, &a, png).expect("chart");
        assert!(g_b.contains("$d0_b << EOD"), "(b) drawn by requests/s");
        let per_cpu_b = g_b
            .split("requests per node 1 CPU-second")
            .nth(1)
            .expect("panel");
        assert!(
            !per_cpu_b.contains("$d2_b") && per_cpu.contains("$d2_c"),
            "{per_cpu_b}"
        );
        let one = axes(None, None, true);
        assert_eq!(chart_script(&rows, &one, png), None, "one point: no chart");
    }
}
