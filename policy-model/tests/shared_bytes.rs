//! What sharing saves, in bytes counted by a counting allocator (this test binary's
//! global allocator; one test function, so that nothing else allocates meanwhile):
//! policies with the same HTTP and DNS rules share their compiled regexes, a node's
//! model holds its own endpoints' policies (beyond what every node holds), and a model's
//! working copy with one policy changed copies none of the endpoints' policies.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../benches/gen.rs"]
mod gen;

use std::sync::Arc;

use peak_alloc::PeakAlloc;
use policy_model::compile::Scope;
use policy_model::{CompileOptions, Model};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// What `f` returns and the bytes it still holds.
fn held<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOC.current_usage();
    let t = f();
    (t, ALLOC.current_usage().saturating_sub(before))
}

/// `n` CNPs with three HTTP rules and a DNS rule each; `distinct`: every policy's
/// patterns differ, else they are the same in every policy.
fn cnps(n: usize, distinct: bool) -> String {
    let mut text = String::new();
    for i in 0..n {
        let v = if distinct { i } else { 0 };
        text.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: ns-{i}}}\nspec:\n  endpointSelector: {{}}\n  ingress:\n  - toPorts: [{{ports: [{{port: '80', protocol: TCP}}], rules: {{http: [{{method: GET, path: '/v{v}/items/[0-9]+'}}, {{method: 'PUT|POST', path: '/v{v}/orders(/.*)?'}}, {{path: '/v{v}/health'}}]}}}}]\n  egress:\n  - toPorts: [{{ports: [{{port: '53', protocol: ANY}}], rules: {{dns: [{{matchPattern: '*.svc{v}.example.com'}}]}}}}]\n"
        ));
    }
    text
}

fn load(text: &str) -> Vec<policy_model::policy::Policy> {
    let (p, errors, _) = policy_model::api::load(text, Some("gen"));
    assert!(errors.is_empty(), "{errors:?}");
    p
}

#[test]
fn shared_structure_costs_what_it_changes() {
    // regexes: 300 policies with the same patterns against 300 with their own
    let (same_text, distinct_text) = (cnps(300, false), cnps(300, true));
    let (same, same_bytes) = held(|| load(&same_text));
    let (distinct, distinct_bytes) = held(|| load(&distinct_text));
    eprintln!("300 policies: same patterns {same_bytes} B, distinct {distinct_bytes} B");
    assert_eq!(same.len(), distinct.len());
    assert!(
        distinct_bytes > 3 * same_bytes,
        "shared regexes: {same_bytes} B vs {distinct_bytes} B"
    );
    drop((same, distinct));

    // a node's model against the whole cluster's, same inputs (shared, not counted)
    let s = gen::Scale::pods(2_000);
    let cluster = Arc::new(gen::cluster_at(s));
    let policies: Vec<_> = gen::policies_at(s).into_iter().map(Arc::new).collect();
    let build = |scope: Scope| {
        Model::build(
            Arc::clone(&cluster),
            cluster.dns.clone(),
            policies.clone(),
            CompileOptions::default(),
            scope,
        )
    };
    let (whole, whole_bytes) = held(|| build(Scope::Cluster));
    let (node, node_bytes) = held(|| build(Scope::Node(gen::LOCAL_NODE.into())));
    // what every node holds: identities, selectors, the ipcache, the L7 sets
    let (none, base_bytes) = held(|| build(Scope::Node("no-such-node".into())));
    assert_eq!(none.endpoints().count(), 0);
    eprintln!(
        "2,000 pods: whole cluster {whole_bytes} B, node-1 ({} endpoints) {node_bytes} B, \
         no endpoint {base_bytes} B",
        node.endpoints().count()
    );
    // beyond that, a node holds its endpoints' policies: 400 of 2,000
    let (local, all) = (node_bytes - base_bytes, whole_bytes - base_bytes);
    assert!(3 * local < all, "node-1 {local} B, whole cluster {all} B");
    // a working copy with one policy changed (a port of an HTTP policy): it shares the
    // cluster, the policies, the endpoints it does not recompile and the L7 sets
    let mut changed = policies.clone();
    let at = changed
        .iter()
        .position(|p| p.object.name == "web-0")
        .expect("web-0");
    let mut p = (*changed[at]).clone();
    p.rules[0].ports[0].ports[0].port = policy_model::policy::Port::Range(8081, 8081);
    changed[at] = Arc::new(p);
    for (name, model, bytes) in [("whole", &whole, whole_bytes), ("node", &node, node_bytes)] {
        let (next, copy_bytes) = held(|| {
            let mut next = model.clone();
            let change = next.apply_policies(changed.clone()).expect("incremental");
            (next, change)
        });
        eprintln!(
            "{name}: copy with one policy changed {copy_bytes} B ({} endpoints compiled again)",
            next.1.recompiled.len()
        );
        // it copies what every node holds (identities, selectors, indexes), not the
        // endpoints' policies: less than a node with no endpoint holds
        assert!(
            copy_bytes < base_bytes && copy_bytes < bytes,
            "{name}: copy {copy_bytes} B, model {bytes} B"
        );
    }
    // a plain copy likewise: the whole cluster's costs what a node's does
    let (copy, copy_bytes) = held(|| whole.clone());
    assert!(copy_bytes < base_bytes, "{copy_bytes} of {whole_bytes}");
    drop(copy);
}
