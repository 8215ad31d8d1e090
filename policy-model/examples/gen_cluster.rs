//! Writes the benchmark's generated cluster as a source directory for `ward agent
//! --source files`: `cluster.yaml` (the cluster state) and `policies.yaml` (every policy
//! object), in the proportions of `benches/gen.rs` (10 pods a namespace, a policy per 10
//! pods, 50 nodes, 400 pods or at most a fifth on node-1). The scale load test
//! (`cargo xtask loadtest scale`) runs it:
//! `cargo run --release -p policy-model --example gen_cluster -- PODS DIR`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../benches/gen.rs"]
mod gen;

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(pods), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: gen_cluster PODS DIR");
        std::process::exit(2);
    };
    let pods: usize = pods.parse().expect("PODS is a number");
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("the output directory");
    let s = gen::Scale::pods(pods);
    let cluster = serde_yaml::to_string(&gen::cluster_at(s)).expect("cluster as YAML");
    std::fs::write(dir.join("cluster.yaml"), cluster).expect("cluster.yaml");
    std::fs::write(dir.join("policies.yaml"), gen::policies_yaml_at(s)).expect("policies.yaml");
    println!(
        "{pods} pods ({} on {}), {} namespaces, {} policies, {} nodes",
        s.local,
        gen::LOCAL_NODE,
        s.namespaces,
        s.policies,
        s.nodes
    );
}
