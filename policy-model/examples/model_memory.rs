//! Bytes a compiled model holds and what its copy costs, for the whole cluster and for
//! one node, on the benchmark's generated cluster (counted by a counting allocator):
//! `cargo run --release -p policy-model --example model_memory -- [PODS]` (default
//! 20,000; 400 of them on node-1).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../benches/gen.rs"]
mod gen;

use std::sync::Arc;
use std::time::Instant;

use peak_alloc::PeakAlloc;
use policy_model::compile::{CompileOptions, Model, Scope};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn main() {
    let pods: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("a number of pods"))
        .unwrap_or(gen::PODS);
    let s = gen::Scale::pods(pods);
    let start = ALLOC.current_usage();
    let cluster = Arc::new(gen::cluster_at(s));
    let after_cluster = ALLOC.current_usage();
    let policies: Vec<_> = gen::policies_at(s).into_iter().map(Arc::new).collect();
    let inputs = ALLOC.current_usage();
    println!(
        "{pods} pods, {} policies: cluster {:.1} MiB, policies {:.1} MiB",
        policies.len(),
        mib(after_cluster - start),
        mib(inputs - after_cluster)
    );
    for scope in [Scope::Cluster, Scope::Node(gen::LOCAL_NODE.into())] {
        let before = ALLOC.current_usage();
        ALLOC.reset_peak_usage();
        let t = Instant::now();
        let m = Model::build(
            Arc::clone(&cluster),
            cluster.dns.clone(),
            policies.clone(),
            CompileOptions::default(),
            scope.clone(),
        );
        let took = t.elapsed();
        let held = ALLOC.current_usage() - before;
        let peak = ALLOC.peak_usage() - before;
        let before_copy = ALLOC.current_usage();
        let t = Instant::now();
        let copy = m.clone();
        let copy_took = t.elapsed();
        let copy_bytes = ALLOC.current_usage() - before_copy;
        drop(copy);
        println!(
            "{scope:?}: {} endpoints, {} identities; compile {:.0} ms, holds {:.1} MiB \
             (peak {:.1}); copy {:.0} ms, {:.1} MiB",
            m.endpoints().count(),
            m.identities.len(),
            took.as_secs_f64() * 1e3,
            mib(held),
            mib(peak),
            copy_took.as_secs_f64() * 1e3,
            mib(copy_bytes)
        );
    }
}
