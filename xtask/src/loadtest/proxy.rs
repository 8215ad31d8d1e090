//! HTTP proxies side by side: one nginx backend (a small body, HTTP/1.1 on one port and
//! h2c on another) reached directly, through `ward proxy` (standalone, one worker
//! thread, 50 HTTP rules of which the request matches the last), through HAProxy (one
//! thread) and through nginx as a reverse proxy (one worker), both configured with the
//! same 50 method/path rules and a 403 otherwise. wrk drives HTTP/1.1 keep-alive and
//! h2load HTTP/2 (h2c) with the same concurrency and duration for every target.

use std::fmt::Write as _;

use super::parse::{self, Load};
use super::{output, ratio, Ctx, Netns, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::Result;

/// HTTP rules per proxy; the benchmarked path matches the last one.
const RULES: usize = 50;
const PATH: &str = "/api/v1/svc49/items";
const DENIED_PATH: &str = "/admin";
/// Open connections (wrk) and concurrent streams (h2load: 8 connections x 8 streams).
const CONNECTIONS: &str = "64";

const BACKEND_H1: u16 = 8081;
const BACKEND_H2: u16 = 8082;

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1 (wrk)",
            Proto::H2 => "HTTP/2 h2c (h2load)",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Ward,
    Haproxy,
    Nginx,
}

const TARGETS: [Target; 4] = [Target::Direct, Target::Ward, Target::Haproxy, Target::Nginx];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Ward => "ward",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
        }
    }

    fn port(self, p: Proto) -> u16 {
        let base = match self {
            Target::Direct => {
                return if p == Proto::H1 {
                    BACKEND_H1
                } else {
                    BACKEND_H2
                }
            }
            Target::Ward => 9001,
            Target::Haproxy => 9011,
            Target::Nginx => 9021,
        };
        if p == Proto::H1 {
            base
        } else {
            base + 1
        }
    }
}

struct Row {
    target: Target,
    proto: Proto,
    load: Load,
    /// CPU seconds of the proxy process during the load (none for direct).
    cpu: Option<f64>,
}

impl Row {
    fn per_cpu(&self) -> f64 {
        match self.cpu {
            Some(c) if c > 0.0 => self.load.requests as f64 / c,
            _ => f64::NAN,
        }
    }
}

fn rules_regexes() -> Vec<String> {
    (0..RULES).map(|i| format!("/api/v1/svc{i}/.*")).collect()
}

fn write(ctx: &Ctx, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let p = ctx.work.join(name);
    std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

fn nginx_common(ctx: &Ctx, name: &str) -> String {
    let w = ctx.work.display();
    format!(
        "daemon off; master_process off; worker_processes 1; pid {w}/{name}.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off; default_type text/plain;
  client_body_temp_path {w}/{name}-body; proxy_temp_path {w}/{name}-proxy;
  fastcgi_temp_path {w}/{name}-fcgi; uwsgi_temp_path {w}/{name}-uwsgi; scgi_temp_path {w}/{name}-scgi;
  keepalive_requests 100000000; keepalive_timeout 300s;
"
    )
}

fn backend_conf(ctx: &Ctx) -> String {
    format!(
        "{}  server {{
    listen 127.0.0.1:{BACKEND_H1};
    listen 127.0.0.1:{BACKEND_H2} http2;
    location / {{ return 200 \"hello from the backend\\n\"; }}
  }}
}}
",
        nginx_common(ctx, "backend")
    )
}

fn nginx_proxy_conf(ctx: &Ctx) -> String {
    let mut s = nginx_common(ctx, "nginx-proxy");
    let _ = write!(
        s,
        "  upstream backend {{ server 127.0.0.1:{BACKEND_H1}; keepalive 64; }}
  proxy_http_version 1.1; proxy_set_header Connection \"\";
  server {{
    listen 127.0.0.1:{}; listen 127.0.0.1:{} http2;
",
        Target::Nginx.port(Proto::H1),
        Target::Nginx.port(Proto::H2)
    );
    for r in rules_regexes() {
        let _ = writeln!(
            s,
            "    location ~ ^{r}$ {{ limit_except GET {{ deny all; }} proxy_pass http://backend; }}"
        );
    }
    s.push_str("    location / { return 403 \"Access denied\\r\\n\"; }\n  }\n}\n");
    s
}

fn haproxy_conf() -> String {
    let mut s = String::from(
        "global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
",
    );
    for (p, server) in [(Proto::H1, ""), (Proto::H2, " proto h2")] {
        let tag = if p == Proto::H1 { "h1" } else { "h2" };
        let backend_port = Target::Direct.port(p);
        let _ = writeln!(
            s,
            "frontend fe_{tag}\n  bind 127.0.0.1:{}{server}",
            Target::Haproxy.port(p)
        );
        for r in rules_regexes() {
            let _ = writeln!(s, "  http-request allow if METH_GET {{ path_reg ^{r}$ }}");
        }
        let _ = writeln!(
            s,
            "  http-request deny deny_status 403 content-type text/plain string \"Access denied\"
  default_backend be_{tag}
backend be_{tag}
  server s1 127.0.0.1:{backend_port}{server}"
        );
    }
    s
}

fn ward_files(ctx: &Ctx) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cluster = write(
        ctx,
        "proxy-cluster.yaml",
        "cluster:
  namespaces: [{name: bench}]
  pods:
    - {namespace: bench, name: client, labels: {app: client}, ip: 127.0.0.1}
    - {namespace: bench, name: web, labels: {app: web}, ip: 10.0.9.2}
",
    )?;
    let mut policy = String::from(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-http, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: \"80\", protocol: TCP}]
      rules:
        http:
",
    );
    for r in rules_regexes() {
        let _ = writeln!(policy, "        - {{method: GET, path: \"{r}\"}}");
    }
    let policy = write(ctx, "proxy-policy.yaml", &policy)?;
    Ok((cluster, policy))
}

/// Starts the proxy for `target` (none for direct), pinned to the subject CPU.
fn start(ctx: &mut Ctx, ns: &Netns, target: Target, proto: Proto) -> Result<Option<Proc>> {
    let log = ctx.work.join(format!("{}.log", target.name()));
    let mut cmd = match target {
        Target::Direct => return Ok(None),
        Target::Ward => {
            let (cluster, policy) = ward_files(ctx)?;
            let mut c = ns.cmd(SUBJECT_CPU, &ctx.ward.display().to_string());
            c.args(["proxy", "--listen"])
                .arg(format!("127.0.0.1:{}", target.port(proto)))
                .arg("--upstream")
                .arg(format!("127.0.0.1:{}", Target::Direct.port(proto)))
                .arg("--cluster")
                .arg(cluster)
                .arg("--policies")
                .arg(policy)
                .args(["--endpoint", "bench/web", "--port", "80", "--threads", "1"]);
            c
        }
        Target::Haproxy => {
            let conf = write(ctx, "haproxy.cfg", &haproxy_conf())?;
            let mut c = ns.cmd(SUBJECT_CPU, "haproxy");
            c.args(["-db", "-f"]).arg(conf);
            c
        }
        Target::Nginx => {
            let conf = write(ctx, "nginx-proxy.conf", &nginx_proxy_conf(ctx))?;
            let mut c = ns.cmd(SUBJECT_CPU, "nginx");
            c.args(["-e", "stderr", "-p"])
                .arg(&ctx.work)
                .arg("-c")
                .arg(conf);
            c
        }
    };
    let mut p = Proc::spawn(ctx, target.name(), &mut cmd, &log)?;
    ns.wait_tcp(target.port(proto)).or_else(|e| {
        p.alive(&log)?;
        Err(e)
    })?;
    Ok(Some(p))
}

/// The status curl gets for `path` (h2c with prior knowledge for HTTP/2).
fn status(ctx: &mut Ctx, ns: &Netns, port: u16, proto: Proto, path: &str) -> Result<String> {
    let mut c = ns.cmd(super::LOAD_CPU, "curl");
    c.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ]);
    if proto == Proto::H2 {
        c.arg("--http2-prior-knowledge");
    }
    c.arg(format!("http://127.0.0.1:{port}{path}"));
    output(ctx, &mut c)
}

fn drive(ctx: &mut Ctx, ns: &Netns, target: Target, proto: Proto, secs: u64) -> Result<Load> {
    let url = format!("http://127.0.0.1:{}{PATH}", target.port(proto));
    match proto {
        Proto::H1 => {
            let out = output(
                ctx,
                ns.cmd(LOAD_CPU, "wrk")
                    .args(["-t1", "-c", CONNECTIONS, "-d"])
                    .arg(format!("{secs}s"))
                    .args(["--latency", &url]),
            )?;
            parse::wrk(&out).ok_or_else(|| format!("cannot read wrk's output: {out}"))
        }
        Proto::H2 => {
            let log = ctx.work.join("h2load.log");
            let out = output(
                ctx,
                ns.cmd(LOAD_CPU, "h2load")
                    .args(["-t1", "-c8", "-m8", "-D", &secs.to_string(), "--log-file"])
                    .arg(&log)
                    .arg(&url),
            )?;
            let lines = std::fs::read_to_string(&log).unwrap_or_default();
            parse::h2load(&out, &lines).ok_or_else(|| format!("cannot read h2load's output: {out}"))
        }
    }
}

fn measure(ctx: &mut Ctx, ns: &Netns, target: Target, proto: Proto, secs: u64) -> Result<Row> {
    let proxy = start(ctx, ns, target, proto)?;
    let port = target.port(proto);
    // The rules are really evaluated: the benchmarked path passes, another is denied.
    let ok = status(ctx, ns, port, proto, PATH)?;
    if ok != "200" {
        return Err(format!(
            "{} {}: {PATH} got {ok}, not 200",
            target.name(),
            proto.name()
        ));
    }
    if target != Target::Direct {
        let denied = status(ctx, ns, port, proto, DENIED_PATH)?;
        if denied != "403" {
            return Err(format!(
                "{} {}: {DENIED_PATH} got {denied}, not 403",
                target.name(),
                proto.name()
            ));
        }
    }
    let before = proxy.as_ref().map(Proc::cpu_seconds).transpose()?;
    let load = drive(ctx, ns, target, proto, secs)?;
    let after = proxy.as_ref().map(Proc::cpu_seconds).transpose()?;
    let cpu = before.zip(after).map(|(b, a)| a - b);
    // a proxy that fails requests would look cheap: more than 1% errors fails the run
    if load.errors * 100 > load.requests {
        return Err(format!(
            "{} {}: {} errors in {} requests",
            target.name(),
            proto.name(),
            load.errors,
            load.requests
        ));
    }
    Ok(Row {
        target,
        proto,
        load,
        cpu,
    })
}

pub fn run(ctx: &mut Ctx) -> Result<String> {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    let ns = Netns::new("proxy")?;
    let conf = write(ctx, "backend.conf", &backend_conf(ctx))?;
    let log = ctx.work.join("backend.log");
    let mut backend = Proc::spawn(
        ctx,
        "nginx backend",
        ns.cmd(LOAD_CPU, "nginx")
            .args(["-e", "stderr", "-p"])
            .arg(&ctx.work)
            .arg("-c")
            .arg(conf),
        &log,
    )?;
    ns.wait_tcp(BACKEND_H1)
        .and_then(|()| ns.wait_tcp(BACKEND_H2))
        .or_else(|e| {
            backend.alive(&log)?;
            Err(e)
        })?;
    let mut all = Vec::new();
    for round in 1..=rounds {
        for proto in [Proto::H1, Proto::H2] {
            for target in TARGETS {
                eprintln!(
                    "loadtest proxy: round {round}/{rounds}: {} {}",
                    target.name(),
                    proto.name()
                );
                all.push(measure(ctx, &ns, target, proto, secs)?);
            }
        }
    }
    drop(backend);
    Ok(report(&all, secs, rounds))
}

/// The figure a round is ranked by: requests per proxy CPU-second, or requests per
/// second for direct.
fn key(r: &Row) -> f64 {
    if r.cpu.is_some() {
        r.per_cpu()
    } else {
        r.load.per_second
    }
}

/// Per (protocol, target), the round with the median key, and every round's key.
fn medians(all: &[Row]) -> Vec<(&Row, Vec<f64>)> {
    let mut out = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        for target in TARGETS {
            let mut rs: Vec<&Row> = all
                .iter()
                .filter(|r| r.proto == proto && r.target == target)
                .collect();
            let keys: Vec<f64> = rs.iter().map(|r| key(r)).collect();
            rs.sort_by(|a, b| key(a).total_cmp(&key(b)));
            if let Some(m) = rs.get(rs.len().saturating_sub(1) / 2) {
                out.push((*m, keys));
            }
        }
    }
    out
}

fn report(all: &[Row], secs: u64, rounds: u32) -> String {
    let picked = medians(all);
    let mut s = String::from("## HTTP proxy\n\n");
    let _ = writeln!(
        s,
        "Backend: nginx (one process, CPU {LOAD_CPU}) answering a 23-byte body. Proxies on \
         CPU {SUBJECT_CPU}, one thread/worker each: `ward proxy` (standalone, {RULES} \
         HTTP rules `GET /api/v1/svcN/.*`, the request matches the last; no audit log), \
         HAProxy (`http-request allow if METH_GET {{ path_reg ... }}` x {RULES}, then deny \
         403), nginx (`location ~ ...` x {RULES} with `limit_except GET`, then 403). Before \
         each measurement the harness checks that `{PATH}` answers 200 and `{DENIED_PATH}` \
         403 through the proxy. Load for {secs} s per target on CPU {LOAD_CPU}: wrk \
         `-t1 -c{CONNECTIONS}` (HTTP/1.1 keep-alive), h2load `-t1 -c8 -m8` (h2c, 64 \
         concurrent streams). Upstream protocol: ward and HAProxy speak the downstream \
         protocol to the backend (h2c for h2c); nginx proxies to HTTP/1.1 (it has no h2 \
         upstream for plain HTTP). CPU = utime+stime of the proxy process from \
         /proc/PID/stat over the load window. {rounds} round(s), targets in turn within \
         each; the table shows, per target, the round with the median requests per \
         CPU-second (direct: median req/s), and the last column that figure for every \
         round.\n"
    );
    s.push_str(
        "| protocol | target | requests | req/s | p50 | p99 | errors | proxy CPU s | req per CPU-s | every round |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (r, keys) in &picked {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.0} us | {:.0} us | {} | {} | {} | {} |",
            r.proto.name(),
            r.target.name(),
            r.load.requests,
            r.load.per_second,
            r.load.p50_us,
            r.load.p99_us,
            r.load.errors,
            r.cpu
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            if r.cpu.is_some() {
                format!("{:.0}", r.per_cpu())
            } else {
                "-".into()
            },
            keys.iter()
                .map(|k| format!("{k:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s.push_str("\nRatios (same run):\n\n| protocol | ward/haproxy req per CPU-s | ward/nginx req per CPU-s | ward/haproxy req/s | ward/nginx req/s | p50 added over direct: ward / haproxy / nginx |\n|---|---|---|---|---|---|\n");
    for proto in [Proto::H1, Proto::H2] {
        let get = |t: Target| {
            picked
                .iter()
                .map(|(r, _)| *r)
                .find(|r| r.proto == proto && r.target == t)
        };
        let (Some(d), Some(w), Some(h), Some(n)) = (
            get(Target::Direct),
            get(Target::Ward),
            get(Target::Haproxy),
            get(Target::Nginx),
        ) else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} us |",
            proto.name(),
            ratio(w.per_cpu(), h.per_cpu()),
            ratio(w.per_cpu(), n.per_cpu()),
            ratio(w.load.per_second, h.load.per_second),
            ratio(w.load.per_second, n.load.per_second),
            w.load.p50_us - d.load.p50_us,
            h.load.p50_us - d.load.p50_us,
            n.load.p50_us - d.load.p50_us,
        );
    }
    s.push('\n');
    s
}
