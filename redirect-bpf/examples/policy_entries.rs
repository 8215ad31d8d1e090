//! Policy-map entries a node's agent writes on the benchmark's generated cluster:
//! `cargo run --release -p redirect-bpf --example policy_entries -- [PODS]...`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../policy-model/benches/gen.rs"]
mod gen;

use std::sync::Arc;

use policy_model::compile::{CompileOptions, Model, Scope};
use redirect_bpf::compile::{endpoint_entries, ProxyPorts};
use redirect_bpf::PeerClasses;

fn main() {
    for pods in std::env::args()
        .skip(1)
        .map(|s| s.parse::<usize>().expect("pods"))
    {
        let s = gen::Scale::pods(pods);
        let cluster = Arc::new(gen::cluster_at(s));
        let policies: Vec<_> = gen::policies_at(s).into_iter().map(Arc::new).collect();
        let m = Model::build(
            Arc::clone(&cluster),
            cluster.dns.clone(),
            policies,
            CompileOptions::default(),
            Scope::Node(gen::LOCAL_NODE.into()),
        );
        let eps: Vec<_> = m.endpoints().collect();
        let classes = PeerClasses::compute(&m, &eps, &Default::default());
        let mut total = 0;
        let mut max = 0;
        let mut n = 0;
        for (i, ep) in m.endpoints().enumerate() {
            let e = endpoint_entries(
                &m,
                ep,
                i as u32 + 1,
                ProxyPorts {
                    http: 15001,
                    dns: 15053,
                },
                &classes,
            );
            total += e.entries.len();
            max = max.max(e.entries.len());
            n += 1;
        }
        println!(
            "{pods} pods: {n} endpoints, {} identities in {} classes, {total} entries, max {max} \
             per endpoint",
            m.identities.len(),
            classes.len()
        );
    }
}
