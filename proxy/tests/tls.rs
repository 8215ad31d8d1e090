//! TLS through the proxy with real clients and servers: curl and openssl s_client in
//! front, a rustls server (HTTP/1.1 and h2 by ALPN) behind. serverNames splice or reset;
//! interception with a static certificate or leaves minted from a CA; ALPN carried
//! through (gRPC over TLS); origination verified against the rule's CA (502 when it
//! fails); every kind of bad material fails closed for its rule only; rotation; SNI
//! edge cases; the handshake limits; headerMatches with secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use policy_model::tls::SecretRef;
use policy_model::{CompileOptions, Direction, Model};
use proxy::tls::SecretData;
use proxy::{
    AuditEvent, AuditLog, Config, DroppedCounter, FixedListener, Metrics, Mode, PolicyStore, Proxy,
    Record, SecretStore,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CLUSTER: &str = "namespaces: [{name: default}]
pods:
- {namespace: default, name: client, labels: {app: client}, ip: 10.0.0.1}
";

/// The egress policy of default/client towards the TLS servers on loopback (port 443
/// in the policy: the proxy is told the port).
fn policy(entries: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: saas, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [127.0.0.0/8]
    toPorts:
{entries}"
    )
}

fn model(policy: &str) -> Model {
    let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
    let (policies, errors, _) = policy_model::api::load(policy, None);
    assert!(errors.is_empty(), "{errors:?}");
    Model::compile(&cluster, policies, CompileOptions::default())
}

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A server certificate for `names`, signed by `issuer`: (cert PEM, key PEM).
fn leaf(names: &[&str], issuer: &Ca) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The two CAs of a test (the proxy's interception CA, and the public CA that signed the
/// servers) with their PEM files for the clients.
struct Pki {
    dir: tempfile::TempDir,
    intercept: Ca,
    public: Ca,
}

impl Pki {
    fn new() -> Pki {
        let p = Pki {
            dir: tempfile::tempdir().unwrap(),
            intercept: ca("Ward test interception CA"),
            public: ca("Ward test public CA"),
        };
        std::fs::write(p.file("intercept-ca.pem"), p.intercept.pem()).unwrap();
        std::fs::write(p.file("public-ca.pem"), p.public.pem()).unwrap();
        p
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn intercept_ca(&self) -> String {
        self.file("intercept-ca.pem").display().to_string()
    }

    fn public_ca(&self) -> String {
        self.file("public-ca.pem").display().to_string()
    }

    /// The secrets most tests use: `intercept-ca` (a CA: leaves are minted) and
    /// `public-ca` (ca.crt, to verify the servers).
    fn secrets(&self) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
        vec![
            (
                "intercept-ca",
                vec![
                    ("tls.crt", self.intercept.pem()),
                    ("tls.key", self.intercept.key().serialize_pem()),
                ],
            ),
            ("public-ca", vec![("ca.crt", self.public.pem())]),
        ]
    }
}

fn secret_map(list: Vec<(&str, Vec<(&str, String)>)>) -> HashMap<SecretRef, SecretData> {
    list.into_iter()
        .map(|(name, keys)| {
            (
                SecretRef {
                    namespace: "default".into(),
                    name: name.into(),
                },
                keys.into_iter()
                    .map(|(k, v)| (k.to_string(), v.into_bytes()))
                    .collect::<BTreeMap<_, _>>(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// A TLS server
// ---------------------------------------------------------------------------------------

/// What the server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    path: String,
    version: http::Version,
}

/// A rustls server speaking HTTP/1.1 and h2 (by ALPN) with one certificate, answering
/// 200 `upstream PATH` (gRPC calls: their body back, grpc-status 0).
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn server((cert, key): (String, String)) -> Server {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = s.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    let (sni, alpn) = (sni.clone(), alpn.clone());
                    async move {
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        seen.lock().unwrap().push(Seen {
                            sni,
                            alpn,
                            path: req.uri().path().to_string(),
                            version: req.version(),
                        });
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let resp = if grpc {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let frames = futures_like_body(body, trailers);
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(frames)
                                .unwrap()
                        } else {
                            hyper::Response::new(
                                Full::new(Bytes::from(format!("upstream {path}")))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Server { addr, seen }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A body of `data` followed by `trailers`.
fn futures_like_body(data: Bytes, trailers: http::HeaderMap) -> BoxBody {
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(data)),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

// ---------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------

struct Running {
    addr: SocketAddr,
    proxy: Proxy,
    audit: mpsc::Receiver<AuditEvent>,
    secrets: Arc<SecretStore>,
}

impl Running {
    /// The next audit record, waiting at most 5 s.
    async fn record(&mut self) -> Record {
        let e = tokio::time::timeout(Duration::from_secs(5), self.audit.recv())
            .await
            .expect("no audit record within 5 s")
            .expect("audit channel closed");
        match e {
            AuditEvent::Http(r) => r,
            e => panic!("not an HTTP record: {e:?}"),
        }
    }

    fn metrics(&self) -> String {
        self.proxy.metrics().encode()
    }

    /// Waits (at most 5 s) until the metrics contain `line`.
    async fn wait_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.metrics().contains(line) {
            assert!(
                Instant::now() < deadline,
                "{line} missing from:\n{}",
                self.metrics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A proxy for default/client's egress (policy port 443) in front of `upstream`.
async fn start(
    upstream: SocketAddr,
    policy: &str,
    secrets: HashMap<SecretRef, SecretData>,
    config: Config,
) -> Running {
    let store = Arc::new(PolicyStore::new(model(policy)));
    let metrics = Metrics::new();
    let (audit, rx) = AuditLog::channel(1024, DroppedCounter::new());
    let secret_store = Arc::new(SecretStore::new());
    secret_store.publish(secrets);
    let proxy = Proxy::with_secrets(
        config,
        store,
        Mode::Standalone {
            endpoint: "default/client".into(),
            direction: Direction::Egress,
            port: Some(443),
        },
        audit,
        metrics,
        secret_store.clone(),
    );
    let listener = FixedListener::bind("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let addr = proxy::Listener::local_addr(&listener).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener).await });
    Running {
        addr,
        proxy,
        audit: rx,
        secrets: secret_store,
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

struct Curl {
    /// curl's exit code (35: TLS handshake failed, e.g. the connection was reset).
    code: i32,
    /// HTTP status (0 when there was none).
    status: u16,
    body: String,
    stderr: String,
}

/// `curl https://NAME:PORT/PATH` resolving NAME to the proxy, trusting `ca`.
async fn curl(addr: SocketAddr, name: &str, path: &str, ca: &str, extra: &[&str]) -> Curl {
    let resolve = format!("{name}:{}:127.0.0.1", addr.port());
    let url = format!("https://{name}:{}{path}", addr.port());
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca,
            "--resolve",
            &resolve,
        ])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(&url)
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        code: out.status.code().unwrap_or(-1),
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `openssl s_client` to the proxy with `-servername NAME` (or `-noservername`),
/// verifying against `ca` (or not at all when `ca` is None). Returns whether the
/// handshake completed and what s_client printed.
async fn s_client(addr: SocketAddr, name: Option<&str>, ca: Option<&str>) -> (bool, String) {
    let connect = addr.to_string();
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-brief", "-connect", &connect]);
    match name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    if let Some(ca) = ca {
        cmd.args(["-CAfile", ca, "-verify_return_error"]);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        cmd.stdin(std::process::Stdio::null()).output(),
    )
    .await
    .expect("s_client finishes")
    .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && text.contains("CONNECTION ESTABLISHED");
    (ok, text)
}

/// A rustls client session to the proxy for `name` trusting `ca` (PEM), offering
/// `alpn`: the stream and the certificate the proxy presented.
async fn tls_client(
    addr: SocketAddr,
    name: &str,
    ca: &str,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .expect("handshake with the proxy");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    (tls, cert)
}

fn request(method: &str, path: &str, host: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn subject_alt_names(der: &CertificateDer<'_>) -> (String, Vec<String>) {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    let sans = c
        .subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|g| g.to_string())
                .collect()
        })
        .unwrap_or_default();
    (c.issuer().to_string(), sans)
}

fn tls_of(r: &Record) -> &proxy::audit::Tls {
    r.tls.as_ref().expect("a TLS record")
}

// ---------------------------------------------------------------------------------------
// serverNames only: splice or reset
// ---------------------------------------------------------------------------------------

const SPLICE: &str = "    - ports: [{port: '443', protocol: TCP}]
      serverNames: ['*.splice.example', api.saas.example]
";

#[tokio::test]
async fn server_names_splice_the_listed_and_reset_the_rest() {
    let pki = Pki::new();
    let up = server(leaf(&["api.saas.example", "www.saas.example"], &pki.public)).await;
    let mut p = start(up.addr, &policy(SPLICE), HashMap::new(), Config::default()).await;

    // the server's own certificate reaches curl: the session is not decrypted
    let ok = curl(
        p.addr,
        "api.saas.example",
        "/any/thing",
        &pki.public_ca(),
        &[],
    )
    .await;
    assert_eq!((ok.code, ok.status), (0, 200), "{}", ok.stderr);
    assert_eq!(ok.body, "upstream /any/thing");
    let seen = up.seen();
    assert_eq!(seen[0].sni.as_deref(), Some("api.saas.example"));
    let r = p.record().await;
    assert_eq!(r.verdict, proxy::Verdict::Forwarded);
    assert!(r.http.is_none());
    assert_eq!(tls_of(&r).sni.as_deref(), Some("api.saas.example"));
    assert_eq!(tls_of(&r).mode, "splice");
    assert_eq!(r.allowed_by[0].rule, "spec.egress[0].toPorts[0]");
    assert_eq!(r.allowed_by[0].policy, "CiliumNetworkPolicy default/saas");

    // another name on the same server: reset before any byte reaches it
    let denied = curl(p.addr, "www.saas.example", "/", &pki.public_ca(), &[]).await;
    assert_eq!(denied.code, 35, "{}", denied.stderr);
    assert!(denied.stderr.contains("reset"), "{}", denied.stderr);
    let r = p.record().await;
    assert_eq!(r.verdict, proxy::Verdict::Denied);
    assert_eq!(tls_of(&r).mode, "reset");
    assert_eq!(tls_of(&r).sni.as_deref(), Some("www.saas.example"));
    assert!(r.info.contains("SNI www.saas.example matches no serverNames of CiliumNetworkPolicy default/saas spec.egress[0].toPorts[0]"), "{}", r.info);
    assert_eq!(up.seen().len(), 1);

    // plaintext on the port: reset too (no SNI)
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: api.saas.example\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await
    .unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let r = p.record().await;
    assert!(r.info.contains("not TLS"), "{}", r.info);
    p.wait_metric("ward_proxy_tls_sessions_total{direction=\"egress\",mode=\"spliced\"} 1")
        .await;
    p.wait_metric("ward_proxy_tls_sessions_total{direction=\"egress\",mode=\"reset\"} 2")
        .await;
}

/// Case, a trailing dot, no SNI, an IP literal, long and invalid names: what rustls
/// reads is what the policy model assumes (`policy_model::tls::client_sni`).
#[tokio::test]
async fn sni_edge_cases() {
    let pki = Pki::new();
    let long_ok = format!("{}.splice.example", "a".repeat(63));
    // 254 characters: one more than a DNS name may have
    let too_long = format!("{}splice.example", format!("{}.", "b".repeat(59)).repeat(4));
    assert_eq!(too_long.len(), 254);
    let up = server(leaf(&["x.splice.example", &long_ok], &pki.public)).await;
    let mut p = start(up.addr, &policy(SPLICE), HashMap::new(), Config::default()).await;
    let ca = pki.public_ca();
    // (SNI sent, admitted)
    let probes = [
        ("X.Splice.EXAMPLE", true),
        (long_ok.as_str(), true),
        // the same DNS name; rustls drops the dot (Cilium's proxy would reset it)
        ("x.splice.example.", true),
        ("splice.example", false),
        ("x.splice.example.net", false),
        // an IP literal is no server name (RFC 6066): as if there were no SNI
        ("192.0.2.1", false),
        (too_long.as_str(), false),
        ("bad_-.splice.example", false),
    ];
    for (name, admitted) in probes {
        let (ok, out) = s_client(p.addr, Some(name), Some(&ca)).await;
        assert_eq!(ok, admitted, "{name}: {out}");
        let r = p.record().await;
        let model = policy_model::tls::client_sni(name);
        match &model {
            Ok(sni) => assert_eq!(&tls_of(&r).sni, sni, "{name}: {r:?}"),
            // not a DNS name: rustls refuses the hello
            Err(_) => assert!(r.info.contains("ClientHello refused"), "{name}: {r:?}"),
        }
        assert_eq!(
            tls_of(&r).mode,
            if admitted { "splice" } else { "reset" },
            "{name}: {r:?}"
        );
    }
    let (ok, out) = s_client(p.addr, None, None).await;
    assert!(!ok, "no SNI must be reset: {out}");
    assert!(p.record().await.info.contains("no SNI"));
    assert_eq!(up.seen().len(), 0, "s_client sends no request");
}

// ---------------------------------------------------------------------------------------
// Interception
// ---------------------------------------------------------------------------------------

const INTERCEPT: &str = "    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.payments.example]
      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: public-ca}}
      rules:
        http:
        - {method: GET, path: '/v1/charges/.*'}
        - {method: POST, path: /v1/charges}
        - {method: POST, path: /payments.v1.Payments/Authorize}
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [static.payments.example]
      terminatingTLS: {secret: {name: static-leaf}}
      originatingTLS: {secret: {name: public-ca}}
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [wrong-ca.payments.example]
      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: other-ca}}
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [unnamed.payments.example]
      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: public-ca}}
";

async fn payments(pki: &Pki, config: Config) -> (Server, Running) {
    let up = server(leaf(
        &[
            "api.payments.example",
            "static.payments.example",
            "wrong-ca.payments.example",
        ],
        &pki.public,
    ))
    .await;
    let mut secrets = pki.secrets();
    let (cert, key) = leaf(&["static.payments.example"], &pki.intercept);
    secrets.push(("static-leaf", vec![("tls.crt", cert), ("tls.key", key)]));
    secrets.push(("other-ca", vec![("ca.crt", ca("Another CA").pem())]));
    let p = start(up.addr, &policy(INTERCEPT), secret_map(secrets), config).await;
    (up, p)
}

#[tokio::test]
async fn interception_checks_requests_with_a_leaf_minted_per_sni() {
    let pki = Pki::new();
    let (up, mut p) = payments(&pki, Config::default()).await;
    let ca = pki.intercept_ca();

    let ok = curl(
        p.addr,
        "api.payments.example",
        "/v1/charges/42",
        &ca,
        &["-v"],
    )
    .await;
    assert_eq!((ok.code, ok.status), (0, 200), "{}", ok.stderr);
    assert_eq!(ok.body, "upstream /v1/charges/42");
    assert!(
        ok.stderr.contains("issuer: CN=Ward test interception CA"),
        "{}",
        ok.stderr
    );
    assert!(
        ok.stderr.contains("subject: CN=api.payments.example"),
        "{}",
        ok.stderr
    );
    let r = p.record().await;
    let http = r.http.as_ref().unwrap();
    assert_eq!(
        (http.scheme.as_ref(), http.code, http.method.as_str()),
        ("https", 200, "GET")
    );
    assert_eq!(http.path, "/v1/charges/42");
    assert_eq!(tls_of(&r).sni.as_deref(), Some("api.payments.example"));
    assert_eq!(tls_of(&r).mode, "intercept");
    assert_eq!(tls_of(&r).secret.as_deref(), Some("default/intercept-ca"));
    assert_eq!(
        r.allowed_by[0].rule,
        "spec.egress[0].toPorts[0].rules.http[0]"
    );
    // upstream: TLS to the client's SNI, verified against public-ca
    let s = &up.seen()[0];
    assert_eq!(s.sni.as_deref(), Some("api.payments.example"));
    assert_eq!(s.path, "/v1/charges/42");

    let denied = curl(
        p.addr,
        "api.payments.example",
        "/v1/charges/42",
        &ca,
        &["-X", "DELETE"],
    )
    .await;
    assert_eq!((denied.code, denied.status), (0, 403));
    assert_eq!(denied.body, "Access denied\r\n");
    let r = p.record().await;
    assert_eq!(r.verdict, proxy::Verdict::Denied);
    assert_eq!(r.http.as_ref().unwrap().scheme, "https");
    assert!(r.info.contains("no HTTP rule"), "{}", r.info);
    assert_eq!(up.seen().len(), 1, "the denied request never went up");

    // a name outside serverNames is reset, not intercepted
    let other = curl(p.addr, "www.payments.example", "/", &ca, &[]).await;
    assert_eq!(other.code, 35, "{}", other.stderr);
    assert_eq!(tls_of(&p.record().await).mode, "reset");

    // the static leaf is presented as it is, and without HTTP rules every request passes
    let (_, cert) = tls_client(p.addr, "static.payments.example", &pki.intercept.pem(), &[]).await;
    let (issuer, sans) = subject_alt_names(&cert);
    assert_eq!(issuer, "CN=Ward test interception CA");
    assert_eq!(sans, ["DNSName(static.payments.example)"]);
    let any = curl(
        p.addr,
        "static.payments.example",
        "/anything",
        &ca,
        &["-X", "PUT"],
    )
    .await;
    assert_eq!(any.status, 200, "{}", any.stderr);
}

/// ALPN h2 offered and the same protocol upstream: a gRPC call over TLS is checked by
/// method (grpc-status 7 when denied); HTTP/1.1 stays HTTP/1.1.
#[tokio::test]
async fn alpn_carries_h2_and_grpc_through() {
    let pki = Pki::new();
    let (up, mut p) = payments(&pki, Config::default()).await;
    let (tls, cert) = tls_client(
        p.addr,
        "api.payments.example",
        &pki.intercept.pem(),
        &[b"h2", b"http/1.1"],
    )
    .await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        subject_alt_names(&cert).1,
        ["DNSName(api.payments.example)"]
    );
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let call = |method: &str| {
        hyper::Request::builder()
            .method("POST")
            .uri(format!(
                "https://api.payments.example/payments.v1.Payments/{method}"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .unwrap()
    };
    let resp = send.send_request(call("Authorize")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap();
    assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
    let resp = send.send_request(call("Refund")).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "7");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert_eq!(seen[0].alpn.as_deref(), Some(&b"h2"[..]));
    let r = p.record().await;
    assert_eq!(r.http.as_ref().unwrap().protocol, "HTTP/2");
    assert_eq!(r.http.as_ref().unwrap().scheme, "https");
    assert_eq!(p.record().await.verdict, proxy::Verdict::Denied);

    let h1 = curl(
        p.addr,
        "api.payments.example",
        "/v1/charges/1",
        &pki.intercept_ca(),
        &["--http1.1"],
    )
    .await;
    assert_eq!(h1.status, 200, "{}", h1.stderr);
    let seen = up.seen();
    assert_eq!(seen[1].version, http::Version::HTTP_11);
    assert_eq!(seen[1].alpn.as_deref(), Some(&b"http/1.1"[..]));
    let h2 = curl(
        p.addr,
        "api.payments.example",
        "/v1/charges/2",
        &pki.intercept_ca(),
        &["--http2"],
    )
    .await;
    assert_eq!(h2.status, 200, "{}", h2.stderr);
    assert_eq!(up.seen()[2].version, http::Version::HTTP_2);
}

/// The server's certificate is checked against the rule's CA for the client's SNI; a
/// failure is a 502 with a record saying why, never a silent fallback.
#[tokio::test]
async fn failed_upstream_verification_is_502() {
    let pki = Pki::new();
    let (up, mut p) = payments(&pki, Config::default()).await;
    let ca = pki.intercept_ca();
    let r = curl(p.addr, "wrong-ca.payments.example", "/", &ca, &[]).await;
    assert_eq!(r.status, 502, "{}", r.stderr);
    let rec = p.record().await;
    assert_eq!(rec.verdict, proxy::Verdict::Error);
    assert!(
        rec.info.contains("invalid peer certificate"),
        "{}",
        rec.info
    );
    assert!(rec.info.contains("UnknownIssuer"), "{}", rec.info);
    // the server has no certificate for this name
    let r = curl(p.addr, "unnamed.payments.example", "/", &ca, &[]).await;
    assert_eq!(r.status, 502, "{}", r.stderr);
    let rec = p.record().await;
    assert!(rec.info.contains("not valid for name"), "{}", rec.info);
    assert!(up.seen().is_empty());
    p.wait_metric("ward_proxy_upstream_errors_total{kind=\"tls\"} 2")
        .await;
}

/// Each kind of bad material resets the connections of its rule, with a metric and a
/// record naming policy, rule and secret; the good rule on the same port keeps working,
/// and the broken rules are listed for the agent's status.
#[tokio::test]
async fn bad_material_fails_closed_for_its_rule_only() {
    let pki = Pki::new();
    let (cert, key) = leaf(&["x.example"], &pki.intercept);
    let (_, foreign_key) = leaf(&["x.example"], &ca("Other"));
    let mut secrets = pki.secrets();
    secrets.extend([
        ("no-key", vec![("tls.crt", cert.clone())]),
        (
            "bad-pem",
            vec![
                (
                    "tls.crt",
                    "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".into(),
                ),
                ("tls.key", key.clone()),
            ],
        ),
        (
            "mismatch",
            vec![("tls.crt", cert), ("tls.key", foreign_key)],
        ),
        ("no-ca", vec![("tls.crt", "unused".into())]),
    ]);
    let entry = |sni: &str, term: &str, orig: &str| {
        format!(
            "    - ports: [{{port: '443', protocol: TCP}}]
      serverNames: [{sni}]
      terminatingTLS: {{secret: {{name: {term}}}}}
      originatingTLS: {{secret: {{name: {orig}}}}}
"
        )
    };
    let entries = [
        (
            "gone.example",
            "missing",
            "public-ca",
            "default/missing",
            "not found",
        ),
        (
            "nokey.example",
            "no-key",
            "public-ca",
            "default/no-key",
            "has no tls.key",
        ),
        (
            "badpem.example",
            "bad-pem",
            "public-ca",
            "default/bad-pem",
            "bad PEM",
        ),
        (
            "mismatch.example",
            "mismatch",
            "public-ca",
            "default/mismatch",
            "does not belong",
        ),
        (
            "noca.example",
            "intercept-ca",
            "no-ca",
            "default/no-ca",
            "has no ca.crt",
        ),
    ];
    let mut text: String = entries.iter().map(|(s, t, o, ..)| entry(s, t, o)).collect();
    text.push_str(&entry("good.example", "intercept-ca", "public-ca"));
    let up = server(leaf(&["good.example"], &pki.public)).await;
    let mut p = start(
        up.addr,
        &policy(&text),
        secret_map(secrets),
        Config::default(),
    )
    .await;
    let ca = pki.intercept_ca();
    for (i, (sni, _, _, secret, why)) in entries.iter().enumerate() {
        let r = curl(p.addr, sni, "/", &ca, &[]).await;
        assert_eq!(r.code, 35, "{sni}: {}", r.stderr);
        let rec = p.record().await;
        assert_eq!(rec.verdict, proxy::Verdict::Error);
        assert_eq!(tls_of(&rec).secret.as_deref(), Some(*secret), "{sni}");
        assert!(
            rec.info
                .contains("fail closed: CiliumNetworkPolicy default/saas"),
            "{}",
            rec.info
        );
        assert!(rec.info.contains(why), "{sni}: {}", rec.info);
        p.wait_metric(&format!(
            "ward_proxy_tls_material_resets_total{{policy=\"CiliumNetworkPolicy default/saas\",rule=\"spec.egress[0].toPorts[{i}]\",secret=\"{secret}\"}} 1"
        ))
        .await;
    }
    let good = curl(p.addr, "good.example", "/ok", &ca, &[]).await;
    assert_eq!(good.status, 200, "{}", good.stderr);
    let broken = p
        .proxy
        .materials()
        .broken_rules(&p.proxy.store().load().model);
    let listed: Vec<(&str, Option<&str>)> = broken
        .iter()
        .map(|b| (b.rule.as_str(), b.secret.as_deref()))
        .collect();
    assert_eq!(
        listed,
        [
            ("spec.egress[0].toPorts[0]", Some("default/missing")),
            ("spec.egress[0].toPorts[1]", Some("default/no-key")),
            ("spec.egress[0].toPorts[2]", Some("default/bad-pem")),
            ("spec.egress[0].toPorts[3]", Some("default/mismatch")),
            ("spec.egress[0].toPorts[4]", Some("default/no-ca")),
        ]
    );
    p.wait_metric("ward_proxy_tls_broken_rules 5").await;

    // the material arrives: the rule works for the next connection
    let mut fixed = pki.secrets();
    fixed.push((
        "missing",
        vec![
            ("tls.crt", pki.intercept.pem()),
            ("tls.key", pki.intercept.key().serialize_pem()),
        ],
    ));
    p.secrets.publish(secret_map(fixed));
    let up2 = curl(p.addr, "gone.example", "/", &ca, &[]).await;
    assert_eq!(up2.code, 0, "now intercepted: {}", up2.stderr);
}

/// Terminating without originating: nothing in plaintext to a TLS port. Without
/// `tls_system_roots` the rule fails closed; with it the server is verified against the
/// node's roots (which do not know the test's CA: 502).
#[tokio::test]
async fn terminating_without_originating() {
    let pki = Pki::new();
    let entries = "    - ports: [{port: '443', protocol: TCP}]
      terminatingTLS: {secret: {name: intercept-ca}}
";
    let up = server(leaf(&["api.example"], &pki.public)).await;
    let mut p = start(
        up.addr,
        &policy(entries),
        secret_map(pki.secrets()),
        Config::default(),
    )
    .await;
    let r = curl(p.addr, "api.example", "/", &pki.intercept_ca(), &[]).await;
    assert_eq!(r.code, 35, "{}", r.stderr);
    assert!(p.record().await.info.contains("tls_system_roots"));

    let config = Config {
        tls_system_roots: true,
        ..Config::default()
    };
    let mut p = start(up.addr, &policy(entries), secret_map(pki.secrets()), config).await;
    let r = curl(p.addr, "api.example", "/", &pki.intercept_ca(), &[]).await;
    assert_eq!(r.status, 502, "{}", r.stderr);
    assert!(p.record().await.info.contains("UnknownIssuer"));
    assert!(up.seen().is_empty());
}

/// A changed secret applies to new connections; a session set up before goes on with
/// what it has.
#[tokio::test]
async fn rotated_material_applies_to_new_connections() {
    let pki = Pki::new();
    let (up, p) = payments(&pki, Config::default()).await;
    let intercept = pki.intercept.pem();
    let (tls, before) = tls_client(
        p.addr,
        "static.payments.example",
        &intercept,
        &[b"http/1.1"],
    )
    .await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = || request("GET", "/one", "static.payments.example");
    assert_eq!(send.send_request(get()).await.unwrap().status(), 200);

    let mut secrets = pki.secrets();
    let (cert, key) = leaf(&["static.payments.example"], &pki.intercept);
    secrets.push(("static-leaf", vec![("tls.crt", cert), ("tls.key", key)]));
    secrets.push(("other-ca", vec![("ca.crt", pki.public.pem())]));
    assert!(p.secrets.publish(secret_map(secrets)));

    let resp = send.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), 200, "the open session is unaffected");
    let (_, after) = tls_client(p.addr, "static.payments.example", &intercept, &[]).await;
    assert_ne!(before, after, "a new connection gets the new certificate");
    assert_eq!(up.seen().len(), 2);
}

/// The ClientHello must come within the handshake timeout; TLS connections beyond the
/// concurrency limit wait for a slot.
#[tokio::test]
async fn handshake_timeout_and_concurrency_limit() {
    let pki = Pki::new();
    let up = server(leaf(&["x.splice.example"], &pki.public)).await;
    let timeout = Duration::from_millis(600);
    let config = Config {
        tls_handshake_timeout_ms: 600,
        tls_max_handshakes: 1,
        ..Config::default()
    };
    let p = start(up.addr, &policy(SPLICE), HashMap::new(), config).await;
    // A: a handshake record's first byte, then silence; it holds the only slot
    let mut a = TcpStream::connect(p.addr).await.unwrap();
    a.write_all(&[0x16]).await.unwrap();
    let a_sent = Instant::now();
    // B: a complete hello, waiting for A's slot
    let (ok, out) = s_client(p.addr, Some("x.splice.example"), Some(&pki.public_ca())).await;
    let b_done = a_sent.elapsed();
    assert!(ok, "{out}");
    assert!(
        b_done >= timeout - Duration::from_millis(20),
        "B was served after {b_done:?}, before A's slot was free"
    );
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut a, &mut buf),
    )
    .await
    .unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    p.wait_metric("ward_proxy_tls_handshake_errors_total{kind=\"timeout\"} 1")
        .await;
}

/// headerMatches with a secret: the value comes from the secret store (the next
/// request sees a new value), a missing secret never matches, and no record shows it.
#[tokio::test]
async fn header_matches_take_values_from_secrets() {
    let entries = "    - ports: [{port: '443', protocol: TCP}]
      rules:
        http:
        - path: /token
          headerMatches: [{name: X-Api-Token, secret: {name: api-token}}]
        - path: /missing
          headerMatches: [{name: X-Api-Token, secret: {name: absent}}]
";
    let plain = plain_server().await;
    let secrets = secret_map(vec![("api-token", vec![("value", "s3cr3t-42\n".into())])]);
    let mut p = start(plain, &policy(entries), secrets, Config::default()).await;
    let status = |token: &'static str, path: &'static str| {
        let addr = p.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut req = request("GET", path, "api.example");
            req.headers_mut()
                .insert("x-api-token", token.parse().unwrap());
            send.send_request(req).await.unwrap().status()
        }
    };
    assert_eq!(status("s3cr3t-42", "/token").await, 200);
    assert_eq!(status("s3cr3t-43", "/token").await, 403);
    assert_eq!(status("s3cr3t-42", "/missing").await, 403);
    p.secrets.publish(secret_map(vec![(
        "api-token",
        vec![("value", "rotated".into())],
    )]));
    assert_eq!(status("s3cr3t-42", "/token").await, 403);
    assert_eq!(status("rotated", "/token").await, 200);
    for _ in 0..5 {
        let text = serde_json::to_string(&p.record().await).unwrap();
        assert!(
            !text.contains("s3cr3t") && !text.contains("rotated"),
            "{text}"
        );
    }
}

/// A plain HTTP/1.1 server answering 200 to everything.
async fn plain_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}
