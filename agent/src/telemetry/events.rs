//! One stream of what happened, for `/v1/events` and `ward observe`: datapath drop
//! events and the audit records of both proxies, as JSON lines with a `type` field
//! (`drop`, `http`, `dns`). The audit records also go to the audit log, unchanged.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redirect_bpf::common::{DropEvent, DIR_INGRESS};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc};

use super::metrics::reason_name;
use crate::admin::api::{self, Event, Peer};

/// Events kept for a client that asks for what happened recently.
const RECENT: usize = 1024;

/// The event stream: a broadcast for followers and the most recent lines.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
    recent: Arc<Mutex<VecDeque<Arc<str>>>>,
}

impl Default for Events {
    fn default() -> Events {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(4096).0,
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(RECENT))),
        }
    }

    /// Publishes one event (a JSON line without its newline).
    pub fn publish(&self, e: &Event) {
        let line: Arc<str> = match serde_json::to_string(e) {
            Ok(l) => Arc::from(l),
            Err(e) => {
                tracing::warn!(error = %e, "event not serialisable; left out");
                return;
            }
        };
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(line.clone());
        }
        // No follower: nothing to do.
        let _ = self.tx.send(line);
    }

    pub fn recent(&self) -> Vec<Arc<str>> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

/// A drop event as the event stream carries it.
pub fn drop_event(e: &DropEvent, pod_of: impl Fn(IpAddr) -> Option<String>) -> Event {
    let (src, dst) = if e.family == 6 {
        (
            IpAddr::V6(Ipv6Addr::from(e.saddr6)),
            IpAddr::V6(Ipv6Addr::from(e.daddr6)),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::from(e.saddr)),
            IpAddr::V4(Ipv4Addr::from(e.daddr)),
        )
    };
    Event::Drop(api::Drop {
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        verdict: "denied".into(),
        reason: reason_name(e.reason).into(),
        direction: if e.direction == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .into(),
        protocol: e.protocol,
        source: Peer {
            ip: src,
            port: u16::from_be_bytes(e.sport),
            identity: e.src_identity,
            pod: pod_of(src),
        },
        destination: Peer {
            ip: dst,
            port: u16::from_be_bytes(e.dport),
            identity: e.dst_identity,
            pod: pod_of(dst),
        },
        ifindex: e.ifindex,
        cookie: e.cookie,
    })
}

/// Where audit records are written.
pub enum AuditSink {
    None,
    Stdout,
    File(std::fs::File),
}

impl AuditSink {
    /// `-` is stdout, `none` disables the log, anything else is a file appended to.
    pub fn open(spec: &str) -> std::io::Result<AuditSink> {
        Ok(match spec {
            "-" => AuditSink::Stdout,
            "none" => AuditSink::None,
            path => AuditSink::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }

    fn write(&mut self, line: &str) {
        let r = match self {
            AuditSink::None => Ok(()),
            AuditSink::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush())
            }
            AuditSink::File(f) => writeln!(f, "{line}"),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "audit log write failed");
        }
    }
}

/// Writes the records of both proxies to the audit log and the event stream, until both
/// channels close. Runs on a blocking thread: file writes never stall the data path.
pub fn pump_audit(
    mut http: mpsc::Receiver<proxy::Record>,
    mut dns: mpsc::Receiver<dns_proxy::audit::AuditRecord>,
    mut sink: AuditSink,
    events: Events,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, Map<String, Value>)>();
    let t1 = tx.clone();
    tokio::spawn(async move {
        while let Some(r) = http.recv().await {
            if t1.send((true, to_map(&r))).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(r) = dns.recv().await {
            if tx.send((false, to_map(&r))).is_err() {
                return;
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        while let Some((http, m)) = rx.blocking_recv() {
            sink.write(&Value::Object(m.clone()).to_string());
            events.publish(&if http { Event::Http(m) } else { Event::Dns(m) });
        }
    });
}

fn to_map<T: Serialize>(r: &T) -> Map<String, Value> {
    match serde_json::to_value(r) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
