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
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use super::events::Events;
use super::metrics::render;
use super::reconcile::SharedStatus;

type RespBody = BoxBody<Bytes, Infallible>;

/// What the handlers read.
#[derive(Clone)]
pub struct Admin {
    pub status: SharedStatus,
    pub registries: Vec<Registry>,
    pub events: Events,
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
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                if self.status.read().is_ok_and(|s| s.ready) {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
                }
            }
            "/metrics" => {
                let regs: Vec<&Registry> = self.registries.iter().collect();
                text(StatusCode::OK, render(&regs))
            }
            "/v1/status" => self.status(),
            "/v1/endpoints" => match self.status.read() {
                Ok(s) => json_resp(StatusCode::OK, &json!(s.endpoints)),
                Err(_) => unavailable(),
            },
            "/v1/fqdn" => match self.status.read() {
                Ok(s) => json_resp(StatusCode::OK, &json!(s.learned)),
                Err(_) => unavailable(),
            },
            "/v1/events" => self.events(!query.split('&').any(|kv| kv == "follow=false")),
            p if p.starts_with("/v1/policy/") => {
                let pod = p.trim_start_matches("/v1/policy/");
                let model = self.status.read().ok().and_then(|s| s.model.clone());
                match model {
                    None => unavailable(),
                    Some(m) => match m.pod_endpoint(pod) {
                        Some(ep) => json_resp(StatusCode::OK, &explain(&m, ep)),
                        None => json_resp(
                            StatusCode::NOT_FOUND,
                            &json!({"error": format!("no pod {pod} in the cluster (expected NAMESPACE/POD)")}),
                        ),
                    },
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    fn status(&self) -> Response<RespBody> {
        let Ok(s) = self.status.read() else {
            return unavailable();
        };
        let attached = s.endpoints.iter().filter(|e| e.attached).count();
        let v = json!({
            "node": s.node,
            "source": s.source,
            "ready": s.ready,
            "policy_generation": s.pushes,
            "last_push_ms": s.last_push_ms,
            "last_error": s.last_error,
            "endpoints": s.endpoints.len(),
            "endpoints_attached": attached,
            "policies": s.policies,
            "errors": s.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "fqdn_names": s.learned.values().map(|n| n.len()).sum::<usize>(),
            "fqdn_ips": s.learned.values().flat_map(|n| n.values()).map(|i| i.len()).sum::<usize>(),
            "drops": s.drops,
            "map_entries": {"ipcache": s.map_entries.0, "endpoints": s.map_entries.1, "policy": s.map_entries.2},
        });
        json_resp(StatusCode::OK, &v)
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
            loop {
                match sub.recv().await {
                    Ok(l) => {
                        if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let note = format!("{{\"type\":\"lost\",\"events\":{n}}}\n");
                        if tx.send(Bytes::from(note)).await.is_err() {
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

fn json_resp(code: StatusCode, v: &Value) -> Response<RespBody> {
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

fn unavailable() -> Response<RespBody> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "no policy compiled yet\n".into(),
    )
}

/// A pod's compiled policy, entry by entry, each naming its policy and rule, plus the
/// same as readable lines.
pub fn explain(model: &Model, ep: &EndpointPolicy) -> Value {
    let identity = model.identities.get(ep.identity);
    let mut lines = vec![format!(
        "{} (identity {}, labels {})",
        ep.name, identity.id, identity.labels
    )];
    let mut dirs = serde_json::Map::new();
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
            entries.push(json!({
                "action": action,
                "tier": tier,
                "peers": peers,
                "protocol": protocol,
                "ports": ports,
                "l7": l7,
                "policy": policy,
                "rule": rule_path,
            }));
        }
        dirs.insert(
            dir.to_string().to_lowercase(),
            json!({
                "default_deny_by": default_deny,
                "selected_by": selected_by,
                "entries": entries,
            }),
        );
    }
    json!({
        "pod": ep.name,
        "identity": identity.id,
        "labels": identity.labels.to_string(),
        "ingress": dirs.remove("ingress"),
        "egress": dirs.remove("egress"),
        "text": lines,
    })
}
