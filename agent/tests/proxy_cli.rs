//! `ward proxy` as a process, driven by curl and h2load (Debian packages, installed by
//! `cargo xtask test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use testkit::Poll;

const CLUSTER: &str = r#"
cluster:
  namespaces:
    - {name: default}
  pods:
    - {namespace: default, name: client, labels: {app: client}, ip: 127.0.0.1}
    - {namespace: default, name: web, labels: {app: web}, ip: 10.0.0.2}
"#;

fn policy(paths: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web-l7, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: "{paths}"}}
"#
    )
}

/// An upstream (HTTP/1.1 and h2c) answering 200 "hello" on its own thread.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"hello",
                        ))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    addr
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait_for_port(addr: SocketAddr) {
    Poll::within(Duration::from_secs(20)).expect(&format!("{addr} accepting"), || {
        TcpStream::connect(addr).is_ok()
    });
}

struct Ward {
    child: Child,
    listen: SocketAddr,
    metrics: SocketAddr,
    dir: PathBuf,
}

impl Drop for Ward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str, paths: &str) -> Ward {
    start_with(name, paths, &[], &[])
}

/// `ward proxy` with more environment and arguments; its stderr (the log) goes to
/// `ward.log` in its directory.
fn start_with(name: &str, paths: &str, env: &[(&str, &str)], extra: &[&str]) -> Ward {
    start_on(None, name, paths, env, extra)
}

/// `ward proxy`, run by `taskset -c CPUS` when `cpus` is given.
fn start_on(
    cpus: Option<&str>,
    name: &str,
    paths: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Ward {
    let dir = std::env::temp_dir().join(format!("ward-proxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(dir.join("policy.yaml"), policy(paths)).unwrap();
    let up = upstream();
    let listen = free_port();
    let metrics = free_port();
    let mut cmd = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus, env!("CARGO_BIN_EXE_ward")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_ward")),
    };
    let child = cmd
        .args(["proxy", "--listen", &listen.to_string()])
        .args(["--upstream", &up.to_string()])
        .arg("--cluster")
        .arg(dir.join("cluster.yaml"))
        .arg("--policies")
        .arg(dir.join("policy.yaml"))
        .args(["--endpoint", "default/web", "--port", "80"])
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .args(["--metrics", &metrics.to_string()])
        .args(extra)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("ward.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for_port(listen);
    wait_for_port(metrics);
    Ward {
        child,
        listen,
        metrics,
        dir,
    }
}

fn curl(args: &[&str]) -> Output {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (cargo xtask test installs it)");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    out
}

/// `(status, body)`
fn curl_get(extra: &[&str], url: &str) -> (String, String) {
    let mut args = extra.to_vec();
    args.extend(["-w", "\n%{http_code}", url]);
    let out = String::from_utf8(curl(&args).stdout).unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

fn wait_for_line(path: &Path, needle: &str) -> String {
    let mut line = None;
    let found = Poll::within(Duration::from_secs(10)).until("the line", || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        line = text
            .lines()
            .find(|l| l.contains(needle))
            .map(str::to_string);
        line.is_some()
    });
    match (found, line) {
        (Ok(_), Some(l)) => l,
        _ => panic!(
            "no line with {needle} in {}",
            std::fs::read_to_string(path).unwrap_or_default()
        ),
    }
}

#[test]
fn curl_http1_and_h2c_allowed_and_denied() {
    let w = start("curl", "/public/.*");
    let base = format!("http://{}", w.listen);
    for extra in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let (code, body) = curl_get(extra, &format!("{base}/public/a"));
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", "hello"),
            "{extra:?}"
        );
        let (code, body) = curl_get(extra, &format!("{base}/admin"));
        assert_eq!(code, "403", "{extra:?}");
        assert_eq!(body, "Access denied\r\n");
        // curl normalises dot segments itself unless told not to
        let (code, _) = curl_get(
            &[extra[0], "--path-as-is"],
            &format!("{base}/public/../admin"),
        );
        assert_eq!(code, "403", "{extra:?}");
    }
    // the audit log and the metrics endpoint
    let line = wait_for_line(&w.dir.join("audit.jsonl"), "\"/admin\"");
    assert!(line.contains("\"Verdict\":\"Denied\""), "{line}");
    let metrics =
        String::from_utf8(curl(&[&format!("http://{}/metrics", w.metrics)]).stdout).unwrap();
    assert!(
        metrics.contains("ward_proxy_requests_total{direction=\"ingress\",protocol=\"HTTP/2\",verdict=\"denied\"} 2"),
        "{metrics}"
    );
}

/// By default the runtime follows the CPUs the process may use: pinned to one, a
/// current-thread runtime (no scheduler hops between the halves of a request); with
/// more, a worker per CPU. Both serve.
#[test]
fn the_default_runtime_follows_the_cpus_the_process_may_use() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let w = start_on(Some("0"), "one-cpu", "/public/.*", &[], &[]);
    let line = wait_for_line(&w.dir.join("ward.log"), "runtime started");
    assert!(
        line.contains("current-thread") && line.contains("workers=1"),
        "{line}"
    );
    let (code, _) = curl_get(&[], &format!("http://{}/public/a", w.listen));
    assert_eq!(code, "200");
    if cpus >= 2 {
        let w = start_on(Some("0,1"), "two-cpus", "/public/.*", &[], &[]);
        let line = wait_for_line(&w.dir.join("ward.log"), "runtime started");
        assert!(
            line.contains("multi-thread") && line.contains("workers=2"),
            "{line}"
        );
        let (code, _) = curl_get(&[], &format!("http://{}/public/a", w.listen));
        assert_eq!(code, "200");
    }
}

fn h2load(url: &str) -> String {
    let out = Command::new("h2load")
        .args(["-n", "400", "-c", "4", "-m", "8", url])
        .output()
        .expect("h2load is installed (Debian nghttp2-client; cargo xtask test installs it)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn h2load_through_the_proxy() {
    let w = start("h2load", "/public/.*");
    let out = h2load(&format!("http://{}/public/x", w.listen));
    assert!(out.contains("400 succeeded, 0 failed, 0 errored"), "{out}");
    assert!(out.contains("status codes: 400 2xx"), "{out}");
    let out = h2load(&format!("http://{}/private", w.listen));
    assert!(out.contains("status codes: 0 2xx, 0 3xx, 400 4xx"), "{out}");
}

#[test]
fn sighup_reloads_policies() {
    let w = start("reload", "/public/.*");
    let url = format!("http://{}/public/a", w.listen);
    assert_eq!(curl_get(&[], &url).0, "200");
    std::fs::write(w.dir.join("policy.yaml"), policy("/other")).unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &w.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    Poll::within(Duration::from_secs(10))
        .every(Duration::from_millis(50))
        .expect("the reload applied", || curl_get(&[], &url).0 == "403");
    assert_eq!(
        curl_get(&[], &format!("http://{}/other", w.listen)).0,
        "200"
    );
}

/// Connects to the proxy and closes without a request: the proxy logs that at debug.
fn connect_and_close(w: &Ward) {
    drop(TcpStream::connect(w.listen).unwrap());
}

#[test]
fn rust_log_debug_prints_the_proxys_debug_events() {
    let w = start_with("debuglog", "/public/.*", &[("RUST_LOG", "debug")], &[]);
    connect_and_close(&w);
    let line = wait_for_line(&w.dir.join("ward.log"), "closed before a request");
    assert!(line.contains("DEBUG"), "{line}");

    // at the default level (info) the same is not printed
    let quiet = start("infolog", "/public/.*");
    connect_and_close(&quiet);
    wait_for_line(&quiet.dir.join("ward.log"), "proxy serving");
    // a request afterwards shows the connection was handled before the log is read
    assert_eq!(
        curl_get(&[], &format!("http://{}/public/a", quiet.listen)).0,
        "200"
    );
    let log = std::fs::read_to_string(quiet.dir.join("ward.log")).unwrap();
    assert!(!log.contains("closed before a request"), "{log}");
}

#[test]
fn log_format_json_prints_one_object_per_line() {
    let w = start_with(
        "jsonlog",
        "/public/.*",
        &[],
        &["--log-format", "json", "--log-level", "debug"],
    );
    connect_and_close(&w);
    wait_for_line(&w.dir.join("ward.log"), "closed before a request");
    let log = std::fs::read_to_string(w.dir.join("ward.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["message"] == "proxy serving")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["endpoint"], "default/web");
    assert!(serving["timestamp"].is_string(), "{serving}");
    assert!(lines
        .iter()
        .any(|l| l["level"] == "DEBUG" && l["target"] == "proxy::server"));
}

/// The value of the metric `name` (with its labels) in `metrics`.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[test]
fn a_stalled_audit_reader_costs_records_not_requests() {
    const REQUESTS: u64 = 2000;
    // The audit log is a pipe that nobody reads until the load is over: its buffer fills,
    // the writer blocks, the queue (16 records) fills, and the proxy must go on serving,
    // dropping and counting records.
    let name = "stalled-audit";
    let dir = std::env::temp_dir().join(format!("ward-proxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("audit.jsonl");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // Read and write: opening never blocks, and the pipe never reports its end.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    std::fs::write(dir.join("config.json"), r#"{"audit_queue": 16}"#).unwrap();
    let config = dir.join("config.json");
    let w = start_with(
        name,
        "/public/.*",
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let out = Command::new("h2load")
        .args(["-n", &REQUESTS.to_string(), "-c", "4", "-m", "8"])
        .arg(format!("http://{}/public/x", w.listen))
        .output()
        .expect("h2load is installed");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.contains(&format!("{REQUESTS} succeeded, 0 failed, 0 errored")),
        "{out}"
    );
    let metrics_url = format!("http://{}/metrics", w.metrics);
    let text = String::from_utf8(curl(&[&metrics_url]).stdout).unwrap();
    let dropped = metric(&text, "ward_audit_dropped_total{type=\"http\"}");
    assert!(
        dropped > 0,
        "nothing dropped behind a stalled reader:\n{text}"
    );

    // Now read: every record not counted as dropped arrives, each exactly once.
    let (chunks_tx, chunks) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut reader = reader;
        let mut buf = [0u8; 65536];
        while let Ok(n) = reader.read(&mut buf) {
            if chunks_tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut bytes = Vec::new();
    while (bytes.iter().filter(|&&b| b == b'\n').count() as u64) + dropped < REQUESTS {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match chunks.recv_timeout(left) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(_) => panic!(
                "{} lines + {dropped} dropped of {REQUESTS}",
                bytes.iter().filter(|&&b| b == b'\n').count()
            ),
        }
    }
    // Nothing more than that comes: no record twice.
    if let Ok(chunk) = chunks.recv_timeout(Duration::from_millis(200)) {
        bytes.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64 + dropped, REQUESTS);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["type"], "http", "{l}");
    }
}

fn test_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
}

const SAAS_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: saas, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.2/32]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      serverNames: [api.payments.example]
      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: public-ca}}
      rules:
        http: [{method: GET, path: "/v1/charges.*"}]
"#;

/// `ward proxy --certificates-dir`: the standalone proxy intercepts HTTPS with a leaf
/// minted from the CA secret and originates TLS to the server (`openssl s_server`),
/// verified against the public CA secret; curl trusts the interception CA only. Without
/// the directory the same rule fails closed.
#[test]
fn standalone_proxy_intercepts_https_with_secrets_from_a_directory() {
    let dir = std::env::temp_dir().join(format!("ward-proxy-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |p: &str, text: &str| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    };
    let intercept = test_ca("ward proxy test interception CA");
    let public = test_ca("ward proxy test public CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["api.payments.example".to_string()])
        .unwrap()
        .signed_by(&key, &public)
        .unwrap();
    write("certs/default/intercept-ca/tls.crt", &intercept.pem());
    write(
        "certs/default/intercept-ca/tls.key",
        &intercept.key().serialize_pem(),
    );
    write("certs/default/public-ca/ca.crt", &public.pem());
    let cluster = write("cluster.yaml", CLUSTER);
    let policy = write("policy.yaml", SAAS_POLICY);
    let intercept_pem = write("intercept.pem", &intercept.pem());
    let srv_crt = write("srv.crt", &server.pem());
    let srv_key = write("srv.key", &key.serialize_pem());

    let up = TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s_server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &up.to_string()])
        .arg("-cert")
        .arg(&srv_crt)
        .arg("-key")
        .arg(&srv_key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    wait_for_port(up);

    let run = |certs: bool| {
        let listen = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ward"));
        cmd.args(["proxy", "--listen", &listen.to_string()])
            .args(["--upstream", &up.to_string()])
            .arg("--cluster")
            .arg(&cluster)
            .arg("--policies")
            .arg(&policy)
            .args(["--endpoint", "default/client", "--direction", "egress"])
            .args(["--port", "443"]);
        if certs {
            cmd.arg("--certificates-dir").arg(dir.join("certs"));
        }
        let child = cmd
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(listen);
        (child, listen)
    };
    let curl = |listen: SocketAddr, method: &str| {
        let out = Command::new("curl")
            .args(["-s", "--http1.1", "--max-time", "5", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "-X", method, "--cacert"])
            .arg(&intercept_pem)
            .args([
                "--connect-to",
                &format!("api.payments.example:443:{}:{}", listen.ip(), listen.port()),
            ])
            .arg("https://api.payments.example/v1/charges")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let (mut with, listen) = run(true);
    let got = (curl(listen, "GET"), curl(listen, "DELETE"));
    let _ = with.kill();
    let _ = with.wait();
    let (mut without, listen) = run(false);
    let closed = curl(listen, "GET");
    let _ = without.kill();
    let _ = without.wait();
    let _ = s_server.kill();
    let _ = s_server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(got, ("200".to_string(), "403".to_string()));
    assert_eq!(closed, "000", "no material: the session is reset");
}
