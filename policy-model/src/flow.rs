//! What the proxies ask: for one connection, which L7 rules apply on each side (resolved
//! once per connection), and for one request or DNS query, whether it passes and which
//! rule decided (checked per request).

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::compile::{EndpointPolicy, L7Id, Model};
use crate::fqdn::normalized;
use crate::http::{HeaderAction, Request};
use crate::identity::Idx;
use crate::l7::L7Protocol;
use crate::policy::{Direction, Protocol};
use crate::tls::{NoSecrets, Secrets};
use crate::verdict::L4Decision;

/// A rule set that applies to a connection, with the policy it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleSetRef {
    pub l7: L7Id,
    /// `Kind namespace/name` of the policy.
    pub policy: String,
}

/// What one side (egress of the source or ingress of the destination) requires of a
/// connection's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SideDecision {
    /// L3/L4 deny: the connection must not be served.
    Deny { reason: String },
    /// Every request passes (no L7 rule applies, or an L4-only rule covers the peer).
    AllowAll {
        #[serde(skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
    },
    /// A request passes if one rule of one of these sets matches.
    Rules {
        sets: Vec<RuleSetRef>,
        /// Why a request that matches none is denied, built once per connection.
        #[serde(skip)]
        denial: Arc<str>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SidePolicy {
    pub direction: Direction,
    /// `ns/pod` or `node:NAME`.
    pub endpoint: String,
    /// What plaintext requests of the connection must pass (a TLS session is decided by
    /// [`Model::tls_session`] from `tls`).
    pub decision: SideDecision,
    /// Every allow that matched the peer and port, when one of them carries
    /// `serverNames` or a TLS context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Arc<TlsSide>>,
}

/// The allows of one side that a TLS session is decided on: the rule sets that matched
/// the peer and port, and an L4-only allow that matched too. Rules that allow the same
/// peer on the same port are merged, as Cilium's agent does: their serverNames are
/// unioned, so an L4-only allow does not lift the SNI check of another rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsSide {
    pub sets: Vec<RuleSetRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l4_allow: Option<Matched>,
}

/// The policy of one connection: the sides that have something to say.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPolicy {
    pub sides: Vec<SidePolicy>,
}

/// A rule that allowed a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub direction: Direction,
    pub policy: String,
    /// e.g. `spec.ingress[0].toPorts[0].rules.http[1]`
    pub rule: String,
}

/// The rule that allowed a DNS query name, by position in the connection's policy
/// ([`Model::dns_allows`]): its side, the rule set within the side and the rule within
/// the set. Plain numbers, so deciding allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsHit {
    side: u32,
    set: u32,
    rule: u32,
}

/// A position as a [`DnsHit`] holds it (policies have far fewer than 2^32 rules).
fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// The decision for one HTTP request or DNS query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct L7Decision {
    pub allowed: bool,
    /// The rules (one per side with rules) that allowed it.
    pub matched: Vec<Matched>,
    /// Header side effects the proxy applies before forwarding.
    pub actions: Vec<HeaderAction>,
    pub missing_headers: Vec<String>,
    pub rejected_headers: Vec<String>,
    /// Why it was denied (shared: denials are built once per connection).
    pub reason: Arc<str>,
}

impl ConnectionPolicy {
    /// Whether the connection is denied at L3/L4 on some side.
    pub fn denied(&self) -> Option<&str> {
        self.sides.iter().find_map(|s| match &s.decision {
            SideDecision::Deny { reason } => Some(reason.as_str()),
            _ => None,
        })
    }

    /// Whether some side has L7 rules of this protocol.
    pub fn has_rules(&self) -> bool {
        self.sides
            .iter()
            .any(|s| matches!(s.decision, SideDecision::Rules { .. }))
    }
}

impl Model {
    /// The policy of `endpoint` in `dir` for a peer of identity `peer`, as the proxies
    /// need it.
    pub fn side_policy(
        &self,
        ep: &EndpointPolicy,
        dir: Direction,
        peer: Idx,
        protocol: Protocol,
        port: u16,
    ) -> SidePolicy {
        let entries = &ep.dirs[dir.index()].entries;
        let policy_of = |i: usize| {
            self.policies[entries[i].origin.policy as usize]
                .object
                .to_string()
        };
        let decision = match self.decide(ep, dir, peer, protocol, port) {
            L4Decision::Deny(i) => SideDecision::Deny {
                reason: format!("denied by {}", policy_of(i)),
            },
            L4Decision::DefaultDeny { .. } => SideDecision::Deny {
                reason: "default deny: no rule allows this peer and port".into(),
            },
            L4Decision::NoPolicy | L4Decision::DefaultAllow => SideDecision::AllowAll {
                policy: None,
                rule: None,
            },
            L4Decision::Allow(i) => SideDecision::AllowAll {
                policy: Some(policy_of(i)),
                rule: Some(self.rule_of(entries, i)),
            },
            L4Decision::Redirect { sets, allow_all } => {
                let sets: Vec<RuleSetRef> = sets
                    .iter()
                    .map(|(i, l7)| RuleSetRef {
                        l7: *l7,
                        policy: policy_of(*i),
                    })
                    .collect();
                let l4_allow = allow_all.map(|i| Matched {
                    direction: dir,
                    policy: policy_of(i),
                    rule: self.rule_of(entries, i),
                });
                if sets.iter().any(|s| self.l7[s.l7 as usize].tls.is_some()) {
                    let tls = Arc::new(TlsSide { sets, l4_allow });
                    return SidePolicy {
                        direction: dir,
                        endpoint: ep.name.clone(),
                        decision: self.plaintext_view(dir, &ep.name, &tls),
                        tls: Some(tls),
                    };
                }
                match l4_allow {
                    Some(m) => SideDecision::AllowAll {
                        policy: Some(m.policy),
                        rule: Some(m.rule),
                    },
                    None => {
                        let denial = self.denial(dir, &ep.name, &sets);
                        SideDecision::Rules { sets, denial }
                    }
                }
            }
        };
        SidePolicy {
            direction: dir,
            endpoint: ep.name.clone(),
            decision,
            tls: None,
        }
    }

    /// The path of the rule of entry `i` (an L4 allow names its rule, not a port).
    fn rule_of(&self, entries: &[crate::compile::Entry], i: usize) -> String {
        self.policies[entries[i].origin.policy as usize].rules[entries[i].origin.rule as usize]
            .path
            .clone()
    }

    /// What plaintext (non-TLS) requests on a port with TLS rules must pass. A rule that
    /// lists serverNames admits only TLS with a listed SNI, and merged with the other
    /// allows of the same peer it makes the whole port refuse plaintext; a rule with a
    /// TLS context has nothing to say about plaintext (Cilium's proxy allows a raw socket
    /// only by a rule without TLS). The other rules apply as usual.
    fn plaintext_view(&self, dir: Direction, endpoint: &str, t: &TlsSide) -> SideDecision {
        if let Some(s) = t.sets.iter().find(|s| {
            self.l7[s.l7 as usize]
                .tls
                .as_ref()
                .is_some_and(|x| x.restricts_sni())
        }) {
            return SideDecision::Deny {
                reason: format!(
                    "not TLS: {} {} admits only TLS sessions with a listed SNI",
                    s.policy,
                    self.l7[s.l7 as usize].port_path()
                ),
            };
        }
        if let Some(m) = &t.l4_allow {
            return SideDecision::AllowAll {
                policy: Some(m.policy.clone()),
                rule: Some(m.rule.clone()),
            };
        }
        let plain: Vec<RuleSetRef> = t
            .sets
            .iter()
            .filter(|s| self.l7[s.l7 as usize].tls.is_none())
            .cloned()
            .collect();
        if plain.is_empty() {
            let names: Vec<String> = t
                .sets
                .iter()
                .map(|s| format!("{} {}", s.policy, self.l7[s.l7 as usize].port_path()))
                .collect();
            return SideDecision::Deny {
                reason: format!("not TLS: {} expect TLS", names.join("; ")),
            };
        }
        let denial = self.denial(dir, endpoint, &plain);
        SideDecision::Rules {
            sets: plain,
            denial,
        }
    }

    /// The policy of a connection from `src` to `dst:port`, seen from `node` (the node the
    /// proxy runs on; None when unknown). Both sides are included when both are
    /// endpoints of the cluster, so one proxy hop enforces both: the source's egress when
    /// the model compiles the source (a remote source's egress is its own node's), and
    /// the destination's ingress always, built for this flow when the model does not
    /// compile the destination (a proxy that forwards from the node's address hides the
    /// source from the destination's node).
    pub fn connection_policy(
        &self,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
        node: Option<&str>,
    ) -> ConnectionPolicy {
        let mut sides = Vec::new();
        if let Some(ep) = self.endpoint_of_ip(src) {
            let peer = self.identity_of(dst, node);
            sides.push(self.side_policy(ep, Direction::Egress, peer, protocol, port));
        }
        let dst_key = match self.owner(dst) {
            crate::compile::IpOwner::Pod(p) => Some(crate::compile::EndpointKey::Pod(p)),
            crate::compile::IpOwner::Node(n) => Some(crate::compile::EndpointKey::Node(n)),
            crate::compile::IpOwner::World(_) => None,
        };
        if let Some(key) = dst_key {
            let peer = self.identity_of(src, node);
            sides.push(match self.ingress_policy(key) {
                Ok(ep) => self.side_policy(&ep, Direction::Ingress, peer, protocol, port),
                Err(e) => SidePolicy {
                    direction: Direction::Ingress,
                    endpoint: self.endpoint_name(key),
                    decision: SideDecision::Deny {
                        reason: e.to_string(),
                    },
                    tls: None,
                },
            });
        }
        ConnectionPolicy { sides }
    }

    /// The name (`ns/pod` or `node:NAME`) of the endpoint that owns an IP, whether or not
    /// the model compiles it.
    pub fn endpoint_name_of_ip(&self, ip: IpAddr) -> Option<String> {
        match self.owner(ip) {
            crate::compile::IpOwner::Pod(p) => {
                Some(self.endpoint_name(crate::compile::EndpointKey::Pod(p)))
            }
            crate::compile::IpOwner::Node(n) => {
                Some(self.endpoint_name(crate::compile::EndpointKey::Node(n)))
            }
            crate::compile::IpOwner::World(_) => None,
        }
    }

    /// The compiled policy of the endpoint (pod or node) that owns an IP (None also for
    /// an endpoint outside the model's scope).
    pub fn endpoint_of_ip(&self, ip: IpAddr) -> Option<&EndpointPolicy> {
        match self.owner(ip) {
            crate::compile::IpOwner::Pod(p) => self.endpoint(crate::compile::EndpointKey::Pod(p)),
            crate::compile::IpOwner::Node(n) => self.endpoint(crate::compile::EndpointKey::Node(n)),
            crate::compile::IpOwner::World(_) => None,
        }
    }

    /// Checks one HTTP request against a connection's policy: every side must allow.
    /// Secret-backed header matches find no secret (see [`Model::check_http_with`]).
    pub fn check_http(&self, conn: &ConnectionPolicy, req: &dyn Request) -> L7Decision {
        self.check_http_with(conn, req, &NoSecrets)
    }

    /// [`Model::check_http`] with the values of secret-backed header matches.
    pub fn check_http_with(
        &self,
        conn: &ConnectionPolicy,
        req: &dyn Request,
        secrets: &dyn Secrets,
    ) -> L7Decision {
        let mut d = L7Decision {
            allowed: true,
            ..L7Decision::default()
        };
        for side in &conn.sides {
            match &side.decision {
                SideDecision::Deny { reason } => {
                    return deny(
                        format!("{} of {}: {reason}", side.direction, side.endpoint).into(),
                    )
                }
                SideDecision::AllowAll { .. } => {}
                SideDecision::Rules { sets, denial } => {
                    let mut found = false;
                    for s in sets {
                        let set = &self.l7[s.l7 as usize];
                        if set.every_request {
                            if !found {
                                d.matched.push(Matched {
                                    direction: side.direction,
                                    policy: s.policy.clone(),
                                    rule: set.port_path().to_string(),
                                });
                            }
                            found = true;
                            continue;
                        }
                        if set.rules.protocol() != L7Protocol::Http {
                            continue;
                        }
                        let matches = set.http_matches_with(req, secrets);
                        for m in &matches {
                            d.actions.extend(m.outcome.actions.iter().cloned());
                            d.missing_headers.extend(m.outcome.missing.iter().cloned());
                            d.rejected_headers
                                .extend(m.outcome.rejected.iter().cloned());
                        }
                        if let Some(m) = matches.first() {
                            if !found {
                                d.matched.push(Matched {
                                    direction: side.direction,
                                    policy: s.policy.clone(),
                                    rule: set.rule_path(m.index),
                                });
                            }
                            found = true;
                        }
                    }
                    if !found {
                        return deny(denial.clone());
                    }
                }
            }
        }
        d
    }

    /// Checks one DNS query name against a connection's policy (the client's egress).
    pub fn check_dns(&self, conn: &ConnectionPolicy, qname: &str) -> L7Decision {
        let mut matched = Vec::new();
        match self.dns_hits(conn, qname, |hit| matched.push(self.dns_matched(conn, hit))) {
            Ok(()) => L7Decision {
                allowed: true,
                matched,
                ..L7Decision::default()
            },
            Err(reason) => deny(reason),
        }
    }

    /// What [`Model::check_dns`] decides, without building its strings: the first rule
    /// that allowed the name (none when no side has DNS rules), or why it was denied.
    /// The DNS proxy decides with it before forwarding and names the rule
    /// ([`Model::dns_matched`]) once the answer left.
    pub fn dns_allows(
        &self,
        conn: &ConnectionPolicy,
        qname: &str,
    ) -> Result<Option<DnsHit>, Arc<str>> {
        let mut first = None;
        self.dns_hits(conn, qname, |hit| {
            first.get_or_insert(hit);
        })?;
        Ok(first)
    }

    /// The rule `hit` points at, in `conn` (the connection it was found in).
    pub fn dns_matched(&self, conn: &ConnectionPolicy, hit: DnsHit) -> Matched {
        let side = conn.sides.get(hit.side as usize);
        let set = side.and_then(|s| match &s.decision {
            SideDecision::Rules { sets, .. } => sets.get(hit.set as usize),
            _ => None,
        });
        Matched {
            direction: side.map_or(Direction::Egress, |s| s.direction),
            policy: set.map(|s| s.policy.clone()).unwrap_or_default(),
            rule: set
                .map(|s| self.l7[s.l7 as usize].rule_path(hit.rule as usize))
                .unwrap_or_default(),
        }
    }

    /// Calls `hit` with the first matching rule of each side that has DNS rules, in the
    /// order of the sides; the reason of the denial when a side denies.
    fn dns_hits(
        &self,
        conn: &ConnectionPolicy,
        qname: &str,
        mut hit: impl FnMut(DnsHit),
    ) -> Result<(), Arc<str>> {
        let qname = normalized(qname);
        for (i, side) in conn.sides.iter().enumerate() {
            match &side.decision {
                SideDecision::Deny { reason } => {
                    return Err(format!("{} of {}: {reason}", side.direction, side.endpoint).into())
                }
                SideDecision::AllowAll { .. } => {}
                SideDecision::Rules { sets, denial } => {
                    let found = sets.iter().enumerate().find_map(|(j, s)| {
                        self.l7[s.l7 as usize]
                            .dns_match(&qname)
                            .map(|rule| (j, rule))
                    });
                    match found {
                        Some((set, rule)) => hit(DnsHit {
                            side: index(i),
                            set: index(set),
                            rule: index(rule),
                        }),
                        None => return Err(denial.clone()),
                    }
                }
            }
        }
        Ok(())
    }

    /// The toFQDNs patterns (normalised text) that match a name: the selectors whose
    /// identities the IPs of an answer join.
    pub fn fqdn_selectors_matching(&self, qname: &str) -> Vec<&str> {
        self.fqdn_pattern_index()
            .matching(qname)
            .into_iter()
            .filter_map(|i| self.fqdn_pattern_index().get(i))
            .map(|(t, _)| t.as_str())
            .collect()
    }
}

impl Model {
    /// Why a request matching none of `sets` is denied: `DIR of ENDPOINT: no HTTP rule
    /// of Kind ns/name path; ... matches` (or DNS).
    pub fn denial(&self, dir: Direction, endpoint: &str, sets: &[RuleSetRef]) -> Arc<str> {
        let v: Vec<String> = sets
            .iter()
            .map(|s| format!("{} {}", s.policy, self.l7[s.l7 as usize].path))
            .collect();
        let proto = sets.first().map_or(L7Protocol::Http, |s| {
            self.l7[s.l7 as usize].rules.protocol()
        });
        format!(
            "{dir} of {endpoint}: no {proto} rule of {} matches",
            v.join("; ")
        )
        .into()
    }
}

fn deny(reason: Arc<str>) -> L7Decision {
    L7Decision {
        allowed: false,
        reason,
        ..L7Decision::default()
    }
}
