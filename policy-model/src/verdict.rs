//! Verdicts and their explanations: the per-packet L3/L4 decision of one endpoint in one
//! direction, the L7 decision of a request, and the whole-flow verdict of a query (egress
//! of the source AND ingress of the destination), each naming the policy and rule that
//! decided or why nothing did.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::cluster::EndpointRef;
use crate::compile::{DirPolicy, EndpointKey, EndpointPolicy, Entry, L7Id, Model, PortMatch};
use crate::flow::{ConnectionPolicy, SideDecision, SidePolicy};
use crate::fqdn::normalize;
use crate::http::{Request, SimpleRequest};
use crate::identity::Idx;
use crate::policy::{Action, Direction, Protocol, Tier};
use crate::tls::{client_sni, missing_material, TlsSession};

/// The L3/L4 decision of one endpoint in one direction. Entry indices point into the
/// endpoint's `DirPolicy::entries`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4Decision {
    /// No policy selects the endpoint in this direction.
    NoPolicy,
    /// Selected only by policies that do not default-deny, and nothing matched.
    DefaultAllow,
    Allow(usize),
    /// Allowed through the proxy: the L7 rule sets that apply (entry, set). `allow_all`
    /// is an L4-only allow that also covers the flow, making the L7 rules moot for it.
    Redirect {
        sets: Vec<(usize, L7Id)>,
        allow_all: Option<usize>,
    },
    Deny(usize),
    /// Default deny and no rule allows. `peer_known`: some rule names the peer on
    /// another port (the deny is at L4, not L3). `tier`: the Calico tier whose end denied
    /// (an index into the direction's `tiers`).
    DefaultDeny {
        peer_known: bool,
        tier: Option<usize>,
    },
}

impl L4Decision {
    pub fn allows(&self) -> bool {
        !matches!(self, L4Decision::Deny(_) | L4Decision::DefaultDeny { .. })
    }
}

/// Where a flow was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Layer {
    L3,
    L4,
    L7,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Model {
    #[inline]
    fn entry_matches(&self, e: &Entry, peer: Idx, protocol: Protocol, port: u16) -> bool {
        let proto_ok = match e.protocol {
            None => true,
            Some(p) => p.covers(protocol),
        };
        if !proto_ok {
            return false;
        }
        let port_ok = match &e.port {
            PortMatch::Range(a, b) => *a <= port && port <= *b,
            PortMatch::Named(n) => self.identities.get(peer).named_ports.iter().any(|cp| {
                cp.port == port
                    && cp.protocol == protocol
                    && cp
                        .name
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(n))
                    && e.protocol.is_none_or(|p| p.covers(cp.protocol))
            }),
        };
        port_ok && self.selectors.peer_set_contains(e.peers, peer)
    }

    /// The L3/L4 decision for traffic of `endpoint` in `dir` with a peer of identity
    /// `peer` on `protocol`/`port` (the destination port). Tiers in order: Admin (first
    /// match; Pass skips to the next tier), namespace (deny over allow, allows add up,
    /// default deny if a selecting policy asks for it), Baseline (first match). With
    /// Calico tiers selecting the endpoint, see [`Model::decide_tiered`].
    pub fn decide(
        &self,
        endpoint: &EndpointPolicy,
        dir: Direction,
        peer: Idx,
        protocol: Protocol,
        port: u16,
    ) -> L4Decision {
        let d = &endpoint.dirs[dir.index()];
        if !d.tiers.is_empty() {
            return self.decide_tiered(d, peer, protocol, port);
        }
        let mut allow = None;
        let mut sets: Vec<(usize, L7Id)> = Vec::new();
        let mut passed = false;
        for (i, e) in d.entries.iter().enumerate() {
            match e.tier {
                Tier::Admin => {
                    if passed || !self.entry_matches(e, peer, protocol, port) {
                        continue;
                    }
                    match e.action {
                        Action::Allow => return L4Decision::Allow(i),
                        Action::Deny => return L4Decision::Deny(i),
                        Action::Pass => passed = true,
                    }
                }
                Tier::Namespace => {
                    if !self.entry_matches(e, peer, protocol, port) {
                        continue;
                    }
                    match (e.action, e.l7) {
                        (Action::Deny, _) => return L4Decision::Deny(i),
                        (_, Some(set)) => sets.push((i, set)),
                        (_, None) => {
                            allow.get_or_insert(i);
                        }
                    }
                }
                // only present with Calico tiers (decide_tiered)
                Tier::Calico => {}
                Tier::Baseline => break,
            }
        }
        if !sets.is_empty() {
            return L4Decision::Redirect {
                sets,
                allow_all: allow,
            };
        }
        if let Some(i) = allow {
            return L4Decision::Allow(i);
        }
        if !d.default_deny.is_empty() {
            let peer_known = d.entries.iter().any(|e| {
                e.tier == Tier::Namespace && self.selectors.peer_set_contains(e.peers, peer)
            });
            return L4Decision::DefaultDeny {
                peer_known,
                tier: None,
            };
        }
        self.decide_baseline(d, 0, peer, protocol, port)
    }

    /// Baseline (first match from entry `from`), else allowed.
    fn decide_baseline(
        &self,
        d: &DirPolicy,
        from: usize,
        peer: Idx,
        protocol: Protocol,
        port: u16,
    ) -> L4Decision {
        for (i, e) in d.entries.iter().enumerate().skip(from) {
            if e.tier == Tier::Baseline && self.entry_matches(e, peer, protocol, port) {
                return match e.action {
                    Action::Deny => L4Decision::Deny(i),
                    _ => L4Decision::Allow(i),
                };
            }
        }
        if d.selected_by.is_empty() {
            L4Decision::NoPolicy
        } else {
            L4Decision::DefaultAllow
        }
    }

    /// The decision with Calico tiers: Admin (first match), then every tier in order
    /// (policies by order, rules in order: Allow and Deny decide, Pass skips the rest of
    /// the tier; the namespace tier, inside `default`, decides as one policy when one of
    /// its rules matches; a selecting tier left undecided ends with its default action),
    /// then Baseline. HTTP rules of Allow rules met on the way are kept: the flow goes to
    /// the proxy, where a request they allow passes and any other gets what the flow got.
    pub fn decide_tiered(
        &self,
        d: &DirPolicy,
        peer: Idx,
        protocol: Protocol,
        port: u16,
    ) -> L4Decision {
        let entries = &d.entries;
        let mut i = 0;
        let mut passed = false;
        while let Some(e) = entries.get(i).filter(|e| e.tier == Tier::Admin) {
            if !passed && self.entry_matches(e, peer, protocol, port) {
                match e.action {
                    Action::Allow => return L4Decision::Allow(i),
                    Action::Deny => return L4Decision::Deny(i),
                    Action::Pass => passed = true,
                }
            }
            i += 1;
        }
        let mut sets: Vec<(usize, L7Id)> = Vec::new();
        let with_sets = |sets: Vec<(usize, L7Id)>, d: L4Decision| -> L4Decision {
            if sets.is_empty() {
                return d;
            }
            match d {
                L4Decision::Allow(i) => L4Decision::Redirect {
                    sets,
                    allow_all: Some(i),
                },
                L4Decision::Redirect {
                    sets: more,
                    allow_all,
                } => {
                    let mut all = sets;
                    all.extend(more);
                    L4Decision::Redirect {
                        sets: all,
                        allow_all,
                    }
                }
                L4Decision::Deny(_) | L4Decision::DefaultDeny { .. } => L4Decision::Redirect {
                    sets,
                    allow_all: None,
                },
                other => other,
            }
        };
        let tier_of = |e: &Entry| {
            if e.tier == Tier::Namespace {
                self.default_tier
            } else {
                e.rank.0 as u32
            }
        };
        let mut next_end = 0;
        let mut passed_tier: Option<u32> = None;
        let mut ns_allow: Option<usize> = None;
        let mut ns_sets: Vec<(usize, L7Id)> = Vec::new();
        while let Some(e) = entries
            .get(i)
            .filter(|e| matches!(e.tier, Tier::Calico | Tier::Namespace))
        {
            let t = tier_of(e);
            while let Some(end) = d.tiers.get(next_end).filter(|end| end.tier < t) {
                if passed_tier != Some(end.tier) && end.action == Action::Deny {
                    return with_sets(sets, self.tier_end(d, next_end, peer));
                }
                next_end += 1;
            }
            if passed_tier != Some(t) && self.entry_matches(e, peer, protocol, port) {
                match (e.tier, e.action, e.l7) {
                    (_, Action::Deny, _) => return with_sets(sets, L4Decision::Deny(i)),
                    (Tier::Calico, Action::Pass, _) => passed_tier = Some(t),
                    (Tier::Calico, _, Some(set)) => sets.push((i, set)),
                    (Tier::Calico, _, None) => return with_sets(sets, L4Decision::Allow(i)),
                    (_, _, Some(set)) => ns_sets.push((i, set)),
                    (_, _, None) => {
                        ns_allow.get_or_insert(i);
                    }
                }
            }
            i += 1;
            let block_ends = e.tier == Tier::Namespace
                && entries.get(i).is_none_or(|n| n.tier != Tier::Namespace);
            if block_ends && !ns_sets.is_empty() {
                let ns = L4Decision::Redirect {
                    sets: std::mem::take(&mut ns_sets),
                    allow_all: ns_allow,
                };
                return with_sets(sets, ns);
            }
            if let (true, Some(a)) = (block_ends, ns_allow) {
                return with_sets(sets, L4Decision::Allow(a));
            }
        }
        while let Some(end) = d.tiers.get(next_end) {
            if passed_tier != Some(end.tier) && end.action == Action::Deny {
                return with_sets(sets, self.tier_end(d, next_end, peer));
            }
            next_end += 1;
        }
        match self.decide_baseline(d, i, peer, protocol, port) {
            // allowed after every tier: the HTTP rules met on the way restrict nothing
            allowed @ (L4Decision::NoPolicy | L4Decision::DefaultAllow) => allowed,
            other => with_sets(sets, other),
        }
    }

    /// The end-of-tier deny of `d.tiers[k]`: at L4 when a rule of the tier names the
    /// peer on another port.
    fn tier_end(&self, d: &DirPolicy, k: usize, peer: Idx) -> L4Decision {
        let t = d.tiers[k].tier;
        let peer_known = d.entries.iter().any(|e| {
            let in_tier = match e.tier {
                Tier::Calico => e.rank.0 as u32 == t,
                Tier::Namespace => t == self.default_tier,
                _ => false,
            };
            in_tier && self.selectors.peer_set_contains(e.peers, peer)
        });
        L4Decision::DefaultDeny {
            peer_known,
            tier: Some(k),
        }
    }
}

/// A question about one flow: who talks to whom, on which port, with which request.
#[derive(Clone, Debug)]
pub struct Query {
    pub from: EndpointRef,
    pub to: EndpointRef,
    pub port: u16,
    pub protocol: Protocol,
    pub http: Option<SimpleRequest>,
    /// A DNS query name sent over the flow.
    pub dns: Option<String>,
}

/// The TLS session a flow carries: the SNI its ClientHello sends (None: no SNI). A
/// query with a TLS session and an HTTP request is HTTPS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsProbe {
    pub sni: Option<String>,
}

/// The verdict of one side (egress of the source, or ingress of the destination).
#[derive(Clone, Debug, Serialize)]
pub struct SideVerdict {
    pub direction: Direction,
    pub endpoint: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<Layer>,
    /// The deciding policy, as `Kind namespace/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The deciding rule's field path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Whether the flow goes through a proxy on this side.
    pub proxied: bool,
    /// What the proxy does with a TLS session on this side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
    pub reason: String,
}

/// What the proxy does with a TLS session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The bytes pass to the server untouched (SNI checked, not decrypted).
    Spliced,
    /// Terminated, the requests checked, and TLS originated to the server.
    Intercepted,
    /// The connection is reset.
    Reset,
}

/// The verdict of a whole flow.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// Where the flow was denied, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<Layer>,
    pub from: String,
    pub to: String,
    pub sides: Vec<SideVerdict>,
}

impl Verdict {
    /// One line: `DENIED at L7 by ...` or `ALLOWED`.
    pub fn summary(&self) -> String {
        let word = if self.allowed { "ALLOWED" } else { "DENIED" };
        match (self.layer, self.sides.iter().find(|s| !s.allowed)) {
            (Some(l), Some(s)) => format!(
                "{word} at {l} ({} of {}): {}",
                s.direction, s.endpoint, s.reason
            ),
            _ => word.to_string(),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} -> {}: {}",
            self.from,
            self.to,
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )?;
        for s in &self.sides {
            let mark = match (s.allowed, s.layer) {
                (true, _) => "allowed".to_string(),
                (false, Some(l)) => format!("denied at {l}"),
                (false, None) => "denied".to_string(),
            };
            let via = match (s.proxied, s.tls) {
                (_, Some(TlsMode::Spliced)) => " (proxied, TLS spliced)",
                (_, Some(TlsMode::Intercepted)) => " (proxied, TLS intercepted)",
                (_, Some(TlsMode::Reset)) => " (proxied, TLS reset)",
                (true, None) => " (proxied)",
                (false, None) => "",
            };
            writeln!(
                f,
                "  {} of {}: {mark}{via}: {}",
                s.direction, s.endpoint, s.reason
            )?;
        }
        Ok(())
    }
}

/// Why a query could not be answered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("unknown endpoint {0}: not a pod, node or external of the cluster")]
    UnknownEndpoint(String),
    #[error("endpoint {0} has no IP address")]
    NoAddress(String),
    #[error("endpoint {0} is on another node: this node's model does not compile its egress (trace with `ward policy trace` on the whole cluster)")]
    OutOfScope(String),
}

struct Resolved {
    label: String,
    ip: IpAddr,
    node: Option<String>,
    endpoint: Option<usize>,
}

impl Model {
    fn resolve(&self, r: &EndpointRef, family_of: Option<IpAddr>) -> Result<Resolved, QueryError> {
        let pick = |ips: Vec<IpAddr>, label: &str| -> Result<IpAddr, QueryError> {
            ips.iter()
                .find(|ip| family_of.is_none_or(|f| f.is_ipv4() == ip.is_ipv4()))
                .or(ips.first())
                .copied()
                .ok_or_else(|| QueryError::NoAddress(label.to_string()))
        };
        match r {
            EndpointRef::Pod { namespace, name } => {
                let label = format!("{namespace}/{name}");
                let (pi, pod) = self
                    .cluster
                    .pods
                    .iter()
                    .enumerate()
                    .find(|(_, p)| &p.namespace == namespace && &p.name == name)
                    .ok_or_else(|| QueryError::UnknownEndpoint(label.clone()))?;
                Ok(Resolved {
                    ip: pick(pod.all_ips().collect(), &label)?,
                    node: pod.node.clone(),
                    endpoint: self.endpoint_slot(EndpointKey::Pod(pi)),
                    label,
                })
            }
            EndpointRef::Node(n) => {
                let (ni, node) = self
                    .cluster
                    .nodes
                    .iter()
                    .enumerate()
                    .find(|(_, x)| &x.name == n)
                    .ok_or_else(|| QueryError::UnknownEndpoint(format!("node:{n}")))?;
                Ok(Resolved {
                    label: format!("node:{n}"),
                    ip: node.ip,
                    node: Some(n.clone()),
                    endpoint: self.endpoint_slot(EndpointKey::Node(ni)),
                })
            }
            EndpointRef::External(n) => {
                let e = self
                    .cluster
                    .externals
                    .iter()
                    .find(|x| &x.name == n)
                    .ok_or_else(|| QueryError::UnknownEndpoint(format!("external:{n}")))?;
                Ok(Resolved {
                    label: format!("external:{n}"),
                    ip: e.ip,
                    node: None,
                    endpoint: None,
                })
            }
            EndpointRef::Ip(ip) => {
                // an IP of a pod or node is that pod or node
                for p in &self.cluster.pods {
                    if p.all_ips().any(|x| x == *ip) {
                        return self.resolve(
                            &EndpointRef::Pod {
                                namespace: p.namespace.clone(),
                                name: p.name.clone(),
                            },
                            Some(*ip),
                        );
                    }
                }
                if let Some(n) = self.cluster.nodes.iter().find(|n| n.ip == *ip) {
                    return self.resolve(&EndpointRef::Node(n.name.clone()), Some(*ip));
                }
                Ok(Resolved {
                    label: ip.to_string(),
                    ip: *ip,
                    node: None,
                    endpoint: None,
                })
            }
        }
    }

    /// Answers a query with a verdict and its explanation.
    pub fn query(&self, q: &Query) -> Result<Verdict, QueryError> {
        self.query_session(q, None)
    }

    /// [`Model::query`] for a flow that carries a TLS session: the SNI is checked, and a
    /// session the rules intercept is checked per request (HTTPS) against the material
    /// of the case's secrets (`cluster.secrets`).
    pub fn query_tls(&self, q: &Query, tls: &TlsProbe) -> Result<Verdict, QueryError> {
        self.query_session(q, Some(tls))
    }

    /// The verdict of one side of a flow: the source's egress or the destination's
    /// ingress (None: that side is no endpoint, an outside address). A node-scoped model
    /// answers for the sides of its own node's endpoints, as a node's datapath decides
    /// them: the agent explains its drops this way.
    pub fn query_side(&self, q: &Query, dir: Direction) -> Result<Option<SideVerdict>, QueryError> {
        let dst = self.resolve(&q.to, None)?;
        let src = self.resolve(&q.from, Some(dst.ip))?;
        match dir {
            Direction::Egress => self.egress_side(&src, &dst, q, None),
            Direction::Ingress => self.ingress_side(&src, &dst, q, None),
        }
    }

    fn egress_side(
        &self,
        src: &Resolved,
        dst: &Resolved,
        q: &Query,
        tls: Option<&TlsProbe>,
    ) -> Result<Option<SideVerdict>, QueryError> {
        let Some(slot) = src.endpoint else {
            return Ok(None);
        };
        // a node-scoped model has no egress policy of another node's endpoint
        let ep = self
            .endpoint_at(slot)
            .ok_or_else(|| QueryError::OutOfScope(src.label.clone()))?;
        let peer = self.identity_of(dst.ip, src.node.as_deref());
        Ok(Some(self.side(ep, Direction::Egress, peer, q, tls, dst)))
    }

    fn ingress_side(
        &self,
        src: &Resolved,
        dst: &Resolved,
        q: &Query,
        tls: Option<&TlsProbe>,
    ) -> Result<Option<SideVerdict>, QueryError> {
        let Some(key) = dst.endpoint.and_then(|s| self.endpoint_key(s)) else {
            return Ok(None);
        };
        let ep = self
            .ingress_policy(key)
            .map_err(|_| QueryError::OutOfScope(dst.label.clone()))?;
        let peer = self.identity_of(src.ip, dst.node.as_deref());
        Ok(Some(self.side(&ep, Direction::Ingress, peer, q, tls, dst)))
    }

    fn query_session(&self, q: &Query, tls: Option<&TlsProbe>) -> Result<Verdict, QueryError> {
        let dst = self.resolve(&q.to, None)?;
        let src = self.resolve(&q.from, Some(dst.ip))?;
        let sides: Vec<SideVerdict> = [
            self.egress_side(&src, &dst, q, tls)?,
            self.ingress_side(&src, &dst, q, tls)?,
        ]
        .into_iter()
        .flatten()
        .collect();
        let denied = sides.iter().find(|s| !s.allowed);
        Ok(Verdict {
            allowed: denied.is_none(),
            layer: denied.and_then(|s| s.layer),
            from: src.label,
            to: dst.label,
            sides,
        })
    }

    fn policy_name(&self, policy: u32) -> String {
        self.policies[policy as usize].object.to_string()
    }

    fn rule_path(&self, e: &Entry) -> String {
        let p = &self.policies[e.origin.policy as usize];
        let r = &p.rules[e.origin.rule as usize];
        match e.origin.port_rule {
            Some(g) => r
                .ports
                .get(g as usize)
                .map_or(r.path.clone(), |g| g.path.clone()),
            None => r.path.clone(),
        }
    }

    fn side(
        &self,
        ep: &EndpointPolicy,
        dir: Direction,
        peer: Idx,
        q: &Query,
        tls: Option<&TlsProbe>,
        dst: &Resolved,
    ) -> SideVerdict {
        let d = self.decide(ep, dir, peer, q.protocol, q.port);
        let entries = &ep.dirs[dir.index()].entries;
        let peer_desc = {
            let id = self.identities.get(peer);
            format!("identity {} ({:?})", id.id, id.kind)
        };
        let mut v = SideVerdict {
            direction: dir,
            endpoint: ep.name.clone(),
            allowed: d.allows(),
            layer: None,
            policy: None,
            rule: None,
            proxied: false,
            tls: None,
            reason: String::new(),
        };
        let traffic = format!("{}/{}", q.protocol, q.port);
        match d {
            L4Decision::NoPolicy => {
                v.reason = format!("no policy selects {} for {dir}", ep.name);
            }
            L4Decision::DefaultAllow => {
                let names: Vec<String> = ep.dirs[dir.index()]
                    .selected_by
                    .iter()
                    .map(|p| self.policy_name(*p))
                    .collect();
                v.reason = format!(
                    "allowed by default: selected by {} but none puts it in default deny for {dir} and no rule matches",
                    names.join(", ")
                );
            }
            L4Decision::Allow(i) => {
                let e = &entries[i];
                v.policy = Some(self.policy_name(e.origin.policy));
                v.rule = Some(self.rule_path(e));
                v.reason = format!(
                    "allowed by {} {} ({} {traffic} from peers {})",
                    self.policy_name(e.origin.policy),
                    self.rule_path(e),
                    self.tier_word(e),
                    self.describe_peers(e.peers)
                );
            }
            L4Decision::Deny(i) => {
                let e = &entries[i];
                v.layer = Some(if e.is_l3() { Layer::L3 } else { Layer::L4 });
                v.policy = Some(self.policy_name(e.origin.policy));
                v.rule = Some(self.rule_path(e));
                v.reason = format!(
                    "denied by {} {} ({} deny of {traffic} for peers {})",
                    self.policy_name(e.origin.policy),
                    self.rule_path(e),
                    self.tier_word(e),
                    self.describe_peers(e.peers)
                );
            }
            L4Decision::DefaultDeny { peer_known, tier } => {
                v.layer = Some(if peer_known { Layer::L4 } else { Layer::L3 });
                let d = &ep.dirs[dir.index()];
                let end = tier.and_then(|k| d.tiers.get(k));
                let policies = end.map_or(&d.default_deny, |t| &t.selected_by);
                let names: Vec<String> = policies.iter().map(|p| self.policy_name(*p)).collect();
                let to = if dir == Direction::Egress {
                    "to"
                } else {
                    "from"
                };
                v.reason = match end {
                    Some(t) => format!(
                        "end of Calico tier {}: selected by {} and no rule decides {traffic} {to} {peer_desc}",
                        self.calico_tiers[t.tier as usize].name,
                        names.join(", "),
                    ),
                    None => format!(
                        "default deny: selected by {} and no rule allows {traffic} {to} {peer_desc}",
                        names.join(", "),
                    ),
                };
            }
            L4Decision::Redirect { .. } => {
                v.proxied = true;
                let sp = self.side_policy(ep, dir, peer, q.protocol, q.port);
                self.l7_side(&mut v, sp, q, tls, dst);
            }
        }
        v
    }

    fn l7_side(
        &self,
        v: &mut SideVerdict,
        side: SidePolicy,
        q: &Query,
        tls: Option<&TlsProbe>,
        dst: &Resolved,
    ) {
        let mut conn = ConnectionPolicy { sides: vec![side] };
        let mut what_tls = String::new();
        if let Some(probe) = tls {
            let hello = match &probe.sni {
                Some(n) => format!("TLS SNI {n}"),
                None => "TLS without SNI".to_string(),
            };
            let sni = match probe.sni.as_deref().map(client_sni) {
                None => None,
                Some(Ok(sni)) => sni,
                Some(Err(why)) => {
                    v.tls = Some(TlsMode::Reset);
                    v.allowed = false;
                    v.layer = Some(Layer::L7);
                    v.reason = format!("{hello}: {why}: the handshake fails (reset)");
                    return;
                }
            };
            match self.tls_session(&conn, sni.as_deref()) {
                TlsSession::Reset { reason, rule } => {
                    v.tls = Some(TlsMode::Reset);
                    v.allowed = false;
                    v.layer = Some(Layer::L7);
                    v.policy = rule.as_ref().map(|r| r.policy.clone());
                    v.rule = rule.map(|r| r.rule);
                    v.reason = format!("{hello}: {}: reset", self.here(v, &reason));
                    return;
                }
                TlsSession::Splice { allowed_by } => {
                    v.tls = Some(TlsMode::Spliced);
                    let by = allowed_by.first();
                    v.policy = by.map(|m| m.policy.clone());
                    v.rule = by.map(|m| m.rule.clone());
                    v.reason = match by {
                        Some(m) => format!(
                            "{hello}: spliced to the server untouched (not decrypted), admitted by {} {}",
                            m.policy, m.rule
                        ),
                        None => format!("{hello}: spliced to the server untouched (not decrypted)"),
                    };
                    return;
                }
                TlsSession::Intercept(i) => {
                    v.tls = Some(TlsMode::Intercepted);
                    v.policy = Some(i.rule.policy.clone());
                    v.rule = Some(i.rule.rule.clone());
                    let missing = std::iter::once(&i.terminating)
                        .chain(i.originating.as_ref())
                        .find_map(|c| missing_material(c, self.cluster.as_ref()));
                    let missing = missing.or_else(|| {
                        i.originating.is_none().then(|| {
                            "terminatingTLS without originatingTLS: no CA to verify the server with (Ward's tls_system_roots setting uses the node's roots)".to_string()
                        })
                    });
                    if let Some(why) = missing {
                        v.tls = Some(TlsMode::Reset);
                        v.allowed = false;
                        v.layer = Some(Layer::L7);
                        v.reason = format!(
                            "{hello}: intercepted by {} {}, whose TLS material is unusable ({why}): reset (fail closed)",
                            i.rule.policy, i.rule.rule
                        );
                        return;
                    }
                    what_tls = format!(
                        "{hello}: intercepted by {} {} ({}); ",
                        i.rule.policy, i.rule.rule, i.terminating.secret
                    );
                    if q.http.is_none() {
                        v.reason =
                            format!("{what_tls}the handshake completes; each request is checked");
                        return;
                    }
                    conn = i.policy;
                }
            }
        }
        let plain = &conn.sides[0].decision;
        if let SideDecision::Deny { reason } = plain {
            v.allowed = false;
            v.layer = Some(Layer::L7);
            v.reason = format!("{what_tls}{reason}");
            return;
        }
        let (d, what, denial) = if let Some(req) = &q.http {
            let mut req = req.clone();
            if req.host().is_none() {
                let sni =
                    tls.and_then(|t| t.sni.as_deref().and_then(|n| client_sni(n).ok().flatten()));
                req.host = Some(match (sni.as_deref(), q.port) {
                    (Some(n), 443) => n.to_string(),
                    (Some(n), p) => format!("{n}:{p}"),
                    (None, 80) => dst.ip.to_string(),
                    (None, p) => format!("{}:{p}", dst.ip),
                });
            }
            (
                self.check_http_with(&conn, &req, self.cluster.as_ref()),
                format!(
                    "{}HTTP {} {}",
                    if tls.is_some() { "HTTPS: " } else { "" },
                    req.method,
                    req.path
                ),
                "403 Access denied",
            )
        } else if let Some(name) = &q.dns {
            (
                self.check_dns(&conn, name),
                format!("DNS query {}", normalize(name)),
                "REFUSED",
            )
        } else {
            match plain {
                SideDecision::AllowAll { policy, rule } => {
                    v.policy = policy.clone();
                    v.rule = rule.clone();
                    v.reason = match (policy, rule) {
                        (Some(p), Some(r)) => format!(
                            "{what_tls}allowed by {p} {r} (an L4 rule without L7 rules covers this peer: the flow is proxied, every request passes)"
                        ),
                        _ => format!("{what_tls}allowed: no L7 rule applies"),
                    };
                }
                SideDecision::Rules { sets, .. } => {
                    let all: Vec<String> = sets
                        .iter()
                        .map(|s| format!("{} {}", s.policy, self.l7[s.l7 as usize].path))
                        .collect();
                    v.policy = sets.first().map(|s| s.policy.clone());
                    v.rule = sets
                        .first()
                        .map(|s| self.l7[s.l7 as usize].port_path().to_string());
                    v.reason = format!(
                        "{what_tls}allowed to the proxy; each request is checked against {}",
                        all.join(", ")
                    );
                }
                SideDecision::Deny { .. } => {}
            }
            return;
        };
        match d.matched.first() {
            Some(m) if d.allowed => {
                v.policy = Some(m.policy.clone());
                v.rule = Some(m.rule.clone());
                v.reason = format!(
                    "{what_tls}allowed by {} {} ({what} matches)",
                    m.policy, m.rule
                );
            }
            _ if d.allowed => {
                v.reason = format!("{what_tls}allowed: {what} passes (no L7 rule applies)");
            }
            _ => {
                v.allowed = false;
                v.layer = Some(Layer::L7);
                if v.policy.is_none() {
                    v.policy = match &conn.sides[0].decision {
                        SideDecision::Rules { sets, .. } => sets.first().map(|s| s.policy.clone()),
                        _ => None,
                    };
                }
                let why = self.here(v, &d.reason);
                v.reason = format!("{what_tls}{what}: {why}: {denial}");
            }
        }
    }

    /// A reason without the `DIR of ENDPOINT: ` prefix that the side already names.
    fn here<'a>(&self, v: &SideVerdict, reason: &'a str) -> &'a str {
        let prefix = format!("{} of {}: ", v.direction, v.endpoint);
        reason.strip_prefix(&prefix).unwrap_or(reason)
    }
}

impl Model {
    fn tier_word(&self, e: &Entry) -> String {
        match e.tier {
            Tier::Admin => "admin tier,".into(),
            Tier::Calico => self
                .calico_tiers
                .get(e.rank.0 as usize)
                .map_or_else(String::new, |t| format!("Calico tier {},", t.name)),
            Tier::Namespace => String::new(),
            Tier::Baseline => "baseline tier,".into(),
        }
    }
}
