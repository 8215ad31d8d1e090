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
use std::sync::Arc;

use super::{EndpointKey, EndpointPolicy, FqdnChange, IpOwner, Model};
use crate::cluster::{Cluster, ContainerPort};
use crate::identity::{IdentityKind, Idx};
use crate::labels::well_known;

/// Why a cluster change needs a full compile instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChurnUnsupported {
    #[error("the nodes changed (node identities and host policies are compiled in full)")]
    Nodes,
    #[error("two pods are named {0}")]
    DuplicatePod(String),
    #[error("the service accounts changed (their labels are compiled in full)")]
    ServiceAccounts,
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
    ///
    /// Pods that did not change are compared, not copied: the cost is a pass over the
    /// pods plus the work for the ones that changed.
    pub fn apply_cluster(&mut self, new: &Cluster) -> Result<ChurnChange, ChurnUnsupported> {
        self.apply_shared_cluster(Arc::new(new.clone()))
    }

    /// [`Model::apply_cluster`] with a shared cluster, which the model keeps as it is.
    pub fn apply_shared_cluster(
        &mut self,
        new: Arc<Cluster>,
    ) -> Result<ChurnChange, ChurnUnsupported> {
        if new.nodes != self.cluster.nodes {
            return Err(ChurnUnsupported::Nodes);
        }
        if new.service_accounts != self.cluster.service_accounts {
            return Err(ChurnUnsupported::ServiceAccounts);
        }
        let old_slot = self.match_pods(&new)?;
        Ok(self.apply_pods(new, old_slot))
    }

    /// The slot each pod of `new` had (None: added). Pod names must be unique in the old
    /// and the new cluster (a compile would keep only the last of two, which the
    /// incremental path does not reproduce). A pod is looked for where the previous one's
    /// successor was before it is looked up by name, so unchanged order costs no lookup.
    fn match_pods(&self, new: &Cluster) -> Result<Vec<Option<usize>>, ChurnUnsupported> {
        let old = &self.cluster.pods;
        if self.pod_endpoint.len() != old.len() {
            let mut seen = HashSet::new();
            for p in old {
                if !seen.insert(p.id()) {
                    return Err(ChurnUnsupported::DuplicatePod(p.id()));
                }
            }
        }
        let mut old_slot = Vec::with_capacity(new.pods.len());
        let mut kept = vec![false; old.len()];
        // names of added pods (kept pods are unique as their old slots are)
        let mut added = HashSet::new();
        let mut guess = 0usize;
        for p in &new.pods {
            let o = match old.get(guess) {
                Some(q) if q.name == p.name && q.namespace == p.namespace => Some(guess),
                _ => self.pod_endpoint.get(&p.id()).copied(),
            };
            match o {
                Some(o) if kept[o] => return Err(ChurnUnsupported::DuplicatePod(p.id())),
                Some(o) => {
                    kept[o] = true;
                    guess = o + 1;
                }
                None => {
                    if !added.insert((p.namespace.as_str(), p.name.as_str())) {
                        return Err(ChurnUnsupported::DuplicatePod(p.id()));
                    }
                }
            }
            old_slot.push(o);
        }
        Ok(old_slot)
    }

    fn apply_pods(&mut self, new: Arc<Cluster>, old_slot: Vec<Option<usize>>) -> ChurnChange {
        let mut change = ChurnChange::default();
        let old_cluster = std::mem::replace(&mut self.cluster, Arc::clone(&new));
        let old_list = &old_cluster.pods;
        let old_pods = old_list.len();
        let namespaces_same = old_cluster.namespaces == new.namespaces;
        // Namespace labels: looked up once per namespace (declared ones first, the first
        // declaration winning as in `Cluster::namespace`), and only when they changed.
        // (with the same namespaces, only an added or changed pod can bring a namespace
        // without a declaration: looked up below)
        let relabelled_ns: HashSet<String> = if namespaces_same {
            HashSet::new()
        } else {
            let old_ns = std::mem::take(&mut self.namespace_labels);
            for n in &self.cluster.namespaces {
                if !self.namespace_labels.contains_key(&n.name) {
                    let mut labels = n.labels.clone();
                    labels.insert(well_known::NAMESPACE_NAME.to_string(), n.name.clone());
                    self.namespace_labels.insert(n.name.clone(), labels);
                }
            }
            for p in &new.pods {
                if !self.namespace_labels.contains_key(&p.namespace) {
                    let labels = self.cluster.namespace_labels(&p.namespace);
                    self.namespace_labels.insert(p.namespace.clone(), labels);
                }
            }
            self.namespace_labels
                .iter()
                .filter(|(n, l)| old_ns.get(*n) != Some(*l))
                .map(|(n, _)| n.clone())
                .collect()
        };

        // old slot of each new pod, and which pods must be recompiled; a pod is looked
        // for where the previous one's successor was before it is looked up by name
        // IPs whose owner may change: those of removed and changed pods, before and after
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        let mut released: BTreeSet<Idx> = BTreeSet::new();
        let mut dirty: Vec<bool> = Vec::with_capacity(new.pods.len());
        let mut kept = vec![false; old_pods];
        for (p, &o) in new.pods.iter().zip(&old_slot) {
            if let Some(o) = o {
                kept[o] = true;
            }
            let changed = match o {
                None => {
                    change.added.push(p.id());
                    true
                }
                Some(o) if old_list[o] != *p || relabelled_ns.contains(&p.namespace) => {
                    touched.extend(old_list[o].all_ips());
                    released.insert(self.pod_identity[o]);
                    change.changed.push(p.id());
                    true
                }
                Some(_) => false,
            };
            if changed && !self.namespace_labels.contains_key(&p.namespace) {
                let labels = self.cluster.namespace_labels(&p.namespace);
                self.namespace_labels.insert(p.namespace.clone(), labels);
            }
            dirty.push(changed);
        }
        let reordered =
            old_slot.iter().enumerate().any(|(j, o)| *o != Some(j)) || old_pods != new.pods.len();
        change.reordered = reordered;
        // Pods kept in the same relative order (additions and removals only): slots are
        // renumbered; otherwise which of two pods with one IP comes last may have changed,
        // and every IP's owner is looked at again.
        let mut new_slot: Vec<Option<usize>> = vec![None; old_pods];
        let mut monotonic = true;
        let mut last_kept = None;
        for (j, o) in old_slot.iter().enumerate() {
            if let Some(o) = *o {
                new_slot[o] = Some(j);
                monotonic &= last_kept.is_none_or(|l| l < o);
                last_kept = Some(o);
            }
        }

        for (o, p) in old_list.iter().enumerate() {
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
                _ => {
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
        let old_identity = std::mem::replace(&mut self.pod_identity, pod_identity);
        if reordered {
            self.pods_by_identity.clear();
            for (pod, &i) in self.pod_identity.iter().enumerate() {
                self.pods_by_identity.entry(i).or_default().insert(pod);
            }
        } else {
            for j in (0..self.pod_identity.len()).filter(|&j| dirty[j]) {
                if let Some(pods) = self.pods_by_identity.get_mut(&old_identity[j]) {
                    pods.remove(&j);
                    if pods.is_empty() {
                        self.pods_by_identity.remove(&old_identity[j]);
                    }
                }
                let i = self.pod_identity[j];
                self.pods_by_identity.entry(i).or_default().insert(j);
            }
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

        if reordered && monotonic {
            for (_, owner) in self.exact.iter_mut() {
                if let IpOwner::Pod(o) = owner {
                    if let Some(Some(j)) = new_slot.get(*o) {
                        *o = *j;
                    }
                }
            }
        }
        let fqdn = self.reown_ips(&touched, reordered && !monotonic);
        change.new_identities.extend(fqdn.added);
        change.retired.extend(fqdn.retired);

        // endpoints: pods in cluster order, then nodes; an unchanged pod keeps its
        // endpoint (shared), the others in scope are compiled
        let mut old_eps: Vec<Option<Option<Arc<EndpointPolicy>>>> =
            std::mem::take(&mut self.endpoints)
                .into_iter()
                .map(Some)
                .collect();
        let mut endpoints = Vec::with_capacity(self.cluster.pods.len() + self.cluster.nodes.len());
        let cluster = Arc::clone(&self.cluster);
        for (j, pod) in cluster.pods.iter().enumerate() {
            let reuse = match old_slot[j] {
                Some(o) if !dirty[j] => old_eps[o].take(),
                _ => None,
            };
            let ep = match reuse {
                Some(Some(mut ep)) => {
                    if ep.key != EndpointKey::Pod(j) {
                        Arc::make_mut(&mut ep).key = EndpointKey::Pod(j);
                    }
                    Some(ep)
                }
                Some(None) => None,
                None if self.scope.covers_pod(pod) => {
                    let ident = self.pod_identity[j];
                    let selecting = self.policies_selecting(ident);
                    Some(Arc::new(self.compile_endpoint(
                        EndpointKey::Pod(j),
                        ident,
                        &selecting,
                    )))
                }
                None => None,
            };
            endpoints.push(ep);
        }
        for ep in old_eps.drain(old_pods..).flatten() {
            endpoints.push(ep);
        }
        // endpoints of changed pods, by their old slot, to unindex their peer sets
        let stale: Vec<(usize, Arc<EndpointPolicy>)> = old_eps
            .into_iter()
            .enumerate()
            .filter_map(|(o, ep)| ep.flatten().map(|ep| (o, ep)))
            .collect();
        self.endpoints = endpoints;

        let new_pods = self.cluster.pods.len();
        let moved = |s: usize| {
            if s < old_pods {
                new_slot[s]
            } else {
                Some(s - old_pods + new_pods)
            }
        };
        if reordered {
            for id in &change.removed {
                self.pod_endpoint.remove(id);
            }
            for slot in self.pod_endpoint.values_mut() {
                if let Some(j) = moved(*slot) {
                    *slot = j;
                }
            }
            for j in (0..new_pods).filter(|&j| old_slot[j].is_none()) {
                self.pod_endpoint.insert(self.cluster.pods[j].id(), j);
            }
            for slot in self.node_endpoint.values_mut() {
                *slot = *slot - old_pods + new_pods;
            }
            for users in self.peer_set_users.values_mut() {
                *users = users.iter().filter_map(|&s| moved(s)).collect();
            }
        }
        // the peer sets of recompiled endpoints, in their new slots
        let index = |m: &mut Model, slot: usize| {
            let peers: Vec<_> = m.endpoints[slot]
                .iter()
                .flat_map(|ep| ep.dirs.iter())
                .flat_map(|d| &d.entries)
                .map(|e| e.peers)
                .collect();
            for ps in peers {
                m.peer_set_users.entry(ps).or_default().insert(slot);
            }
        };
        // (added and changed pods: compiled if in scope, none otherwise)
        for j in (0..new_pods).filter(|&j| dirty[j]) {
            index(self, j);
        }
        for (o, old_ep) in stale {
            if let Some(j) = moved(o) {
                self.unindex_peer_sets(j, &old_ep);
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
