//! HTTP proxies side by side over a sweep of what users vary: the number of HTTP rules
//! (method + path regex, some with a header match), the open connections (or concurrent
//! h2c streams), the response size, HTTP/1.1 and h2c. At every point `ward proxy`
//! (standalone, default settings as shipped), HAProxy (one thread) and nginx as a reverse
//! proxy (one worker) run in turn on the subject CPU with the same rules and a 403
//! otherwise, in front of one nginx backend; wrk drives HTTP/1.1 keep-alive and h2load
//! h2c. Each point gives requests per CPU-second of the proxy process and p50/p99; the
//! report has one table and one chart (gnuplot PNG) per protocol.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::parse::{self, Load};
use super::{output, ratio, Ctx, Netns, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::Result;

pub(super) const DENIED_PATH: &str = "/admin";
/// The header rules' header (`POST .../orders` with it is allowed, without it denied).
pub(super) const HEADER: (&str, &str) = ("Content-Type", "application/json");

const BACKEND_H1: u16 = 8081;
const BACKEND_H2: u16 = 8082;

/// Rule counts, connections and bodies of a full sweep.
pub const RULES: [usize; 5] = [1, 2, 10, 50, 1000];
pub const CONNS: [usize; 4] = [1, 16, 64, 256];
/// The point the other axes are swept from: 2 rules (most policies carry a handful), 64
/// connections, the small body.
const BASE_RULES: usize = 2;
const BASE_CONNS: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
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

    fn tag(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2c",
        }
    }
}

/// The backend's answer: a 23-byte text or a 16 KiB file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    fn name(self) -> &'static str {
        match self {
            Size::Small => "23 B",
            Size::Large => "16 KiB",
        }
    }

    fn leaf(self) -> &'static str {
        match self {
            Size::Small => "items",
            Size::Large => "big",
        }
    }
}

/// What to sweep (`--rules 2,50 --conns 64 --proto h1 --size small,16k --full`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepOpts {
    pub rules: Option<Vec<usize>>,
    pub conns: Option<Vec<usize>>,
    pub protos: Option<Vec<Proto>>,
    pub sizes: Option<Vec<Size>>,
    /// Every combination of the full lists (long: see the estimate printed at start).
    pub full: bool,
}

fn list<T>(arg: &str, what: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>> {
    arg.split(',')
        .map(|s| f(s.trim()).ok_or_else(|| format!("{what} {arg}: cannot read {s:?}")))
        .collect()
}

impl SweepOpts {
    /// Takes one sweep option and its value; false when `flag` is not one.
    pub fn parse_flag(&mut self, flag: &str, value: Option<&String>) -> Result<bool> {
        let value = || value.ok_or_else(|| format!("{flag} needs a comma-separated list"));
        match flag {
            "--rules" => {
                let v = list(value()?, flag, |s| s.parse().ok().filter(|n| *n > 0))?;
                self.rules = Some(v);
            }
            "--conns" => {
                let v = list(value()?, flag, |s| s.parse().ok().filter(|n| *n > 0))?;
                self.conns = Some(v);
            }
            "--proto" => {
                self.protos = Some(list(value()?, flag, |s| match s {
                    "h1" => Some(Proto::H1),
                    "h2" | "h2c" => Some(Proto::H2),
                    _ => None,
                })?)
            }
            "--size" => {
                self.sizes = Some(list(value()?, flag, |s| match s {
                    "small" | "23" => Some(Size::Small),
                    "16k" | "large" => Some(Size::Large),
                    _ => None,
                })?)
            }
            "--full" => self.full = true,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether a flag takes a value (for the caller's argument walk).
    pub fn takes_value(flag: &str) -> bool {
        matches!(flag, "--rules" | "--conns" | "--proto" | "--size")
    }

    fn protos(&self) -> Vec<Proto> {
        self.protos.clone().unwrap_or(vec![Proto::H1, Proto::H2])
    }

    /// The points to measure. `--full`: every combination of the lists (given or full).
    /// With lists given: their combinations, the other axes at the base point. Without:
    /// the rules axis at the base connections, the connections axis at the base rules
    /// (small body), and the large body at the base point; `quick` keeps the base point
    /// and 1,000 rules.
    fn points(&self, quick: bool) -> Vec<Point> {
        let given = self.rules.is_some() || self.conns.is_some() || self.sizes.is_some();
        let mut out = Vec::new();
        if self.full || given {
            let (r, c, s) = if self.full {
                (
                    RULES.to_vec(),
                    CONNS.to_vec(),
                    vec![Size::Small, Size::Large],
                )
            } else {
                (vec![BASE_RULES], vec![BASE_CONNS], vec![Size::Small])
            };
            for &rules in self.rules.as_ref().unwrap_or(&r) {
                for &conns in self.conns.as_ref().unwrap_or(&c) {
                    for &size in self.sizes.as_ref().unwrap_or(&s) {
                        out.push(Point { rules, conns, size });
                    }
                }
            }
        } else if quick {
            out.push(Point::base());
            out.push(Point {
                rules: 1000,
                ..Point::base()
            });
        } else {
            for rules in RULES {
                out.push(Point {
                    rules,
                    ..Point::base()
                });
            }
            for conns in CONNS {
                out.push(Point {
                    conns,
                    ..Point::base()
                });
            }
            out.push(Point {
                size: Size::Large,
                ..Point::base()
            });
        }
        let mut seen = Vec::new();
        out.retain(|p| {
            let new = !seen.contains(p);
            seen.push(*p);
            new
        });
        out
    }
}

/// One operating point of the sweep.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Point {
    rules: usize,
    conns: usize,
    size: Size,
}

impl Point {
    fn base() -> Point {
        Point {
            rules: BASE_RULES,
            conns: BASE_CONNS,
            size: Size::Small,
        }
    }

    /// The benchmarked path: it matches the last rule (`GET /api/v1/svcN/.*`).
    fn path(&self) -> String {
        format!("/api/v1/svc{}/{}", self.rules - 1, self.size.leaf())
    }
}

/// One HTTP rule as every proxy is given it.
#[derive(Debug, PartialEq)]
pub(super) struct Rule {
    pub method: &'static str,
    /// A regular expression over the whole path.
    pub path: String,
    pub header: bool,
}

/// `n` rules: every other rule but the last is `POST /api/v1/svcI/orders` with
/// `Content-Type: application/json` (the two-rule policy), the others `GET
/// /api/v1/svcI/.*`; the benchmarked request matches the last, so a proxy that scans its
/// rules in order scans them all.
pub(super) fn rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            if i + 1 < n && i % 2 == 0 {
                Rule {
                    method: "POST",
                    path: format!("/api/v1/svc{i}/orders"),
                    header: true,
                }
            } else {
                Rule {
                    method: "GET",
                    path: format!("/api/v1/svc{i}/.*"),
                    header: false,
                }
            }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Target {
    Ward,
    /// `--ward-base`: another build, measured beside `ward` in the same rounds.
    WardBase,
    Haproxy,
    Nginx,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ward => "ward",
            Target::WardBase => "ward base",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
        }
    }

    fn port(self, p: Proto) -> u16 {
        let base = match self {
            Target::Ward => 9001,
            Target::WardBase => 9031,
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

fn backend_port(p: Proto) -> u16 {
    if p == Proto::H1 {
        BACKEND_H1
    } else {
        BACKEND_H2
    }
}

struct Row {
    target: Target,
    proto: Proto,
    point: Point,
    load: Load,
    /// CPU seconds of the proxy process during the load.
    cpu: f64,
}

impl Row {
    fn per_cpu(&self) -> f64 {
        if self.cpu > 0.0 {
            self.load.requests as f64 / self.cpu
        } else {
            f64::NAN
        }
    }
}

fn write(ctx: &Ctx, name: &str, text: &str) -> Result<PathBuf> {
    let p = ctx.work.join(name);
    std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

fn nginx_common(work: &Path, name: &str) -> String {
    let w = work.display();
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

/// The backend: 23 bytes for any path, the 16 KiB file `$WORK/www/big` for `.../big`.
fn backend_conf(work: &Path) -> String {
    format!(
        "{}  server {{
    listen 127.0.0.1:{BACKEND_H1};
    listen 127.0.0.1:{BACKEND_H2} http2;
    location / {{ return 200 \"hello from the backend\\n\"; }}
    location ~ /big$ {{ root {}/www; try_files /big =404; }}
  }}
}}
",
        nginx_common(work, "backend"),
        work.display()
    )
}

fn nginx_proxy_conf(work: &Path, n: usize) -> String {
    let mut s = nginx_common(work, "nginx-proxy");
    let _ = write!(
        s,
        "  upstream backend {{ server 127.0.0.1:{BACKEND_H1}; keepalive 512; }}
  proxy_http_version 1.1; proxy_set_header Connection \"\";
  server {{
    listen 127.0.0.1:{}; listen 127.0.0.1:{} http2;
",
        Target::Nginx.port(Proto::H1),
        Target::Nginx.port(Proto::H2)
    );
    for r in rules(n) {
        let header = if r.header {
            format!(
                "if ($http_{} != \"{}\") {{ return 403; }} ",
                HEADER.0.to_ascii_lowercase().replace('-', "_"),
                HEADER.1
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "    location ~ ^{}$ {{ limit_except {} {{ deny all; }} {header}proxy_pass http://backend; }}",
            r.path, r.method
        );
    }
    s.push_str("    location / { return 403 \"Access denied\\r\\n\"; }\n  }\n}\n");
    s
}

/// HAProxy's `http-request allow` lines for the `n` rules of [`rules`], one a rule, in
/// order (the deny that follows them is the caller's).
pub(super) fn haproxy_allow_lines(n: usize) -> String {
    let mut s = String::new();
    for r in rules(n) {
        let header = if r.header {
            format!(
                " {{ req.hdr({}) -m str {} }}",
                HEADER.0.to_ascii_lowercase(),
                HEADER.1
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  http-request allow if METH_{} {{ path_reg ^{}$ }}{header}",
            r.method, r.path
        );
    }
    s
}

fn haproxy_conf(n: usize) -> String {
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
        let tag = p.tag();
        let _ = writeln!(
            s,
            "frontend fe_{tag}\n  bind 127.0.0.1:{}{server}",
            Target::Haproxy.port(p)
        );
        s.push_str(&haproxy_allow_lines(n));
        let _ = writeln!(
            s,
            "  http-request deny deny_status 403 content-type text/plain string \"Access denied\"
  default_backend be_{tag}
backend be_{tag}
  server s1 127.0.0.1:{}{server}",
            backend_port(p)
        );
    }
    s
}

const WARD_CLUSTER: &str = "cluster:
  namespaces: [{name: bench}]
  pods:
    - {namespace: bench, name: client, labels: {app: client}, ip: 127.0.0.1}
    - {namespace: bench, name: web, labels: {app: web}, ip: 10.0.9.2}
";

fn ward_policy(n: usize) -> String {
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
    for r in rules(n) {
        let header = if r.header {
            format!(", headers: [\"{}: {}\"]", HEADER.0, HEADER.1)
        } else {
            String::new()
        };
        let _ = writeln!(
            policy,
            "        - {{method: {}, path: \"{}\"{header}}}",
            r.method, r.path
        );
    }
    policy
}

/// Starts the proxy for `target` with `n` rules, pinned to the subject CPU.
fn start(ctx: &mut Ctx, ns: &Netns, target: Target, proto: Proto, n: usize) -> Result<Proc> {
    let log = ctx
        .work
        .join(format!("{}.log", target.name().replace(' ', "-")));
    let mut cmd = match target {
        Target::Ward | Target::WardBase => {
            let cluster = write(ctx, "proxy-cluster.yaml", WARD_CLUSTER)?;
            let policy = write(ctx, "proxy-policy.yaml", &ward_policy(n))?;
            let bin = match (target, &ctx.ward_base) {
                (Target::WardBase, Some(b)) => b.display().to_string(),
                _ => ctx.ward.display().to_string(),
            };
            let mut c = ns.cmd(SUBJECT_CPU, &bin);
            // the defaults, as shipped
            c.args(["proxy", "--listen"])
                .arg(format!("127.0.0.1:{}", target.port(proto)))
                .arg("--upstream")
                .arg(format!("127.0.0.1:{}", backend_port(proto)))
                .arg("--cluster")
                .arg(cluster)
                .arg("--policies")
                .arg(policy)
                .args(["--endpoint", "bench/web", "--port", "80"]);
            c
        }
        Target::Haproxy => {
            let conf = write(ctx, "haproxy.cfg", &haproxy_conf(n))?;
            let mut c = ns.cmd(SUBJECT_CPU, "haproxy");
            c.args(["-db", "-f"]).arg(conf);
            c
        }
        Target::Nginx => {
            let conf = write(ctx, "nginx-proxy.conf", &nginx_proxy_conf(&ctx.work, n))?;
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
    Ok(p)
}

/// The status curl gets for `method path` (h2c with prior knowledge for HTTP/2), with
/// the rules' header when `header`.
fn status(
    ctx: &mut Ctx,
    ns: &Netns,
    port: u16,
    proto: Proto,
    (method, path): (&str, &str),
    header: bool,
) -> Result<String> {
    let mut c = ns.cmd(LOAD_CPU, "curl");
    c.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "-X",
        method,
    ]);
    if header {
        c.args(["-H", &format!("{}: {}", HEADER.0, HEADER.1)]);
    }
    if proto == Proto::H2 {
        c.arg("--http2-prior-knowledge");
    }
    c.arg(format!("http://127.0.0.1:{port}{path}"));
    output(ctx, &mut c)
}

/// h2load's connections and streams per connection for `n` concurrent requests: at
/// most 8 streams a connection (64: 8 x 8, 1: 1 x 1, 256: 32 x 8).
fn h2_shape(n: usize) -> (usize, usize) {
    let streams = n.clamp(1, 8);
    (n.div_ceil(streams), streams)
}

fn drive(
    ctx: &mut Ctx,
    ns: &Netns,
    url: &str,
    proto: Proto,
    conns: usize,
    secs: u64,
) -> Result<Load> {
    match proto {
        Proto::H1 => {
            let out = output(
                ctx,
                ns.cmd(LOAD_CPU, "wrk")
                    .args(["-t1", "-c", &conns.to_string(), "-d"])
                    .arg(format!("{secs}s"))
                    .args(["--latency", url]),
            )?;
            parse::wrk(&out).ok_or_else(|| format!("cannot read wrk's output: {out}"))
        }
        Proto::H2 => {
            let log = ctx.work.join("h2load.log");
            let (c, m) = h2_shape(conns);
            let out = output(
                ctx,
                ns.cmd(LOAD_CPU, "h2load")
                    .arg("-t1")
                    .arg(format!("-c{c}"))
                    .arg(format!("-m{m}"))
                    .args(["-D", &secs.to_string(), "--log-file"])
                    .arg(&log)
                    .arg(url),
            )?;
            let lines = std::fs::read_to_string(&log).unwrap_or_default();
            parse::h2load(&out, &lines).ok_or_else(|| format!("cannot read h2load's output: {out}"))
        }
    }
}

fn expect(what: &str, got: String, want: &str) -> Result {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} got {got}, not {want}"))
    }
}

fn measure(
    ctx: &mut Ctx,
    ns: &Netns,
    target: Target,
    proto: Proto,
    point: Point,
    secs: u64,
) -> Result<Row> {
    let proxy = start(ctx, ns, target, proto, point.rules)?;
    let port = target.port(proto);
    let at = format!("{} {} {} rules", target.name(), proto.name(), point.rules);
    // The rules are really evaluated: the benchmarked path passes, another is denied, and
    // a header rule needs its header.
    let path = point.path();
    let got = status(ctx, ns, port, proto, ("GET", &path), false)?;
    expect(&format!("{at}: GET {path}"), got, "200")?;
    let got = status(ctx, ns, port, proto, ("GET", DENIED_PATH), false)?;
    expect(&format!("{at}: GET {DENIED_PATH}"), got, "403")?;
    if let Some(r) = rules(point.rules).iter().find(|r| r.header) {
        let got = status(ctx, ns, port, proto, (r.method, &r.path), true)?;
        expect(
            &format!("{at}: {} {} with the header", r.method, r.path),
            got,
            "200",
        )?;
        let got = status(ctx, ns, port, proto, (r.method, &r.path), false)?;
        expect(
            &format!("{at}: {} {} without it", r.method, r.path),
            got,
            "403",
        )?;
    }
    let url = format!("http://127.0.0.1:{port}{path}");
    let before = proxy.cpu_seconds()?;
    let load = drive(ctx, ns, &url, proto, point.conns, secs)?;
    let cpu = proxy.cpu_seconds()? - before;
    // a proxy that fails requests would look cheap: more than 1% errors fails the run
    if load.errors * 100 > load.requests {
        return Err(format!(
            "{at}: {} errors in {} requests",
            load.errors, load.requests
        ));
    }
    Ok(Row {
        target,
        proto,
        point,
        load,
        cpu,
    })
}

/// Runs the sweep; the charts go to `chart_dir` (beside the report).
pub fn run(ctx: &mut Ctx, opts: &SweepOpts, chart_dir: &Path) -> Result<String> {
    // --full's 720 runs (40 points) stay under 45 minutes with 2 s each
    let (secs, rounds) = match (ctx.quick, opts.full) {
        (true, _) => (1, 1),
        (false, true) => (2, 3),
        (false, false) => (4, 3),
    };
    let points = opts.points(ctx.quick);
    let protos = opts.protos();
    let mut targets = vec![Target::Ward];
    if ctx.ward_base.is_some() {
        targets.push(Target::WardBase);
    }
    targets.extend([Target::Haproxy, Target::Nginx]);
    let runs = points.len() * protos.len() * targets.len() * rounds as usize;
    // load time plus about 1.5 s to start a proxy and check its answers
    eprintln!(
        "loadtest proxy: {} points x {} protocols x {} targets x {rounds} rounds = {runs} \
         runs of {secs} s, about {} min",
        points.len(),
        protos.len(),
        targets.len(),
        (runs as f64 * (secs as f64 + 1.5) / 60.0).ceil()
    );
    let ns = Netns::new("proxy")?;
    let www = ctx.work.join("www");
    std::fs::create_dir_all(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    let big = www.join("big");
    std::fs::write(&big, vec![b'x'; 16 * 1024]).map_err(|e| format!("{}: {e}", big.display()))?;
    let conf = write(ctx, "backend.conf", &backend_conf(&ctx.work))?;
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
    let mut done = 0;
    for round in 1..=rounds {
        for &point in &points {
            for &proto in &protos {
                for &target in &targets {
                    done += 1;
                    eprintln!(
                        "loadtest proxy: {done}/{runs} round {round}: {} {} {} rules {} conns {}",
                        target.name(),
                        proto.tag(),
                        point.rules,
                        point.conns,
                        point.size.name()
                    );
                    all.push(measure(ctx, &ns, target, proto, point, secs)?);
                }
            }
        }
    }
    drop(backend);
    let mut s = describe(secs, rounds, &targets);
    for proto in protos {
        s.push_str(&table(&all, proto, &points, &targets));
        if let Some(png) = chart(&all, proto, &targets, chart_dir)? {
            let _ = writeln!(
                s,
                "![{}: requests per proxy CPU-second]({png})\n",
                proto.name()
            );
        }
    }
    s.push_str(&rounds_table(&all, &points, &targets));
    Ok(s)
}

fn describe(secs: u64, rounds: u32, targets: &[Target]) -> String {
    let mut s = String::from("## HTTP proxy\n\n");
    let _ = writeln!(
        s,
        "Backend: nginx (one process, CPU {LOAD_CPU}) answering a 23-byte body, or a 16 KiB \
         file. Proxies on CPU {SUBJECT_CPU} in turn: `ward proxy` (standalone, default \
         settings as shipped; no audit log{}), HAProxy (`nbthread 1`, `http-request allow if \
         METH_X {{ path_reg ... }}` per rule, then deny 403), nginx (one worker, `location ~ \
         ...` per rule with `limit_except`, then 403). N rules: every other rule but the last \
         is `POST /api/v1/svcI/orders` with the header `{}: {}` (HAProxy `req.hdr`, nginx \
         `if ($http_content_type ...)`), the others `GET /api/v1/svcI/.*`; the request is \
         `GET /api/v1/svc(N-1)/items` (or `.../big`), matching the last rule. Before each \
         measurement the harness checks through the proxy: 200 for the benchmarked path, 403 \
         for `{DENIED_PATH}`, and for a header rule 200 with the header and 403 without. \
         Load for {secs} s per run on CPU {LOAD_CPU}: wrk `-t1 -cC` (HTTP/1.1 keep-alive), \
         h2load `-t1` with C concurrent streams, at most 8 per connection (64: `-c8 -m8`). \
         Ward and HAProxy speak the downstream protocol to the backend (h2c for h2c); nginx \
         proxies to HTTP/1.1. CPU = utime+stime of the proxy process from /proc/PID/stat \
         over the load window. {rounds} round(s), every point and target in turn within \
         each; the tables show the median round's requests per proxy CPU-second and its \
         p50/p99 (the rounds are listed at the end).\n",
        if targets.contains(&Target::WardBase) {
            "; `ward base`: the `--ward-base` build, same settings"
        } else {
            ""
        },
        HEADER.0,
        HEADER.1
    );
    s
}

/// The figure a round is ranked by: requests per proxy CPU-second.
fn key(r: &Row) -> f64 {
    r.per_cpu()
}

/// The round with the median key at (target, protocol, point), and every round's key.
fn median(all: &[Row], t: Target, proto: Proto, p: Point) -> Option<(&Row, Vec<f64>)> {
    let mut rs: Vec<&Row> = all
        .iter()
        .filter(|r| r.proto == proto && r.target == t && r.point == p)
        .collect();
    let keys = rs.iter().map(|r| key(r)).collect();
    rs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    rs.get(rs.len().saturating_sub(1) / 2).map(|m| (*m, keys))
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn table(all: &[Row], proto: Proto, points: &[Point], targets: &[Target]) -> String {
    let mut s = format!("### {}\n\n| rules | conns | body |", proto.name());
    for t in targets {
        let _ = write!(s, " {} req/CPU-s |", t.name());
    }
    s.push_str(" ward / haproxy | ward / nginx |");
    if targets.contains(&Target::WardBase) {
        s.push_str(" ward / ward base |");
    }
    s.push_str(" p50 ms (");
    s.push_str(
        &targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(" / "),
    );
    s.push_str(") | p99 ms (same) | p99 ward / haproxy |\n|---|---|---|");
    let cols = targets.len() + 5 + usize::from(targets.contains(&Target::WardBase));
    s.push_str(&"---|".repeat(cols));
    s.push('\n');
    for &p in points {
        let m: Vec<Option<&Row>> = targets
            .iter()
            .map(|&t| median(all, t, proto, p).map(|(r, _)| r))
            .collect();
        let get = |t: Target| targets.iter().position(|x| *x == t).and_then(|i| m[i]);
        let (Some(w), Some(h), Some(n)) =
            (get(Target::Ward), get(Target::Haproxy), get(Target::Nginx))
        else {
            continue;
        };
        let _ = write!(s, "| {} | {} | {} |", p.rules, p.conns, p.size.name());
        for r in m.iter().flatten() {
            let _ = write!(s, " {:.0} |", r.per_cpu());
        }
        let _ = write!(
            s,
            " {} | {} |",
            ratio(w.per_cpu(), h.per_cpu()),
            ratio(w.per_cpu(), n.per_cpu())
        );
        if let Some(b) = get(Target::WardBase) {
            let _ = write!(s, " {} |", ratio(w.per_cpu(), b.per_cpu()));
        }
        let lat = |f: fn(&Load) -> f64| {
            m.iter()
                .flatten()
                .map(|r| ms(f(&r.load)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let _ = writeln!(
            s,
            " {} | {} | {} |",
            lat(|l| l.p50_us),
            lat(|l| l.p99_us),
            ratio(w.load.p99_us, h.load.p99_us)
        );
    }
    s.push('\n');
    s
}

fn rounds_table(all: &[Row], points: &[Point], targets: &[Target]) -> String {
    let mut s = String::from(
        "### Every round\n\nRequests per proxy CPU-second, p99 in ms, round by round.\n\n\
         | protocol | rules | conns | body | target | req/CPU-s | p99 ms |\n|---|---|---|---|---|---|---|\n",
    );
    for proto in [Proto::H1, Proto::H2] {
        for &p in points {
            for &t in targets {
                let rs: Vec<&Row> = all
                    .iter()
                    .filter(|r| r.proto == proto && r.target == t && r.point == p)
                    .collect();
                if rs.is_empty() {
                    continue;
                }
                let join = |f: &dyn Fn(&Row) -> String| {
                    rs.iter().map(|r| f(r)).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    proto.tag(),
                    p.rules,
                    p.conns,
                    p.size.name(),
                    t.name(),
                    join(&|r| format!("{:.0}", r.per_cpu())),
                    join(&|r| ms(r.load.p99_us)),
                );
            }
        }
    }
    s.push('\n');
    s
}

/// Per target, (x, requests per CPU-second) along one axis of the sweep.
type Series = Vec<(Target, Vec<(usize, f64)>)>;

/// Gnuplot data blocks of one axis: per target, `x req/CPU-s` over the points where the
/// other axes sit at the base point.
fn series(
    all: &[Row],
    proto: Proto,
    targets: &[Target],
    axis: fn(&Point) -> Option<usize>,
) -> Series {
    targets
        .iter()
        .map(|&t| {
            let mut pts: Vec<Point> = all
                .iter()
                .filter(|r| r.proto == proto && r.target == t && axis(&r.point).is_some())
                .map(|r| r.point)
                .collect();
            pts.sort_by_key(axis);
            pts.dedup();
            let xy = pts
                .iter()
                .filter_map(|&p| Some((axis(&p)?, median(all, t, proto, p)?.0.per_cpu())))
                .collect();
            (t, xy)
        })
        .collect()
}

/// One PNG per protocol: requests per CPU-second against rules (base connections, small
/// body) and against connections (base rules); an axis with fewer than two points is
/// left out, and no chart without one. Returns the file name.
fn chart(all: &[Row], proto: Proto, targets: &[Target], dir: &Path) -> Result<Option<String>> {
    let by_rules: fn(&Point) -> Option<usize> =
        |p| (p.conns == BASE_CONNS && p.size == Size::Small).then_some(p.rules);
    let by_conns: fn(&Point) -> Option<usize> =
        |p| (p.rules == BASE_RULES && p.size == Size::Small).then_some(p.conns);
    let panels: Vec<(String, Series)> = [
        (
            format!("rules (at {BASE_CONNS} connections)"),
            series(all, proto, targets, by_rules),
        ),
        (
            format!("concurrent requests (at {BASE_RULES} rules)"),
            series(all, proto, targets, by_conns),
        ),
    ]
    .into_iter()
    .filter(|(_, s)| s.iter().all(|(_, xy)| xy.len() >= 2))
    .collect();
    if panels.is_empty() {
        return Ok(None);
    }
    let name = format!("proxy-{}.png", proto.tag());
    let path = dir.join(&name);
    let mut g = String::new();
    for (i, (_, s)) in panels.iter().enumerate() {
        for (t, xy) in s {
            let _ = writeln!(g, "$d{i}_{} << EOD", t.name().replace(' ', "_"));
            for (x, y) in xy {
                let _ = writeln!(g, "{x} {y:.0}");
            }
            g.push_str("EOD\n");
        }
    }
    let _ = writeln!(
        g,
        "set terminal pngcairo size {},420 font \",10\"\nset output \"{}\"",
        480 * panels.len(),
        path.display()
    );
    let _ = writeln!(
        g,
        "set multiplot layout 1,{} title \"{}: requests per proxy CPU-second\"\n\
         set logscale x\nset yrange [0:*]\nset grid\nset key bottom left",
        panels.len(),
        proto.name()
    );
    for (i, (label, s)) in panels.iter().enumerate() {
        let plots: Vec<String> = s
            .iter()
            .map(|(t, _)| {
                format!(
                    "$d{i}_{} with linespoints lw 2 title \"{}\"",
                    t.name().replace(' ', "_"),
                    t.name()
                )
            })
            .collect();
        let _ = writeln!(g, "set xlabel \"{label}\"\nplot {}", plots.join(", "));
    }
    g.push_str("unset multiplot\n");
    super::gnuplot(&g)?;
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<SweepOpts> {
        let mut o = SweepOpts::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v = SweepOpts::takes_value(a).then(|| it.next().map(|s| s.to_string()));
            let v = v.flatten();
            assert!(o.parse_flag(a, v.as_ref())?, "{a} is a sweep flag");
        }
        Ok(o)
    }

    #[test]
    fn the_default_sweep_varies_one_axis_at_a_time_from_the_base_point() {
        let p = SweepOpts::default().points(false);
        let rules: Vec<usize> = p
            .iter()
            .filter(|p| p.conns == 64 && p.size == Size::Small)
            .map(|p| p.rules)
            .collect();
        assert_eq!(rules, RULES);
        let conns: Vec<usize> = p
            .iter()
            .filter(|p| p.rules == 2 && p.size == Size::Small)
            .map(|p| p.conns)
            .collect();
        assert_eq!(conns, [64, 1, 16, 256]);
        assert!(p.contains(&Point {
            size: Size::Large,
            ..Point::base()
        }));
        assert_eq!(p.len(), 9, "no point twice: {p:?}");
        assert_eq!(SweepOpts::default().protos(), [Proto::H1, Proto::H2]);
    }

    #[test]
    fn options_pick_a_subset_and_full_takes_every_combination() {
        let o = parse(&["--rules", "2,50", "--conns", "64", "--proto", "h1"]).unwrap();
        assert_eq!(o.protos(), [Proto::H1]);
        let p = o.points(false);
        assert_eq!(p.iter().map(|p| p.rules).collect::<Vec<_>>(), [2, 50]);
        assert!(p.iter().all(|p| p.conns == 64 && p.size == Size::Small));
        let o = parse(&["--size", "16k"]).unwrap();
        assert_eq!(
            o.points(false),
            [Point {
                size: Size::Large,
                ..Point::base()
            }]
        );
        let o = parse(&["--full"]).unwrap();
        assert_eq!(o.points(false).len(), 5 * 4 * 2);
        let o = parse(&["--full", "--rules", "1"]).unwrap();
        assert_eq!(o.points(false).len(), 4 * 2);
        assert!(parse(&["--rules", "two"]).is_err());
        assert!(parse(&["--rules", "0"]).is_err());
        assert!(parse(&["--proto", "h3"]).is_err());
        assert!(parse(&["--conns"]).is_err());
        assert_eq!(SweepOpts::default().points(true).len(), 2);
    }

    #[test]
    fn the_request_matches_the_last_rule_and_every_other_rule_needs_a_header() {
        assert_eq!(
            rules(1),
            [Rule {
                method: "GET",
                path: "/api/v1/svc0/.*".into(),
                header: false
            }]
        );
        let r = rules(2);
        assert_eq!((r[0].method, r[0].header), ("POST", true));
        assert_eq!(r[1].path, "/api/v1/svc1/.*");
        assert_eq!(rules(1000).iter().filter(|r| r.header).count(), 500);
        let p = Point {
            rules: 10,
            ..Point::base()
        };
        let re = regex_lite_match(&rules(10)[9].path, &p.path());
        assert!(re, "{} matches {}", rules(10)[9].path, p.path());
    }

    /// `PREFIX/.*` against a path (the only regex shape the rules use besides literals).
    fn regex_lite_match(re: &str, path: &str) -> bool {
        re.strip_suffix(".*")
            .is_some_and(|pre| path.starts_with(pre))
    }

    #[test]
    fn every_proxy_gets_every_rule_with_its_method_and_header() {
        let work = Path::new("/w");
        let h = haproxy_conf(10);
        // two frontends, ten rules each
        assert_eq!(h.matches("http-request allow").count(), 20);
        assert_eq!(
            h.matches("req.hdr(content-type) -m str application/json")
                .count(),
            10
        );
        assert!(h.contains("http-request allow if METH_POST { path_reg ^/api/v1/svc0/orders$ }"));
        assert!(h.contains("http-request allow if METH_GET { path_reg ^/api/v1/svc9/.*$ }"));
        let n = nginx_proxy_conf(work, 10);
        assert_eq!(n.matches("location ~ ^/api/v1/").count(), 10);
        assert_eq!(
            n.matches("if ($http_content_type != \"application/json\")")
                .count(),
            5
        );
        assert!(n.contains("location ~ ^/api/v1/svc0/orders$ { limit_except POST"));
        let w = ward_policy(10);
        assert_eq!(w.matches("- {method:").count(), 10);
        assert!(w.contains(
            "- {method: POST, path: \"/api/v1/svc0/orders\", headers: [\"Content-Type: application/json\"]}"
        ));
        assert!(backend_conf(work).contains("root /w/www; try_files /big"));
    }

    #[test]
    fn h2load_gets_the_concurrency_in_at_most_eight_streams_a_connection() {
        assert_eq!(h2_shape(1), (1, 1));
        assert_eq!(h2_shape(16), (2, 8));
        assert_eq!(h2_shape(64), (8, 8));
        assert_eq!(h2_shape(256), (32, 8));
    }
}
