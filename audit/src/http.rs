//! The HTTP proxy's record: one per request. Field names follow Cilium's access-log
//! `LogRecord` (PascalCase), so tools that read Cilium's log read these.

use std::borrow::Cow;
use std::time::SystemTime;

use policy_model::flow::Matched;
use serde::{Deserialize, Serialize};

/// `Forwarded`, `Denied` or `Error`, as Cilium's verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Forwarded,
    Denied,
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Denied => "denied",
            Verdict::Error => "error",
        }
    }
}

/// One end of the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Endpoint {
    #[serde(rename = "IP")]
    pub ip: String,
    pub port: u16,
    /// Numeric security identity.
    pub identity: u32,
    /// `namespace/pod` (or `node:NAME`) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// What the request asked for and what the client got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Http {
    /// Response status sent to the client (0 when none was sent).
    pub code: u16,
    pub method: String,
    /// `:authority` / `Host`.
    pub host: String,
    /// The normalised path with query, as matched and forwarded.
    pub path: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_headers: Vec<String>,
}

/// A rule that allowed the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Rule {
    pub direction: String,
    pub policy: String,
    pub rule: String,
}

impl From<&Matched> for Rule {
    fn from(m: &Matched) -> Rule {
        Rule {
            direction: m.direction.to_string(),
            policy: m.policy.clone(),
            rule: m.rule.clone(),
        }
    }
}

/// One HTTP access-log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Record {
    /// RFC 3339 UTC with nanoseconds: when the request head arrived.
    pub timestamp: String,
    /// `Ingress` or `Egress`.
    pub observation_point: Cow<'static, str>,
    pub verdict: Verdict,
    pub source_endpoint: Endpoint,
    pub destination_endpoint: Endpoint,
    #[serde(rename = "HTTP")]
    pub http: Http,
    /// From the request head to the response head (or the local reply), nanoseconds.
    pub latency_ns: u64,
    /// Policy generation the request was checked against.
    pub policy_generation: u64,
    /// The rules that allowed the request (one per enforcing side).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<Rule>,
    /// Why it was denied, why it errored, or what let it pass without L7 rules.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub info: String,
}

/// RFC 3339 UTC with nanoseconds, the form of [`Record::timestamp`].
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record() -> Record {
        Record {
            timestamp: timestamp(SystemTime::UNIX_EPOCH),
            observation_point: "Ingress".into(),
            verdict: Verdict::Denied,
            source_endpoint: Endpoint {
                ip: "10.0.0.1".into(),
                port: 1234,
                identity: 2,
                pod: None,
            },
            destination_endpoint: Endpoint {
                ip: "10.0.0.2".into(),
                port: 80,
                identity: 70000,
                pod: Some("ns/web".into()),
            },
            http: Http {
                code: 403,
                method: "GET".into(),
                host: "web".into(),
                path: "/admin".into(),
                protocol: "HTTP/1.1".into(),
                missing_headers: vec![],
                rejected_headers: vec![],
            },
            latency_ns: 5,
            policy_generation: 1,
            allowed_by: vec![],
            info: "no rule matches".into(),
        }
    }

    #[test]
    fn json_field_names_are_cilium_s() {
        let v = serde_json::to_value(record()).unwrap();
        assert_eq!(v["Timestamp"], "1970-01-01T00:00:00.000000000Z");
        assert_eq!(v["Verdict"], "Denied");
        assert_eq!(v["ObservationPoint"], "Ingress");
        assert_eq!(v["SourceEndpoint"]["IP"], "10.0.0.1");
        assert_eq!(v["DestinationEndpoint"]["Pod"], "ns/web");
        assert_eq!(v["HTTP"]["Code"], 403);
        assert_eq!(v["HTTP"]["Path"], "/admin");
        assert_eq!(v["Info"], "no rule matches");
        assert!(v.get("AllowedBy").is_none());
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let line = serde_json::to_string(&record()).unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, record());
    }
}
