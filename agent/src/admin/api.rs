//! The admin endpoint's responses as types: the server serialises them, and `ward status`
//! and `ward observe` read them back with the same types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::reconcile::endpoints::EndpointStatus as Endpoint;
pub use crate::reconcile::fqdn::Learned as Fqdn;
pub use crate::reconcile::publisher::MapEntries;

/// `GET /v1/status`: a summary of the agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// `files` or `kubernetes`.
    pub source: String,
    /// The first full policy is in the datapath and the local pods found are attached.
    pub ready: bool,
    pub policy_generation: u64,
    pub last_push_ms: f64,
    /// The last datapath update that failed, if any.
    pub last_error: Option<String>,
    pub endpoints: usize,
    pub endpoints_attached: usize,
    /// Policy objects in force.
    pub policies: usize,
    /// Every current policy error (object, field path, reason).
    pub errors: Vec<String>,
    pub fqdn_names: usize,
    pub fqdn_ips: usize,
    /// Datapath drops by reason.
    pub drops: BTreeMap<String, u64>,
    pub map_entries: MapEntries,
    /// Rules whose TLS material is missing or unusable: their connections are reset.
    #[serde(default)]
    pub tls_broken_rules: Vec<BrokenTlsRule>,
}

impl Status {
    /// Ready, no policy errors and no rule with unusable TLS material: what `ward
    /// status` exits 0 on.
    pub fn healthy(&self) -> bool {
        self.ready && self.errors.is_empty() && self.tls_broken_rules.is_empty()
    }
}

/// A rule whose TLS material (`terminatingTLS`, `originatingTLS`) is missing or
/// unusable. The proxy resets the connections it would intercept; other rules, on the
/// same port too, are unaffected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokenTlsRule {
    /// `Kind namespace/name`.
    pub policy: String,
    /// The `toPorts` entry, e.g. `spec.egress[0].toPorts[0]`.
    pub rule: String,
    /// `namespace/name` of the secret at fault, when one is.
    pub secret: Option<String>,
    pub reason: String,
}

/// The event of a rule whose TLS material became unusable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    /// RFC 3339, when the agent found it.
    pub time: String,
    #[serde(flatten)]
    pub rule: BrokenTlsRule,
}

/// An error answer (`{"error": "..."}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Error {
    pub error: String,
}

/// `GET /v1/policy/NS/POD`: a pod's compiled policy, entry by entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodPolicy {
    pub pod: String,
    pub identity: u32,
    pub labels: String,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
    /// The same as readable lines.
    pub text: Vec<String>,
}

/// One direction of a pod's compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionPolicy {
    /// Policies that put the pod in default deny in this direction.
    pub default_deny_by: Vec<String>,
    /// Policies that select the pod in this direction.
    pub selected_by: Vec<String>,
    pub entries: Vec<PolicyEntry>,
}

/// One compiled entry, with the policy and rule it came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// `allow`, `deny` or `pass`.
    pub action: String,
    /// `admin`, `namespace` or `baseline`.
    pub tier: String,
    pub peers: String,
    pub protocol: String,
    pub ports: String,
    /// The L7 rules the proxy applies, as `rule path: rule`.
    pub l7: Vec<String>,
    pub policy: String,
    pub rule: String,
}

/// `GET /v1/events`: one line of the event stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    /// A packet the datapath dropped.
    Drop(Drop),
    /// An HTTP proxy audit record (the proxy's own schema).
    Http(Map<String, Value>),
    /// A DNS proxy audit record (the DNS proxy's own schema).
    Dns(Map<String, Value>),
    /// A rule's TLS material became unusable.
    Tls(TlsMaterial),
    /// A follower fell behind: this many events were not sent to it.
    Lost { events: u64 },
}

/// A datapath drop event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drop {
    /// RFC 3339 with milliseconds, when the agent read it.
    pub time: String,
    pub verdict: String,
    /// The datapath's drop reason (`policy_default_deny`, ...).
    pub reason: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// IP protocol number.
    pub protocol: u8,
    pub source: Peer,
    pub destination: Peer,
    pub ifindex: u32,
    /// The policy map entry's cookie (0 when no entry decided).
    pub cookie: u32,
}

/// One side of a dropped packet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: u32,
    /// `namespace/name` when the IP is a pod's.
    pub pod: Option<String>,
}

impl Event {
    /// The pods the event names (source and destination).
    pub fn pods(&self) -> Vec<&str> {
        match self {
            Event::Drop(d) => [&d.source.pod, &d.destination.pod]
                .into_iter()
                .filter_map(|p| p.as_deref())
                .collect(),
            Event::Http(r) => ["SourceEndpoint", "DestinationEndpoint"]
                .iter()
                .filter_map(|k| r.get(*k)?.get("Pod")?.as_str())
                .collect(),
            Event::Dns(r) => r
                .get("source")
                .and_then(Value::as_str)
                .into_iter()
                .collect(),
            Event::Tls(_) | Event::Lost { .. } => Vec::new(),
        }
    }

    /// The verdict, lower-cased (`denied`, `forwarded`, ...).
    pub fn verdict(&self) -> String {
        match self {
            Event::Drop(d) => d.verdict.to_lowercase(),
            Event::Http(r) => str_of(r, "Verdict").to_lowercase(),
            Event::Dns(r) => str_of(r, "verdict").to_lowercase(),
            Event::Tls(_) => "error".into(),
            Event::Lost { .. } => String::new(),
        }
    }

    /// One readable line.
    pub fn line(&self) -> String {
        match self {
            Event::Drop(d) => {
                let side = |p: &Peer| p.pod.clone().unwrap_or_else(|| p.ip.to_string());
                format!(
                    "{} DROP  {} {}:{} -> {}:{} proto {} ({}, {})",
                    d.time,
                    d.direction,
                    side(&d.source),
                    d.source.port,
                    side(&d.destination),
                    d.destination.port,
                    d.protocol,
                    d.reason,
                    d.verdict,
                )
            }
            Event::Http(r) => http_line(r, &self.verdict()),
            Event::Dns(r) => format!(
                "{} DNS   {} -> {} {} {} {} {}",
                str_of(r, "time"),
                str_of(r, "source"),
                str_of(r, "server"),
                str_of(r, "qname"),
                str_of(r, "qtype"),
                str_of(r, "verdict"),
                str_of(r, "reason"),
            ),
            Event::Tls(t) => format!(
                "{} TLS   {} {}: material unusable ({}), connections reset: {}",
                t.time,
                t.rule.policy,
                t.rule.rule,
                t.rule.secret.as_deref().unwrap_or("no secret"),
                t.rule.reason,
            ),
            Event::Lost { events } => format!("(lost {events} events)"),
        }
    }
}

/// The line of an HTTP proxy record: a request (`https` when an intercepted session's,
/// with its SNI), or a TLS session decided as a whole (spliced or reset, no request).
fn http_line(r: &Map<String, Value>, verdict: &str) -> String {
    let end = |k: &str| {
        let e = r.get(k);
        e.and_then(|e| e.get("Pod")?.as_str())
            .or_else(|| e.and_then(|e| e.get("IP")?.as_str()))
            .unwrap_or("?")
            .to_string()
    };
    let part = |part: &str, k: &str| {
        r.get(part)
            .and_then(|h| h.get(k))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .unwrap_or_default()
    };
    let sni = match part("TLS", "SNI") {
        s if s.is_empty() => "(no SNI)".to_string(),
        s => s,
    };
    let info = match str_of(r, "Info") {
        "" => String::new(),
        i => format!(" ({i})"),
    };
    if r.get("HTTP").is_none() {
        return format!(
            "{} TLS   {} -> {} SNI {} {} {}{info}",
            str_of(r, "Timestamp"),
            end("SourceEndpoint"),
            end("DestinationEndpoint"),
            sni,
            part("TLS", "Mode"),
            verdict,
        );
    }
    let scheme = match part("HTTP", "Scheme") {
        s if s.is_empty() => "http".to_string(),
        s => s,
    };
    let via = if r.get("TLS").is_some() {
        format!(" SNI {sni}")
    } else {
        String::new()
    };
    format!(
        "{} HTTP  {} -> {} {} {}://{}{} -> {} {}{via}",
        str_of(r, "Timestamp"),
        end("SourceEndpoint"),
        end("DestinationEndpoint"),
        part("HTTP", "Method"),
        scheme,
        part("HTTP", "Host"),
        part("HTTP", "Path"),
        part("HTTP", "Code"),
        verdict,
    )
}

fn str_of<'a>(r: &'a Map<String, Value>, k: &str) -> &'a str {
    r.get(k).and_then(Value::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    fn event(v: Value) -> Event {
        serde_json::from_value(v).unwrap()
    }

    /// `ward observe` lines of the HTTP proxy's records (its `HTTP` and `TLS` parts):
    /// a plaintext request, a request of an intercepted session, a TLS session decided
    /// as a whole, and a rule whose TLS material broke.
    #[test]
    fn observe_lines_of_http_and_tls_records() {
        let ends = json!({"IP": "10.0.0.1", "Pod": "app/client"});
        let server = json!({"IP": "203.0.113.10", "Port": 443});
        let plain = event(
            json!({"type": "http", "Timestamp": "T", "Verdict": "Forwarded",
            "SourceEndpoint": ends, "DestinationEndpoint": server,
            "HTTP": {"Code": 200, "Method": "GET", "Host": "web", "Path": "/v1/x"}}),
        );
        assert_eq!(
            plain.line(),
            "T HTTP  app/client -> 203.0.113.10 GET http://web/v1/x -> 200 forwarded"
        );
        let https = event(
            json!({"type": "http", "Timestamp": "T", "Verdict": "Denied",
            "SourceEndpoint": ends, "DestinationEndpoint": server,
            "HTTP": {"Code": 403, "Scheme": "https", "Method": "DELETE",
                     "Host": "api.payments.example", "Path": "/v1/charges/1"},
            "TLS": {"SNI": "api.payments.example", "Mode": "intercept"}}),
        );
        assert_eq!(
            https.line(),
            "T HTTP  app/client -> 203.0.113.10 DELETE https://api.payments.example/v1/charges/1 -> 403 denied SNI api.payments.example"
        );
        let reset = event(
            json!({"type": "http", "Timestamp": "T", "Verdict": "Denied",
            "SourceEndpoint": ends, "DestinationEndpoint": server,
            "TLS": {"SNI": "evil.example", "Mode": "reset"}, "Info": "no rule admits SNI evil.example"}),
        );
        assert_eq!(
            reset.line(),
            "T TLS   app/client -> 203.0.113.10 SNI evil.example reset denied (no rule admits SNI evil.example)"
        );
        assert_eq!(reset.pods(), ["app/client"]);
        let spliced = event(
            json!({"type": "http", "Timestamp": "T", "Verdict": "Forwarded",
            "SourceEndpoint": ends, "DestinationEndpoint": server, "TLS": {"Mode": "splice"}}),
        );
        assert!(
            spliced.line().ends_with("SNI (no SNI) splice forwarded"),
            "{}",
            spliced.line()
        );
        let broken = event(json!({"type": "tls", "time": "T",
            "policy": "CiliumNetworkPolicy app/p", "rule": "spec.egress[0].toPorts[0]",
            "secret": "app/ca", "reason": "secret app/ca not found"}));
        assert_eq!(
            broken.line(),
            "T TLS   CiliumNetworkPolicy app/p spec.egress[0].toPorts[0]: material unusable (app/ca), connections reset: secret app/ca not found"
        );
        assert_eq!(broken.verdict(), "error");
        assert_eq!(
            serde_json::to_value(&broken).unwrap()["type"],
            "tls",
            "the event stream's type field"
        );
    }

    /// A rule with unusable TLS material makes the agent unhealthy (`ward status` exits
    /// 1), and a status without the field (an older agent) reads as none.
    #[test]
    fn broken_tls_material_is_unhealthy() {
        let mut s = Status {
            ready: true,
            ..Status::default()
        };
        assert!(s.healthy());
        s.tls_broken_rules.push(BrokenTlsRule {
            policy: "CiliumNetworkPolicy app/p".into(),
            rule: "spec.egress[0].toPorts[0]".into(),
            secret: Some("app/ca".into()),
            reason: "secret app/ca not found".into(),
        });
        assert!(!s.healthy());
        let mut old = serde_json::to_value(Status::default()).unwrap();
        old.as_object_mut().unwrap().remove("tls_broken_rules");
        let read: Status = serde_json::from_value(old).unwrap();
        assert!(read.tls_broken_rules.is_empty());
    }
}
