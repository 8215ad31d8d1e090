//! The admin endpoint's responses as types: the server serialises them, and `ward status`
//! and `ward observe` read them back with the same types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// `GET /v1/events`: one line of the event stream: an audit event (see the `audit`
/// crate; the same line as in the audit log), a rule whose TLS material broke, or a
/// note that a follower fell behind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    /// A packet the datapath dropped.
    Drop(Drop),
    /// An HTTP proxy audit record.
    Http(audit::http::Record),
    /// A DNS proxy audit record.
    Dns(audit::dns::Record),
    /// A rule's TLS material became unusable.
    Tls(TlsMaterial),
    /// A follower fell behind: this many events were not sent to it.
    Lost { events: u64 },
    /// A follower has been sent every recent event; what follows happens from now on.
    /// (Clients that do not know it skip the line.)
    #[serde(rename = "caught_up")]
    CaughtUp,
}

pub use audit::drop::{Peer, Record as Drop};

impl From<audit::AuditEvent> for Event {
    fn from(e: audit::AuditEvent) -> Event {
        match e {
            audit::AuditEvent::Http(r) => Event::Http(r),
            audit::AuditEvent::Dns(r) => Event::Dns(r),
            audit::AuditEvent::Drop(r) => Event::Drop(r),
        }
    }
}

impl Event {
    /// The pods the event names (source and destination).
    pub fn pods(&self) -> Vec<&str> {
        match self {
            Event::Drop(d) => [&d.source.pod, &d.destination.pod]
                .into_iter()
                .filter_map(|p| p.as_deref())
                .collect(),
            Event::Http(r) => [&r.source_endpoint.pod, &r.destination_endpoint.pod]
                .into_iter()
                .filter_map(|p| p.as_deref())
                .collect(),
            Event::Dns(r) => match &r.source {
                audit::dns::Source::Endpoint(p) => vec![p.as_str()],
                audit::dns::Source::Address(_) => Vec::new(),
            },
            Event::Tls(_) | Event::Lost { .. } | Event::CaughtUp => Vec::new(),
        }
    }

    /// The verdict, lower-cased (`denied`, `forwarded`, ...).
    pub fn verdict(&self) -> String {
        match self {
            Event::Drop(d) => d.verdict.to_lowercase(),
            Event::Http(r) => r.verdict.as_str().into(),
            Event::Dns(r) => r.verdict.as_str().into(),
            Event::Tls(_) => "error".into(),
            Event::Lost { .. } | Event::CaughtUp => String::new(),
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
                audit::dns::rfc3339(
                    r.time
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                ),
                r.source,
                r.server,
                r.qname,
                r.qtype,
                self.verdict(),
                r.reason,
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
            Event::CaughtUp => "(caught up; following)".into(),
        }
    }
}

/// The line of an HTTP proxy record: a request (`https` with its SNI when an
/// intercepted session's), or a TLS session decided as a whole (spliced or reset).
fn http_line(r: &audit::http::Record, verdict: &str) -> String {
    let side = |e: &audit::http::Endpoint| e.pod.clone().unwrap_or_else(|| e.ip.clone());
    let sni = r
        .tls
        .as_ref()
        .and_then(|t| t.sni.as_deref())
        .unwrap_or("(no SNI)");
    let info = if r.info.is_empty() {
        String::new()
    } else {
        format!(" ({})", r.info)
    };
    let Some(h) = &r.http else {
        return format!(
            "{} TLS   {} -> {} SNI {sni} {} {verdict}{info}",
            r.timestamp,
            side(&r.source_endpoint),
            side(&r.destination_endpoint),
            r.tls.as_ref().map_or("", |t| &t.mode),
        );
    };
    let via = if r.tls.is_some() {
        format!(" SNI {sni}")
    } else {
        String::new()
    };
    format!(
        "{} HTTP  {} -> {} {} {}://{}{} -> {} {verdict}{via}",
        r.timestamp,
        side(&r.source_endpoint),
        side(&r.destination_endpoint),
        h.method,
        h.scheme,
        h.host,
        h.path,
        h.code,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_line() -> String {
        concat!(
            r#"{"type":"http","Timestamp":"2026-12-07T04:00:00.000000001Z","ObservationPoint":"Ingress","#,
            r#""Verdict":"Denied","SourceEndpoint":{"IP":"10.0.0.1","Port":40000,"Identity":9,"Pod":"app/client"},"#,
            r#""DestinationEndpoint":{"IP":"10.0.0.2","Port":80,"Identity":10},"#,
            r#""HTTP":{"Code":403,"Scheme":"http","Method":"DELETE","Host":"web","Path":"/admin","Protocol":"HTTP/1.1"},"#,
            r#""LatencyNs":5,"PolicyGeneration":2,"Info":"no rule matches"}"#
        )
        .to_string()
    }

    #[test]
    fn an_http_audit_line_reads_as_an_event_with_its_request() {
        let e: Event = serde_json::from_str(&http_line()).unwrap();
        assert_eq!(e.pods(), vec!["app/client"]);
        assert_eq!(e.verdict(), "denied");
        assert_eq!(
            e.line(),
            "2026-12-07T04:00:00.000000001Z HTTP  app/client -> 10.0.0.2 DELETE http://web/admin -> 403 denied"
        );
    }

    #[test]
    fn a_dns_audit_line_reads_as_an_event() {
        let line = concat!(
            r#"{"type":"dns","time":"2026-12-07T04:00:00.000001Z","source":"app/client","#,
            r#""client":"10.0.0.1:5353","server":"10.96.0.10:53","transport":"udp","#,
            r#""qname":"evil.example.","qtype":"A","verdict":"denied","rcode":"Refused","#,
            r#""reason":"no DNS rule matches","latency_us":3}"#
        );
        let e: Event = serde_json::from_str(line).unwrap();
        assert_eq!(e.pods(), vec!["app/client"]);
        assert_eq!(
            e.line(),
            "2026-12-07T04:00:00.000001Z DNS   app/client -> 10.96.0.10:53 evil.example. A denied no DNS rule matches"
        );
    }

    fn event(v: serde_json::Value) -> Event {
        serde_json::from_value(v).unwrap()
    }

    /// `ward observe` lines of the HTTP proxy's TLS records: a request of an
    /// intercepted session, sessions decided as a whole, and a rule whose TLS material
    /// broke.
    #[test]
    fn observe_lines_of_tls_records() {
        use serde_json::json;
        let client = json!({"IP": "10.0.0.1", "Port": 40000, "Identity": 9, "Pod": "app/client"});
        let server = json!({"IP": "203.0.113.10", "Port": 443, "Identity": 16777217});
        let record = |extra: serde_json::Value| {
            let mut v = json!({"type": "http", "Timestamp": "T", "ObservationPoint": "Egress",
                "Verdict": "Denied", "SourceEndpoint": client, "DestinationEndpoint": server,
                "LatencyNs": 5, "PolicyGeneration": 2});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            event(v)
        };
        let https = record(json!({
            "HTTP": {"Code": 403, "Scheme": "https", "Method": "DELETE",
                     "Host": "api.payments.example", "Path": "/v1/charges/1", "Protocol": "HTTP/2"},
            "TLS": {"SNI": "api.payments.example", "Mode": "intercept"}}));
        assert_eq!(
            https.line(),
            "T HTTP  app/client -> 203.0.113.10 DELETE https://api.payments.example/v1/charges/1 -> 403 denied SNI api.payments.example"
        );
        let reset = record(json!({"TLS": {"SNI": "evil.example", "Mode": "reset"},
            "Info": "no rule admits SNI evil.example"}));
        assert_eq!(
            reset.line(),
            "T TLS   app/client -> 203.0.113.10 SNI evil.example reset denied (no rule admits SNI evil.example)"
        );
        assert_eq!(reset.pods(), ["app/client"]);
        let mut spliced = record(json!({"TLS": {"Mode": "splice"}}));
        if let Event::Http(r) = &mut spliced {
            r.verdict = audit::http::Verdict::Forwarded;
        }
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
        assert_eq!(serde_json::to_value(&broken).unwrap()["type"], "tls");
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
