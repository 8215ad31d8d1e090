//! The single place where a new compiled policy goes out: the reconciler task owns the
//! datapath (the only writer), the policy store and the learned FQDN observations. On a
//! new snapshot from the source or a DNS update it builds the next model once and pushes
//! it to the datapath maps (as a diff), the HTTP proxy and the DNS proxy together. A
//! snapshot that only changed pods and namespaces updates the current model
//! incrementally (`rebuild`); policy changes compile in full.

mod rebuild;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dns_proxy::Update;
use futures_util::{FutureExt, StreamExt};
use policy_model::compile::EndpointKey;
use policy_model::identity::Idx;
use policy_model::{Cluster, CompileOptions, Model, PolicyError};
use redirect_bpf::common::{drop_reason, EndpointInfo};
use redirect_bpf::netlink::{NetChange, NetChanges, Netlink};
use redirect_bpf::{endpoint_entries, Datapath, ProxyPorts};
use tokio::sync::{mpsc, oneshot};

use super::datapath::{apply, MapState};
use super::endpoints::{ifindex, veth_of, EndpointIds, EndpointStatus};
use super::fqdn::{Learned, Observations};
use super::identities::StableIds;
use super::metrics::{reason_name, AgentMetrics};
use crate::source::Snapshot;
use crate::store::PolicyStore;
use rebuild::{Pending, Plan};

/// What the reconciler is told.
pub enum Msg {
    /// A full snapshot from the source.
    Snapshot(Snapshot),
    /// IPs the DNS proxy learned or let go; answered once the datapath enforces them.
    Dns(Update, oneshot::Sender<Result<(), String>>),
}

/// What the admin endpoint shows; written by the reconciler only.
#[derive(Default)]
pub struct Status {
    pub node: String,
    pub source: &'static str,
    pub ready: bool,
    pub pushes: u64,
    pub last_push_ms: f64,
    pub last_error: Option<String>,
    pub endpoints: Vec<EndpointStatus>,
    pub policies: usize,
    pub errors: Vec<PolicyError>,
    pub model: Option<Arc<Model>>,
    pub learned: Learned,
    pub drops: BTreeMap<&'static str, u64>,
    pub map_entries: (usize, usize, usize),
}

pub type SharedStatus = Arc<RwLock<Status>>;

/// How often endpoints not found yet are looked for again without a route or link
/// change announced: the safety net of the netlink watch (`Reconciler::endpoint_recheck`
/// defaults to it).
pub const ENDPOINT_RECHECK: Duration = Duration::from_secs(10);
/// How often the drop counters are read.
const COUNTERS_EVERY: Duration = Duration::from_millis(200);
/// How often conntrack is swept of idle and closed flows.
const CT_SWEEP_EVERY: Duration = Duration::from_secs(10);
/// A flow idle this long leaves conntrack (Cilium's regular TCP timeout).
const CT_IDLE: Duration = Duration::from_secs(6 * 3600);
/// A closed TCP flow (FIN or RST seen) leaves after this much idleness.
const CT_CLOSING: Duration = Duration::from_secs(10);

pub struct Reconciler {
    pub node: String,
    pub dp: Arc<Mutex<Datapath>>,
    pub applied: MapState,
    pub store: PolicyStore,
    pub cluster: Cluster,
    pub fqdn: Observations,
    pub ids: EndpointIds,
    pub ports: ProxyPorts,
    pub http: Arc<proxy::PolicyStore>,
    pub http_metrics: proxy::Metrics,
    pub dns: dns_proxy::Proxy,
    pub status: SharedStatus,
    pub metrics: AgentMetrics,
    /// The node namespace's rtnetlink: route lookups of endpoint discovery.
    pub netlink: Netlink,
    /// How often discovery runs when no route or link change woke it.
    pub endpoint_recheck: Duration,
    /// pod -> host-side interface carrying the programs.
    pub veths: BTreeMap<String, String>,
    pub model: Option<Arc<Model>>,
    /// Uplink interfaces (attached at start, never detached here).
    pub uplinks: Vec<String>,
    /// Numeric identities that stay put across compiles and restarts.
    pub identities: StableIds,
    /// How policies are compiled (whether CIDR selectors match cluster IPs).
    pub compile: CompileOptions,
    /// (endpoint, name) pairs whose learned IPs changed since the model was built.
    learned_changes: BTreeSet<(String, String)>,
    /// What changed since the model was built that asks for a full compile.
    pending: Pending,
    /// A copy of the published model made on a thread of its own after each publish, so
    /// that the next update (a DNS batch, pod churn) starts from a copy without waiting
    /// for one: (generation of the model it copies, the copying thread).
    spare: Option<(u64, std::thread::JoinHandle<Model>)>,
    /// Generation of the published model.
    generation: u64,
    /// Whether the last push failed to update the datapath.
    failed: bool,
    drops_seen: BTreeMap<u32, u64>,
}

impl Reconciler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        dp: Arc<Mutex<Datapath>>,
        applied: MapState,
        fqdn: Observations,
        ports: ProxyPorts,
        http: (Arc<proxy::PolicyStore>, proxy::Metrics),
        dns: dns_proxy::Proxy,
        status: SharedStatus,
        metrics: AgentMetrics,
        netlink: Netlink,
    ) -> Reconciler {
        Reconciler {
            node,
            dp,
            applied,
            store: PolicyStore::default(),
            cluster: Cluster::default(),
            fqdn,
            ids: EndpointIds::default(),
            ports,
            http: http.0,
            http_metrics: http.1,
            dns,
            status,
            metrics,
            netlink,
            endpoint_recheck: ENDPOINT_RECHECK,
            veths: BTreeMap::new(),
            model: None,
            uplinks: Vec::new(),
            identities: StableIds::default(),
            compile: CompileOptions::default(),
            learned_changes: BTreeSet::new(),
            pending: Pending::default(),
            spare: None,
            generation: 0,
            failed: false,
            drops_seen: BTreeMap::new(),
        }
    }

    /// Runs until the channel closes. Nothing is written before the first snapshot: it
    /// is taken, its pods' veths found, leftovers of an earlier run detached, and only
    /// then the maps are moved to the new state, so that a restart never passes through
    /// an empty policy. Endpoint discovery runs again when the node's routes or links
    /// change (`net`), and every `endpoint_recheck` in any case.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>, net: NetChanges) {
        let mut net = Some(net);
        let mut acks = Vec::new();
        loop {
            let Some(m) = rx.recv().await else { return };
            let first = matches!(m, Msg::Snapshot(_));
            let (mut dirty, mut rediscover) = (false, false);
            self.take(m, &mut dirty, &mut rediscover, &mut acks);
            if first {
                break;
            }
        }
        self.discover().await;
        self.detach_leftovers();
        let result = self.push();
        for a in acks {
            let _ = a.send(result.clone());
        }
        let mut tick = tokio::time::interval(COUNTERS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_discovery = Instant::now();
        let mut last_sweep = Instant::now();
        loop {
            let mut dirty = false;
            let mut rediscover = false;
            let mut acks = Vec::new();
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { return };
                    self.take(m, &mut dirty, &mut rediscover, &mut acks);
                    // Everything queued meanwhile goes into the same push.
                    while let Ok(m) = rx.try_recv() {
                        self.take(m, &mut dirty, &mut rediscover, &mut acks);
                    }
                }
                _ = net_change(&mut net) => {
                    // One discovery for a burst of announcements (a CNI adds a veth, its
                    // addresses and routes in a row).
                    if let Some(n) = net.as_mut() {
                        while n.next().now_or_never().flatten().is_some() {}
                    }
                    last_discovery = Instant::now();
                    rediscover = true;
                }
                _ = tick.tick() => {
                    self.read_drop_counters();
                    // A push that failed half way is tried again until it goes through.
                    dirty = self.failed;
                    if last_sweep.elapsed() >= CT_SWEEP_EVERY {
                        last_sweep = Instant::now();
                        let swept = self.with_dp(|dp| dp.expire_conntrack(CT_IDLE, CT_CLOSING));
                        if let Err(e) = swept {
                            eprintln!("ward agent: conntrack sweep: {e}");
                        }
                    }
                    if last_discovery.elapsed() >= self.endpoint_recheck {
                        last_discovery = Instant::now();
                        rediscover = true;
                    }
                }
            }
            if rediscover && self.discover().await {
                dirty = true;
            }
            let result = if dirty {
                self.push()
            } else if !self.learned_changes.is_empty() {
                self.learn()
            } else {
                Ok(())
            };
            for a in acks {
                let _ = a.send(result.clone());
            }
        }
    }

    fn take(
        &mut self,
        m: Msg,
        dirty: &mut bool,
        rediscover: &mut bool,
        acks: &mut Vec<oneshot::Sender<Result<(), String>>>,
    ) {
        match m {
            Msg::Snapshot(snap) => {
                let changes = self.store.replace_all(&snap.objects, snap.errors);
                for k in &changes.rejected {
                    eprintln!(
                        "ward agent: rejected {} {}/{}: {}",
                        k.kind,
                        k.namespace.as_deref().unwrap_or(""),
                        k.name,
                        if self.store.is_stale(k) {
                            "the last good version stays in force"
                        } else {
                            "no version of it is enforced"
                        }
                    );
                }
                if snap.cluster != self.cluster {
                    if snap.cluster.dns != self.cluster.dns {
                        self.pending.source_dns = true;
                    }
                    self.cluster = snap.cluster;
                    *rediscover = true;
                    *dirty = true;
                }
                if !changes.is_empty() && changes.rejected.len() < changes_len(&changes) {
                    self.pending.policies = true;
                    *dirty = true;
                }
                self.update_policy_status();
            }
            Msg::Dns(u, ack) => {
                if self.fqdn.apply(&u) {
                    // learned incrementally unless something else asks for a compile
                    self.learned_changes
                        .insert((u.endpoint.clone(), u.name.clone()));
                    if let Err(e) = self.fqdn.save() {
                        eprintln!("ward agent: saving the FQDN observations: {e}");
                    }
                }
                acks.push(ack);
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
        if let Ok(mut s) = self.status.write() {
            s.errors = errors;
            s.policies = policies;
        }
    }

    fn local_pods(&self) -> impl Iterator<Item = &policy_model::cluster::Pod> {
        self.cluster
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(self.node.as_str()))
    }

    /// Attaches the programs to the veths of local pods found in the routing table, and
    /// detaches them from pods that left. Returns whether anything changed.
    async fn discover(&mut self) -> bool {
        let mut changed = false;
        let local: BTreeMap<String, Vec<IpAddr>> = self
            .local_pods()
            .map(|p| (p.id(), p.all_ips().collect()))
            .collect();
        // pods that left (or moved): detach
        let gone: Vec<(String, String)> = self
            .veths
            .iter()
            .filter(|(p, _)| !local.contains_key(*p))
            .map(|(p, i)| (p.clone(), i.clone()))
            .collect();
        for (pod, iface) in gone {
            self.veths.remove(&pod);
            let r = self.with_dp(|dp| dp.detach(&iface));
            if let Err(e) = r {
                eprintln!("ward agent: detaching {iface} of {pod}: {e}");
                self.metrics.update_errors.inc();
            }
            changed = true;
        }
        for (pod, ips) in &local {
            let Some(ip) = ips.first() else { continue };
            if let Some(known) = self.veths.get(pod) {
                if self
                    .with_dp(|dp| Ok(dp.is_attached(known)))
                    .unwrap_or(false)
                {
                    continue;
                }
            }
            // A route through an uplink means the pod is not (yet) on this node's veths.
            let found = veth_of(&self.netlink, *ip)
                .await
                .filter(|i| !self.uplinks.contains(i));
            let known = self.veths.get(pod).cloned();
            match (found, known) {
                (Some(iface), known) => {
                    let fresh = known.as_deref() != Some(iface.as_str())
                        || !self
                            .with_dp(|dp| Ok(dp.is_attached(&iface)))
                            .unwrap_or(false);
                    if !fresh {
                        continue;
                    }
                    if let Some(old) = known.filter(|o| *o != iface) {
                        let _ = self.with_dp(|dp| dp.detach(&old));
                    }
                    match self.with_dp(|dp| dp.attach(&iface)) {
                        Ok(()) => {
                            self.veths.insert(pod.clone(), iface);
                            changed = true;
                        }
                        Err(e) => {
                            eprintln!("ward agent: attaching to {iface} of {pod}: {e}");
                            self.metrics.update_errors.inc();
                        }
                    }
                }
                (None, Some(_)) => {
                    // the veth went away with the pod's sandbox; its links went with it
                    self.veths.remove(pod);
                    changed = true;
                }
                (None, None) => {}
            }
        }
        changed
    }

    /// At start, after the first discovery: links pinned by an earlier run on interfaces
    /// that are no local pod's veth and no uplink any more (pods deleted while no agent
    /// ran) are removed, so that nothing is attached twice or forever.
    fn detach_leftovers(&mut self) {
        let attached = match self.with_dp(|dp| dp.attached_interfaces()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("ward agent: listing attachments: {e}");
                return;
            }
        };
        for iface in attached {
            if self.uplinks.contains(&iface) || self.veths.values().any(|v| *v == iface) {
                continue;
            }
            match self.with_dp(|dp| dp.detach(&iface)) {
                Ok(()) => eprintln!("ward agent: detached leftover links of {iface}"),
                Err(e) => {
                    eprintln!("ward agent: detaching leftover {iface}: {e}");
                    self.metrics.update_errors.inc();
                }
            }
        }
    }

    fn with_dp<T>(
        &self,
        f: impl FnOnce(&mut Datapath) -> Result<T, redirect_bpf::Error>,
    ) -> Result<T, redirect_bpf::Error> {
        let mut dp = match self.dp.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut dp)
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
        for (pod, ips) in pods {
            let Some(ep) = model.pod_endpoint(&pod) else {
                continue;
            };
            let id = self.ids.id(&pod, &ips, &recovered);
            let e = endpoint_entries(model, ep, id, self.ports);
            let identity = model.identities.get(ep.identity).id;
            let iface = self.veths.get(&pod).cloned();
            let ifx = iface.as_deref().map(ifindex).unwrap_or(0);
            let info = EndpointInfo {
                endpoint_id: id,
                identity,
                ifindex: ifx,
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
                attached: iface.is_some(),
                interface: iface,
                ifindex: ifx,
            });
        }
        d.ipcache = model.ipcache(Some(&self.node)).into_iter().collect();
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
        let (ips, added, endpoints) = self.apply_learned(&mut model);
        if self.identities.apply_new(&mut model, &added) {
            if let Err(e) = self.identities.save() {
                eprintln!("ward agent: saving the identity table: {e}");
            }
        }
        let mut desired = self.applied.clone();
        for ip in &ips {
            let net = ipnet::IpNet::from(*ip);
            match model.ipcache_entry(*ip, Some(&self.node)) {
                Some(id) => desired.ipcache.insert(net, id),
                None => desired.ipcache.remove(&net),
            };
        }
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
            let e = endpoint_entries(&model, ep, id, self.ports);
            if e.entries.is_empty() {
                desired.policy.remove(&id);
            } else {
                desired.policy.insert(id, e.entries.into_iter().collect());
            }
        }
        let result = {
            let mut dp = match self.dp.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            apply(&mut dp, &mut self.applied, &desired)
        };
        self.publish(model, start, None, result)
    }

    /// Applies the learned FQDN IPs that changed since `model` was built
    /// (`Model::set_fqdn_ips`). Returns the IPs whose identity moved, the identities
    /// that came into use, and the endpoints whose peers gained or lost one.
    fn apply_learned(
        &mut self,
        model: &mut Model,
    ) -> (BTreeSet<IpAddr>, Vec<Idx>, BTreeSet<EndpointKey>) {
        let mut ips = BTreeSet::new();
        let mut added = Vec::new();
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
            endpoints.extend(c.endpoints);
        }
        (ips, added, endpoints)
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
            &self.cluster,
            self.compile,
            || self.fqdn.to_cluster(),
            || self.store.policies(),
        );
        let mut model = next.model;
        let renumbered = match next.plan {
            Plan::Incremental => {
                self.metrics
                    .compiles
                    .with_label_values(&["incremental"])
                    .inc();
                // learned since the current model was built
                let (_, learned, _) = self.apply_learned(&mut model);
                let mut added = next.new_identities;
                added.extend(learned);
                let forgotten = self.identities.forget(&model, &next.retired);
                self.identities.apply_new(&mut model, &added) || forgotten
            }
            Plan::Full(why) => {
                self.metrics.compiles.with_label_values(&["full"]).inc();
                if why != rebuild::Full::NoModel && why != rebuild::Full::Policies {
                    eprintln!("ward agent: full compile: {why:?}");
                }
                // the compile took every learned observation
                self.learned_changes.clear();
                self.identities.apply(&mut model)
            }
        };
        if renumbered {
            if let Err(e) = self.identities.save() {
                eprintln!("ward agent: saving the identity table: {e}");
            }
        }
        let (desired, endpoints) = self.desired(&model);
        let dp = self.dp.clone();
        let result = {
            let mut dp = match dp.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let result = apply(&mut dp, &mut self.applied, &desired);
            if result.is_ok() {
                self.revoke_denied(&mut dp, &model);
            }
            result
        };
        self.publish(model, start, Some(endpoints), result)
    }

    /// Removes the conntrack entries of established flows that `model` denies on this
    /// node (`revoke`), once the datapath has the new policy: their next packet is
    /// decided again and dropped.
    fn revoke_denied(&self, dp: &mut redirect_bpf::Datapath, model: &Model) {
        let local: HashSet<IpAddr> = self.local_pods().flat_map(|p| p.all_ips()).collect();
        let enforced = super::revoke::Enforced {
            model,
            node: &self.node,
            local: &local,
        };
        match dp.revoke_conntrack(|f| enforced.denies(f)) {
            Ok(0) => {}
            Ok(n) => self.metrics.conntrack_revoked.inc_by(n as u64),
            Err(e) => eprintln!("ward agent: revoking denied flows from conntrack: {e}"),
        }
    }

    /// Hands `model` to the proxies and records the outcome of its datapath update in
    /// the metrics and the status (`endpoints`: None keeps the endpoints shown).
    fn publish(
        &mut self,
        model: Model,
        start: Instant,
        endpoints: Option<Vec<EndpointStatus>>,
        result: Result<usize, redirect_bpf::Error>,
    ) -> Result<(), String> {
        // The proxies get the model whatever the datapath did: they decide L7 and DNS.
        // They share one copy.
        let model = Arc::new(model);
        let generation = self.http.publish(model.clone());
        self.http_metrics
            .policy_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.dns.set_model(model.clone());
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
            let attached = endpoints.iter().filter(|e| e.attached).count();
            self.metrics
                .endpoints
                .set(i64::try_from(endpoints.len()).unwrap_or(i64::MAX));
            self.metrics
                .endpoints_attached
                .set(i64::try_from(attached).unwrap_or(i64::MAX));
        }
        self.metrics
            .fqdn_names
            .set(i64::try_from(self.fqdn.names()).unwrap_or(i64::MAX));
        self.failed = result.is_err();
        let outcome = match result {
            Ok(writes) => {
                self.metrics.map_writes.inc_by(writes as u64);
                Ok(())
            }
            Err(e) => {
                self.metrics.update_errors.inc();
                eprintln!("ward agent: datapath update failed: {e}");
                Err(e.to_string())
            }
        };
        if let Ok(mut s) = self.status.write() {
            s.pushes = generation;
            s.last_push_ms = elapsed.as_secs_f64() * 1000.0;
            if let Some(endpoints) = endpoints {
                s.endpoints = endpoints;
            }
            s.model = Some(model);
            s.learned = self.fqdn.learned.clone();
            s.map_entries = (
                self.applied.ipcache.len(),
                self.applied.endpoints.len(),
                self.applied.policy_len(),
            );
            match &outcome {
                Ok(()) => {
                    if !s.ready {
                        eprintln!(
                            "ward agent: ready: {} endpoints, {} policies, first push in {:.1} ms",
                            s.endpoints.len(),
                            s.policies,
                            s.last_push_ms
                        );
                    }
                    s.ready = true;
                    self.metrics.ready.set(1);
                }
                Err(e) => s.last_error = Some(e.clone()),
            }
        }
        outcome
    }

    /// Moves the kernel's drop counters to the metrics (the drop events themselves have
    /// a reader of their own, `drops::read`).
    fn read_drop_counters(&mut self) {
        let (counts, suppressed) = {
            let dp = match self.dp.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let counts: Vec<(u32, u64)> = (1..drop_reason::COUNT)
                .filter_map(|r| dp.drops(r).ok().map(|c| (r, c)))
                .collect();
            (counts, dp.events_suppressed().unwrap_or(0))
        };
        let mut by_name = BTreeMap::new();
        for (r, c) in counts {
            let seen = self.drops_seen.entry(r).or_insert(0);
            // Counters restart from zero when the maps are recreated.
            let delta = c.checked_sub(*seen).unwrap_or(c);
            if delta > 0 {
                self.metrics
                    .drops
                    .with_label_values(&[reason_name(r)])
                    .inc_by(delta);
            }
            *seen = c;
            *by_name.entry(reason_name(r)).or_insert(0) += c;
        }
        self.metrics
            .events_suppressed
            .set(i64::try_from(suppressed).unwrap_or(i64::MAX));
        if let Ok(mut s) = self.status.write() {
            s.drops = by_name;
        }
    }
}

/// The next route or link change of the node's namespace; never, once the watch ended
/// (its socket failed: the periodic re-check goes on alone).
async fn net_change(net: &mut Option<NetChanges>) -> NetChange {
    if let Some(changes) = net {
        if let Some(c) = changes.next().await {
            return c;
        }
        tracing::warn!(
            "the netlink watch of routes and links ended: endpoints are looked for only \
             by the periodic re-check from now on"
        );
        *net = None;
    }
    std::future::pending().await
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
