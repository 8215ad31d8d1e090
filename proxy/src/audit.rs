//! The access log: one JSON line per request, written off the data path. Requests hand
//! records to a bounded queue and never wait: when the queue is full the record is
//! dropped and counted. Field names follow Cilium's access-log `LogRecord` (see the
//! crate README for the list).

use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use policy_model::flow::Matched;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// `Forwarded`, `Denied` or `Error`, as Cilium's verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Endpoint {
    #[serde(rename = "IP")]
    pub ip: String,
    pub port: u16,
    /// Numeric security identity.
    pub identity: u32,
    /// `namespace/pod` (or `node:NAME`) when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Http {
    /// Response status sent to the client (0 when none was sent).
    pub code: u16,
    /// `http`, or `https` for a request of an intercepted TLS session.
    pub scheme: &'static str,
    pub method: String,
    /// `:authority` / `Host`.
    pub host: String,
    /// The normalised path with query, as matched and forwarded.
    pub path: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_headers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected_headers: Vec<String>,
}

/// A rule that allowed the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

/// The TLS session of a record: for a request of an intercepted session, or a session
/// decided as a whole (spliced or reset; those records have no `HTTP`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Tls {
    /// The ClientHello's SNI (lower-cased); absent without one.
    #[serde(rename = "SNI", skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// `splice` (bytes passed untouched), `intercept` (terminated and originated) or
    /// `reset`.
    pub mode: &'static str,
    /// The rule that decided the session (admitted, intercepted, or whose check
    /// failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    /// The secret of the material in use or at fault (`namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One access-log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Record {
    /// RFC 3339 UTC with nanoseconds: when the request head arrived.
    pub timestamp: String,
    /// `Ingress` or `Egress`.
    pub observation_point: &'static str,
    pub verdict: Verdict,
    pub source_endpoint: Endpoint,
    pub destination_endpoint: Endpoint,
    /// The request; absent from a record of a whole TLS session.
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(rename = "TLS", skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// From the request head to the response head (or the local reply), nanoseconds.
    pub latency_ns: u64,
    /// Policy generation the request was checked against.
    pub policy_generation: u64,
    /// The rules that allowed the request (one per enforcing side).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<Rule>,
    /// Why it was denied, why it errored, or what let it pass without L7 rules.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub info: String,
}

pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

/// The data path's handle: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Record>>,
    metrics: Metrics,
}

impl AuditLog {
    /// A log that drops everything (and counts nothing): no audit output configured.
    pub fn disabled(metrics: Metrics) -> AuditLog {
        AuditLog { tx: None, metrics }
    }

    /// A log with a bounded queue of `capacity` and its receiving end.
    pub fn channel(capacity: usize, metrics: Metrics) -> (AuditLog, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            AuditLog {
                tx: Some(tx),
                metrics,
            },
            rx,
        )
    }

    /// Starts a writer task for `output`; returns the handle for the data path.
    pub async fn start(
        output: Output,
        capacity: usize,
        metrics: Metrics,
    ) -> std::io::Result<AuditLog> {
        let (log, rx) = AuditLog::channel(capacity, metrics);
        match output {
            Output::Stdout => {
                tokio::spawn(write_all(rx, tokio::io::stdout()));
            }
            Output::File(p) => {
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await?;
                tokio::spawn(write_all(rx, f));
            }
        }
        Ok(log)
    }

    /// Whether records go anywhere: when not, callers skip building them (a record
    /// is a dozen small allocations per request).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, r: Record) {
        if let Some(tx) = &self.tx {
            if tx.try_send(r).is_err() {
                self.metrics.audit_dropped.inc();
            }
        }
    }
}

/// Writes records as JSON lines, batching what is queued into one write.
async fn write_all<W: tokio::io::AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Record>, mut out: W) {
    let mut buf = Vec::with_capacity(4096);
    while let Some(r) = rx.recv().await {
        encode(&r, &mut buf);
        while let Ok(r) = rx.try_recv() {
            encode(&r, &mut buf);
            if buf.len() > 64 * 1024 {
                break;
            }
        }
        if let Err(e) = out.write_all(&buf).await {
            tracing::warn!("audit log write failed: {e}");
        }
        let _ = out.flush().await;
        buf.clear();
    }
}

fn encode(r: &Record, buf: &mut Vec<u8>) {
    if serde_json::to_writer(&mut *buf, r).is_ok() {
        let _ = Write::write_all(buf, b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            timestamp: timestamp(SystemTime::UNIX_EPOCH),
            observation_point: "Ingress",
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
            http: Some(Http {
                code: 403,
                scheme: "http",
                method: "GET".into(),
                host: "web".into(),
                path: "/admin".into(),
                protocol: "HTTP/1.1",
                missing_headers: vec![],
                rejected_headers: vec![],
            }),
            tls: None,
            latency_ns: 5,
            policy_generation: 1,
            allowed_by: vec![],
            info: "no rule matches".into(),
        }
    }

    #[test]
    fn json_field_names() {
        let v = serde_json::to_value(record()).unwrap();
        assert_eq!(v["Timestamp"], "1970-01-01T00:00:00.000000000Z");
        assert_eq!(v["Verdict"], "Denied");
        assert_eq!(v["ObservationPoint"], "Ingress");
        assert_eq!(v["SourceEndpoint"]["IP"], "10.0.0.1");
        assert_eq!(v["DestinationEndpoint"]["Pod"], "ns/web");
        assert_eq!(v["HTTP"]["Code"], 403);
        assert_eq!(v["HTTP"]["Path"], "/admin");
        assert_eq!(v["HTTP"]["Scheme"], "http");
        assert_eq!(v["Info"], "no rule matches");
        assert!(v.get("AllowedBy").is_none());
        assert!(v.get("TLS").is_none());
        let mut r = record();
        r.http = None;
        r.tls = Some(Tls {
            sni: Some("api.example".into()),
            mode: "reset",
            rule: None,
            secret: Some("ns/ca".into()),
        });
        let v = serde_json::to_value(r).unwrap();
        assert!(v.get("HTTP").is_none());
        assert_eq!(v["TLS"]["SNI"], "api.example");
        assert_eq!(v["TLS"]["Mode"], "reset");
        assert_eq!(v["TLS"]["Secret"], "ns/ca");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let metrics = Metrics::new();
        let (log, mut rx) = AuditLog::channel(1, metrics.clone());
        log.record(record());
        log.record(record());
        log.record(record());
        assert_eq!(metrics.audit_dropped.get(), 2);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn only_a_log_with_an_output_asks_for_records() {
        // the data path skips building records when this says no
        assert!(!AuditLog::disabled(Metrics::new()).enabled());
        assert!(AuditLog::channel(1, Metrics::new()).0.enabled());
    }
}
