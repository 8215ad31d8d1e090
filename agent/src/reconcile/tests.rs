//! The reconcile tasks together on the in-memory datapath (`FakeDatapath`), without root:
//! what a policy change writes, when a DNS hand-off is confirmed, which established flows
//! a change revokes, what a restart on recovered maps rewrites, that the DNS lane does
//! not wait for endpoint discovery, that a route or link change wakes discovery, and that
//! drop events reach the event stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dns_proxy::{DatapathSink, SelectorIps, Update};
use policy_model::{CompileOptions, Model};
use redirect_bpf::common::{ct_flags, drop_reason, DropEvent, DIR_INGRESS};
use redirect_bpf::{ConntrackFlow, PolicyEntry, ProxyPorts};
use tokio::sync::mpsc;

use super::attacher::{Discovery, Wakeups};
use super::conntrack::Sweep;
use super::fqdn::Observations;
use super::identities::StableIds;
use super::maps::MapState;
use super::publisher::{Proxies, Start};
use super::*;
use crate::datapath::fake::Op;
use crate::datapath::{FakeDatapath, Shared};
use crate::source::{BoxFuture, Snapshot};
use crate::telemetry::events::Events;
use crate::telemetry::metrics::AgentMetrics;

const CLIENT: &str = "10.80.1.2";
const SERVER: &str = "10.80.2.2";
const EXT: &str = "203.0.113.7";

const CLUSTER: &str = r#"
namespaces: [{name: app}]
nodes: [{name: n1, ip: 192.0.2.1}]
pods:
- {namespace: app, name: client, ip: 10.80.1.2, node: n1, labels: {app: client}}
- {namespace: app, name: server, ip: 10.80.2.2, node: n1, labels: {app: server}}
"#;

/// The server's ingress: TCP `ports` from the client.
fn server_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| format!("{{port: \"{p}\", protocol: TCP}}"))
        .collect();
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: server-ingress, namespace: app}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{}]}}]
"#,
        ports.join(", ")
    )
}

/// The client's egress: DNS anywhere, TCP 443 to ext.example.com.
const CLIENT_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*"}]
  - toFQDNs: [{matchName: ext.example.com}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
"#;

fn snapshot(policies: &[&str]) -> Snapshot {
    let mut snap = Snapshot {
        cluster: serde_yaml::from_str(CLUSTER).unwrap(),
        ..Snapshot::default()
    };
    for p in policies {
        let parsed = policy_model::api::parse(p, Some("test.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        snap.objects.extend(parsed.objects);
    }
    snap
}

/// The interfaces of the pods, as the node's routes would show them; `blocked`: every
/// lookup hangs forever. `lookups` counts the lookups.
#[derive(Clone, Default)]
struct FakeRoutes {
    routes: Arc<Mutex<BTreeMap<IpAddr, String>>>,
    blocked: bool,
    lookups: Arc<AtomicUsize>,
}

impl FakeRoutes {
    fn of_the_pods() -> FakeRoutes {
        let r = FakeRoutes::default();
        r.route(CLIENT, "veth-client");
        r.route(SERVER, "veth-server");
        r
    }

    fn route(&self, ip: &str, iface: &str) {
        self.routes
            .lock()
            .unwrap()
            .insert(ip.parse().unwrap(), iface.into());
    }
}

impl Discovery for FakeRoutes {
    fn interface_of(&self, ip: IpAddr) -> BoxFuture<'_, Option<String>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.blocked {
            return Box::pin(std::future::pending());
        }
        let found = self.routes.lock().unwrap().get(&ip).cloned();
        Box::pin(async move { found })
    }

    fn ifindex(&self, iface: &str) -> u32 {
        match iface {
            "veth-client" => 11,
            "veth-server" => 12,
            _ => 99,
        }
    }
}

/// Counts the models handed to the proxies.
struct CountingProxies(u64);

impl Proxies for CountingProxies {
    fn publish(&mut self, _model: &Arc<Model>) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A node's reconcile tasks on `dp`, with their state directory.
struct Node {
    dp: Shared<FakeDatapath>,
    handles: Handles,
    lane: dns::Lane,
    events: Events,
}

impl Node {
    /// The tasks with discovery re-checked every 20 ms, and no wake-ups.
    fn start(dp: &Shared<FakeDatapath>, state: &Path, routes: FakeRoutes) -> Node {
        Node::start_woken(dp, state, routes, None, Duration::from_millis(20))
    }

    /// The tasks with discovery woken by `wakeups` and re-checked every `recheck`.
    fn start_woken(
        dp: &Shared<FakeDatapath>,
        state: &Path,
        routes: FakeRoutes,
        wakeups: Option<Wakeups>,
        recheck: Duration,
    ) -> Node {
        let applied = MapState::read(&*dp.lock()).unwrap();
        let drop_events = dp.lock().take_drop_events();
        let events = Events::new();
        let (lane, lane_rx) = dns::lane();
        let handles = spawn(
            Start {
                node: "n1".into(),
                dp: dp.clone(),
                applied,
                fqdn: Observations::load(state, &state.join("dns")),
                identities: StableIds::load(state),
                ports: ProxyPorts {
                    http: 15001,
                    dns: 15053,
                },
                compile: CompileOptions::default(),
                proxies: CountingProxies(0),
                metrics: AgentMetrics::new().unwrap(),
            },
            Wiring {
                discovery: routes,
                wakeups,
                uplinks: Vec::new(),
                drop_events: Box::new(drop_events),
                conntrack: Box::new(dp.clone()),
                audit: crate::telemetry::audit::start(
                    64,
                    crate::telemetry::audit::AuditSink::None,
                    events.clone(),
                    audit::DroppedCounter::new(),
                ),
                timing: Timing {
                    endpoint_recheck: recheck,
                    counters: Duration::from_millis(20),
                    sweep: Sweep {
                        every: Duration::from_secs(3600),
                        ..Sweep::default()
                    },
                },
                dns: lane_rx,
            },
        );
        Node {
            dp: dp.clone(),
            handles,
            lane,
            events,
        }
    }

    async fn send(&self, snap: Snapshot) {
        self.handles.snapshots.send(snap).await.unwrap();
    }

    /// Waits for the status to satisfy `cond`.
    async fn wait_status(&self, what: &str, cond: impl Fn(&publisher::PolicyStatus) -> bool) {
        let mut rx = self.handles.status.clone();
        within(what, rx.wait_for(|s| cond(s))).await.unwrap();
    }

    async fn ready(&self) {
        self.wait_status("ready", |s| s.ready).await;
    }

    /// Sends `snap` and waits until the model it makes is published.
    async fn push(&self, snap: Snapshot) {
        let before = self.handles.status.borrow().generation;
        self.send(snap).await;
        self.wait_status("the next push", |s| s.generation > before)
            .await;
    }

    fn journal(&self) -> Vec<Op> {
        self.dp.lock().take_journal()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.handles.abort();
    }
}

/// `f`, or a panic naming `what` after five seconds.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` until it holds, for at most five seconds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

fn learned(ip: &str) -> Update {
    Update {
        endpoint: "app/client".into(),
        name: "ext.example.com.".into(),
        add: vec![SelectorIps {
            selector: "ext.example.com.".into(),
            label: "fqdn:ext.example.com.".into(),
            ips: vec![ip.parse().unwrap()],
        }],
        remove: Vec::new(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ports(entries: &[PolicyEntry]) -> Vec<u16> {
    entries.iter().map(|e| e.port).collect()
}

#[tokio::test]
async fn a_policy_change_writes_exactly_its_diff_adds_before_removes() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[&server_policy(&[8080])])).await;
    node.ready().await;
    let server_id = dp.lock().endpoints[&ip(SERVER)].endpoint_id;
    node.journal();

    node.push(snapshot(&[&server_policy(&[8081])])).await;
    let writes: Vec<Op> = node
        .journal()
        .into_iter()
        .filter(Op::is_map_write)
        .collect();
    let [Op::InsertPolicy(added), Op::RemovePolicy(removed)] = writes.as_slice() else {
        panic!("expected one insert, then one removal: {writes:#?}");
    };
    assert_eq!(ports(added), vec![8081], "{added:?}");
    assert_eq!(ports(removed), vec![8080], "{removed:?}");
    for e in added.iter().chain(removed) {
        assert_eq!(e.endpoint_id, server_id);
        assert_eq!(e.direction, DIR_INGRESS);
        assert_eq!(e.protocol, 6);
    }
    assert_eq!(added[0].peer, removed[0].peer, "the client's class");
}

#[tokio::test]
async fn learned_ips_are_confirmed_only_after_the_datapath_has_them() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[CLIENT_POLICY])).await;
    node.ready().await;
    let client_id = dp.lock().endpoints[&ip(CLIENT)].endpoint_id;
    node.journal();

    within("the confirmation", node.lane.apply(learned(EXT)))
        .await
        .unwrap();
    dp.lock().mark("confirmed");
    let journal = node.journal();
    let at = |f: &dyn Fn(&Op) -> bool| journal.iter().position(f);
    let confirmed = at(&|o| matches!(o, Op::Mark(m) if m == "confirmed")).unwrap();
    let ipcache = at(&|o| matches!(o, Op::SetIpcache(n, _) if n.addr() == ip(EXT)))
        .unwrap_or_else(|| panic!("no ipcache entry for {EXT}: {journal:#?}"));
    let allowed = at(&|o| {
        matches!(o, Op::InsertPolicy(es)
            if es.iter().any(|e| e.endpoint_id == client_id && e.port == 443))
    })
    .unwrap_or_else(|| panic!("no policy entry for port 443: {journal:#?}"));
    assert!(ipcache < confirmed && allowed < confirmed, "{journal:#?}");

    // A write that fails is not confirmed: the DNS proxy hears of it.
    dp.lock().fail_writes = 1;
    let r = within("the answer", node.lane.apply(learned("203.0.113.8"))).await;
    assert!(r.is_err(), "a failed write was confirmed");
    // and the publisher tries again until the maps have it
    until("the retry", || {
        dp.lock()
            .ipcache
            .keys()
            .any(|n| n.addr() == ip("203.0.113.8"))
    })
    .await;
}

#[tokio::test]
async fn a_new_class_is_complete_before_an_identity_moves_in() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[CLIENT_POLICY])).await;
    node.ready().await;
    node.journal();

    // The first address of ext.example.com: its identity is the first the FQDN selector
    // holds, a class of its own, whose entries are written before the identity is put
    // in it.
    within("the confirmation", node.lane.apply(learned(EXT)))
        .await
        .unwrap();
    let journal = node.journal();
    let identity = |addr: &str| {
        let dp = dp.lock();
        *dp.ipcache
            .iter()
            .find(|(n, _)| n.addr() == ip(addr))
            .unwrap_or_else(|| panic!("no ipcache entry for {addr}"))
            .1
    };
    let ext = identity(EXT);
    let class = dp.lock().peer_classes[&ext];
    let at = |f: &dyn Fn(&Op) -> bool| journal.iter().position(f);
    let moved = at(&|o| matches!(o, Op::SetPeerClass(i, c) if *i == ext && *c == class))
        .unwrap_or_else(|| panic!("{ext} not put in class {class}: {journal:#?}"));
    let entries = at(&|o| {
        matches!(o, Op::InsertPolicy(es) if es.iter().any(|e| e.peer == class && e.port == 443))
    })
    .unwrap_or_else(|| panic!("no entry of class {class} for 443: {journal:#?}"));
    assert!(entries < moved, "{journal:#?}");
}

#[tokio::test]
async fn a_pod_the_policies_treat_like_others_joins_their_class_without_entries() {
    const CLUSTER_WIDE: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[CLUSTER_WIDE])).await;
    node.ready().await;
    node.journal();

    // A pod of new labels on another node: a new identity, admitted like the client.
    let mut more = snapshot(&[CLUSTER_WIDE]);
    more.cluster = serde_yaml::from_str(&format!(
        "{CLUSTER}- {{namespace: app, name: batch, ip: 10.80.3.2, node: n2, labels: {{app: batch}}}}\n"
    ))
    .unwrap();
    node.push(more).await;
    let journal = node.journal();
    let dp = dp.lock();
    let identity_of = |addr: &str| {
        *dp.ipcache
            .iter()
            .find(|(n, _)| n.addr() == ip(addr))
            .unwrap_or_else(|| panic!("no ipcache entry for {addr}"))
            .1
    };
    let batch = identity_of("10.80.3.2");
    assert_ne!(batch, identity_of(CLIENT));
    assert_eq!(
        dp.peer_classes.get(&batch),
        dp.peer_classes.get(&identity_of(CLIENT)),
        "{:?}",
        dp.peer_classes
    );
    assert!(
        !journal
            .iter()
            .any(|o| matches!(o, Op::InsertPolicy(_) | Op::RemovePolicy(_))),
        "{journal:#?}"
    );
}

fn flow(dport: u16, protocol: u8, flags: u32) -> ConntrackFlow {
    ConntrackFlow {
        src: ip(CLIENT),
        dst: ip(SERVER),
        dport,
        protocol,
        flags,
        last_seen_ns: 0,
    }
}

#[tokio::test]
async fn established_flows_a_change_denies_are_revoked_after_the_write() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[&server_policy(&[8080, 8081])])).await;
    node.ready().await;
    // the first model's revocation walk (the conntrack task runs on its own thread) is
    // done before the flows are there
    until("the first revocation walk", || dp.lock().revocations == 1).await;
    let proxied = flow(8080, 6, ct_flags::PROXIED);
    dp.lock().conntrack = vec![
        flow(8080, 6, 0),
        flow(8081, 6, 0),
        flow(8080, 17, 0),
        proxied,
    ];
    node.journal();

    node.push(snapshot(&[&server_policy(&[8081])])).await;
    until("the revocation", || dp.lock().conntrack.len() == 2).await;
    assert_eq!(dp.lock().conntrack, vec![flow(8081, 6, 0), proxied]);
    let journal = node.journal();
    let removed = journal
        .iter()
        .position(|o| matches!(o, Op::RemovePolicy(_)))
        .unwrap();
    let revoked = journal
        .iter()
        .position(|o| matches!(o, Op::Revoke(_)))
        .unwrap();
    assert!(
        removed < revoked,
        "revoked before the policy was written: {journal:#?}"
    );
    let Op::Revoke(flows) = &journal[revoked] else {
        unreachable!()
    };
    assert_eq!(flows, &vec![flow(8080, 6, 0), flow(8080, 17, 0)]);
}

#[tokio::test]
async fn a_restart_on_recovered_maps_rewrites_nothing() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let snap = || snapshot(&[&server_policy(&[8080]), CLIENT_POLICY]);
    let before = {
        let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
        node.send(snap()).await;
        node.ready().await;
        within("the confirmation", node.lane.apply(learned(EXT)))
            .await
            .unwrap();
        let entries = node.handles.status.borrow().map_entries;
        entries
    };
    let maps = |dp: &FakeDatapath| {
        (
            dp.ipcache.clone(),
            dp.endpoints.clone(),
            dp.policy_entries_set(),
        )
    };
    let held = maps(&dp.lock());
    assert!(held.0.keys().any(|n| n.addr() == ip(EXT)));
    dp.lock().take_journal();

    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snap()).await;
    node.ready().await;
    let writes: Vec<Op> = node
        .journal()
        .into_iter()
        .filter(Op::is_map_write)
        .collect();
    assert!(writes.is_empty(), "a restart rewrote {writes:#?}");
    assert_eq!(maps(&dp.lock()), held);
    assert_eq!(node.handles.status.borrow().map_entries, before);
}

#[tokio::test]
async fn the_dns_lane_confirms_while_discovery_hangs() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let routes = FakeRoutes {
        blocked: true,
        ..FakeRoutes::of_the_pods()
    };
    let node = Node::start(&dp, state.path(), routes);
    node.send(snapshot(&[CLIENT_POLICY])).await;
    node.wait_status("the first push", |s| s.generation > 0)
        .await;
    within("the confirmation", node.lane.apply(learned(EXT)))
        .await
        .unwrap();
    assert!(dp.lock().ipcache.keys().any(|n| n.addr() == ip(EXT)));
    // policy changes go through as well
    node.push(snapshot(&[CLIENT_POLICY, &server_policy(&[8080])]))
        .await;
    assert!(dp.lock().policy.values().any(|e| e.port == 8080));
    // the attacher is still stuck in its first round: not ready, nothing attached
    assert!(!node.handles.status.borrow().ready);
    assert!(dp.lock().attached.is_empty());
}

#[tokio::test]
async fn pods_are_attached_leftovers_and_leavers_detached() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    dp.lock().attached.insert("veth-gone".into());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[])).await;
    node.ready().await;
    until("the interfaces in the endpoints map", || {
        let d = dp.lock();
        d.endpoints.get(&ip(CLIENT)).map(|i| i.ifindex) == Some(11)
            && d.endpoints.get(&ip(SERVER)).map(|i| i.ifindex) == Some(12)
    })
    .await;
    let attached: Vec<String> = dp.lock().attached.iter().cloned().collect();
    assert_eq!(attached, vec!["veth-client", "veth-server"]);
    let status = node.handles.status.borrow().clone();
    assert!(status.endpoints.iter().all(|e| e.attached), "{status:?}");

    // the server leaves the node
    let mut snap = snapshot(&[]);
    snap.cluster.pods.retain(|p| p.name != "server");
    node.push(snap).await;
    until("the server's detach", || {
        !dp.lock().attached.contains("veth-server")
    })
    .await;
    assert!(!dp.lock().endpoints.contains_key(&ip(SERVER)));
}

/// Wake-ups the test sends, as the netlink watch would announce route and link changes.
fn wakeups() -> (mpsc::UnboundedSender<()>, Wakeups) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
        );
    (tx, Box::pin(stream))
}

#[tokio::test]
async fn a_route_change_wakes_discovery_without_waiting_for_the_recheck() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let routes = FakeRoutes::default();
    routes.route(CLIENT, "veth-client");
    let (wake, w) = wakeups();
    // no re-check in the test's time: only a wake-up can find the server's interface
    let node = Node::start_woken(
        &dp,
        state.path(),
        routes.clone(),
        Some(w),
        Duration::from_secs(3600),
    );
    node.send(snapshot(&[])).await;
    node.ready().await;
    assert_eq!(
        dp.lock().attached.iter().cloned().collect::<Vec<_>>(),
        vec!["veth-client"]
    );
    // the CNI adds the server's veth and route: the change is announced
    routes.route(SERVER, "veth-server");
    wake.send(()).unwrap();
    until("the server's interface attached", || {
        dp.lock().attached.contains("veth-server")
    })
    .await;
    until("the server's interface in the endpoints map", || {
        dp.lock().endpoints.get(&ip(SERVER)).map(|i| i.ifindex) == Some(12)
    })
    .await;
}

#[tokio::test]
async fn without_wakeups_the_recheck_finds_a_late_interface() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let routes = FakeRoutes::default();
    let node = Node::start(&dp, state.path(), routes.clone());
    node.send(snapshot(&[])).await;
    node.ready().await;
    let before = routes.lookups.load(Ordering::SeqCst);
    routes.route(SERVER, "veth-server");
    until("the server's interface attached", || {
        dp.lock().attached.contains("veth-server")
    })
    .await;
    assert!(routes.lookups.load(Ordering::SeqCst) > before);
}

#[tokio::test]
async fn drop_events_reach_the_stream_named_with_the_pods() {
    let state = tempfile::tempdir().unwrap();
    let dp = Shared::new(FakeDatapath::new());
    let node = Node::start(&dp, state.path(), FakeRoutes::of_the_pods());
    node.send(snapshot(&[&server_policy(&[8080])])).await;
    node.ready().await;
    let mut sub = node.events.subscribe();
    dp.lock().record_drop(DropEvent {
        reason: drop_reason::POLICY_DEFAULT_DENY,
        saddr: [10, 80, 1, 2],
        daddr: [10, 80, 2, 2],
        dport: 9090u16.to_be_bytes(),
        protocol: 6,
        direction: DIR_INGRESS,
        family: 4,
        ..DropEvent::default()
    });
    let line = within("the drop event", sub.recv()).await.unwrap();
    let e: crate::admin::api::Event = serde_json::from_str(&line).unwrap();
    let crate::admin::api::Event::Drop(d) = e else {
        panic!("not a drop: {line}")
    };
    assert_eq!(d.reason, "policy_default_deny");
    assert_eq!(d.source.pod.as_deref(), Some("app/client"));
    assert_eq!(d.destination.pod.as_deref(), Some("app/server"));
    assert_eq!(d.destination.port, 9090);
}
