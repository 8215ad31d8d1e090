//! The per-request decision with 1,000 HTTP rules on one port: what the proxy runs for
//! every request once the connection's rule set is resolved. Target: under 300 ns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use policy_model::http::SimpleRequest;
use policy_model::{CompileOptions, Direction, Model, Protocol};

const CLUSTER: &str = r#"
namespaces:
  - {name: default}
pods:
  - {namespace: default, name: client, labels: {app: client}, ip: 10.0.0.1}
  - {namespace: default, name: web, labels: {app: web}, ip: 10.0.0.2}
"#;

fn model(rules: usize) -> Model {
    let mut http = String::new();
    for i in 0..rules {
        let method = ["GET", "POST", "PUT", "DELETE"][i % 4];
        writeln!(
            http,
            "        - {{method: {method}, path: \"/api/v1/service{i}/items(/[0-9]+)?\"}}"
        )
        .unwrap();
    }
    let policy = format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web-l7, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
{http}"#
    );
    let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
    let (policies, errors, _) = policy_model::api::load(&policy, None);
    assert!(errors.is_empty(), "{errors:?}");
    Model::compile(&cluster, policies, CompileOptions::default())
}

fn request(method: &str, path: &str) -> SimpleRequest {
    SimpleRequest {
        method: method.into(),
        path: path.into(),
        host: Some("web".into()),
        headers: vec![
            ("user-agent".into(), "bench".into()),
            ("accept".into(), "*/*".into()),
        ],
    }
}

fn bench(c: &mut Criterion) {
    let m = model(1000);
    let ep = m.pod_endpoint("default/web").unwrap();
    let peer = m.identity_of("10.0.0.1".parse().unwrap(), None);
    let conn = policy_model::flow::ConnectionPolicy {
        sides: vec![m.side_policy(ep, Direction::Ingress, peer, Protocol::Tcp, 80)],
    };
    assert!(conn.has_rules());

    let first = request("GET", "/api/v1/service0/items/42");
    let last = request("DELETE", "/api/v1/service999/items/42");
    let miss = request("GET", "/api/v1/service999/items/42");
    assert!(m.check_http(&conn, &first).allowed);
    assert!(m.check_http(&conn, &last).allowed);
    assert!(!m.check_http(&conn, &miss).allowed);

    let mut g = c.benchmark_group("decision_1000_rules");
    g.bench_function("allow_first_rule", |b| {
        b.iter(|| black_box(m.check_http(black_box(&conn), black_box(&first))))
    });
    g.bench_function("allow_last_rule", |b| {
        b.iter(|| black_box(m.check_http(black_box(&conn), black_box(&last))))
    });
    g.bench_function("deny_no_rule", |b| {
        b.iter(|| black_box(m.check_http(black_box(&conn), black_box(&miss))))
    });
    // the rule-set match alone, without assembling the decision
    let set = &m.l7[0];
    g.bench_function("rule_set_match_last_rule", |b| {
        b.iter(|| black_box(set.http_matches(black_box(&last))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
