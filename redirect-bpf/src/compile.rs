//! From a compiled endpoint policy (policy-model) to policy map entries.
//!
//! No policy semantics live here: for every peer class (`classes`: identities the node's
//! policies treat alike) and protocol, the port space is cut at every boundary an entry
//! could change the verdict at, and policy-model's own `Model::decide` is asked for the
//! verdict of each piece for one identity of the class. Pieces that differ from the
//! direction's default (deny when a policy put the endpoint in default deny, allow
//! otherwise) become entries; port ranges become port prefixes; what every class shares
//! becomes one wildcard entry (`IDENTITY_ANY`). The pieces of one class never overlap, so
//! the datapath's precedence (deny > redirect > allow across the class and wildcard
//! lookups) never has to break a tie between them.

use std::collections::BTreeSet;

use policy_model::compile::{EndpointPolicy, PortMatch};
use policy_model::identity::Idx;

use crate::classes::PeerClasses;
use policy_model::l7::L7Protocol;
use policy_model::verdict::L4Decision;
use policy_model::{Direction, Model, Protocol};
use redirect_bpf_common::{
    action, endpoint_flags, PolicyKeyData, PolicyValue, DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

/// Ports of the proxies on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyPorts {
    pub http: u16,
    pub dns: u16,
}

/// One policy map entry: `key.port` holds the first port of a block of
/// `2^(16 - port_prefix_len)` ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    pub endpoint_id: u32,
    /// Peer class, peer identity (entries written before classes), or `IDENTITY_ANY`.
    pub peer: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port: u16,
    /// 0 (every port) ..= 16 (one port).
    pub port_prefix_len: u8,
    pub action: u8,
    pub proxy_port: u16,
    pub cookie: u32,
}

/// What identifies a policy map entry: everything but its value (endpoint, peer,
/// direction, protocol, port, port prefix length).
pub type PolicyEntryKey = (u32, u32, u8, u8, u16, u8);

impl PolicyEntry {
    /// The entry's key: two entries with the same key are one map entry.
    pub fn key(&self) -> PolicyEntryKey {
        (
            self.endpoint_id,
            self.peer,
            self.direction,
            self.protocol,
            self.port,
            self.port_prefix_len,
        )
    }

    pub fn key_data(&self) -> PolicyKeyData {
        PolicyKeyData {
            endpoint_id: self.endpoint_id,
            peer: self.peer,
            direction: self.direction,
            protocol: self.protocol,
            port: self.port.to_be_bytes(),
        }
    }

    pub fn value(&self) -> PolicyValue {
        PolicyValue {
            action: self.action,
            _pad: 0,
            proxy_port: self.proxy_port,
            cookie: self.cookie,
        }
    }
}

/// What the maps need for one endpoint: the flags of its endpoints-map entry and its
/// policy entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointEntries {
    pub flags: u32,
    pub entries: Vec<PolicyEntry>,
}

/// Protocols the datapath enforces, with what policy keys call their port: the
/// destination port, and the type for ICMP (as policy-model's ICMP entries do).
const PORT_PROTOCOLS: [(Protocol, u8); 5] = [
    (Protocol::Tcp, PROTO_TCP),
    (Protocol::Udp, PROTO_UDP),
    (Protocol::Sctp, PROTO_SCTP),
    (Protocol::Icmp, PROTO_ICMP),
    (Protocol::IcmpV6, PROTO_ICMPV6),
];

/// (action, proxy port, cookie) of one piece of port space.
type Piece = (u8, u16, u32);

/// A piece of one protocol's port space: (protocol, first port, last port, verdict).
type Span = (u8, u16, u16, Piece);

/// Turns one endpoint's compiled policy into the flags and policy entries the datapath
/// executes. `endpoint_id` is the id the agent gave the endpoint in the endpoints map;
/// `classes` are the node's peer classes (computed with this endpoint among the node's).
pub fn endpoint_entries(
    model: &Model,
    ep: &EndpointPolicy,
    endpoint_id: u32,
    proxies: ProxyPorts,
    classes: &PeerClasses,
) -> EndpointEntries {
    let mut out = EndpointEntries::default();
    for dir in Direction::BOTH {
        let d = &ep.dirs[dir.index()];
        let default_deny = !d.default_deny.is_empty();
        let (dir_code, flag) = match dir {
            Direction::Ingress => (DIR_INGRESS, endpoint_flags::DEFAULT_DENY_INGRESS),
            Direction::Egress => (DIR_EGRESS, endpoint_flags::DEFAULT_DENY_EGRESS),
        };
        if default_deny {
            out.flags |= flag;
        }
        let default_action = if default_deny {
            action::DENY
        } else {
            action::ALLOW
        };
        // Per class: the non-default pieces (protocol, first port, last port, piece).
        let mut per_class: Vec<(u32, BTreeSet<Span>)> = Vec::new();
        for (class, idx) in classes.classes() {
            let mut pieces = BTreeSet::new();
            for (proto, proto_code) in PORT_PROTOCOLS {
                for (lo, hi, piece) in port_pieces(model, ep, dir, idx, proto, proxies) {
                    if piece.0 != default_action || piece.1 != 0 {
                        pieces.insert((proto_code, lo, hi, piece));
                    }
                }
            }
            per_class.push((class, pieces));
        }
        // What every class has in common goes to the wildcard identity once.
        let common: BTreeSet<Span> = match per_class.split_first() {
            Some((first, rest)) => first
                .1
                .iter()
                .filter(|p| rest.iter().all(|(_, s)| s.contains(p)))
                .copied()
                .collect(),
            None => BTreeSet::new(),
        };
        let mut emit = |peer: u32, (protocol, lo, hi, (act, proxy_port, cookie))| {
            for (port, port_prefix_len) in port_blocks(lo, hi) {
                out.entries.push(PolicyEntry {
                    endpoint_id,
                    peer,
                    direction: dir_code,
                    protocol,
                    port,
                    port_prefix_len,
                    action: act,
                    proxy_port,
                    cookie,
                });
            }
        };
        for p in &common {
            emit(IDENTITY_ANY, *p);
        }
        for (class, pieces) in &per_class {
            for p in pieces.difference(&common) {
                emit(*class, *p);
            }
        }
    }
    out.entries.sort();
    out
}

/// The port space of one protocol cut into maximal runs of equal verdict.
fn port_pieces(
    model: &Model,
    ep: &EndpointPolicy,
    dir: Direction,
    peer: Idx,
    proto: Protocol,
    proxies: ProxyPorts,
) -> Vec<(u16, u16, Piece)> {
    // Boundaries where a verdict may change: every range start and end + 1, and the
    // named ports of the peer.
    let mut cuts: BTreeSet<u32> = BTreeSet::from([0]);
    for e in &ep.dirs[dir.index()].entries {
        match &e.port {
            PortMatch::Range(a, b) => {
                cuts.insert(u32::from(*a));
                cuts.insert(u32::from(*b) + 1);
            }
            PortMatch::Named(name) => {
                for cp in &model.identities.get(peer).named_ports {
                    if cp
                        .name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                    {
                        cuts.insert(u32::from(cp.port));
                        cuts.insert(u32::from(cp.port) + 1);
                    }
                }
            }
        }
    }
    cuts.insert(65536);
    let cuts: Vec<u32> = cuts.into_iter().filter(|c| *c <= 65536).collect();
    let mut out: Vec<(u16, u16, Piece)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
        let piece = piece_of(
            model,
            ep,
            dir,
            model.decide(ep, dir, peer, proto, lo),
            proxies,
        );
        match out.last_mut() {
            Some(last) if last.2 == piece && u32::from(last.1) + 1 == u32::from(lo) => last.1 = hi,
            _ => out.push((lo, hi, piece)),
        }
    }
    out
}

fn piece_of(
    model: &Model,
    ep: &EndpointPolicy,
    dir: Direction,
    d: L4Decision,
    proxies: ProxyPorts,
) -> Piece {
    let entries = &ep.dirs[dir.index()].entries;
    // Cookie: 1 + index of the deciding policy, 0 for a default.
    let cookie = |i: usize| entries.get(i).map_or(0, |e| e.origin.policy + 1);
    match d {
        L4Decision::NoPolicy | L4Decision::DefaultAllow => (action::ALLOW, 0, 0),
        L4Decision::Allow(i)
        | L4Decision::Redirect {
            allow_all: Some(i), ..
        } => (action::ALLOW, 0, cookie(i)),
        L4Decision::Deny(i) => (action::DENY, 0, cookie(i)),
        L4Decision::DefaultDeny { .. } => (action::DENY, 0, 0),
        L4Decision::Redirect {
            sets,
            allow_all: None,
        } => {
            // One proxy per flow: DNS rules win (the DNS proxy must see the answers).
            let dns = sets
                .iter()
                .any(|(_, s)| model.l7[*s as usize].rules.protocol() == L7Protocol::Dns);
            let port = if dns { proxies.dns } else { proxies.http };
            let first = sets.first().map_or(0, |(i, _)| cookie(*i));
            (action::REDIRECT, port, first)
        }
    }
}

/// Splits the inclusive range `lo..=hi` into aligned power-of-two blocks:
/// (first port, prefix length).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest block aligned at lo that fits.
        let mut size: u32 = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_model::conformance::parse_case;

    const CASE: &str = r#"
format: netpol-oracle/v1
id: 900
name: datapath-entries
title: a small model for the map compiler
semantics: cilium
cluster:
  namespaces:
  - {name: default, labels: {}}
  nodes:
  - {name: node-1, ip: 172.18.0.2}
  pods:
  - {namespace: default, name: client, labels: {app: client}, ip: 10.0.0.1, node: node-1, ports: []}
  - {namespace: default, name: other, labels: {app: other}, ip: 10.0.0.2, node: node-1, ports: []}
  - namespace: default
    name: server
    labels: {app: server}
    ip: 10.0.0.3
    node: node-1
    ports:
    - {name: metrics, port: 9100, protocol: TCP}
  externals: []
policies:
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: server-in, namespace: default}
  spec:
    endpointSelector: {matchLabels: {app: server}}
    ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
      - ports: [{port: '80', protocol: TCP}, {port: '8000', endPort: 8100, protocol: TCP}]
      - ports: [{port: '9090', protocol: TCP}]
        rules:
          http: [{method: GET, path: /}]
    - fromEntities: [all]
      toPorts:
      - ports: [{port: '53', protocol: UDP}]
    ingressDeny:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
      - ports: [{port: '8050', protocol: TCP}]
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: client-out, namespace: default}
  spec:
    endpointSelector: {matchLabels: {app: client}}
    enableDefaultDeny: {egress: false}
    egressDeny:
    - toEndpoints: [{matchLabels: {app: other}}]
probes:
- {from: default/client, to: default/server, port: 80, protocol: TCP, expect: allow}
"#;

    const PROXIES: ProxyPorts = ProxyPorts {
        http: 15001,
        dns: 15053,
    };

    /// What the datapath does with the entries: an LPM lookup for the identity's class
    /// (the identity itself without one) and for the wildcard, the greatest action wins,
    /// else the direction's default.
    fn datapath_verdict(
        out: &EndpointEntries,
        classes: &PeerClasses,
        dir: u8,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> (u8, u16) {
        let class = classes.class_of(identity).unwrap_or(identity);
        let lpm = |id: u32| {
            out.entries
                .iter()
                .filter(|e| e.peer == id && e.direction == dir && e.protocol == protocol)
                .filter(|e| {
                    let shift = 16 - u32::from(e.port_prefix_len);
                    u32::from(e.port) >> shift == u32::from(port) >> shift
                })
                .max_by_key(|e| e.port_prefix_len)
                .map(|e| (e.action, e.proxy_port))
        };
        let found = [lpm(class), lpm(IDENTITY_ANY)]
            .into_iter()
            .flatten()
            .max_by_key(|(a, _)| *a);
        found.unwrap_or_else(|| {
            let flag = if dir == DIR_INGRESS {
                endpoint_flags::DEFAULT_DENY_INGRESS
            } else {
                endpoint_flags::DEFAULT_DENY_EGRESS
            };
            if out.flags & flag != 0 {
                (action::DENY, 0)
            } else {
                (action::ALLOW, 0)
            }
        })
    }

    /// The classes of every endpoint of the model (one node).
    fn node_classes(model: &Model) -> PeerClasses {
        let eps: Vec<&EndpointPolicy> = model.endpoints().collect();
        PeerClasses::compute(model, &eps, &Default::default())
    }

    #[test]
    fn entries_reproduce_the_model_verdicts() {
        let case = parse_case(CASE).expect("case");
        let model = case.compile(None, None).expect("compile");
        let classes = node_classes(&model);
        let mut ports: Vec<u16> = (0..=1100).collect();
        ports.extend([
            7999, 8000, 8049, 8050, 8051, 8100, 8101, 9089, 9090, 9091, 9100,
        ]);
        ports.extend([9101, 65534, 65535]);
        for pod in ["default/client", "default/other", "default/server"] {
            let ep = model.pod_endpoint(pod).expect("endpoint");
            let out = endpoint_entries(&model, ep, 1, PROXIES, &classes);
            for dir in Direction::BOTH {
                let code = if dir == Direction::Ingress {
                    DIR_INGRESS
                } else {
                    DIR_EGRESS
                };
                for idx in 0..model.identities.len() as Idx {
                    let id = model.identities.get(idx).id;
                    for (proto, proto_code) in PORT_PROTOCOLS {
                        for &port in &ports {
                            let want = piece_of(
                                &model,
                                ep,
                                dir,
                                model.decide(ep, dir, idx, proto, port),
                                PROXIES,
                            );
                            let got = datapath_verdict(&out, &classes, code, id, proto_code, port);
                            assert_eq!(
                                got,
                                (want.0, want.1),
                                "{pod} {dir} identity {id} {proto:?}/{port}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn entries_of_the_small_model() {
        let case = parse_case(CASE).expect("case");
        let model = case.compile(None, None).expect("compile");
        let id_of = |pod: &str| {
            let ep = model.pod_endpoint(pod).expect("endpoint");
            model.identities.get(ep.identity).id
        };
        let classes = node_classes(&model);
        let class_of = |pod: &str| classes.class_of(id_of(pod)).expect("a class");
        let client = class_of("default/client");
        let other = class_of("default/other");
        assert_ne!(client, other);

        let server = model.pod_endpoint("default/server").expect("server");
        let out = endpoint_entries(&model, server, 3, PROXIES, &classes);
        assert_eq!(out.flags, endpoint_flags::DEFAULT_DENY_INGRESS);
        let ingress = |identity: u32| -> Vec<(u8, u16, u8, u8, u16)> {
            out.entries
                .iter()
                .filter(|e| e.direction == DIR_INGRESS && e.peer == identity)
                .map(|e| {
                    (
                        e.protocol,
                        e.port,
                        e.port_prefix_len,
                        e.action,
                        e.proxy_port,
                    )
                })
                .collect()
        };
        // Everyone (the wildcard identity): UDP 53 only.
        assert_eq!(
            ingress(IDENTITY_ANY),
            vec![(PROTO_UDP, 53, 16, action::ALLOW, 0)]
        );
        // The client: TCP 80, 8000..=8100 without the denied 8050, 9090 via the proxy.
        let c = ingress(client);
        assert!(c.contains(&(PROTO_TCP, 80, 16, action::ALLOW, 0)));
        assert!(c.contains(&(PROTO_TCP, 8032, 12, action::ALLOW, 0)));
        assert!(c.contains(&(PROTO_TCP, 9090, 16, action::REDIRECT, 15001)));
        assert!(!c.iter().any(|e| e.0 == PROTO_TCP && e.1 == 8050));
        assert!(ingress(other).is_empty());
        assert!(out.entries.iter().all(|e| e.endpoint_id == 3));

        // The client's egress: default allow with a deny of every port towards `other`.
        let cl = model.pod_endpoint("default/client").expect("client");
        let out = endpoint_entries(&model, cl, 1, PROXIES, &classes);
        assert_eq!(out.flags, 0);
        let egress: Vec<_> = out
            .entries
            .iter()
            .filter(|e| e.direction == DIR_EGRESS)
            .map(|e| (e.peer, e.protocol, e.port_prefix_len, e.action))
            .collect();
        assert_eq!(
            egress,
            vec![
                (other, PROTO_ICMP, 0, action::DENY),
                (other, PROTO_TCP, 0, action::DENY),
                (other, PROTO_UDP, 0, action::DENY),
                (other, PROTO_ICMPV6, 0, action::DENY),
                (other, PROTO_SCTP, 0, action::DENY),
            ]
        );
    }

    #[test]
    fn port_blocks_cover_ranges_exactly() {
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(8080, 8083), vec![(8080, 14)]);
        assert_eq!(port_blocks(1, 6), vec![(1, 16), (2, 15), (4, 15), (6, 16)]);
        for (lo, hi) in [
            (0u16, 0u16),
            (3, 1000),
            (1024, 65535),
            (65535, 65535),
            (7, 9),
        ] {
            let blocks = port_blocks(lo, hi);
            let mut covered = 0u32;
            let mut next = u32::from(lo);
            for (start, len) in blocks {
                assert_eq!(u32::from(start), next, "contiguous");
                let size = 1u32 << (16 - u32::from(len));
                assert_eq!(u32::from(start) % size, 0, "aligned");
                next += size;
                covered += size;
            }
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1);
        }
    }
}
