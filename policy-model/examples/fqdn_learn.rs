//! What learning DNS answers costs a node's model on the FQDN load test's node
//! (`cargo xtask loadtest fqdn`): 500 local pods in ten namespaces, each namespace one CNP
//! with 1,000 toFQDNs names (900 matchName, 100 matchPattern). Clients learn rotating
//! addresses (ten a name, two an answer) as the load test's upstream gives them; printed:
//! the compile, then per batch of updates the time, the bytes held, identities and
//! selectors, and what a copy of the model costs.
//! `cargo run --release -p policy-model --example fqdn_learn -- [UPDATES] [CLIENTS]`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use peak_alloc::PeakAlloc;
use policy_model::compile::{CompileOptions, Model, Scope};
use policy_model::Cluster;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

const NAMESPACES: usize = 10;
const PODS: usize = 50;
const NAMES: usize = 1_000;
const MATCH_NAMES: usize = 900;
const RING: u32 = 10;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn query_name(g: usize, k: usize) -> String {
    if k < MATCH_NAMES {
        format!("n{k}.g{g}.fqdn.test")
    } else {
        format!("h.p{k}.g{g}.fqdn.test")
    }
}

fn cluster() -> String {
    let mut s = String::from("namespaces:\n- {name: dns}\n");
    for g in 0..NAMESPACES {
        let _ = writeln!(s, "- {{name: fq{g}}}");
    }
    s.push_str("nodes: [{name: node-1, ip: 203.0.113.1}]\npods:\n");
    s.push_str(
        "- {namespace: dns, name: dns-0, ip: 10.81.250.2, node: node-1, labels: {app: dns}}\n",
    );
    for g in 0..NAMESPACES {
        for i in 0..PODS {
            let _ = writeln!(
                s,
                "- {{namespace: fq{g}, name: p{i}, ip: 10.81.{g}.{}, node: node-1, labels: {{app: client}}}}",
                i + 2
            );
        }
    }
    s
}

fn policies() -> String {
    let mut s = String::new();
    for g in 0..NAMESPACES {
        let _ = write!(
            s,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
             metadata: {{name: fqdn-{g}, namespace: fq{g}}}\nspec:\n  \
             endpointSelector: {{}}\n  egress:\n  \
             - toEndpoints: [{{matchLabels: {{\"k8s:io.kubernetes.pod.namespace\": dns, app: dns}}}}]\n    \
             toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      \
             rules:\n        dns: [{{matchPattern: \"*\"}}]\n  - toFQDNs:\n"
        );
        for k in 0..NAMES {
            if k < MATCH_NAMES {
                let _ = writeln!(s, "    - {{matchName: {}}}", query_name(g, k));
            } else {
                let _ = writeln!(s, "    - {{matchPattern: \"*.p{k}.g{g}.fqdn.test\"}}");
            }
        }
        s.push_str("    toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n");
    }
    s
}

fn ip(name: usize, slot: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 128, 0, 0)) + name as u32 * RING + slot % RING,
    ))
}

fn measure_copy<T: Clone>(v: &T) -> (usize, f64) {
    let before = ALLOC.current_usage();
    let t = Instant::now();
    let c = v.clone();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes = ALLOC.current_usage() - before;
    drop(c);
    (bytes, ms)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let updates: usize = args.next().map_or(20_000, |s| s.parse().expect("updates"));
    let clients: usize = args.next().map_or(20, |s| s.parse().expect("clients"));
    let cluster: Cluster = serde_yaml::from_str(&cluster()).expect("cluster");
    let (policies, errors, _) = policy_model::api::load(&policies(), None);
    assert!(errors.is_empty(), "{errors:?}");
    let policies: Vec<_> = policies.into_iter().map(Arc::new).collect();
    let before = ALLOC.current_usage();
    let t = Instant::now();
    let mut m = Model::build(
        Arc::new(cluster),
        Vec::new(),
        policies,
        CompileOptions::default(),
        Scope::Node("node-1".into()),
    );
    println!(
        "compile {:.0} ms: holds {:.1} MiB, {} identities",
        t.elapsed().as_secs_f64() * 1e3,
        mib(ALLOC.current_usage() - before),
        m.identities.len()
    );
    for (part, bytes, ms) in [
        measure_copy(&m.selectors),
        measure_copy(&m.identities),
        measure_copy(&m.l7),
    ]
    .into_iter()
    .zip(["selectors", "identities", "l7"])
    .map(|((b, t), n)| (n, b, t))
    {
        println!("  copy of {part}: {:.1} MiB, {ms:.0} ms", mib(bytes));
    }
    println!("  selectors: {}", m.selectors.selector_count());
    let mut learned: Vec<Vec<BTreeSet<IpAddr>>> = vec![vec![BTreeSet::new(); NAMES]; clients];
    let batch = 1_000;
    let mut t = Instant::now();
    let mut added = 0;
    let mut endpoints = 0;
    for u in 0..updates {
        let c = u % clients;
        let (g, pod) = (c % NAMESPACES, c / NAMESPACES);
        let k = (u / clients) % NAMES;
        let q = (u / (clients * NAMES)) as u32 + c as u32;
        let set = &mut learned[c][k];
        set.insert(ip(g * NAMES + k, q));
        set.insert(ip(g * NAMES + k, q + 1));
        let change = m.set_fqdn_ips(&format!("fq{g}/p{pod}"), &query_name(g, k), set.clone());
        added += change.added.len();
        endpoints += change.endpoints.len();
        if (u + 1) % batch == 0 {
            let took = t.elapsed();
            let held = ALLOC.current_usage() - before;
            let c0 = Instant::now();
            let copy = m.clone();
            let copy_took = c0.elapsed();
            drop(copy);
            println!(
                "{:>6} updates: {:.1} us each, {added} identities added, {endpoints} endpoints touched; \
                 holds {:.1} MiB, {} identities; copy {:.0} ms",
                u + 1,
                took.as_secs_f64() * 1e6 / batch as f64,
                mib(held),
                m.identities.len(),
                copy_took.as_secs_f64() * 1e3,
            );
            added = 0;
            endpoints = 0;
            t = Instant::now();
        }
    }
}
