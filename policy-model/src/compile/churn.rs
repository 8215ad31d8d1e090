//! Cluster churn without a full compile: pods added, removed, relabelled or given other
//! IPs, ports or nodes, and namespaces relabelled.
//!
//! A pod's endpoint depends only on its own label set (which policies select it), its
//! name and container ports, and on peer sets whose bitsets follow identities as they come
//! and go (see `learn` for the same idea with DNS-learned IPs). So a change recompiles the
//! endpoints of the pods that changed, interns their new identities (evaluated against
//! the cached selectors), retires identities no pod holds any more, recomputes the owner
//! of every IP a changed pod had or has, and renumbers the rest (endpoint slots follow
//! cluster order, as in a compile). The result equals [`Model::compile`] of the new
//! cluster with the same policies and DNS observations.
//!
//! Not handled here, so the caller compiles in full: policy changes (the policy list is
//! fixed at compile), node changes (node identities, host policies), changes of the
//! cluster's own DNS observations (use `set_fqdn_ips`), and two pods with one name.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use super::{EndpointKey, EndpointPolicy, FqdnChange, IpOwner, Model};
use crate::cluster::{Cluster, ContainerPort};
use crate::identity::{IdentityKind, Idx};

/// Why a cluster change needs a full compile instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChurnUnsupported {
    #[error("the nodes changed (node identities and host policies are compiled in full)")]
    Nodes,
    #[error("two pods are named {0}")]
    DuplicatePod(String),
}

/// What one churn step changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChurnChange {
    /// Pods (`ns/pod`) added, removed and changed (labels, IPs, ports, node, or their
    /// namespace's labels).
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Identities that came into use (new to the cached selectors, numbered by the
    /// model's allocator: a caller with numbers of its own renumbers them).
    pub new_identities: Vec<Idx>,
    /// Identities no pod or IP holds any more, taken out of the cached selectors.
    pub retired: Vec<Idx>,
    /// Whether endpoint slots moved (a pod was added or removed before others).
    pub reordered: bool,
}

impl ChurnChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Model {
    /// Moves the model to the cluster `new` (same policies; DNS observations and nodes
    /// unchanged) without a full compile: only the pods that were added, removed or
    /// changed, and the pods of namespaces whose labels changed, are recompiled. The
    /// result equals `Model::compile(&new, policies, options)` (identities compared by
    /// labels). On [`ChurnUnsupported`] the model is left as it was, and the caller
    /// compiles in full.
    ///
    /// `new.dns` is ignored: the model keeps its DNS observations (the ones it was
    /// compiled with and the ones learned since through `set_fqdn_ips`).
    pub fn apply_cluster(&mut self, new: Cluster) -> Result<ChurnChange, ChurnUnsupported> {
        if new.nodes != self.cluster.nodes {
            return Err(ChurnUnsupported::Nodes);
        }
        let mut new = new;
        new.dns = std::mem::take(&mut self.cluster.dns);
        let result = self.check_pod_names(&new);
        if let Err(e) = result {
            self.cluster.dns = new.dns;
            return Err(e);
        }
        Ok(self.apply_pods(new))
    }

    /// Checks that pod names are unique in the old and the new cluster (a compile would
    /// keep only the last of two, which the incremental path does not reproduce).
    fn check_pod_names(&self, new: &Cluster) -> Result<(), ChurnUnsupported> {
        if self.pod_endpoint.len() != self.cluster.pods.len() {
            let mut seen = HashSet::new();
            for p in &self.cluster.pods {
                if !seen.insert(p.id()) {
                    return Err(ChurnUnsupported::DuplicatePod(p.id()));
                }
            }
        }
        let mut seen = HashSet::with_capacity(new.pods.len());
        for p in &new.pods {
            if !seen.insert((p.namespace.as_str(), p.name.as_str())) {
                return Err(ChurnUnsupported::DuplicatePod(p.id()));
            }
        }
        Ok(())
    }

    fn apply_pods(&mut self, new: Cluster) -> ChurnChange {
        let mut change = ChurnChange::default();
        let old = std::mem::replace(&mut self.cluster, new);
        let old_pods = old.pods.len();
        let old_ns = std::mem::take(&mut self.namespace_labels);
        self.namespace_labels = self
            .cluster
            .namespace_names()
            .into_iter()
            .map(|n| {
                let labels = self.cluster.namespace_labels(&n);
                (n, labels)
            })
            .collect();
        let relabelled_ns: HashSet<&String> = self
            .namespace_labels
            .iter()
            .filter(|(n, l)| old_ns.get(*n) != Some(*l))
            .map(|(n, _)| n)
            .collect();

        // old slot of each new pod, and which pods must be recompiled
        let mut old_slot: Vec<Option<usize>> = Vec::with_capacity(self.cluster.pods.len());
        let mut dirty: Vec<bool> = Vec::with_capacity(self.cluster.pods.len());
        let mut kept = vec![false; old.pods.len()];
        for p in &self.cluster.pods {
            let o = self.pod_endpoint.get(&p.id()).copied();
            if let Some(o) = o {
                kept[o] = true;
            }
            let changed = match o {
                None => true,
                Some(o) => old.pods[o] != *p || relabelled_ns.contains(&p.namespace),
            };
            old_slot.push(o);
            dirty.push(changed);
        }
        let reordered = old_slot.iter().enumerate().any(|(j, o)| *o != Some(j))
            || old.pods.len() != self.cluster.pods.len();
        change.reordered = reordered;

        // IPs whose owner may change: those of removed and changed pods, before and after
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        let mut released: BTreeSet<Idx> = BTreeSet::new();
        for (o, p) in old.pods.iter().enumerate() {
            if !kept[o] {
                touched.extend(p.all_ips());
                released.insert(self.pod_identity[o]);
                change.removed.push(p.id());
            }
        }
        // identities of the new pods
        let mut pod_identity = Vec::with_capacity(self.cluster.pods.len());
        for j in 0..self.cluster.pods.len() {
            let ident = match old_slot[j] {
                Some(o) if !dirty[j] => self.pod_identity[o],
                o => {
                    if let Some(o) = o {
                        touched.extend(old.pods[o].all_ips());
                        released.insert(self.pod_identity[o]);
                        change.changed.push(self.cluster.pods[j].id());
                    } else {
                        change.added.push(self.cluster.pods[j].id());
                    }
                    touched.extend(self.cluster.pods[j].all_ips());
                    let (i, created) = self
                        .identities
                        .intern(self.pod_label_set(j), IdentityKind::Pod);
                    if created {
                        self.selectors.add_identity(&self.identities, i);
                        change.new_identities.push(i);
                    }
                    released.insert(i); // its named ports are recomputed below
                    i
                }
            };
            pod_identity.push(ident);
        }
        self.pod_identity = pod_identity;
        self.pods_by_identity.clear();
        for (pod, &i) in self.pod_identity.iter().enumerate() {
            self.pods_by_identity.entry(i).or_default().insert(pod);
        }
        // Identities no pod holds leave the selectors, as a compile would not know them;
        // the others get the named ports of their pods.
        for &i in &released {
            match self.pods_by_identity.get(&i) {
                None => {
                    self.identities.list[i as usize].named_ports.clear();
                    if self.identities.is_live(i) {
                        self.selectors.remove_identity(&self.identities, i);
                        self.identities.retire(i);
                        change.retired.push(i);
                    }
                }
                Some(pods) => {
                    let ports: BTreeSet<ContainerPort> = pods
                        .iter()
                        .flat_map(|&p| &self.cluster.pods[p].ports)
                        .filter(|c| c.name.is_some())
                        .cloned()
                        .collect();
                    self.identities.list[i as usize].named_ports = ports.into_iter().collect();
                }
            }
        }

        let fqdn = self.reown_ips(&touched, reordered);
        change.new_identities.extend(fqdn.added);
        change.retired.extend(fqdn.retired);

        // endpoints: pods in cluster order, then nodes
        let mut old_eps: Vec<Option<EndpointPolicy>> = std::mem::take(&mut self.endpoints)
            .into_iter()
            .map(Some)
            .collect();
        let mut endpoints = Vec::with_capacity(self.cluster.pods.len() + self.cluster.nodes.len());
        let mut recompiled = Vec::new();
        for j in 0..self.cluster.pods.len() {
            let reuse = match old_slot[j] {
                Some(o) if !dirty[j] => old_eps[o].take(),
                _ => None,
            };
            let ep = match reuse {
                Some(mut ep) => {
                    ep.key = EndpointKey::Pod(j);
                    ep
                }
                None => {
                    let ident = self.pod_identity[j];
                    let selecting: Vec<u32> = self
                        .subjects
                        .iter()
                        .enumerate()
                        .filter_map(|(pi, s)| {
                            s.filter(|s| self.selectors.members(*s).contains(ident))
                                .map(|_| pi as u32)
                        })
                        .collect();
                    recompiled.push(j);
                    self.compile_endpoint(EndpointKey::Pod(j), ident, &selecting)
                }
            };
            endpoints.push(ep);
        }
        for ep in old_eps.drain(old_pods..).flatten() {
            endpoints.push(ep);
        }
        // endpoints of changed pods, by their old slot, to unindex their peer sets
        let stale: Vec<(usize, EndpointPolicy)> = old_eps
            .into_iter()
            .enumerate()
            .filter_map(|(o, ep)| ep.map(|ep| (o, ep)))
            .collect();
        self.endpoints = endpoints;

        if reordered {
            for (o, p) in old.pods.iter().enumerate() {
                if !kept[o] {
                    self.pod_endpoint.remove(&p.id());
                }
            }
            for (j, p) in self.cluster.pods.iter().enumerate() {
                match self.pod_endpoint.get_mut(&p.id()) {
                    Some(slot) => *slot = j,
                    None => {
                        self.pod_endpoint.insert(p.id(), j);
                    }
                }
            }
            let pods = self.cluster.pods.len();
            for (n, node) in self.cluster.nodes.iter().enumerate() {
                self.node_endpoint.insert(node.name.clone(), pods + n);
            }
            self.peer_set_users.clear();
            for slot in 0..self.endpoints.len() {
                for e in self.endpoints[slot].dirs.iter().flat_map(|d| &d.entries) {
                    self.peer_set_users.entry(e.peers).or_default().insert(slot);
                }
            }
        } else {
            for (slot, old) in stale {
                let peers: Vec<_> = self.endpoints[slot]
                    .dirs
                    .iter()
                    .flat_map(|d| &d.entries)
                    .map(|e| e.peers)
                    .collect();
                for ps in peers {
                    self.peer_set_users.entry(ps).or_default().insert(slot);
                }
                self.unindex_peer_sets(slot, &old);
            }
        }
        change
    }

    /// Gives every IP in `touched` (every IP of the cluster too when `all`) the owner a
    /// compile gives it: the last pod holding it, else the first node, else the FQDN
    /// identity of what was learned for it (or nothing: its prefix or world).
    fn reown_ips(&mut self, touched: &BTreeSet<IpAddr>, all: bool) -> FqdnChange {
        let mut last: HashMap<IpAddr, usize> = HashMap::new();
        for (j, p) in self.cluster.pods.iter().enumerate() {
            for ip in p.all_ips() {
                if all || touched.contains(&ip) {
                    last.insert(ip, j);
                }
            }
        }
        let mut change = FqdnChange::default();
        let mut released = Vec::new();
        let mut learned = Vec::new();
        let targets: Vec<IpAddr> = if all {
            let mut ips: BTreeSet<IpAddr> = touched.clone();
            ips.extend(last.keys().copied());
            ips.into_iter().collect()
        } else {
            touched.iter().copied().collect()
        };
        for ip in targets {
            let owner = match last.get(&ip) {
                Some(&j) => Some(IpOwner::Pod(j)),
                None => self
                    .cluster
                    .nodes
                    .iter()
                    .position(|n| n.ip == ip)
                    .map(IpOwner::Node),
            };
            let before = self.exact.get(&ip).copied();
            match owner {
                Some(o) => {
                    if let Some(IpOwner::World(i)) = before {
                        // a learned IP now a cluster IP: its FQDN identity is let go
                        if self.learned.release(i) {
                            released.push(i);
                        }
                    }
                    self.exact.insert(ip, o);
                }
                None => {
                    if matches!(before, Some(IpOwner::Pod(_) | IpOwner::Node(_))) {
                        self.exact.remove(&ip);
                        learned.push(ip);
                    }
                }
            }
        }
        for ip in learned {
            if let Some(old) = self.relabel_fqdn_ip(ip, &mut change) {
                released.push(old);
            }
        }
        released.sort_unstable();
        released.dedup();
        for i in released {
            if !self.learned.is_held(i) && self.identities.is_live(i) {
                self.selectors.remove_identity(&self.identities, i);
                self.identities.retire(i);
                change.retired.push(i);
            }
        }
        change
    }
}
