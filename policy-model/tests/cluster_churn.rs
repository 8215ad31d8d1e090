//! Incremental cluster churn (`Model::apply_cluster`, `Model::set_pod_labels`) must give
//! what a full compile of the new cluster gives: the same endpoints in the same order,
//! the same identity (by labels) for every pod and IP, the same entries with the same
//! peers, named ports and verdicts, and the same ipcache, after every step of random
//! sequences of pod additions, removals, relabels, IP, port and node changes, namespace
//! relabels and DNS learning.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::{accept, assert_endpoints_match, cluster, ipcache, labels, CLUSTER};
use policy_model::cluster::{Cluster, ContainerPort, Namespace, Pod};
use policy_model::compile::{ChurnUnsupported, Scope};
use policy_model::identity::Idx;
use policy_model::{CompileOptions, Model, Protocol};

const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: y}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.example.com'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toCIDR: [203.0.113.0/24]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: team-blue}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: blue}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
  - fromCIDR: [10.0.0.0/24]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: x}
spec:
  podSelector: {matchLabels: {tier: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: red}}
      podSelector: {matchLabels: {app: a}}
    - ipBlock: {cidr: 10.0.1.0/24, except: [10.0.1.2/32]}
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: 53, protocol: UDP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {tier: web}}]
  ingress:
  - fromEntities: [cluster]
"#;

const NAMESPACES: [&str; 4] = ["x", "y", "z", "w"];
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const APPS: [&str; 3] = ["a", "b", "c"];
const TIERS: [&str; 3] = ["web", "db", ""];
const TEAMS: [&str; 3] = ["blue", "red", ""];
const IPS: [&str; 10] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.9",
    "10.0.1.1",
    "10.0.1.2",
    "10.0.2.1",
    "2001:db8::7",
    "203.0.113.10", // learned for api.example.com below
    "172.18.0.3",   // a node's
    "192.0.2.5",
];
const DNS_CLIENTS: [&str; 3] = ["y/a", "y/b", "y/d"];

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len())]
    }
    fn labels(&mut self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert("app".to_string(), self.pick(&APPS).to_string());
        let tier = self.pick(&TIERS);
        if !tier.is_empty() {
            l.insert("tier".to_string(), tier.to_string());
        }
        l
    }
    fn ips(&mut self) -> (Option<IpAddr>, Vec<IpAddr>) {
        let ip = (self.below(8) != 0).then(|| self.pick(&IPS).parse().unwrap());
        let ips = if self.below(4) == 0 {
            vec![self.pick(&IPS).parse().unwrap()]
        } else {
            vec![]
        };
        (ip, ips)
    }
    fn ports(&mut self) -> Vec<ContainerPort> {
        let mut out = Vec::new();
        if self.below(2) == 0 {
            out.push(ContainerPort {
                name: Some("http".into()),
                port: [80, 8080][self.below(2)],
                protocol: Protocol::Tcp,
            });
        }
        if self.below(3) == 0 {
            out.push(ContainerPort {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp,
            });
        }
        out
    }
    fn pod(&mut self) -> Pod {
        let (ip, ips) = self.ips();
        Pod {
            namespace: self.pick(&NAMESPACES).to_string(),
            name: self.pick(&NAMES).to_string(),
            labels: self.labels(),
            ip,
            ips,
            node: Some(["node-1", "node-2"][self.below(2)].to_string()),
            ports: self.ports(),
            tls: None,
            service_account: None,
        }
    }
}

/// Live identities by labels, with their named ports.
fn live(m: &Model) -> BTreeMap<String, Vec<ContainerPort>> {
    (0..m.identities.len() as Idx)
        .filter(|&i| m.identities.is_live(i))
        .map(|i| (labels(m, i), m.identities.get(i).named_ports.clone()))
        .collect()
}

fn assert_same(inc: &Model, policies: &str, step: &str) {
    let full = Model::compile(&inc.cluster_with_dns(), accept(policies), inc.options);
    assert_eq!(live(inc), live(&full), "live identities after {step}");
    assert_eq!(ipcache(inc), ipcache(&full), "ipcache after {step}");
    let mut probe: Vec<IpAddr> = IPS.iter().map(|s| s.parse().unwrap()).collect();
    probe.push("172.18.0.2".parse().unwrap());
    for &ip in &probe {
        assert_eq!(
            labels(inc, inc.identity_of(ip, Some("node-1"))),
            labels(&full, full.identity_of(ip, Some("node-1"))),
            "identity of {ip} after {step}"
        );
        if *inc.scope() == Scope::Cluster {
            assert_eq!(
                inc.endpoint_of_ip(ip).map(|e| &e.name),
                full.endpoint_of_ip(ip).map(|e| &e.name),
                "endpoint of {ip} after {step}"
            );
        }
    }
    assert_endpoints_match(inc, &full, &probe, Some("node-1"), step);
    // what a change touches is found through the peer-set index
    for i in 0..inc.identities.len() as Idx {
        if !inc.identities.is_live(i) {
            continue;
        }
        let scan: Vec<_> = inc
            .endpoints()
            .filter(|ep| {
                ep.dirs
                    .iter()
                    .flat_map(|d| &d.entries)
                    .any(|e| inc.selectors.peer_set_contains(e.peers, i))
            })
            .map(|ep| ep.key)
            .collect();
        assert_eq!(
            inc.endpoints_selecting(&[i]),
            scan,
            "endpoints selecting {} after {step}",
            labels(inc, i)
        );
    }
}

/// One random change of the cluster; returns its description.
fn mutate(rng: &mut Rng, c: &mut Cluster) -> String {
    match rng.below(9) {
        0 | 1 => {
            let p = rng.pod();
            let id = p.id();
            if c.pods.iter().any(|q| q.id() == id) {
                return format!("add {id}: exists, nothing");
            }
            let at = rng.below(c.pods.len() + 1);
            c.pods.insert(at, p);
            format!("add {id} at {at}")
        }
        2 if !c.pods.is_empty() => {
            let at = rng.below(c.pods.len());
            format!("remove {}", c.pods.remove(at).id())
        }
        3 if !c.pods.is_empty() => {
            let at = rng.below(c.pods.len());
            c.pods[at].labels = rng.labels();
            format!("relabel {} {:?}", c.pods[at].id(), c.pods[at].labels)
        }
        4 if !c.pods.is_empty() => {
            let at = rng.below(c.pods.len());
            (c.pods[at].ip, c.pods[at].ips) = rng.ips();
            format!(
                "re-IP {} {:?} {:?}",
                c.pods[at].id(),
                c.pods[at].ip,
                c.pods[at].ips
            )
        }
        5 if !c.pods.is_empty() => {
            let at = rng.below(c.pods.len());
            c.pods[at].ports = rng.ports();
            c.pods[at].node = Some(["node-1", "node-2"][rng.below(2)].to_string());
            format!("ports/node of {}", c.pods[at].id())
        }
        6 => {
            let ns = rng.pick(&NAMESPACES);
            let team = rng.pick(&TEAMS);
            c.namespaces.retain(|n| n.name != ns);
            if !team.is_empty() || rng.below(2) == 0 {
                let mut labels = BTreeMap::new();
                if !team.is_empty() {
                    labels.insert("team".to_string(), team.to_string());
                }
                c.namespaces.push(Namespace {
                    name: ns.to_string(),
                    labels,
                });
            }
            format!("namespace {ns} team {team:?}")
        }
        7 if c.pods.len() > 1 => {
            let (a, b) = (rng.below(c.pods.len()), rng.below(c.pods.len()));
            c.pods.swap(a, b);
            format!("swap pods {a} {b}")
        }
        _ => "nothing".to_string(),
    }
}

/// The scopes the churn runs in, by seed: the whole cluster, and each node's.
fn scope_of(seed: u64) -> Scope {
    match seed % 3 {
        0 => Scope::Cluster,
        1 => Scope::Node("node-1".into()),
        _ => Scope::Node("node-2".into()),
    }
}

#[test]
fn random_churn_matches_a_full_compile() {
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let options = CompileOptions {
            cidr_matches_cluster: seed % 2 == 0,
        };
        let mut m =
            Model::compile_scoped(&cluster(CLUSTER), accept(POLICIES), options, scope_of(seed));
        m.set_fqdn_ips("y/a", "api.example.com", ["203.0.113.10".parse().unwrap()]);
        assert_same(&m, POLICIES, &format!("seed {seed} start"));
        for n in 0..30 {
            let step = match rng.below(6) {
                0 => {
                    // DNS learning between churn steps
                    let client = rng.pick(&DNS_CLIENTS);
                    let ips: Vec<IpAddr> = (0..rng.below(3))
                        .map(|_| rng.pick(&IPS).parse().unwrap())
                        .collect();
                    m.set_fqdn_ips(client, "www.example.com", ips.clone());
                    format!("learn {client} {ips:?}")
                }
                1 if !m.cluster.pods.is_empty() => {
                    // the existing single-pod relabel
                    let at = rng.below(m.cluster.pods.len());
                    let id = m.cluster.pods[at].id();
                    let l = rng.labels();
                    m.set_pod_labels(&id, l.clone()).unwrap();
                    format!("set_pod_labels {id} {l:?}")
                }
                _ => {
                    let mut c = (*m.cluster).clone();
                    let mut what = vec![mutate(&mut rng, &mut c)];
                    if rng.below(3) == 0 {
                        what.push(mutate(&mut rng, &mut c));
                    }
                    let change = m.apply_cluster(&c).unwrap();
                    assert_eq!(*m.cluster, c, "the model's cluster is the new one");
                    format!("{what:?} -> {change:?}")
                }
            };
            assert_same(&m, POLICIES, &format!("seed {seed} step {n}: {step}"));
        }
    }
}

#[test]
fn unsupported_changes_leave_the_model_as_it_was() {
    let c = cluster(CLUSTER);
    let mut m = Model::compile(&c, accept(POLICIES), CompileOptions::default());
    let mut nodes = c.clone();
    nodes.nodes[0].labels.insert("zone".into(), "a".into());
    assert_eq!(m.apply_cluster(&nodes), Err(ChurnUnsupported::Nodes));
    let mut twice = c.clone();
    twice.pods.push(twice.pods[0].clone());
    assert_eq!(
        m.apply_cluster(&twice),
        Err(ChurnUnsupported::DuplicatePod("x/a".into()))
    );
    assert_eq!(*m.cluster, c);
    assert_same(&m, POLICIES, "refused changes");
}

#[test]
fn a_removed_pod_gives_its_ip_back_to_what_was_learned_for_it() {
    let c = cluster(CLUSTER);
    let mut m = Model::compile(&c, accept(POLICIES), CompileOptions::default());
    let ip: IpAddr = "10.0.0.2".parse().unwrap();
    m.set_fqdn_ips("y/a", "api.example.com", [ip]);
    let pod = m.identity_of(ip, None);
    let mut without = (*m.cluster).clone();
    without.pods.retain(|p| p.id() != "x/b");
    let change = m.apply_cluster(&without).unwrap();
    assert_eq!(change.removed, vec!["x/b".to_string()]);
    assert!(change.reordered);
    assert!(
        change.retired.contains(&pod),
        "x/b's identity is held by no pod"
    );
    let learned = m.identity_of(ip, None);
    assert!(
        labels(&m, learned).contains("api.example.com"),
        "{}",
        labels(&m, learned)
    );
    assert_same(&m, POLICIES, "removal");
    // and a pod taking it again releases the FQDN identity
    let back = m.apply_cluster(&c).unwrap();
    assert!(back.retired.contains(&learned), "{back:?}");
    assert_same(&m, POLICIES, "re-adding");
}

#[test]
fn nothing_changed_is_an_empty_change() {
    let c = cluster(CLUSTER);
    let mut m = Model::compile(&c, accept(POLICIES), CompileOptions::default());
    let change = m.apply_cluster(&c).unwrap();
    assert!(change.is_empty() && !change.reordered, "{change:?}");
}
