//! `ward observe`'s printers: `compact` (one line, Hubble's order), `table`, `json` (the
//! agent's record with the node) and `jsonpb` (Hubble's `{"flow": {...}}` shape).

use std::net::IpAddr;

use agent::admin::api::Event;
use clap::ValueEnum;
use serde_json::{json, Map, Value};

use super::flow::{Flow, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per flow: time, node, source -> destination, type, verdict, summary.
    #[value(alias = "text")]
    Compact,
    /// Aligned columns with a header.
    Table,
    /// The agent's record (the audit stream's line) with a `node` field.
    Json,
    /// Hubble's `{"flow": {...}, "node_name": ..., "time": ...}` with proto field names.
    Jsonpb,
}

/// The printed parts of one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    pub time: String,
    pub node: String,
    pub source: String,
    pub destination: String,
    pub kind: String,
    pub verdict: String,
    pub summary: String,
}

pub fn parts(f: &Flow) -> Parts {
    let time = f
        .time()
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_else(|| "-".into());
    Parts {
        time,
        node: f.node.clone(),
        source: f.source().describe(),
        destination: f.destination().describe(),
        kind: kind_word(f).into(),
        verdict: f.verdict().map(|v| v.as_str()).unwrap_or("").into(),
        summary: summary(f),
    }
}

/// Hubble's word for the record: `drop`, `http-request`, `dns-request`.
fn kind_word(f: &Flow) -> &'static str {
    match &f.event {
        Event::Drop(_) => "drop",
        Event::Http(r) if r.http.is_none() => "tls-session",
        Event::Http(_) => "http-request",
        Event::Tls(_) => "tls-material",
        Event::Dns(_) => "dns-request",
        _ => "",
    }
}

/// What the record says: the request, the datapath's reason, and the policy decision
/// (the words of `ward policy trace` for a drop; the deciding rule or the denial of the
/// proxies).
pub fn summary(f: &Flow) -> String {
    match &f.event {
        Event::Drop(d) => {
            let l4 = f.l4().unwrap_or_default();
            let why = match (&d.explanation, &d.policy) {
                (Some(e), _) => e.clone(),
                (None, Some(p)) => p.clone(),
                (None, None) => "no policy explanation (not a policy drop)".into(),
            };
            format!("({l4}, {}, {}): {why}", d.reason, d.direction)
        }
        Event::Http(r) => {
            let sni = r
                .tls
                .as_ref()
                .map(|t| t.sni.as_deref().unwrap_or("(no SNI)"));
            let mut s = match (&r.http, &r.tls) {
                (Some(h), _) => format!(
                    "({} {} {}://{}{} => {}{})",
                    h.protocol,
                    h.method,
                    h.scheme,
                    h.host,
                    h.path,
                    h.code,
                    sni.map(|n| format!(", SNI {n}")).unwrap_or_default()
                ),
                (None, Some(t)) => format!("(TLS SNI {} {})", sni.unwrap_or_default(), t.mode),
                (None, None) => "(no request)".into(),
            };
            if !r.info.is_empty() {
                s.push_str(&format!(": {}", r.info));
            } else if let Some(a) = r.allowed_by.first() {
                s.push_str(&format!(": allowed by {} {}", a.policy, a.rule));
            }
            s
        }
        Event::Dns(r) => {
            let mut s = format!("(DNS Query {} {}", r.qname, r.qtype);
            if let Some(rc) = &r.rcode {
                s.push_str(&format!(" => {rc}"));
            }
            for ip in &r.ips {
                s.push_str(&format!(" {ip}"));
            }
            s.push(')');
            if !r.reason.is_empty() {
                s.push_str(&format!(": {}", r.reason));
            } else if let (Some(p), Some(rule)) = (&r.policy, &r.rule) {
                s.push_str(&format!(": allowed by {p} {rule}"));
            }
            s
        }
        Event::Tls(t) => format!(
            "({} {}): TLS material unusable ({}), connections reset: {}",
            t.rule.policy,
            t.rule.rule,
            t.rule.secret.as_deref().unwrap_or("no secret"),
            t.rule.reason
        ),
        other => other.line(),
    }
}

/// One compact line.
pub fn compact(f: &Flow) -> String {
    if !f.is_record() {
        return f.event.line();
    }
    let p = parts(f);
    format!(
        "{} [{}]: {} -> {} {} {} {}",
        p.time, p.node, p.source, p.destination, p.kind, p.verdict, p.summary
    )
}

/// Aligned columns; widths grow with the rows fitted before printing.
#[derive(Clone, Debug)]
pub struct Table {
    widths: [usize; 6],
}

const HEADER: [&str; 7] = [
    "TIMESTAMP",
    "NODE",
    "SOURCE",
    "DESTINATION",
    "TYPE",
    "VERDICT",
    "SUMMARY",
];

impl Default for Table {
    fn default() -> Table {
        let mut widths = [0; 6];
        for (w, h) in widths.iter_mut().zip(HEADER) {
            *w = h.len();
        }
        Table { widths }
    }
}

impl Table {
    /// Widens the columns for these flows.
    pub fn fit(&mut self, flows: &[Flow]) {
        for f in flows.iter().filter(|f| f.is_record()) {
            let p = parts(f);
            let cols = [
                &p.time,
                &p.node,
                &p.source,
                &p.destination,
                &p.kind,
                &p.verdict,
            ];
            for (w, c) in self.widths.iter_mut().zip(cols) {
                *w = (*w).max(c.len());
            }
        }
    }

    pub fn header(&self) -> String {
        self.row(&HEADER.map(String::from))
    }

    pub fn line(&self, f: &Flow) -> String {
        if !f.is_record() {
            return f.event.line();
        }
        let p = parts(f);
        self.row(&[
            p.time,
            p.node,
            p.source,
            p.destination,
            p.kind,
            p.verdict,
            p.summary,
        ])
    }

    fn row(&self, cols: &[String; 7]) -> String {
        let mut out = String::new();
        for (c, w) in cols.iter().zip(self.widths) {
            out.push_str(&format!("{c:<w$}  "));
        }
        out.push_str(&cols[6]);
        out
    }
}

/// The agent's record with the node that recorded it.
pub fn json(f: &Flow) -> serde_json::Result<String> {
    let mut v = serde_json::to_value(&f.event)?;
    if let Value::Object(m) = &mut v {
        m.insert("node".into(), Value::String(f.node.clone()));
    }
    serde_json::to_string(&v)
}

/// Hubble's `GetFlowsResponse` as `hubble observe -o jsonpb` prints it: `flow` with
/// proto field names (`verdict`, `IP`, `l4`, `source`, `destination`, `Type`, `l7`,
/// `traffic_direction`, `drop_reason_desc`, `*_denied_by`, `*_allowed_by`), plus
/// `node_name` and `time`. Ward's explanation of a drop goes into `Summary`.
pub fn jsonpb(f: &Flow) -> serde_json::Result<String> {
    if !f.is_record() {
        if let Event::Lost { events } = &f.event {
            return serde_json::to_string(&json!({
                "lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": events},
                "node_name": f.node,
            }));
        }
        return serde_json::to_string(&f.event);
    }
    let time = parts(f).time;
    let (src, dst) = (f.source(), f.destination());
    let mut flow = Map::new();
    flow.insert("time".into(), json!(time));
    flow.insert(
        "verdict".into(),
        json!(f.verdict().map(|v| v.as_str()).unwrap_or("VERDICT_UNKNOWN")),
    );
    if let (Some(s), Some(d)) = (src.ip, dst.ip) {
        flow.insert(
            "IP".into(),
            json!({
                "source": s.to_string(),
                "destination": d.to_string(),
                "ipVersion": if matches!(s, IpAddr::V6(_)) { "IPv6" } else { "IPv4" },
            }),
        );
    }
    let l4 = f.l4().unwrap_or_default();
    let ports = json!({"source_port": src.port, "destination_port": dst.port});
    flow.insert("l4".into(), json!({ l4.clone(): ports }));
    flow.insert("source".into(), endpoint(&src));
    flow.insert("destination".into(), endpoint(&dst));
    flow.insert("node_name".into(), json!(f.node));
    let direction = f.direction().unwrap_or_default().to_uppercase();
    flow.insert("traffic_direction".into(), json!(direction));
    let summary = summary(f);
    match &f.event {
        Event::Drop(d) => {
            flow.insert("Type".into(), json!("L3_L4"));
            flow.insert("drop_reason_desc".into(), json!(d.reason.to_uppercase()));
            if let Some(p) = &d.policy {
                let key = format!("{}_denied_by", direction.to_lowercase());
                flow.insert(key, json!([policy(p)]));
            }
        }
        Event::Http(r) => {
            flow.insert("Type".into(), json!("L7"));
            let mut l7 = json!({"type": "REQUEST", "latency_ns": r.latency_ns});
            if let Some(h) = &r.http {
                l7["http"] = json!({
                    "code": h.code,
                    "method": h.method,
                    "url": format!("{}://{}{}", h.scheme, h.host, h.path),
                    "protocol": h.protocol,
                });
            }
            flow.insert("l7".into(), l7);
            for a in &r.allowed_by {
                let key = format!("{}_allowed_by", a.direction.to_lowercase());
                let list = flow.entry(key).or_insert_with(|| json!([]));
                if let Value::Array(l) = list {
                    l.push(policy(&a.policy));
                }
            }
        }
        Event::Dns(r) => {
            flow.insert("Type".into(), json!("L7"));
            flow.insert(
                "l7".into(),
                json!({
                    "type": "REQUEST",
                    "latency_ns": r.latency_us.saturating_mul(1000),
                    "dns": {
                        "query": r.qname,
                        "ips": r.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "ttl": r.ttl.unwrap_or(0),
                        "observation_source": "proxy",
                        "rcode": r.rcode.clone().unwrap_or_default(),
                        "qtypes": [r.qtype],
                    },
                }),
            );
        }
        _ => {}
    }
    flow.insert("Summary".into(), json!(summary));
    serde_json::to_string(&json!({
        "flow": flow,
        "node_name": f.node,
        "time": time,
    }))
}

fn endpoint(s: &Side) -> Value {
    let mut m = Map::new();
    if let Some(id) = s.identity {
        m.insert("identity".into(), json!(id));
    }
    if let Some((ns, pod)) = s.pod.as_deref().and_then(|p| p.split_once('/')) {
        m.insert("namespace".into(), json!(ns));
        m.insert("pod_name".into(), json!(pod));
    }
    Value::Object(m)
}

/// `Kind namespace/name` (or `Kind name`) as Hubble's `Policy` message.
fn policy(p: &str) -> Value {
    let (kind, name) = p.split_once(' ').unwrap_or(("", p));
    match name.split_once('/') {
        Some((ns, n)) => json!({"kind": kind, "namespace": ns, "name": n}),
        None => json!({"kind": kind, "name": name}),
    }
}
