//! `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy: wire types,
//! validation (reference section 1.6) and translation to the internal form.

use serde::{Deserialize, Serialize};

use super::common::{
    check_except, cidr_selector, in_namespace, node_selector, parse_cidr, parse_port, reserved,
    IntOrString, PortValue,
};
use crate::error::Errors;
use crate::fqdn::NamePattern;
use crate::http::{FullMatch, HeaderMatch, HeaderRule, HttpRule, Mismatch};
use crate::l7::L7Rules;
use crate::labels::{well_known, Key, Source};
use crate::policy::{
    Action, Direction, Kind, ObjectRef, Peers, Policy, Port, PortProto, PortRule, Protocol, Rule,
    Subject, Tier,
};
use crate::selector::{LabelSelector, Op, Selector};
use crate::tls::{self, SecretRef as TlsSecret, SniPattern, TlsRole, TlsRule};

const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

/// The `spec` / `specs[i]` of a CNP or CCNP (Cilium's `api.Rule`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "has(self.endpointSelector) != has(self.nodeSelector)",
        "message": "exactly one of endpointSelector or nodeSelector is required"
    }]))
)]
pub struct CiliumRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<EgressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<RuleLabel>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDenyConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleLabel {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DefaultDenyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub value: String,
}

/// `ingress[i]` and `ingressDeny[i]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    #[serde(
        rename = "fromEndpoints",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    #[serde(rename = "fromCIDR", default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(
        rename = "fromCIDRSet",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(
        rename = "fromEntities",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schema", schemars(schema_with = "entities_schema"))]
    pub from_entities: Option<Vec<String>>,
    #[serde(rename = "fromNodes", default, skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Vec<LabelSelector>>,
    #[serde(
        rename = "fromGroups",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub from_groups: Option<Vec<serde_json::Value>>,
    #[serde(
        rename = "fromRequires",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub from_requires: Option<Vec<LabelSelector>>,
    #[serde(rename = "toPorts", default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRuleWire>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

/// `egress[i]` and `egressDeny[i]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    #[serde(
        rename = "toEndpoints",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(rename = "toCIDR", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(
        rename = "toEntities",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schema", schemars(schema_with = "entities_schema"))]
    pub to_entities: Option<Vec<String>>,
    #[serde(rename = "toNodes", default, skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Vec<LabelSelector>>,
    #[serde(rename = "toGroups", default, skip_serializing_if = "Option::is_none")]
    pub to_groups: Option<Vec<serde_json::Value>>,
    #[serde(
        rename = "toRequires",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub to_requires: Option<Vec<LabelSelector>>,
    #[serde(
        rename = "toServices",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub to_services: Option<Vec<serde_json::Value>>,
    #[serde(rename = "toFQDNs", default, skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    #[serde(rename = "toPorts", default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRuleWire>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CidrRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(
        rename = "cidrGroupRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cidr_group_ref: Option<String>,
    #[serde(
        rename = "cidrGroupSelector",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cidr_group_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FqdnSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Authentication {
    pub mode: String,
}

/// `toPorts[i]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRuleWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = 40)))]
    pub ports: Option<Vec<PortProtocol>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7RulesWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_names: Option<Vec<String>>,
    #[serde(
        rename = "terminatingTLS",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub terminating_tls: Option<TlsContext>,
    #[serde(
        rename = "originatingTLS",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub originating_tls: Option<TlsContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(extend("enum" = ["TCP", "UDP", "SCTP", "ANY", ""])))]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
    #[serde(rename = "trustedCA", default, skip_serializing_if = "Option::is_none")]
    pub trusted_ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct L7RulesWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRuleWire>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<FqdnSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7proto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<Vec<serde_json::Value>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRuleWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_matches: Option<Vec<HeaderMatchWire>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchWire {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IcmpRule {
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = 40)))]
    pub fields: Vec<IcmpField>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IcmpField {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(rename = "type")]
    pub icmp_type: IntOrString,
}

/// The entities of reference section 1.4 that the CRD accepts.
pub const ENTITIES: [&str; 11] = [
    "all",
    "world",
    "cluster",
    "host",
    "init",
    "ingress",
    "unmanaged",
    "remote-node",
    "health",
    "none",
    "kube-apiserver",
];

/// `fromEntities` / `toEntities`: a list of the entities above.
#[cfg(feature = "schema")]
fn entities_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": { "type": "string", "enum": ENTITIES },
    })
}

/// Selectors for an entity.
pub fn entity_selectors(entity: &str) -> Vec<Selector> {
    match entity {
        "all" => vec![Selector::all()],
        "cluster" => {
            let mut v = vec![Selector::all().with(
                Key::new(Source::K8s, well_known::POLICY_CLUSTER),
                Op::In(vec![well_known::CLUSTER_NAME.into()]),
            )];
            for r in [
                "host",
                "remote-node",
                "init",
                "health",
                "unmanaged",
                "ingress",
                "kube-apiserver",
            ] {
                v.push(reserved(r));
            }
            v
        }
        other => vec![reserved(other)],
    }
}

/// Translates one CNP/CCNP spec. `namespace` is the CNP's namespace (None for a CCNP).
pub fn translate_rule(
    rule: &CiliumRule,
    object: &ObjectRef,
    namespace: Option<&str>,
    path: &str,
    errs: &mut Errors,
) -> Option<Policy> {
    let before = errs.list.len();
    let subject = match (&rule.endpoint_selector, &rule.node_selector) {
        (Some(_), Some(_)) => {
            errs.add(
                path,
                "endpointSelector and nodeSelector are mutually exclusive",
            );
            None
        }
        (None, None) => {
            errs.add(path, "one of endpointSelector or nodeSelector is required");
            None
        }
        (Some(es), None) => match Selector::compile(es, true) {
            Ok(sel) => Some(Subject::Pods(match namespace {
                // A CNP only ever selects pods of its own namespace.
                Some(ns) => in_namespace(sel.without(well_known::POD_NAMESPACE), ns),
                None => sel,
            })),
            Err(e) => {
                errs.add(format!("{path}.endpointSelector.{}", e.path), e.reason);
                None
            }
        },
        (None, Some(ns_sel)) => {
            if namespace.is_some() {
                errs.add(
                    format!("{path}.nodeSelector"),
                    "rule cannot have nodeSelector: host policies are CiliumClusterwideNetworkPolicy only",
                );
                None
            } else {
                match node_selector(ns_sel) {
                    Ok(s) => Some(Subject::Nodes(s)),
                    Err((p, r)) => {
                        errs.add(format!("{path}.nodeSelector.{p}"), r);
                        None
                    }
                }
            }
        }
    };
    let host_policy = matches!(subject, Some(Subject::Nodes(_)));
    let len_i = |v: &Option<Vec<IngressRule>>| v.as_ref().map_or(0, Vec::len);
    let len_e = |v: &Option<Vec<EgressRule>>| v.as_ref().map_or(0, Vec::len);
    let n_ingress = len_i(&rule.ingress) + len_i(&rule.ingress_deny);
    let n_egress = len_e(&rule.egress) + len_e(&rule.egress_deny);
    if rule.ingress.is_none()
        && rule.ingress_deny.is_none()
        && rule.egress.is_none()
        && rule.egress_deny.is_none()
    {
        errs.add(
            path,
            "rule must have at least one of ingress, ingressDeny, egress, egressDeny",
        );
    }
    if let Some(log) = &rule.log {
        if log.value.chars().count() > 32 || log.value.chars().any(char::is_control) {
            errs.add(
                format!("{path}.log.value"),
                "at most 32 printable characters",
            );
        }
    }
    for (i, l) in rule.labels.iter().flatten().enumerate() {
        if l.key.is_empty() {
            errs.add(format!("{path}.labels[{i}].key"), "a label needs a key");
        }
    }

    let ctx = RuleCtx {
        namespace,
        host_policy,
    };
    let mut rules = Vec::new();
    for (field, deny) in [("ingress", false), ("ingressDeny", true)] {
        let list = if deny {
            &rule.ingress_deny
        } else {
            &rule.ingress
        };
        for (i, r) in list.iter().flatten().enumerate() {
            let p = format!("{path}.{field}[{i}]");
            if let Some(r) = ctx.ingress(r, deny, &p, errs) {
                rules.push(r);
            }
        }
    }
    for (field, deny) in [("egress", false), ("egressDeny", true)] {
        let list = if deny {
            &rule.egress_deny
        } else {
            &rule.egress
        };
        for (i, r) in list.iter().flatten().enumerate() {
            let p = format!("{path}.{field}[{i}]");
            if let Some(r) = ctx.egress(r, deny, &p, errs) {
                rules.push(r);
            }
        }
    }
    let dd = rule.enable_default_deny.clone().unwrap_or_default();
    let default_deny = [
        dd.ingress.unwrap_or(n_ingress > 0),
        dd.egress.unwrap_or(n_egress > 0),
    ];
    if errs.list.len() > before {
        return None;
    }
    Some(Policy {
        object: object.clone(),
        path: path.to_string(),
        tier: Tier::Namespace,
        priority: 0,
        subject: subject?,
        default_deny,
        rules,
        calico: None,
    })
}

struct RuleCtx<'a> {
    namespace: Option<&'a str>,
    host_policy: bool,
}

impl RuleCtx<'_> {
    /// Cilium's `getEndpointSelector`: a peer selector of a CNP is limited to the
    /// policy's namespace unless it names a namespace (or namespace labels); a CCNP peer
    /// selector must select a pod with some namespace. Reserved selectors stay as written.
    fn peer_selector(
        &self,
        sel: &LabelSelector,
        path: &str,
        errs: &mut Errors,
    ) -> Option<Selector> {
        let s = match Selector::compile(sel, true) {
            Ok(s) => s,
            Err(e) => {
                errs.add(format!("{path}.{}", e.path), e.reason);
                return None;
            }
        };
        if s.has_source(&Source::Reserved) {
            return Some(s);
        }
        let names_ns = s.has_key(&Key::new(Source::K8s, well_known::POD_NAMESPACE))
            || s.has_key(&Key::new(Source::Any, well_known::POD_NAMESPACE));
        if names_ns {
            return Some(s);
        }
        Some(match self.namespace {
            None => s.with(Key::new(Source::K8s, well_known::POD_NAMESPACE), Op::Exists),
            Some(ns) => {
                let ns_labels = s.has_key_prefix(&Source::K8s, well_known::NAMESPACE_LABELS_PREFIX)
                    || s.has_key_prefix(&Source::Any, well_known::NAMESPACE_LABELS_PREFIX);
                if ns_labels {
                    s
                } else {
                    in_namespace(s, ns)
                }
            }
        })
    }

    fn ingress(&self, r: &IngressRule, deny: bool, path: &str, errs: &mut Errors) -> Option<Rule> {
        let before = errs.list.len();
        let l3 = [
            ("fromEndpoints", r.from_endpoints.is_some()),
            ("fromCIDR", r.from_cidr.is_some()),
            ("fromCIDRSet", r.from_cidr_set.is_some()),
            ("fromEntities", r.from_entities.is_some()),
            ("fromNodes", r.from_nodes.is_some()),
            ("fromGroups", r.from_groups.is_some()),
        ];
        one_peer_type(&l3, path, errs);
        if r.from_requires.as_ref().is_some_and(|v| !v.is_empty()) {
            errs.add(
                format!("{path}.fromRequires"),
                "fromRequires was removed in Cilium 1.19; use an explicit selector",
            );
        }
        unsupported(
            &r.from_nodes,
            path,
            "fromNodes",
            "node selector labels are not enabled (Cilium's --enable-node-selector-labels)",
            errs,
        );
        unsupported(
            &r.from_groups,
            path,
            "fromGroups",
            "cloud provider groups are not supported",
            errs,
        );
        let mut peers = Peers::default();
        let any_l3 = l3.iter().any(|(_, set)| *set);
        for (i, s) in r.from_endpoints.iter().flatten().enumerate() {
            if let Some(sel) = self.peer_selector(s, &format!("{path}.fromEndpoints[{i}]"), errs) {
                peers.selectors.push(sel);
            }
        }
        cidrs(
            &r.from_cidr,
            &r.from_cidr_set,
            path,
            "from",
            &mut peers,
            errs,
        );
        entities(
            &r.from_entities,
            &format!("{path}.fromEntities"),
            &mut peers,
            errs,
        );
        let ports = self.ports(&r.to_ports, &r.icmps, Direction::Ingress, deny, path, errs);
        authentication(&r.authentication, path, errs);
        if !any_l3 && !ports.is_empty() {
            peers = Peers::all();
        }
        if errs.list.len() > before {
            return None;
        }
        Some(Rule {
            direction: Direction::Ingress,
            action: if deny { Action::Deny } else { Action::Allow },
            peers,
            ports,
            path: path.to_string(),
            subject_filter: None,
            not_ports: Vec::new(),
        })
    }

    fn egress(&self, r: &EgressRule, deny: bool, path: &str, errs: &mut Errors) -> Option<Rule> {
        let before = errs.list.len();
        let l3 = [
            ("toEndpoints", r.to_endpoints.is_some()),
            ("toCIDR", r.to_cidr.is_some()),
            ("toCIDRSet", r.to_cidr_set.is_some()),
            ("toEntities", r.to_entities.is_some()),
            ("toNodes", r.to_nodes.is_some()),
            ("toGroups", r.to_groups.is_some()),
            ("toServices", r.to_services.is_some()),
            ("toFQDNs", r.to_fqdns.is_some()),
        ];
        one_peer_type(&l3, path, errs);
        if r.to_requires.as_ref().is_some_and(|v| !v.is_empty()) {
            errs.add(
                format!("{path}.toRequires"),
                "toRequires was removed in Cilium 1.19; use an explicit selector",
            );
        }
        unsupported(
            &r.to_nodes,
            path,
            "toNodes",
            "node selector labels are not enabled (Cilium's --enable-node-selector-labels)",
            errs,
        );
        unsupported(
            &r.to_groups,
            path,
            "toGroups",
            "cloud provider groups are not supported",
            errs,
        );
        unsupported(
            &r.to_services,
            path,
            "toServices",
            "Services are not modelled yet; select the backing pods with toEndpoints",
            errs,
        );
        if deny && r.to_fqdns.is_some() {
            errs.add(format!("{path}.toFQDNs"), "deny rules cannot use toFQDNs");
        }
        let mut peers = Peers::default();
        let any_l3 = l3.iter().any(|(_, set)| *set);
        for (i, s) in r.to_endpoints.iter().flatten().enumerate() {
            if let Some(sel) = self.peer_selector(s, &format!("{path}.toEndpoints[{i}]"), errs) {
                peers.selectors.push(sel);
            }
        }
        cidrs(&r.to_cidr, &r.to_cidr_set, path, "to", &mut peers, errs);
        entities(
            &r.to_entities,
            &format!("{path}.toEntities"),
            &mut peers,
            errs,
        );
        for (i, f) in r.to_fqdns.iter().flatten().enumerate() {
            if let Some(p) = fqdn_selector(f, &format!("{path}.toFQDNs[{i}]"), errs) {
                peers.fqdns.push(p.text);
            }
        }
        let ports = self.ports(&r.to_ports, &r.icmps, Direction::Egress, deny, path, errs);
        authentication(&r.authentication, path, errs);
        if !any_l3 && !ports.is_empty() {
            peers = Peers::all();
        }
        if errs.list.len() > before {
            return None;
        }
        Some(Rule {
            direction: Direction::Egress,
            action: if deny { Action::Deny } else { Action::Allow },
            peers,
            ports,
            path: path.to_string(),
            subject_filter: None,
            not_ports: Vec::new(),
        })
    }

    fn ports(
        &self,
        to_ports: &Option<Vec<PortRuleWire>>,
        icmps: &Option<Vec<IcmpRule>>,
        dir: Direction,
        deny: bool,
        path: &str,
        errs: &mut Errors,
    ) -> Vec<PortRule> {
        let mut out = Vec::new();
        let has_ports = to_ports.as_ref().is_some_and(|v| !v.is_empty());
        let has_icmps = icmps.as_ref().is_some_and(|v| !v.is_empty());
        if has_ports && has_icmps {
            errs.add(
                format!("{path}.icmps"),
                "the icmps block may only be present without toPorts",
            );
        }
        for (i, pr) in to_ports.iter().flatten().enumerate() {
            let p = format!("{path}.toPorts[{i}]");
            if let Some(r) = self.port_rule(pr, dir, deny, &p, errs) {
                out.push(r);
            }
        }
        for (i, ic) in icmps.iter().flatten().enumerate() {
            let p = format!("{path}.icmps[{i}]");
            if ic.fields.len() > MAX_ICMP_FIELDS {
                errs.add(
                    format!("{p}.fields"),
                    format!("too many ICMP fields, the max is {MAX_ICMP_FIELDS}"),
                );
            }
            let mut ports = Vec::new();
            for (j, f) in ic.fields.iter().enumerate() {
                let fp = format!("{p}.fields[{j}]");
                let v6 = match f.family.as_deref() {
                    None | Some("IPv4") => false,
                    Some("IPv6") => true,
                    Some(other) => {
                        errs.add(
                            format!("{fp}.family"),
                            format!("{other:?} is not IPv4 or IPv6"),
                        );
                        continue;
                    }
                };
                match icmp_type(&f.icmp_type, v6) {
                    Ok(t) => ports.push(PortProto {
                        protocol: if v6 { Protocol::IcmpV6 } else { Protocol::Icmp },
                        port: Port::Range(t as u16, t as u16),
                    }),
                    Err(e) => errs.add(format!("{fp}.type"), e),
                }
            }
            out.push(PortRule {
                ports,
                l7: None,
                tls: None,
                path: p,
            });
        }
        out
    }

    fn port_rule(
        &self,
        pr: &PortRuleWire,
        dir: Direction,
        deny: bool,
        path: &str,
        errs: &mut Errors,
    ) -> Option<PortRule> {
        let wire_ports = pr.ports.clone().unwrap_or_default();
        if wire_ports.len() > MAX_PORTS {
            errs.add(
                format!("{path}.ports"),
                format!("too many ports, the max is {MAX_PORTS}"),
            );
        }
        let mut ports = Vec::new();
        let mut has_range = false;
        let mut has_zero = false;
        let mut protocols = Vec::new();
        for (i, pp) in wire_ports.iter().enumerate() {
            let p = format!("{path}.ports[{i}]");
            let protocol = match pp.protocol.as_deref() {
                None | Some("") | Some("ANY") => Protocol::Any,
                Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                Some(other @ ("VRRP" | "IGMP" | "GRE" | "IPIP" | "IPV6" | "ESP" | "AH")) => {
                    errs.add(format!("{p}.protocol"), format!("protocol {other} needs extended IP protocols, which Ward does not enforce"));
                    continue;
                }
                Some(other) => {
                    errs.add(
                        format!("{p}.protocol"),
                        format!("{other:?} is not one of TCP, UDP, SCTP, ANY (use icmps for ICMP)"),
                    );
                    continue;
                }
            };
            protocols.push(protocol);
            let value = match &pp.port {
                None => PortValue::Number(0),
                Some(v) => match parse_port(v) {
                    Ok(v) => v,
                    Err(e) => {
                        errs.add(format!("{p}.port"), e);
                        continue;
                    }
                },
            };
            let port = match value {
                PortValue::Name(n) => Port::Named(n),
                PortValue::Number(0) => {
                    has_zero = true;
                    if pp.end_port.is_some_and(|e| e != 0) {
                        errs.add(format!("{p}.endPort"), "endPort needs a non-zero port");
                        continue;
                    }
                    Port::Range(0, u16::MAX)
                }
                PortValue::Number(n) => match pp.end_port {
                    None | Some(0) => Port::Range(n, n),
                    Some(e) => match u16::try_from(e) {
                        Ok(e) if e >= n => {
                            has_range |= e > n;
                            Port::Range(n, e)
                        }
                        Ok(e) => {
                            errs.add(
                                format!("{p}.endPort"),
                                format!("endPort {e} is below port {n}"),
                            );
                            continue;
                        }
                        Err(_) => {
                            errs.add(
                                format!("{p}.endPort"),
                                format!("endPort {e} is out of range 0-65535"),
                            );
                            continue;
                        }
                    },
                },
            };
            ports.push(PortProto { protocol, port });
        }
        if wire_ports.is_empty() {
            ports.push(PortProto {
                protocol: Protocol::Any,
                port: Port::Range(0, u16::MAX),
            });
            has_zero = true;
        }
        if deny
            && (pr.rules.is_some()
                || pr.server_names.is_some()
                || pr.terminating_tls.is_some()
                || pr.originating_tls.is_some())
        {
            errs.add(
                path,
                "deny rules may only carry ports (no rules, serverNames or TLS)",
            );
        }
        if pr.listener.is_some() {
            errs.add(
                format!("{path}.listener"),
                "Envoy listener references are not supported (Ward has no CiliumEnvoyConfig)",
            );
        }
        let tls = self.tls_rule(pr, &protocols, wire_ports.is_empty(), path, errs);
        let l7 = match &pr.rules {
            None => None,
            Some(rules) => self.l7(
                rules,
                pr,
                dir,
                &protocols,
                has_range,
                has_zero,
                wire_ports.is_empty(),
                &format!("{path}.rules"),
                errs,
            ),
        };
        Some(PortRule {
            ports,
            l7,
            tls,
            path: path.to_string(),
        })
    }

    /// `serverNames`, `terminatingTLS` and `originatingTLS` of a `toPorts` entry. Empty
    /// lists count as absent.
    fn tls_rule(
        &self,
        pr: &PortRuleWire,
        protocols: &[Protocol],
        no_ports: bool,
        path: &str,
        errs: &mut Errors,
    ) -> Option<TlsRule> {
        let names = pr.server_names.as_deref().unwrap_or_default();
        if names.is_empty() && pr.terminating_tls.is_none() && pr.originating_tls.is_none() {
            return None;
        }
        let mut server_names = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let p = format!("{path}.serverNames[{i}]");
            if let Some(pattern) = errs.check(&p, SniPattern::parse(n)) {
                server_names.push(pattern);
            }
        }
        let terminating = self.tls_context(
            pr.terminating_tls.as_ref(),
            TlsRole::Terminating,
            path,
            errs,
        );
        let originating = self.tls_context(
            pr.originating_tls.as_ref(),
            TlsRole::Originating,
            path,
            errs,
        );
        if pr.originating_tls.is_some() && pr.terminating_tls.is_none() {
            errs.add(
                format!("{path}.originatingTLS"),
                "originatingTLS needs terminatingTLS: Ward originates TLS only for the sessions it terminates",
            );
        }
        if no_ports || protocols.iter().any(|p| *p != Protocol::Tcp) {
            errs.add(
                format!("{path}.ports"),
                "serverNames and TLS contexts apply to TCP only: list the ports with protocol: TCP",
            );
        }
        if pr.rules.as_ref().is_some_and(|r| r.dns.is_some()) {
            errs.add(
                format!("{path}.rules.dns"),
                "DNS rules cannot be combined with serverNames or TLS contexts",
            );
        }
        Some(TlsRule {
            server_names,
            terminating,
            originating,
        })
    }

    fn tls_context(
        &self,
        wire: Option<&TlsContext>,
        role: TlsRole,
        path: &str,
        errs: &mut Errors,
    ) -> Option<tls::TlsContext> {
        let t = wire?;
        let p = format!("{path}.{role}");
        let Some(s) = t.secret.as_ref().filter(|s| !s.name.is_empty()) else {
            errs.add(
                format!("{p}.secret"),
                "a TLS context needs a secret with a name",
            );
            return None;
        };
        let secret = secret_ref(s, self.namespace, &format!("{p}.secret"), errs)?;
        let before = errs.list.len();
        for (field, key) in [
            ("trustedCA", &t.trusted_ca),
            ("certificate", &t.certificate),
            ("privateKey", &t.private_key),
        ] {
            if let Some(k) = key {
                if let Err(e) = check_secret_key(k) {
                    errs.add(format!("{p}.{field}"), e);
                }
            }
        }
        (errs.list.len() == before).then(|| tls::TlsContext {
            role,
            secret,
            trusted_ca: t.trusted_ca.clone(),
            certificate: t.certificate.clone(),
            private_key: t.private_key.clone(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn l7(
        &self,
        rules: &L7RulesWire,
        pr: &PortRuleWire,
        dir: Direction,
        protocols: &[Protocol],
        has_range: bool,
        has_zero: bool,
        no_ports: bool,
        path: &str,
        errs: &mut Errors,
    ) -> Option<L7Rules> {
        let kinds = [
            rules.http.is_some(),
            rules.dns.is_some(),
            rules.kafka.is_some(),
            rules.l7proto.is_some() || rules.l7.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            errs.add(
                path,
                "multiple L7 protocol rule types specified in single rule",
            );
            return None;
        }
        if rules.kafka.is_some() {
            errs.add(
                format!("{path}.kafka"),
                "Kafka rules were removed in Cilium 1.20 and are not supported",
            );
            return None;
        }
        if rules.l7proto.is_some() || rules.l7.is_some() {
            errs.add(
                format!("{path}.l7proto"),
                "generic l7proto rules were removed in Cilium 1.20 and are not supported",
            );
            return None;
        }
        if pr.server_names.as_ref().is_some_and(|n| !n.is_empty())
            && pr.terminating_tls.is_none()
            && (rules.http.is_some() || rules.dns.is_some())
        {
            errs.add(
                path.to_string(),
                "serverNames are not allowed with L7 rules without TLS termination (terminatingTLS)",
            );
        }
        if let Some(dns) = &rules.dns {
            if dir == Direction::Ingress {
                errs.add(
                    format!("{path}.dns"),
                    "DNS rules are not allowed on ingress",
                );
            }
            if no_ports {
                errs.add(
                    format!("{path}.dns"),
                    "port 53 must be specified for DNS rules",
                );
            }
            if has_range {
                errs.add(
                    format!("{path}.dns"),
                    "DNS rules do not support port ranges",
                );
            }
            if has_zero && !no_ports {
                errs.add(
                    format!("{path}.dns"),
                    "L7 rules can not be used when a port is 0",
                );
            }
            let mut patterns = Vec::new();
            for (i, f) in dns.iter().enumerate() {
                if let Some(p) = fqdn_selector(f, &format!("{path}.dns[{i}]"), errs) {
                    patterns.push(p);
                }
            }
            return Some(L7Rules::Dns(patterns));
        }
        if let Some(http) = &rules.http {
            if self.host_policy {
                errs.add(
                    format!("{path}.http"),
                    "HTTP rules are not allowed in host policies (nodeSelector); only DNS is",
                );
            }
            if protocols.iter().any(|p| *p != Protocol::Tcp) || no_ports {
                errs.add(
                    format!("{path}.http"),
                    "L7 rules can only apply to TCP (not ANY) except for DNS rules: set protocol: TCP",
                );
            }
            if has_zero && !no_ports {
                errs.add(
                    format!("{path}.http"),
                    "L7 rules can not be used when a port is 0",
                );
            }
            let mut out = Vec::new();
            for (i, h) in http.iter().enumerate() {
                if let Some(r) = http_rule(h, &format!("{path}.http[{i}]"), self.namespace, errs) {
                    out.push(r);
                }
            }
            return Some(L7Rules::Http(out));
        }
        None
    }
}

fn one_peer_type(l3: &[(&str, bool)], path: &str, errs: &mut Errors) {
    let set: Vec<&str> = l3.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect();
    if set.len() > 1 {
        errs.add(
            path,
            format!(
                "combining {} and {} is not supported: use one peer type per rule, in separate rules",
                set[0], set[1]
            ),
        );
    }
}

fn unsupported<T>(field: &Option<Vec<T>>, path: &str, name: &str, why: &str, errs: &mut Errors) {
    if field.is_some() {
        errs.add(format!("{path}.{name}"), why);
    }
}

fn authentication(a: &Option<Authentication>, path: &str, errs: &mut Errors) {
    if let Some(a) = a {
        match a.mode.as_str() {
            "disabled" => {}
            "required" | "test-always-fail" => errs.add(
                format!("{path}.authentication.mode"),
                format!(
                    "mutual authentication ({}) is not supported by Ward",
                    a.mode
                ),
            ),
            other => errs.add(
                format!("{path}.authentication.mode"),
                format!("{other:?} is not one of disabled, required, test-always-fail"),
            ),
        }
    }
}

fn cidrs(
    cidr: &Option<Vec<String>>,
    set: &Option<Vec<CidrRule>>,
    path: &str,
    dir: &str,
    peers: &mut Peers,
    errs: &mut Errors,
) {
    for (i, c) in cidr.iter().flatten().enumerate() {
        match parse_cidr(c) {
            Ok(net) => {
                peers.selectors.push(cidr_selector(&net, &[]));
                peers.cidrs.push(net);
            }
            Err(e) => errs.add(format!("{path}.{dir}CIDR[{i}]"), e),
        }
    }
    for (i, c) in set.iter().flatten().enumerate() {
        let p = format!("{path}.{dir}CIDRSet[{i}]");
        let n = [
            c.cidr.is_some(),
            c.cidr_group_ref.is_some(),
            c.cidr_group_selector.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            errs.add(
                &p,
                "exactly one of cidr, cidrGroupRef, cidrGroupSelector is required",
            );
            continue;
        }
        if c.cidr_group_ref.is_some() || c.cidr_group_selector.is_some() {
            errs.add(
                &p,
                "CiliumCIDRGroup references are not supported yet; write the CIDRs inline",
            );
            continue;
        }
        let Some(text) = &c.cidr else { continue };
        let net = match parse_cidr(text) {
            Ok(n) => n,
            Err(e) => {
                errs.add(format!("{p}.cidr"), e);
                continue;
            }
        };
        let mut except = Vec::new();
        for (j, e) in c.except.iter().flatten().enumerate() {
            match parse_cidr(e).and_then(|en| check_except(&net, &en).map(|()| en)) {
                Ok(en) => except.push(en),
                Err(err) => errs.add(format!("{p}.except[{j}]"), err),
            }
        }
        peers.selectors.push(cidr_selector(&net, &except));
        peers.cidrs.push(net);
        peers.cidrs.extend(except);
    }
}

fn entities(list: &Option<Vec<String>>, path: &str, peers: &mut Peers, errs: &mut Errors) {
    for (i, e) in list.iter().flatten().enumerate() {
        if ENTITIES.contains(&e.as_str()) {
            peers.selectors.extend(entity_selectors(e));
        } else {
            errs.add(
                format!("{path}[{i}]"),
                format!(
                    "unknown entity {e:?} (expected one of {})",
                    ENTITIES.join(", ")
                ),
            );
        }
    }
}

fn fqdn_selector(f: &FqdnSelector, path: &str, errs: &mut Errors) -> Option<NamePattern> {
    match (&f.match_name, &f.match_pattern) {
        (Some(_), Some(_)) => {
            errs.add(path, "matchName and matchPattern are mutually exclusive");
            None
        }
        (None, None) => {
            errs.add(path, "one of matchName or matchPattern is required");
            None
        }
        (Some(n), None) => errs.check(&format!("{path}.matchName"), NamePattern::name(n)),
        (None, Some(p)) => errs.check(&format!("{path}.matchPattern"), NamePattern::pattern(p)),
    }
}

fn http_rule(
    h: &HttpRuleWire,
    path: &str,
    namespace: Option<&str>,
    errs: &mut Errors,
) -> Option<HttpRule> {
    let before = errs.list.len();
    let re = |field: &str, v: &Option<String>, errs: &mut Errors| -> Option<FullMatch> {
        let v = v.as_ref()?;
        errs.check(&format!("{path}.{field}"), FullMatch::new(v))
    };
    let method = re("method", &h.method, errs);
    let path_re = re("path", &h.path, errs);
    let host = re("host", &h.host, errs);
    let mut headers = Vec::new();
    for (i, s) in h.headers.iter().flatten().enumerate() {
        if let Some(r) = errs.check(&format!("{path}.headers[{i}]"), HeaderRule::parse(s)) {
            headers.push(r);
        }
    }
    let mut header_matches = Vec::new();
    for (i, m) in h.header_matches.iter().flatten().enumerate() {
        let p = format!("{path}.headerMatches[{i}]");
        if m.name.is_empty() {
            errs.add(format!("{p}.name"), "a header match needs a name");
            continue;
        }
        let mismatch = match Mismatch::parse(m.mismatch.as_deref().unwrap_or("")) {
            Some(x) => x,
            None => {
                errs.add(
                    format!("{p}.mismatch"),
                    format!(
                        "{:?} is not one of LOG, ADD, DELETE, REPLACE",
                        m.mismatch.as_deref().unwrap_or("")
                    ),
                );
                continue;
            }
        };
        let secret = match &m.secret {
            Some(s) => match secret_ref(s, namespace, &format!("{p}.secret"), errs) {
                Some(r) => Some(r),
                None => continue,
            },
            None => None,
        };
        if matches!(mismatch, Mismatch::Add | Mismatch::Replace)
            && m.value.is_none()
            && secret.is_none()
        {
            errs.add(
                format!("{p}.value"),
                "ADD and REPLACE need a value (or a secret)",
            );
            continue;
        }
        header_matches.push(HeaderMatch {
            name: m.name.clone(),
            value: m.value.clone(),
            secret,
            mismatch,
        });
    }
    if errs.list.len() > before {
        return None;
    }
    Some(HttpRule {
        method,
        path: path_re,
        host,
        headers,
        header_matches,
    })
}

/// A secret reference with its namespace resolved: the one written, else the policy's. A
/// clusterwide policy has no namespace to default to. Namespace and name must be what
/// Kubernetes accepts (they also name directories under the certificates directory).
fn secret_ref(
    s: &SecretRef,
    policy_namespace: Option<&str>,
    path: &str,
    errs: &mut Errors,
) -> Option<TlsSecret> {
    if s.name.is_empty() {
        errs.add(format!("{path}.name"), "a secret reference needs a name");
        return None;
    }
    let namespace = match (
        s.namespace.as_deref().filter(|n| !n.is_empty()),
        policy_namespace,
    ) {
        (Some(ns), _) => ns,
        (None, Some(ns)) => ns,
        (None, None) => {
            errs.add(
                format!("{path}.namespace"),
                "a secret named by a clusterwide policy needs a namespace (there is no policy namespace to default to)",
            );
            return None;
        }
    };
    let before = errs.list.len();
    if !is_dns_label(namespace) {
        errs.add(
            format!("{path}.namespace"),
            format!("{namespace:?} is not a namespace name (lower-case letters, digits and \"-\", at most 63)"),
        );
    }
    if !is_dns_subdomain(&s.name) {
        errs.add(
            format!("{path}.name"),
            format!("{:?} is not a secret name (lower-case letters, digits, \"-\" and \".\", at most 253)", s.name),
        );
    }
    (errs.list.len() == before).then(|| TlsSecret {
        namespace: namespace.to_string(),
        name: s.name.clone(),
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A key of a secret (a file name under the secret's directory): Kubernetes' rule,
/// letters, digits, `-`, `_` and `.`, and not `.` or `..`.
fn check_secret_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= 253
        && k != "."
        && k != ".."
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{k:?} is not a key of a secret (letters, digits, \"-\", \"_\" and \".\")"
        ))
    }
}

fn icmp_type(t: &IntOrString, v6: bool) -> Result<u8, String> {
    match t {
        IntOrString::Int(i) => {
            u8::try_from(*i).map_err(|_| format!("ICMP type {i} is out of range 0-255"))
        }
        IntOrString::Str(s) => {
            if let Ok(i) = s.parse::<i64>() {
                return u8::try_from(i).map_err(|_| format!("ICMP type {i} is out of range 0-255"));
            }
            let table: &[(&str, u8)] = if v6 {
                &[
                    ("DestinationUnreachable", 1),
                    ("PacketTooBig", 2),
                    ("TimeExceeded", 3),
                    ("ParameterProblem", 4),
                    ("EchoRequest", 128),
                    ("EchoReply", 129),
                    ("MulticastListenerQuery", 130),
                    ("MulticastListenerReport", 131),
                    ("MulticastListenerDone", 132),
                    ("RouterSolicitation", 133),
                    ("RouterAdvertisement", 134),
                    ("NeighborSolicitation", 135),
                    ("NeighborAdvertisement", 136),
                    ("RedirectMessage", 137),
                    ("ExtendedEchoRequest", 160),
                    ("ExtendedEchoReply", 161),
                ]
            } else {
                &[
                    ("EchoReply", 0),
                    ("DestinationUnreachable", 3),
                    ("Redirect", 5),
                    ("Echo", 8),
                    ("EchoRequest", 8),
                    ("RouterAdvertisement", 9),
                    ("RouterSelection", 10),
                    ("TimeExceeded", 11),
                    ("ParameterProblem", 12),
                    ("Timestamp", 13),
                    ("TimestampReply", 14),
                    ("Photuris", 40),
                    ("ExtendedEchoRequest", 42),
                    ("ExtendedEchoReply", 43),
                ]
            };
            table
                .iter()
                .find(|(n, _)| n == s)
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    format!("unknown ICMP{} type name {s:?}", if v6 { "v6" } else { "" })
                })
        }
    }
}

/// The kind of a CNP object: a CNP without a namespace is treated as a CCNP.
pub fn kind(cluster_wide: bool, namespace: Option<&str>) -> Kind {
    if cluster_wide || namespace.is_none() {
        Kind::CiliumClusterwideNetworkPolicy
    } else {
        Kind::CiliumNetworkPolicy
    }
}
