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
            Event::Lost { .. } => Vec::new(),
        }
    }

    /// The verdict, lower-cased (`denied`, `forwarded`, ...).
    pub fn verdict(&self) -> String {
        match self {
            Event::Drop(d) => d.verdict.to_lowercase(),
            Event::Http(r) => str_of(r, "Verdict").to_lowercase(),
            Event::Dns(r) => str_of(r, "verdict").to_lowercase(),
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
                let end = |k: &str| {
                    let e = r.get(k);
                    e.and_then(|e| e.get("Pod")?.as_str())
                        .or_else(|| e.and_then(|e| e.get("IP")?.as_str()))
                        .unwrap_or("?")
                        .to_string()
                };
                let http = r.get("Http");
                let field = |k: &str| {
                    http.and_then(|h| h.get(k))
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            v => v.to_string(),
                        })
                        .unwrap_or_default()
                };
                format!(
                    "{} HTTP  {} -> {} {} {} {} -> {} {}",
                    str_of(r, "Timestamp"),
                    end("SourceEndpoint"),
                    end("DestinationEndpoint"),
                    field("Method"),
                    field("Host"),
                    field("Path"),
                    field("Code"),
                    self.verdict(),
                )
            }
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
            Event::Lost { events } => format!("(lost {events} events)"),
        }
    }
}

fn str_of<'a>(r: &'a Map<String, Value>, k: &str) -> &'a str {
    r.get(k).and_then(Value::as_str).unwrap_or("")
}
