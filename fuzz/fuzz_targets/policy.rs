//! Arbitrary text through parsing, validation, compilation and verdicts: nothing may
//! panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_model::api::load;
use policy_model::http::SimpleRequest;
use policy_model::{Cluster, CompileOptions, EndpointRef, Model, Protocol, Query};

const CLUSTER: &str = r#"
namespaces: [{name: x, labels: {team: a}}, {name: y}]
nodes: [{name: n1, ip: 172.18.0.2}, {name: n2, ip: 172.18.0.3}]
pods:
  - {namespace: x, name: a, labels: {app: a}, ip: 10.0.0.1, node: n1, ports: [{name: http, port: 80}]}
  - {namespace: y, name: b, labels: {app: b}, ip: 10.0.0.2, node: n2, ports: [{name: dns, port: 53, protocol: UDP}]}
externals: [{name: w, ip: 192.0.2.1}]
dns: [{client: x/a, name: api.example.com, ips: [192.0.2.1]}]
"#;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // the input as a cluster file
    let _ = serde_yaml::from_str::<Cluster>(&text);
    // the input as a conformance case
    if let Ok(case) = policy_model::conformance::parse_case(&text) {
        let _ = case.run(None, None);
    }
    // the input as policies over a fixed cluster
    let (policies, _errors, _objects) = load(&text, Some("fuzz"));
    let Ok(cluster) = serde_yaml::from_str::<Cluster>(CLUSTER) else {
        return;
    };
    for cidr in [false, true] {
        let model = Model::compile(&cluster, policies.clone(), CompileOptions { cidr_matches_cluster: cidr });
        for (from, to, port, proto) in [
            ("x/a", "y/b", 53, Protocol::Udp),
            ("y/b", "x/a", 80, Protocol::Tcp),
            ("x/a", "external:w", 443, Protocol::Tcp),
            ("node:n2", "x/a", 80, Protocol::Sctp),
        ] {
            let q = Query {
                from: EndpointRef::parse(from).expect("valid ref"),
                to: EndpointRef::parse(to).expect("valid ref"),
                port,
                protocol: proto,
                http: Some(SimpleRequest {
                    method: "GET".into(),
                    path: "/a/../b?x=1".into(),
                    host: None,
                    headers: vec![("X-Token".into(), "t".into())],
                }),
                dns: Some("api.example.com".into()),
            };
            let _ = model.query(&q);
        }
    }
});
