//! A generator of large clusters and policy sets for benchmarks: by default 20,000 pods on
//! 50 nodes in 2,000 namespaces and 2,000 policies mixing CNP (HTTP and DNS rules,
//! toFQDNs, CIDR sets with except), CCNP, NetworkPolicy (AND and OR peers, ipBlocks with
//! except), ANP and a BANP. Other sizes keep the proportions (10 pods a namespace, one
//! policy per 10 pods) and 400 pods (at most a fifth) on `node-1`, the node whose agent is measured.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use policy_model::cluster::{Cluster, ContainerPort, DnsObservation, Namespace, Node, Pod};
use policy_model::policy::{Policy, Protocol};

pub const PODS: usize = 20_000;
pub const NAMESPACES: usize = 2_000;
pub const POLICIES: usize = 2_000;
pub const NODES: usize = 50;
/// Pods on the measured node (`LOCAL_NODE`).
pub const LOCAL: usize = 400;
pub const LOCAL_NODE: &str = "node-1";

/// The size of a generated cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub pods: usize,
    pub namespaces: usize,
    pub policies: usize,
    pub nodes: usize,
    /// Pods on `LOCAL_NODE` (the others are spread over the other nodes).
    pub local: usize,
}

impl Scale {
    /// The benchmark's cluster: 20,000 pods.
    pub const DEFAULT: Scale = Scale {
        pods: PODS,
        namespaces: NAMESPACES,
        policies: POLICIES,
        nodes: NODES,
        local: LOCAL,
    };

    /// `pods` pods in the default proportions, 400 of them (at most a fifth) on `node-1`.
    pub fn pods(pods: usize) -> Scale {
        let pods = pods.max(10);
        Scale {
            pods,
            namespaces: pods / 10,
            policies: pods / 10,
            nodes: NODES,
            local: LOCAL.min(pods / 5),
        }
    }

    /// The node of pod `n`: every `pods / local`th pod, from the second one on, is on
    /// node-1 (at 20,000 pods that is pod-1 of every namespace, as `node-{n % 50}` gives);
    /// the others go round-robin over the other nodes.
    pub fn node_of(&self, n: usize) -> String {
        let stride = (self.pods / self.local.max(1)).max(1);
        if n % stride == 1 % stride && n / stride < self.local {
            return LOCAL_NODE.to_string();
        }
        let other = n % (self.nodes - 1);
        format!("node-{}", if other >= 1 { other + 1 } else { 0 })
    }
}

fn ip(n: usize) -> std::net::IpAddr {
    std::net::IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8])
}

pub fn cluster() -> Cluster {
    cluster_at(Scale::DEFAULT)
}

pub fn cluster_at(s: Scale) -> Cluster {
    let mut c = Cluster::default();
    for i in 0..s.namespaces {
        c.namespaces.push(Namespace {
            name: format!("ns-{i}"),
            labels: [
                ("team".to_string(), format!("t{}", i % 50)),
                (
                    "env".to_string(),
                    if i % 3 == 0 { "dev" } else { "prod" }.to_string(),
                ),
            ]
            .into(),
        });
    }
    c.namespaces.push(Namespace {
        name: "kube-system".into(),
        labels: Default::default(),
    });
    for i in 0..s.nodes {
        c.nodes.push(Node {
            name: format!("node-{i}"),
            ip: std::net::IpAddr::from([172, 18, 0, i as u8 + 2]),
            labels: Default::default(),
        });
    }
    let tiers = ["frontend", "backend", "db"];
    let per_ns = s.pods / s.namespaces;
    for n in 0..s.pods {
        let k = n % per_ns;
        c.pods.push(Pod {
            namespace: format!("ns-{}", n / per_ns),
            name: format!("pod-{k}"),
            labels: [
                ("app".to_string(), format!("app-{}", k % 5)),
                ("tier".to_string(), tiers[k % 3].to_string()),
            ]
            .into(),
            ip: Some(ip(n + 256)),
            ips: vec![],
            node: Some(s.node_of(n)),
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("metrics".into()),
                    port: 9090,
                    protocol: Protocol::Tcp,
                },
            ],
            tls: None,
            service_account: None,
        });
    }
    c.pods.push(Pod {
        namespace: "kube-system".into(),
        name: "coredns".into(),
        labels: [("k8s-app".to_string(), "kube-dns".to_string())].into(),
        ip: Some(ip(1)),
        ips: vec![],
        node: Some("node-0".into()),
        ports: vec![],
        tls: None,
        service_account: None,
    });
    for i in (0..s.policies).filter(|i| i % 10 == 3) {
        c.dns.push(DnsObservation {
            client: format!("ns-{}/pod-0", i % s.namespaces),
            name: format!("api-{i}.example.com"),
            ips: vec![std::net::IpAddr::from([203, 0, 113, (i % 250) as u8])],
        });
    }
    c
}

pub fn policy_yaml(i: usize) -> String {
    policy_yaml_at(Scale::DEFAULT, i)
}

/// Policy `i` of a generated set: its kind follows `i % 10`, its namespace `i`.
pub fn policy_yaml_at(s: Scale, i: usize) -> String {
    let ns = format!("ns-{}", i % s.namespaces);
    let app = format!("app-{}", i % 5);
    match i % 10 {
        0..=2 => format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web-{i}, namespace: {ns}}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{tier: frontend}}}}]
    toPorts:
    - ports: [{{port: "8080", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: "/v1/.*"}}
        - {{method: POST, path: /v1/orders, headers: ["X-Team: t{i}"]}}
  egress:
  - toEndpoints: [{{matchLabels: {{"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}}}]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.example.com"}}]
"#
        ),
        3 => format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: ext-{i}, namespace: {ns}}}
spec:
  endpointSelector: {{matchLabels: {{tier: backend}}}}
  egress:
  - toFQDNs: [{{matchName: api-{i}.example.com}}, {{matchPattern: "*.pay-{i}.example"}}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
  - toCIDRSet: [{{cidr: 0.0.0.0/0, except: [169.254.169.254/32, 10.0.0.0/8]}}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"#
        ),
        4..=6 => format!(
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db-{i}, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{tier: db}}}}
  ingress:
  - from:
    - podSelector: {{matchLabels: {{tier: backend}}}}
    - namespaceSelector: {{matchLabels: {{team: t{t}}}}}
      podSelector: {{matchLabels: {{app: {app}}}}}
    ports: [{{port: 5432}}, {{port: http}}]
  egress:
  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.255.0.0/16]}}}}]
    ports: [{{port: 5432, endPort: 5440}}]
"#,
            t = (i / 10) % 50
        ),
        7 => format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {{name: ccnp-{i}}}
spec:
  endpointSelector: {{matchLabels: {{"k8s:io.kubernetes.pod.namespace": {ns}, app: {app}}}}}
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{{ports: [{{port: "22", protocol: TCP}}]}}]
  ingress:
  - fromEntities: [cluster]
    toPorts: [{{ports: [{{port: metrics, protocol: TCP}}]}}]
"#
        ),
        8 => format!(
            r#"apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {{name: anp-{i}}}
spec:
  priority: {p}
  subject: {{namespaces: {{matchLabels: {{team: t{t}}}}}}}
  ingress:
  - name: deny-other-team
    action: Deny
    from: [{{namespaces: {{matchLabels: {{team: t{u}}}}}}}]
    ports: [{{portNumber: {{protocol: TCP, port: 9090}}}}]
  - name: pass-monitoring
    action: Pass
    from: [{{namespaces: {{matchLabels: {{env: prod}}}}}}]
"#,
            p = i % 1000,
            t = (i / 10) % 50,
            u = (i / 10 + 1) % 50
        ),
        _ => format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: cluster-{i}, namespace: {ns}}}
spec:
  endpointSelector: {{}}
  ingress:
  - fromEntities: [cluster]
    toPorts: [{{ports: [{{port: http, protocol: TCP}}]}}]
  - fromEndpoints: [{{matchLabels: {{"io.cilium.k8s.namespace.labels.env": prod}}}}]
"#
        ),
    }
}

pub fn policies() -> Vec<Policy> {
    policies_at(Scale::DEFAULT)
}

/// Every policy of a generated set as one YAML stream (the BANP last).
pub fn policies_yaml_at(s: Scale) -> String {
    let mut text = String::new();
    for i in 0..s.policies {
        text.push_str("---\n");
        text.push_str(&policy_yaml_at(s, i));
    }
    text.push_str(
        r#"---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - {name: deny-world-ssh, action: Deny, from: [{namespaces: {}}], ports: [{portNumber: {port: 22}}]}
"#,
    );
    text
}

pub fn policies_at(s: Scale) -> Vec<Policy> {
    let text = policies_yaml_at(s);
    let (policies, errors, _) = policy_model::api::load(&text, Some("generated"));
    assert!(errors.is_empty(), "generated policies invalid: {errors:?}");
    assert!(policies.len() > s.policies, "every object translated");
    policies
}
