//! One stream of what happened, for `/v1/events` and `ward observe`: the audit stream's
//! lines (datapath drops and the records of both proxies, with a `type` field: `drop`,
//! `http`, `dns`) as the audit writer publishes them; see `admin::api::Event`.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redirect_bpf::common::{DropEvent, DIR_INGRESS};
use tokio::sync::broadcast;

use super::metrics::reason_name;
use audit::drop::{Peer, Record as DropRecord};

use crate::admin::api::Event;

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

    /// Publishes one event.
    pub fn publish(&self, e: &Event) {
        match serde_json::to_string(e) {
            Ok(l) => self.publish_line(Arc::from(l)),
            Err(e) => tracing::warn!(error = %e, "event not serialisable; left out"),
        }
    }

    /// Publishes one event already written as a JSON line (without its newline).
    pub fn publish_line(&self, line: Arc<str>) {
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

/// A datapath drop event as the audit stream carries it, its pods named by `pod_of`.
pub fn drop_record(e: &DropEvent, pod_of: impl Fn(IpAddr) -> Option<String>) -> DropRecord {
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
    DropRecord {
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
    }
}
