//! The lint checks, each over the translated policies (and the manifests as written where
//! the translation forgets what matters, like two peers written as two list items).

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::{Item, Severity};
use crate::api::Body;
use crate::cluster::Cluster;
use crate::l7::L7Rules;
use crate::labels::{well_known, LabelSet, Source};
use crate::policy::{
    Action, Calico, Direction, Kind, Policy, Port, PortProto, Protocol, Rule, Subject, Tier,
};
use crate::selector::{Op, Selector};

/// A finding before its line and object are filled in.
pub(super) struct Raw {
    pub item: usize,
    pub path: String,
    pub severity: Severity,
    pub check: &'static str,
    pub message: String,
    pub fix: String,
}

/// Every translated policy with its item, and (with a cluster) the pods it selects.
struct Ctx<'a> {
    policies: Vec<(usize, &'a Policy)>,
    pods: Option<Vec<LabelSet>>,
    selected: Vec<Option<BTreeSet<usize>>>,
}

impl<'a> Ctx<'a> {
    fn new(items: &'a [Item], cluster: Option<&Cluster>) -> Ctx<'a> {
        let policies: Vec<(usize, &Policy)> = items
            .iter()
            .enumerate()
            .flat_map(|(i, it)| it.policies.iter().map(move |p| (i, p)))
            .filter(|(_, p)| !matches!(p.calico, Some(Calico::Tier { .. })))
            .collect();
        let pods: Option<Vec<LabelSet>> =
            cluster.map(|c| c.pods.iter().map(|p| c.pod_labels(p)).collect());
        let selected = policies
            .iter()
            .map(|(_, p)| {
                pods.as_ref().map(|pods| {
                    pods.iter()
                        .enumerate()
                        .filter(|(_, l)| subject_matches(&p.subject, l))
                        .map(|(i, _)| i)
                        .collect()
                })
            })
            .collect();
        Ctx {
            policies,
            pods,
            selected,
        }
    }

    /// Whether policies `a` and `b` (indices into `policies`) may select the same pod.
    fn overlap(&self, a: usize, b: usize) -> bool {
        match (&self.selected[a], &self.selected[b]) {
            (Some(x), Some(y)) => !x.is_disjoint(y),
            _ => {
                let (pa, pb) = (self.policies[a].1, self.policies[b].1);
                match (&pa.object.namespace, &pb.object.namespace) {
                    (Some(x), Some(y)) => x == y,
                    _ => true,
                }
            }
        }
    }

    fn name(&self, p: usize) -> String {
        self.policies[p].1.object.to_string()
    }
}

fn subject_matches(s: &Subject, l: &LabelSet) -> bool {
    match s {
        Subject::Pods(sel) => sel.matches(l),
        Subject::AnyPods(sels) => sels.iter().any(|x| x.matches(l)),
        Subject::Nodes(_) => false,
    }
}

pub(super) fn run(items: &[Item], cluster: Option<&Cluster>) -> Vec<Raw> {
    let ctx = Ctx::new(items, cluster);
    let mut out = Vec::new();
    or_peers(items, &mut out);
    egress_without_dns(&ctx, &mut out);
    allow_all_beside_default_deny(&ctx, &mut out);
    fqdns_without_dns_rules(&ctx, &mut out);
    moot_l7(&ctx, &mut out);
    calico_order(items, &mut out);
    calico_ignored_rules(items, &mut out);
    if let Some(c) = cluster {
        cidrs_cover_cluster(&ctx, c, &mut out);
        selectors_match_nothing(&ctx, &mut out);
    }
    out
}

/// NetworkPolicy peers with a `namespaceSelector` only and a `podSelector` only in one
/// list: two list items are ORed, where one item with both is ANDed.
fn or_peers(items: &[Item], out: &mut Vec<Raw>) {
    for (i, it) in items.iter().enumerate() {
        let Body::NetworkPolicy(spec) = &it.object.body else {
            continue;
        };
        let lists = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| ("ingress", "from", &r.from))
            .enumerate()
            .chain(
                spec.egress
                    .iter()
                    .flatten()
                    .map(|r| ("egress", "to", &r.to))
                    .enumerate(),
            );
        for (ri, (dir, field, peers)) in lists {
            let peers = peers.as_deref().unwrap_or_default();
            let ns_only = peers.iter().position(|p| {
                p.namespace_selector.is_some() && p.pod_selector.is_none() && p.ip_block.is_none()
            });
            let pod_only = peers.iter().position(|p| {
                p.pod_selector.is_some() && p.namespace_selector.is_none() && p.ip_block.is_none()
            });
            if let (Some(n), Some(p)) = (ns_only, pod_only) {
                out.push(Raw {
                    item: i,
                    path: format!("spec.{dir}[{ri}].{field}[{p}]"),
                    severity: Severity::Warning,
                    check: "or-peers",
                    message: format!(
                        "{field}[{n}] (namespaceSelector) and {field}[{p}] (podSelector) are two peers, so they are ORed: every pod of the selected namespaces, or the selected pods of the policy's own namespace"
                    ),
                    fix: format!(
                        "if only the selected pods of the selected namespaces were meant, write one peer: `- namespaceSelector: ...` with `podSelector: ...` under it, without its own `-` (merge {field}[{p}] into {field}[{n}])"
                    ),
                });
            }
        }
    }
}

/// The field that turns a policy's default deny on, for findings about it.
fn default_deny_field(p: &Policy, dir: Direction) -> String {
    match p.object.kind {
        Kind::NetworkPolicy => "spec.policyTypes".into(),
        Kind::CalicoNetworkPolicy | Kind::GlobalNetworkPolicy => "spec.types".into(),
        _ => format!("{}.{dir}", p.path),
    }
}

fn covers(pp: &PortProto, protocol: Protocol, port: u16) -> bool {
    pp.protocol.covers(protocol)
        && match &pp.port {
            Port::Range(a, b) => *a <= port && port <= *b,
            Port::Named(n) => n.contains("dns") || n == "domain",
        }
}

fn allows_port(r: &Rule, protocol: Protocol, port: u16) -> bool {
    r.action == Action::Allow
        && (r.ports.is_empty()
            || r.ports
                .iter()
                .any(|g| g.ports.iter().any(|pp| covers(pp, protocol, port))))
}

/// A policy that puts pods in default deny for egress, and nothing that allows them DNS.
fn egress_without_dns(ctx: &Ctx, out: &mut Vec<Raw>) {
    for (a, (i, p)) in ctx.policies.iter().enumerate() {
        let dd = p.default_deny[Direction::Egress.index()]
            && matches!(p.tier, Tier::Namespace | Tier::Calico);
        if !dd {
            continue;
        }
        let dns = ctx.policies.iter().enumerate().any(|(b, (_, q))| {
            ctx.overlap(a, b)
                && q.rules.iter().any(|r| {
                    r.direction == Direction::Egress
                        && !r.peers.is_empty()
                        && (allows_port(r, Protocol::Udp, 53) || allows_port(r, Protocol::Tcp, 53))
                })
        });
        if !dns {
            out.push(Raw {
                item: *i,
                path: default_deny_field(p, Direction::Egress),
                severity: Severity::Error,
                check: "egress-without-dns",
                message: "puts the pods it selects in default deny for egress, and no policy allows them DNS (port 53): their name lookups fail".into(),
                fix: "allow egress to the cluster DNS (e.g. pods k8s-app=kube-dns in kube-system) on UDP and TCP 53".into(),
            });
        }
    }
}

/// The selector of every pod and nothing else.
fn all_pods(s: &Selector) -> bool {
    s.requirements.len() == 1
        && s.requirements[0].key.name == well_known::POD_NAMESPACE
        && s.requirements[0].op == Op::Exists
}

fn allows_everything(r: &Rule) -> bool {
    r.action == Action::Allow
        && r.ports.is_empty()
        && r.subject_filter.is_none()
        && r.peers.selectors.iter().any(|s| s.is_all() || all_pods(s))
}

/// A rule that allows every peer on every port, beside a policy that exists to deny by
/// default: the default deny is moot for the pods both select.
fn allow_all_beside_default_deny(ctx: &Ctx, out: &mut Vec<Raw>) {
    for dir in Direction::BOTH {
        let denies: Vec<usize> = ctx
            .policies
            .iter()
            .enumerate()
            .filter(|(_, (_, p))| {
                p.default_deny[dir.index()]
                    && matches!(p.tier, Tier::Namespace | Tier::Calico)
                    && !p.rules.iter().any(|r| r.direction == dir)
            })
            .map(|(a, _)| a)
            .collect();
        for (b, (i, p)) in ctx.policies.iter().enumerate() {
            for r in p
                .rules
                .iter()
                .filter(|r| r.direction == dir && allows_everything(r))
            {
                if let Some(&d) = denies.iter().find(|&&d| d != b && ctx.overlap(d, b)) {
                    let whom = if dir == Direction::Ingress {
                        "source"
                    } else {
                        "destination"
                    };
                    out.push(Raw {
                        item: *i,
                        path: r.path.clone(),
                        severity: Severity::Warning,
                        check: "allow-all-beside-default-deny",
                        message: format!(
                            "allows every {whom} on every port for {dir}, beside the default deny of {}: for the pods both select the default deny is moot",
                            ctx.name(d)
                        ),
                        fix: "narrow the rule's peers and ports to what the pods need, or drop the default deny if all traffic is meant".into(),
                    });
                }
            }
        }
    }
}

/// toFQDNs learn addresses only from answers the DNS proxy sees: the pods need a DNS rule
/// that allows the names.
fn fqdns_without_dns_rules(ctx: &Ctx, out: &mut Vec<Raw>) {
    for (a, (i, p)) in ctx.policies.iter().enumerate() {
        for r in p.rules.iter().filter(|r| !r.peers.fqdns.is_empty()) {
            let patterns: Vec<&crate::fqdn::NamePattern> = ctx
                .policies
                .iter()
                .enumerate()
                .filter(|(b, _)| ctx.overlap(a, *b))
                .flat_map(|(_, (_, q))| q.rules.iter())
                .filter(|q| q.direction == Direction::Egress)
                .flat_map(|q| q.ports.iter())
                .filter_map(|g| match &g.l7 {
                    Some(L7Rules::Dns(d)) => Some(d.iter()),
                    _ => None,
                })
                .flatten()
                .collect();
            if patterns.is_empty() {
                out.push(Raw {
                    item: *i,
                    path: r.path.clone(),
                    severity: Severity::Error,
                    check: "fqdn-without-dns-rule",
                    message: "toFQDNs allows the addresses that DNS answers seen by the DNS proxy carry, and no DNS rule sends these pods' queries to it: the names never resolve to allowed addresses".into(),
                    fix: "add an egress rule to the DNS server on port 53 (UDP and TCP) with `rules: {dns: [{matchPattern: \"*\"}]}` (or patterns covering the names)".into(),
                });
                continue;
            }
            for f in &r.peers.fqdns {
                // a name the pattern matches: each `*` stands for one label character
                let example = f.replace('*', "x");
                if !patterns.iter().any(|d| d.matches(&example)) {
                    out.push(Raw {
                        item: *i,
                        path: r.path.clone(),
                        severity: Severity::Error,
                        check: "fqdn-without-dns-rule",
                        message: format!(
                            "no DNS rule allows queries for {f}: the DNS proxy refuses them, so toFQDNs never learns their addresses"
                        ),
                        fix: format!("add {f} (or a pattern covering it) to the pods' DNS rules"),
                    });
                }
            }
        }
    }
}

fn overlapping(a: &PortProto, b: &PortProto) -> bool {
    let proto = a.protocol.covers(b.protocol) || b.protocol.covers(a.protocol);
    proto
        && match (&a.port, &b.port) {
            (Port::Range(x, y), Port::Range(u, v)) => x <= v && u <= y,
            (Port::Named(m), Port::Named(n)) => m == n,
            _ => false,
        }
}

impl Ctx<'_> {
    /// Whether two rules may name the same peer: one names every peer, they share a
    /// selector, or (with a cluster) a pod matches a selector of each.
    fn share_peers(&self, a: &Rule, b: &Rule) -> bool {
        let by_pods = self.pods.as_ref().is_some_and(|pods| {
            pods.iter().any(|l| {
                a.peers.selectors.iter().any(|s| s.matches(l))
                    && b.peers.selectors.iter().any(|s| s.matches(l))
            })
        });
        by_pods
            || b.peers.selectors.iter().any(|s| s.is_all())
            || a.peers
                .selectors
                .iter()
                .any(|s| b.peers.selectors.contains(s))
    }
}

/// An L7 rule on a port that another rule allows without L7 rules for the same peers:
/// Cilium lets those peers through unfiltered, so the L7 rules are moot for them.
fn moot_l7(ctx: &Ctx, out: &mut Vec<Raw>) {
    let ns: Vec<usize> = (0..ctx.policies.len())
        .filter(|&a| ctx.policies[a].1.tier == Tier::Namespace)
        .collect();
    for &a in &ns {
        let pa = ctx.policies[a].1;
        for ra in &pa.rules {
            for ga in ra.ports.iter().filter(|g| g.l7.is_some()) {
                for &b in ns.iter().filter(|&&b| ctx.overlap(a, b)) {
                    let (ib, pb) = ctx.policies[b];
                    for rb in pb.rules.iter().filter(|rb| {
                        rb.direction == ra.direction
                            && rb.action == Action::Allow
                            && !std::ptr::eq(*rb, ra)
                            && ctx.share_peers(ra, rb)
                    }) {
                        let hit = ga.ports.iter().find(|pp| {
                            rb.ports.is_empty()
                                || rb.ports.iter().any(|g| {
                                    g.l7.is_none() && g.ports.iter().any(|q| overlapping(pp, q))
                                })
                        });
                        if let Some(pp) = hit {
                            out.push(Raw {
                                item: ib,
                                path: rb.path.clone(),
                                severity: Severity::Warning,
                                check: "moot-l7",
                                message: format!(
                                    "allows {}/{} without L7 rules to peers that {} {} restricts with L7 rules: Cilium lets those peers through unfiltered, so the L7 rules are moot for them",
                                    pp.protocol, pp.port, ctx.name(a), ga.path
                                ),
                                fix: "give this rule the same L7 rules for that port, or narrow its peers or ports so they do not meet".into(),
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Calico policies without `order` in a tier whose other policies have one: they are
/// evaluated after all of those, which is rarely what was meant.
fn calico_order(items: &[Item], out: &mut Vec<Raw>) {
    let placed: Vec<(usize, &str, bool)> = items
        .iter()
        .enumerate()
        .flat_map(|(i, it)| it.policies.iter().map(move |p| (i, p)))
        .filter_map(|(i, p)| match &p.calico {
            Some(Calico::Policy { tier, order, .. }) => Some((i, tier.as_str(), order.is_some())),
            _ => None,
        })
        .collect();
    for &(i, tier, ordered) in &placed {
        let others = placed
            .iter()
            .filter(|(j, t, o)| *j != i && *t == tier && *o)
            .count();
        if !ordered && others > 0 {
            out.push(Raw {
                item: i,
                path: "spec".into(),
                severity: Severity::Warning,
                check: "calico-order-missing",
                message: format!(
                    "has no order in tier {tier}, where {others} other policies have one: an omitted order is infinite, so it is evaluated after all of them"
                ),
                fix: "set spec.order to place it explicitly".into(),
            });
        }
    }
}

/// Rules of a direction that a Calico policy's `types` leaves out: Calico ignores them.
fn calico_ignored_rules(items: &[Item], out: &mut Vec<Raw>) {
    for (i, it) in items.iter().enumerate() {
        let Body::Calico(spec) = &it.object.body else {
            continue;
        };
        let Some(types) = &spec.types else { continue };
        for (field, ty, rules) in [
            ("ingress", "Ingress", &spec.ingress),
            ("egress", "Egress", &spec.egress),
        ] {
            if rules.as_ref().is_some_and(|r| !r.is_empty()) && !types.iter().any(|t| t == ty) {
                out.push(Raw {
                    item: i,
                    path: format!("spec.{field}"),
                    severity: Severity::Warning,
                    check: "calico-rules-ignored",
                    message: format!("{field} rules are given but types does not include {ty}: they govern nothing"),
                    fix: format!("add {ty} to spec.types, or remove the rules"),
                });
            }
        }
    }
}

/// The CIDR and excepts a peer selector names (`cidr:` or `network:` labels).
fn cidr_of(s: &Selector) -> Option<(IpNet, Vec<IpNet>)> {
    let is_prefix = |src: &Source| matches!(src, Source::Cidr | Source::Other(_));
    let net = s.requirements.iter().find_map(|r| {
        (r.op == Op::Exists && is_prefix(&r.key.source))
            .then(|| r.key.name.parse::<IpNet>().ok())
            .flatten()
    })?;
    let except = s
        .requirements
        .iter()
        .filter(|r| r.op == Op::DoesNotExist && is_prefix(&r.key.source))
        .filter_map(|r| r.key.name.parse().ok())
        .collect();
    Some((net, except))
}

/// CIDRs that cover pod or node addresses: those change with every reschedule, and
/// whether a CIDR matches them differs between Kubernetes, Calico and Cilium.
fn cidrs_cover_cluster(ctx: &Ctx, c: &Cluster, out: &mut Vec<Raw>) {
    for (i, p) in &ctx.policies {
        for r in &p.rules {
            for (net, except) in r.peers.selectors.iter().filter_map(cidr_of) {
                let inside = |ip: &std::net::IpAddr| {
                    net.contains(ip) && !except.iter().any(|e| e.contains(ip))
                };
                let pods: Vec<String> = c
                    .pods
                    .iter()
                    .filter(|pod| pod.all_ips().any(|ip| inside(&ip)))
                    .map(|pod| pod.id())
                    .collect();
                let nodes: Vec<&str> = c
                    .nodes
                    .iter()
                    .filter(|n| inside(&n.ip))
                    .map(|n| n.name.as_str())
                    .collect();
                if pods.is_empty() && nodes.is_empty() {
                    continue;
                }
                let list = |v: Vec<String>, what: &str| match v.len() {
                    0 => None,
                    1 => Some(format!("{what} {}", v[0])),
                    n => Some(format!("{n} {what}s ({}, ...)", v[0])),
                };
                let covered: Vec<String> = [
                    list(pods, "pod"),
                    list(nodes.iter().map(|n| n.to_string()).collect(), "node"),
                ]
                .into_iter()
                .flatten()
                .collect();
                out.push(Raw {
                    item: *i,
                    path: r.path.clone(),
                    severity: Severity::Warning,
                    check: "cidr-covers-cluster",
                    message: format!(
                        "{net} covers the addresses of {}: pod addresses change with every reschedule, and Kubernetes and Calico match them by CIDR where Cilium does not",
                        covered.join(" and ")
                    ),
                    fix: "select pods and nodes by labels, and keep the pod and node CIDRs out of the block (except / notNets)".into(),
                });
            }
        }
    }
}

/// A selector over pod labels only (not entities, CIDRs, FQDNs or nodes).
fn pod_selector(s: &Selector) -> bool {
    !s.is_all()
        && s.requirements
            .iter()
            .all(|r| matches!(r.key.source, Source::K8s | Source::Any))
}

/// Subjects and peer selectors that select no pod of the cluster.
fn selectors_match_nothing(ctx: &Ctx, out: &mut Vec<Raw>) {
    let Some(pods) = &ctx.pods else { return };
    for (a, (i, p)) in ctx.policies.iter().enumerate() {
        if ctx.selected[a].as_ref().is_some_and(BTreeSet::is_empty)
            && !matches!(p.subject, Subject::Nodes(_))
        {
            let field = match p.object.kind {
                Kind::NetworkPolicy => "spec.podSelector".to_string(),
                Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => {
                    format!("{}.endpointSelector", p.path)
                }
                Kind::CalicoNetworkPolicy | Kind::GlobalNetworkPolicy => "spec.selector".into(),
                _ => "spec.subject".into(),
            };
            out.push(Raw {
                item: *i,
                path: field,
                severity: Severity::Warning,
                check: "selects-no-pod",
                message: "selects no pod of the cluster: the policy has no effect".into(),
                fix: "check the labels (and namespace) the selector names against the pods'".into(),
            });
        }
        for r in &p.rules {
            let empty: Vec<String> = r
                .peers
                .selectors
                .iter()
                .filter(|s| pod_selector(s) && !pods.iter().any(|l| s.matches(l)))
                .map(ToString::to_string)
                .collect();
            if !empty.is_empty() {
                out.push(Raw {
                    item: *i,
                    path: r.path.clone(),
                    severity: Severity::Warning,
                    check: "selects-no-pod",
                    message: format!(
                        "the peer selector {} matches no pod of the cluster",
                        empty.join(" | ")
                    ),
                    fix: "check the labels (and namespace) the selector names against the pods'"
                        .into(),
                });
            }
        }
    }
}
