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
}

impl Status {
    /// Ready and no policy errors: what `ward status` exits 0 on.
    pub fn healthy(&self) -> bool {
        self.ready && self.errors.is_empty()
    }
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
/// crate; the same line as in the audit log) or a note that a follower fell behind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    /// A packet the datapath dropped.
    Drop(Drop),
    /// An HTTP proxy audit record.
    Http(audit::http::Record),
    /// A DNS proxy audit record.
    Dns(audit::dns::Record),
    /// A follower fell behind: this many events were not sent to it.
    Lost { events: u64 },
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
            Event::Lost { .. } => Vec::new(),
        }
    }

    /// The verdict, lower-cased (`denied`, `forwarded`, ...).
    pub fn verdict(&self) -> String {
        match self {
            Event::Drop(d) => d.verdict.to_lowercase(),
            Event::Http(r) => r.verdict.as_str().into(),
            Event::Dns(r) => r.verdict.as_str().into(),
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
            Event::Http(r) => {
                let side =
                    |e: &audit::http::Endpoint| e.pod.clone().unwrap_or_else(|| e.ip.clone());
                format!(
                    "{} HTTP  {} -> {} {} {} {} -> {} {}",
                    r.timestamp,
                    side(&r.source_endpoint),
                    side(&r.destination_endpoint),
                    r.http.method,
                    r.http.host,
                    r.http.path,
                    r.http.code,
                    self.verdict(),
                )
            }
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
            Event::Lost { events } => format!("(lost {events} events)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_line() -> String {
        concat!(
            r#"{"type":"http","Timestamp":"2026-12-07T04:00:00.000000001Z","ObservationPoint":"Ingress","#,
            r#""Verdict":"Denied","SourceEndpoint":{"IP":"10.0.0.1","Port":40000,"Identity":9,"Pod":"app/client"},"#,
            r#""DestinationEndpoint":{"IP":"10.0.0.2","Port":80,"Identity":10},"#,
            r#""HTTP":{"Code":403,"Method":"DELETE","Host":"web","Path":"/admin","Protocol":"HTTP/1.1"},"#,
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
            "2026-12-07T04:00:00.000000001Z HTTP  app/client -> 10.0.0.2 DELETE web /admin -> 403 denied"
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
}
