//! The admin HTTP endpoint: health, readiness, metrics, and the agent's view of its
//! endpoints, policies, learned names and events.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 once the first full policy is in the datapath, 503 before.
//! - `GET /metrics`: agent, HTTP proxy and DNS proxy metrics on one page.
//! - `GET /v1/status`: a summary (what `ward status` prints).
//! - `GET /v1/endpoints`: local endpoints with ids, identities and interfaces.
//! - `GET /v1/policy/NS/POD`: the compiled policy of a pod, entry by entry, each with the
//!   policy and field path it came from.
//! - `GET /v1/fqdn`: names and IPs learned from DNS, per endpoint.
//! - `GET /v1/events`: NDJSON of drop events and audit records: the recent ones, then
//!   new ones as they happen (`?follow=false`: only the recent ones).
//!
//! - `GET /ui/`: the web view ([`ui`]).
//!
//! With a token ([`auth`]), everything but `/healthz`, `/readyz` and `/metrics` needs it.
//!
//! The responses are the types of [`api`]; [`client`] reads them back.

pub mod api;
pub mod auth;
pub mod client;
pub mod ui;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use policy_model::compile::{EndpointPolicy, PortMatch};
use policy_model::l7::L7Rules;
use policy_model::policy::{Action, Tier};
use policy_model::{Direction, Model};
use prometheus::Registry;
use proxy::metrics::{serve_endpoint, EndpointLimits, EndpointMetrics};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};

use crate::reconcile::drops::DropCounts;
use crate::reconcile::publisher::PolicyStatus;
use crate::telemetry::events::Events;
use crate::telemetry::metrics::render;

type RespBody = BoxBody<Bytes, Infallible>;

/// What the handlers read.
#[derive(Clone)]
pub struct Admin {
    pub node: String,
    /// The source's name (`files`, `kubernetes`).
    pub source: &'static str,
    /// The policy publisher's status.
    pub policy: watch::Receiver<PolicyStatus>,
    /// The drop reader's counters.
    pub drops: watch::Receiver<DropCounts>,
    /// The rules whose TLS material is unusable (`secrets::broken`).
    pub tls: watch::Receiver<Vec<api::BrokenTlsRule>>,
    pub registries: Vec<Registry>,
    pub events: Events,
    /// The token `/v1/*` and `/ui/*` need (`--admin-token-file`); None: open.
    pub token: Option<auth::Token>,
}

impl Admin {
    /// Serves until the task is dropped, within the default [`EndpointLimits`]
    /// (connection cap, header and idle timeout, accept errors followed by a pause).
    pub async fn serve(self, listener: TcpListener, metrics: EndpointMetrics) {
        serve_endpoint(
            listener,
            EndpointLimits::default(),
            metrics,
            move |req: Request<Incoming>| self.handle(&req),
        )
        .await;
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<RespBody> {
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        match auth::check(self.token.as_ref(), path, query, req.headers()) {
            auth::Access::Granted => {}
            auth::Access::Denied => return unauthorized(),
            auth::Access::Login { location } => match &self.token {
                Some(t) => return login(&location, t),
                None => return unauthorized(),
            },
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                if self.policy.borrow().ready {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
                }
            }
            "/metrics" => {
                let regs: Vec<&Registry> = self.registries.iter().collect();
                text(StatusCode::OK, render(&regs))
            }
            "/v1/status" => json_resp(StatusCode::OK, &self.status()),
            "/v1/endpoints" => json_resp(StatusCode::OK, &self.policy.borrow().endpoints),
            "/v1/fqdn" => json_resp(StatusCode::OK, &self.policy.borrow().learned),
            "/v1/events" => self.events(!query.split('&').any(|kv| kv == "follow=false")),
            "/v1/show" => self.show(query),
            "/ui" => redirect("/ui/"),
            p if p.starts_with("/ui/") => match ui::asset(&p["/ui/".len()..]) {
                Some(a) => static_file(a),
                None => text(StatusCode::NOT_FOUND, "not found\n".into()),
            },
            p if p.starts_with("/v1/policy/") => {
                let pod = p.trim_start_matches("/v1/policy/");
                let model = self.policy.borrow().model.clone();
                match model {
                    None => unavailable(),
                    Some(m) => match m.pod_endpoint(pod) {
                        Some(ep) => json_resp(StatusCode::OK, &explain(&m, ep)),
                        // this node's model compiles its own pods only
                        None if m.cluster.pods.iter().any(|p| p.id() == pod) => json_resp(
                            StatusCode::NOT_FOUND,
                            &api::Error {
                                error: format!(
                                    "pod {pod} is not on node {}: ask its node's agent, or \
                                     `ward policy trace` for the whole cluster",
                                    self.node
                                ),
                            },
                        ),
                        None => json_resp(
                            StatusCode::NOT_FOUND,
                            &api::Error {
                                error: format!(
                                    "no pod {pod} in the cluster (expected NAMESPACE/POD)"
                                ),
                            },
                        ),
                    },
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// The summary of `/v1/status`.
    pub fn status(&self) -> api::Status {
        let s = self.policy.borrow();
        api::Status {
            node: self.node.clone(),
            source: self.source.into(),
            ready: s.ready,
            policy_generation: s.generation,
            last_push_ms: s.last_push_ms,
            last_error: s.last_error.clone(),
            endpoints: s.endpoints.len(),
            endpoints_attached: s.endpoints.iter().filter(|e| e.attached).count(),
            policies: s.policies,
            errors: s.errors.iter().map(ToString::to_string).collect(),
            fqdn_names: s.learned.values().map(|n| n.len()).sum(),
            fqdn_ips: s
                .learned
                .values()
                .flat_map(|n| n.values())
                .map(|i| i.len())
                .sum(),
            drops: self
                .drops
                .borrow()
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            map_entries: s.map_entries,
            tls_broken_rules: self.tls.borrow().clone(),
        }
    }

    /// `GET /v1/show?pod=NS/POD` or `?namespace=NS&selector=SEL` (each optional): what
    /// the policies say about the selected pods (`ward policy show --admin`).
    fn show(&self, query: &str) -> Response<RespBody> {
        let mut sel = policy_model::show::Selection::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "pod" => sel.pod = Some(v.into_owned()),
                "namespace" => sel.namespace = Some(v.into_owned()),
                "selector" => match policy_model::show::LabelQuery::parse(&v) {
                    Ok(q) => sel.labels = q,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("unknown parameter {other:?} (pod, namespace, selector)"),
                    )
                }
            }
        }
        let model = self.policy.borrow().model.clone();
        match model.map(|m| m.show_selection(&sel)) {
            None => unavailable(),
            Some(Ok(views)) => json_resp(StatusCode::OK, &views),
            Some(Err(e)) => error(StatusCode::NOT_FOUND, e.to_string()),
        }
    }

    fn events(&self, follow: bool) -> Response<RespBody> {
        // Subscribe before reading the recent ones, so nothing falls between them.
        let mut sub = self.events.subscribe();
        let recent = self.events.recent();
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        tokio::spawn(async move {
            for l in recent {
                if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            let mark = serde_json::to_string(&api::Event::CaughtUp).unwrap_or_default();
            if tx.send(Bytes::from(format!("{mark}\n"))).await.is_err() {
                return;
            }
            loop {
                match sub.recv().await {
                    Ok(l) => {
                        if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let note = serde_json::to_string(&api::Event::Lost { events: n })
                            .unwrap_or_default();
                        if tx.send(Bytes::from(format!("{note}\n"))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }
}

/// A response body fed by a channel (the event stream).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn text(code: StatusCode, body: String) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn json_resp(code: StatusCode, v: &impl Serialize) -> Response<RespBody> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A file of the web view, kept to this origin (no inline script, no other source).
fn static_file(a: ui::Asset) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(a.body)).boxed());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(a.content_type),
    );
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static("default-src 'self'"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    r
}

fn redirect(to: &'static str) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    r.headers_mut()
        .insert(http::header::LOCATION, http::HeaderValue::from_static(to));
    r
}

/// 401: the token is missing or wrong.
fn unauthorized() -> Response<RespBody> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "this admin endpoint wants its token (Authorization: Bearer, see --admin-token-file)\n"
            .into(),
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    r
}

/// 303 to `location` with the token's cookie: a browser's first visit to `/ui/?token=`.
fn login(location: &str, token: &auth::Token) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SEE_OTHER;
    // both are built from checked characters (a path, a urlencoded query, a token68)
    if let (Ok(loc), Ok(cookie)) = (
        http::HeaderValue::from_str(location),
        http::HeaderValue::from_str(&auth::set_cookie(token)),
    ) {
        r.headers_mut().insert(http::header::LOCATION, loc);
        r.headers_mut().insert(http::header::SET_COOKIE, cookie);
        r
    } else {
        text(StatusCode::BAD_REQUEST, "bad path\n".into())
    }
}

fn error(code: StatusCode, error: String) -> Response<RespBody> {
    json_resp(code, &api::Error { error })
}

fn unavailable() -> Response<RespBody> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "no policy compiled yet\n".into(),
    )
}

/// A pod's compiled policy, entry by entry, each naming its policy and rule, plus the
/// same as readable lines.
pub fn explain(model: &Model, ep: &EndpointPolicy) -> api::PodPolicy {
    let identity = model.identities.get(ep.identity);
    let mut lines = vec![format!(
        "{} (identity {}, labels {})",
        ep.name, identity.id, identity.labels
    )];
    let mut dirs: [api::DirectionPolicy; 2] = Default::default();
    for dir in Direction::BOTH {
        let d = &ep.dirs[dir.index()];
        let name = |i: &u32| {
            model
                .policies
                .get(*i as usize)
                .map(|p| p.object.to_string())
                .unwrap_or_default()
        };
        let default_deny: Vec<String> = d.default_deny.iter().map(name).collect();
        let selected_by: Vec<String> = d.selected_by.iter().map(name).collect();
        if selected_by.is_empty() {
            lines.push(format!("  {dir}: no policy selects it: everything allowed"));
        } else if default_deny.is_empty() {
            lines.push(format!(
                "  {dir}: selected by {}; no default deny",
                selected_by.join(", ")
            ));
        } else {
            lines.push(format!(
                "  {dir}: default deny (by {}); allowed only what the entries below allow",
                default_deny.join(", ")
            ));
        }
        let mut entries = Vec::new();
        for e in &d.entries {
            let policy = model.policies.get(e.origin.policy as usize);
            let rule_path = policy
                .and_then(|p| p.rules.get(e.origin.rule as usize))
                .map(|r| match e.origin.port_rule {
                    Some(g) => r
                        .ports
                        .get(g as usize)
                        .map_or(r.path.clone(), |g| g.path.clone()),
                    None => r.path.clone(),
                })
                .unwrap_or_default();
            let policy = policy.map(|p| p.object.to_string()).unwrap_or_default();
            let protocol = e.protocol.map_or("any".to_string(), |p| p.to_string());
            let ports = match &e.port {
                PortMatch::Range(0, u16::MAX) => "*".to_string(),
                PortMatch::Range(a, b) if a == b => a.to_string(),
                PortMatch::Range(a, b) => format!("{a}-{b}"),
                PortMatch::Named(n) => n.clone(),
            };
            let action = match e.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
                Action::Pass => "pass",
            };
            let tier = match e.tier {
                Tier::Admin => "admin",
                Tier::Calico => "calico",
                Tier::Namespace => "namespace",
                Tier::Baseline => "baseline",
            };
            let l7: Vec<String> =
                e.l7.and_then(|id| model.l7.get(id as usize))
                    .map(|set| {
                        let n = match &set.rules {
                            L7Rules::Http(r) => r.len(),
                            L7Rules::Dns(p) => p.len(),
                        };
                        (0..n)
                            .map(|i| format!("{}: {}", set.rule_path(i), set.describe_rule(i)))
                            .collect()
                    })
                    .unwrap_or_default();
            let peers = model.describe_peers(e.peers);
            lines.push(format!(
                "    {action} {peers} {protocol}/{ports}{}  ({tier} tier, {policy} {rule_path})",
                if l7.is_empty() {
                    String::new()
                } else {
                    format!(" via proxy: {}", l7.join("; "))
                }
            ));
            entries.push(api::PolicyEntry {
                action: action.into(),
                tier: tier.into(),
                peers,
                protocol,
                ports,
                l7,
                policy,
                rule: rule_path,
            });
        }
        dirs[dir.index()] = api::DirectionPolicy {
            default_deny_by: default_deny,
            selected_by,
            entries,
        };
    }
    // indexed by `Direction::index`: ingress, egress
    let [ingress, egress] = dirs;
    api::PodPolicy {
        pod: ep.name.clone(),
        identity: identity.id,
        labels: identity.labels.to_string(),
        ingress,
        egress,
        text: lines,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::client::Client;
    use super::*;
    use crate::datapath::{FakeDatapath, Shared};
    use crate::reconcile::drops::{DropCounters, EventReader};
    use crate::reconcile::Published;
    use crate::telemetry::metrics::AgentMetrics;
    use redirect_bpf::common::{drop_reason, DropEvent, DIR_INGRESS};

    /// The admin endpoint on a free port, with the drop readers over a fake datapath.
    #[tokio::test]
    async fn status_and_events_reach_the_client_as_the_server_typed_them() {
        // node n1's model: web is its pod, api another node's
        let cluster: policy_model::Cluster = serde_yaml::from_str(
            "namespaces: [{name: app}]\nnodes: [{name: n1, ip: 172.18.0.2}, {name: n2, ip: 172.18.0.3}]\npods: [{namespace: app, name: web, ip: 10.80.2.2, node: n1}, {namespace: app, name: api, ip: 10.80.1.2, node: n2}]\n",
        )
        .unwrap();
        let model = Arc::new(Model::compile_scoped(
            &cluster,
            vec![],
            Default::default(),
            policy_model::compile::Scope::Node("n1".into()),
        ));
        let (_policy_tx, policy) = watch::channel(PolicyStatus {
            ready: true,
            generation: 3,
            model: Some(model.clone()),
            ..PolicyStatus::default()
        });
        let (_published_tx, published) = watch::channel(Some(Published {
            model,
            generation: 3,
            pushes: 1,
        }));
        let (drops_tx, drops) = watch::channel(DropCounts::new());
        let events = Events::new();
        let metrics = AgentMetrics::new().unwrap();
        let dp = Shared::new(FakeDatapath::new());
        let ring = dp.lock().take_drop_events();
        {
            let mut d = dp.lock();
            d.drop_counts.insert(drop_reason::POLICY_DEFAULT_DENY, 4);
            d.record_drop(DropEvent {
                reason: drop_reason::POLICY_DEFAULT_DENY,
                saddr: [10, 80, 1, 2],
                daddr: [10, 80, 2, 2],
                dport: 8081u16.to_be_bytes(),
                protocol: 6,
                direction: DIR_INGRESS,
                family: 4,
                ..DropEvent::default()
            });
        }
        let audit = crate::telemetry::audit::start(
            64,
            crate::telemetry::audit::AuditSink::None,
            events.clone(),
            audit::DroppedCounter::new(),
        );
        let event_reader = EventReader::new(Box::new(ring), audit, published.clone());
        let reading = tokio::spawn(event_reader.run());
        // the reader moves the recorded event to the stream
        tokio::time::timeout(Duration::from_secs(5), async {
            while events.recent().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the drop event read from the ring buffer");
        reading.abort();
        let mut counters = DropCounters::new(dp.clone(), metrics.clone(), published, drops_tx);
        counters.read();
        dp.lock()
            .drop_counts
            .insert(drop_reason::POLICY_DEFAULT_DENY, 6);
        counters.read();
        let counted = metrics
            .drops
            .with_label_values(&["policy_default_deny"])
            .get();
        assert_eq!(counted, 6, "the kernel's count, added by deltas");

        let admin = Admin {
            node: "n1".into(),
            source: "files",
            policy,
            drops,
            tls: watch::channel(Vec::new()).1,
            registries: vec![metrics.registry.clone()],
            events,
            token: None,
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(l.local_addr().unwrap());
        let endpoint = EndpointMetrics::register(&metrics.registry, "admin").unwrap();
        tokio::spawn(admin.serve(l, endpoint));

        let s = client.status().await.unwrap();
        assert!(s.ready && s.healthy());
        assert_eq!((s.node.as_str(), s.policy_generation), ("n1", 3));
        assert_eq!(s.drops.get("policy_default_deny"), Some(&6));

        let mut stream = client.events(false).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .expect("the drop event");
        let api::Event::Drop(d) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(d.destination.pod.as_deref(), Some("app/web"));
        assert_eq!(
            d.source.pod.as_deref(),
            Some("app/api"),
            "a remote pod named"
        );
        assert_eq!(d.destination.port, 8081);
        assert_eq!(d.reason, "policy_default_deny");
        assert_eq!(e.pods(), vec!["app/api", "app/web"]);
        assert!(
            e.line().contains("DROP  ingress app/api:0 -> app/web:8081"),
            "{}",
            e.line()
        );
        assert!(stream.next().await.unwrap().is_none(), "follow=false ends");
        // following: the recent events, then the mark that what follows is new
        let mut stream = client.events(true).await.unwrap();
        let first = stream.next().await.unwrap().expect("the drop event");
        assert!(matches!(first, api::Event::Drop(_)), "{first:?}");
        let mark = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mark, Some(api::Event::CaughtUp));

        let missing = client
            .get_json::<api::PodPolicy>("/v1/policy/app/nope")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("404") && missing.contains("app/nope"),
            "{missing}"
        );
        let remote = client
            .get_json::<api::PodPolicy>("/v1/policy/app/api")
            .await
            .unwrap_err()
            .to_string();
        assert!(remote.contains("not on node n1"), "{remote}");
        let pod: api::PodPolicy = client.get_json("/v1/policy/app/web").await.unwrap();
        assert_eq!(pod.pod, "app/web");
        let shown: Vec<policy_model::show::EndpointView> = client
            .get_json("/v1/show?namespace=app&selector=")
            .await
            .unwrap();
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].endpoint, "app/web");
        assert!(!shown[0].ingress.isolated, "no policy: {shown:?}");
        let bad = client
            .get_json::<Vec<policy_model::show::EndpointView>>("/v1/show?selector=a%20b%3Dc")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("400") && bad.contains("not a label key"),
            "{bad}"
        );
        let missing = client
            .get_json::<Vec<policy_model::show::EndpointView>>("/v1/show?pod=app%2Fnope")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("404") && missing.contains("no pod app/nope"),
            "{missing}"
        );
    }

    /// One raw HTTP/1.0 GET with `headers`: the status line and headers, and the body.
    async fn raw_get(addr: std::net::SocketAddr, path: &str, headers: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: a\r\n{headers}\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.to_lowercase(), body.to_string())
    }

    /// The token on a real listener: probes and metrics open, the rest refused without
    /// it, served with the Bearer header or the cookie, the browser's first visit turned
    /// into the cookie; the client says what is missing instead of a parse error.
    #[tokio::test]
    async fn a_token_guards_flows_and_policies_but_not_probes_or_metrics() {
        let metrics = AgentMetrics::new().unwrap();
        let admin = Admin {
            node: "n1".into(),
            source: "files",
            policy: watch::channel(PolicyStatus::default()).1,
            drops: watch::channel(DropCounts::new()).1,
            tls: watch::channel(Vec::new()).1,
            registries: vec![metrics.registry.clone()],
            events: Events::new(),
            token: Some(auth::Token::parse("s3cret").unwrap()),
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let endpoint = EndpointMetrics::register(&metrics.registry, "admin").unwrap();
        tokio::spawn(admin.serve(l, endpoint));

        for p in ["/healthz", "/metrics"] {
            assert!(
                raw_get(addr, p, "").await.0.starts_with("http/1.0 200"),
                "{p}"
            );
        }
        assert!(raw_get(addr, "/readyz", "")
            .await
            .0
            .starts_with("http/1.0 503"));
        for p in [
            "/v1/status",
            "/v1/events?follow=false",
            "/ui/",
            "/ui",
            "/ui/app.js",
        ] {
            let (head, body) = raw_get(addr, p, "").await;
            assert!(head.starts_with("http/1.0 401"), "{p}: {head}");
            assert!(head.contains("www-authenticate: bearer"), "{p}: {head}");
            assert!(body.contains("wants its token"), "{p}: {body}");
        }
        let wrong = raw_get(addr, "/v1/status", "Authorization: Bearer s3cre\r\n").await;
        assert!(wrong.0.starts_with("http/1.0 401"), "{wrong:?}");
        let bearer = raw_get(addr, "/v1/status", "Authorization: Bearer s3cret\r\n").await;
        assert!(bearer.0.starts_with("http/1.0 200"), "{bearer:?}");
        let cookie = raw_get(addr, "/ui/", "Cookie: ward_admin_token=s3cret\r\n").await;
        assert!(
            cookie.0.starts_with("http/1.0 200") && cookie.1.contains("<html"),
            "{cookie:?}"
        );

        let (head, _) = raw_get(addr, "/ui/?token=s3cret&pod=app%2Fweb", "").await;
        assert!(head.starts_with("http/1.0 303"), "{head}");
        assert!(
            head.contains("\r\nlocation: /ui/?pod=app%2fweb\r\n"),
            "{head}"
        );
        assert!(
            head.contains(
                "\r\nset-cookie: ward_admin_token=s3cret; path=/; httponly; samesite=strict"
            ),
            "{head}"
        );
        let (head, _) = raw_get(addr, "/ui/?token=nope", "").await;
        assert!(
            head.starts_with("http/1.0 401") && !head.contains("set-cookie"),
            "{head}"
        );

        let e = Client::new(addr).status().await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the agent at {addr} wants a token: --admin-token-file (or WARD_ADMIN_TOKEN_FILE)"
            )
        );
        let e = Client::new(addr)
            .with_token(Some(auth::Token::parse("other").unwrap()))
            .status()
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused the token"), "{e}");
        let s = Client::new(addr)
            .with_token(Some(auth::Token::parse("s3cret").unwrap()))
            .status()
            .await
            .unwrap();
        assert_eq!(s.node, "n1");
    }
}
