//! HTTPS egress proxies side by side (issue 20): an nginx TLS backend (`api.bench.example`,
//! certificate from a "public" CA) reached directly, and through three proxies that
//! intercept: `ward proxy` (standalone, egress, one worker thread; terminatingTLS with a
//! CA secret, so it mints the leaf, originatingTLS verified against the public CA; the
//! same 50 HTTP rules as the proxy part), HAProxy (one thread; `bind ... ssl crt` with a
//! leaf of the interception CA, the 50 rules, `server ... ssl verify required`) and nginx
//! (one worker; `listen ... ssl`, the 50 rules, `proxy_ssl_verify on`). Then TLS passed
//! through by SNI without decryption: `ward proxy` with a serverNames-only rule against
//! HAProxy in TCP mode routing on `req.ssl_sni`, and against what a plain L4 redirect
//! costs: the same `ward proxy` with an L4-only rule on the port (a connection redirected
//! because other peers of the port have L7 rules: spliced without an SNI check) and
//! HAProxy relaying TCP without inspection. Both with small requests and with bulk
//! downloads (bytes per second is what a splice is for).
//!
//! Loads: HTTPS keep-alive with wrk (HTTP/1.1) and h2load (h2 by ALPN), and new TLS
//! sessions with wrk sending `Connection: close` (each request a handshake with the
//! proxy; the proxies keep their upstream connections).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::parse::{self, Load};
use super::{output, ratio, Ctx, Netns, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::Result;

/// HTTP rules per proxy; the benchmarked path matches the last one.
const RULES: usize = 50;
const PATH: &str = "/api/v1/svc49/items";
const DENIED_PATH: &str = "/admin";
/// The SaaS name every client asks for.
const NAME: &str = "api.bench.example";
/// The backend as the proxies reach it (127.0.0.2: not the client pod's address, so
/// that a CIDR rule selects it); the clients reach it directly at [`DIRECT`].
const BACKEND: &str = "127.0.0.2:8443";
const DIRECT: &str = "127.0.0.1:8443";
const CONNECTIONS: &str = "64";
/// The bulk download: a file of [`BULK_BYTES`] the backend serves at this path.
const BULK_PATH: &str = "/bulk";
const BULK_BYTES: u64 = 4 << 20;
/// Connections downloading at once in the bulk load.
const BULK_CONNECTIONS: &str = "4";

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// HTTPS HTTP/1.1 keep-alive (wrk).
    KeepAlive,
    /// HTTPS h2 (h2load, ALPN).
    H2,
    /// A new TLS session per request (wrk, `Connection: close`).
    Handshakes,
    /// TLS passed through by SNI, HTTP/1.1 keep-alive inside (wrk).
    Splice,
    /// TLS passed through by SNI, bulk downloads of [`BULK_BYTES`] inside (wrk).
    SpliceBulk,
}

const LOADS: [Kind; 5] = [
    Kind::KeepAlive,
    Kind::H2,
    Kind::Handshakes,
    Kind::Splice,
    Kind::SpliceBulk,
];

/// The targets of the pass-through loads.
const SPLICERS: [Target; 5] = [
    Target::Direct,
    Target::WardSplice,
    Target::WardL4,
    Target::HaproxyTcp,
    Target::HaproxyPlain,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::KeepAlive => "HTTPS keep-alive (wrk)",
            Kind::H2 => "HTTPS h2 (h2load)",
            Kind::Handshakes => "new TLS sessions (wrk, Connection: close)",
            Kind::Splice => "SNI splice, keep-alive inside (wrk)",
            Kind::SpliceBulk => "SNI splice, 4 MiB downloads inside (wrk -c4)",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Kind::SpliceBulk => BULK_PATH,
            _ => PATH,
        }
    }

    fn targets(self) -> &'static [Target] {
        match self {
            Kind::Splice | Kind::SpliceBulk => &SPLICERS,
            _ => &[Target::Direct, Target::Ward, Target::Haproxy, Target::Nginx],
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Ward,
    Haproxy,
    Nginx,
    WardSplice,
    /// `ward proxy` splicing under an L4-only rule: no SNI to check.
    WardL4,
    HaproxyTcp,
    /// HAProxy relaying TCP without inspection: a plain L4 proxy.
    HaproxyPlain,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Ward => "ward",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
            Target::WardSplice => "ward (serverNames only)",
            Target::WardL4 => "ward (L4 rule, spliced)",
            Target::HaproxyTcp => "haproxy (tcp, req.ssl_sni)",
            Target::HaproxyPlain => "haproxy (tcp, no inspection)",
        }
    }

    fn addr(self) -> &'static str {
        match self {
            Target::Direct => DIRECT,
            Target::Ward => "127.0.0.1:9101",
            Target::Haproxy => "127.0.0.1:9111",
            Target::Nginx => "127.0.0.1:9121",
            Target::WardSplice => "127.0.0.1:9131",
            Target::HaproxyTcp => "127.0.0.1:9141",
            Target::WardL4 => "127.0.0.1:9151",
            Target::HaproxyPlain => "127.0.0.1:9161",
        }
    }

    fn port(self) -> u16 {
        self.addr()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the client sees the interception CA (the proxy terminates TLS).
    fn intercepts(self) -> bool {
        matches!(self, Target::Ward | Target::Haproxy | Target::Nginx)
    }
}

struct Row {
    load_kind: Kind,
    target: Target,
    load: Load,
    cpu: Option<f64>,
}

impl Row {
    fn per_cpu(&self) -> f64 {
        match self.cpu {
            Some(c) if c > 0.0 => self.load.requests as f64 / c,
            _ => f64::NAN,
        }
    }

    fn key(&self) -> f64 {
        if self.cpu.is_some() {
            self.per_cpu()
        } else {
            self.load.per_second
        }
    }
}

fn write(ctx: &Ctx, name: &str, text: &str) -> Result<PathBuf> {
    let p = ctx.work.join(name);
    std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

fn rules_regexes() -> Vec<String> {
    (0..RULES).map(|i| format!("/api/v1/svc{i}/.*")).collect()
}

/// Certificates, made with the openssl command line (ECDSA P-256, as Ward's minted
/// leaves): a public CA and the backend's certificate for [`NAME`]; an interception CA
/// (Ward's secret) and a leaf of it for [`NAME`] (what HAProxy and nginx present).
struct Pki {
    public_ca: PathBuf,
    intercept_ca: PathBuf,
    backend: (PathBuf, PathBuf),
    leaf: (PathBuf, PathBuf),
    /// The leaf and its key in one file (HAProxy's `crt`).
    leaf_pem: PathBuf,
}

fn openssl(ctx: &mut Ctx, args: &[&str]) -> Result {
    output(ctx, Command::new("openssl").args(args)).map(|_| ())
}

fn pki(ctx: &mut Ctx) -> Result<Pki> {
    let w = |n: &str| ctx.work.join(n).display().to_string();
    let (pub_crt, pub_key) = (w("public-ca.crt"), w("public-ca.key"));
    let (ica_crt, ica_key) = (w("intercept-ca.crt"), w("intercept-ca.key"));
    let (be_crt, be_key, be_csr) = (w("backend.crt"), w("backend.key"), w("backend.csr"));
    let (leaf_crt, leaf_key, leaf_csr) = (w("leaf.crt"), w("leaf.key"), w("leaf.csr"));
    let ext = write(ctx, "san.ext", &format!("subjectAltName=DNS:{NAME}\n"))?;
    let ext = ext.display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    for (crt, key, cn) in [
        (&pub_crt, &pub_key, "bench public CA"),
        (&ica_crt, &ica_key, "bench interception CA"),
    ] {
        let subj = format!("/CN={cn}");
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", key, "-out", crt, "-days", "2", "-subj", &subj]);
        openssl(ctx, &a)?;
    }
    for (crt, key, csr, ca, ca_key) in [
        (&be_crt, &be_key, &be_csr, &pub_crt, &pub_key),
        (&leaf_crt, &leaf_key, &leaf_csr, &ica_crt, &ica_key),
    ] {
        let subj = format!("/CN={NAME}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", key, "-out", csr, "-subj", &subj]);
        openssl(ctx, &a)?;
        openssl(
            ctx,
            &[
                "x509",
                "-req",
                "-in",
                csr,
                "-CA",
                ca,
                "-CAkey",
                ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                crt,
            ],
        )?;
    }
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
    let leaf_pem = write(
        ctx,
        "leaf.pem",
        &format!("{}{}", read(&leaf_crt)?, read(&leaf_key)?),
    )?;
    // Ward's secrets: DIR/NAMESPACE/NAME/KEY
    for (secret, files) in [
        (
            "intercept-ca",
            vec![("tls.crt", &ica_crt), ("tls.key", &ica_key)],
        ),
        ("public-ca", vec![("ca.crt", &pub_crt)]),
    ] {
        let dir = ctx.work.join("certs/bench").join(secret);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (key, from) in files {
            std::fs::copy(from, dir.join(key)).map_err(|e| format!("{from}: {e}"))?;
        }
    }
    Ok(Pki {
        public_ca: pub_crt.into(),
        intercept_ca: ica_crt.into(),
        backend: (be_crt.into(), be_key.into()),
        leaf: (leaf_crt.into(), leaf_key.into()),
        leaf_pem,
    })
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

fn backend_conf(ctx: &Ctx, pki: &Pki) -> String {
    format!(
        "{}  server {{
    listen {BACKEND} ssl http2; listen {DIRECT} ssl http2;
    ssl_certificate {}; ssl_certificate_key {};
    location / {{ return 200 \"hello from the backend\\n\"; }}
    location = {BULK_PATH} {{ root {}; default_type application/octet-stream; }}
  }}
}}
",
        nginx_common(ctx, "tls-backend"),
        pki.backend.0.display(),
        pki.backend.1.display(),
        ctx.work.join("www").display(),
    )
}

fn nginx_proxy_conf(ctx: &Ctx, pki: &Pki) -> String {
    let mut s = nginx_common(ctx, "tls-nginx");
    let _ = write!(
        s,
        "  upstream backend {{ server {BACKEND}; keepalive 64; }}
  proxy_http_version 1.1; proxy_set_header Connection \"\";
  proxy_ssl_verify on; proxy_ssl_trusted_certificate {};
  proxy_ssl_name {NAME}; proxy_ssl_server_name on; proxy_ssl_session_reuse on;
  server {{
    listen {} ssl http2;
    ssl_certificate {}; ssl_certificate_key {};
",
        pki.public_ca.display(),
        Target::Nginx.addr(),
        pki.leaf.0.display(),
        pki.leaf.1.display(),
    );
    for r in rules_regexes() {
        let _ = writeln!(
            s,
            "    location ~ ^{r}$ {{ limit_except GET {{ deny all; }} proxy_pass https://backend; }}"
        );
    }
    s.push_str("    location / { return 403 \"Access denied\\r\\n\"; }\n  }\n}\n");
    s
}

fn haproxy_conf(pki: &Pki) -> String {
    let mut s = String::from(
        "global
  nbthread 1
  maxconn 4000
  ssl-server-verify required
defaults
  # idle upstream connections serve the first request of a client connection too (the
  # default, safe, opens one per client connection: a TLS handshake upstream for every
  # new session, which Ward and nginx do not make)
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
",
    );
    let _ = writeln!(
        s,
        "frontend fe_https
  mode http
  bind {} ssl crt {} alpn h2,http/1.1",
        Target::Haproxy.addr(),
        pki.leaf_pem.display()
    );
    for r in rules_regexes() {
        let _ = writeln!(s, "  http-request allow if METH_GET {{ path_reg ^{r}$ }}");
    }
    let ca = pki.public_ca.display();
    let _ = writeln!(
        s,
        "  http-request deny deny_status 403 content-type text/plain string \"Access denied\"
  use_backend be_h2 if {{ ssl_fc_alpn -i h2 }}
  default_backend be_h1
backend be_h1
  mode http
  server s1 {BACKEND} ssl verify required ca-file {ca} sni str({NAME}) alpn http/1.1
backend be_h2
  mode http
  server s1 {BACKEND} ssl verify required ca-file {ca} sni str({NAME}) alpn h2
frontend fe_plain
  mode tcp
  bind {}
  default_backend be_tcp
frontend fe_sni
  mode tcp
  bind {}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  use_backend be_tcp if {{ req.ssl_sni -i {NAME} }}
backend be_tcp
  mode tcp
  server s1 {BACKEND}",
        Target::HaproxyPlain.addr(),
        Target::HaproxyTcp.addr()
    );
    s
}

/// What the `ward proxy` of a target enforces on the port.
#[derive(Clone, Copy, PartialEq)]
enum WardRules {
    /// terminatingTLS + originatingTLS + the HTTP rules.
    Intercept,
    /// serverNames only.
    Sni,
    /// The port alone (L4).
    L4,
}

fn ward_files(ctx: &Ctx, rules: WardRules) -> Result<(PathBuf, PathBuf)> {
    let cluster = write(
        ctx,
        "tls-cluster.yaml",
        "cluster:
  namespaces: [{name: bench}]
  pods:
    - {namespace: bench, name: client, labels: {app: client}, ip: 127.0.0.1}
",
    )?;
    let mut policy = String::from(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-saas, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.2/32]
    toPorts:
    - ports: [{port: \"443\", protocol: TCP}]
",
    );
    if rules != WardRules::L4 {
        let _ = writeln!(policy, "      serverNames: [{NAME}]");
    }
    if rules == WardRules::Intercept {
        policy.push_str(
            "      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: public-ca}}
      rules:
        http:
",
        );
        for r in rules_regexes() {
            let _ = writeln!(policy, "        - {{method: GET, path: \"{r}\"}}");
        }
    }
    let name = match rules {
        WardRules::Intercept => "tls-intercept.yaml",
        WardRules::Sni => "tls-splice.yaml",
        WardRules::L4 => "tls-l4.yaml",
    };
    Ok((cluster, write(ctx, name, &policy)?))
}

/// Starts the proxy of `target` (none for direct), pinned to the subject CPU.
fn start(ctx: &mut Ctx, ns: &Netns, pki: &Pki, target: Target) -> Result<Option<Proc>> {
    let log = ctx.work.join(format!("tls-{}.log", target.port()));
    let mut cmd = match target {
        Target::Direct => return Ok(None),
        Target::Ward | Target::WardSplice | Target::WardL4 => {
            let rules = match target {
                Target::WardSplice => WardRules::Sni,
                Target::WardL4 => WardRules::L4,
                _ => WardRules::Intercept,
            };
            let (cluster, policy) = ward_files(ctx, rules)?;
            let mut c = ns.cmd(SUBJECT_CPU, &ctx.ward.display().to_string());
            c.args(["proxy", "--listen", target.addr(), "--upstream", BACKEND])
                .arg("--cluster")
                .arg(cluster)
                .arg("--policies")
                .arg(policy)
                .args(["--endpoint", "bench/client", "--direction", "egress"])
                .args(["--port", "443", "--threads", "1", "--certificates-dir"])
                .arg(ctx.work.join("certs"));
            c
        }
        Target::Haproxy | Target::HaproxyTcp | Target::HaproxyPlain => {
            let conf = write(ctx, "tls-haproxy.cfg", &haproxy_conf(pki))?;
            let mut c = ns.cmd(SUBJECT_CPU, "haproxy");
            c.args(["-db", "-f"]).arg(conf);
            c
        }
        Target::Nginx => {
            let conf = write(ctx, "tls-nginx.conf", &nginx_proxy_conf(ctx, pki))?;
            let mut c = ns.cmd(SUBJECT_CPU, "nginx");
            c.args(["-e", "stderr", "-p"])
                .arg(&ctx.work)
                .arg("-c")
                .arg(conf);
            c
        }
    };
    let mut p = Proc::spawn(ctx, target.name(), &mut cmd, &log)?;
    wait_tcp(ns, target.addr()).or_else(|e| {
        p.alive(&log)?;
        Err(e)
    })?;
    Ok(Some(p))
}

fn wait_tcp(ns: &Netns, addr: &str) -> Result {
    super::wait_until(&format!("{addr} accepting in {}", ns.0.name()), || {
        ns.0.run(|| std::net::TcpStream::connect(addr)).is_ok()
    })
}

/// The status curl gets for `path` over HTTPS as [`NAME`], trusting `ca` only.
fn status(ctx: &mut Ctx, ns: &Netns, target: Target, ca: &Path, path: &str) -> Result<String> {
    let mut c = ns.cmd(LOAD_CPU, "curl");
    c.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ])
    .arg("--cacert")
    .arg(ca)
    .arg(format!("https://{NAME}:{}{path}", target.port()));
    output(ctx, &mut c)
}

fn drive(ctx: &mut Ctx, ns: &Netns, kind: Kind, target: Target, secs: u64) -> Result<Load> {
    let url = format!("https://{NAME}:{}{}", target.port(), kind.path());
    match kind {
        Kind::KeepAlive | Kind::Splice | Kind::Handshakes | Kind::SpliceBulk => {
            let connections = if kind == Kind::SpliceBulk {
                BULK_CONNECTIONS
            } else {
                CONNECTIONS
            };
            let mut c = ns.cmd(LOAD_CPU, "wrk");
            c.args(["-t1", "-c", connections, "-d"])
                .arg(format!("{secs}s"))
                .arg("--latency");
            if kind == Kind::Handshakes {
                c.args(["-H", "Connection: close"]);
            }
            let out = output(ctx, c.arg(&url))?;
            parse::wrk(&out).ok_or_else(|| format!("cannot read wrk's output: {out}"))
        }
        Kind::H2 => {
            let log = ctx.work.join("tls-h2load.log");
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

fn measure(
    ctx: &mut Ctx,
    ns: &Netns,
    pki: &Pki,
    kind: Kind,
    target: Target,
    secs: u64,
) -> Result<Row> {
    let proxy = start(ctx, ns, pki, target)?;
    let ca = if target.intercepts() {
        &pki.intercept_ca
    } else {
        &pki.public_ca
    };
    // What the client trusts and gets is checked: the benchmarked path passes (through
    // an interceptor, with the interception CA only), a denied one is refused.
    let ok = status(ctx, ns, target, ca, kind.path())?;
    if ok != "200" {
        return Err(format!(
            "{} {}: {} got {ok}, not 200",
            target.name(),
            kind.name(),
            kind.path()
        ));
    }
    if target.intercepts() {
        let denied = status(ctx, ns, target, ca, DENIED_PATH)?;
        if denied != "403" {
            return Err(format!(
                "{}: {DENIED_PATH} got {denied}, not 403",
                target.name()
            ));
        }
    }
    let before = proxy.as_ref().map(Proc::cpu_seconds).transpose()?;
    let load = drive(ctx, ns, kind, target, secs)?;
    let after = proxy.as_ref().map(Proc::cpu_seconds).transpose()?;
    if load.errors * 100 > load.requests {
        return Err(format!(
            "{} {}: {} errors in {} requests",
            target.name(),
            kind.name(),
            load.errors,
            load.requests
        ));
    }
    Ok(Row {
        load_kind: kind,
        target,
        load,
        cpu: before.zip(after).map(|(b, a)| a - b),
    })
}

/// `ip netns exec` mounts `/etc/netns/NAME/hosts` over `/etc/hosts`: the clients resolve
/// [`NAME`] to 127.0.0.1 (the proxies) there; the backend is named by address.
struct Hosts(PathBuf);

impl Hosts {
    fn new(ns: &Netns) -> Result<Hosts> {
        let dir = Path::new("/etc/netns").join(ns.0.name());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.1 {NAME}\n"))
            .map_err(|e| format!("{}: {e}", hosts.display()))?;
        Ok(Hosts(dir))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(ctx: &mut Ctx) -> Result<String> {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    let pki = pki(ctx)?;
    let ns = Netns::new("tls")?;
    let _hosts = Hosts::new(&ns)?;
    let www = ctx.work.join("www");
    std::fs::create_dir_all(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    let bulk = www.join(BULK_PATH.trim_start_matches('/'));
    std::fs::write(&bulk, bulk_body()).map_err(|e| format!("{}: {e}", bulk.display()))?;
    let conf = write(ctx, "tls-backend.conf", &backend_conf(ctx, &pki))?;
    let log = ctx.work.join("tls-backend.log");
    let mut backend = Proc::spawn(
        ctx,
        "nginx TLS backend",
        ns.cmd(LOAD_CPU, "nginx")
            .args(["-e", "stderr", "-p"])
            .arg(&ctx.work)
            .arg("-c")
            .arg(conf),
        &log,
    )?;
    wait_tcp(&ns, BACKEND)
        .and_then(|()| wait_tcp(&ns, DIRECT))
        .or_else(|e| {
            backend.alive(&log)?;
            Err(e)
        })?;
    let mut all = Vec::new();
    for round in 1..=rounds {
        for kind in LOADS {
            for &target in kind.targets() {
                eprintln!(
                    "loadtest tls: round {round}/{rounds}: {} {}",
                    target.name(),
                    kind.name()
                );
                all.push(measure(ctx, &ns, &pki, kind, target, secs)?);
            }
        }
    }
    drop(backend);
    Ok(report(&all, secs, rounds))
}

/// [`BULK_BYTES`] that do not compress (a byte counter through a multiplicative hash).
fn bulk_body() -> Vec<u8> {
    (0..BULK_BYTES)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

/// Per (load, target), the round with the median key, and every round's key.
fn medians(all: &[Row]) -> Vec<(&Row, Vec<f64>)> {
    let mut out = Vec::new();
    for kind in LOADS {
        for &target in kind.targets() {
            let mut rs: Vec<&Row> = all
                .iter()
                .filter(|r| r.load_kind == kind && r.target == target)
                .collect();
            let keys: Vec<f64> = rs.iter().map(|r| r.key()).collect();
            rs.sort_by(|a, b| a.key().total_cmp(&b.key()));
            if let Some(m) = rs.get(rs.len().saturating_sub(1) / 2) {
                out.push((*m, keys));
            }
        }
    }
    out
}

fn report(all: &[Row], secs: u64, rounds: u32) -> String {
    let picked = medians(all);
    let bulk_mib = BULK_BYTES >> 20;
    let mut s = String::from("## TLS egress (interception and SNI splice)\n\n");
    let _ = writeln!(
        s,
        "Backend: nginx (one process, CPU {LOAD_CPU}) serving HTTPS (TLS 1.3, HTTP/1.1 and \
         h2 by ALPN) for `{NAME}` with a certificate of a public CA, answering a 23-byte \
         body. Interceptors on CPU {SUBJECT_CPU}, one thread/worker each: `ward proxy` \
         (standalone egress; terminatingTLS with a CA secret: a leaf minted for `{NAME}`, \
         cached; originatingTLS verified against the public CA; {RULES} HTTP rules `GET \
         /api/v1/svcN/.*`, the request matches the last; no audit log), HAProxy (`bind ... \
         ssl crt LEAF alpn h2,http/1.1`, the same rules as `http-request allow`, then deny \
         403; `server ... ssl verify required ca-file PUBLIC-CA sni`, h2 upstream for h2 \
         clients, `http-reuse always`), nginx (`listen ... ssl http2`, the rules as `location ~` with \
         `limit_except GET`, then 403; `proxy_pass https://` with `proxy_ssl_verify on`, \
         HTTP/1.1 upstream with keep-alive). ECDSA P-256 keys everywhere; TLS session \
         settings are each program's defaults (the clients do not resume). Before each measurement the harness checks \
         with curl, trusting only the interception CA, that `{PATH}` answers 200 and \
         `{DENIED_PATH}` 403. SNI splice: `ward proxy` with a serverNames-only rule \
         (ClientHello read by rustls, bytes passed untouched) and HAProxy in TCP mode \
         routing on `req.ssl_sni`; the client's TLS goes to the backend; against them a plain \
         L4 redirect: `ward proxy` under an L4-only rule for the port (spliced, no SNI \
         check) and HAProxy relaying TCP without inspection. Load for {secs} s \
         per target on CPU {LOAD_CPU}: wrk `-t1 -c{CONNECTIONS}` (HTTP/1.1; with \
         `Connection: close` every request is a new TLS session with the proxy, whose \
         upstream connections stay open; the bulk load downloads a {bulk_mib} MiB file of the \
         backend on {BULK_CONNECTIONS} connections), h2load `-t1 -c8 -m8`. CPU = utime+stime of the \
         proxy process from /proc/PID/stat over the load window. {rounds} round(s); per \
         target the round with the median requests per CPU-second (direct: median req/s), \
         and that figure for every round.\n"
    );
    s.push_str(
        "| load | target | requests | req/s | p50 | p99 | errors | proxy CPU s | req per CPU-s | every round |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (r, keys) in &picked {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.0} us | {:.0} us | {} | {} | {} | {} |",
            r.load_kind.name(),
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
    let get = |kind: Kind, t: Target| {
        picked
            .iter()
            .map(|(r, _)| *r)
            .find(|r| r.load_kind == kind && r.target == t)
    };
    s.push_str(
        "\nRatios (same run):\n\n| load | ward/haproxy req per CPU-s | ward/nginx req per CPU-s | ward/haproxy req/s | ward/nginx req/s |\n|---|---|---|---|---|\n",
    );
    for kind in [Kind::KeepAlive, Kind::H2, Kind::Handshakes] {
        let (Some(w), Some(h), Some(n)) = (
            get(kind, Target::Ward),
            get(kind, Target::Haproxy),
            get(kind, Target::Nginx),
        ) else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            kind.name(),
            ratio(w.per_cpu(), h.per_cpu()),
            ratio(w.per_cpu(), n.per_cpu()),
            ratio(w.load.per_second, h.load.per_second),
            ratio(w.load.per_second, n.load.per_second),
        );
    }
    s.push_str(
        "\nPass-through (same run): the SNI-checked splice against a plain L4 redirect (the \
         same proxy under an L4-only rule, and HAProxy relaying TCP uninspected), and \
         against HAProxy's SNI routing. Bulk throughput is req/s x 4 MiB.\n\n\
         | load | ward SNI MiB/s or req/s | ward SNI / ward L4: req/s, per CPU-s | ward SNI / \
         haproxy plain tcp: req/s, per CPU-s | ward SNI / haproxy sni: req/s, per CPU-s | \
         ward SNI / direct req/s |\n|---|---|---|---|---|---|\n",
    );
    for kind in [Kind::Splice, Kind::SpliceBulk] {
        let (Some(d), Some(w), Some(l4), Some(plain), Some(sni)) = (
            get(kind, Target::Direct),
            get(kind, Target::WardSplice),
            get(kind, Target::WardL4),
            get(kind, Target::HaproxyPlain),
            get(kind, Target::HaproxyTcp),
        ) else {
            continue;
        };
        let rate = if kind == Kind::SpliceBulk {
            format!(
                "{:.0} MiB/s",
                w.load.per_second * BULK_BYTES as f64 / f64::from(1 << 20)
            )
        } else {
            format!("{:.0} req/s", w.load.per_second)
        };
        let pair = |o: &Row| {
            format!(
                "{}, {}",
                ratio(w.load.per_second, o.load.per_second),
                ratio(w.per_cpu(), o.per_cpu())
            )
        };
        let _ = writeln!(
            s,
            "| {} | {rate} | {} | {} | {} | {} |",
            kind.name(),
            pair(l4),
            pair(plain),
            pair(sni),
            ratio(w.load.per_second, d.load.per_second),
        );
    }
    s.push('\n');
    s
}
