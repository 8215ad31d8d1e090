//! The policy publisher: the single place where a new compiled policy goes out, and the
//! only writer of the policy, ipcache and endpoints maps. It owns the policy store, the
//! cluster state of the last snapshot, the learned FQDN observations, the identity table
//! and the model. On a new snapshot or a DNS hand-off it builds the next model once and
//! hands it to the datapath (one diff against what the maps hold), the HTTP proxy and
//! the DNS proxy together. Pod, namespace and policy changes update the current model
//! incrementally where they can (`rebuild`); learned DNS IPs are applied to the current
//! model without a compile. The model compiles this node's endpoints only
//! (`Scope::Node`); the cluster and the policies are shared with it, not copied.
//!
//! It never waits on anything but its inputs: endpoint discovery, conntrack and drop
//! events are other tasks', so a DNS hand-off is confirmed as soon as its write is done.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy_model::compile::{EndpointKey, Scope};
use policy_model::identity::Idx;
use policy_model::{Cluster, CompileOptions, Model, PolicyError};
use redirect_bpf::common::EndpointInfo;
use redirect_bpf::{endpoint_entries, PeerClasses, ProxyPorts};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::dns::Request;
use super::endpoints::{EndpointIds, EndpointStatus};
use super::fqdn::{Learned, Observations};
use super::identities::StableIds;
use super::maps::{apply, apply_changes, Changes, MapState};
use super::rebuild::{self, Pending, Plan};
use super::{Attachments, LocalPods, Published};
use crate::datapath::{Datapath, Shared};
use crate::source::Snapshot;
use crate::store::PolicyStore;
use crate::telemetry::metrics::AgentMetrics;

/// How soon a push that failed half way is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Where a published model goes besides the datapath: the proxies, which decide L7 and
/// DNS on it.
pub trait Proxies: Send + 'static {
    /// Hands over the next model; returns its generation.
    fn publish(&mut self, model: &Arc<Model>) -> u64;
}

/// The proxies the agent hosts.
pub struct NodeProxies {
    pub http: Arc<proxy::PolicyStore>,
    pub http_metrics: proxy::Metrics,
    pub dns: dns_proxy::Proxy,
}

impl Proxies for NodeProxies {
    fn publish(&mut self, model: &Arc<Model>) -> u64 {
        let generation = self.http.publish(model.clone());
        self.http_metrics
            .policy_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.dns.set_model(model.clone());
        generation
    }
}

/// What the publisher shows of itself (`/v1/status`, `/v1/endpoints`, `/v1/fqdn`,
/// `/v1/policy/...`).
#[derive(Clone, Debug, Default)]
pub struct PolicyStatus {
    /// The first full policy is in the datapath and the first endpoint discovery is done.
    pub ready: bool,
    /// Generation of the published model.
    pub generation: u64,
    pub last_push_ms: f64,
    pub last_error: Option<String>,
    pub endpoints: Vec<EndpointStatus>,
    pub policies: usize,
    pub errors: Vec<PolicyError>,
    pub model: Option<Arc<Model>>,
    pub learned: Learned,
    pub map_entries: MapEntries,
}

/// How many entries the maps the publisher owns hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MapEntries {
    pub ipcache: usize,
    pub endpoints: usize,
    pub policy: usize,
    /// Identities in the peer classes map.
    #[serde(default)]
    pub peer_classes: usize,
    /// Distinct peer classes.
    #[serde(default)]
    pub classes: usize,
}

/// The publisher's inputs.
pub struct Inputs {
    /// Full snapshots from the source.
    pub snapshots: mpsc::Receiver<Snapshot>,
    /// The DNS hand-off lane.
    pub dns: mpsc::Receiver<Request>,
    /// Where the pods' programs are attached (the endpoint attacher's view).
    pub attachments: watch::Receiver<Attachments>,
}

/// The publisher's outputs.
pub struct Outputs {
    /// The local pods and their IPs, for the endpoint attacher (None before the first
    /// snapshot).
    pub local_pods: watch::Sender<Option<LocalPods>>,
    /// Each model once the datapath has it.
    pub published: watch::Sender<Option<Published>>,
    pub status: watch::Sender<PolicyStatus>,
}

/// The policy publisher's state (see the module documentation).
pub struct Publisher<D, P> {
    node: String,
    dp: Shared<D>,
    /// What the maps hold (read back at start).
    applied: MapState,
    store: PolicyStore,
    /// The source's cluster state, shared with the model.
    cluster: Arc<Cluster>,
    /// What the model compiles: this node's endpoints.
    scope: Scope,
    fqdn: Observations,
    ids: EndpointIds,
    identities: StableIds,
    ports: ProxyPorts,
    compile: CompileOptions,
    proxies: P,
    metrics: AgentMetrics,
    model: Option<Arc<Model>>,
    /// The peer classes of what the maps hold (None: to be computed by the next full
    /// diff).
    classes: Option<PeerClasses>,
    /// (endpoint, name) pairs whose learned IPs changed since the model was built.
    learned_changes: BTreeSet<(String, String)>,
    /// What changed since the model was built that asks for a full compile.
    pending: Pending,
    /// A copy of the published model made on a thread of its own after each publish, so
    /// that the next update (a DNS batch, pod churn) starts from a copy without waiting
    /// for one: (generation of the model it copies, the copying thread).
    spare: Option<(u64, std::thread::JoinHandle<Model>)>,
    generation: u64,
    /// Pushes of policy and cluster changes that reached the datapath.
    pushes: u64,
    /// Whether the last push failed to update the datapath.
    failed: bool,
    attachments: Attachments,
    outputs: Outputs,
}

/// Everything a publisher starts from.
pub struct Start<D, P> {
    pub node: String,
    pub dp: Shared<D>,
    /// What the maps hold (`MapState::read`).
    pub applied: MapState,
    pub fqdn: Observations,
    pub identities: StableIds,
    pub ports: ProxyPorts,
    pub compile: CompileOptions,
    pub proxies: P,
    pub metrics: AgentMetrics,
}

/// What one round of inputs asks for.
#[derive(Default)]
struct Work {
    /// Build the next model and push it.
    push: bool,
    /// The attachments changed: the endpoints map's interfaces.
    endpoints: bool,
    acks: Vec<Request>,
    /// A hand-off changed the FQDN observations: the file is to be written.
    save_fqdn: bool,
}

impl<D: Datapath, P: Proxies> Publisher<D, P> {
    pub fn new(start: Start<D, P>, outputs: Outputs) -> Publisher<D, P> {
        Publisher {
            scope: Scope::Node(start.node.clone()),
            node: start.node,
            dp: start.dp,
            applied: start.applied,
            store: PolicyStore::default(),
            cluster: Arc::default(),
            fqdn: start.fqdn,
            ids: EndpointIds::default(),
            identities: start.identities,
            ports: start.ports,
            compile: start.compile,
            proxies: start.proxies,
            metrics: start.metrics,
            model: None,
            classes: None,
            learned_changes: BTreeSet::new(),
            pending: Pending::default(),
            spare: None,
            generation: 0,
            pushes: 0,
            failed: false,
            attachments: Attachments::default(),
            outputs,
        }
    }

    /// Runs until the source's channel closes. Nothing is written before the first
    /// snapshot: DNS hand-offs that come earlier go into the first push, so that a
    /// restart never passes through an empty policy.
    pub async fn run(mut self, mut inputs: Inputs) {
        let mut work = Work::default();
        let first = loop {
            tokio::select! {
                s = inputs.snapshots.recv() => match s {
                    Some(s) => break s,
                    None => return,
                },
                Some(r) = inputs.dns.recv() => self.take_dns(r, &mut work),
            }
        };
        self.take_snapshot(first, &mut work);
        self.save_fqdn(&mut work);
        self.attachments = inputs.attachments.borrow_and_update().clone();
        let result = self.push();
        confirm(work.acks, &result);
        self.update_ready();
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut work = Work::default();
            tokio::select! {
                // DNS first: a pod waits for its answer.
                biased;
                Some(r) = inputs.dns.recv() => self.take_dns(r, &mut work),
                s = inputs.snapshots.recv() => match s {
                    Some(s) => self.take_snapshot(s, &mut work),
                    None => return,
                },
                Ok(()) = inputs.attachments.changed() => work.endpoints = true,
                _ = retry.tick(), if self.failed => work.push = true,
            }
            // Everything queued meanwhile goes into the same push.
            while let Ok(r) = inputs.dns.try_recv() {
                self.take_dns(r, &mut work);
            }
            while let Ok(s) = inputs.snapshots.try_recv() {
                self.take_snapshot(s, &mut work);
            }
            self.save_fqdn(&mut work);
            if work.endpoints || inputs.attachments.has_changed().unwrap_or(false) {
                self.attachments = inputs.attachments.borrow_and_update().clone();
                work.endpoints = true;
            }
            let result = if work.push || self.failed {
                self.push()
            } else {
                let learned = if self.learned_changes.is_empty() {
                    Ok(())
                } else {
                    self.learn()
                };
                let endpoints = if work.endpoints {
                    self.refresh_endpoints()
                } else {
                    Ok(())
                };
                learned.and(endpoints)
            };
            confirm(work.acks, &result);
            self.update_ready();
        }
    }

    fn take_snapshot(&mut self, snap: Snapshot, work: &mut Work) {
        let changes = self.store.replace_all(&snap.objects, snap.errors);
        for k in &changes.rejected {
            tracing::warn!(
                kind = %k.kind,
                namespace = k.namespace.as_deref().unwrap_or(""),
                name = %k.name,
                in_force = if self.store.is_stale(k) {
                    "the last good version"
                } else {
                    "no version"
                },
                "policy rejected"
            );
        }
        if snap.cluster != *self.cluster {
            if snap.cluster.dns != self.cluster.dns {
                self.pending.source_dns = true;
            }
            self.cluster = Arc::new(snap.cluster);
            work.push = true;
        }
        // The first snapshot's local pods start the attacher, even when there are none.
        let now = Some(local_pods(&self.cluster, &self.node));
        self.outputs.local_pods.send_if_modified(|pods| {
            let changed = *pods != now;
            *pods = now;
            changed
        });
        if !changes.is_empty() && changes.rejected.len() < changes_len(&changes) {
            self.pending.policies = true;
            work.push = true;
        }
        self.update_policy_status();
    }

    fn take_dns(&mut self, r: Request, work: &mut Work) {
        if self.fqdn.apply(&r.update) {
            // learned incrementally unless something else asks for a compile
            self.learned_changes
                .insert((r.update.endpoint.clone(), r.update.name.clone()));
            work.save_fqdn = true;
        }
        work.acks.push(r);
    }

    /// Writes the FQDN observations once for a round of hand-offs, before they are
    /// confirmed: the file holds everything learned, so one write covers them all.
    fn save_fqdn(&mut self, work: &mut Work) {
        if std::mem::take(&mut work.save_fqdn) {
            if let Err(e) = self.fqdn.save() {
                tracing::warn!(error = %e, "cannot save the FQDN observations");
            }
        }
    }

    fn update_policy_status(&self) {
        let errors = self.store.errors();
        let policies = self.store.policies().len();
        self.metrics
            .policies_invalid
            .set(i64::try_from(errors.len()).unwrap_or(i64::MAX));
        self.metrics
            .policies
            .set(i64::try_from(policies).unwrap_or(i64::MAX));
        self.outputs.status.send_modify(|s| {
            s.errors = errors;
            s.policies = policies;
        });
    }

    /// Ready once the first push went through and the attacher finished its first round
    /// (the local pods found are attached): from then on the node enforces.
    fn update_ready(&self) {
        if self.failed || self.model.is_none() || !self.attachments.discovered {
            return;
        }
        self.outputs.status.send_if_modified(|s| {
            if s.ready {
                return false;
            }
            s.ready = true;
            tracing::info!(
                endpoints = s.endpoints.len(),
                policies = s.policies,
                push_ms = s.last_push_ms,
                "ready"
            );
            true
        });
        self.metrics.ready.set(1);
    }

    /// Moves the peer classes along a learning step that added `added` and retired
    /// `retired` in `model` (`PeerClasses::learn_step`); returns them (the caller puts
    /// them back) with the assignments that changed, or None when the classes themselves
    /// changed (computed afresh by the caller's full diff).
    fn learned_classes(
        &mut self,
        model: &Model,
        added: &[Idx],
        retired: &[Idx],
    ) -> Option<(PeerClasses, BTreeMap<u32, Option<u32>>)> {
        let mut classes = self.classes.take()?;
        let eps: Vec<_> = self
            .local_pods()
            .filter_map(|p| model.pod_endpoint(&p.id()))
            .collect();
        let changed = classes.learn_step(model, &eps, added, retired)?;
        Some((classes, changed))
    }

    fn local_pods(&self) -> impl Iterator<Item = &policy_model::cluster::Pod> {
        self.cluster
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(self.node.as_str()))
    }

    /// What the maps must hold for `model`.
    fn desired(&mut self, model: &Model) -> (MapState, Vec<EndpointStatus>) {
        let mut d = MapState::default();
        let mut status = Vec::new();
        let recovered: BTreeMap<IpAddr, u32> = self
            .applied
            .endpoints
            .iter()
            .map(|(ip, i)| (*ip, i.endpoint_id))
            .collect();
        let pods: Vec<(String, Vec<IpAddr>)> = self
            .local_pods()
            .map(|p| (p.id(), p.all_ips().collect()))
            .collect();
        let local: BTreeSet<String> = pods.iter().map(|(p, _)| p.clone()).collect();
        self.ids.retain(|p| local.contains(p));
        let pods: Vec<_> = pods
            .into_iter()
            .filter_map(|(pod, ips)| Some((model.pod_endpoint(&pod)?, pod, ips)))
            .collect();
        let eps: Vec<_> = pods.iter().map(|(ep, _, _)| *ep).collect();
        let classes = PeerClasses::compute(model, &eps, self.applied.classes());
        for (ep, pod, ips) in pods {
            let id = self.ids.id(&pod, &ips, &recovered);
            let e = endpoint_entries(model, ep, id, self.ports, &classes);
            let identity = model.identities.get(ep.identity).id;
            let attached = self.attachments.by_pod.get(&pod);
            let ifindex = match attached {
                Some(a) => a.ifindex,
                // Before the first discovery round, what the maps hold stays.
                None if !self.attachments.discovered => ips
                    .iter()
                    .find_map(|ip| self.applied.endpoints.get(ip).map(|i| i.ifindex))
                    .unwrap_or(0),
                None => 0,
            };
            let info = EndpointInfo {
                endpoint_id: id,
                identity,
                ifindex,
                flags: e.flags,
            };
            for ip in &ips {
                d.endpoints.insert(*ip, info);
            }
            if !e.entries.is_empty() {
                d.policy.insert(id, e.entries.into_iter().collect());
            }
            status.push(EndpointStatus {
                pod,
                ips,
                endpoint_id: id,
                identity,
                attached: attached.is_some(),
                interface: attached.map(|a| a.iface.clone()),
                ifindex,
            });
        }
        d.set_classes(classes.assignments().clone());
        d.ipcache = model.ipcache(Some(&self.node)).into_iter().collect();
        self.classes = Some(classes);
        (d, status)
    }

    /// Applies learned FQDN IPs to the current model without a compile
    /// (`Model::set_fqdn_ips`), and pushes only what changed: the ipcache entries of the
    /// IPs whose identity moved, and the policy entries of the local endpoints whose
    /// peers gained or lost an identity. Without a model yet, a full push.
    fn learn(&mut self) -> Result<(), String> {
        let Some(current) = self.model.clone() else {
            return self.push();
        };
        let start = Instant::now();
        // The proxies keep reading the model they hold; this is the next one (the one copy
        // of a DNS update batch: the proxies then share it).
        let mut model = working_copy(self.spare.take(), self.generation, &current);
        let (ips, added, retired, endpoints) = self.apply_learned(&mut model);
        if self.identities.apply_new(&mut model, &added) {
            self.save_identities();
        }
        let mut changes = Changes::default();
        for ip in &ips {
            let id = model.ipcache_entry(*ip, Some(&self.node));
            changes.ipcache.insert(ipnet::IpNet::from(*ip), id);
        }
        let Some((classes, class_changes)) = self.learned_classes(&model, &added, &retired) else {
            // A class came or went: every endpoint's entries name the classes.
            let (all, _) = self.desired(&model);
            let result = apply(&mut *self.dp.lock(), &mut self.applied, &all);
            return self.publish(model, start, None, false, result);
        };
        changes.classes = class_changes;
        for key in endpoints {
            let Some(ep) = model.endpoint(key) else {
                continue;
            };
            let EndpointKey::Pod(p) = key else {
                continue;
            };
            let pod = &model.cluster.pods[p];
            if pod.node.as_deref() != Some(self.node.as_str()) {
                continue;
            }
            // the endpoint's id as the datapath knows it
            let Some(id) = pod
                .all_ips()
                .find_map(|ip| self.applied.endpoints.get(&ip).map(|i| i.endpoint_id))
            else {
                continue;
            };
            let e = endpoint_entries(&model, ep, id, self.ports, &classes);
            changes.policy.insert(id, e.entries.into_iter().collect());
        }
        self.classes = Some(classes);
        let result = apply_changes(&mut *self.dp.lock(), &mut self.applied, &changes);
        self.publish(model, start, None, false, result)
    }

    /// Applies the learned FQDN IPs that changed since `model` was built
    /// (`Model::set_fqdn_ips`). Returns the IPs whose identity moved, the identities
    /// that came into use and those retired, and the endpoints whose peers gained or lost
    /// one.
    fn apply_learned(&mut self, model: &mut Model) -> Learning {
        let mut ips = BTreeSet::new();
        let mut added = Vec::new();
        let mut retired = Vec::new();
        let mut endpoints = BTreeSet::new();
        for (client, name) in std::mem::take(&mut self.learned_changes) {
            let mut learned: BTreeSet<IpAddr> = self
                .fqdn
                .learned
                .get(&client)
                .and_then(|n| n.get(&name))
                .cloned()
                .unwrap_or_default();
            // what the source itself observed for the name stays
            learned.extend(
                self.cluster
                    .dns
                    .iter()
                    .filter(|o| o.client == client && o.name == name)
                    .flat_map(|o| o.ips.iter().copied()),
            );
            let c = model.set_fqdn_ips(&client, &name, learned);
            ips.extend(c.ips.iter().map(|(ip, _, _)| *ip));
            added.extend(c.added);
            retired.extend(c.retired);
            endpoints.extend(c.endpoints);
        }
        (ips, added, retired, endpoints)
    }

    /// Builds the next model (incrementally for pod and namespace churn, else by a full
    /// compile) and pushes it to the datapath, the HTTP proxy and the DNS proxy.
    fn push(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let (spare, generation) = (self.spare.take(), self.generation);
        let next = rebuild::next_model(
            self.model.as_deref(),
            |current| working_copy(spare, generation, current),
            std::mem::take(&mut self.pending),
            rebuild::Inputs {
                cluster: &self.cluster,
                options: self.compile,
                scope: &self.scope,
                learned: || self.fqdn.to_cluster(),
                policies: || self.store.policies(),
            },
        );
        let mut model = next.model;
        let renumbered = match next.plan {
            Plan::Incremental => {
                self.metrics
                    .compiles
                    .with_label_values(&["incremental"])
                    .inc();
                // learned since the current model was built
                let (_, learned, _, _) = self.apply_learned(&mut model);
                let mut added = next.new_identities;
                added.extend(learned);
                let forgotten = self.identities.forget(&model, &next.retired);
                self.identities.apply_new(&mut model, &added) || forgotten
            }
            Plan::Full(why) => {
                self.metrics.compiles.with_label_values(&["full"]).inc();
                if why != rebuild::Full::NoModel {
                    tracing::info!(reason = ?why, "full compile");
                }
                // the compile took every learned observation
                self.learned_changes.clear();
                self.identities.apply(&mut model)
            }
        };
        if renumbered {
            self.save_identities();
        }
        let (desired, endpoints) = self.desired(&model);
        let result = apply(&mut *self.dp.lock(), &mut self.applied, &desired);
        self.publish(model, start, Some(endpoints), true, result)
    }

    /// Rewrites the endpoints map for new attachments (interfaces found or gone), without
    /// a new model.
    fn refresh_endpoints(&mut self) -> Result<(), String> {
        let Some(model) = self.model.clone() else {
            return Ok(());
        };
        let (desired, endpoints) = self.desired(&model);
        let result = apply(&mut *self.dp.lock(), &mut self.applied, &desired);
        let outcome = self.record(result);
        self.metrics.set_endpoints(&endpoints);
        let entries = self.map_entries();
        self.outputs.status.send_modify(|s| {
            s.endpoints = endpoints;
            s.map_entries = entries;
            if let Err(e) = &outcome {
                s.last_error = Some(e.clone());
            }
        });
        outcome
    }

    fn save_identities(&mut self) {
        if let Err(e) = self.identities.save() {
            tracing::warn!(error = %e, "cannot save the identity table");
        }
    }

    /// Counts the outcome of a datapath update.
    fn record(&mut self, result: Result<usize, redirect_bpf::Error>) -> Result<(), String> {
        self.failed = result.is_err();
        match result {
            Ok(writes) => {
                self.metrics.map_writes.inc_by(writes as u64);
                Ok(())
            }
            Err(e) => {
                self.metrics.update_errors.inc();
                tracing::error!(error = %e, "datapath update failed; retrying");
                Err(e.to_string())
            }
        }
    }

    fn map_entries(&self) -> MapEntries {
        MapEntries {
            ipcache: self.applied.ipcache.len(),
            endpoints: self.applied.endpoints.len(),
            policy: self.applied.policy_len(),
            peer_classes: self.applied.classes().len(),
            classes: self.applied.distinct_classes(),
        }
    }

    /// Hands `model` to the proxies and to the tasks that follow the published model, and
    /// records the outcome of its datapath update in the metrics and the status
    /// (`endpoints`: None keeps the endpoints shown). `revoke`: established flows the
    /// model denies are to be cut.
    fn publish(
        &mut self,
        model: Model,
        start: Instant,
        endpoints: Option<Vec<EndpointStatus>>,
        revoke: bool,
        result: Result<usize, redirect_bpf::Error>,
    ) -> Result<(), String> {
        // The proxies get the model whatever the datapath did: they decide L7 and DNS.
        // They share one copy.
        let model = Arc::new(model);
        let generation = self.proxies.publish(&model);
        self.model = Some(model.clone());
        self.generation = generation;
        let source = model.clone();
        self.spare = std::thread::Builder::new()
            .name("ward-model-copy".into())
            .spawn(move || (*source).clone())
            .ok()
            .map(|h| (generation, h));
        let elapsed = start.elapsed();
        self.metrics.pushes.inc();
        self.metrics.push_seconds.observe(elapsed.as_secs_f64());
        if let Some(endpoints) = &endpoints {
            self.metrics.set_endpoints(endpoints);
        }
        self.metrics
            .fqdn_names
            .set(i64::try_from(self.fqdn.names()).unwrap_or(i64::MAX));
        let outcome = self.record(result);
        if outcome.is_ok() {
            // Only a model the datapath enforces: the conntrack task revokes on it.
            self.pushes += u64::from(revoke);
            self.outputs.published.send_replace(Some(Published {
                model: model.clone(),
                generation,
                pushes: self.pushes,
            }));
        }
        let entries = self.map_entries();
        let learned = self.fqdn.learned.clone();
        self.outputs.status.send_modify(|s| {
            s.generation = generation;
            s.last_push_ms = elapsed.as_secs_f64() * 1000.0;
            if let Some(endpoints) = endpoints {
                s.endpoints = endpoints;
            }
            s.model = Some(model);
            s.learned = learned;
            s.map_entries = entries;
            if let Err(e) = &outcome {
                s.last_error = Some(e.clone());
            }
        });
        tracing::debug!(
            generation,
            ms = elapsed.as_secs_f64() * 1000.0,
            ok = outcome.is_ok(),
            "published"
        );
        outcome
    }
}

/// What a learning step changed: the IPs whose identity moved, the identities added and
/// retired, the endpoints whose peers changed.
type Learning = (BTreeSet<IpAddr>, Vec<Idx>, Vec<Idx>, BTreeSet<EndpointKey>);

/// Answers the DNS hand-offs of a round with its outcome.
fn confirm(acks: Vec<Request>, result: &Result<(), String>) {
    for r in acks {
        let _ = r.done.send(result.clone());
    }
}

/// The pods of `node` in `cluster` with their IPs.
pub fn local_pods(cluster: &Cluster, node: &str) -> LocalPods {
    cluster
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(node))
        .map(|p| (p.id(), p.all_ips().collect()))
        .collect()
}

/// A working copy of `current` (published as `generation`): the spare copy made after
/// it was published if that is the one, else a copy made now.
fn working_copy(
    spare: Option<(u64, std::thread::JoinHandle<Model>)>,
    generation: u64,
    current: &Model,
) -> Model {
    match spare {
        Some((g, copying)) if g == generation => copying.join().unwrap_or_else(|_| current.clone()),
        _ => current.clone(),
    }
}

/// Applied, removed and rejected objects together.
fn changes_len(c: &crate::store::Changes) -> usize {
    c.applied.len() + c.removed.len() + c.rejected.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn model(yaml: &str) -> Model {
        let c: Cluster = serde_yaml::from_str(yaml).unwrap();
        Model::compile(&c, vec![], CompileOptions::default())
    }

    #[test]
    fn the_spare_copy_is_used_only_for_its_own_generation() {
        let current = model("pods: [{namespace: a, name: p, ip: 10.0.0.1}]");
        let spare = || {
            let m = model("pods: [{namespace: a, name: spare, ip: 10.0.0.2}]");
            Some((7, std::thread::spawn(move || m)))
        };
        let names = |m: &Model| m.cluster.pods.iter().map(|p| p.id()).collect::<Vec<_>>();
        assert_eq!(names(&working_copy(spare(), 7, &current)), vec!["a/spare"]);
        assert_eq!(names(&working_copy(spare(), 8, &current)), vec!["a/p"]);
        assert_eq!(names(&working_copy(None, 7, &current)), vec!["a/p"]);
    }
}
