//! The reconciler: applies watcher events of every watched kind to an in-memory cache of
//! trimmed objects and builds full `Snapshot`s from it. Pure (no I/O), so unit tests
//! feed it events directly.
//!
//! Objects are converted on arrival to what Ward needs (a pod keeps its name, namespace,
//! labels, IPs, node and container ports; managed fields, specs and statuses are
//! dropped), so the per-node cache of every pod in the cluster stays small. This is the
//! reflector pattern with the trimming done at conversion rather than with
//! `reflector(...).modify()` on full objects.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ::kube::api::{ApiResource, DynamicObject};
use ::kube::runtime::watcher::Event;
use policy_model::api::{self, Object};
use policy_model::cluster::{self, ContainerPort, Namespace, Node, Pod};
use policy_model::{Cluster, PolicyError};
use serde_json::Value;

use crate::source::Snapshot;

/// A kind the Kubernetes source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchKind {
    Namespace,
    Pod,
    Node,
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    /// ServiceAccounts, for their labels (Calico selects them).
    ServiceAccount,
    /// Calico's objects as stored in its `crd.projectcalico.org/v1` CRDs.
    CalicoNetworkPolicy,
    CalicoGlobalNetworkPolicy,
    CalicoTier,
}

impl WatchKind {
    pub const ALL: [WatchKind; 12] = [
        WatchKind::Namespace,
        WatchKind::Pod,
        WatchKind::Node,
        WatchKind::NetworkPolicy,
        WatchKind::CiliumNetworkPolicy,
        WatchKind::CiliumClusterwideNetworkPolicy,
        WatchKind::AdminNetworkPolicy,
        WatchKind::BaselineAdminNetworkPolicy,
        WatchKind::ServiceAccount,
        WatchKind::CalicoNetworkPolicy,
        WatchKind::CalicoGlobalNetworkPolicy,
        WatchKind::CalicoTier,
    ];

    /// (group, version, kind, plural)
    fn gvkp(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            WatchKind::Namespace => ("", "v1", "Namespace", "namespaces"),
            WatchKind::Pod => ("", "v1", "Pod", "pods"),
            WatchKind::Node => ("", "v1", "Node", "nodes"),
            WatchKind::NetworkPolicy => (
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
            WatchKind::CiliumNetworkPolicy => (
                "cilium.io",
                "v2",
                "CiliumNetworkPolicy",
                "ciliumnetworkpolicies",
            ),
            WatchKind::CiliumClusterwideNetworkPolicy => (
                "cilium.io",
                "v2",
                "CiliumClusterwideNetworkPolicy",
                "ciliumclusterwidenetworkpolicies",
            ),
            WatchKind::AdminNetworkPolicy => (
                "policy.networking.k8s.io",
                "v1alpha1",
                "AdminNetworkPolicy",
                "adminnetworkpolicies",
            ),
            WatchKind::BaselineAdminNetworkPolicy => (
                "policy.networking.k8s.io",
                "v1alpha1",
                "BaselineAdminNetworkPolicy",
                "baselineadminnetworkpolicies",
            ),
            WatchKind::ServiceAccount => ("", "v1", "ServiceAccount", "serviceaccounts"),
            WatchKind::CalicoNetworkPolicy => (
                "crd.projectcalico.org",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
            WatchKind::CalicoGlobalNetworkPolicy => (
                "crd.projectcalico.org",
                "v1",
                "GlobalNetworkPolicy",
                "globalnetworkpolicies",
            ),
            WatchKind::CalicoTier => ("crd.projectcalico.org", "v1", "Tier", "tiers"),
        }
    }

    /// What kube's dynamic API needs to list and watch this kind.
    pub fn api_resource(self) -> ApiResource {
        let (group, version, kind, plural) = self.gvkp();
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() {
                version.into()
            } else {
                format!("{group}/{version}")
            },
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// Kinds whose status Ward writes (the `Valid` condition).
    pub fn has_valid_status(self) -> bool {
        matches!(
            self,
            WatchKind::CiliumNetworkPolicy | WatchKind::CiliumClusterwideNetworkPolicy
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            WatchKind::CalicoNetworkPolicy => "CalicoNetworkPolicy",
            _ => self.gvkp().2,
        }
    }
}

/// What a watcher task reports.
// An update moves once, from a watcher task to the reconciler; boxing the common
// variant would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Update {
    Event(Event<DynamicObject>),
    /// The API server does not serve the kind (404: its CRD is not installed).
    Missing,
    /// Any other error; the watcher retries with backoff.
    Failed(String),
}

/// The `Valid` condition as found on an object or as Ward wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    pub valid: bool,
    pub message: String,
}

/// A policy object as cached: parsed (or the errors of parsing), plus what Ward needs to
/// write its status.
#[derive(Clone, Debug)]
pub struct PolicyItem {
    pub kind: WatchKind,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: Option<String>,
    pub object: Option<Object>,
    /// Errors of parsing (unknown fields, wrong types); validation errors come from
    /// `object.translate()`.
    pub parse_errors: Vec<PolicyError>,
    /// `status.conditions` as found, to keep the ones Ward does not own.
    pub conditions: Vec<Value>,
}

impl PolicyItem {
    /// The `Valid` condition currently on the object.
    pub fn observed(&self) -> Option<Validity> {
        self.conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some("Valid"))
            .map(|c| Validity {
                valid: c.get("status").and_then(Value::as_str) == Some("True"),
                message: c
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })
    }

    /// The `Valid` condition the object should have.
    pub fn desired(&self) -> Validity {
        let errors = match &self.object {
            None => self.parse_errors.clone(),
            Some(o) => o.translate().err().unwrap_or_default(),
        };
        if errors.is_empty() {
            Validity {
                valid: true,
                message: "the policy is valid and enforced".into(),
            }
        } else {
            let msgs: Vec<String> = errors
                .iter()
                .map(|e| {
                    if e.path.is_empty() {
                        e.reason.clone()
                    } else {
                        format!("{}: {}", e.path, e.reason)
                    }
                })
                .collect();
            Validity {
                valid: false,
                message: msgs.join("; "),
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Item {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    ServiceAccount(cluster::ServiceAccount),
    Policy(Box<PolicyItem>),
}

#[derive(Debug, Default)]
struct KindState {
    items: BTreeMap<String, Item>,
    /// Objects of a (re-)list in progress; they replace `items` at `InitDone`.
    init: Option<BTreeMap<String, Item>>,
    synced: bool,
    missing: bool,
}

/// The cache of every watched kind.
#[derive(Debug)]
pub struct State {
    kinds: BTreeMap<WatchKind, KindState>,
}

/// What applying an update did, for logs.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The cache changed.
    Changed,
    /// Nothing visible changed.
    Unchanged,
    /// The kind is not served; report once.
    NewlyMissing,
}

impl State {
    pub fn new(kinds: &[WatchKind]) -> State {
        State {
            kinds: kinds.iter().map(|k| (*k, KindState::default())).collect(),
        }
    }

    /// Applies one update of `kind`.
    pub fn apply(&mut self, kind: WatchKind, update: Update) -> Applied {
        let Some(ks) = self.kinds.get_mut(&kind) else {
            return Applied::Unchanged;
        };
        match update {
            Update::Missing => {
                let newly = !ks.missing;
                ks.missing = true;
                ks.init = None;
                let had = !ks.items.is_empty();
                ks.items.clear();
                if newly {
                    Applied::NewlyMissing
                } else if had {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
            Update::Failed(_) => Applied::Unchanged,
            Update::Event(ev) => {
                ks.missing = false;
                match ev {
                    Event::Init => {
                        ks.init = Some(BTreeMap::new());
                        Applied::Unchanged
                    }
                    Event::InitApply(o) => {
                        if let Some((key, item)) = convert(kind, &o) {
                            ks.init.get_or_insert_with(BTreeMap::new).insert(key, item);
                        }
                        Applied::Unchanged
                    }
                    Event::InitDone => {
                        ks.items = ks.init.take().unwrap_or_default();
                        ks.synced = true;
                        Applied::Changed
                    }
                    Event::Apply(o) => {
                        let key = key_of(&o);
                        match convert(kind, &o) {
                            Some((key, item)) => {
                                ks.items.insert(key, item);
                            }
                            None => {
                                ks.items.remove(&key);
                            }
                        }
                        Applied::Changed
                    }
                    Event::Delete(o) => {
                        if ks.items.remove(&key_of(&o)).is_some() {
                            Applied::Changed
                        } else {
                            Applied::Unchanged
                        }
                    }
                }
            }
        }
    }

    /// Whether every kind finished its initial listing (or is not served).
    pub fn ready(&self) -> bool {
        self.kinds.values().all(|k| k.synced || k.missing)
    }

    /// Kinds not yet synced.
    #[cfg(test)]
    pub fn waiting_for(&self) -> Vec<WatchKind> {
        self.kinds
            .iter()
            .filter(|(_, k)| !(k.synced || k.missing))
            .map(|(kind, _)| *kind)
            .collect()
    }

    /// Every cached policy object.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyItem> {
        self.kinds.values().flat_map(|k| {
            k.items.values().filter_map(|i| match i {
                Item::Policy(p) => Some(p.as_ref()),
                _ => None,
            })
        })
    }

    /// The full state as a source snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let mut cluster = Cluster::default();
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        for ks in self.kinds.values() {
            for item in ks.items.values() {
                match item {
                    Item::Namespace(n) => cluster.namespaces.push(n.clone()),
                    Item::Pod(p) => cluster.pods.push(p.clone()),
                    Item::Node(n) => cluster.nodes.push(n.clone()),
                    Item::ServiceAccount(sa) => cluster.service_accounts.push(sa.clone()),
                    Item::Policy(p) => {
                        objects.extend(p.object.clone());
                        errors.extend(p.parse_errors.iter().cloned());
                    }
                }
            }
        }
        Snapshot {
            cluster,
            objects,
            errors,
        }
    }
}

fn key_of(o: &DynamicObject) -> String {
    format!(
        "{}/{}",
        o.metadata.namespace.as_deref().unwrap_or_default(),
        o.metadata.name.as_deref().unwrap_or_default()
    )
}

fn labels(o: &DynamicObject) -> BTreeMap<String, String> {
    o.metadata.labels.clone().unwrap_or_default()
}

/// Converts an object to what Ward keeps; `None` for objects that are no endpoints
/// (host-network pods, finished pods, nodes without an address).
fn convert(kind: WatchKind, o: &DynamicObject) -> Option<(String, Item)> {
    let key = key_of(o);
    let name = o.metadata.name.clone().unwrap_or_default();
    let item = match kind {
        WatchKind::Namespace => Item::Namespace(Namespace {
            name,
            labels: labels(o),
        }),
        WatchKind::Pod => Item::Pod(pod(o, name)?),
        WatchKind::Node => Item::Node(node(o, name)?),
        WatchKind::ServiceAccount => Item::ServiceAccount(cluster::ServiceAccount {
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name,
            labels: labels(o),
        }),
        _ => Item::Policy(Box::new(policy(kind, o, name))),
    };
    Some((key, item))
}

fn pod(o: &DynamicObject, name: String) -> Option<Pod> {
    let spec = o.data.get("spec");
    let status = o.data.get("status");
    if spec
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return None;
    }
    let phase = status.and_then(|s| s.get("phase")).and_then(Value::as_str);
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.get("podIPs"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("ip")?.as_str()?.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.get("podIP"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<IpAddr>().ok())
    {
        ips.retain(|i| *i != ip);
        ips.insert(0, ip);
    }
    let mut ports = Vec::new();
    for c in spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(port) = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
            else {
                continue;
            };
            let protocol = p
                .get("protocol")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or(policy_model::policy::Protocol::Tcp);
            ports.push(ContainerPort {
                name: p.get("name").and_then(Value::as_str).map(str::to_string),
                port,
                protocol,
            });
        }
    }
    let mut ips = ips.into_iter();
    Some(Pod {
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name,
        labels: labels(o),
        ip: ips.next(),
        ips: ips.collect(),
        node: spec
            .and_then(|s| s.get("nodeName"))
            .and_then(Value::as_str)
            .map(str::to_string),
        ports,
        tls: None,
        service_account: spec
            .and_then(|s| s.get("serviceAccountName"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    })
}

fn node(o: &DynamicObject, name: String) -> Option<Node> {
    let addrs = o
        .data
        .get("status")
        .and_then(|s| s.get("addresses"))
        .and_then(Value::as_array)?;
    let ip = addrs
        .iter()
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
        .chain(addrs.iter())
        .find_map(|a| a.get("address")?.as_str()?.parse().ok())?;
    Some(cluster::Node {
        name,
        ip,
        labels: labels(o),
    })
}

fn policy(kind: WatchKind, o: &DynamicObject, name: String) -> PolicyItem {
    let ar = kind.api_resource();
    let conditions = o
        .data
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Only what the policy parser reads: type, name, namespace, spec(s).
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), name.clone().into());
    if let Some(ns) = &o.metadata.namespace {
        metadata.insert("namespace".into(), ns.clone().into());
    }
    let mut value = serde_json::Map::new();
    value.insert("apiVersion".into(), ar.api_version.into());
    value.insert("kind".into(), ar.kind.into());
    value.insert("metadata".into(), metadata.into());
    for k in ["spec", "specs"] {
        if let Some(v) = o.data.get(k) {
            value.insert(k.into(), v.clone());
        }
    }
    let label = match &o.metadata.namespace {
        Some(ns) => format!("{} {ns}/{name}", kind.name()),
        None => format!("{} {name}", kind.name()),
    };
    let (object, parse_errors) = match serde_yaml::to_value(Value::Object(value)) {
        Ok(v) => {
            let p = api::parse_value(v, None);
            (p.objects.into_iter().next(), p.errors)
        }
        Err(e) => (
            None,
            vec![PolicyError {
                file: None,
                line: None,
                object: Some(label),
                path: String::new(),
                reason: format!("cannot convert the object: {e}"),
            }],
        ),
    };
    PolicyItem {
        kind,
        namespace: o.metadata.namespace.clone(),
        name,
        uid: o.metadata.uid.clone(),
        object,
        parse_errors,
        conditions,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn pod_obj(ns: &str, name: &str, ip: &str, node: &str, app: &str) -> DynamicObject {
        obj(json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::1"}]},
        }))
    }

    fn cnp(name: &str, spec: Value) -> DynamicObject {
        obj(json!({"metadata": {"name": name, "namespace": "a"}, "spec": spec}))
    }

    fn sync_all(s: &mut State, except: &[WatchKind]) {
        for k in WatchKind::ALL {
            if !except.contains(&k) {
                s.apply(k, Update::Event(Event::Init));
                s.apply(k, Update::Event(Event::InitDone));
            }
        }
    }

    #[test]
    fn ready_only_after_every_kind_synced_or_missing() {
        let mut s = State::new(&WatchKind::ALL);
        assert!(!s.ready());
        sync_all(&mut s, &[WatchKind::AdminNetworkPolicy]);
        assert!(!s.ready());
        assert_eq!(s.waiting_for(), vec![WatchKind::AdminNetworkPolicy]);
        assert_eq!(
            s.apply(WatchKind::AdminNetworkPolicy, Update::Missing),
            Applied::NewlyMissing
        );
        assert!(
            s.ready(),
            "a CRD that is not installed does not block readiness"
        );
        assert_eq!(
            s.apply(WatchKind::AdminNetworkPolicy, Update::Missing),
            Applied::Unchanged,
            "reported once"
        );
        // the CRD appears: its objects arrive
        s.apply(WatchKind::AdminNetworkPolicy, Update::Event(Event::Init));
        s.apply(
            WatchKind::AdminNetworkPolicy,
            Update::Event(Event::InitDone),
        );
        assert!(s.ready());
    }

    #[test]
    fn pods_are_trimmed_and_host_network_or_finished_pods_skipped() {
        let mut s = State::new(&[WatchKind::Pod]);
        s.apply(WatchKind::Pod, Update::Event(Event::Init));
        s.apply(
            WatchKind::Pod,
            Update::Event(Event::InitApply(pod_obj("a", "p", "10.0.0.1", "n1", "web"))),
        );
        let mut host = pod_obj("a", "h", "192.0.2.1", "n1", "host");
        host.data["spec"]["hostNetwork"] = json!(true);
        s.apply(WatchKind::Pod, Update::Event(Event::InitApply(host)));
        let mut done = pod_obj("a", "d", "10.0.0.9", "n1", "job");
        done.data["status"]["phase"] = json!("Succeeded");
        s.apply(WatchKind::Pod, Update::Event(Event::InitApply(done)));
        assert!(
            s.snapshot().cluster.pods.is_empty(),
            "buffered until InitDone"
        );
        s.apply(WatchKind::Pod, Update::Event(Event::InitDone));
        let snap = s.snapshot();
        assert_eq!(snap.cluster.pods.len(), 1);
        let p = &snap.cluster.pods[0];
        assert_eq!(p.ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p.ips, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.ports[0].name.as_deref(), Some("http"));
        assert_eq!(p.ports[0].port, 8080);
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn a_relist_replaces_everything_and_deletes_what_is_gone() {
        let mut s = State::new(&[WatchKind::Pod]);
        s.apply(WatchKind::Pod, Update::Event(Event::Init));
        for (n, ip) in [("p", "10.0.0.1"), ("q", "10.0.0.2")] {
            s.apply(
                WatchKind::Pod,
                Update::Event(Event::InitApply(pod_obj("a", n, ip, "n1", n))),
            );
        }
        s.apply(WatchKind::Pod, Update::Event(Event::InitDone));
        assert_eq!(s.snapshot().cluster.pods.len(), 2);
        // after 410 Gone the watcher lists again; q was deleted meanwhile
        s.apply(WatchKind::Pod, Update::Event(Event::Init));
        s.apply(
            WatchKind::Pod,
            Update::Event(Event::InitApply(pod_obj("a", "p", "10.0.0.1", "n1", "p"))),
        );
        assert_eq!(
            s.snapshot().cluster.pods.len(),
            2,
            "old state until InitDone"
        );
        s.apply(WatchKind::Pod, Update::Event(Event::InitDone));
        let pods = s.snapshot().cluster.pods;
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].name, "p");
        // a pod that gets host networking (or finishes) leaves
        let mut p = pod_obj("a", "p", "10.0.0.1", "n1", "p");
        p.data["status"]["phase"] = json!("Failed");
        assert_eq!(
            s.apply(WatchKind::Pod, Update::Event(Event::Apply(p))),
            Applied::Changed
        );
        assert!(s.snapshot().cluster.pods.is_empty());
    }

    #[test]
    fn policies_compile_from_watch_events_and_invalid_ones_report() {
        let mut s = State::new(&WatchKind::ALL);
        sync_all(&mut s, &[]);
        s.apply(
            WatchKind::Namespace,
            Update::Event(Event::Apply(obj(json!({"metadata": {"name": "a"}})))),
        );
        s.apply(
            WatchKind::Pod,
            Update::Event(Event::Apply(pod_obj("a", "web", "10.0.0.1", "n1", "web"))),
        );
        s.apply(
            WatchKind::Pod,
            Update::Event(Event::Apply(pod_obj("a", "db", "10.0.0.2", "n1", "db"))),
        );
        s.apply(
            WatchKind::CiliumNetworkPolicy,
            Update::Event(Event::Apply(cnp(
                "db-from-web",
                json!({"endpointSelector": {"matchLabels": {"app": "db"}},
                       "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}],
                                    "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]}),
            ))),
        );
        s.apply(
            WatchKind::CiliumNetworkPolicy,
            Update::Event(Event::Apply(cnp(
                "bad",
                json!({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}),
            ))),
        );
        let snap = s.snapshot();
        assert_eq!(snap.objects.len(), 2);
        let (policies, errors) = {
            let mut store = crate::store::PolicyStore::default();
            store.replace_all(&snap.objects, snap.errors.clone());
            (store.policies(), store.errors())
        };
        assert_eq!(policies.len(), 1, "the valid policy is in force");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].path.contains("toPorts[0].ports[0].port"),
            "{errors:?}"
        );
        // the compiled verdict: web may reach db on 5432, not on another port
        let policies = policies.iter().map(|p| (**p).clone()).collect();
        let model = policy_model::Model::compile(&snap.cluster, policies, Default::default());
        let pod = |n: &str| policy_model::EndpointRef::Pod {
            namespace: "a".into(),
            name: n.into(),
        };
        let ask = |port| {
            model
                .query(&policy_model::Query {
                    from: pod("web"),
                    to: pod("db"),
                    port,
                    protocol: policy_model::Protocol::Tcp,
                    http: None,
                    dns: None,
                })
                .unwrap()
                .allowed
        };
        assert!(ask(5432));
        assert!(!ask(5433));

        let bad = s.policies().find(|p| p.name == "bad").unwrap();
        let want = bad.desired();
        assert!(!want.valid);
        assert!(want.message.contains("out of range"), "{}", want.message);
        assert_eq!(bad.observed(), None);
        let good = s.policies().find(|p| p.name == "db-from-web").unwrap();
        assert!(good.desired().valid);

        // deleting a policy removes it
        s.apply(
            WatchKind::CiliumNetworkPolicy,
            Update::Event(Event::Delete(cnp("bad", json!({})))),
        );
        assert_eq!(s.snapshot().objects.len(), 1);
    }

    #[test]
    fn unknown_fields_are_parse_errors_naming_the_object() {
        let mut s = State::new(&[WatchKind::CiliumNetworkPolicy]);
        s.apply(
            WatchKind::CiliumNetworkPolicy,
            Update::Event(Event::Apply(cnp(
                "typo",
                json!({"endpointSelector": {}, "ingres": []}),
            ))),
        );
        let snap = s.snapshot();
        assert!(snap.objects.is_empty());
        assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
        assert_eq!(
            snap.errors[0].object.as_deref(),
            Some("CiliumNetworkPolicy a/typo")
        );
        let item = s.policies().next().unwrap();
        assert!(!item.desired().valid);
    }

    #[test]
    fn the_observed_condition_is_read_from_status() {
        let mut s = State::new(&[WatchKind::CiliumClusterwideNetworkPolicy]);
        s.apply(
            WatchKind::CiliumClusterwideNetworkPolicy,
            Update::Event(Event::Apply(obj(json!({
                "metadata": {"name": "c"},
                "spec": {"endpointSelector": {}},
                "status": {"conditions": [{"type": "Valid", "status": "True", "message": "ok"}]},
            })))),
        );
        let item = s.policies().next().unwrap();
        assert_eq!(
            item.observed(),
            Some(Validity {
                valid: true,
                message: "ok".into()
            })
        );
    }
}
