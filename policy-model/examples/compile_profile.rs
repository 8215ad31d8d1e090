//! Times a full compile of the benchmark's generated cluster, for profiling:
//! `cargo run --release -p policy-model --example compile_profile`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../benches/gen.rs"]
mod gen;

use std::time::Instant;

use policy_model::compile::{CompileOptions, Model};

fn main() {
    let t = Instant::now();
    let cluster = gen::cluster();
    let policies = gen::policies();
    eprintln!("generate+parse: {:?}", t.elapsed());
    for _ in 0..3 {
        let t = Instant::now();
        let m = Model::compile(&cluster, policies.clone(), CompileOptions::default());
        eprintln!(
            "compile: {:?} ({} identities, {} endpoints)",
            t.elapsed(),
            m.identities.len(),
            m.endpoints().count()
        );
    }
}
