//! Policy changes without a full compile.
//!
//! A policy's meaning for an endpoint depends only on whether its subject selects the
//! endpoint's identity; its peers are peer sets over identities, which a policy change
//! does not move (as long as the policies' CIDR prefixes and toFQDNs patterns stay the
//! same: those give identities labels). So when policies are added, changed or removed:
//!
//! - the endpoints in scope whose identity the subject of a changed policy selects,
//!   before or after the change (for host policies: the node endpoints it selects), are
//!   compiled again;
//! - every other endpoint in scope keeps its entries; only the numbers that point into
//!   the policy list move when policies are added or removed before others (policy
//!   index, evaluation order, L7 set number). They move in the same order as before, so
//!   entries are renumbered in place, and their order stays what a compile gives. Should
//!   the unchanged policies come in another relative order, every endpoint in scope is
//!   compiled again.
//!
//! Selectors and peer sets of unchanged policies are kept; new ones are interned and
//! evaluated against the identities. The result equals [`Model::compile`] of the new
//! policies (peer sets compared by their members, L7 sets by content). Not handled here,
//! so the caller compiles in full: a change of the policies' prefixes or FQDN patterns,
//! of the Calico tiers, and a selector cache grown well past what a compile would hold
//! (selectors of old policy versions are only dropped by a compile).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;

use super::{tiers, EndpointKey, EndpointPolicy, L7Id, L7Sets, Model};
use crate::api::common::network_source;
use crate::identity::PeerSetId;
use crate::labels::Source;
use crate::policy::{Policy, Subject};

/// Why a policy change needs a full compile instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyUnsupported {
    #[error("the policies' CIDR prefixes changed (prefix and pod identities follow them)")]
    Prefixes,
    #[error("the policies' toFQDNs patterns changed (learned identities follow them)")]
    FqdnPatterns,
    #[error("the Calico tiers changed")]
    Tiers,
    #[error("the selector cache holds {held} selectors, {compiled} after the last compile")]
    Compact { held: usize, compiled: usize },
}

/// What one policy change did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    /// Policies of the new list (by index) that are new or changed.
    pub changed: Vec<u32>,
    /// How many policies of the old list are gone or changed.
    pub removed: usize,
    /// Endpoints compiled again, in slot order.
    pub recompiled: Vec<EndpointKey>,
    /// Endpoints whose entries were only renumbered.
    pub renumbered: usize,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed == 0
    }
}

/// The numbers that moved, from the old policy list to the new one (kept policies only).
struct Renumbering {
    policy: HashMap<u32, u32>,
    order: HashMap<u32, u32>,
    l7: HashMap<L7Id, L7Id>,
}

impl Renumbering {
    fn is_identity(&self) -> bool {
        self.policy.iter().all(|(a, b)| a == b)
            && self.order.iter().all(|(a, b)| a == b)
            && self.l7.iter().all(|(a, b)| a == b)
    }
}

/// How far the selector cache may grow past a compile's before a change asks for one.
fn compact_limit(compiled: usize) -> usize {
    2 * compiled + 256
}

impl Model {
    /// Moves the model to the policies `policies` without a full compile (see the module
    /// documentation). On [`PolicyUnsupported`] the model is left as it was and the
    /// caller compiles in full.
    pub fn apply_policies(
        &mut self,
        policies: Vec<Arc<Policy>>,
    ) -> Result<PolicyChange, PolicyUnsupported> {
        let held = self.selectors.selector_count();
        if held > compact_limit(self.selectors_compiled) {
            return Err(PolicyUnsupported::Compact {
                held,
                compiled: self.selectors_compiled,
            });
        }
        let (prefixes, patterns) = prefixes_and_patterns(&policies);
        if prefixes != self.prefixes {
            return Err(PolicyUnsupported::Prefixes);
        }
        let known: BTreeSet<&str> = self.fqdn_patterns.iter().map(|(t, _)| t.as_str()).collect();
        if patterns.iter().map(String::as_str).collect::<BTreeSet<_>>() != known {
            return Err(PolicyUnsupported::FqdnPatterns);
        }
        if tiers::tier_table(&policies) != self.calico_tiers {
            return Err(PolicyUnsupported::Tiers);
        }
        let kept = match_policies(&self.policies, &policies);
        let mut change = PolicyChange {
            changed: (0..policies.len() as u32)
                .filter(|&i| kept[i as usize].is_none())
                .collect(),
            removed: self.policies.len() - kept.iter().flatten().count(),
            ..PolicyChange::default()
        };
        if change.is_empty() && self.policies.len() == policies.len() {
            // the same policies in the same places
            if kept.iter().enumerate().all(|(i, o)| *o == Some(i)) {
                return Ok(change);
            }
        }
        let kept_old: BTreeSet<usize> = kept.iter().flatten().copied().collect();
        // subjects of what changed, before and after
        let mut touched: Vec<Subject> = Vec::new();
        let mut touched_sets: Vec<PeerSetId> = Vec::new();
        for (o, p) in self.policies.iter().enumerate() {
            if !kept_old.contains(&o) {
                touched.push(p.subject.clone());
                touched_sets.extend(self.subjects[o]);
            }
        }

        // the new policy list, its order, subjects, peer sets and L7 numbers
        let old_order = std::mem::take(&mut self.policy_order);
        let old_subjects = std::mem::take(&mut self.subjects);
        let old_rule_peers = std::mem::take(&mut self.rule_peers);
        let old_l7_of = std::mem::take(&mut self.l7_of);
        let old_l7 = std::mem::take(&mut self.l7);
        self.policies = policies;
        self.policy_order = tiers::policy_order(&self.policies, &self.calico_tiers);
        let mut renumbering = Renumbering {
            policy: HashMap::new(),
            order: HashMap::new(),
            l7: HashMap::new(),
        };
        self.l7 = L7Sets::default();
        for (i, o) in kept.iter().enumerate() {
            let p = Arc::clone(&self.policies[i]);
            match *o {
                Some(o) => {
                    self.subjects.push(old_subjects[o]);
                    self.rule_peers.push(old_rule_peers[o].clone());
                    renumbering.policy.insert(o as u32, i as u32);
                    renumbering.order.insert(old_order[o], self.policy_order[i]);
                }
                None => {
                    let (subject, peers) = self.intern_policy(&p);
                    touched.push(p.subject.clone());
                    touched_sets.extend(subject);
                    self.subjects.push(subject);
                    self.rule_peers.push(peers);
                }
            }
            // the sets of kept policies carry over (shared), new ones are built
            let reuse = |ri: u32, gi: u32| {
                let o = (*o)?;
                old_l7.shared(*old_l7_of.get(&(o as u32, ri, gi))?)
            };
            self.number_l7(i as u32, &p, reuse);
            if let Some(o) = *o {
                for ((_, ri, gi), &old_id) in old_l7_of.iter().filter(|(k, _)| k.0 == o as u32) {
                    if let Some(&new_id) = self.l7_of.get(&(i as u32, *ri, *gi)) {
                        renumbering.l7.insert(old_id, new_id);
                    }
                }
            }
        }
        // Kept policies must keep their relative order for entries to be renumbered in
        // place: evaluation order and index both.
        let in_place = renumbering.is_identity()
            || monotonic(&renumbering, &old_order, &self.policy_order, &kept);

        let touches = |m: &Model, key: EndpointKey, identity| match key {
            EndpointKey::Pod(_) => touched_sets
                .iter()
                .any(|&s| m.selectors.peer_set_contains(s, identity)),
            EndpointKey::Node(n) => {
                let labels = m.node_label_set(n, true);
                touched
                    .iter()
                    .any(|s| matches!(s, Subject::Nodes(sel) if sel.matches(&labels)))
            }
        };
        for slot in 0..self.endpoints.len() {
            let Some(ep) = self.endpoints[slot].clone() else {
                continue;
            };
            if !in_place || touches(self, ep.key, ep.identity) {
                let fresh = match ep.key {
                    EndpointKey::Pod(p) => {
                        let ident = self.pod_identity[p];
                        let selecting = self.policies_selecting(ident);
                        self.compile_endpoint(ep.key, ident, &selecting)
                    }
                    EndpointKey::Node(n) => self.compile_node_endpoint(n),
                };
                self.index_peer_sets(slot, &fresh);
                self.endpoints[slot] = Some(Arc::new(fresh));
                self.unindex_peer_sets(slot, &ep);
                change.recompiled.push(ep.key);
            } else if !renumbering.is_identity() {
                if let Some(ep) = self.endpoints[slot].as_mut() {
                    renumber(Arc::make_mut(ep), &renumbering);
                    change.renumbered += 1;
                }
            }
        }
        Ok(change)
    }
}

/// The policy prefixes (with their label source) and toFQDNs patterns of a policy list,
/// sorted: what identities are labelled from.
pub(super) fn prefixes_and_patterns(
    policies: &[Arc<Policy>],
) -> (Vec<(IpNet, Source)>, Vec<String>) {
    let mut prefixes: BTreeSet<(IpNet, Source)> = BTreeSet::new();
    let mut patterns = BTreeSet::new();
    for p in policies {
        for r in &p.rules {
            prefixes.extend(r.peers.cidrs.iter().map(|p| (*p, Source::Cidr)));
            prefixes.extend(r.peers.networks.iter().map(|p| (*p, network_source())));
            patterns.extend(r.peers.fqdns.iter().cloned());
        }
    }
    (
        prefixes.into_iter().collect(),
        patterns.into_iter().collect(),
    )
}

/// For each new policy, the old one it is (same object, path and content), if any.
fn match_policies(old: &[Arc<Policy>], new: &[Arc<Policy>]) -> Vec<Option<usize>> {
    let mut by_key: HashMap<(&crate::policy::ObjectRef, &str), Vec<usize>> = HashMap::new();
    for (o, p) in old.iter().enumerate() {
        by_key
            .entry((&p.object, p.path.as_str()))
            .or_default()
            .push(o);
    }
    let mut used = vec![false; old.len()];
    new.iter()
        .map(|p| {
            let candidates = by_key.get(&(&p.object, p.path.as_str()))?;
            let o = candidates
                .iter()
                .copied()
                .find(|&o| !used[o] && (Arc::ptr_eq(&old[o], p) || *old[o] == **p))?;
            used[o] = true;
            Some(o)
        })
        .collect()
}

/// Whether the kept policies keep their relative order: by index, and by evaluation
/// order (equal positions staying equal).
fn monotonic(
    r: &Renumbering,
    old_order: &[u32],
    new_order: &[u32],
    kept: &[Option<usize>],
) -> bool {
    let mut by_old: Vec<(u32, u32)> = r.policy.iter().map(|(a, b)| (*a, *b)).collect();
    by_old.sort_unstable();
    if by_old.windows(2).any(|w| w[0].1 >= w[1].1) {
        return false;
    }
    // one new position per old position, strictly increasing with it
    let mut orders: Vec<(u32, u32)> = kept
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.map(|o| (old_order[o], new_order[i])))
        .collect();
    orders.sort_unstable();
    orders.dedup();
    orders
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
}

/// Moves the numbers of an endpoint's entries to the new policy list.
fn renumber(ep: &mut EndpointPolicy, r: &Renumbering) {
    let policy = |p: &mut u32| {
        if let Some(n) = r.policy.get(p) {
            *p = *n;
        }
    };
    for d in &mut ep.dirs {
        for e in &mut d.entries {
            policy(&mut e.origin.policy);
            if let Some(n) = r.order.get(&e.rank.1) {
                e.rank.1 = *n;
            }
            if let Some(l7) = e.l7.as_mut() {
                if let Some(n) = r.l7.get(l7) {
                    *l7 = *n;
                }
            }
        }
        d.default_deny.iter_mut().for_each(policy);
        d.selected_by.iter_mut().for_each(policy);
        for t in &mut d.tiers {
            t.selected_by.iter_mut().for_each(policy);
        }
    }
}
