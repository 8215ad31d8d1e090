//! Incremental policy changes (`Model::apply_policies`) must give what a full compile of
//! the new policies gives, in every scope: the same endpoints with the same entries
//! (peers by members, L7 sets by content), verdicts and ipcache, after every step of
//! random sequences of policies changed, added, removed and reordered (CNP with HTTP and
//! DNS rules, toFQDNs and CIDRs, CCNP, host policies, NetworkPolicy, ANP, BANP, Calico).
//! A change the incremental path refuses leaves the model as it was.
//! And what a change does not touch stays shared with the model it started from.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::{accept, assert_endpoints_match, cluster, ipcache, CLUSTER};
use policy_model::compile::{EndpointKey, PolicyUnsupported, Scope};
use policy_model::policy::Policy;
use policy_model::{CompileOptions, Model};

/// Policy documents by slot; each slot has variants (the same object changed).
const SLOTS: &[&[&str]] = &[
    // an HTTP rule set
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: y}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET, path: '/a.*'}]}}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: y}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n    toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{method: POST, path: /b}]}}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: y}\nspec:\n  endpointSelector: {matchLabels: {tier: web}}\n  ingress:\n  - fromEntities: [cluster]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n",
    ],
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: team-blue}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: blue}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: team-blue}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: blue}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}], rules: {http: [{path: /x}]}}]\n",
    ],
    &[
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\nspec:\n  podSelector: {matchLabels: {tier: db}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: red}}\n      podSelector: {matchLabels: {app: a}}\n  egress:\n  - to: [{podSelector: {}}]\n    ports: [{port: 53, protocol: UDP}]\n",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    ],
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-b, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {tier: web}}]\n  ingress:\n  - fromEntities: [cluster]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-b, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: c}}]\n",
    ],
    &[
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: admin}\nspec:\n  priority: 10\n  subject: {namespaces: {matchLabels: {team: blue}}}\n  ingress:\n  - {name: deny-red, action: Deny, from: [{namespaces: {matchLabels: {team: red}}}], ports: [{portNumber: {protocol: TCP, port: 80}}]}\n",
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: admin}\nspec:\n  priority: 30\n  subject: {namespaces: {}}\n  ingress:\n  - {name: pass-red, action: Pass, from: [{namespaces: {matchLabels: {team: red}}}]}\n",
    ],
    &[
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec:\n  subject: {namespaces: {}}\n  ingress:\n  - {name: deny-all, action: Deny, from: [{namespaces: {}}]}\n",
    ],
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: host}\nspec:\n  nodeSelector: {}\n  ingress:\n  - fromEntities: [cluster]\n    toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: host}\nspec:\n  nodeSelector: {}\n  ingress:\n  - fromEntities: [world]\n    toPorts: [{ports: [{port: '2222', protocol: TCP}]}]\n",
    ],
    // toFQDNs: the same patterns in every variant (removing the slot changes them)
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fqdn, namespace: y}\nspec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.example.com'}]\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n  - toEndpoints: [{matchLabels: {app: b}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fqdn, namespace: y}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  egress:\n  - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.example.com'}]\n    toPorts: [{ports: [{port: '8443', protocol: TCP}]}]\n",
    ],
    // DNS rules
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: dns, namespace: z}\nspec:\n  endpointSelector: {}\n  egress:\n  - toEndpoints: [{}]\n    toPorts: [{ports: [{port: '53', protocol: ANY}], rules: {dns: [{matchPattern: '*.example.com'}]}}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: dns, namespace: z}\nspec:\n  endpointSelector: {}\n  egress:\n  - toEndpoints: [{}]\n    toPorts: [{ports: [{port: '53', protocol: ANY}], rules: {dns: [{matchName: x.example.com}]}}]\n",
    ],
    // a CIDR: the same prefix in every variant (removing the slot changes the prefixes)
    &[
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr, namespace: x}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [203.0.113.0/24]\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  egress:\n  - toCIDR: [203.0.113.0/24]\n",
    ],
    // Calico in the default tier: order changes move it among the others
    &[
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: calico}\nspec:\n  order: 100\n  selector: app == 'a'\n  ingress:\n  - action: Allow\n    protocol: TCP\n    source: {selector: app == 'b'}\n    destination: {ports: [80]}\n",
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: calico}\nspec:\n  order: 5\n  selector: app == 'a'\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {ports: [8080]}\n",
    ],
];

const IPS: [&str; 9] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.1.1",
    "10.0.1.2",
    "10.0.2.1",
    "203.0.113.10",
    "172.18.0.3",
    "192.0.2.5",
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
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The policies of a list of (slot, variant), freshly translated.
fn policies(list: &[(usize, usize)]) -> Vec<Arc<Policy>> {
    if list.is_empty() {
        return Vec::new();
    }
    let text: Vec<&str> = list.iter().map(|&(s, v)| SLOTS[s][v]).collect();
    accept(&text.join("---\n"))
        .into_iter()
        .map(Arc::new)
        .collect()
}

fn full(m: &Model, list: &[(usize, usize)]) -> Model {
    let owned = policies(list).iter().map(|p| (**p).clone()).collect();
    Model::compile(&m.cluster_with_dns(), owned, m.options)
}

fn assert_same(inc: &Model, list: &[(usize, usize)], step: &str) {
    let full = full(inc, list);
    assert_eq!(ipcache(inc), ipcache(&full), "ipcache after {step}");
    let probe: Vec<IpAddr> = IPS.iter().map(|s| s.parse().unwrap()).collect();
    assert_endpoints_match(inc, &full, &probe, Some("node-1"), step);
}

/// One random change of the list; returns its description.
fn mutate(rng: &mut Rng, list: &mut Vec<(usize, usize)>) -> String {
    let absent: Vec<usize> = (0..SLOTS.len())
        .filter(|s| !list.iter().any(|(x, _)| x == s))
        .collect();
    match rng.below(6) {
        0 | 1 if !list.is_empty() => {
            let at = rng.below(list.len());
            let s = list[at].0;
            list[at].1 = rng.below(SLOTS[s].len());
            format!("slot {s} variant {}", list[at].1)
        }
        2 if !list.is_empty() => {
            let at = rng.below(list.len());
            format!("remove slot {}", list.remove(at).0)
        }
        3 if !absent.is_empty() => {
            let s = absent[rng.below(absent.len())];
            let v = rng.below(SLOTS[s].len());
            let at = rng.below(list.len() + 1);
            list.insert(at, (s, v));
            format!("add slot {s} variant {v} at {at}")
        }
        4 if list.len() > 1 => {
            let (a, b) = (rng.below(list.len()), rng.below(list.len()));
            list.swap(a, b);
            format!("swap {a} {b}")
        }
        _ => "the same policies again".to_string(),
    }
}

#[test]
fn random_policy_changes_match_a_full_compile() {
    let mut incremental = 0;
    let mut refused = 0;
    for seed in 1..=18u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let scope = match seed % 3 {
            0 => Scope::Cluster,
            1 => Scope::Node("node-1".into()),
            _ => Scope::Node("node-2".into()),
        };
        let options = CompileOptions {
            cidr_matches_cluster: seed % 2 == 0,
        };
        let mut list: Vec<(usize, usize)> = (0..SLOTS.len()).map(|s| (s, 0)).collect();
        let c = cluster(CLUSTER);
        let mut m = Model::build(
            Arc::new(c.clone()),
            c.dns.clone(),
            policies(&list),
            options,
            scope.clone(),
        );
        m.set_fqdn_ips("y/a", "api.example.com", ["203.0.113.10".parse().unwrap()]);
        assert_same(&m, &list, &format!("seed {seed} start"));
        for n in 0..25 {
            let before = list.clone();
            let what = mutate(&mut rng, &mut list);
            let step = format!("seed {seed} step {n}: {what}");
            match m.apply_policies(policies(&list)) {
                Ok(change) => {
                    incremental += 1;
                    assert_same(&m, &list, &format!("{step} -> {change:?}"));
                }
                Err(e) => {
                    refused += 1;
                    assert_same(&m, &before, &format!("{step}: refused ({e}), unchanged"));
                    // as the agent does: a full compile
                    m = Model::build(
                        Arc::clone(&m.cluster),
                        m.dns().to_vec(),
                        policies(&list),
                        options,
                        scope.clone(),
                    );
                }
            }
        }
    }
    // both paths ran
    assert!(incremental > 200 && refused > 5, "{incremental} {refused}");
}

#[test]
fn a_change_of_prefixes_or_patterns_is_refused() {
    let all: Vec<(usize, usize)> = (0..SLOTS.len()).map(|s| (s, 0)).collect();
    let c = cluster(CLUSTER);
    let mut m = Model::build(
        Arc::new(c),
        Vec::new(),
        policies(&all),
        CompileOptions::default(),
        Scope::Cluster,
    );
    let without = |slot: usize| -> Vec<(usize, usize)> {
        all.iter().copied().filter(|&(s, _)| s != slot).collect()
    };
    assert_eq!(
        m.apply_policies(policies(&without(9))),
        Err(PolicyUnsupported::Prefixes)
    );
    assert_eq!(
        m.apply_policies(policies(&without(7))),
        Err(PolicyUnsupported::FqdnPatterns)
    );
    assert_same(&m, &all, "refused changes");
}

#[test]
fn what_a_change_does_not_touch_stays_shared() {
    let list: Vec<(usize, usize)> = (0..SLOTS.len()).map(|s| (s, 0)).collect();
    let c = cluster(CLUSTER);
    let start = Model::build(
        Arc::new(c.clone()),
        Vec::new(),
        policies(&list),
        CompileOptions::default(),
        Scope::Cluster,
    );
    // the host policy's port changes: only the node endpoints are compiled again
    let mut changed = list.clone();
    changed[6].1 = 1;
    let mut next = start.clone();
    let change = next.apply_policies(policies(&changed)).unwrap();
    assert_eq!(change.changed.len(), 1);
    assert_eq!(
        change.recompiled,
        vec![EndpointKey::Node(0), EndpointKey::Node(1)]
    );
    assert_eq!(change.renumbered, 0);
    let shared = start
        .endpoints()
        .zip(next.endpoints())
        .filter(|(a, b)| std::ptr::eq(*a, *b))
        .count();
    assert_eq!(shared, c.pods.len(), "every pod's policy is the same value");
    // every L7 set is the same value, and the policies that did not change too
    assert!((0..start.l7.len()).all(|i| start.l7.same(&next.l7, i)));
    assert!(Arc::ptr_eq(&start.cluster, &next.cluster));
    assert_same(&next, &changed, "host policy changed");

    // the HTTP policy changes: its set is built again, the others stay
    let mut http = list.clone();
    http[0].1 = 1;
    let mut next = start.clone();
    next.apply_policies(policies(&http)).unwrap();
    let same: Vec<bool> = (0..start.l7.len())
        .map(|i| start.l7.same(&next.l7, i))
        .collect();
    assert_eq!(same.iter().filter(|s| !**s).count(), 1, "{same:?}");
    assert_same(&next, &http, "HTTP policy changed");
}
