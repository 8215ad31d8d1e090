//! `networking.k8s.io/v1` NetworkPolicy, with the API server's validation and its
//! `policyTypes` defaulting (Ingress always; Egress iff egress rules are present).

use serde::{Deserialize, Serialize};

use super::common::{
    check_except, cidr_selector, in_namespace, k8s_selector, namespace_selector_to_pods,
    parse_cidr, parse_port, IntOrString, PortValue,
};
use crate::error::Errors;
use crate::policy::{
    Action, Direction, ObjectRef, Peers, Policy, Port, PortProto, PortRule, Protocol, Rule,
    Subject, Tier,
};
use crate::selector::LabelSelector;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<NpIngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<NpEgressRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NpIngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<NpPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NpPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NpEgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<NpPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NpPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NpPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

pub fn translate(
    spec: &NetworkPolicySpec,
    object: &ObjectRef,
    namespace: &str,
    errs: &mut Errors,
) -> Option<Policy> {
    let before = errs.list.len();
    let subject = match k8s_selector(&spec.pod_selector) {
        Ok(s) => Some(in_namespace(s, namespace)),
        Err((p, r)) => {
            errs.add(format!("spec.podSelector.{p}"), r);
            None
        }
    };
    // API server defaulting of policyTypes.
    let types = match &spec.policy_types {
        Some(t) => t.clone(),
        None => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            t
        }
    };
    let mut default_deny = [false, false];
    for (i, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => default_deny[0] = true,
            "Egress" => default_deny[1] = true,
            other => errs.add(
                format!("spec.policyTypes[{i}]"),
                format!("{other:?} is not Ingress or Egress"),
            ),
        }
    }
    let mut rules = Vec::new();
    if default_deny[0] {
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let path = format!("spec.ingress[{i}]");
            if let Some(rule) = rule(
                Direction::Ingress,
                &r.from,
                &r.ports,
                namespace,
                &path,
                "from",
                errs,
            ) {
                rules.push(rule);
            }
        }
    }
    if default_deny[1] {
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let path = format!("spec.egress[{i}]");
            if let Some(rule) = rule(
                Direction::Egress,
                &r.to,
                &r.ports,
                namespace,
                &path,
                "to",
                errs,
            ) {
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
        tier: Tier::Namespace,
        priority: 0,
        subject: Subject::Pods(subject?),
        default_deny,
        rules,
        calico: None,
    })
}

fn rule(
    direction: Direction,
    peers_wire: &Option<Vec<NpPeer>>,
    ports_wire: &Option<Vec<NpPort>>,
    namespace: &str,
    path: &str,
    field: &str,
    errs: &mut Errors,
) -> Option<Rule> {
    let before = errs.list.len();
    // An absent or empty peer list matches every source/destination, outside ones too.
    let peers = match peers_wire {
        None => Peers::all(),
        Some(list) if list.is_empty() => Peers::all(),
        Some(list) => {
            let mut peers = Peers::default();
            for (i, p) in list.iter().enumerate() {
                peer(
                    p,
                    namespace,
                    &format!("{path}.{field}[{i}]"),
                    &mut peers,
                    errs,
                );
            }
            peers
        }
    };
    let mut ports = Vec::new();
    for (i, p) in ports_wire.iter().flatten().enumerate() {
        if let Some(pp) = port(p, &format!("{path}.ports[{i}]"), errs) {
            ports.push(pp);
        }
    }
    if errs.list.len() > before {
        return None;
    }
    let ports = if ports.is_empty() {
        Vec::new()
    } else {
        vec![PortRule {
            ports,
            l7: None,
            tls: None,
            path: format!("{path}.ports"),
        }]
    };
    Some(Rule {
        direction,
        action: Action::Allow,
        peers,
        ports,
        path: path.to_string(),
        subject_filter: None,
        not_ports: Vec::new(),
    })
}

fn peer(p: &NpPeer, namespace: &str, path: &str, peers: &mut Peers, errs: &mut Errors) {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => errs.add(
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        ),
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => errs.add(
            path,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        ),
        (None, None, Some(b)) => {
            let net = match parse_cidr(&b.cidr) {
                Ok(n) => n,
                Err(e) => return errs.add(format!("{path}.ipBlock.cidr"), e),
            };
            let mut except = Vec::new();
            for (j, e) in b.except.iter().flatten().enumerate() {
                match parse_cidr(e).and_then(|en| check_except(&net, &en).map(|()| en)) {
                    Ok(en) => except.push(en),
                    Err(err) => errs.add(format!("{path}.ipBlock.except[{j}]"), err),
                }
            }
            peers.selectors.push(cidr_selector(&net, &except));
            peers.cidrs.push(net);
            peers.cidrs.extend(except);
        }
        (pods, nss, None) => {
            let pod_sel = match pods.as_ref().map(k8s_selector).transpose() {
                Ok(s) => s,
                Err((q, r)) => return errs.add(format!("{path}.podSelector.{q}"), r),
            };
            let ns_sel = match nss.as_ref().map(k8s_selector).transpose() {
                Ok(s) => s,
                Err((q, r)) => return errs.add(format!("{path}.namespaceSelector.{q}"), r),
            };
            let sel = match (pod_sel, ns_sel) {
                (Some(pods), None) => in_namespace(pods, namespace),
                (pods, Some(ns)) => {
                    let mut s = namespace_selector_to_pods(&ns);
                    if let Some(pods) = pods {
                        for r in pods.requirements {
                            s = s.with(r.key, r.op);
                        }
                    }
                    s
                }
                (None, None) => return,
            };
            peers.selectors.push(sel);
        }
    }
}

fn port(p: &NpPort, path: &str, errs: &mut Errors) -> Option<PortProto> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            errs.add(
                format!("{path}.protocol"),
                format!("{other:?} is not one of TCP, UDP, SCTP"),
            );
            return None;
        }
    };
    let port = match &p.port {
        None => {
            if p.end_port.is_some() {
                errs.add(format!("{path}.endPort"), "endPort needs a port");
                return None;
            }
            Port::Range(0, u16::MAX)
        }
        Some(v) => match parse_port(v) {
            Err(e) => {
                errs.add(format!("{path}.port"), e);
                return None;
            }
            Ok(PortValue::Number(0)) => {
                errs.add(format!("{path}.port"), "port must be between 1 and 65535");
                return None;
            }
            Ok(PortValue::Name(n)) => {
                if p.end_port.is_some() {
                    errs.add(
                        format!("{path}.endPort"),
                        "endPort may not be set with a named port",
                    );
                    return None;
                }
                Port::Named(n)
            }
            Ok(PortValue::Number(n)) => match p.end_port {
                None => Port::Range(n, n),
                Some(e) => match u16::try_from(e) {
                    Ok(e) if e >= n => Port::Range(n, e),
                    _ => {
                        errs.add(
                            format!("{path}.endPort"),
                            format!("endPort {e} must be a port at least {n}"),
                        );
                        return None;
                    }
                },
            },
        },
    };
    Some(PortProto { protocol, port })
}
