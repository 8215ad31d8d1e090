//! Compile and lookup cost on a large generated cluster: 20,000 pods in 2,000 namespaces
//! and 2,000 policies mixing CNP (HTTP and DNS rules, toFQDNs, CIDR sets), CCNP,
//! NetworkPolicy, ANP and a BANP.
//!
//! Targets (issue 2): full compile under 2 s, recompile after one pod's labels change under
//! 5 ms, one verdict lookup under 200 ns. Learning one FQDN IP must fit well inside the
//! DNS proxy's 100 ms wait for the datapath (the full compile it replaces does not).
//! Cluster churn (issue 6): a pod added, removed, relabelled or moved to another IP through
//! `Model::apply_cluster`, against the full compile, and the cost of a model copy.

#![allow(clippy::expect_used, clippy::unwrap_used)] // benchmark harness: a broken setup should stop it

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use policy_model::compile::{CompileOptions, Model};
use policy_model::policy::{Direction, Protocol};

mod gen;
use gen::{cluster, policies};

fn bench(c: &mut Criterion) {
    let cluster = cluster();
    let policies = policies();
    let opts = CompileOptions::default();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("full_20k_pods_2k_policies", |b| {
        b.iter_batched(
            || policies.clone(),
            |p| black_box(Model::compile(&cluster, p, opts)),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut model = Model::compile(&cluster, policies.clone(), opts);
    let mut g = c.benchmark_group("incremental");
    let mut n = 0u64;
    g.bench_function("one_pod_labels_change_new_identity", |b| {
        b.iter(|| {
            n += 1;
            // a new label value each time: a new identity, evaluated against every selector
            let labels = [
                ("app".to_string(), "app-1".to_string()),
                ("tier".to_string(), "frontend".to_string()),
                ("version".to_string(), format!("v{n}")),
            ]
            .into();
            model
                .set_pod_labels("ns-7/pod-3", labels)
                .expect("pod exists");
        })
    });
    g.bench_function("one_pod_labels_change_known_identity", |b| {
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            let tier = if flip { "backend" } else { "db" };
            let labels = [
                ("app".to_string(), "app-2".to_string()),
                ("tier".to_string(), tier.to_string()),
            ]
            .into();
            model
                .set_pod_labels("ns-8/pod-4", labels)
                .expect("pod exists");
        })
    });
    // DNS answers teaching toFQDNs IPs (`Model::set_fqdn_ips`), change set included.
    let client = "ns-3/pod-0";
    let known: std::net::IpAddr = [203, 0, 113, 3].into();
    let extra: std::net::IpAddr = [203, 0, 113, 200].into();
    g.bench_function("learn_one_fqdn_ip_known_identity", |b| {
        // a second IP for the name, then not: same labels, so only its ipcache entry
        // changes (the state decides, as criterion calls this closure more than once)
        b.iter(|| {
            let has = model.fqdn_ips(client, "api-3.example.com").contains(&extra);
            let ips = if has { vec![known] } else { vec![known, extra] };
            let c = model.set_fqdn_ips(client, "api-3.example.com", ips);
            assert_eq!(c.ips.len(), 1);
            black_box(c)
        })
    });
    g.bench_function("learn_one_fqdn_ip_new_identity", |b| {
        // an IP for a name of another pattern: a label set of its own, interned and
        // evaluated against every selector, then forgotten (retired) on the next round
        let ip: std::net::IpAddr = [192, 0, 2, 7].into();
        b.iter(|| {
            let has = !model.fqdn_ips(client, "x.pay-3.example").is_empty();
            let ips = if has { vec![] } else { vec![ip] };
            let c = model.set_fqdn_ips(client, "x.pay-3.example", ips);
            assert!(!c.endpoints.is_empty());
            black_box(c)
        })
    });
    g.finish();

    // Cluster churn through `Model::apply_cluster` (the agent's path for a source change
    // that only touches pods and namespaces), against the full compile above. The agent
    // applies it to a working copy of the model: `model_clone` below is that copy's cost.
    let base = (*model.cluster).clone();
    let middle = base
        .pods
        .iter()
        .position(|p| p.namespace == "ns-1000")
        .expect("pod");
    let mut with = base.clone();
    let mut added = with.pods[middle].clone();
    added.name = "pod-new".into();
    added.ip = Some(std::net::IpAddr::from([10, 200, 0, 1]));
    with.pods.insert(middle, added);
    let mut g = c.benchmark_group("churn");
    g.sample_size(20);
    let mut timed =
        |b: &mut criterion::Bencher, to: &policy_model::Cluster, back: &policy_model::Cluster| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = std::time::Instant::now();
                    black_box(model.apply_cluster(to).expect("pods only"));
                    total += t.elapsed();
                    model.apply_cluster(back).expect("pods only");
                }
                total
            })
        };
    g.bench_function("pod_add_20k", |b| timed(b, &with, &base));
    g.bench_function("pod_remove_20k", |b| timed(b, &base, &with));
    let mut relabelled = base.clone();
    relabelled.pods[middle]
        .labels
        .insert("tier".into(), "db".into());
    g.bench_function("pod_relabel_known_identity_20k", |b| {
        timed(b, &relabelled, &base)
    });
    let mut fresh = base.clone();
    fresh.pods[middle]
        .labels
        .insert("version".into(), "v2".into());
    g.bench_function("pod_relabel_new_identity_20k", |b| timed(b, &fresh, &base));
    let mut moved = base.clone();
    moved.pods[middle].ip = Some(std::net::IpAddr::from([10, 200, 0, 2]));
    g.bench_function("pod_ip_change_20k", |b| timed(b, &moved, &base));
    // what the agent pays to keep the proxies' snapshot while it builds the next model
    g.bench_function("model_clone_20k", |b| b.iter(|| black_box(model.clone())));
    g.finish();

    // lookups: a mix of allowed, L7-redirected, default-denied and unselected flows
    let model = Model::compile(&cluster, policies, opts);
    let cases: Vec<_> = [
        ("ns-10/pod-0", "ns-10/pod-5", 8080u16),
        ("ns-14/pod-2", "ns-14/pod-1", 5432),
        ("ns-13/pod-1", "ns-99/pod-3", 22),
        ("ns-19/pod-4", "ns-20/pod-7", 9090),
        ("ns-18/pod-0", "ns-18/pod-8", 7777),
    ]
    .iter()
    .map(|(dst, src, port)| {
        let ep = model.pod_endpoint(dst).expect("pod");
        let src_pod = model
            .cluster
            .pods
            .iter()
            .position(|p| &p.id() == src)
            .expect("pod");
        (ep, model.pod_identity(src_pod), *port)
    })
    .collect();
    let mut g = c.benchmark_group("lookup");
    g.bench_function("ingress_verdict", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % cases.len();
            let (ep, peer, port) = cases[i];
            black_box(model.decide(ep, Direction::Ingress, peer, Protocol::Tcp, port))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
