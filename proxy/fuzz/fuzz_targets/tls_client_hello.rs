//! The proxy's TLS path on any input: bytes after a handshake record's first byte,
//! real ClientHellos (for SNIs that are spliced, intercepted, failed closed or reset)
//! with fuzzed bytes patched in or cut short, and complete intercepted sessions carrying
//! fuzzed requests, against a real TLS server. No input may panic the handler, and every
//! connection ends (timeouts are short).

#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use policy_model::tls::SecretRef;
use policy_model::{CompileOptions, Direction, Model};
use proxy::{AuditLog, Config, Metrics, Mode, PolicyStore, Proxy, SecretStore};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "namespaces: [{name: default}]
pods:
- {namespace: default, name: client, labels: {app: client}, ip: 10.0.0.1}
";

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: saas, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.0/8]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: ['*.splice.example']
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.intercept.example]
      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: public-ca}}
      rules:
        http:
        - {method: GET, path: '/ok.*'}
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [static.intercept.example]
      terminatingTLS: {secret: {name: static-leaf}}
      originatingTLS: {secret: {name: public-ca}}
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [broken.intercept.example]
      terminatingTLS: {secret: {name: missing}}
      originatingTLS: {secret: {name: public-ca}}
";

/// SNIs the structured inputs pick from: spliced, intercepted (minted, static), failed
/// closed, reset.
const SNIS: [&str; 6] = [
    "x.splice.example",
    "api.intercept.example",
    "static.intercept.example",
    "broken.intercept.example",
    "denied.example",
    "API.Intercept.Example",
];

struct Setup {
    rt: tokio::runtime::Runtime,
    proxy: Proxy,
    upstream: std::net::SocketAddr,
    hellos: Vec<Vec<u8>>,
    client: Arc<rustls::ClientConfig>,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(names: &[&str], issuer: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client trusting `ca` (PEM), offering h2 and http/1.1.
fn client_config(ca: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The first flight of a rustls client for `sni`.
fn client_hello(cfg: &Arc<rustls::ClientConfig>, sni: &str) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

/// A TLS server (HTTP/1.1 and h2) answering 200.
async fn server(cert: &str, key: &str) -> std::net::SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_millis(200), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc),
                )
                .await;
            });
        }
    });
    addr
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let intercept = ca("fuzz interception CA");
        let public = ca("fuzz public CA");
        let (up_cert, up_key) = leaf(&SNIS[..4], &public);
        let upstream = rt.block_on(server(&up_cert, &up_key));
        let (static_cert, static_key) = leaf(&["static.intercept.example"], &intercept);
        let secret = |name: &str, keys: Vec<(&str, String)>| {
            (
                SecretRef {
                    namespace: "default".into(),
                    name: name.into(),
                },
                keys.into_iter()
                    .map(|(k, v)| (k.to_string(), v.into_bytes()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let secrets = SecretStore::new();
        secrets.publish(HashMap::from([
            secret(
                "intercept-ca",
                vec![
                    ("tls.crt", intercept.pem()),
                    ("tls.key", intercept.key().serialize_pem()),
                ],
            ),
            secret(
                "static-leaf",
                vec![("tls.crt", static_cert), ("tls.key", static_key)],
            ),
            secret("public-ca", vec![("ca.crt", public.pem())]),
        ]));
        let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, errors, _) = policy_model::api::load(POLICY, None);
        assert!(errors.is_empty(), "{errors:?}");
        let model = Model::compile(&cluster, policies, CompileOptions::default());
        let metrics = Metrics::new();
        let config = Config {
            header_read_timeout_ms: 100,
            idle_timeout_ms: 200,
            upstream_connect_timeout_ms: 200,
            tls_handshake_timeout_ms: 200,
            ..Config::default()
        };
        let proxy = Proxy::with_secrets(
            config,
            Arc::new(PolicyStore::new(model)),
            Mode::Standalone {
                endpoint: "default/client".into(),
                direction: Direction::Egress,
                port: Some(443),
            },
            AuditLog::disabled(),
            metrics,
            Arc::new(secrets),
        );
        let client = client_config(&intercept.pem());
        let hellos = SNIS.iter().map(|s| client_hello(&client, s)).collect();
        Setup {
            rt,
            proxy,
            upstream,
            hellos,
            client,
        }
    })
}

/// What the fuzzed client sends, from the input.
enum Input<'a> {
    /// A handshake record's first byte, then these bytes.
    Raw(Vec<u8>),
    /// A complete session for this SNI, then these bytes inside it.
    Session(&'static str, &'a [u8]),
}

fn input<'a>(s: &Setup, data: &'a [u8]) -> Input<'a> {
    let [mode, pick, rest @ ..] = data else {
        let mut raw = vec![0x16];
        raw.extend_from_slice(data);
        return Input::Raw(raw);
    };
    let i = usize::from(*pick) % SNIS.len();
    let hello = &s.hellos[i];
    match mode % 4 {
        0 => {
            let mut raw = vec![0x16];
            raw.extend_from_slice(rest);
            Input::Raw(raw)
        }
        // a real hello with bytes patched in: (position, value) pairs
        1 => {
            let mut h = hello.clone();
            for pair in rest.chunks_exact(3) {
                let at = usize::from(u16::from_be_bytes([pair[0], pair[1]])) % h.len();
                h[at] = pair[2];
            }
            Input::Raw(h)
        }
        // a real hello cut short, then anything
        2 => {
            let cut = rest
                .first()
                .map_or(0, |b| usize::from(*b) * hello.len() / 256);
            let mut h = hello[..cut.max(1)].to_vec();
            h.extend_from_slice(rest.get(1..).unwrap_or_default());
            Input::Raw(h)
        }
        _ => Input::Session(SNIS[i], rest),
    }
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    s.rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let p = s.proxy.clone();
        let upstream = s.upstream;
        let conn = tokio::spawn(async move {
            p.serve_connection(server, "127.0.0.1:40000".parse().unwrap(), upstream)
                .await
        });
        let drive = async {
            match input(s, data) {
                Input::Raw(bytes) => {
                    let mut client = client;
                    let _ = client.write_all(&bytes).await;
                    let _ = client.shutdown().await;
                    let mut out = Vec::new();
                    let _ = client.read_to_end(&mut out).await;
                }
                Input::Session(sni, request) => {
                    let name = ServerName::try_from(sni.to_string()).unwrap();
                    let connector = tokio_rustls::TlsConnector::from(s.client.clone());
                    if let Ok(mut tls) = connector.connect(name, client).await {
                        let _ = tls.write_all(request).await;
                        let _ = tls.shutdown().await;
                        let mut out = Vec::new();
                        let _ = tls.read_to_end(&mut out).await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drive).await;
        let ended = tokio::time::timeout(Duration::from_secs(2), conn).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the connection handler hung or panicked"
        );
    });
});
