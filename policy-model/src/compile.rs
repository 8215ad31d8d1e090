//! The compiler: cluster state + policies -> identities, an ipcache, and per endpoint and
//! direction a flat list of entries `(peer identities, protocol, ports) -> action`, with
//! interned L7 rule sets. This is what the datapath and the proxies consume.
//!
//! Entries refer to peer sets (unions of selectors) whose selected identities are cached
//! as bitsets, so a pod label change costs one selector pass over a new identity plus the
//! recompilation of that pod, not a full compile. Cluster churn (pods added, removed or
//! changed, namespaces relabelled) goes the same way (`Model::apply_cluster`, in `churn`),
//! and so do IPs learned from DNS (`learn`) and policy changes that keep the policies'
//! prefixes and FQDN patterns (`Model::apply_policies`, in `policies`).
//!
//! A model compiled for one node ([`Scope::Node`]) keeps identities, selectors and the
//! ipcache for the whole cluster but compiles entries and L7/DNS rule sets only for that
//! node's endpoints (`scope`). The big parts of a model are shared (`Arc`) between a model
//! and its copy, so the copy an update works on costs what the update changes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::cluster::{Cluster, ContainerPort, DnsObservation};
use crate::fqdn::{FqdnPatterns, NamePattern};
use crate::identity::{fqdn_key, Identities, IdentityKind, Idx, PeerSetId, SelectorCache};
use crate::l7::L7Set;
use crate::labels::{Label, LabelSet, Source};
use crate::policy::{Action, Calico, Direction, Policy, Port, Protocol, Rule, Subject, Tier};
use crate::selector::{Op, Selector};

mod churn;
mod learn;
mod policies;
mod scope;
mod tiers;
pub use churn::{ChurnChange, ChurnUnsupported};
pub use learn::FqdnChange;
use learn::Learned;
pub use policies::{PolicyChange, PolicyUnsupported};
pub use scope::{L7Sets, Scope};
pub use tiers::{CalicoTier, TierEnd};

/// Choices where implementations differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Whether CIDR selectors (ipBlock, toCIDR, ANP networks) also match pod and node IPs.
    /// Kubernetes' conformance tests expect it; Cilium by default does not.
    pub cidr_matches_cluster: bool,
}

/// An endpoint whose traffic policy applies to: a pod, or a node (host policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointKey {
    Pod(usize),
    Node(usize),
}

/// The ports an entry covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Inclusive range; `0..=65535` is every port.
    Range(u16, u16),
    /// A named port of the destination, resolved per peer identity at lookup (egress).
    Named(String),
}

/// Where an entry came from: policy, rule and `toPorts` group indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub policy: u32,
    pub rule: u32,
    pub port_rule: Option<u32>,
}

/// Index of an interned L7 rule set.
pub type L7Id = u32;

/// One policy entry of an endpoint in one direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub peers: PeerSetId,
    /// None: every protocol (an L3-only rule), ICMP included.
    pub protocol: Option<Protocol>,
    pub port: PortMatch,
    pub action: Action,
    pub tier: Tier,
    /// Order of evaluation: (priority for the admin and baseline tiers, or the index of
    /// the Calico tier; policy order; rule index).
    pub rank: (i64, u32, u32),
    pub l7: Option<L7Id>,
    pub origin: Origin,
}

impl Entry {
    /// Whether the entry covers every port of every protocol (an L3 rule).
    pub fn is_l3(&self) -> bool {
        self.protocol.is_none()
    }
}

/// An endpoint's policy in one direction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirPolicy {
    /// Admin-tier entries by rank, then namespace-tier entries, then baseline by rank.
    pub entries: Vec<Entry>,
    /// Namespace-tier policies (by index) that put the endpoint in default deny.
    pub default_deny: Vec<u32>,
    /// Every policy that selects the endpoint and has something to say in this direction.
    pub selected_by: Vec<u32>,
    /// The Calico tiers that select the endpoint in this direction, in evaluation order.
    /// When there are any, the namespace tier decides inside the `default` tier and its
    /// default deny is that tier's end; `default_deny` then lists the policies of every
    /// tier here that ends in `Deny`.
    pub tiers: Vec<TierEnd>,
}

#[derive(Clone, Debug)]
pub struct EndpointPolicy {
    pub key: EndpointKey,
    /// `ns/pod` or `node:NAME`.
    pub name: String,
    pub identity: Idx,
    pub dirs: [DirPolicy; 2],
}

/// What an IP belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpOwner {
    Pod(usize),
    Node(usize),
    /// Outside the cluster, with the identity of its longest policy prefix (or world), or
    /// of its FQDN labels.
    World(Idx),
}

/// Errors of incremental updates.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("no pod {0} in the cluster")]
    NoSuchPod(String),
    #[error("no endpoint {0:?} in the cluster")]
    NoSuchEndpoint(EndpointKey),
    #[error("the ingress policy of {0} names peers this model has not interned")]
    Unresolved(String),
}

/// The compiled state of a cluster and its policies.
#[derive(Clone, Debug)]
pub struct Model {
    pub options: CompileOptions,
    /// The endpoints compiled (every one, or one node's).
    scope: Scope,
    /// The cluster as the source gave it (shared with the caller; its `dns` is what the
    /// model started from: [`Model::dns`] is what it holds now).
    pub cluster: Arc<Cluster>,
    pub policies: Vec<Arc<Policy>>,
    pub identities: Identities,
    pub selectors: SelectorCache,
    /// L7 rule sets by [`L7Id`]: numbered for every `toPorts` entry with rules, built
    /// for those an endpoint in scope uses.
    pub l7: L7Sets,
    /// Per endpoint slot (pods in cluster order, then nodes): its policy when in scope.
    endpoints: Vec<Option<Arc<EndpointPolicy>>>,
    /// The DNS observations the model is built from, until the build takes them into
    /// `learned` (empty afterwards: [`Model::dns`] reads them from there).
    dns: Vec<DnsObservation>,
    /// Calico's tiers in evaluation order (the `default` tier always among them).
    pub calico_tiers: Vec<CalicoTier>,
    /// Index of the `default` tier in `calico_tiers`.
    pub default_tier: u32,
    pod_endpoint: HashMap<String, usize>,
    node_endpoint: HashMap<String, usize>,
    /// Order of each policy inside its tier (ties of priority broken by kind and name).
    pub(crate) policy_order: Vec<u32>,
    /// Subject (a union of selectors) of each pod-subject policy.
    subjects: Vec<Option<PeerSetId>>,
    /// Labels of the listed service accounts by (namespace, name).
    service_account_labels: HashMap<(String, String), BTreeMap<String, String>>,
    /// Peer set per (policy, rule), except rules naming FQDNs (built per endpoint).
    rule_peers: Vec<Vec<Option<PeerSetId>>>,
    l7_of: HashMap<(u32, u32, u32), L7Id>,
    /// Policy prefixes with the label source they are selected by (`cidr` or `network`).
    prefixes: Vec<(IpNet, Source)>,
    /// Shared by a model and its copies: only a full compile changes it.
    fqdn_patterns: Arc<FqdnPatterns>,
    pod_identity: Vec<Idx>,
    pods_by_identity: HashMap<Idx, BTreeSet<usize>>,
    /// Per node: identity as seen from itself (host) and from other nodes (remote-node).
    node_identity: Vec<[Idx; 2]>,
    /// Persistent (`imbl`): learned addresses add to it at every learning step.
    exact: imbl::HashMap<IpAddr, IpOwner>,
    /// Labels of each namespace (implicit name included).
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// (prefix, identity), longest prefix first.
    prefix_identity: Vec<(IpNet, Idx)>,
    world: Idx,
    /// The DNS observations by (client, name), indexed for incremental learning.
    learned: Learned,
    /// Peer set -> slots of the endpoints with an entry using it.
    peer_set_users: HashMap<PeerSetId, BTreeSet<usize>>,
    /// How many selectors the cache held after the last full compile.
    selectors_compiled: usize,
}

fn reserved_label(name: &str) -> Label {
    Label::new(Source::Reserved, name, "")
}

impl Model {
    /// Compiles everything, for every endpoint of the cluster.
    pub fn compile(cluster: &Cluster, policies: Vec<Policy>, options: CompileOptions) -> Model {
        Model::compile_scoped(cluster, policies, options, Scope::Cluster)
    }

    /// Compiles the endpoints in `scope` (identities and ipcache for the whole cluster).
    pub fn compile_scoped(
        cluster: &Cluster,
        policies: Vec<Policy>,
        options: CompileOptions,
        scope: Scope,
    ) -> Model {
        Model::build(
            Arc::new(cluster.clone()),
            cluster.dns.clone(),
            policies.into_iter().map(Arc::new).collect(),
            options,
            scope,
        )
    }

    /// Compiles a shared cluster with the DNS observations `dns` (in place of
    /// `cluster.dns`) and shared policies: nothing the caller holds is copied.
    pub fn build(
        cluster: Arc<Cluster>,
        dns: Vec<DnsObservation>,
        policies: Vec<Arc<Policy>>,
        options: CompileOptions,
        scope: Scope,
    ) -> Model {
        let mut m = Model {
            options,
            scope,
            cluster,
            policies,
            identities: Identities::new(),
            selectors: SelectorCache::default(),
            l7: L7Sets::default(),
            endpoints: Vec::new(),
            dns,
            calico_tiers: Vec::new(),
            default_tier: 0,
            pod_endpoint: HashMap::new(),
            node_endpoint: HashMap::new(),
            policy_order: Vec::new(),
            subjects: Vec::new(),
            service_account_labels: HashMap::new(),
            rule_peers: Vec::new(),
            l7_of: HashMap::new(),
            prefixes: Vec::new(),
            fqdn_patterns: Arc::default(),
            pod_identity: Vec::new(),
            pods_by_identity: HashMap::new(),
            node_identity: Vec::new(),
            exact: imbl::HashMap::new(),
            namespace_labels: HashMap::new(),
            prefix_identity: Vec::new(),
            world: 0,
            learned: Learned::default(),
            peer_set_users: HashMap::new(),
            selectors_compiled: 0,
        };
        m.order_policies();
        m.collect_prefixes_and_patterns();
        m.allocate_identities();
        m.intern_rules();
        m.compile_endpoints();
        m.selectors_compiled = m.selectors.selector_count();
        m.selectors.shrink();
        m
    }

    fn order_policies(&mut self) {
        self.calico_tiers = tiers::tier_table(&self.policies);
        self.default_tier = self
            .calico_tiers
            .iter()
            .position(|t| t.name == crate::api::calico::DEFAULT_TIER)
            .unwrap_or(0) as u32;
        self.policy_order = tiers::policy_order(&self.policies, &self.calico_tiers);
    }

    /// The index of a Calico tier by name.
    fn tier_index(&self, name: &str) -> u32 {
        self.calico_tiers
            .iter()
            .position(|t| t.name == name)
            .unwrap_or(self.default_tier as usize) as u32
    }

    fn collect_prefixes_and_patterns(&mut self) {
        let (prefixes, patterns) = policies::prefixes_and_patterns(&self.policies);
        self.prefixes = prefixes;
        self.fqdn_patterns = Arc::new(FqdnPatterns::new(
            patterns
                .into_iter()
                .filter_map(|p| NamePattern::pattern(&p).ok().map(|np| (p, np)))
                .collect(),
        ));
    }

    /// The prefix labels of IPs. For cluster IPs (`cluster`), `cidr` prefixes count only
    /// when CIDR rules match cluster IPs; `network` prefixes always do.
    fn prefix_labels(&self, ips: impl Iterator<Item = IpAddr>, cluster: bool) -> Vec<Label> {
        let ips: Vec<IpAddr> = ips.collect();
        self.prefixes
            .iter()
            .filter(|(_, src)| {
                !cluster || self.options.cidr_matches_cluster || *src != Source::Cidr
            })
            .filter(|(p, _)| ips.iter().any(|ip| p.contains(ip)))
            .map(|(p, src)| Label::new(src.clone(), p.to_string(), ""))
            .collect()
    }

    fn pod_label_set(&self, pod: usize) -> LabelSet {
        let p = &self.cluster.pods[pod];
        let base = match self.namespace_labels.get(&p.namespace) {
            Some(ns) => Cluster::pod_labels_in(
                p,
                ns,
                self.service_account_labels
                    .get(&(p.namespace.clone(), p.service_account().to_string())),
            ),
            None => self.cluster.pod_labels(p),
        };
        if self.prefixes.is_empty() {
            return base;
        }
        let mut labels: Vec<Label> = base.iter().cloned().collect();
        labels.extend(self.prefix_labels(p.all_ips(), true));
        LabelSet::new(labels)
    }

    fn node_label_set(&self, node: usize, as_host: bool) -> LabelSet {
        let n = &self.cluster.nodes[node];
        let mut labels = vec![
            reserved_label(if as_host { "host" } else { "remote-node" }),
            reserved_label(crate::api::common::NODE_MARKER),
        ];
        labels.extend(
            n.labels
                .iter()
                .map(|(k, v)| Label::new(crate::api::common::node_source(), k, v)),
        );
        labels.extend(self.prefix_labels(std::iter::once(n.ip), true));
        LabelSet::new(labels)
    }

    fn allocate_identities(&mut self) {
        self.service_account_labels = self
            .cluster
            .service_accounts
            .iter()
            .rev()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s.labels.clone()))
            .collect();
        self.namespace_labels = self
            .cluster
            .namespace_names()
            .into_iter()
            .map(|n| {
                let labels = self.cluster.namespace_labels(&n);
                (n, labels)
            })
            .collect();
        for name in [
            "host",
            "world",
            "remote-node",
            "health",
            "init",
            "unmanaged",
            "kube-apiserver",
            "ingress",
        ] {
            let kind = match name {
                "host" => IdentityKind::Host,
                "remote-node" => IdentityKind::RemoteNode,
                _ => IdentityKind::World,
            };
            let mut labels = vec![reserved_label(name)];
            if matches!(kind, IdentityKind::Host | IdentityKind::RemoteNode) {
                labels.push(reserved_label(crate::api::common::NODE_MARKER));
            }
            let (i, _) = self.identities.intern(LabelSet::new(labels), kind);
            if name == "world" {
                self.world = i;
            }
        }
        for pod in 0..self.cluster.pods.len() {
            let labels = self.pod_label_set(pod);
            let (i, _) = self.identities.intern(labels, IdentityKind::Pod);
            self.pod_identity.push(i);
            self.pods_by_identity.entry(i).or_default().insert(pod);
            for ip in self.cluster.pods[pod].all_ips() {
                self.exact.insert(ip, IpOwner::Pod(pod));
            }
        }
        self.refresh_named_ports();
        for node in 0..self.cluster.nodes.len() {
            let (h, _) = self
                .identities
                .intern(self.node_label_set(node, true), IdentityKind::Host);
            let (r, _) = self
                .identities
                .intern(self.node_label_set(node, false), IdentityKind::RemoteNode);
            self.node_identity.push([h, r]);
            self.exact
                .entry(self.cluster.nodes[node].ip)
                .or_insert(IpOwner::Node(node));
        }
        // Each policy prefix is an ipcache prefix whose identity carries the labels of
        // every policy prefix containing it.
        let mut prefixes: Vec<IpNet> = self.prefixes.iter().map(|(p, _)| *p).collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.prefix_len()));
        prefixes.dedup();
        for p in prefixes {
            let mut labels = vec![reserved_label("world")];
            labels.extend(
                self.prefixes
                    .iter()
                    .filter(|(q, _)| q.contains(&p))
                    .map(|(q, src)| Label::new(src.clone(), q.to_string(), "")),
            );
            let (i, _) = self
                .identities
                .intern(LabelSet::new(labels), IdentityKind::Cidr);
            self.prefix_identity.push((p, i));
        }
        // IPs learned from DNS answers carry the labels of the toFQDNs patterns that match
        // the name, scoped to the endpoint that asked (see `learn`).
        let dns = std::mem::take(&mut self.dns);
        let mut ips = BTreeSet::new();
        for obs in &dns {
            ips.extend(self.learned.add(&self.fqdn_patterns, obs));
        }
        for ip in ips {
            self.relabel_fqdn_ip(ip, &mut FqdnChange::default());
        }
    }

    fn refresh_named_ports(&mut self) {
        let mut by_identity: HashMap<Idx, BTreeSet<ContainerPort>> = HashMap::new();
        for (pod, &i) in self.pod_identity.iter().enumerate() {
            by_identity.entry(i).or_default().extend(
                self.cluster.pods[pod]
                    .ports
                    .iter()
                    .filter(|p| p.name.is_some())
                    .cloned(),
            );
        }
        for id in &mut self.identities.list {
            id.named_ports.clear();
        }
        for (i, ports) in by_identity {
            self.identities.list[i as usize].named_ports = ports.into_iter().collect();
        }
    }

    fn intern_rules(&mut self) {
        for pi in 0..self.policies.len() {
            let p = Arc::clone(&self.policies[pi]);
            let (subject, peers) = self.intern_policy(&p);
            self.subjects.push(subject);
            self.rule_peers.push(peers);
            self.number_l7(pi as u32, &p, |_, _| None);
        }
    }

    /// The subject (pod-subject policies) and per-rule peer sets of a policy, interned
    /// (rules naming FQDNs get theirs per endpoint).
    fn intern_policy(&mut self, p: &Policy) -> (Option<PeerSetId>, Vec<Option<PeerSetId>>) {
        let subject = match &p.subject {
            Subject::Pods(sel) => Some(
                self.selectors
                    .peer_set(&self.identities, std::slice::from_ref(sel)),
            ),
            Subject::AnyPods(sels) => Some(self.selectors.peer_set(&self.identities, sels)),
            Subject::Nodes(_) => None,
        };
        let peers = p
            .rules
            .iter()
            .map(|r| {
                r.peers.fqdns.is_empty().then(|| {
                    self.selectors
                        .peer_set(&self.identities, &r.peers.selectors)
                })
            })
            .collect();
        (subject, peers)
    }

    /// Numbers and builds the L7 rule sets of policy `pi`, taking the set of a
    /// (rule, port rule) from `reuse` where it has one (a policy kept across a change).
    fn number_l7(&mut self, pi: u32, p: &Policy, reuse: impl Fn(u32, u32) -> Option<Arc<L7Set>>) {
        for (ri, r) in p.rules.iter().enumerate() {
            for (gi, g) in r.ports.iter().enumerate() {
                let set = match reuse(ri as u32, gi as u32) {
                    Some(set) => set,
                    None => Arc::new(match (&g.l7, &g.tls) {
                        (l7, Some(tls)) => L7Set::with_tls(l7.clone(), tls.clone(), &g.path),
                        (Some(l7), None) => L7Set::new(l7.clone(), format!("{}.rules", g.path)),
                        (None, None) => continue,
                    }),
                };
                let id = self.l7.push(set);
                self.l7_of.insert((pi, ri as u32, gi as u32), id);
            }
        }
    }

    fn compile_endpoints(&mut self) {
        // identity -> pod-subject policies selecting it (identities of pods in scope)
        let mut by_identity: HashMap<Idx, Vec<u32>> = HashMap::new();
        let cluster = self.cluster.clone();
        let in_scope: BTreeSet<Idx> = (0..cluster.pods.len())
            .filter(|&p| self.scope.covers_pod(&cluster.pods[p]))
            .map(|p| self.pod_identity[p])
            .collect();
        for (pi, s) in self.subjects.iter().enumerate() {
            if let Some(s) = s {
                for i in self.selectors.peer_set_members(*s).iter() {
                    if in_scope.contains(&i) {
                        by_identity.entry(i).or_default().push(pi as u32);
                    }
                }
            }
        }
        self.endpoints = Vec::with_capacity(cluster.pods.len() + cluster.nodes.len());
        for (pod, p) in cluster.pods.iter().enumerate() {
            self.pod_endpoint.insert(p.id(), self.endpoints.len());
            if !self.scope.covers_pod(p) {
                self.endpoints.push(None);
                continue;
            }
            let ident = self.pod_identity[pod];
            let selecting = by_identity.get(&ident).cloned().unwrap_or_default();
            let ep = self.compile_endpoint(EndpointKey::Pod(pod), ident, &selecting);
            self.index_peer_sets(self.endpoints.len(), &ep);
            self.endpoints.push(Some(Arc::new(ep)));
        }
        for (node, n) in cluster.nodes.iter().enumerate() {
            self.node_endpoint
                .insert(n.name.clone(), self.endpoints.len());
            let ep = self
                .scope
                .covers_node(&n.name)
                .then(|| self.compile_node_endpoint(node));
            if let Some(ep) = &ep {
                self.index_peer_sets(self.endpoints.len(), ep);
            }
            self.endpoints.push(ep.map(Arc::new));
        }
    }

    /// The policy of a node's host endpoint (node-subject policies).
    fn compile_node_endpoint(&mut self, node: usize) -> EndpointPolicy {
        let selecting = self.node_selecting(node);
        self.compile_endpoint(
            EndpointKey::Node(node),
            self.node_identity[node][0],
            &selecting,
        )
    }

    /// The node-subject policies that select a node.
    fn node_selecting(&self, node: usize) -> Vec<u32> {
        let labels = self.node_label_set(node, true);
        self.policies
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(&p.subject, Subject::Nodes(s) if s.matches(&labels)))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// The ingress policy of an endpoint: the compiled one when the model's scope covers
    /// it, else built now for one decision (see [`Scope`]). Ingress rules name no FQDNs,
    /// so every peer set they need is interned; should one not be, the error says so and
    /// the caller denies.
    pub fn ingress_policy(&self, key: EndpointKey) -> Result<Cow<'_, EndpointPolicy>, ModelError> {
        if let Some(ep) = self.endpoint(key) {
            return Ok(Cow::Borrowed(ep));
        }
        let (identity, selecting) = match key {
            EndpointKey::Pod(p) if p < self.cluster.pods.len() => {
                let i = self.pod_identity[p];
                (i, self.policies_selecting(i))
            }
            EndpointKey::Node(n) if n < self.cluster.nodes.len() => {
                (self.node_identity[n][0], self.node_selecting(n))
            }
            _ => return Err(ModelError::NoSuchEndpoint(key)),
        };
        let name = self.endpoint_name(key);
        let (ep, complete) = self.build_endpoint(
            key,
            name.clone(),
            identity,
            &selecting,
            &HashMap::new(),
            &[Direction::Ingress],
        );
        if complete {
            Ok(Cow::Owned(ep))
        } else {
            Err(ModelError::Unresolved(name))
        }
    }

    /// Records which peer sets the entries of the endpoint in `slot` use.
    fn index_peer_sets(&mut self, slot: usize, ep: &EndpointPolicy) {
        for e in ep.dirs.iter().flat_map(|d| &d.entries) {
            self.peer_set_users.entry(e.peers).or_default().insert(slot);
        }
    }

    /// Forgets the peer sets of `old`, a former policy of the endpoint in `slot`, that
    /// its current policy (if any) does not use.
    fn unindex_peer_sets(&mut self, slot: usize, old: &EndpointPolicy) {
        let current: BTreeSet<PeerSetId> = self.endpoints[slot]
            .iter()
            .flat_map(|ep| ep.dirs.iter())
            .flat_map(|d| &d.entries)
            .map(|e| e.peers)
            .collect();
        for e in old.dirs.iter().flat_map(|d| &d.entries) {
            if !current.contains(&e.peers) {
                if let Some(users) = self.peer_set_users.get_mut(&e.peers) {
                    users.remove(&slot);
                }
            }
        }
    }

    /// The endpoints with an entry whose peers include one of `identities`.
    pub fn endpoints_selecting(&self, identities: &[Idx]) -> Vec<EndpointKey> {
        let mut slots: BTreeSet<usize> = BTreeSet::new();
        for &i in identities {
            for ps in self.selectors.peer_sets_with(&self.identities, i) {
                slots.extend(self.peer_set_users.get(&ps).into_iter().flatten());
            }
        }
        slots
            .into_iter()
            .filter_map(|s| self.endpoints[s].as_ref().map(|ep| ep.key))
            .collect()
    }

    pub(crate) fn endpoint_name(&self, key: EndpointKey) -> String {
        match key {
            EndpointKey::Pod(p) => self.cluster.pods[p].id(),
            EndpointKey::Node(n) => format!("node:{}", self.cluster.nodes[n].name),
        }
    }

    /// The pod-subject policies whose selector selects `ident` (the full compile builds
    /// this for every identity at once; incremental updates ask for one).
    pub(crate) fn policies_selecting(&self, ident: Idx) -> Vec<u32> {
        self.subjects
            .iter()
            .enumerate()
            .filter_map(|(pi, s)| {
                s.filter(|s| self.selectors.peer_set_contains(*s, ident))
                    .map(|_| pi as u32)
            })
            .collect()
    }

    fn compile_endpoint(
        &mut self,
        key: EndpointKey,
        identity: Idx,
        selecting: &[u32],
    ) -> EndpointPolicy {
        let name = self.endpoint_name(key);
        let fqdn = self.fqdn_peers(&name, identity, selecting);
        let (ep, complete) =
            self.build_endpoint(key, name, identity, selecting, &fqdn, &Direction::BOTH);
        // every rule's peers are interned or in `fqdn`
        debug_assert!(complete, "{}", ep.name);
        ep
    }

    /// Interns, for the endpoint `name`, the peer sets of the selecting policies' rules
    /// that name FQDNs (FQDN identities are scoped to the endpoint that asked).
    fn fqdn_peers(
        &mut self,
        name: &str,
        identity: Idx,
        selecting: &[u32],
    ) -> HashMap<(u32, u32), PeerSetId> {
        let mut out = HashMap::new();
        for &pi in selecting {
            let p = Arc::clone(&self.policies[pi as usize]);
            for (ri, r) in p.rules.iter().enumerate() {
                if self.rule_peers[pi as usize][ri].is_some() || !self.applies_to(r, identity) {
                    continue;
                }
                let mut sels = r.peers.selectors.clone();
                for f in &r.peers.fqdns {
                    sels.push(Selector::all().with(fqdn_key(f, name), Op::Exists));
                }
                let ps = self.selectors.peer_set(&self.identities, &sels);
                out.insert((pi, ri as u32), ps);
            }
        }
        out
    }

    /// Whether a rule applies to an endpoint of `identity` (its subject filter).
    fn applies_to(&self, r: &crate::policy::Rule, identity: Idx) -> bool {
        match &r.subject_filter {
            Some(filter) => {
                let own = &self.identities.get(identity).labels;
                filter.iter().any(|s| s.matches(own))
            }
            None => true,
        }
    }

    /// The policy of an endpoint in the directions `dirs` (the others left empty), from
    /// the policies `selecting` it, with the peer sets of its FQDN rules in `fqdn`.
    /// Also whether it is complete: false when a rule's peers are neither interned nor in
    /// `fqdn` (that rule left out).
    fn build_endpoint(
        &self,
        key: EndpointKey,
        name: String,
        identity: Idx,
        selecting: &[u32],
        fqdn: &HashMap<(u32, u32), PeerSetId>,
        dirs_wanted: &[Direction],
    ) -> (EndpointPolicy, bool) {
        let mut complete = true;
        let container_ports: Vec<ContainerPort> = match key {
            EndpointKey::Pod(p) => self.cluster.pods[p].ports.clone(),
            EndpointKey::Node(_) => Vec::new(),
        };
        let mut dirs = [DirPolicy::default(), DirPolicy::default()];
        // Calico tiers selecting the endpoint, per direction: tier index -> policies.
        let mut calico: [BTreeMap<u32, Vec<u32>>; 2] = [BTreeMap::new(), BTreeMap::new()];
        for &pi in selecting {
            let order = self.policy_order[pi as usize];
            let p = &self.policies[pi as usize];
            let tier = p.tier;
            let tier_index = match &p.calico {
                Some(Calico::Policy { tier, .. }) => Some(self.tier_index(tier)),
                _ => None,
            };
            let rank0 = tier_index.map_or(p.priority, i64::from);
            for &d in dirs_wanted {
                let has_rules = p.rules.iter().any(|r| r.direction == d);
                if p.default_deny[d.index()] && tier == Tier::Namespace {
                    dirs[d.index()].default_deny.push(pi);
                }
                if has_rules || p.default_deny[d.index()] {
                    dirs[d.index()].selected_by.push(pi);
                }
                if let (Some(t), true) = (tier_index, p.default_deny[d.index()]) {
                    calico[d.index()].entry(t).or_default().push(pi);
                }
            }
            for (ri, r) in p.rules.iter().enumerate() {
                if !dirs_wanted.contains(&r.direction) || !self.applies_to(r, identity) {
                    continue;
                }
                let peers = match self.rule_peers[pi as usize][ri] {
                    Some(ps) => ps,
                    None => match fqdn.get(&(pi, ri as u32)) {
                        Some(&ps) => ps,
                        None => {
                            complete = false;
                            continue;
                        }
                    },
                };
                if r.peers.is_empty() {
                    continue;
                }
                let base = Entry {
                    peers,
                    protocol: None,
                    port: PortMatch::Range(0, u16::MAX),
                    action: r.action,
                    tier,
                    rank: (rank0, order, ri as u32),
                    l7: None,
                    origin: Origin {
                        policy: pi,
                        rule: ri as u32,
                        port_rule: None,
                    },
                };
                let out = &mut dirs[r.direction.index()].entries;
                if r.ports.is_empty() {
                    out.push(base);
                    continue;
                }
                for (gi, g) in r.ports.iter().enumerate() {
                    let l7 = self.l7_of.get(&(pi, ri as u32, gi as u32)).copied();
                    for pp in &g.ports {
                        let mut e = base.clone();
                        e.l7 = l7;
                        e.origin.port_rule = Some(gi as u32);
                        e.protocol = Some(pp.protocol);
                        match &pp.port {
                            Port::Range(a, b) => {
                                let excluded = excluded_ports(r, pp.protocol, &container_ports);
                                for (a, b) in subtract(*a, *b, &excluded) {
                                    let mut e = e.clone();
                                    e.port = PortMatch::Range(a, b);
                                    out.push(e);
                                }
                            }
                            Port::Named(n) if r.direction == Direction::Ingress => {
                                // resolved on the endpoint itself
                                for cp in container_ports.iter().filter(|cp| {
                                    cp.name
                                        .as_deref()
                                        .is_some_and(|x| x.eq_ignore_ascii_case(n))
                                        && pp.protocol.covers(cp.protocol)
                                }) {
                                    let excluded = excluded_ports(r, cp.protocol, &container_ports);
                                    for (a, b) in subtract(cp.port, cp.port, &excluded) {
                                        let mut e = e.clone();
                                        e.protocol = Some(cp.protocol);
                                        e.port = PortMatch::Range(a, b);
                                        out.push(e);
                                    }
                                }
                            }
                            Port::Named(n) => {
                                e.port = PortMatch::Named(n.clone());
                                out.push(e);
                            }
                        }
                    }
                }
            }
        }
        for (d, tiers) in dirs.iter_mut().zip(calico) {
            self.place_tiers(d, tiers);
            d.entries.sort_by(|a, b| {
                let key = |e: &Entry| match e.tier {
                    Tier::Admin => (0, e.rank.1, e.rank.2),
                    Tier::Calico => (1, e.rank.1, e.rank.2),
                    Tier::Namespace => (1, e.rank.1, 0),
                    Tier::Baseline => (2, e.rank.1, e.rank.2),
                };
                key(a).cmp(&key(b))
            });
        }
        let ep = EndpointPolicy {
            key,
            name,
            identity,
            dirs,
        };
        (ep, complete)
    }

    /// Records the Calico tiers that select an endpoint in one direction. With any, the
    /// namespace tier's default deny becomes the `default` tier's, and `default_deny`
    /// lists the selecting policies of every tier that ends in `Deny`.
    fn place_tiers(&self, d: &mut DirPolicy, mut tiers: BTreeMap<u32, Vec<u32>>) {
        if tiers.is_empty() {
            return;
        }
        if !d.default_deny.is_empty() {
            tiers
                .entry(self.default_tier)
                .or_default()
                .extend(d.default_deny.iter().copied());
        }
        d.default_deny.clear();
        for (t, mut selected_by) in tiers {
            selected_by.sort_unstable();
            selected_by.dedup();
            let action = self.calico_tiers[t as usize].default_action;
            if action == Action::Deny {
                d.default_deny.extend(selected_by.iter().copied());
            }
            d.tiers.push(TierEnd {
                tier: t,
                action,
                selected_by,
            });
        }
    }

    /// Changes one pod's labels and recompiles what depends on them: its identity (new
    /// identities are evaluated against every cached selector), its own policy, and the
    /// named ports of the identities involved.
    pub fn set_pod_labels(
        &mut self,
        pod_id: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ModelError> {
        // pods come first: a pod's slot is its index
        let pod = self
            .pod_endpoint
            .get(pod_id)
            .copied()
            .filter(|&p| p < self.cluster.pods.len())
            .ok_or_else(|| ModelError::NoSuchPod(pod_id.to_string()))?;
        let ep_index = pod;
        Arc::make_mut(&mut self.cluster).pods[pod].labels = labels;
        let set = self.pod_label_set(pod);
        let (ident, created) = self.identities.intern(set, IdentityKind::Pod);
        if created {
            self.selectors.add_identity(&self.identities, ident);
        }
        let old = self.pod_identity[pod];
        self.pod_identity[pod] = ident;
        if let Some(pods) = self.pods_by_identity.get_mut(&old) {
            pods.remove(&pod);
            // An identity no pod holds any more leaves the selectors, as a compile would
            // not know it; interning its labels again brings it back.
            if pods.is_empty() && old != ident {
                self.pods_by_identity.remove(&old);
                self.selectors.remove_identity(&self.identities, old);
                self.identities.retire(old);
            }
        }
        self.pods_by_identity.entry(ident).or_default().insert(pod);
        // named ports of the old and new identity
        for i in [old, ident] {
            let mut ports: BTreeSet<ContainerPort> = BTreeSet::new();
            for &p in self.pods_by_identity.get(&i).into_iter().flatten() {
                ports.extend(
                    self.cluster.pods[p]
                        .ports
                        .iter()
                        .filter(|c| c.name.is_some())
                        .cloned(),
                );
            }
            self.identities.list[i as usize].named_ports = ports.into_iter().collect();
        }
        if self.scope.covers_pod(&self.cluster.pods[pod]) {
            let selecting = self.policies_selecting(ident);
            let ep = self.compile_endpoint(EndpointKey::Pod(pod), ident, &selecting);
            self.index_peer_sets(ep_index, &ep);
            let old = self.endpoints[ep_index].replace(Arc::new(ep));
            if let Some(old) = old {
                self.unindex_peer_sets(ep_index, &old);
            }
        }
        Ok(())
    }

    /// The compiled policy of a pod (`ns/pod`); None when the pod is unknown or not in
    /// the model's scope.
    pub fn pod_endpoint(&self, pod_id: &str) -> Option<&EndpointPolicy> {
        self.pod_endpoint
            .get(pod_id)
            .and_then(|&i| self.endpoint_at(i))
    }

    pub fn node_endpoint(&self, node: &str) -> Option<&EndpointPolicy> {
        self.node_endpoint
            .get(node)
            .and_then(|&i| self.endpoint_at(i))
    }

    pub fn endpoint(&self, key: EndpointKey) -> Option<&EndpointPolicy> {
        self.endpoint_slot(key).and_then(|i| self.endpoint_at(i))
    }

    /// The compiled policy in an endpoint slot (None: out of range or not in scope).
    pub fn endpoint_at(&self, slot: usize) -> Option<&EndpointPolicy> {
        self.endpoints.get(slot).and_then(|e| e.as_deref())
    }

    /// Every compiled endpoint policy, in slot order.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointPolicy> {
        self.endpoints.iter().filter_map(|e| e.as_deref())
    }

    /// The endpoints this model compiles.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The DNS observations the model holds: the cluster's at compile, then what was
    /// learned (`set_fqdn_ips`), one per (client, name) with every IP, in that order.
    pub fn dns(&self) -> Vec<DnsObservation> {
        self.learned.observations()
    }

    /// The model's cluster with the DNS observations it holds: what a full compile
    /// starts from to give this model again.
    pub fn cluster_with_dns(&self) -> Cluster {
        let mut c = (*self.cluster).clone();
        c.dns = self.dns();
        c
    }

    /// Where an endpoint sits in `endpoints`: pods first, in cluster order, then nodes.
    pub fn endpoint_slot(&self, key: EndpointKey) -> Option<usize> {
        let pods = self.cluster.pods.len();
        match key {
            EndpointKey::Pod(p) => (p < pods).then_some(p),
            EndpointKey::Node(n) => (n < self.cluster.nodes.len()).then_some(pods + n),
        }
    }

    /// The endpoint in a slot (inverse of [`Model::endpoint_slot`]).
    pub fn endpoint_key(&self, slot: usize) -> Option<EndpointKey> {
        let pods = self.cluster.pods.len();
        if slot < pods {
            Some(EndpointKey::Pod(slot))
        } else {
            (slot - pods < self.cluster.nodes.len()).then(|| EndpointKey::Node(slot - pods))
        }
    }

    /// Every toFQDNs pattern of the policies: normalised text and matcher.
    pub fn fqdn_patterns(&self) -> impl Iterator<Item = (&str, &NamePattern)> {
        self.fqdn_patterns.iter().map(|(t, p)| (t.as_str(), p))
    }

    /// The toFQDNs patterns, indexed by the names they match. Models that share one
    /// (`Arc::ptr_eq`) have the same patterns: only a full compile makes a new one.
    pub fn fqdn_pattern_index(&self) -> &Arc<FqdnPatterns> {
        &self.fqdn_patterns
    }

    /// The owner of an IP.
    pub fn owner(&self, ip: IpAddr) -> IpOwner {
        if let Some(o) = self.exact.get(&ip) {
            return *o;
        }
        for (p, i) in &self.prefix_identity {
            if p.contains(&ip) {
                return IpOwner::World(*i);
            }
        }
        IpOwner::World(self.world)
    }

    /// The identity of an IP as seen from `observer_node` (host vs remote-node).
    pub fn identity_of(&self, ip: IpAddr, observer_node: Option<&str>) -> Idx {
        match self.owner(ip) {
            IpOwner::Pod(p) => self.pod_identity[p],
            IpOwner::Node(n) => {
                let local = observer_node == Some(self.cluster.nodes[n].name.as_str());
                self.node_identity[n][if local { 0 } else { 1 }]
            }
            IpOwner::World(i) => i,
        }
    }

    pub fn pod_identity(&self, pod: usize) -> Idx {
        self.pod_identity[pod]
    }

    pub fn node_identity(&self, node: usize, as_host: bool) -> Idx {
        self.node_identity[node][if as_host { 0 } else { 1 }]
    }

    /// The ipcache entry of one IP as [`Model::ipcache`] lists it: its numeric identity
    /// if the IP has an entry of its own (a pod, node or learned FQDN IP), None if it
    /// falls to its longest policy prefix or to world.
    pub fn ipcache_entry(&self, ip: IpAddr, observer_node: Option<&str>) -> Option<u32> {
        self.exact
            .contains_key(&ip)
            .then(|| self.identities.get(self.identity_of(ip, observer_node)).id)
    }

    /// The ipcache as the datapath needs it: every prefix with its numeric identity.
    pub fn ipcache(&self, observer_node: Option<&str>) -> Vec<(IpNet, u32)> {
        let mut out: Vec<(IpNet, u32)> = self
            .exact
            .keys()
            .map(|ip| {
                (
                    IpNet::from(*ip),
                    self.identities.get(self.identity_of(*ip, observer_node)).id,
                )
            })
            .collect();
        out.extend(
            self.prefix_identity
                .iter()
                .map(|(p, i)| (*p, self.identities.get(*i).id)),
        );
        out.sort();
        out
    }

    /// A readable form of a peer set, for explanations.
    pub fn describe_peers(&self, ps: PeerSetId) -> String {
        let sels = self.selectors.peer_set_selectors(ps);
        let parts: Vec<String> = sels
            .iter()
            .map(|s| describe_selector(self.selectors.selector_of(*s)))
            .collect();
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(" | ")
        }
    }
}

/// The port ranges a rule's `notPorts` take out for `protocol` (named ones resolved on
/// the endpoint's own container ports).
fn excluded_ports(r: &Rule, protocol: Protocol, own: &[ContainerPort]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for p in &r.not_ports {
        match p {
            Port::Range(a, b) => out.push((*a, *b)),
            Port::Named(n) => out.extend(
                own.iter()
                    .filter(|cp| {
                        cp.name
                            .as_deref()
                            .is_some_and(|x| x.eq_ignore_ascii_case(n))
                            && protocol.covers(cp.protocol)
                    })
                    .map(|cp| (cp.port, cp.port)),
            ),
        }
    }
    out
}

/// `lo..=hi` without the `excluded` ranges, as ranges in order.
fn subtract(lo: u16, hi: u16, excluded: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = vec![(u32::from(lo), u32::from(hi))];
    for &(a, b) in excluded {
        let (a, b) = (u32::from(a), u32::from(b));
        out = out
            .into_iter()
            .flat_map(|(x, y)| {
                let mut keep = Vec::new();
                if b < x || a > y {
                    keep.push((x, y));
                } else {
                    if a > x {
                        keep.push((x, a - 1));
                    }
                    if b < y {
                        keep.push((b + 1, y));
                    }
                }
                keep
            })
            .collect();
    }
    out.into_iter().map(|(a, b)| (a as u16, b as u16)).collect()
}

/// A readable form of a peer selector: entities, CIDRs and FQDNs by name.
pub fn describe_selector(s: &Selector) -> String {
    if s.is_all() {
        return "all".into();
    }
    if let [r] = s.requirements.as_slice() {
        if r.op == Op::Exists {
            match r.key.source {
                Source::Reserved => return format!("entity {}", r.key.name),
                Source::Fqdn => {
                    let pat = r.key.name.split('@').next().unwrap_or_default();
                    return format!("fqdn {pat}");
                }
                Source::Cidr => return format!("cidr {}", r.key.name),
                _ => {}
            }
        }
    }
    if s.requirements.iter().any(|r| r.key.source == Source::Cidr) {
        let mut cidr = String::new();
        let mut except = Vec::new();
        for r in &s.requirements {
            match r.op {
                Op::Exists => cidr = r.key.name.clone(),
                Op::DoesNotExist => except.push(r.key.name.clone()),
                _ => {}
            }
        }
        return if except.is_empty() {
            format!("cidr {cidr}")
        } else {
            format!("cidr {cidr} except {}", except.join(","))
        };
    }
    format!("endpoints {{{s}}}")
}
