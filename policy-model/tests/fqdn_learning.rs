//! Incremental FQDN learning (`Model::set_fqdn_ips`, `observe_dns`, `forget_dns`) must
//! give what a full compile gives on the same observations: the same identity (by labels)
//! for every IP, the same ipcache, the same peers in every endpoint entry, and the same
//! verdicts, after every step of random sequences of observations and expiries.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use common::{accept, cluster, ipcache, labels, peers, CLUSTER};
use policy_model::cluster::DnsObservation;
use policy_model::identity::Idx;
use policy_model::{CompileOptions, Direction, Model, Protocol};

const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: y}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.example.com'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toFQDNs: [{matchPattern: '**.cdn.example'}]
  - toCIDR: [203.0.113.0/24]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: world-http}
spec:
  endpointSelector: {matchLabels: {app: b}}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-doc-net, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egressDeny:
  - toCIDR: [198.51.100.0/24]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  egress:
  - toEntities: [all]
"#;

const CLIENTS: [&str; 4] = ["y/a", "y/b", "x/a", "x/b"];
const NAMES: [&str; 6] = [
    "api.example.com",
    "API.Example.com.",
    "www.example.com",
    "a.b.cdn.example",
    "other.org",
    "x.cdn.example.",
];
const IPS: [&str; 7] = [
    "203.0.113.10",
    "203.0.113.11",
    "198.51.100.20",
    "192.0.2.5",
    "2001:db8::5",
    "10.0.0.1",   // a pod: never relabelled
    "172.18.0.3", // a node
];

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[(self.next() % of.len() as u64) as usize]
    }
    fn ips(&mut self) -> Vec<IpAddr> {
        let mask = self.next();
        IPS.iter()
            .enumerate()
            .filter(|(i, _)| mask >> i & 1 == 1 && mask >> (i + 20) & 1 == 1)
            .map(|(_, s)| s.parse().unwrap())
            .collect()
    }
}

fn assert_same(inc: &Model, step: &str) {
    let full = Model::compile(&inc.cluster_with_dns(), accept(POLICIES), inc.options);
    for ip in IPS {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(
            labels(inc, inc.identity_of(ip, None)),
            labels(&full, full.identity_of(ip, None)),
            "identity of {ip} after {step}"
        );
    }
    assert_eq!(ipcache(inc), ipcache(&full), "ipcache after {step}");
    assert_eq!(inc.endpoints().count(), full.endpoints().count());
    for (a, b) in inc.endpoints().zip(full.endpoints()) {
        assert_eq!(a.name, b.name);
        for d in Direction::BOTH {
            let (ea, eb) = (&a.dirs[d.index()].entries, &b.dirs[d.index()].entries);
            assert_eq!(ea.len(), eb.len(), "{} {d:?} entries after {step}", a.name);
            for (x, y) in ea.iter().zip(eb) {
                assert_eq!(
                    peers(inc, x.peers),
                    peers(&full, y.peers),
                    "{} {d:?} peers after {step}",
                    a.name
                );
                assert_eq!(
                    (x.protocol, &x.port, x.action, x.rank, x.origin),
                    (y.protocol, &y.port, y.action, y.rank, y.origin)
                );
            }
            for ip in IPS {
                let ip: IpAddr = ip.parse().unwrap();
                for port in [80, 443, 8080] {
                    let va = inc.decide(a, d, inc.identity_of(ip, None), Protocol::Tcp, port);
                    let vb = full.decide(b, d, full.identity_of(ip, None), Protocol::Tcp, port);
                    assert_eq!(
                        format!("{va:?}"),
                        format!("{vb:?}"),
                        "{} {d:?} {ip}:{port} after {step}",
                        a.name
                    );
                }
            }
        }
    }
}

/// The endpoints with an entry whose peers hold one of `ids`, by visiting them all.
fn scan(m: &Model, ids: &[Idx]) -> Vec<policy_model::compile::EndpointKey> {
    m.endpoints()
        .filter(|ep| {
            ep.dirs.iter().flat_map(|d| &d.entries).any(|e| {
                ids.iter()
                    .any(|&i| m.selectors.peer_set_contains(e.peers, i))
            })
        })
        .map(|ep| ep.key)
        .collect()
}

fn start() -> Model {
    Model::compile(
        &cluster(CLUSTER),
        accept(POLICIES),
        CompileOptions::default(),
    )
}

#[test]
fn random_observations_and_expiries_match_a_full_compile() {
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut m = start();
        for n in 0..40 {
            let (client, name, ips) = (rng.pick(&CLIENTS), rng.pick(&NAMES), rng.ips());
            let (change, step) = match rng.next() % 3 {
                0 => (
                    m.observe_dns(&DnsObservation {
                        client: client.into(),
                        name: name.into(),
                        ips: ips.clone(),
                    }),
                    format!("seed {seed} step {n}: observe {client} {name} {ips:?}"),
                ),
                1 => (
                    m.forget_dns(client, name, &ips),
                    format!("seed {seed} step {n}: forget {client} {name} {ips:?}"),
                ),
                _ => (
                    m.set_fqdn_ips(client, name, ips.clone()),
                    format!("seed {seed} step {n}: set {client} {name} {ips:?}"),
                ),
            };
            assert_same(&m, &step);
            if change.retired.is_empty() {
                assert_eq!(change.endpoints, scan(&m, &change.added), "{step}");
            }
            for (ip, _, after) in &change.ips {
                assert_eq!(m.identity_of(*ip, None), *after, "{step}");
            }
        }
    }
}

#[test]
fn a_change_names_the_ips_and_endpoints_it_touches() {
    let mut m = start();
    let ip: IpAddr = "198.51.100.20".parse().unwrap();
    let world = m.identity_of(ip, None);
    let c = m.set_fqdn_ips("y/a", "api.example.com", [ip]);
    assert_eq!(c.ips.len(), 1);
    let (changed, before, after) = c.ips[0];
    assert_eq!((changed, before), (ip, world));
    assert_eq!(c.added, vec![after]);
    assert!(c.retired.is_empty());
    // y/a's toFQDNs entry now holds it; x/a (toEntities all) and the app=b world rule too
    let names: BTreeSet<String> = c
        .endpoints
        .iter()
        .map(|k| m.endpoint(*k).unwrap().name.clone())
        .collect();
    assert!(names.contains("y/a") && names.contains("x/a") && names.contains("y/b"));
    assert!(!names.contains("z/a"), "{names:?}");
    let ep = m.pod_endpoint("y/a").unwrap();
    assert!(matches!(
        m.decide(ep, Direction::Egress, after, Protocol::Tcp, 443),
        policy_model::verdict::L4Decision::Allow(_)
    ));
    // the same again: nothing changes
    assert!(m.set_fqdn_ips("y/a", "api.example.com", [ip]).is_empty());
    // forgotten: back to world, the identity retired
    let c = m.forget_dns("y/a", "api.example.com", &[ip]);
    assert_eq!(c.ips, vec![(ip, after, world)]);
    assert_eq!(c.retired, vec![after]);
    assert!(!m.identities.is_live(after));
    assert!(m.cluster.dns.is_empty());
    // learned again: the retired identity comes back into use
    let c = m.set_fqdn_ips("y/a", "api.example.com", [ip]);
    assert_eq!(c.added, vec![after]);
    assert_same(&m, "relearning");
}

#[test]
fn cluster_ips_are_never_relabelled() {
    let mut m = start();
    let pod: IpAddr = "10.0.0.1".parse().unwrap();
    let before = m.identity_of(pod, None);
    let c = m.set_fqdn_ips("y/a", "api.example.com", [pod]);
    assert!(c.is_empty(), "{c:?}");
    assert_eq!(m.identity_of(pod, None), before);
}

#[test]
fn affected_endpoints_follow_pod_relabels() {
    let mut m = start();
    let ip: IpAddr = "198.51.100.20".parse().unwrap();
    let y_b = m.pod_endpoint("y/b").unwrap().key;
    let c = m.set_fqdn_ips("x/b", "api.example.com", [ip]);
    assert!(c.endpoints.contains(&y_b), "y/b: app=b, world egress");
    m.forget_dns("x/b", "api.example.com", &[ip]);
    // y/b no longer app=b: the CCNP's world rule leaves it (its y/fqdn CIDR rule stays)
    m.set_pod_labels(
        "y/b",
        [("app".to_string(), "c".to_string())].into_iter().collect(),
    )
    .unwrap();
    let c = m.set_fqdn_ips("x/b", "api.example.com", [ip]);
    assert_eq!(c.endpoints, scan(&m, &c.added));
    assert_same(&m, "relabel, then learning");
}

#[test]
fn ips_learned_under_a_vanished_pattern_leave_the_ipcache() {
    let mut m = start();
    let ip: IpAddr = "192.0.2.5".parse().unwrap();
    m.set_fqdn_ips("y/a", "x.cdn.example", [ip]);
    assert!(
        m.ipcache_entry(ip, None).is_some(),
        "learned: its own entry"
    );
    // the policy naming **.cdn.example goes; the observation itself stays (the agent
    // keeps what it learned), but nothing selects it any more
    let without: String = POLICIES.replace("  - toFQDNs: [{matchPattern: '**.cdn.example'}]\n", "");
    assert_ne!(without, POLICIES);
    let full = Model::compile(&m.cluster_with_dns(), accept(&without), m.options);
    assert_eq!(full.dns().len(), 1);
    assert_eq!(full.ipcache_entry(ip, None), None, "falls back to world");
    assert!(!full
        .ipcache(Some("node-1"))
        .iter()
        .any(|(net, _)| net.addr() == ip));
}
