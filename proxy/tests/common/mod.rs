//! Test fixtures: a cluster and policies, an echo upstream that records what reached it,
//! and a proxy in standalone mode on loopback ports.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use policy_model::{CompileOptions, Direction, Model};
use proxy::{
    AuditEvent, AuditLog, Config, DroppedCounter, FixedListener, Metrics, Mode, PolicyStore, Proxy,
    Record,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub const CLUSTER: &str = r#"
namespaces:
  - {name: default}
pods:
  - {namespace: default, name: client, labels: {app: client}, ip: 127.0.0.1}
  - {namespace: default, name: client2, labels: {app: client}, ip: 127.0.0.5}
  - {namespace: default, name: stranger, labels: {app: stranger}, ip: 127.0.0.3}
  - {namespace: default, name: web, labels: {app: web}, ip: 10.0.0.2}
"#;

/// Every rule kind, on port 80 of default/web, for default/client.
pub const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
        - {method: GET, path: "/query\\?x=1"}
        - {method: POST, path: "/submit", host: "web\\.example(:[0-9]+)?"}
        - {path: "/hdr", headers: ["X-My-Header: true"]}
        - {path: "/presence", headers: ["X-Presence"]}
        - path: /replace
          headerMatches: [{name: X-Token, value: s3cret, mismatch: REPLACE}]
        - path: /add
          headerMatches: [{name: X-Added, value: "yes", mismatch: ADD}]
        - path: /delete
          headerMatches: [{name: X-Gone, value: "never", mismatch: DELETE}]
        - path: /log
          headerMatches: [{name: X-Logged, value: "x", mismatch: LOG}]
        - {method: POST, path: "/echo\\.Echo/.*"}
        - {method: GET, path: "/ws"}
"#;

/// Only `/public/.*` is allowed.
pub const POLICY_PUBLIC_ONLY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
"#;

pub fn model(policy: &str) -> Model {
    let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
    let (policies, errors, _) = policy_model::api::load(policy, None);
    assert!(errors.is_empty(), "{errors:?}");
    Model::compile(&cluster, policies, CompileOptions::default())
}

/// A request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The address the upstream saw the request come from.
    pub peer: SocketAddr,
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// An upstream (HTTP/1.1 and h2c) that records every request and answers 200 with
/// `x-echo-path` and the request body; gRPC calls get their body back with trailers.
/// `GET /ws` with an upgrade gets 101 and an echo of the upgraded bytes.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The recording upstreams of this test binary by address, so a proxy started in front
/// of one can compare what it decided with what the upstream received.
type Registry = Mutex<HashMap<SocketAddr, Arc<Mutex<Vec<Seen>>>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

pub async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    registry().lock().unwrap().insert(addr, seen.clone());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let seen = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| echo(req, peer, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, seen }
}

async fn echo(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<TestBody>, Infallible> {
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let collected = body.collect().await.ok();
    let trailers = collected.as_ref().and_then(|c| c.trailers().cloned());
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        peer,
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
        trailers: trailers.clone(),
    });
    if let Some(on) = on_upgrade {
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(TestBody::new(Bytes::new(), None))
            .unwrap());
    }
    let grpc = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut resp = Response::builder().status(200).header(
        "x-echo-path",
        parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
    );
    if grpc {
        resp = resp.header("content-type", "application/grpc");
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        if let Some(v) = trailers.as_ref().and_then(|t| t.get("x-client-trailer")) {
            t.insert("x-echoed-trailer", v.clone());
        }
        return Ok(resp.body(TestBody::new(body, Some(t))).unwrap());
    }
    Ok(resp.body(TestBody::new(body, None)).unwrap())
}

/// A body of one data frame and optional trailers.
pub struct TestBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl TestBody {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> TestBody {
        TestBody {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }
    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// A running proxy in standalone mode in front of `upstream`, for default/web ingress
/// on port 80. When it is dropped at the end of a test (that did not fail otherwise), and
/// the upstream is a recording one, every request the upstream received is checked
/// against the requests the proxy allowed ([`check_upstream_saw_decisions`]).
pub struct Running {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    pub audit: mpsc::Receiver<AuditEvent>,
    /// Every allowed request as the decision saw it.
    pub decided: Arc<Mutex<Vec<DecidedCopy>>>,
    upstream_seen: Option<Arc<Mutex<Vec<Seen>>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(seen) = &self.upstream_seen {
            let seen = seen.lock().unwrap().clone();
            let decided = self.decided.lock().unwrap().clone();
            if let Err(e) = check_upstream_saw_decisions(&decided, &seen) {
                panic!("{e}");
            }
        }
    }
}

/// An allowed request as the proxy decided on it ([`proxy::Decided`], owned).
#[derive(Clone, Debug)]
pub struct DecidedCopy {
    pub method: String,
    pub authority: Option<String>,
    pub path: String,
    pub headers: HeaderMap,
    pub actions: Vec<policy_model::http::HeaderAction>,
}

/// Headers the upstream may see that the decision did not: the framing the proxy's
/// HTTP client writes for the body it forwards.
fn framing_header(name: &http::HeaderName, value: &http::HeaderValue, s: &Seen) -> bool {
    (name == http::header::TRANSFER_ENCODING && value == "chunked")
        || (name == http::header::CONTENT_LENGTH
            && value.to_str().ok() == Some(s.body.len().to_string().as_str()))
}

/// The decision's headers with the rules' header actions applied, as the proxy does.
fn expected_headers(d: &DecidedCopy) -> HeaderMap {
    use policy_model::http::HeaderAction;
    let mut h = d.headers.clone();
    for a in &d.actions {
        match a {
            HeaderAction::Add { name, value } => {
                h.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            HeaderAction::Delete { name } => {
                h.remove(name.as_str());
            }
            HeaderAction::Replace { name, value } => {
                h.insert(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
        }
    }
    h
}

/// Why `s` (received upstream) is not the request `d` the decision saw, or None.
fn differs(d: &DecidedCopy, s: &Seen) -> Option<String> {
    if d.method != s.method {
        return Some(format!("method {} vs {}", d.method, s.method));
    }
    let uri: http::Uri = s.uri.parse().unwrap();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if d.path != path {
        return Some(format!("path {} vs {path}", d.path));
    }
    let authority = if s.version == http::Version::HTTP_2 {
        if s.headers.contains_key("host") {
            return Some("a host header beside :authority".into());
        }
        uri.authority().map(|a| a.as_str().to_string())
    } else {
        let hosts: Vec<_> = s.headers.get_all("host").iter().collect();
        if hosts.len() > 1 {
            return Some(format!("several Host headers {hosts:?}"));
        }
        hosts.first().map(|h| h.to_str().unwrap().to_string())
    };
    if d.authority != authority {
        return Some(format!("authority {:?} vs {authority:?}", d.authority));
    }
    let want = expected_headers(d);
    for name in want.keys() {
        let a: Vec<_> = want.get_all(name).iter().collect();
        let b: Vec<_> = s.headers.get_all(name).iter().collect();
        if a != b {
            return Some(format!("header {name}: decided {a:?}, received {b:?}"));
        }
    }
    for (name, value) in &s.headers {
        if !want.contains_key(name) && !framing_header(name, value, s) {
            return Some(format!("header {name}: {value:?} was not in the decision"));
        }
    }
    None
}

/// Every request the upstream received is one the proxy allowed, exactly as the
/// decision saw it: method, authority, path and every header (after the rules' own
/// header actions), nothing added but body framing. Each decision accounts for at most
/// one received request.
pub fn check_upstream_saw_decisions(decided: &[DecidedCopy], seen: &[Seen]) -> Result<(), String> {
    let mut used = vec![false; decided.len()];
    for s in seen {
        let mut why = Vec::new();
        let found = decided.iter().enumerate().position(|(i, d)| {
            if used[i] {
                return false;
            }
            match differs(d, s) {
                None => true,
                Some(w) => {
                    why.push(w);
                    false
                }
            }
        });
        match found {
            Some(i) => used[i] = true,
            None => {
                return Err(format!(
                    "the upstream received {} {} {:?} that no decision saw: {why:?}",
                    s.method, s.uri, s.headers
                ))
            }
        }
    }
    Ok(())
}

pub async fn start_proxy(upstream: SocketAddr, policy: &str) -> Running {
    start_proxy_with(upstream, policy, Config::default()).await
}

pub async fn start_proxy_with(upstream: SocketAddr, policy: &str, config: Config) -> Running {
    let metrics = Metrics::new();
    let dropped = DroppedCounter::new();
    dropped.register(&metrics.registry).unwrap();
    let (audit_log, audit) = AuditLog::channel(1024, dropped);
    let store = Arc::new(PolicyStore::new(model(policy)));
    let mode = Mode::Standalone {
        endpoint: "default/web".into(),
        direction: Direction::Ingress,
        port: Some(80),
    };
    let proxy = Proxy::new(config, store, mode, audit_log, metrics);
    let decided: Arc<Mutex<Vec<DecidedCopy>>> = Arc::default();
    let record = decided.clone();
    proxy.set_observer(Arc::new(move |d: &proxy::Decided<'_>| {
        record.lock().unwrap().push(DecidedCopy {
            method: d.method.to_string(),
            authority: d.authority.map(str::to_string),
            path: d.path.to_string(),
            headers: d.headers.clone(),
            actions: d.actions.to_vec(),
        });
    }));
    let listener = FixedListener::bind("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let addr = proxy::Listener::local_addr(&listener).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener).await });
    let upstream_seen = registry().lock().unwrap().get(&upstream).cloned();
    Running {
        addr,
        proxy,
        audit,
        decided,
        upstream_seen,
    }
}

/// An HTTP/1.1 client on one connection.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// An HTTP/1.1 client on one connection from `src`.
pub async fn h1_from(
    src: &str,
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// An h2c (prior knowledge) client on one connection.
pub async fn h2<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "web")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub async fn body_string(resp: Response<Incoming>) -> String {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

/// Sends raw bytes and reads until the peer closes or `deadline` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends raw bytes and reads until `needle` arrives (or 5 s pass, or the peer closes).
pub async fn raw_until(addr: SocketAddr, bytes: &[u8], needle: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(needle) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The next audit record, waiting at most 5 s.
pub async fn next_record(rx: &mut mpsc::Receiver<AuditEvent>) -> Record {
    let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no audit record within 5 s")
        .expect("audit channel closed");
    match e {
        AuditEvent::Http(r) => r,
        other => panic!("the HTTP proxy queued a {} event", other.kind()),
    }
}

pub mod h2raw;
