//! Peer classes: the identities that every policy of a node's endpoints treats alike.
//!
//! policy-model decides a flow from which entries' peer sets hold the peer identity (and,
//! for named ports, the peer's container ports); nothing else about the peer counts. So
//! two identities in exactly the same peer sets of the node's endpoints, with the same
//! named ports where a rule names one, get the same verdict from every endpoint on every
//! port, and one set of policy entries serves both. The policy map is keyed by class and
//! `PEER_CLASSES` maps each identity to its class: a policy that admits the whole cluster
//! costs an entry per class (a handful), where an entry per identity cost thousands per
//! endpoint.
//!
//! Classes keep their number from one computation to the next while their members stay
//! together (identities may join or retire); a class that splits or merges gets a new
//! number, never one in use before. So an identity that changes class moves, in one map
//! write, from entries that are complete for its old class to entries written in full
//! for its new one before the move, and never sees a class's entries half way.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use policy_model::cluster::ContainerPort;
use policy_model::compile::{EndpointPolicy, PortMatch};
use policy_model::identity::{Idx, NumericId, PeerSetId};
use policy_model::Model;
use redirect_bpf_common::CLASS_FIRST;

/// The peer classes of a node's endpoints (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerClasses {
    /// Live identity (numeric) -> its class.
    of: BTreeMap<NumericId, u32>,
    /// Class -> its live identities (model indexes); the first one's verdicts are the
    /// class's.
    members: BTreeMap<u32, BTreeSet<Idx>>,
}

/// What policy-model's decisions read of a peer identity.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Signature {
    /// Membership in each peer set the endpoints' entries use, in a fixed order.
    in_sets: Vec<u64>,
    /// The identity's container ports, when an entry names a port.
    named_ports: Vec<ContainerPort>,
}

impl PeerClasses {
    /// Classes of the model's live identities for `endpoints` (the node's). `previous`
    /// (identity -> class, what the map holds) keeps numbers stable.
    pub fn compute(
        model: &Model,
        endpoints: &[&EndpointPolicy],
        previous: &BTreeMap<NumericId, u32>,
    ) -> PeerClasses {
        let (sets, named) = peer_sets(endpoints);
        let mut groups: HashMap<Signature, Vec<Idx>> = HashMap::new();
        for idx in (0..model.identities.len() as Idx).filter(|&i| model.identities.is_live(i)) {
            groups
                .entry(signature(model, &sets, named, idx))
                .or_default()
                .push(idx);
        }
        let numeric = |i: Idx| model.identities.get(i).id;
        // How many live identities each previous class still has.
        let mut live_in: HashMap<u32, usize> = HashMap::new();
        for &i in groups.values().flatten() {
            if let Some(c) = previous.get(&numeric(i)) {
                *live_in.entry(*c).or_default() += 1;
            }
        }
        let mut numbers = Numbers::after(previous);
        let mut out = PeerClasses::default();
        // In order of first member, so that the numbers given out do not depend on the
        // hash map's order.
        let mut groups: Vec<Vec<Idx>> = groups.into_values().collect();
        groups.sort_unstable_by_key(|g| g[0]);
        for members in groups {
            let before: BTreeSet<u32> = members
                .iter()
                .filter_map(|&i| previous.get(&numeric(i)).copied())
                .collect();
            let kept = match before.iter().next() {
                Some(&c) if before.len() == 1 => {
                    let had = members
                        .iter()
                        .filter(|&&i| previous.contains_key(&numeric(i)))
                        .count();
                    // every surviving member of the old class is here
                    (live_in.get(&c) == Some(&had)).then_some(c)
                }
                _ => None,
            };
            let class = kept.unwrap_or_else(|| numbers.fresh());
            for &i in &members {
                out.of.insert(numeric(i), class);
            }
            out.members.insert(class, members.into_iter().collect());
        }
        out
    }

    /// Identity -> class, what `PEER_CLASSES` must hold.
    pub fn assignments(&self) -> &BTreeMap<NumericId, u32> {
        &self.of
    }

    /// Each class with the identity (model index) whose verdicts are the class's.
    pub fn classes(&self) -> impl Iterator<Item = (u32, Idx)> + '_ {
        self.members
            .iter()
            .filter_map(|(c, m)| Some((*c, *m.first()?)))
    }

    /// Moves the classes along a learning step (IPs learned from DNS answers, no other
    /// change to the model or the endpoints): identities in `retired` that are no longer
    /// live leave their class, live ones in `added` join the class whose members share
    /// their signature. Costs a signature per class and per added identity, where
    /// [`PeerClasses::compute`] costs one per live identity. Returns the assignments that
    /// changed (identity -> class; None: out of the map), or None when that is not
    /// enough (a class lost its last member, an added identity fits no class); the
    /// classes are then to be computed afresh.
    pub fn learn_step(
        &mut self,
        model: &Model,
        endpoints: &[&EndpointPolicy],
        added: &[Idx],
        retired: &[Idx],
    ) -> Option<BTreeMap<NumericId, Option<u32>>> {
        let ids = &model.identities;
        let mut changed = BTreeMap::new();
        for &idx in retired.iter().filter(|&&i| !ids.is_live(i)) {
            let numeric = ids.get(idx).id;
            if let Some(class) = self.of.remove(&numeric) {
                let members = self.members.get_mut(&class)?;
                members.remove(&idx);
                if members.is_empty() {
                    return None;
                }
                changed.insert(numeric, None);
            }
        }
        let (sets, named) = peer_sets(endpoints);
        let mut by_signature: HashMap<Signature, u32> = HashMap::new();
        for (class, idx) in self.classes() {
            if by_signature
                .insert(signature(model, &sets, named, idx), class)
                .is_some()
            {
                // two classes alike: the classes were not computed for these peer sets
                return None;
            }
        }
        for &idx in added.iter().filter(|&&i| ids.is_live(i)) {
            let numeric = ids.get(idx).id;
            let class = *by_signature.get(&signature(model, &sets, named, idx))?;
            let before = self.of.insert(numeric, class);
            if before == Some(class) {
                continue;
            }
            if let Some(old) = before {
                let members = self.members.get_mut(&old)?;
                members.remove(&idx);
                if members.is_empty() {
                    return None;
                }
            }
            self.members.entry(class).or_default().insert(idx);
            changed.insert(numeric, Some(class));
        }
        Some(changed)
    }

    /// The class of a numeric identity.
    pub fn class_of(&self, identity: NumericId) -> Option<u32> {
        self.of.get(&identity).copied()
    }

    /// The class numbers in use.
    pub fn numbers(&self) -> BTreeSet<u32> {
        self.members.keys().copied().collect()
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// The peer sets of every entry of `endpoints`, and whether an entry names a port.
fn peer_sets(endpoints: &[&EndpointPolicy]) -> (Vec<PeerSetId>, bool) {
    let mut sets = BTreeSet::new();
    let mut named = false;
    for ep in endpoints {
        for d in &ep.dirs {
            for e in &d.entries {
                sets.insert(e.peers);
                named |= matches!(e.port, PortMatch::Named(_));
            }
        }
    }
    (sets.into_iter().collect(), named)
}

fn signature(model: &Model, sets: &[PeerSetId], named: bool, idx: Idx) -> Signature {
    let mut in_sets = vec![0u64; sets.len().div_ceil(64)];
    for (bit, &p) in sets.iter().enumerate() {
        if model.selectors.peer_set_contains(p, idx) {
            in_sets[bit / 64] |= 1 << (bit % 64);
        }
    }
    let named_ports = if named {
        model.identities.get(idx).named_ports.clone()
    } else {
        Vec::new()
    };
    Signature {
        in_sets,
        named_ports,
    }
}

/// Class numbers not used before: above every previous one, or, once the numbers run
/// out at `u32::MAX`, the lowest that no previous class holds.
struct Numbers {
    next: Option<u32>,
    used: BTreeSet<u32>,
}

impl Numbers {
    fn after(previous: &BTreeMap<NumericId, u32>) -> Numbers {
        let used: BTreeSet<u32> = previous.values().copied().collect();
        let next = match used.last() {
            Some(&max) => max.checked_add(1),
            None => Some(CLASS_FIRST),
        };
        Numbers { next, used }
    }

    fn fresh(&mut self) -> u32 {
        let n = match self.next {
            Some(n) => n,
            None => (CLASS_FIRST..=u32::MAX)
                .find(|n| !self.used.contains(n))
                // more classes than identities the ipcache can name: never reached
                .unwrap_or(u32::MAX),
        };
        self.next = n.checked_add(1).filter(|n| !self.used.contains(n));
        self.used.insert(n);
        n
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use policy_model::conformance::parse_case;

    /// A server that admits the whole cluster on 80 and one app on 9090: every pod but
    /// the app's is alike to it.
    fn case(extra_pods: &str, extra_rules: &str) -> String {
        format!(
            r#"
format: netpol-oracle/v1
id: 901
name: classes
title: peer classes
semantics: cilium
cluster:
  namespaces:
  - {{name: default, labels: {{}}}}
  nodes:
  - {{name: node-1, ip: 172.18.0.2}}
  pods:
  - {{namespace: default, name: server, labels: {{app: server}}, ip: 10.0.0.1, node: node-1, ports: []}}
  - {{namespace: default, name: app, labels: {{app: app}}, ip: 10.0.0.2, node: node-1, ports: []}}
  - {{namespace: default, name: a, labels: {{app: a}}, ip: 10.0.0.3, node: node-1, ports: []}}
  - {{namespace: default, name: b, labels: {{app: b}}, ip: 10.0.0.4, node: node-1, ports: []}}
{extra_pods}
  externals: []
policies:
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {{name: server-in, namespace: default}}
  spec:
    endpointSelector: {{matchLabels: {{app: server}}}}
    ingress:
    - fromEntities: [cluster]
      toPorts:
      - ports: [{{port: '80', protocol: TCP}}]
    - fromEndpoints: [{{matchLabels: {{app: app}}}}]
      toPorts:
      - ports: [{{port: '9090', protocol: TCP}}]
{extra_rules}
probes: []
"#
        )
    }

    fn model(extra_pods: &str) -> Model {
        model_with(extra_pods, "")
    }

    fn model_with(extra_pods: &str, extra_rules: &str) -> Model {
        parse_case(&case(extra_pods, extra_rules))
            .expect("case")
            .compile(None, None)
            .expect("compile")
    }

    fn server_classes(m: &Model, previous: &BTreeMap<NumericId, u32>) -> PeerClasses {
        let ep = m.pod_endpoint("default/server").expect("server");
        PeerClasses::compute(m, &[ep], previous)
    }

    fn id(m: &Model, pod: &str) -> NumericId {
        let ep = m.pod_endpoint(pod).expect("endpoint");
        m.identities.get(ep.identity).id
    }

    #[test]
    fn identities_the_policies_treat_alike_share_a_class() {
        let m = model("");
        let c = server_classes(&m, &BTreeMap::new());
        let class = |pod: &str| c.class_of(id(&m, pod)).expect("a class");
        assert_eq!(class("default/a"), class("default/b"));
        assert_eq!(class("default/a"), class("default/server"));
        assert_ne!(class("default/a"), class("default/app"));
        // every live identity has a class, every class is above the identities
        assert!(c.assignments().len() >= 4);
        assert!(c.numbers().iter().all(|n| *n >= CLASS_FIRST));
        // cluster pods, the app, and what is outside the cluster (world, ...)
        assert!(c.len() < c.assignments().len(), "{c:?}");
    }

    #[test]
    fn a_class_keeps_its_number_when_identities_join_it() {
        let m = model("");
        let before = server_classes(&m, &BTreeMap::new());
        let more = model(
            "  - {namespace: default, name: c, labels: {app: c}, ip: 10.0.0.5, node: node-1, ports: []}",
        );
        let after = server_classes(&more, before.assignments());
        assert_eq!(after.numbers(), before.numbers());
        assert_eq!(
            after.class_of(id(&more, "default/c")),
            before.class_of(id(&m, "default/a"))
        );
    }

    #[test]
    fn a_class_that_splits_gets_numbers_never_used_before() {
        let m = model("");
        let before = server_classes(&m, &BTreeMap::new());
        // `a` is admitted on one more port: it leaves the cluster pods' class.
        let split = model_with(
            "",
            "    - fromEndpoints: [{matchLabels: {app: a}}]
      toPorts:
      - ports: [{port: '7000', protocol: TCP}]",
        );
        let after = server_classes(&split, before.assignments());
        let (a, b) = (id(&split, "default/a"), id(&split, "default/b"));
        let old = before.numbers();
        for class in [after.class_of(a), after.class_of(b)] {
            let class = class.expect("a class");
            assert!(!old.contains(&class), "{class} reused from {old:?}");
        }
        assert_ne!(after.class_of(a), after.class_of(b));
        // the app's class did not change: kept
        assert_eq!(
            after.class_of(id(&split, "default/app")),
            before.class_of(id(&m, "default/app"))
        );
    }

    const FQDN_CASE: &str = r#"
format: netpol-oracle/v1
id: 902
name: fqdn-classes
title: peer classes of learned addresses
semantics: cilium
cluster:
  namespaces:
  - {name: default, labels: {}}
  nodes:
  - {name: node-1, ip: 172.18.0.2}
  pods:
  - {namespace: default, name: c1, labels: {app: client}, ip: 10.0.0.1, node: node-1, ports: []}
  - {namespace: default, name: c2, labels: {app: client}, ip: 10.0.0.2, node: node-1, ports: []}
  externals: []
policies:
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: saas, namespace: default}
  spec:
    endpointSelector: {matchLabels: {app: client}}
    egress:
    - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.cdn.example'}]
      toPorts:
      - ports: [{port: '443', protocol: TCP}]
probes: []
"#;

    fn eps(m: &Model) -> Vec<&EndpointPolicy> {
        ["default/c1", "default/c2"]
            .iter()
            .map(|p| m.pod_endpoint(p).expect("endpoint"))
            .collect()
    }

    /// What `learn_step` gives after one learning step from the computed classes,
    /// checked against `compute`: the classes, and the assignments that changed.
    fn step(m: &mut Model, client: &str, name: &str, ips: &[&str]) -> Option<PeerClasses> {
        let before = PeerClasses::compute(m, &eps(m), &BTreeMap::new());
        let ips: Vec<std::net::IpAddr> = ips.iter().map(|s| s.parse().expect("ip")).collect();
        let change = m.set_fqdn_ips(client, name, ips);
        let fresh = PeerClasses::compute(m, &eps(m), before.assignments());
        let mut stepped = before.clone();
        let changed = stepped.learn_step(m, &eps(m), &change.added, &change.retired)?;
        assert_eq!(stepped, fresh, "{client} {name}");
        let mut moved = BTreeMap::new();
        for (id, class) in fresh.assignments() {
            if before.assignments().get(id) != Some(class) {
                moved.insert(*id, Some(*class));
            }
        }
        for id in before.assignments().keys() {
            if !fresh.assignments().contains_key(id) {
                moved.insert(*id, None);
            }
        }
        assert_eq!(changed, moved, "{client} {name}: the changes reported");
        Some(stepped)
    }

    #[test]
    fn learned_addresses_join_the_class_of_their_kind_without_a_recount() {
        let mut m = parse_case(FQDN_CASE)
            .expect("case")
            .compile(None, None)
            .expect("compile");
        // c1's first address: a kind no class has yet
        assert_eq!(
            step(&mut m, "default/c1", "api.example.com", &["203.0.113.5"]),
            None
        );
        // another name of c1's rule: the same class
        assert!(step(&mut m, "default/c1", "x.cdn.example", &["203.0.113.6"]).is_some());
        assert!(step(
            &mut m,
            "default/c1",
            "api.example.com",
            &["203.0.113.5", "203.0.113.7"]
        )
        .is_some());
        // an address both clients learned: in both their peer sets, a new kind
        assert_eq!(
            step(&mut m, "default/c2", "x.cdn.example", &["203.0.113.6"]),
            None
        );
        // forgetting one of several members: the class stays
        assert!(step(&mut m, "default/c1", "api.example.com", &["203.0.113.7"]).is_some());
    }

    #[test]
    fn a_class_that_loses_its_last_member_asks_for_a_recount() {
        let mut m = parse_case(FQDN_CASE)
            .expect("case")
            .compile(None, None)
            .expect("compile");
        step(&mut m, "default/c2", "api.example.com", &["203.0.113.5"]);
        assert_eq!(step(&mut m, "default/c2", "api.example.com", &[]), None);
    }

    #[test]
    fn classes_moved_step_by_step_stay_those_a_recount_gives() {
        let mut m = parse_case(FQDN_CASE)
            .expect("case")
            .compile(None, None)
            .expect("compile");
        let mut classes = PeerClasses::compute(&m, &eps(&m), &BTreeMap::new());
        let (mut stepped, mut recounted) = (0, 0);
        for i in 0..200u32 {
            let client = ["default/c1", "default/c2"][(i % 2) as usize];
            let name = ["api.example.com", "a.cdn.example", "b.cdn.example"][(i % 3) as usize];
            // a rotating window of addresses, sometimes none
            let ips: Vec<std::net::IpAddr> = (0..(i % 4))
                .map(|k| {
                    format!("203.0.113.{}", (i * 7 + k) % 12 + 1)
                        .parse()
                        .expect("ip")
                })
                .collect();
            let change = m.set_fqdn_ips(client, name, ips);
            let fresh = PeerClasses::compute(&m, &eps(&m), classes.assignments());
            let before = classes.assignments().clone();
            match classes.learn_step(&m, &eps(&m), &change.added, &change.retired) {
                Some(changed) => {
                    assert_eq!(classes, fresh, "step {i}");
                    for (id, class) in &changed {
                        assert_eq!(fresh.assignments().get(id), class.as_ref(), "step {i}");
                        assert_ne!(before.get(id), class.as_ref(), "step {i}: not a change");
                    }
                    stepped += 1;
                }
                None => {
                    classes = fresh;
                    recounted += 1;
                }
            }
        }
        assert!(stepped >= 50, "{stepped} steps, {recounted} recounts");
        assert!(recounted > 0, "{stepped} steps, {recounted} recounts");
    }
}
