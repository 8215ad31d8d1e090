//! One stream of what happened, for `/v1/events` and `ward observe`: the audit stream's
//! lines (datapath drops and the records of both proxies, with a `type` field: `drop`,
//! `http`, `dns`) as the audit writer publishes them; see `admin::api::Event`.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use policy_model::{Direction, EndpointRef, Model, Protocol, Query};
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
        policy: None,
        rule: None,
        explanation: None,
    }
}

/// Names the policy decision of a policy drop (`policy_deny`, `policy_default_deny`) as
/// `ward policy trace` does: the model's verdict of the dropped side (the source's
/// egress or the destination's ingress) for the packet's addresses, protocol and
/// destination port. Other drops (no proxy, malformed, ...) are not policy verdicts and
/// stay as the datapath gave them. The model is the one in force when the event is
/// read, so a drop from just before a policy change is explained by the new policy; a
/// side the model now allows says so.
pub fn explain_drop(model: &Model, d: &mut DropRecord) {
    if !matches!(d.reason.as_str(), "policy_deny" | "policy_default_deny") {
        return;
    }
    let Some(protocol) = protocol_of(d.protocol) else {
        return;
    };
    let query = Query {
        from: EndpointRef::Ip(d.source.ip),
        to: EndpointRef::Ip(d.destination.ip),
        port: d.destination.port,
        protocol,
        http: None,
        dns: None,
    };
    let dir = if d.direction == "ingress" {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    // the dropped side only: the other one may be another node's endpoint, whose
    // policy a node-scoped model does not hold
    let Ok(Some(side)) = model.query_side(&query, dir) else {
        return;
    };
    d.explanation = Some(if side.allowed {
        format!(
            "{dir} of {}: the policy in force now allows it ({})",
            side.endpoint, side.reason
        )
    } else {
        let at = side.layer.map(|l| format!(" at {l}")).unwrap_or_default();
        format!("{dir} of {}: denied{at}: {}", side.endpoint, side.reason)
    });
    d.policy = side.policy;
    d.rule = side.rule;
}

/// The model's protocol of an IP protocol number (the ones policies can name).
fn protocol_of(number: u8) -> Option<Protocol> {
    Some(match number {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        1 => Protocol::Icmp,
        58 => Protocol::IcmpV6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const CLUSTER: &str = "namespaces: [{name: app}]\n\
        nodes: [{name: n1, ip: 172.18.0.2}, {name: n2, ip: 172.18.0.3}]\npods:\n\
        - {namespace: app, name: client, ip: 10.80.1.2, node: n1, labels: {app: client}}\n\
        - {namespace: app, name: server, ip: 10.80.2.2, node: n2, labels: {app: server}}\n";

    const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: app}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-8081, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8081", protocol: TCP}]}]
"#;

    fn model() -> Model {
        let cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, errors, _) = policy_model::api::load(POLICIES, None);
        assert!(errors.is_empty(), "{errors:?}");
        Model::compile(&cluster, policies, Default::default())
    }

    /// The model of node n2's agent: the server's policy only.
    fn node_model() -> Model {
        let cluster: policy_model::cluster::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, errors, _) = policy_model::api::load(POLICIES, None);
        assert!(errors.is_empty(), "{errors:?}");
        let cluster = std::sync::Arc::new(cluster);
        Model::build(
            cluster.clone(),
            cluster.dns.clone(),
            policies.into_iter().map(std::sync::Arc::new).collect(),
            Default::default(),
            policy_model::compile::Scope::Node("n2".into()),
        )
    }

    fn dropped(reason: u32, dport: u16) -> DropRecord {
        dropped_in(&model(), reason, dport)
    }

    fn dropped_in(model: &Model, reason: u32, dport: u16) -> DropRecord {
        let e = DropEvent {
            reason,
            saddr: [10, 80, 1, 2],
            daddr: [10, 80, 2, 2],
            dport: dport.to_be_bytes(),
            protocol: 6,
            direction: DIR_INGRESS,
            family: 4,
            ..DropEvent::default()
        };
        let mut d = drop_record(&e, |_| None);
        explain_drop(model, &mut d);
        d
    }

    /// The agent of the server's node compiles only its own pods: the drop at the
    /// server's ingress is explained all the same, though the client's egress (another
    /// node's) is not in its model.
    #[test]
    fn a_node_s_agent_explains_the_drops_of_its_own_pods() {
        use redirect_bpf::common::drop_reason;
        let m = node_model();
        let d = dropped_in(&m, drop_reason::POLICY_DEFAULT_DENY, 8080);
        let why = d.explanation.unwrap();
        assert!(
            why.starts_with("ingress of app/server: denied at L4: default deny: selected by NetworkPolicy app/default-deny"),
            "{why}"
        );
        let d = dropped_in(&m, drop_reason::POLICY_DENY, 8081);
        assert_eq!(d.policy.as_deref(), Some("CiliumNetworkPolicy app/no-8081"));
    }

    /// The drop's explanation is `ward policy trace`'s verdict of the dropped side.
    #[test]
    fn a_policy_drop_is_explained_as_the_trace_explains_it() {
        use redirect_bpf::common::drop_reason;
        let d = dropped(drop_reason::POLICY_DEFAULT_DENY, 8080);
        let why = d.explanation.unwrap();
        assert!(
            why.starts_with("ingress of app/server: denied at L4: default deny: selected by NetworkPolicy app/default-deny"),
            "{why}"
        );
        assert_eq!(d.policy, None, "a default deny has no deciding rule");

        let d = dropped(drop_reason::POLICY_DENY, 8081);
        assert_eq!(d.policy.as_deref(), Some("CiliumNetworkPolicy app/no-8081"));
        assert_eq!(d.rule.as_deref(), Some("spec.ingressDeny[0].toPorts[0]"));
        assert!(d
            .explanation
            .unwrap()
            .contains("denied by CiliumNetworkPolicy app/no-8081"));

        // not a policy verdict: left as the datapath gave it
        let d = dropped(drop_reason::PROXY_UNAVAILABLE, 8080);
        assert_eq!((d.policy, d.explanation), (None, None));
    }
}
