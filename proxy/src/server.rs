//! A connection's whole path, top to bottom: accept -> detect -> HTTP server -> policy ->
//! forward or answer. Local answers (403, 400, 503) are made in one place each, and each
//! request produces one audit record and one set of metric samples.

use std::borrow::Cow;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use policy_model::flow::{L7Decision, SideDecision};
use policy_model::http::{HeaderAction, Request as RuleRequest};
use policy_model::Direction;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::audit::{self, AuditLog, Endpoint, Record, Rule, Verdict};
use crate::config::Config;
use crate::detect::{detect_protocol, HttpVersion, Protocol};
use crate::framing::{Ambiguous, Tracked, Tracker};
use crate::h2budget::{Budgeted, Budgets};
use crate::idle::IdleTimeout;
use crate::listener::{Accepted, Listener};
use crate::metrics::{protocol_name, Metrics};
use crate::policy::{ConnPolicy, Mode, PolicyStore};
use crate::request;
use crate::tls::{MaterialSettings, Materials, SecretStore, TlsConn};
use crate::upstream::{BoundH1, Upstream, UpstreamConfig, UpstreamError};

/// The body of every response the proxy sends downstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The Cilium deny body.
pub const DENIED_BODY: &str = "Access denied\r\n";

/// The proxy: configuration, the policy store and the shared parts of the data path.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) store: Arc<PolicyStore>,
    pub(crate) mode: Mode,
    pub(crate) upstream: Upstream,
    pub(crate) audit: AuditLog,
    pub(crate) metrics: Metrics,
    connections: Arc<Semaphore>,
    options: request::Options,
    observer: OnceLock<Watcher>,
    /// TLS material built from the secrets.
    pub(crate) materials: Arc<Materials>,
    /// TLS connections reading their ClientHello or handshaking.
    pub(crate) handshakes: Arc<Semaphore>,
    /// Set once the proxy drains ([`Proxy::drain`]).
    draining: tokio::sync::watch::Sender<bool>,
}

/// A downstream connection's stream. `reset_on_close` makes closing it send a TCP reset
/// (SO_LINGER 0) instead of a FIN: how a refused TLS session ends, as in Cilium.
pub trait Downstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn reset_on_close(&self) {}
}

impl Downstream for tokio::net::TcpStream {
    fn reset_on_close(&self) {
        if let Err(e) = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO)) {
            tracing::debug!("SO_LINGER 0: {e}");
        }
    }
}

impl Downstream for tokio::io::DuplexStream {}

/// The installed [`Observer`] (a function has no `Debug`).
struct Watcher(Observer);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// An allowed request as the decision saw it, just before it is forwarded (the header
/// actions of the matching rules still to be applied).
#[derive(Debug)]
pub struct Decided<'a> {
    pub method: &'a str,
    /// `:authority` / Host.
    pub authority: Option<&'a str>,
    /// The normalised path with query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub actions: &'a [HeaderAction],
}

/// Sees every allowed request before it is forwarded ([`Proxy::set_observer`]).
pub type Observer = Arc<dyn Fn(&Decided<'_>) + Send + Sync>;

impl Proxy {
    /// A proxy without TLS material: intercepting rules fail closed (see
    /// [`Proxy::with_secrets`]).
    pub fn new(
        config: Config,
        store: Arc<PolicyStore>,
        mode: Mode,
        audit: AuditLog,
        metrics: Metrics,
    ) -> Proxy {
        Proxy::with_secrets(
            config,
            store,
            mode,
            audit,
            metrics,
            Arc::new(SecretStore::new()),
        )
    }

    /// A proxy whose TLS material and header-match secrets come from `secrets`.
    pub fn with_secrets(
        config: Config,
        store: Arc<PolicyStore>,
        mode: Mode,
        audit: AuditLog,
        metrics: Metrics,
        secrets: Arc<SecretStore>,
    ) -> Proxy {
        let materials = Arc::new(Materials::new(
            secrets,
            MaterialSettings {
                minted_cache: config.tls_minted_cache,
                system_roots: config.tls_system_roots,
            },
            metrics.clone(),
        ));
        let handshakes = Arc::new(Semaphore::new(config.tls_max_handshakes.max(1)));
        let upstream = Upstream::new(
            UpstreamConfig {
                connect_timeout: config.upstream_connect_timeout(),
                mark: config.upstream_mark,
                max_idle_per_destination: config.max_idle_upstream_per_destination,
            },
            metrics.clone(),
        );
        metrics
            .policy_generation
            .set(i64::try_from(store.generation()).unwrap_or(i64::MAX));
        let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let options = request::Options {
            backslash: config.path_backslash,
            underscores: config.headers_with_underscores,
        };
        Proxy {
            shared: Arc::new(Shared {
                options,
                observer: OnceLock::new(),
                materials,
                handshakes,
                config,
                store,
                mode,
                upstream,
                audit,
                metrics,
                connections,
                draining: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// Starts draining: HTTP/1.1 connections close after their next response, which
    /// says `Connection: close` (an idle one is left to its client or the caller's drain
    /// window: closing it could cut a request on its way); HTTP/2 connections get GOAWAY
    /// and finish their streams. Tunnels and TLS splices run on. Stopping the accept loops
    /// is the caller's (abort the tasks running [`Proxy::serve`]).
    pub fn drain(&self) {
        self.shared.draining.send_replace(true);
    }

    /// Downstream connections open now (the open-connections gauge).
    pub fn open_connections(&self) -> i64 {
        self.shared.metrics.open_connections.get()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn store(&self) -> &Arc<PolicyStore> {
        &self.shared.store
    }

    /// The TLS material (and, through it, the secrets) the proxy uses.
    pub fn materials(&self) -> &Arc<Materials> {
        &self.shared.materials
    }

    /// Installs a function that sees every allowed request as decided, before it is
    /// forwarded (tests compare it with what the upstream received). Only the first
    /// call has an effect; returns whether it was the first.
    pub fn set_observer(&self, observer: Observer) -> bool {
        self.shared.observer.set(Watcher(observer)).is_ok()
    }

    /// Accepts connections forever (until the task is dropped). At most
    /// `max_connections` are served at once; the rest wait in the accept queue.
    pub async fn serve<L: Listener>(&self, listener: L) -> io::Result<()> {
        loop {
            let permit = match self.shared.connections.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return Ok(()),
            };
            let accepted = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Accepted {
                stream,
                peer,
                orig_dst,
            } = accepted;
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                proxy.serve_connection(stream, peer, orig_dst).await;
                drop(permit);
            });
        }
    }

    /// Serves one downstream connection from `peer` meant for `orig_dst` until it
    /// closes. Generic over the stream so tests and the fuzz target can drive it.
    pub async fn serve_connection<S: Downstream>(
        &self,
        io: S,
        peer: SocketAddr,
        orig_dst: SocketAddr,
    ) {
        let metrics = &self.shared.metrics;
        metrics.open_connections.inc();
        let _open = OpenGuard(metrics.open_connections.clone());
        let cfg = &self.shared.config;
        let io = IdleTimeout::new(io, cfg.idle_timeout());
        let (protocol, io) =
            match tokio::time::timeout(cfg.header_read_timeout(), detect_protocol(io)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::debug!("{peer}: closed before a request: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("{peer}: no request within the header timeout");
                    return;
                }
            };
        let version = match protocol {
            Protocol::Tls => return crate::tls::serve(self, io, peer, orig_dst).await,
            Protocol::Http(v) => v,
        };
        let snap = self.shared.store.load();
        let policy = self.shared.mode.resolve(&snap, peer, orig_dst);
        if let Some(why) = crate::tls::plaintext_refused(&policy) {
            // a port whose rules admit only TLS with a listed SNI: reset, as Cilium does
            crate::tls::refuse_plaintext(self, &policy, peer, orig_dst, why);
            io.get_ref().get_ref().reset_on_close();
            return;
        }
        self.serve_http(io, version, peer, orig_dst, policy, None)
            .await;
    }

    /// Serves HTTP/1.1 or HTTP/2 on `io` (plaintext, or an intercepted TLS session's
    /// decrypted stream with `tls`), the connection's policy resolved as `policy`.
    pub(crate) async fn serve_http<I>(
        &self,
        io: I,
        version: HttpVersion,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        policy: ConnPolicy,
        tls: Option<Arc<TlsConn>>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.shared.config;
        let ambiguous = Arc::new(Ambiguous::default());
        let conn = Arc::new(Conn {
            shared: self.shared.clone(),
            peer,
            orig_dst,
            version,
            policy: Mutex::new(Arc::new(policy)),
            requests: AtomicU64::new(0),
            ambiguous: ambiguous.clone(),
            upstream_h1: Mutex::new(None),
            tls,
        });
        let draining = self.shared.draining.subscribe();
        let result = match version {
            HttpVersion::Http1 => {
                let closing = draining.clone();
                let svc = service_fn(move |req| {
                    let conn = conn.clone();
                    let closing = *closing.borrow();
                    async move {
                        let mut resp = conn.handle(req).await;
                        // Draining: the connection ends after this response, which says
                        // so; an idle one is not closed under a request the client may
                        // be sending.
                        if closing && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                            resp.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let tracker = Tracker::new(cfg.max_header_size.max(8192), ambiguous);
                let io = TokioIo::new(Tracked::new(io, tracker));
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(cfg.header_read_timeout())
                    .max_buf_size(cfg.max_header_size.max(8192))
                    .keep_alive(true)
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
            }
            HttpVersion::H2c => {
                // Boxed: hyper spawns a task per stream holding the request's future,
                // which moves whole into the task and is overwritten whole when the task
                // ends; a box moves as a pointer.
                let svc = service_fn(move |req| {
                    let conn = conn.clone();
                    Box::pin(async move { Ok::<_, Infallible>(conn.handle(req).await) })
                });
                let budgets = Budgets {
                    priority_per_stream: cfg.h2_max_inbound_priority_frames_per_stream,
                    window_updates_per_data_frame: cfg
                        .h2_max_inbound_window_update_frames_per_data_frame_sent,
                    control: cfg.h2_max_inbound_control_frames,
                };
                let io = TokioIo::new(Budgeted::new(io, budgets));
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(cfg.max_concurrent_streams)
                    .max_header_list_size(u32::try_from(cfg.max_header_size).unwrap_or(u32::MAX))
                    .serve_connection(io, svc);
                // Draining HTTP/2: GOAWAY (hyper sends one for all streams, then one with
                // the last stream it took), the streams under way finish.
                until_drained(conn, draining, |c| c.graceful_shutdown()).await
            }
        };
        if let Err(e) = result {
            tracing::debug!("{peer}: connection ended: {e}");
        }
    }
}

/// Drives a hyper connection to its end; once `draining` is set, asks it (once) to
/// shut down gracefully and drives it on until it has.
async fn until_drained<C, T>(
    conn: C,
    mut draining: tokio::sync::watch::Receiver<bool>,
    shut_down: impl FnOnce(std::pin::Pin<&mut C>),
) -> T
where
    C: std::future::Future<Output = T>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        // a closed channel (the proxy is gone) never drains
        Ok(_) = draining.wait_for(|d| *d) => {}
    }
    shut_down(conn.as_mut());
    conn.await
}

struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One downstream connection: who, where to, and the policy resolved for it.
struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    version: HttpVersion,
    policy: Mutex<Arc<ConnPolicy>>,
    /// Requests seen on this connection (HTTP/1.1 requests are handled in order).
    requests: AtomicU64,
    /// Which HTTP/1 request carried both Content-Length and Transfer-Encoding.
    ambiguous: Arc<Ambiguous>,
    /// HTTP/1.1: the upstream connection this connection's requests go over.
    upstream_h1: Mutex<Option<BoundH1>>,
    /// The intercepted TLS session this connection's requests come from.
    tls: Option<Arc<TlsConn>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let bound = match self.upstream_h1.get_mut() {
            Ok(b) => b.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(b) = bound {
            self.shared.upstream.release_h1(b);
        }
    }
}

/// What a request looks like to the rules: the normalised path and the authority.
struct View<'a> {
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    headers: &'a HeaderMap,
}

impl RuleRequest for View<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn host(&self) -> Option<&str> {
        self.host
    }
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        let mut out = String::from_utf8_lossy(first.as_bytes());
        for v in values {
            let s = out.to_mut();
            s.push(',');
            s.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
        Some(out)
    }
}

/// Facts about a request gathered for its metrics and audit record. The strings are
/// only filled in when an audit output is configured (`audit`).
struct Facts {
    start: Instant,
    audit: bool,
    time: SystemTime,
    version: Version,
    /// A HEAD request: local answers carry no body.
    head: bool,
    method: String,
    host: String,
    path: String,
    policy: Arc<ConnPolicy>,
}

impl Conn {
    /// The connection's policy, re-resolved if the snapshot changed since.
    fn current_policy(&self) -> (Arc<crate::policy::Snapshot>, Arc<ConnPolicy>) {
        let snap = self.shared.store.load();
        let mut guard = match self.policy.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.generation != snap.generation {
            let policy = self.shared.mode.resolve(&snap, self.peer, self.orig_dst);
            *guard = Arc::new(match &self.tls {
                Some(t) => policy.intercepted(&snap.model, &t.session),
                None => policy,
            });
            self.shared
                .metrics
                .policy_generation
                .set(i64::try_from(snap.generation).unwrap_or(i64::MAX));
        }
        (snap, guard.clone())
    }

    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let audit = self.shared.audit.enabled();
        let (snap, policy) = self.current_policy();
        let mut facts = Facts {
            start,
            audit,
            time: if audit {
                SystemTime::now()
            } else {
                SystemTime::UNIX_EPOCH
            },
            version: req.version(),
            head: req.method() == Method::HEAD,
            method: String::new(),
            host: String::new(),
            path: String::new(),
            policy,
        };
        if audit {
            // as sent, for the record of a request refused before it is normalised
            facts.method = req.method().as_str().to_string();
            facts.path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            facts.host = match req.uri().authority() {
                Some(a) => a.as_str().to_string(),
                None => req
                    .headers()
                    .get(header::HOST)
                    .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                    .unwrap_or_default(),
            };
        }

        // Framing the upstream could read differently than we did: refuse.
        let h2 = self.version == HttpVersion::H2c;
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        if (!h2 && self.ambiguous.is(n))
            || (req.headers().contains_key(header::TRANSFER_ENCODING)
                && req.headers().contains_key(header::CONTENT_LENGTH))
        {
            return self.bad_request(&facts, "both Content-Length and Transfer-Encoding");
        }
        if !h2 && self.ambiguous.bad_chunks(n) {
            return self.bad_request(&facts, "malformed chunked body");
        }
        if !h2 && self.ambiguous.repeated_length(n) {
            return self.bad_request(&facts, "more than one Content-Length");
        }
        // One representation from here on: what the rules see is what goes upstream.
        let prepared = match request::prepare(
            &mut req,
            h2,
            &self.shared.options,
            &facts.policy.rule_headers,
        ) {
            Ok(p) => p,
            Err(why) => return self.bad_request(&facts, &why.to_string()),
        };
        let view = View {
            method: req.method().as_str(),
            path: req.uri().path_and_query().map_or("/", PathAndQuery::as_str),
            host: request::authority_of(&req, h2),
            headers: req.headers(),
        };
        if audit {
            facts.host = view.host.unwrap_or_default().to_string();
            facts.path = view.path.to_string();
        }
        let t = Instant::now();
        let secrets = self.shared.materials.secrets();
        let decision = snap
            .model
            .check_http_with(&facts.policy.policy, &view, secrets.as_ref());
        self.shared
            .metrics
            .decision
            .observe(t.elapsed().as_secs_f64());
        drop(snap);

        if !decision.allowed {
            let grpc = is_grpc(req.headers());
            let resp = if grpc { grpc_denied() } else { denied() };
            let resp = headless(&facts, resp);
            self.finish(&facts, Verdict::Denied, resp.status(), &decision, || {
                decision.reason.to_string()
            });
            return resp;
        }
        if let Some(Watcher(observe)) = self.shared.observer.get() {
            observe(&Decided {
                method: view.method,
                authority: view.host,
                path: view.path,
                headers: view.headers,
                actions: &decision.actions,
            });
        }
        // what a tunnel is re-checked against when the policy changes
        let recheck = prepared.websocket.then(|| Recheck {
            method: view.method.to_string(),
            path: view.path.to_string(),
            host: view.host.map(str::to_string),
            headers: view.headers.clone(),
        });
        let downstream_upgrade = prepared.websocket.then(|| hyper::upgrade::on(&mut req));

        // Forward the request as decided, with the header actions of the rules that
        // matched.
        apply_actions(req.headers_mut(), &decision.actions);
        let src = self
            .shared
            .config
            .transparent_source
            .then_some(self.peer.ip());
        let up = &self.shared.upstream;
        let up_tls = self.tls.as_ref().map(|t| &t.upstream);
        let sent = match self.version {
            HttpVersion::Http1 => {
                up.send_h1_bound(&self.upstream_h1, src, self.orig_dst, up_tls, req)
                    .await
            }
            HttpVersion::H2c => up.send_h2(src, self.orig_dst, up_tls, req).await,
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.downstream_body_failed() => {
                // the head went upstream; the record keeps the rule that allowed it
                return self.refused(&facts, &decision, &format!("request body: {e}"));
            }
            Err(e) => return self.upstream_failed(&facts, &decision, &e),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // only a switch to the WebSocket the request asked for is relayed
            match downstream_upgrade {
                Some(down) if switches_to_websocket(&resp) => {
                    let up = hyper::upgrade::on(&mut resp);
                    let watch = recheck.map(|r| (self.clone(), r));
                    tokio::spawn(tunnel(down, up, watch));
                }
                _ => {
                    return self.upstream_failed(
                        &facts,
                        &decision,
                        &UpstreamError::UnaskedSwitch(self.orig_dst),
                    )
                }
            }
        } else {
            strip_hop_by_hop(resp.headers_mut());
        }
        let status = resp.status();
        self.finish(&facts, Verdict::Forwarded, status, &decision, || {
            allowed_info(&decision, &facts.policy)
        });
        resp.map(|b| b.boxed())
    }

    /// 400 before any decision: the request is malformed or ambiguous.
    fn bad_request(&self, facts: &Facts, why: &str) -> Response<Body> {
        self.refused(facts, &L7Decision::default(), why)
    }

    /// 400 for a request decided as `d`.
    fn refused(&self, facts: &Facts, d: &L7Decision, why: &str) -> Response<Body> {
        self.shared.metrics.bad_requests.inc();
        let mut resp = headless(facts, text(StatusCode::BAD_REQUEST, "Bad request\r\n"));
        if self.version == HttpVersion::Http1 {
            // the rest of the stream cannot be trusted to be framed as we think
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.finish(facts, Verdict::Error, resp.status(), d, || {
            format!("bad request: {why}")
        });
        resp
    }

    fn upstream_failed(&self, facts: &Facts, d: &L7Decision, e: &UpstreamError) -> Response<Body> {
        self.shared
            .metrics
            .upstream_errors
            .with_label_values(&[e.kind()])
            .inc();
        let resp = headless(
            facts,
            if e.unreachable() {
                text(StatusCode::SERVICE_UNAVAILABLE, "Upstream unavailable\r\n")
            } else {
                text(StatusCode::BAD_GATEWAY, "Upstream failed\r\n")
            },
        );
        self.finish(facts, Verdict::Error, resp.status(), d, || e.to_string());
        resp
    }

    /// Metrics and the audit record of one request. `info` is only made when there is
    /// an audit record to put it in.
    fn finish(
        &self,
        f: &Facts,
        verdict: Verdict,
        status: StatusCode,
        d: &L7Decision,
        info: impl FnOnce() -> String,
    ) {
        let elapsed = f.start.elapsed();
        self.shared.metrics.observe_request(
            f.policy.direction,
            verdict,
            f.version,
            elapsed.as_secs_f64(),
        );
        if !f.audit {
            return;
        }
        self.shared.audit.record(Record {
            timestamp: audit::timestamp(f.time),
            observation_point: match f.policy.direction {
                Direction::Ingress => "Ingress".into(),
                Direction::Egress => "Egress".into(),
            },
            verdict,
            source_endpoint: Endpoint {
                ip: self.peer.ip().to_string(),
                port: self.peer.port(),
                identity: f.policy.source.identity,
                pod: f.policy.source.endpoint.clone(),
            },
            destination_endpoint: Endpoint {
                ip: self.orig_dst.ip().to_string(),
                port: self.orig_dst.port(),
                identity: f.policy.destination.identity,
                pod: f.policy.destination.endpoint.clone(),
            },
            http: Some(audit::Http {
                code: status.as_u16(),
                scheme: if self.tls.is_some() { "https" } else { "http" }.into(),
                method: f.method.clone(),
                host: f.host.clone(),
                path: f.path.clone(),
                protocol: protocol_name(f.version).into(),
                missing_headers: d.missing_headers.clone(),
                rejected_headers: d.rejected_headers.clone(),
            }),
            tls: self.tls.as_ref().map(|t| t.record()),
            latency_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            policy_generation: f.policy.generation,
            allowed_by: d.matched.iter().map(Rule::from).collect(),
            info: info(),
        });
    }
}

/// For an allowed request with no L7 rule match to name: which side let it pass.
fn allowed_info(d: &L7Decision, p: &ConnPolicy) -> String {
    if !d.matched.is_empty() && d.matched.len() == p.policy.sides.len() {
        return String::new();
    }
    let mut parts = Vec::new();
    for s in &p.policy.sides {
        if let SideDecision::AllowAll { policy, rule } = &s.decision {
            parts.push(match (policy, rule) {
                (Some(p), Some(r)) => {
                    format!("{} of {}: L4 allow by {p} {r}", s.direction, s.endpoint)
                }
                _ => format!("{} of {}: no L7 policy", s.direction, s.endpoint),
            });
        }
    }
    if p.policy.sides.is_empty() {
        parts.push("no endpoint of the cluster on either side".into());
    }
    parts.join("; ")
}

/// A local answer to a HEAD request has no body (HTTP/2 would send it as DATA).
fn headless(f: &Facts, resp: Response<Body>) -> Response<Body> {
    if !f.head {
        return resp;
    }
    resp.map(|_| Empty::new().map_err(|never| match never {}).boxed())
}

/// Whether a 101 switches to WebSocket (the only upgrade relayed).
fn switches_to_websocket<B>(resp: &Response<B>) -> bool {
    let mut upgrades = resp.headers().get_all(header::UPGRADE).iter();
    let one = upgrades.next();
    upgrades.next().is_none()
        && one.is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the headers of this hop from a response: the fixed list and whatever
/// `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
}

/// ADD appends, DELETE removes, REPLACE sets, as Cilium's Envoy filter does.
fn apply_actions(h: &mut HeaderMap, actions: &[HeaderAction]) {
    for a in actions {
        match a {
            HeaderAction::Add { name, value } => {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value.as_str()),
                ) {
                    h.append(n, v);
                }
            }
            HeaderAction::Delete { name } => {
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    h.remove(n);
                }
            }
            HeaderAction::Replace { name, value } => {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value.as_str()),
                ) {
                    h.insert(n, v);
                }
            }
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// 403 with Cilium's body.
pub fn denied() -> Response<Body> {
    text(StatusCode::FORBIDDEN, DENIED_BODY)
}

/// gRPC's answer to a denied call: trailers-only, PERMISSION_DENIED.
pub fn grpc_denied() -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    h.insert(
        "grpc-message",
        HeaderValue::from_static("Access denied%0D%0A"),
    );
    r
}

/// The request that opened a tunnel, kept to re-check it when the policy changes.
struct Recheck {
    method: String,
    path: String,
    host: Option<String>,
    headers: HeaderMap,
}

impl Conn {
    /// Whether the request that opened a tunnel is still allowed by the current policy.
    fn still_allowed(&self, r: &Recheck) -> bool {
        let (snap, policy) = self.current_policy();
        let secrets = self.shared.materials.secrets();
        snap.model
            .check_http_with(
                &policy.policy,
                &View {
                    method: &r.method,
                    path: &r.path,
                    host: r.host.as_deref(),
                    headers: &r.headers,
                },
                secrets.as_ref(),
            )
            .allowed
    }
}

/// Copies bytes both ways between an upgraded downstream and upstream connection. A
/// tunnel whose opening request a policy change denies is closed (both sides).
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    watch: Option<(Arc<Conn>, Recheck)>,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let Some((conn, recheck)) = watch else {
        if let Err(e) = copy.await {
            tracing::debug!("upgraded connection ended: {e}");
        }
        return;
    };
    let mut changes = conn.shared.store.subscribe();
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!("upgraded connection ended: {e}");
                }
                return;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    // the store is gone: nothing will change any more
                    let _ = (&mut copy).await;
                    return;
                }
                if !conn.still_allowed(&recheck) {
                    tracing::info!(
                        "{} -> {}: closing upgraded connection, {} {} is no longer allowed",
                        conn.peer, conn.orig_dst, recheck.method, recheck.path
                    );
                    conn.shared.metrics.tunnels_closed.inc();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, F: Fn(A, B) -> Fut, Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn connecting_upstream_is_not_laid_out_in_every_request_future() {
        // A request's future moves whole into its task (per h2 stream) and hyper's
        // dispatcher; the upstream connect paths (TCP, TLS and HTTP handshakes, about
        // 1.4 KB) are boxed so they do not count. Inline they made it 3.7 KB.
        let handle = |c: Arc<Conn>, r: Request<Incoming>| async move { c.handle(r).await };
        let size = future_size(&handle);
        assert!(size < 3_000, "Conn::handle's future is {size} bytes");
    }

    #[test]
    fn response_hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(h.get("x-end-to-end").unwrap(), "1");
    }

    #[test]
    fn header_actions() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-d", HeaderValue::from_static("1"));
        h.insert("x-r", HeaderValue::from_static("wrong"));
        apply_actions(
            &mut h,
            &[
                HeaderAction::Add {
                    name: "X-A".into(),
                    value: "2".into(),
                },
                HeaderAction::Delete { name: "X-D".into() },
                HeaderAction::Replace {
                    name: "X-R".into(),
                    value: "right".into(),
                },
            ],
        );
        let a: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert!(h.get("x-d").is_none());
        assert_eq!(h.get("x-r").unwrap(), "right");
    }
}
