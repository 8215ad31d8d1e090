//! Test fixtures: a cluster and policies, an echo upstream that records what reached it,
//! and a proxy in standalone mode on loopback ports.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use policy_model::{CompileOptions, Direction, Model};
use proxy::{AuditLog, Config, FixedListener, Metrics, Mode, PolicyStore, Proxy, Record};
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

pub async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
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
/// on port 80.
pub struct Running {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    pub audit: mpsc::Receiver<Record>,
}

pub async fn start_proxy(upstream: SocketAddr, policy: &str) -> Running {
    start_proxy_with(upstream, policy, Config::default()).await
}

pub async fn start_proxy_with(upstream: SocketAddr, policy: &str, config: Config) -> Running {
    let metrics = Metrics::new();
    let (audit_log, audit) = AuditLog::channel(1024, metrics.clone());
    let store = Arc::new(PolicyStore::new(model(policy)));
    let mode = Mode::Standalone {
        endpoint: "default/web".into(),
        direction: Direction::Ingress,
        port: Some(80),
    };
    let proxy = Proxy::new(config, store, mode, audit_log, metrics);
    let listener = FixedListener::bind("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let addr = proxy::Listener::local_addr(&listener).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener).await });
    Running { addr, proxy, audit }
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
pub async fn next_record(rx: &mut mpsc::Receiver<Record>) -> Record {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no audit record within 5 s")
        .expect("audit channel closed")
}
