//! One JSON line per query, through a bounded channel: a slow log never slows DNS; when
//! the channel is full the record is dropped and counted.

use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Forwarded,
    Denied,
    Error,
}

/// Who sent a query. Written as a string: `ns/pod`, or the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A known endpoint, `ns/pod`.
    Endpoint(String),
    /// No known endpoint: the client's address.
    Address(IpAddr),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Endpoint(e) => f.write_str(e),
            Source::Address(a) => a.fmt(f),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One audit record. Field meanings are documented in the crate README. The query path
/// fills it with plain values; the text (time, addresses) is made when the record is
/// written, on the writer's thread, not while the client waits.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// When the query arrived; written as RFC 3339 UTC.
    #[serde(serialize_with = "serialize_time")]
    pub time: SystemTime,
    pub source: Source,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: &'static str,
    pub qname: String,
    /// Query type mnemonic (`A`, `AAAA`, ..., `Unknown`).
    pub qtype: &'static str,
    pub verdict: Verdict,
    /// Rcode sent to the client (`NoError`, `Refused`, ...); none when nothing was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// TTL the learned IPs got (after the minimum), seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// toFQDNs selectors the IPs joined.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    /// `Kind ns/name` of the deciding policy, when a DNS rule decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Field path of the deciding rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it was denied or failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Whether the datapath confirmed the update within the bound (absent: no update).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath_confirmed: Option<bool>,
    pub latency_us: u64,
}

/// The sending half, cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<AuditRecord>>,
    metrics: Metrics,
}

impl Audit {
    /// A channel of `capacity` records; the receiver goes to a writer.
    pub fn channel(capacity: usize, metrics: Metrics) -> (Audit, mpsc::Receiver<AuditRecord>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Audit {
                tx: Some(tx),
                metrics,
            },
            rx,
        )
    }

    /// Audit records go nowhere.
    pub fn disabled(metrics: Metrics) -> Audit {
        Audit { tx: None, metrics }
    }

    /// Whether records go anywhere: without an output, the query path builds none of
    /// the record's strings.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, r: AuditRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(r).is_err() {
                self.metrics.audit_dropped.inc();
            }
        }
    }
}

/// How often the writer drains the channel. Polling instead of waking per record keeps
/// a cross-thread wake-up off every query.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Writes records as JSON lines until every sender is gone, draining the channel every
/// 10 ms and flushing after each batch. Blocking: run it on a blocking thread
/// (`tokio::task::spawn_blocking`).
pub fn write_lines(mut rx: mpsc::Receiver<AuditRecord>, mut out: Box<dyn Write + Send>) {
    // One line's bytes, reused; a record that does not serialise writes nothing.
    let mut line = Vec::with_capacity(512);
    loop {
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(r) => {
                    wrote = true;
                    line.clear();
                    match serde_json::to_writer(&mut line, &r) {
                        Ok(()) => {
                            line.push(b'\n');
                            if let Err(e) = out.write_all(&line) {
                                tracing::warn!("audit log write failed: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("audit record not serialisable: {e}"),
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        if wrote {
            if let Err(e) = out.flush() {
                tracing::warn!("audit log flush failed: {e}");
            }
        }
        if closed {
            return;
        }
        std::thread::sleep(DRAIN_EVERY);
    }
}

fn serialize_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(t.duration_since(UNIX_EPOCH).unwrap_or_default()))
}

/// RFC 3339 time (UTC, microseconds) of a Unix timestamp, without a date crate.
pub fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(Duration::from_micros(1_795_651_200_000_001)),
            "2026-11-26T00:00:00.000001Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400 + 3661)),
            "2000-02-29T01:01:01.000000Z"
        );
    }
}
