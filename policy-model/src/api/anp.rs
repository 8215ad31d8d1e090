//! `policy.networking.k8s.io` AdminNetworkPolicy and BaselineAdminNetworkPolicy
//! (`v1alpha1`) and ClusterNetworkPolicy (`v1alpha2`): cluster-wide tiers evaluated before
//! (Admin) and after (Baseline) NetworkPolicy, first matching rule wins.

use serde::{Deserialize, Serialize};

use super::common::{
    k8s_selector, namespace_selector_to_pods, network_selector, node_selector, parse_cidr,
};
use crate::error::Errors;
use crate::fqdn::NamePattern;
use crate::policy::{
    Action, Direction, Kind, ObjectRef, Peers, Policy, Port, PortProto, PortRule, Protocol, Rule,
    Subject, Tier,
};
use crate::selector::{LabelSelector, Selector};

const MAX_PRIORITY: i64 = 1000;
const MAX_RULES: usize = 100;
const MAX_PEERS: usize = 100;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminPolicySpec {
    /// v1alpha2 ClusterNetworkPolicy only: `Admin` or `Baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    pub subject: AdminSubject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<AdminRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<AdminRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedPod {
    pub namespace_selector: LabelSelector,
    pub pod_selector: LabelSelector,
}

/// An ingress or egress rule (`from` for ingress, `to` for egress).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminRule {
    #[serde(default)]
    pub name: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<AdminPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<AdminPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<AdminPort>>,
    /// v1alpha2 spelling of ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<AdminProtocol>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_number: Option<PortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortNumber {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub start: i64,
    pub end: i64,
}

/// v1alpha2: `{tcp: {destinationPort: {number | range}}}`, `udp`, `sctp`, or
/// `{destinationNamedPort: name}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtocolPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<DestinationPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<RangeOnly>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeOnly {
    pub start: i64,
    pub end: i64,
}

pub fn translate(spec: &AdminPolicySpec, object: &ObjectRef, errs: &mut Errors) -> Option<Policy> {
    let before = errs.list.len();
    let (tier, allowed_actions): (Tier, &[&str]) = match object.kind {
        Kind::AdminNetworkPolicy => (Tier::Admin, &["Allow", "Deny", "Pass"]),
        Kind::BaselineAdminNetworkPolicy => {
            if object.name != "default" {
                errs.add(
                    "metadata.name",
                    "a BaselineAdminNetworkPolicy must be named \"default\"",
                );
            }
            (Tier::Baseline, &["Allow", "Deny"])
        }
        _ => match spec.tier.as_deref() {
            Some("Admin") => (Tier::Admin, &["Accept", "Deny", "Pass"]),
            Some("Baseline") => (Tier::Baseline, &["Accept", "Deny"]),
            other => {
                errs.add("spec.tier", format!("{other:?} is not Admin or Baseline"));
                (Tier::Admin, &["Accept", "Deny", "Pass"])
            }
        },
    };
    let priority = match (object.kind, spec.priority) {
        (Kind::BaselineAdminNetworkPolicy, None) => 0,
        (Kind::BaselineAdminNetworkPolicy, Some(_)) => {
            errs.add(
                "spec.priority",
                "a BaselineAdminNetworkPolicy has no priority",
            );
            0
        }
        (_, Some(p)) if (0..=MAX_PRIORITY).contains(&p) => p,
        (_, Some(p)) => {
            errs.add(
                "spec.priority",
                format!("priority {p} is out of range 0-{MAX_PRIORITY}"),
            );
            0
        }
        (_, None) => {
            errs.add("spec.priority", "priority is required");
            0
        }
    };
    let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
        (Some(ns), None) => match k8s_selector(ns) {
            Ok(s) => Some(namespace_selector_to_pods(&s)),
            Err((p, r)) => {
                errs.add(format!("spec.subject.namespaces.{p}"), r);
                None
            }
        },
        (None, Some(p)) => namespaced_pods(p, "spec.subject.pods", errs),
        _ => {
            errs.add(
                "spec.subject",
                "exactly one of namespaces or pods is required",
            );
            None
        }
    };
    let mut rules = Vec::new();
    for (dir, list, field) in [
        (Direction::Ingress, &spec.ingress, "ingress"),
        (Direction::Egress, &spec.egress, "egress"),
    ] {
        let list = list.as_deref().unwrap_or_default();
        if list.len() > MAX_RULES {
            errs.add(
                format!("spec.{field}"),
                format!("at most {MAX_RULES} rules"),
            );
        }
        for (i, r) in list.iter().enumerate() {
            let path = format!("spec.{field}[{i}]");
            if let Some(rule) = translate_rule(r, dir, allowed_actions, &path, errs) {
                rules.push(rule);
            }
        }
    }
    if errs.list.len() > before {
        return None;
    }
    Some(Policy {
        object: object.clone(),
        path: "spec".into(),
        tier,
        priority,
        subject: Subject::Pods(subject?),
        default_deny: [false, false],
        rules,
        calico: None,
    })
}

fn namespaced_pods(p: &NamespacedPod, path: &str, errs: &mut Errors) -> Option<Selector> {
    let ns = match k8s_selector(&p.namespace_selector) {
        Ok(s) => s,
        Err((q, r)) => {
            errs.add(format!("{path}.namespaceSelector.{q}"), r);
            return None;
        }
    };
    let pods = match k8s_selector(&p.pod_selector) {
        Ok(s) => s,
        Err((q, r)) => {
            errs.add(format!("{path}.podSelector.{q}"), r);
            return None;
        }
    };
    let mut s = namespace_selector_to_pods(&ns);
    for r in pods.requirements {
        s = s.with(r.key, r.op);
    }
    Some(s)
}

fn translate_rule(
    r: &AdminRule,
    dir: Direction,
    allowed: &[&str],
    path: &str,
    errs: &mut Errors,
) -> Option<Rule> {
    let before = errs.list.len();
    if r.name.len() > 100 {
        errs.add(format!("{path}.name"), "at most 100 characters");
    }
    let action = match r.action.as_str() {
        a if !allowed.contains(&a) => {
            errs.add(
                format!("{path}.action"),
                format!("{a:?} is not one of {}", allowed.join(", ")),
            );
            Action::Deny
        }
        "Allow" | "Accept" => Action::Allow,
        "Deny" => Action::Deny,
        _ => Action::Pass,
    };
    let (field, peers_wire, wrong) = match dir {
        Direction::Ingress => ("from", &r.from, r.to.is_some()),
        Direction::Egress => ("to", &r.to, r.from.is_some()),
    };
    if wrong {
        let other = if dir == Direction::Ingress {
            "to"
        } else {
            "from"
        };
        errs.add(
            format!("{path}.{other}"),
            format!("{dir} rules take `{field}`, not `{other}`"),
        );
    }
    let list = peers_wire.as_deref().unwrap_or_default();
    if list.is_empty() || list.len() > MAX_PEERS {
        errs.add(
            format!("{path}.{field}"),
            format!("between 1 and {MAX_PEERS} peers are required"),
        );
    }
    let mut peers = Peers::default();
    for (i, p) in list.iter().enumerate() {
        peer(p, dir, &format!("{path}.{field}[{i}]"), &mut peers, errs);
    }
    let mut ports = Vec::new();
    if r.ports.is_some() && r.protocols.is_some() {
        errs.add(path, "ports and protocols are mutually exclusive");
    }
    for (i, p) in r.ports.iter().flatten().enumerate() {
        if let Some(pp) = port(p, &format!("{path}.ports[{i}]"), errs) {
            ports.push(pp);
        }
    }
    for (i, p) in r.protocols.iter().flatten().enumerate() {
        if let Some(pp) = protocol(p, &format!("{path}.protocols[{i}]"), errs) {
            ports.push(pp);
        }
    }
    if errs.list.len() > before {
        return None;
    }
    let label = if r.name.is_empty() {
        path.to_string()
    } else {
        format!("{path} ({})", r.name)
    };
    Some(Rule {
        direction: dir,
        action,
        peers,
        ports: if ports.is_empty() {
            Vec::new()
        } else {
            vec![PortRule {
                ports,
                l7: None,
                tls: None,
                path: format!("{path}.ports"),
            }]
        },
        path: label,
        subject_filter: None,
        not_ports: Vec::new(),
    })
}

fn peer(p: &AdminPeer, dir: Direction, path: &str, peers: &mut Peers, errs: &mut Errors) {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.nodes.is_some(),
        p.networks.is_some(),
        p.domain_names.is_some(),
    ];
    if set.iter().filter(|b| **b).count() != 1 {
        return errs.add(
            path,
            "exactly one of namespaces, pods, nodes, networks or domainNames is required",
        );
    }
    if dir == Direction::Ingress
        && (p.nodes.is_some() || p.networks.is_some() || p.domain_names.is_some())
    {
        return errs.add(
            path,
            "nodes, networks and domainNames are egress-only peers",
        );
    }
    if let Some(ns) = &p.namespaces {
        match k8s_selector(ns) {
            Ok(s) => peers.selectors.push(namespace_selector_to_pods(&s)),
            Err((q, r)) => errs.add(format!("{path}.namespaces.{q}"), r),
        }
    }
    if let Some(pods) = &p.pods {
        if let Some(s) = namespaced_pods(pods, &format!("{path}.pods"), errs) {
            peers.selectors.push(s);
        }
    }
    if let Some(nodes) = &p.nodes {
        match node_selector(nodes) {
            Ok(s) => peers.selectors.push(s),
            Err((q, r)) => errs.add(format!("{path}.nodes.{q}"), r),
        }
    }
    for (i, n) in p.networks.iter().flatten().enumerate() {
        match parse_cidr(n) {
            Ok(net) => {
                peers.selectors.push(network_selector(&net));
                peers.networks.push(net);
            }
            Err(e) => errs.add(format!("{path}.networks[{i}]"), e),
        }
    }
    for (i, d) in p.domain_names.iter().flatten().enumerate() {
        // Kubernetes' `*.example.com` is recursive: Cilium turns it into `**.`.
        let pattern = match d.strip_prefix("*.") {
            Some(rest) => format!("**.{rest}"),
            None => d.clone(),
        };
        match NamePattern::pattern(&pattern) {
            Ok(p) => peers.fqdns.push(p.text),
            Err(e) => errs.add(format!("{path}.domainNames[{i}]"), e),
        }
    }
}

fn proto(s: Option<&str>, path: &str, errs: &mut Errors) -> Option<Protocol> {
    match s {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(other) => {
            errs.add(
                format!("{path}.protocol"),
                format!("{other:?} is not one of TCP, UDP, SCTP"),
            );
            None
        }
    }
}

fn port_num(n: i64, path: &str, errs: &mut Errors) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            errs.add(path, format!("port {n} is out of range 1-65535"));
            None
        }
    }
}

fn range(start: i64, end: i64, path: &str, errs: &mut Errors) -> Option<Port> {
    let s = port_num(start, &format!("{path}.start"), errs)?;
    let e = port_num(end, &format!("{path}.end"), errs)?;
    if s > e {
        errs.add(path, format!("start {s} is above end {e}"));
        return None;
    }
    Some(Port::Range(s, e))
}

fn port(p: &AdminPort, path: &str, errs: &mut Errors) -> Option<PortProto> {
    match (&p.port_number, &p.named_port, &p.port_range) {
        (Some(n), None, None) => Some(PortProto {
            protocol: proto(n.protocol.as_deref(), &format!("{path}.portNumber"), errs)?,
            port: port_num(n.port, &format!("{path}.portNumber.port"), errs)
                .map(|p| Port::Range(p, p))?,
        }),
        (None, Some(name), None) => Some(PortProto {
            // a named port takes its protocol from the container port
            protocol: Protocol::Any,
            port: Port::Named(name.to_ascii_lowercase()),
        }),
        (None, None, Some(r)) => Some(PortProto {
            protocol: proto(r.protocol.as_deref(), &format!("{path}.portRange"), errs)?,
            port: range(r.start, r.end, &format!("{path}.portRange"), errs)?,
        }),
        _ => {
            errs.add(
                path,
                "exactly one of portNumber, namedPort or portRange is required",
            );
            None
        }
    }
}

fn protocol(p: &AdminProtocol, path: &str, errs: &mut Errors) -> Option<PortProto> {
    let set: Vec<(Protocol, &ProtocolPort, &str)> = [
        (Protocol::Tcp, &p.tcp, "tcp"),
        (Protocol::Udp, &p.udp, "udp"),
        (Protocol::Sctp, &p.sctp, "sctp"),
    ]
    .into_iter()
    .filter_map(|(pr, v, n)| v.as_ref().map(|v| (pr, v, n)))
    .collect();
    match (set.as_slice(), &p.destination_named_port) {
        ([(protocol, pp, name)], None) => {
            let path = format!("{path}.{name}.destinationPort");
            let port = match &pp.destination_port {
                None => Port::Range(0, u16::MAX),
                Some(DestinationPort {
                    number: Some(n),
                    range: None,
                }) => {
                    let n = port_num(*n, &format!("{path}.number"), errs)?;
                    Port::Range(n, n)
                }
                Some(DestinationPort {
                    number: None,
                    range: Some(r),
                }) => range(r.start, r.end, &format!("{path}.range"), errs)?,
                Some(_) => {
                    errs.add(path, "exactly one of number or range is required");
                    return None;
                }
            };
            Some(PortProto {
                protocol: *protocol,
                port,
            })
        }
        ([], Some(name)) => Some(PortProto {
            protocol: Protocol::Any,
            port: Port::Named(name.to_ascii_lowercase()),
        }),
        _ => {
            errs.add(
                path,
                "exactly one of tcp, udp, sctp or destinationNamedPort is required",
            );
            None
        }
    }
}
