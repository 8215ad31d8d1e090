//! The DNS proxy's record: one per query. The query path fills it with plain values;
//! the text (time, addresses) is made when the line is written, on the writer's thread,
//! not while the client waits.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Source, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.parse::<IpAddr>() {
            Ok(ip) => Source::Address(ip),
            Err(_) => Source::Endpoint(text),
        })
    }
}

/// One DNS audit record. Field meanings are documented in the dns-proxy README.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the query arrived; written as RFC 3339 UTC.
    #[serde(
        serialize_with = "serialize_time",
        deserialize_with = "deserialize_time"
    )]
    pub time: SystemTime,
    pub source: Source,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Cow<'static, str>,
    pub qname: String,
    /// Query type mnemonic (`A`, `AAAA`, ..., `Unknown`).
    pub qtype: Cow<'static, str>,
    pub verdict: Verdict,
    /// Rcode sent to the client (`NoError`, `Refused`, ...); none when nothing was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// TTL the learned IPs got (after the minimum), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// toFQDNs selectors the IPs joined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    /// `Kind ns/name` of the deciding policy, when a DNS rule decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Field path of the deciding rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it was denied or failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Whether the datapath confirmed the update within the bound (absent: no update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath_confirmed: Option<bool>,
    pub latency_us: u64,
}

fn serialize_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(t.duration_since(UNIX_EPOCH).unwrap_or_default()))
}

fn deserialize_time<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
}

/// RFC 3339 time (UTC, microseconds) of a Unix timestamp.
pub fn rfc3339(since_epoch: Duration) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(since_epoch.as_micros().try_into().unwrap_or(0));
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record() -> Record {
        Record {
            time: UNIX_EPOCH + Duration::from_micros(1_795_651_200_000_001),
            source: Source::Endpoint("ns/client".into()),
            client: "10.0.0.1:5353".parse().unwrap(),
            server: "10.96.0.10:53".parse().unwrap(),
            transport: "udp".into(),
            qname: "api.example.".into(),
            qtype: "A".into(),
            verdict: Verdict::Forwarded,
            rcode: Some("NoError".into()),
            ips: vec!["192.0.2.7".parse().unwrap()],
            ttl: Some(60),
            selectors: vec!["api.example".into()],
            policy: Some("CiliumNetworkPolicy ns/p".into()),
            rule: Some("spec.egress[0].toPorts[0].rules.dns[0]".into()),
            reason: String::new(),
            datapath_confirmed: Some(true),
            latency_us: 12,
        }
    }

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

    #[test]
    fn a_record_reads_back_as_written() {
        let line = serde_json::to_string(&record()).unwrap();
        assert!(
            line.contains(r#""time":"2026-11-26T00:00:00.000001Z""#),
            "{line}"
        );
        assert!(line.contains(r#""source":"ns/client""#), "{line}");
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, record());
    }

    #[test]
    fn a_source_that_is_an_address_reads_back_as_one() {
        let s: Source = serde_json::from_str(r#""192.0.2.1""#).unwrap();
        assert_eq!(s, Source::Address("192.0.2.1".parse().unwrap()));
    }
}
