//! Established flows that a policy change denies. The datapath passes the packets of a
//! tracked flow on its conntrack entry; Cilium looks policy up per packet, so a connection
//! whose flow a new policy denies stops. After each policy push the reconciler removes
//! the conntrack entries of such flows: their next packet is decided as a new flow and
//! dropped (and counted) like any other denied packet.

use std::collections::HashSet;
use std::net::IpAddr;

use policy_model::{Direction, Model, Protocol};
use redirect_bpf::common::ct_flags;
use redirect_bpf::ConntrackFlow;

/// Which flows the node's datapath enforces: the sides whose endpoint is a pod of this
/// node (the node's programs sit on those pods' veths).
pub struct Enforced<'a> {
    pub model: &'a Model,
    /// The node the agent runs on (identities of node addresses are seen from it).
    pub node: &'a str,
    /// The IPs of the node's pods.
    pub local: &'a HashSet<IpAddr>,
}

impl Enforced<'_> {
    /// Whether the current policy denies a tracked flow on a side this node enforces.
    /// Flows a proxy takes part in are left to the proxy, which checks every request
    /// against the current policy; ICMP and other protocols are left to their (short)
    /// idle expiry.
    pub fn denies(&self, f: &ConntrackFlow) -> bool {
        if f.flags & (ct_flags::PROXIED | ct_flags::PROXY_UPSTREAM) != 0 {
            return false;
        }
        let protocol = match f.protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            _ => return false,
        };
        let side = |ip: IpAddr, dir: Direction, peer: IpAddr| {
            if !self.local.contains(&ip) {
                return false;
            }
            let Some(ep) = self.model.endpoint_of_ip(ip) else {
                return false;
            };
            let peer = self.model.identity_of(peer, Some(self.node));
            !self.model.decide(ep, dir, peer, protocol, f.dport).allows()
        };
        side(f.src, Direction::Egress, f.dst) || side(f.dst, Direction::Ingress, f.src)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use policy_model::compile::CompileOptions;

    const CLUSTER: &str = r#"
namespaces: [{name: app}]
nodes: [{name: n1, ip: 203.0.113.1}, {name: n2, ip: 203.0.113.2}]
pods:
- {namespace: app, name: client, ip: 10.80.1.2, node: n1, labels: {app: client}}
- {namespace: app, name: server, ip: 10.80.2.2, node: n1, labels: {app: server}}
- {namespace: app, name: remote, ip: 10.80.9.2, node: n2, labels: {app: remote}}
"#;

    const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: remote-ingress, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: remote}}
  ingress: [{}]
"#;

    fn model() -> Model {
        let cluster: policy_model::cluster::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, errors, _) = policy_model::api::load(POLICY, Some("test.yaml"));
        assert!(errors.is_empty(), "{errors:?}");
        Model::compile(&cluster, policies, CompileOptions::default())
    }

    fn flow(src: &str, dst: &str, dport: u16, protocol: u8, flags: u32) -> ConntrackFlow {
        ConntrackFlow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dport,
            protocol,
            flags,
            last_seen_ns: 0,
        }
    }

    #[test]
    fn denied_flows_of_local_sides_are_revoked_and_nothing_else() {
        let model = model();
        let local: HashSet<IpAddr> = ["10.80.1.2", "10.80.2.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let e = Enforced {
            model: &model,
            node: "n1",
            local: &local,
        };
        // allowed by the server's ingress
        assert!(!e.denies(&flow("10.80.1.2", "10.80.2.2", 8080, 6, 0)));
        // another port of the server: denied at its ingress
        assert!(e.denies(&flow("10.80.1.2", "10.80.2.2", 8081, 6, 0)));
        assert!(
            e.denies(&flow("10.80.1.2", "10.80.2.2", 8080, 17, 0)),
            "UDP"
        );
        assert!(
            e.denies(&flow("10.80.1.2", "10.80.2.2", 8080, 132, 0)),
            "SCTP"
        );
        // a proxied flow is the proxy's to check
        assert!(!e.denies(&flow("10.80.1.2", "10.80.2.2", 8081, 6, ct_flags::PROXIED)));
        // and so is the proxy's upstream connection to the pod
        assert!(!e.denies(&flow(
            "10.80.1.2",
            "10.80.2.2",
            8081,
            6,
            ct_flags::PROXY_UPSTREAM
        )));
        // ICMP is left to expiry
        assert!(!e.denies(&flow("10.80.1.2", "10.80.2.2", 0, 1, 0)));
        // the remote pod's ingress is its own node's to enforce
        let from_remote_node = Enforced {
            model: &model,
            node: "n1",
            local: &HashSet::new(),
        };
        assert!(!from_remote_node.denies(&flow("10.80.1.2", "10.80.2.2", 8081, 6, 0)));
        // no policy selects the client: its egress allows anything
        assert!(!e.denies(&flow("10.80.1.2", "10.80.9.2", 9999, 6, 0)));
    }
}
