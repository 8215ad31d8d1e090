//! Calico rules: the entity matches of `source` and `destination` (selectors, namespace
//! scope, service accounts, nets), protocols, ports, ICMP and HTTP, as
//! `libcalico-go/lib/backend/syncersv1/updateprocessors/rules.go` and the v3 validator
//! define them.
//!
//! The peer of a rule is its `source` on ingress and its `destination` on egress; the
//! other side is the policy's own endpoint, so its criteria narrow which subjects the rule
//! applies to. Ports are always the destination's.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::expr::{Expr, Scope};
use super::{field_expr, in_namespace, MAX_ALTERNATIVES};
use crate::api::common::{parse_cidr, parse_port, IntOrString, PortValue};
use crate::error::Errors;
use crate::http::{FullMatch, HttpRule};
use crate::l7::L7Rules;
use crate::labels::{well_known, Key};
use crate::policy::{Action, Direction, Peers, Port, PortProto, PortRule, Protocol, Rule};
use crate::selector::Op;

/// One rule as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleWire {
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(default, rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<EntityRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<EntityRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
    /// Annotations of the rule: kept by Calico, meaningless to enforcement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpFields {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
}

/// `source` or `destination` of a rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_nets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<IntOrString>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<IntOrString>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<HttpPath>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPath {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// The protocols Ward's datapath enforces.
const PROTOCOLS: [Protocol; 5] = [
    Protocol::Tcp,
    Protocol::Udp,
    Protocol::Sctp,
    Protocol::Icmp,
    Protocol::IcmpV6,
];

fn protocol(v: &IntOrString) -> Result<Protocol, String> {
    let unsupported = |what: String| {
        format!("{what} is not enforced by Ward's datapath (TCP, UDP, SCTP, ICMP and ICMPv6 are)")
    };
    match v {
        IntOrString::Int(n) => match n {
            1 => Ok(Protocol::Icmp),
            6 => Ok(Protocol::Tcp),
            17 => Ok(Protocol::Udp),
            58 => Ok(Protocol::IcmpV6),
            132 => Ok(Protocol::Sctp),
            1..=255 => Err(unsupported(format!("protocol {n}"))),
            _ => Err(format!("protocol {n} is out of range 1-255")),
        },
        IntOrString::Str(s) => match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            "icmp" => Ok(Protocol::Icmp),
            "icmpv6" => Ok(Protocol::IcmpV6),
            "udplite" => Err(unsupported("UDPLite".into())),
            _ => Err(format!(
                "{s:?} is not a protocol (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255)"
            )),
        },
    }
}

/// A port as Calico writes it: a number, `"a:b"` (inclusive), or a named port.
fn port(v: &IntOrString) -> Result<Port, String> {
    if let IntOrString::Str(s) = v {
        if let Some((a, b)) = s.split_once(':') {
            let num = |x: &str| {
                x.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{s:?}: {x:?} is not a port number 0-65535"))
            };
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("{s:?}: the range's start is after its end"));
            }
            return Ok(Port::Range(a, b));
        }
    }
    match parse_port(v)? {
        PortValue::Number(n) => Ok(Port::Range(n, n)),
        PortValue::Name(n) => Ok(Port::Named(n)),
    }
}

/// The match of one `source` or `destination`, over identity labels.
struct EntityMatch {
    expr: Expr,
    /// Every CIDR the match names (the compiler gives them ipcache prefixes).
    cidrs: Vec<IpNet>,
    /// Whether some CIDR is given positively (`nets`).
    has_nets: bool,
}

fn network(net: &IpNet) -> Key {
    Key::new(crate::api::common::network_source(), net.to_string())
}

/// The IP families of a rule's CIDRs, checked as Calico's validator does.
#[derive(Default)]
struct Families {
    v4: bool,
    v6: bool,
}

pub struct Ctx<'a> {
    /// The policy's namespace (None: a GlobalNetworkPolicy).
    pub namespace: Option<&'a str>,
}

impl Ctx<'_> {
    /// Translates one rule; `Some(None)` is a valid rule that matches nothing Ward sees
    /// (a `Log` rule, or protocol criteria that exclude each other).
    pub fn rule(
        &self,
        r: &RuleWire,
        dir: Direction,
        path: &str,
        errs: &mut Errors,
    ) -> Option<Option<Rule>> {
        let before = errs.list.len();
        let action = match r.action.as_str() {
            "Allow" => Some(Action::Allow),
            "Deny" => Some(Action::Deny),
            "Pass" => Some(Action::Pass),
            "Log" => None,
            other => {
                errs.add(
                    format!("{path}.action"),
                    format!("{other:?} is not Allow, Deny, Log or Pass"),
                );
                None
            }
        };
        let default = EntityRule::default();
        let src = r.source.as_ref().unwrap_or(&default);
        let dst = r.destination.as_ref().unwrap_or(&default);
        let (peer, own, peer_field, own_field) = match dir {
            Direction::Ingress => (src, dst, "source", "destination"),
            Direction::Egress => (dst, src, "destination", "source"),
        };
        for (field, e) in [("source", src), ("destination", dst)] {
            if e.services.is_some() {
                errs.add(
                    format!("{path}.{field}.services"),
                    "Service matches are not supported (Ward's cluster model has no Services)",
                );
            }
        }
        for (set, field) in [
            (src.ports.is_some(), "ports"),
            (src.not_ports.is_some(), "notPorts"),
        ] {
            if set {
                errs.add(
                    format!("{path}.source.{field}"),
                    "source ports are not enforced (Ward's datapath matches destination ports only)",
                );
            }
        }
        let mut families = Families::default();
        let peer_m = self.entity(peer, &format!("{path}.{peer_field}"), &mut families, errs);
        let own_m = self.entity(own, &format!("{path}.{own_field}"), &mut families, errs);
        if families.v4 && families.v6 {
            errs.add(path, "the rule contains both IPv4 and IPv6 CIDRs");
        }
        let family = self.family(r, &families, path, errs);
        let protocols = self.protocols(r, path, errs);
        let ports = self.ports(r, dir, dst, protocols.as_ref(), path, errs);
        if errs.list.len() > before {
            return None;
        }
        let (Some(action), Some(peer_m), Some(own_m), Some(protocols), Some((ports, not_ports))) =
            (action, peer_m, own_m, protocols, ports)
        else {
            // a Log rule (or nothing left to check after errors)
            return Some(None);
        };
        if protocols.as_ref().is_some_and(Vec::is_empty) || ports.iter().any(|g| g.ports.is_empty())
        {
            return Some(None);
        }
        let mut expr = vec![peer_m.expr];
        if let (Some(net), false) = (family, peer_m.has_nets) {
            expr.push(Expr::lit(network(&net), Op::Exists));
        }
        let mut cidrs = peer_m.cidrs;
        cidrs.extend(own_m.cidrs);
        cidrs.extend(family);
        let selectors = match Expr::And(expr).to_selectors(MAX_ALTERNATIVES) {
            Ok(s) => s,
            Err(e) => {
                errs.add(format!("{path}.{peer_field}"), e);
                return None;
            }
        };
        let subject_filter = match own_m.expr.to_selectors(MAX_ALTERNATIVES) {
            Ok(s) if s.iter().any(|x| x.is_all()) => None,
            Ok(s) => Some(s),
            Err(e) => {
                errs.add(format!("{path}.{own_field}"), e);
                return None;
            }
        };
        cidrs.sort();
        cidrs.dedup();
        Some(Some(Rule {
            direction: dir,
            action,
            peers: Peers {
                selectors,
                networks: cidrs,
                ..Peers::default()
            },
            ports,
            path: path.to_string(),
            subject_filter,
            not_ports,
        }))
    }

    /// One `source` or `destination`: `(namespace scope && serviceAccounts && selector)`
    /// when any selector field is given, `!(notSelector)`, `nets` and `notNets`.
    fn entity(
        &self,
        e: &EntityRule,
        path: &str,
        families: &mut Families,
        errs: &mut Errors,
    ) -> Option<EntityMatch> {
        let before = errs.list.len();
        let given = |s: &Option<String>| s.as_deref().is_some_and(|t| !t.trim().is_empty());
        let sel = field_expr(
            &e.selector,
            Scope::Endpoint,
            &format!("{path}.selector"),
            errs,
        );
        let not_sel = field_expr(
            &e.not_selector,
            Scope::Endpoint,
            &format!("{path}.notSelector"),
            errs,
        );
        let ns_sel = field_expr(
            &e.namespace_selector,
            Scope::Namespace,
            &format!("{path}.namespaceSelector"),
            errs,
        );
        let sa = self.service_accounts(e.service_accounts.as_ref(), path, errs);
        let mut cidrs = Vec::new();
        let mut nets = Vec::new();
        let mut not_nets = Vec::new();
        for (field, list, out) in [
            ("nets", &e.nets, &mut nets),
            ("notNets", &e.not_nets, &mut not_nets),
        ] {
            for (i, n) in list.iter().flatten().enumerate() {
                match parse_cidr(n) {
                    Ok(net) => {
                        match net {
                            IpNet::V4(_) => families.v4 = true,
                            IpNet::V6(_) => families.v6 = true,
                        }
                        cidrs.push(net);
                        out.push(net);
                    }
                    Err(r) => errs.add(format!("{path}.{field}[{i}]"), r),
                }
            }
        }
        if errs.list.len() > before {
            return None;
        }
        let (sel, not_sel, ns_sel, sa) = (sel?, not_sel?, ns_sel?, sa?);
        // rules.go getEndpointSelector: the namespace scope (the rule's namespaceSelector,
        // else a NetworkPolicy's own namespace) applies as soon as any selector field is
        // given, notSelector included; a GlobalNetworkPolicy rule with only a notSelector
        // keeps matching outside addresses.
        let any_selector = given(&e.selector)
            || given(&e.not_selector)
            || given(&e.namespace_selector)
            || e.service_accounts.is_some();
        let mut positive: Vec<Expr> = Vec::new();
        positive.extend(sa);
        positive.extend(sel);
        if any_selector {
            match (ns_sel, self.namespace) {
                (Some(ns), _) => positive.push(ns),
                (None, Some(own)) => positive.push(in_namespace(own)),
                (None, None) => {}
            }
        }
        let mut all = Vec::new();
        if !positive.is_empty() {
            all.push(Expr::pod());
            all.extend(positive);
        }
        if let Some(n) = not_sel {
            all.push(Expr::negation(Expr::And(vec![Expr::pod(), n])));
        }
        if !nets.is_empty() {
            all.push(Expr::Or(
                nets.iter()
                    .map(|n| Expr::lit(network(n), Op::Exists))
                    .collect(),
            ));
        }
        for n in &not_nets {
            all.push(Expr::lit(network(n), Op::DoesNotExist));
        }
        Some(EntityMatch {
            expr: Expr::And(all),
            cidrs,
            has_nets: !nets.is_empty(),
        })
    }

    /// `serviceAccounts`: names (`projectcalico.org/serviceaccount in {..}`) AND selector
    /// over the service account's labels.
    fn service_accounts(
        &self,
        m: Option<&ServiceAccountMatch>,
        path: &str,
        errs: &mut Errors,
    ) -> Option<Vec<Expr>> {
        let Some(m) = m else {
            return Some(Vec::new());
        };
        let mut out = Vec::new();
        let names = m.names.clone().unwrap_or_default();
        if !names.is_empty() {
            out.push(Expr::lit(
                Key::new(crate::labels::Source::K8s, well_known::SERVICE_ACCOUNT),
                Op::In(names),
            ));
        }
        let sel = field_expr(
            &m.selector,
            Scope::ServiceAccount,
            &format!("{path}.serviceAccounts.selector"),
            errs,
        )?;
        out.extend(sel);
        Some(out)
    }

    /// The rule's IP family (`ipVersion`, or what its CIDRs imply) as the prefix that
    /// covers it; checked against ICMP and the CIDRs.
    fn family(&self, r: &RuleWire, f: &Families, path: &str, errs: &mut Errors) -> Option<IpNet> {
        let v4: IpNet = "0.0.0.0/0".parse().ok()?;
        let v6: IpNet = "::/0".parse().ok()?;
        let version = match r.ip_version {
            None => None,
            Some(4) => Some(4),
            Some(6) => Some(6),
            Some(v) => {
                errs.add(format!("{path}.ipVersion"), format!("{v} is not 4 or 6"));
                None
            }
        };
        if let Some(v) = version {
            if (f.v4 && v != 4) || (f.v6 && v != 6) {
                errs.add(
                    format!("{path}.ipVersion"),
                    "the rule's IP version does not match its CIDRs",
                );
            }
            for (field, p) in [("protocol", &r.protocol), ("notProtocol", &r.not_protocol)] {
                let want = match p.as_ref().and_then(|p| protocol(p).ok()) {
                    Some(Protocol::Icmp) => 4,
                    Some(Protocol::IcmpV6) => 6,
                    _ => continue,
                };
                if want != v {
                    errs.add(
                        format!("{path}.ipVersion"),
                        format!(
                            "{field} {} needs ipVersion {want}",
                            p.as_ref().map(ToString::to_string).unwrap_or_default()
                        ),
                    );
                }
            }
        }
        match (version, f.v4, f.v6) {
            (Some(4), _, _) | (None, true, false) => Some(v4),
            (Some(6), _, _) | (None, false, true) => Some(v6),
            _ => None,
        }
    }

    /// `protocol` and `notProtocol` as the list of protocols the rule matches (None: every
    /// protocol; empty: none). An HTTP match means TCP.
    fn protocols(
        &self,
        r: &RuleWire,
        path: &str,
        errs: &mut Errors,
    ) -> Option<Option<Vec<Protocol>>> {
        let before = errs.list.len();
        let p = r
            .protocol
            .as_ref()
            .and_then(|p| errs.check(&format!("{path}.protocol"), protocol(p)));
        let np = r
            .not_protocol
            .as_ref()
            .and_then(|p| errs.check(&format!("{path}.notProtocol"), protocol(p)));
        if errs.list.len() > before {
            return None;
        }
        let p = match (p, r.http.is_some()) {
            (Some(Protocol::Tcp), true) | (None, true) => Some(Protocol::Tcp),
            (Some(other), true) => {
                errs.add(
                    format!("{path}.protocol"),
                    format!("an HTTP match needs protocol TCP, not {other}"),
                );
                return None;
            }
            (p, false) => p,
        };
        Some(match (p, np) {
            (None, None) => None,
            (Some(p), None) => Some(vec![p]),
            (Some(p), Some(n)) => Some(if p == n { Vec::new() } else { vec![p] }),
            (None, Some(n)) => Some(PROTOCOLS.into_iter().filter(|p| *p != n).collect()),
        })
    }

    /// The destination ports (or ICMP types) per protocol, with the HTTP rules, and the
    /// excluded ports.
    fn ports(
        &self,
        r: &RuleWire,
        dir: Direction,
        dst: &EntityRule,
        protocols: Option<&Option<Vec<Protocol>>>,
        path: &str,
        errs: &mut Errors,
    ) -> Option<(Vec<PortRule>, Vec<Port>)> {
        let before = errs.list.len();
        let mut ports = Vec::new();
        let mut not_ports = Vec::new();
        for (field, list, out) in [
            ("ports", &dst.ports, &mut ports),
            ("notPorts", &dst.not_ports, &mut not_ports),
        ] {
            for (i, v) in list.iter().flatten().enumerate() {
                if let Some(p) = errs.check(&format!("{path}.destination.{field}[{i}]"), port(v)) {
                    out.push(p);
                }
            }
        }
        let has_ports = !ports.is_empty() || !not_ports.is_empty();
        let single = match protocols {
            Some(Some(list)) if r.not_protocol.is_none() => list.first().copied(),
            _ => None,
        };
        if has_ports && !matches!(single, Some(Protocol::Tcp | Protocol::Udp | Protocol::Sctp)) {
            errs.add(
                format!("{path}.destination"),
                "ports and notPorts need protocol TCP, UDP or SCTP",
            );
        }
        let named = |l: &[Port]| l.iter().any(|p| matches!(p, Port::Named(_)));
        if dir == Direction::Egress && named(&not_ports) {
            errs.add(
                format!("{path}.destination.notPorts"),
                "named ports in notPorts of an egress rule are not supported (the destination's named ports are resolved per peer)",
            );
        }
        if dir == Direction::Egress && named(&ports) && !not_ports.is_empty() {
            errs.add(
                format!("{path}.destination"),
                "named ports together with notPorts in an egress rule are not supported (the destination's named ports are resolved per peer)",
            );
        }
        let icmp = self.icmp(r, single, path, errs);
        let l7 = self.http(r, dir, path, errs);
        if errs.list.len() > before {
            return None;
        }
        let icmp = icmp?;
        let Some(Some(list)) = protocols else {
            // every protocol: an L3 rule (an HTTP match always names TCP)
            return Some((Vec::new(), not_ports));
        };
        let mut out = Vec::new();
        for p in list {
            match p {
                Protocol::Icmp | Protocol::IcmpV6 => {
                    out.extend(icmp.iter().map(|(a, b)| PortProto {
                        protocol: *p,
                        port: Port::Range(*a, *b),
                    }));
                }
                _ if ports.is_empty() => out.push(PortProto {
                    protocol: *p,
                    port: Port::Range(0, u16::MAX),
                }),
                _ => out.extend(ports.iter().map(|port| PortProto {
                    protocol: *p,
                    port: port.clone(),
                })),
            }
        }
        if list.is_empty() {
            return Some((Vec::new(), not_ports));
        }
        Some((
            vec![PortRule {
                ports: out,
                l7,
                tls: None,
                path: path.to_string(),
            }],
            not_ports,
        ))
    }

    /// `icmp` / `notICMP` as the ICMP type ranges the rule matches. ICMP codes are
    /// refused: the datapath keys ICMP by type only.
    fn icmp(
        &self,
        r: &RuleWire,
        single: Option<Protocol>,
        path: &str,
        errs: &mut Errors,
    ) -> Option<Vec<(u16, u16)>> {
        let mut ty = [None, None];
        for (i, (field, f)) in [("icmp", &r.icmp), ("notICMP", &r.not_icmp)]
            .into_iter()
            .enumerate()
        {
            let Some(f) = f else { continue };
            if !matches!(single, Some(Protocol::Icmp | Protocol::IcmpV6)) {
                errs.add(
                    format!("{path}.{field}"),
                    "ICMP fields need protocol ICMP or ICMPv6",
                );
            }
            match (f.icmp_type, f.code) {
                (None, Some(_)) => errs.add(
                    format!("{path}.{field}.code"),
                    "ICMP code specified without an ICMP type",
                ),
                (_, Some(_)) => errs.add(
                    format!("{path}.{field}.code"),
                    "ICMP codes are not enforced (Ward's datapath matches ICMP by type only); a rule that names a code is refused rather than widened",
                ),
                _ => {}
            }
            match f.icmp_type {
                Some(t @ 0..=254) => ty[i] = Some(t as u16),
                Some(t) => errs.add(
                    format!("{path}.{field}.type"),
                    format!("ICMP type {t} is out of range 0-254"),
                ),
                None => {}
            }
        }
        Some(match ty {
            [Some(t), Some(n)] if t == n => Vec::new(),
            [Some(t), _] => vec![(t, t)],
            [None, Some(0)] => vec![(1, u16::MAX)],
            [None, Some(n)] => vec![(0, n - 1), (n + 1, u16::MAX)],
            [None, None] => vec![(0, u16::MAX)],
        })
    }

    /// `http`: methods (any of) AND paths (any of, exact or prefix), enforced by Ward's
    /// HTTP proxy. Calico allows it on ingress Allow rules only.
    fn http(&self, r: &RuleWire, dir: Direction, path: &str, errs: &mut Errors) -> Option<L7Rules> {
        let h = r.http.as_ref()?;
        let p = format!("{path}.http");
        if r.action != "Allow" {
            errs.add(&p, "an HTTP match is only valid on Allow rules");
        }
        if dir == Direction::Egress {
            errs.add(&p, "an HTTP match is not allowed in egress rules");
        }
        let methods = h.methods.clone().unwrap_or_default();
        if methods.len() > 20 {
            errs.add(format!("{p}.methods"), "at most 20 methods");
        }
        for (i, m) in methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_graphic()) {
                errs.add(
                    format!("{p}.methods[{i}]"),
                    format!("{m:?} is not an HTTP method"),
                );
            }
        }
        let method = if methods.is_empty() {
            None
        } else {
            let alt: Vec<String> = methods.iter().map(|m| regex::escape(m)).collect();
            errs.check(&format!("{p}.methods"), FullMatch::new(&alt.join("|")))
        };
        let paths = h.paths.clone().unwrap_or_default();
        if paths.len() > 20 {
            errs.add(format!("{p}.paths"), "at most 20 paths");
        }
        let mut rules = Vec::new();
        for (i, hp) in paths.iter().enumerate() {
            let q = format!("{p}.paths[{i}]");
            let re = match (&hp.exact, &hp.prefix) {
                (Some(e), None) => regex::escape(e),
                (None, Some(x)) => format!("{}.*", regex::escape(x)),
                _ => {
                    errs.add(&q, "exactly one of exact or prefix");
                    continue;
                }
            };
            let text = hp
                .exact
                .as_ref()
                .or(hp.prefix.as_ref())
                .map_or(0, String::len);
            if text == 0 || text > 1024 {
                errs.add(&q, "a path of 1 to 1024 characters");
                continue;
            }
            if let Some(path_re) = errs.check(&q, FullMatch::new(&re)) {
                rules.push(http_rule(method.clone(), Some(path_re)));
            }
        }
        if paths.is_empty() {
            rules.push(http_rule(method, None));
        }
        Some(L7Rules::Http(rules))
    }
}

fn http_rule(method: Option<FullMatch>, path: Option<FullMatch>) -> HttpRule {
    HttpRule {
        method,
        path,
        host: None,
        headers: Vec::new(),
        header_matches: Vec::new(),
    }
}
