//! Semantics: compiled policies answer flow queries as Cilium (CNP/CCNP), Kubernetes
//! (NetworkPolicy) and the AdminNetworkPolicy API define. Every test checks concrete flows
//! on the small cluster of `common::CLUSTER` and, where it matters, the opposite case.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{accept, cluster, dedent, Env, CLUSTER};
use policy_model::verdict::Layer;
use policy_model::{CompileOptions, Direction, Model};

/// A CNP in namespace `ns` with a spec written as flow-style YAML lines.
fn cnp(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{}---\n",
        indent(spec)
    )
}

fn ccnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}---\n",
        indent(spec)
    )
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{}---\n",
        indent(spec)
    )
}

fn anp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}---\n",
        indent(spec)
    )
}

fn banp(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec:\n{}---\n",
        indent(spec)
    )
}

fn cnp2(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}---\n",
        indent(spec)
    )
}

fn indent(s: &str) -> String {
    dedent(s).lines().map(|l| format!("  {l}\n")).collect()
}

fn env(policies: &[String]) -> Env {
    Env::new(&policies.concat())
}

fn env_cidr(policies: &[String], cidr_matches_cluster: bool) -> Env {
    Env::with(CLUSTER, &policies.concat(), cidr_matches_cluster)
}

// ---------------------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------------------

/// x/b's ingress is open only to the sources its selector picks.
fn ingress_to_xb_from(peer: &str) -> Env {
    env(&[cnp(
        "x",
        "p",
        &format!(
            "endpointSelector: {{matchLabels: {{app: b}}}}\ningress: [{{fromEndpoints: [{peer}]}}]"
        ),
    )])
}

/// x/a's ingress is open only to the sources its selector picks.
fn ingress_to_xa_from(peer: &str) -> Env {
    env(&[cnp(
        "x",
        "p",
        &format!(
            "endpointSelector: {{matchLabels: {{app: a}}}}\ningress: [{{fromEndpoints: [{peer}]}}]"
        ),
    )])
}

#[test]
fn match_labels_are_anded() {
    let e = ingress_to_xb_from("{matchLabels: {app: a, tier: web}}");
    assert!(e.tcp("x/a", "x/b", 80));
    assert!(!e.tcp("x/c", "x/b", 80));
    let e = ingress_to_xb_from("{matchLabels: {app: c, tier: web}}");
    assert!(!e.tcp("x/a", "x/b", 80));
    assert!(!e.tcp("x/c", "x/b", 80));
}

#[test]
fn match_expressions_in_and_not_in() {
    let e = ingress_to_xb_from("{matchExpressions: [{key: app, operator: In, values: [a, z]}]}");
    assert!(e.tcp("x/a", "x/b", 80));
    assert!(!e.tcp("x/c", "x/b", 80));
    let e = ingress_to_xb_from("{matchExpressions: [{key: app, operator: NotIn, values: [a]}]}");
    assert!(!e.tcp("x/a", "x/b", 80));
    assert!(e.tcp("x/c", "x/b", 80));
}

#[test]
fn match_expressions_exists_and_does_not_exist() {
    // x/b has no tier label, x/c has tier=db
    let e = ingress_to_xa_from("{matchExpressions: [{key: tier, operator: Exists}]}");
    assert!(e.tcp("x/c", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 80));
    let e = ingress_to_xa_from("{matchExpressions: [{key: tier, operator: DoesNotExist}]}");
    assert!(!e.tcp("x/c", "x/a", 80));
    assert!(e.tcp("x/b", "x/a", 80));
    // NotIn also matches pods without the key
    let e = ingress_to_xa_from("{matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}");
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("x/c", "x/a", 80));
}

// ---------------------------------------------------------------------------------------
// Namespaces and label sources
// ---------------------------------------------------------------------------------------

#[test]
fn cnp_peer_selectors_are_scoped_to_the_policy_namespace() {
    let e = ingress_to_xa_from("{matchLabels: {app: b}}");
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("y/b", "x/a", 80), "y/b is in another namespace");
    let e = ingress_to_xa_from("{}");
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("y/b", "x/a", 80), "{{}} is namespace-scoped too");
    assert!(!e.tcp("external:ext", "x/a", 80));
}

#[test]
fn cnp_peer_selector_naming_a_namespace_or_namespace_labels_is_not_rescoped() {
    let e = ingress_to_xa_from("{matchLabels: {app: b, io.kubernetes.pod.namespace: y}}");
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 80));
    let e = ingress_to_xa_from("{matchLabels: {app: b, io.cilium.k8s.namespace.labels.team: red}}");
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 80), "x has team=blue");
    let e = ingress_to_xa_from(
        "{matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}], matchLabels: {app: b}}",
    );
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("x/b", "x/a", 80));
}

#[test]
fn ccnp_peers_select_pods_of_any_namespace() {
    let e = env(&[ccnp(
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}]",
    )]);
    // selects x/a, y/a and z/a; peers app=b in x and y
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("x/b", "z/a", 80));
    assert!(!e.tcp("x/c", "y/a", 80));
    // an empty CCNP peer selector selects every pod, but no non-pod
    let e = env(&[ccnp(
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{}]}]",
    )]);
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("x/c", "z/a", 80));
    assert!(!e.tcp("external:ext", "x/a", 80));
    assert!(!e.tcp("node:node-1", "x/a", 80));
}

#[test]
fn cnp_endpoint_selector_selects_only_pods_of_its_namespace() {
    // an empty ingress rule isolates the selected pods
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{}]",
    )]);
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("y/b", "y/a", 80), "y/a has app=a but lives in y");
    assert!(e.tcp("y/b", "z/a", 80));
    // a different namespace written in the selector does not move the policy
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a, io.kubernetes.pod.namespace: y}}\ningress: [{}]",
    )]);
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("y/b", "y/a", 80));
}

#[test]
fn cilium_label_source_prefixes() {
    for peer in [
        "{matchLabels: {'k8s:app': b}}",
        "{matchLabels: {'any:app': b}}",
        "{matchExpressions: [{key: 'k8s:app', operator: In, values: [b]}]}",
    ] {
        let e = ingress_to_xa_from(peer);
        assert!(e.tcp("x/b", "x/a", 80), "{peer}");
        assert!(!e.tcp("x/c", "x/a", 80), "{peer}");
    }
    // another source does not match k8s labels
    let e = ingress_to_xa_from("{matchLabels: {'container:app': b}}");
    assert!(!e.tcp("x/b", "x/a", 80));
    // a prefixed namespace key names a namespace
    for key in [
        "k8s:io.kubernetes.pod.namespace",
        "any:io.kubernetes.pod.namespace",
    ] {
        let e = ingress_to_xa_from(&format!("{{matchLabels: {{'{key}': y, app: b}}}}"));
        assert!(e.tcp("y/b", "x/a", 80), "{key}");
        assert!(!e.tcp("x/b", "x/a", 80), "{key}");
    }
}

// ---------------------------------------------------------------------------------------
// Entities
// ---------------------------------------------------------------------------------------

fn ingress_to_xa_from_entities(entities: &str) -> Env {
    env(&[cnp(
        "x",
        "p",
        &format!("endpointSelector: {{matchLabels: {{app: a}}}}\ningress: [{{fromEntities: [{entities}]}}]"),
    )])
}

#[test]
fn entity_world() {
    let e = ingress_to_xa_from_entities("world");
    assert!(e.tcp("external:ext", "x/a", 80));
    assert!(e.tcp("192.0.2.200", "x/a", 80), "any outside IP");
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("node:node-1", "x/a", 80));
    assert!(!e.tcp("node:node-2", "x/a", 80));
}

#[test]
fn entity_cluster() {
    let e = ingress_to_xa_from_entities("cluster");
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("node:node-1", "x/a", 80));
    assert!(e.tcp("node:node-2", "x/a", 80));
    assert!(!e.tcp("external:ext", "x/a", 80));
}

#[test]
fn entity_all() {
    let e = ingress_to_xa_from_entities("all");
    for src in ["y/b", "node:node-1", "node:node-2", "external:ext"] {
        assert!(e.tcp(src, "x/a", 80), "{src}");
    }
}

#[test]
fn entity_host_and_remote_node_depend_on_the_pods_node() {
    // x/a is on node-1, x/c on node-2
    let select = "endpointSelector: {matchExpressions: [{key: tier, operator: Exists}]}";
    let e = env(&[cnp(
        "x",
        "p",
        &format!("{select}\ningress: [{{fromEntities: [host]}}]"),
    )]);
    assert!(e.tcp("node:node-1", "x/a", 80));
    assert!(!e.tcp("node:node-2", "x/a", 80));
    assert!(e.tcp("node:node-2", "x/c", 80));
    assert!(!e.tcp("node:node-1", "x/c", 80));
    assert!(!e.tcp("x/b", "x/a", 80));
    let e = env(&[cnp(
        "x",
        "p",
        &format!("{select}\ningress: [{{fromEntities: [remote-node]}}]"),
    )]);
    assert!(!e.tcp("node:node-1", "x/a", 80));
    assert!(e.tcp("node:node-2", "x/a", 80));
    assert!(e.tcp("node:node-1", "x/c", 80));
    assert!(!e.tcp("node:node-2", "x/c", 80));
    // the same by IP
    assert!(e.tcp("172.18.0.3", "x/a", 80));
    assert!(!e.tcp("172.18.0.2", "x/a", 80));
}

#[test]
fn egress_to_entities_world_vs_cluster() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\negress: [{toEntities: [world]}]",
    )]);
    assert!(e.tcp("x/a", "external:ext", 443));
    assert!(!e.tcp("x/a", "y/b", 80));
    assert!(!e.tcp("x/a", "node:node-2", 80));
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\negress: [{toEntities: [cluster]}]",
    )]);
    assert!(!e.tcp("x/a", "external:ext", 443));
    assert!(e.tcp("x/a", "y/b", 80));
    assert!(e.tcp("x/a", "node:node-2", 80));
}

// ---------------------------------------------------------------------------------------
// CIDRs
// ---------------------------------------------------------------------------------------

#[test]
fn cidr_with_except() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\negress: [{toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.8/29]}]}]",
    )]);
    assert!(e.tcp("x/a", "203.0.113.7", 80));
    assert!(
        !e.tcp("x/a", "external:ext", 80),
        "203.0.113.10 is excepted"
    );
    assert!(!e.tcp("x/a", "203.0.113.15", 80));
    assert!(e.tcp("x/a", "203.0.113.16", 80));
    assert!(!e.tcp("x/a", "external:ext2", 80), "outside the CIDR");
    // ingress too
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromCIDRSet: [{cidr: 0.0.0.0/0, except: [198.51.100.0/24]}]}]",
    )]);
    assert!(e.tcp("external:ext", "x/a", 80));
    assert!(!e.tcp("external:ext2", "x/a", 80));
}

#[test]
fn cidr_matches_pod_and_node_ips_only_with_the_option() {
    let policies = [cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\negress: [{toCIDR: [10.0.1.0/24, 172.18.0.0/16]}]",
    )];
    let cilium = env_cidr(&policies, false);
    assert!(!cilium.tcp("x/a", "y/a", 80), "pod IP inside the CIDR");
    assert!(
        !cilium.tcp("x/a", "node:node-2", 80),
        "node IP inside the CIDR"
    );
    assert!(
        cilium.tcp("x/a", "10.0.1.99", 80),
        "unowned IP inside the CIDR"
    );
    let k8s = env_cidr(&policies, true);
    assert!(k8s.tcp("x/a", "y/a", 80));
    assert!(k8s.tcp("x/a", "node:node-2", 80));
    assert!(!k8s.tcp("x/a", "z/a", 80), "10.0.2.1 is outside");
    // NetworkPolicy ipBlock follows the same option
    let nps = [np(
        "x",
        "p",
        "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.1.0/24}}]}]",
    )];
    assert!(!env_cidr(&nps, false).tcp("y/a", "x/a", 80));
    assert!(env_cidr(&nps, true).tcp("y/a", "x/a", 80));
}

// ---------------------------------------------------------------------------------------
// Ports and protocols
// ---------------------------------------------------------------------------------------

#[test]
fn named_ports_resolve_per_destination_pod_on_ingress() {
    // x/a: http=80, x/b: http=8080, x/c: no named port
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: http, protocol: TCP}]}]}]",
    )]);
    assert!(e.tcp("y/a", "x/a", 80));
    assert!(!e.tcp("y/a", "x/a", 8080));
    assert!(e.tcp("y/a", "x/b", 8080));
    assert!(!e.tcp("y/a", "x/b", 80));
    assert!(!e.tcp("y/a", "x/c", 80));
    assert!(!e.tcp("y/a", "x/c", 8080));
}

#[test]
fn named_ports_resolve_per_destination_identity_on_egress() {
    let e = env(&[cnp(
        "y",
        "p",
        "endpointSelector: {matchLabels: {app: b}}\negress: [{toEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: x}}], toPorts: [{ports: [{port: http}]}]}]",
    )]);
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("y/b", "x/a", 8080));
    assert!(e.tcp("y/b", "x/b", 8080));
    assert!(!e.tcp("y/b", "x/b", 80));
    assert!(!e.tcp("y/b", "x/c", 80));
}

#[test]
fn named_ports_resolve_per_protocol() {
    // x/a: dns = 53/UDP
    let any = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{toPorts: [{ports: [{port: dns}]}]}]",
    )]);
    assert!(any.udp("y/a", "x/a", 53));
    assert!(!any.tcp("y/a", "x/a", 53));
    let tcp = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{toPorts: [{ports: [{port: dns, protocol: TCP}]}]}]",
    )]);
    assert!(!tcp.udp("y/a", "x/a", 53));
    assert!(!tcp.tcp("y/a", "x/a", 53));
    // egress: the destination's named port with its protocol
    let egress = env(&[cnp(
        "y",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\negress: [{toPorts: [{ports: [{port: dns, protocol: UDP}]}]}]",
    )]);
    assert!(egress.udp("y/a", "x/a", 53));
    assert!(!egress.tcp("y/a", "x/a", 53));
}

#[test]
fn end_port_ranges_are_inclusive() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{toPorts: [{ports: [{port: '8000', endPort: 8080, protocol: TCP}]}]}]",
    )]);
    assert!(!e.tcp("y/a", "x/a", 7999));
    assert!(e.tcp("y/a", "x/a", 8000));
    assert!(e.tcp("y/a", "x/a", 8042));
    assert!(e.tcp("y/a", "x/a", 8080));
    assert!(!e.tcp("y/a", "x/a", 8081));
    // NetworkPolicy endPort too
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {}\ningress: [{ports: [{port: 30, endPort: 40}]}]",
    )]);
    assert!(!e.tcp("y/a", "x/a", 29));
    assert!(e.tcp("y/a", "x/a", 30));
    assert!(e.tcp("y/a", "x/a", 40));
    assert!(!e.tcp("y/a", "x/a", 41));
}

#[test]
fn protocol_any_covers_tcp_udp_and_sctp() {
    for ports in ["[{port: '5000'}]", "[{port: '5000', protocol: ANY}]"] {
        let e = env(&[cnp(
            "x",
            "p",
            &format!("endpointSelector: {{matchLabels: {{app: a}}}}\ningress: [{{toPorts: [{{ports: {ports}}}]}}]"),
        )]);
        assert!(e.tcp("y/a", "x/a", 5000), "{ports}");
        assert!(e.udp("y/a", "x/a", 5000), "{ports}");
        assert!(e.sctp("y/a", "x/a", 5000), "{ports}");
        assert!(!e.tcp("y/a", "x/a", 5001), "{ports}");
    }
}

#[test]
fn a_udp_rule_does_not_allow_tcp() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{toPorts: [{ports: [{port: '53', protocol: UDP}]}]}]",
    )]);
    assert!(e.udp("y/a", "x/a", 53));
    assert!(!e.tcp("y/a", "x/a", 53));
    assert!(!e.sctp("y/a", "x/a", 53));
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {}\ningress: [{ports: [{port: 53, protocol: UDP}]}]",
    )]);
    assert!(e.udp("y/a", "x/a", 53));
    assert!(!e.tcp("y/a", "x/a", 53));
}

#[test]
fn icmp_rules_allow_only_their_types() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEntities: [all], icmps: [{fields: [{type: EchoRequest}]}]}]",
    )]);
    let icmp = |t: u16| {
        e.flow("y/b", "x/a", t, policy_model::Protocol::Icmp)
            .allowed
    };
    assert!(icmp(8));
    assert!(!icmp(0));
    assert!(!e.tcp("y/b", "x/a", 8), "ICMP rules allow no TCP");
    // an L3-only rule allows ICMP too, a port rule with protocol ANY does not
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}, {fromEndpoints: [{matchLabels: {app: c}}], toPorts: [{ports: [{port: '0'}]}]}]",
    )]);
    assert!(
        e.flow("x/b", "x/a", 8, policy_model::Protocol::Icmp)
            .allowed
    );
    assert!(
        !e.flow("x/c", "x/a", 8, policy_model::Protocol::Icmp)
            .allowed
    );
    assert!(e.tcp("x/c", "x/a", 1234));
}

// ---------------------------------------------------------------------------------------
// Combining directions, policies, deny and default deny
// ---------------------------------------------------------------------------------------

#[test]
fn egress_and_ingress_are_decided_independently_and_both_must_allow() {
    let e = env(&[
        // x/a may only talk to y/b
        cnp(
            "x",
            "out",
            "endpointSelector: {matchLabels: {app: a}}\negress: [{toEndpoints: [{matchLabels: {app: b, io.kubernetes.pod.namespace: y}}]}]",
        ),
        // y/a accepts only x/a
        cnp(
            "y",
            "in",
            "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: a, io.kubernetes.pod.namespace: x}}]}]",
        ),
    ]);
    let v = e.flow("x/a", "y/a", 80, policy_model::Protocol::Tcp);
    assert!(!v.allowed, "ingress allows, egress does not");
    let egress = v
        .sides
        .iter()
        .find(|s| s.direction == Direction::Egress)
        .unwrap();
    let ingress = v
        .sides
        .iter()
        .find(|s| s.direction == Direction::Ingress)
        .unwrap();
    assert!(!egress.allowed);
    assert!(ingress.allowed);
    assert!(e.tcp("x/a", "y/b", 80), "egress allows, y/b has no policy");
    assert!(!e.tcp("x/b", "y/a", 80), "x/b is free to send, y/a refuses");
    let v = e.flow("x/b", "y/a", 80, policy_model::Protocol::Tcp);
    let egress = v
        .sides
        .iter()
        .find(|s| s.direction == Direction::Egress)
        .unwrap();
    assert!(egress.allowed);
    // once the egress side also allows, the flow goes through
    let e = env(&[
        cnp(
            "x",
            "out",
            "endpointSelector: {matchLabels: {app: a}}\negress: [{toEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: y}}]}]",
        ),
        cnp(
            "y",
            "in",
            "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: a, io.kubernetes.pod.namespace: x}}]}]",
        ),
    ]);
    assert!(e.tcp("x/a", "y/a", 80));
}

#[test]
fn allows_add_up_across_policies() {
    let from_xb = cnp(
        "x",
        "one",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}]",
    );
    let from_yb = cnp(
        "x",
        "two",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: b, io.kubernetes.pod.namespace: y}}]}]",
    );
    let both = env(&[from_xb.clone(), from_yb]);
    assert!(both.tcp("x/b", "x/a", 80));
    assert!(both.tcp("y/b", "x/a", 80));
    assert!(!both.tcp("z/a", "x/a", 80));
    let one = env(&[from_xb]);
    assert!(one.tcp("x/b", "x/a", 80));
    assert!(!one.tcp("y/b", "x/a", 80));
}

#[test]
fn deny_beats_allow() {
    let allow_all = cnp(
        "x",
        "allow",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEntities: [all]}]\negress: [{toEntities: [all]}]",
    );
    let deny = cnp(
        "x",
        "deny",
        "endpointSelector: {matchLabels: {app: a}}\ningressDeny: [{fromEndpoints: [{matchLabels: {app: b}}]}]\negressDeny: [{toPorts: [{ports: [{port: '443', protocol: TCP}]}]}]",
    );
    let e = env(&[allow_all.clone(), deny]);
    assert!(!e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("x/c", "x/a", 80));
    assert!(!e.tcp("x/a", "external:ext", 443));
    assert!(e.tcp("x/a", "external:ext", 80));
    let v = e.flow("x/b", "x/a", 80, policy_model::Protocol::Tcp);
    assert_eq!(v.layer, Some(Layer::L3));
    let ingress = v.sides.iter().find(|s| !s.allowed).unwrap();
    assert_eq!(
        ingress.policy.as_deref(),
        Some("CiliumNetworkPolicy x/deny")
    );
    let allowed_only = env(&[allow_all]);
    assert!(allowed_only.tcp("x/b", "x/a", 80));
    assert!(allowed_only.tcp("x/a", "external:ext", 443));
}

#[test]
fn cilium_deny_beats_a_network_policy_allow() {
    let e = env(&[
        np("x", "allow-all", "podSelector: {}\ningress: [{}]"),
        ccnp(
            "deny-y",
            "endpointSelector: {matchLabels: {io.kubernetes.pod.namespace: x}}\ningressDeny: [{fromEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: y}}]}]",
        ),
    ]);
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("z/a", "x/a", 80));
    assert!(e.tcp("external:ext", "x/a", 80));
}

#[test]
fn default_deny_is_per_direction() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}]",
    )]);
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80), "ingress is default deny");
    assert!(e.tcp("x/a", "z/a", 80), "egress has no rules: still open");
    assert!(e.tcp("x/a", "external:ext", 80));
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\negress: [{toEndpoints: [{matchLabels: {app: b}}]}]",
    )]);
    assert!(e.tcp("x/a", "x/b", 80));
    assert!(!e.tcp("x/a", "z/a", 80), "egress is default deny");
    assert!(e.tcp("z/a", "x/a", 80), "ingress has no rules: still open");
}

#[test]
fn enable_default_deny_false_keeps_default_allow_but_deny_rules_still_deny() {
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\nenableDefaultDeny: {ingress: false}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}]\ningressDeny: [{fromEndpoints: [{matchLabels: {app: c}}]}]",
    )]);
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("z/a", "x/a", 80), "not in default deny");
    assert!(e.tcp("external:ext", "x/a", 80));
    assert!(!e.tcp("x/c", "x/a", 80), "deny rules still deny");
    // the same policy without enableDefaultDeny isolates x/a
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}]\ningressDeny: [{fromEndpoints: [{matchLabels: {app: c}}]}]",
    )]);
    assert!(!e.tcp("z/a", "x/a", 80));
    // any selecting policy that asks for default deny switches it on
    let e = env(&[
        cnp(
            "x",
            "lenient",
            "endpointSelector: {matchLabels: {app: a}}\nenableDefaultDeny: {ingress: false, egress: false}\ningress: [{fromEndpoints: [{matchLabels: {app: b}}]}]",
        ),
        cnp(
            "x",
            "strict",
            "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {app: c}}]}]",
        ),
    ]);
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("x/c", "x/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80));
}

#[test]
fn a_pod_selected_by_no_policy_is_allowed() {
    let e = Env::empty();
    assert!(e.tcp("x/a", "y/b", 80));
    assert!(e.udp("external:ext", "z/a", 53));
    let v = e.flow("x/a", "y/b", 80, policy_model::Protocol::Tcp);
    assert_eq!(v.sides.len(), 2);
    assert!(v
        .sides
        .iter()
        .all(|s| s.allowed && s.reason.contains("no policy selects")));
    // a policy for x/a does not affect x/b
    let e = env(&[cnp(
        "x",
        "p",
        "endpointSelector: {matchLabels: {app: a}}\ningress: [{}]\negress: [{}]",
    )]);
    assert!(!e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("x/a", "x/b", 80));
    assert!(e.tcp("x/c", "x/b", 80));
    assert!(e.tcp("x/b", "x/c", 80));
}

// ---------------------------------------------------------------------------------------
// L7 HTTP
// ---------------------------------------------------------------------------------------

/// x/b (port 8080) accepts HTTP from x/a and y/a matching `rules`.
fn http_env(rules: &str) -> Env {
    env(&[cnp(
        "x",
        "web",
        &format!(
            "endpointSelector: {{matchLabels: {{app: b}}}}\ningress:\n- fromEndpoints: [{{matchLabels: {{app: a}}}}]\n  toPorts:\n  - ports: [{{port: '8080', protocol: TCP}}]\n    rules:\n      http: {rules}\n"
        ),
    )])
}

#[test]
fn l4_only_allow_makes_l7_moot_for_its_peers_only() {
    let e = env(&[
        cnp(
            "x",
            "l7",
            "endpointSelector: {matchLabels: {app: b}}\ningress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{method: GET, path: /public}]}}]}]",
        ),
        cnp(
            "x",
            "l4",
            "endpointSelector: {matchLabels: {app: b}}\ningress: [{fromEndpoints: [{matchLabels: {app: c}}], toPorts: [{ports: [{port: '8080', protocol: TCP}]}]}]",
        ),
    ]);
    // x/c is covered by the L4-only rule: anything goes, still through the proxy
    let v = e.http_verdict("x/c", "x/b", 8080, "POST", "/private", &[]);
    assert!(v.allowed);
    assert!(v.sides.iter().any(|s| s.proxied));
    // x/a only by the L7 rule
    assert!(e.http("x/a", "x/b", 8080, "GET", "/public"));
    let v = e.http_verdict("x/a", "x/b", 8080, "GET", "/private", &[]);
    assert!(!v.allowed);
    assert_eq!(v.layer, Some(Layer::L7));
    // without the L4 rule, x/c is filtered too
    let e = env(&[cnp(
        "x",
        "l7",
        "endpointSelector: {matchLabels: {app: b}}\ningress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{method: GET, path: /public}]}}]}]",
    )]);
    assert!(!e.http("x/c", "x/b", 8080, "POST", "/private"));
}

#[test]
fn http_path_is_an_anchored_full_match_including_the_query() {
    let e = http_env("[{path: /public}]");
    assert!(e.http("x/a", "x/b", 8080, "GET", "/public"));
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/public/x"));
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/x/public"));
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/publicity"));
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/public?x=1"));
    let e = http_env(r"[{path: '/public(\?.*)?'}]");
    assert!(e.http("x/a", "x/b", 8080, "GET", "/public?x=1"));
    assert!(e.http("x/a", "x/b", 8080, "GET", "/public"));
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/public/x"));
    let e = http_env("[{path: '/api/v[0-9]+/.*'}]");
    assert!(e.http("x/a", "x/b", 8080, "GET", "/api/v2/users"));
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/api/vX/users"));
}

#[test]
fn http_method_is_an_anchored_full_match() {
    let e = http_env("[{method: GET}]");
    assert!(e.http("x/a", "x/b", 8080, "GET", "/anything"));
    assert!(!e.http("x/a", "x/b", 8080, "GETX", "/"));
    assert!(!e.http("x/a", "x/b", 8080, "POST", "/"));
    let e = http_env("[{method: 'GET|HEAD'}]");
    assert!(e.http("x/a", "x/b", 8080, "HEAD", "/"));
    assert!(e.http("x/a", "x/b", 8080, "GET", "/"));
    assert!(!e.http("x/a", "x/b", 8080, "XHEAD", "/"));
    assert!(!e.http("x/a", "x/b", 8080, "DELETE", "/"));
}

#[test]
fn http_host_is_an_anchored_full_match() {
    let e = http_env(r"[{host: 'api\.example\.com'}]");
    let host = |h: &str| e.http_h("x/a", "x/b", 8080, "GET", "/", &[("Host", h)]);
    assert!(host("api.example.com"));
    assert!(!host("api.example.com.evil.net"));
    assert!(!host("xapi.example.com"));
    assert!(!host("apiXexample.com"));
    // an unescaped dot matches any character
    let e = http_env("[{host: 'api.example.com'}]");
    assert!(e.http_h(
        "x/a",
        "x/b",
        8080,
        "GET",
        "/",
        &[("Host", "apiXexample.com")]
    ));
}

#[test]
fn http_headers_presence_and_exact_value() {
    let e = http_env("[{headers: ['X-Token: abc']}]");
    let with = |h: &[(&str, &str)]| e.http_h("x/a", "x/b", 8080, "GET", "/", h);
    assert!(with(&[("X-Token", "abc")]));
    assert!(
        with(&[("x-token", "abc")]),
        "header names are case-insensitive"
    );
    assert!(!with(&[("X-Token", "abcd")]));
    assert!(!with(&[("X-Token", "ABC")]));
    assert!(!with(&[]));
    let e = http_env("[{headers: [X-Debug]}]");
    assert!(e.http_h("x/a", "x/b", 8080, "GET", "/", &[("X-Debug", "anything")]));
    assert!(!e.http_h("x/a", "x/b", 8080, "GET", "/", &[("X-Other", "1")]));
    // headerMatches with the default mismatch action fails on a wrong value
    let e = http_env("[{headerMatches: [{name: X-Key, value: s3cret}]}]");
    assert!(e.http_h("x/a", "x/b", 8080, "GET", "/", &[("X-Key", "s3cret")]));
    assert!(!e.http_h("x/a", "x/b", 8080, "GET", "/", &[("X-Key", "guess")]));
}

#[test]
fn http_rules_are_ored_and_their_fields_anded() {
    let e = http_env("[{method: GET, path: /a}, {method: POST, path: /b, headers: [X-Ok]}]");
    assert!(e.http("x/a", "x/b", 8080, "GET", "/a"));
    assert!(e.http_h("x/a", "x/b", 8080, "POST", "/b", &[("X-Ok", "1")]));
    assert!(!e.http("x/a", "x/b", 8080, "POST", "/b"), "header missing");
    assert!(!e.http("x/a", "x/b", 8080, "GET", "/b"));
    assert!(!e.http("x/a", "x/b", 8080, "POST", "/a"));
    // an empty rule allows everything
    let e = http_env("[{method: GET, path: /a}, {}]");
    assert!(e.http("x/a", "x/b", 8080, "DELETE", "/zzz"));
}

#[test]
fn l7_applies_only_to_its_port_and_peers() {
    let e = http_env("[{method: GET}]");
    assert!(!e.tcp("x/a", "x/b", 8081), "other ports are default deny");
    assert!(!e.http("x/c", "x/b", 8080, "GET", "/"), "x/c is not a peer");
    assert!(
        e.tcp("x/a", "x/b", 8080),
        "a connection without a request reaches the proxy"
    );
}

#[test]
fn l7_rules_filter_even_without_default_deny() {
    let e = env(&[cnp(
        "x",
        "web",
        "endpointSelector: {matchLabels: {app: b}}\nenableDefaultDeny: {ingress: false}\ningress: [{fromEndpoints: [{matchLabels: {app: a}}], toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{method: GET}]}}]}]",
    )]);
    assert!(e.http("x/a", "x/b", 8080, "GET", "/"));
    let v = e.http_verdict("x/a", "x/b", 8080, "POST", "/", &[]);
    assert!(!v.allowed, "L7 rules still drop what they do not allow");
    assert_eq!(v.layer, Some(Layer::L7));
    assert!(
        e.http("x/c", "x/b", 8080, "POST", "/"),
        "other peers: default allow"
    );
    assert!(
        e.http("x/a", "x/b", 9090, "POST", "/"),
        "other ports: default allow"
    );
}

// ---------------------------------------------------------------------------------------
// DNS rules and toFQDNs
// ---------------------------------------------------------------------------------------

/// y/a may query the DNS server x/a (UDP/53) for names matching `selector`.
fn dns_env(selector: &str) -> Env {
    env(&[cnp(
        "y",
        "dns",
        &format!(
            "endpointSelector: {{matchLabels: {{app: a}}}}\negress:\n- toEndpoints: [{{matchLabels: {{app: a, io.kubernetes.pod.namespace: x}}}}]\n  toPorts:\n  - ports: [{{port: '53', protocol: UDP}}]\n    rules:\n      dns: [{selector}]\n"
        ),
    )])
}

#[test]
fn dns_match_name_and_pattern_follow_the_reference_table() {
    let rows: &[(&str, &[&str], &[&str])] = &[
        (
            "{matchName: example.com}",
            &["example.com", "example.com.", "EXAMPLE.com", "Example.Com."],
            &["a.example.com", "xexample.com", "example.com.au"],
        ),
        (
            "{matchPattern: '*.example.com'}",
            &["a.example.com", "A.EXAMPLE.COM.", "a-b_c.example.com"],
            &["example.com", "a.b.example.com", "a.example.org"],
        ),
        (
            "{matchPattern: '*example.com'}",
            &["example.com", "subexample.com", "sub-example.com"],
            &["www.example.com", "example.org"],
        ),
        (
            "{matchPattern: 'sub*.example.com'}",
            &["sub.example.com", "subdomain.example.com"],
            &["www.example.com", "a.sub.example.com", "sub.x.example.com"],
        ),
        (
            "{matchPattern: 'part*ial.com'}",
            &["partial.com", "part-extra-ial.com"],
            &["apartial.com", "part.ial.com"],
        ),
        (
            "{matchPattern: '**.example.com'}",
            &["a.example.com", "a.b.example.com", "a.b.c.example.com"],
            &["example.com", "a.example.org"],
        ),
        (
            "{matchPattern: '*'}",
            &["anything.example.com", "a", "x.y.z.w"],
            &[],
        ),
        (
            "{matchPattern: '*.Example.NET'}",
            &["web.example.net", "WEB.EXAMPLE.NET."],
            &["example.net"],
        ),
        (
            "{matchName: www.example.org.}",
            &["www.example.org", "WWW.EXAMPLE.ORG"],
            &["ww.example.org"],
        ),
    ];
    for (selector, yes, no) in rows {
        let e = dns_env(selector);
        for name in *yes {
            assert!(e.dns("y/a", "x/a", name), "{selector} should match {name}");
        }
        for name in *no {
            let v = e.query(&policy_model::Query {
                from: policy_model::EndpointRef::parse("y/a").unwrap(),
                to: policy_model::EndpointRef::parse("x/a").unwrap(),
                port: 53,
                protocol: policy_model::Protocol::Udp,
                http: None,
                dns: Some((*name).into()),
            });
            assert!(!v.allowed, "{selector} should not match {name}");
            assert_eq!(
                v.layer,
                Some(Layer::L7),
                "{selector} vs {name}: refused by the proxy"
            );
        }
    }
}

#[test]
fn dns_rules_apply_to_the_rule_selecting_the_dns_server() {
    // the DNS rule selects x/b as the server; x/a is not a DNS server for y/a
    let e = env(&[cnp(
        "y",
        "dns",
        "endpointSelector: {matchLabels: {app: a}}\negress:\n- toEndpoints: [{matchLabels: {app: b, io.kubernetes.pod.namespace: x}}]\n  toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n    rules:\n      dns: [{matchName: allowed.example.com}]\n",
    )]);
    assert!(e.dns("y/a", "x/b", "allowed.example.com"));
    assert!(!e.dns("y/a", "x/b", "other.example.com"));
    assert!(
        !e.dns("y/a", "x/a", "allowed.example.com"),
        "x/a is not selected"
    );
    // an L4 allow of another server is not filtered by the DNS rules of the first one
    let e = env(&[cnp(
        "y",
        "dns",
        "endpointSelector: {matchLabels: {app: a}}\negress:\n- toEndpoints: [{matchLabels: {app: b, io.kubernetes.pod.namespace: x}}]\n  toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n    rules:\n      dns: [{matchName: allowed.example.com}]\n- toEndpoints: [{matchLabels: {app: a, io.kubernetes.pod.namespace: x}}]\n  toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n",
    )]);
    assert!(e.dns("y/a", "x/a", "other.example.com"));
    assert!(!e.dns("y/a", "x/b", "other.example.com"));
}

fn fqdn_env(selector: &str, observations: &str) -> Env {
    let cluster = format!("{CLUSTER}dns:\n{}", observations);
    let policies = cnp(
        "y",
        "fqdn",
        &format!(
            "endpointSelector: {{}}\negress:\n- toFQDNs: [{selector}]\n  toPorts: [{{ports: [{{port: '443', protocol: TCP}}]}}]\n"
        ),
    );
    Env::with(&cluster, &policies, false)
}

#[test]
fn to_fqdns_allows_only_observed_ips_for_that_client() {
    // y/a and y/b share the policy; only y/a looked the name up
    let e = fqdn_env(
        "{matchName: api.example.com}",
        "  - {client: y/a, name: api.example.com, ips: [203.0.113.10]}\n  - {client: y/a, name: other.example.com, ips: [198.51.100.20]}\n",
    );
    assert!(e.tcp("y/a", "external:ext", 443));
    assert!(!e.tcp("y/a", "external:ext", 80), "only the rule's port");
    assert!(
        !e.tcp("y/b", "external:ext", 443),
        "y/b never resolved the name"
    );
    assert!(
        !e.tcp("y/a", "external:ext2", 443),
        "answer for a name the rule does not select"
    );
    assert!(!e.tcp("y/a", "external:ext3", 443), "never observed");
}

#[test]
fn to_fqdns_patterns_follow_dns_matching() {
    let obs = "  - {client: y/a, name: API.Example.com., ips: [203.0.113.10]}\n  - {client: y/a, name: a.b.example.com, ips: [198.51.100.20]}\n  - {client: y/b, name: x.example.com, ips: [192.0.2.5]}\n";
    let e = fqdn_env("{matchPattern: '*.example.com'}", obs);
    assert!(
        e.tcp("y/a", "external:ext", 443),
        "case and trailing dot do not matter"
    );
    assert!(
        !e.tcp("y/a", "external:ext2", 443),
        "* does not cross a dot"
    );
    assert!(e.tcp("y/b", "external:ext3", 443));
    assert!(!e.tcp("y/a", "external:ext3", 443), "observed by y/b only");
    let e = fqdn_env("{matchPattern: '**.example.com'}", obs);
    assert!(e.tcp("y/a", "external:ext2", 443), "** spans labels");
}

#[test]
fn to_fqdns_never_selects_cluster_ips() {
    let e = fqdn_env(
        "{matchName: inside.example.com}",
        "  - {client: y/a, name: inside.example.com, ips: [10.0.0.1]}\n",
    );
    assert!(!e.tcp("y/a", "x/a", 443));
}

// ---------------------------------------------------------------------------------------
// NetworkPolicy
// ---------------------------------------------------------------------------------------

#[test]
fn np_policy_types_default_to_ingress_and_egress_iff_egress_rules() {
    // egress rules present: both directions isolated
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {matchLabels: {app: a}}\negress: [{to: [{namespaceSelector: {matchLabels: {team: red}}}]}]",
    )]);
    assert!(e.tcp("x/a", "y/b", 80));
    assert!(!e.tcp("x/a", "z/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80), "Ingress is always a policy type");
    // ingress rules only: egress stays open
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {matchLabels: {app: a}}\ningress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]",
    )]);
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("x/a", "z/a", 80));
    // no rules at all: ingress isolation only
    let e = env(&[np("x", "p", "podSelector: {matchLabels: {app: a}}")]);
    assert!(!e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("x/a", "x/b", 80));
    // explicit Egress only: the ingress rules are ignored and ingress stays open
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {matchLabels: {app: a}}\npolicyTypes: [Egress]\ningress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]",
    )]);
    assert!(e.tcp("z/a", "x/a", 80));
    assert!(!e.tcp("x/a", "x/b", 80), "egress isolated with no rule");
}

#[test]
fn np_empty_or_absent_from_means_every_source_including_outside() {
    for rule in ["{}", "{from: []}"] {
        let e = env(&[np(
            "x",
            "p",
            &format!("podSelector: {{matchLabels: {{app: a}}}}\ningress: [{rule}]"),
        )]);
        assert!(e.tcp("external:ext", "x/a", 80), "{rule}");
        assert!(e.tcp("y/b", "x/a", 80), "{rule}");
        assert!(e.tcp("node:node-2", "x/a", 80), "{rule}");
    }
    // ports without from: every source, those ports only
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {matchLabels: {app: a}}\ningress: [{ports: [{port: 80}]}]",
    )]);
    assert!(e.tcp("external:ext", "x/a", 80));
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("external:ext", "x/a", 81));
    assert!(!e.udp("y/b", "x/a", 80), "protocol defaults to TCP");
}

#[test]
fn np_pod_selector_peer_is_namespace_scoped_and_namespace_selector_is_not() {
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {matchLabels: {app: a}}\ningress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]",
    )]);
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("y/b", "x/a", 80));
    let e = env(&[np(
        "x",
        "p",
        "podSelector: {matchLabels: {app: a}}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchLabels: {app: b}}}]}]",
    )]);
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("y/a", "x/a", 80));
}

// ---------------------------------------------------------------------------------------
// AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy
// ---------------------------------------------------------------------------------------

fn anp_from_y(name: &str, priority: i64, action: &str) -> String {
    anp(
        name,
        &format!(
            "priority: {priority}\nsubject: {{namespaces: {{matchLabels: {{team: blue}}}}}}\ningress: [{{action: {action}, from: [{{namespaces: {{matchLabels: {{team: red}}}}}}]}}]"
        ),
    )
}

#[test]
fn anp_lower_priority_number_wins() {
    let e = env(&[
        anp_from_y("deny", 10, "Deny"),
        anp_from_y("allow", 20, "Allow"),
    ]);
    assert!(!e.tcp("y/b", "x/a", 80));
    let e = env(&[
        anp_from_y("deny", 20, "Deny"),
        anp_from_y("allow", 10, "Allow"),
    ]);
    assert!(e.tcp("y/b", "x/a", 80));
    // an admin Allow is final even against a NetworkPolicy that isolates the pod
    let e = env(&[
        anp_from_y("allow", 10, "Allow"),
        np("x", "isolate", "podSelector: {}"),
    ]);
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80));
}

#[test]
fn anp_first_matching_rule_in_a_policy_wins() {
    let rules = |first: &str, second: &str| {
        anp(
            "p",
            &format!(
                "priority: 1\nsubject: {{namespaces: {{matchLabels: {{team: blue}}}}}}\ningress:\n- {first}\n- {second}\n"
            ),
        )
    };
    let allow_y =
        "{name: allow-y, action: Allow, from: [{namespaces: {matchLabels: {team: red}}}]}";
    let deny_all = "{name: deny-all, action: Deny, from: [{namespaces: {}}]}";
    let e = env(&[rules(allow_y, deny_all)]);
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80));
    let e = env(&[rules(deny_all, allow_y)]);
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80));
}

#[test]
fn anp_pass_skips_the_admin_tier_to_network_policy_then_baseline() {
    let pass = anp_from_y("pass", 10, "Pass");
    let deny = anp_from_y("deny", 20, "Deny");
    let np_allow = np(
        "x",
        "allow-y",
        "podSelector: {matchLabels: {app: a}}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: red}}}]}]",
    );
    let banp_deny = banp(
        "subject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {matchLabels: {team: red}}}]}]",
    );
    // Pass skips the lower-priority Deny, NetworkPolicy allows
    let e = env(&[
        pass.clone(),
        deny.clone(),
        np_allow.clone(),
        banp_deny.clone(),
    ]);
    assert!(e.tcp("y/b", "x/a", 80));
    // without the Pass, the admin Deny is final
    let e = env(&[deny.clone(), np_allow.clone()]);
    assert!(!e.tcp("y/b", "x/a", 80));
    // Pass with no NetworkPolicy for the pod: the baseline decides
    let e = env(&[pass.clone(), deny.clone(), banp_deny.clone()]);
    assert!(!e.tcp("y/b", "x/a", 80));
    // Pass, no NetworkPolicy, no baseline: default allow
    let e = env(&[pass, deny]);
    assert!(e.tcp("y/b", "x/a", 80));
}

#[test]
fn banp_applies_only_when_no_network_policy_selects_the_pod_in_that_direction() {
    let banp_deny = banp(
        "subject: {namespaces: {matchLabels: {team: blue}}}\ningress: [{action: Deny, from: [{namespaces: {}}]}]\negress: [{action: Deny, to: [{namespaces: {matchLabels: {team: red}}}]}]",
    );
    let e = env(std::slice::from_ref(&banp_deny));
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("x/a", "y/b", 80));
    assert!(e.tcp("x/a", "z/a", 80), "no baseline rule matches");
    let e = env(&[
        banp_deny.clone(),
        np(
            "x",
            "ingress-from-y",
            "podSelector: {matchLabels: {app: a}}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: red}}}]}]",
        ),
    ]);
    assert!(
        e.tcp("y/b", "x/a", 80),
        "the NetworkPolicy decides x/a's ingress"
    );
    assert!(
        !e.tcp("z/a", "x/a", 80),
        "NetworkPolicy isolation, not baseline"
    );
    assert!(!e.tcp("y/b", "x/b", 80), "x/b is not selected: baseline");
    assert!(
        !e.tcp("x/a", "y/b", 80),
        "egress of x/a is not selected: baseline"
    );
    // a NetworkPolicy for egress only leaves ingress to the baseline
    let e = env(&[
        banp_deny,
        np(
            "x",
            "egress-only",
            "podSelector: {matchLabels: {app: a}}\npolicyTypes: [Egress]\negress: [{}]",
        ),
    ]);
    assert!(e.tcp("x/a", "y/b", 80));
    assert!(!e.tcp("z/a", "x/a", 80));
}

#[test]
fn banp_first_match_and_allow() {
    let e = env(&[banp(
        "subject: {namespaces: {}}\ningress:\n- {action: Allow, from: [{namespaces: {matchLabels: {team: red}}}]}\n- {action: Deny, from: [{namespaces: {}}]}\n",
    )]);
    assert!(e.tcp("y/b", "x/a", 80));
    assert!(!e.tcp("z/a", "x/a", 80));
    assert!(
        e.tcp("external:ext", "x/a", 80),
        "no rule matches outside sources"
    );
}

#[test]
fn v1alpha2_cluster_network_policy_tiers() {
    let admin = cnp2(
        "admin",
        "tier: Admin\npriority: 5\nsubject: {namespaces: {matchLabels: {team: blue}}}\ningress:\n- {action: Accept, from: [{namespaces: {matchLabels: {team: red}}}]}\n- {action: Pass, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: z}}}]}\n",
    );
    let baseline = cnp2(
        "default",
        "tier: Baseline\npriority: 1\nsubject: {namespaces: {matchLabels: {team: blue}}}\ningress: [{action: Deny, from: [{namespaces: {}}]}]",
    );
    let e = env(&[admin.clone(), baseline.clone()]);
    assert!(e.tcp("y/b", "x/a", 80), "Accept is final");
    assert!(!e.tcp("z/a", "x/a", 80), "Pass to the baseline Deny");
    let e = env(&[admin, baseline, np("x", "isolate", "podSelector: {}")]);
    assert!(
        e.tcp("y/b", "x/a", 80),
        "Accept beats NetworkPolicy isolation"
    );
    assert!(
        !e.tcp("z/a", "x/a", 80),
        "Pass to NetworkPolicy, which isolates"
    );
    let e = env(&[
        cnp2(
            "default",
            "tier: Baseline\npriority: 1\nsubject: {namespaces: {matchLabels: {team: blue}}}\ningress: [{action: Deny, from: [{namespaces: {}}]}]",
        ),
        np("x", "allow-z", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]"),
    ]);
    assert!(e.tcp("z/a", "x/a", 80), "NetworkPolicy wins over Baseline");
}

#[test]
fn anp_networks_match_pod_ips_whatever_the_cidr_option() {
    let policies = [anp(
        "deny-net",
        "priority: 1\nsubject: {namespaces: {matchLabels: {team: blue}}}\negress: [{action: Deny, to: [{networks: [10.0.1.0/24]}]}]",
    )];
    for cidr in [false, true] {
        let e = env_cidr(&policies, cidr);
        assert!(!e.tcp("x/a", "y/a", 80), "cidr_matches_cluster={cidr}");
        assert!(
            !e.tcp("x/a", "10.0.1.77", 80),
            "cidr_matches_cluster={cidr}"
        );
        assert!(e.tcp("x/a", "z/a", 80), "cidr_matches_cluster={cidr}");
    }
}

#[test]
fn anp_ports_restrict_the_rule() {
    let e = env(&[anp(
        "p",
        "priority: 1\nsubject: {namespaces: {matchLabels: {team: blue}}}\ningress: [{action: Deny, from: [{namespaces: {}}], ports: [{portNumber: {port: 80}}, {portRange: {start: 90, end: 95, protocol: UDP}}, {namedPort: http}]}]",
    )]);
    assert!(!e.tcp("y/b", "x/a", 80));
    assert!(e.tcp("y/b", "x/a", 81));
    assert!(e.udp("y/b", "x/a", 80));
    assert!(!e.udp("y/b", "x/a", 90));
    assert!(!e.udp("y/b", "x/a", 95));
    assert!(e.udp("y/b", "x/a", 96));
    assert!(!e.tcp("y/b", "x/b", 8080), "x/b's http port");
    assert!(e.tcp("y/b", "x/b", 8081));
}

#[test]
fn v1alpha2_baseline_policies_are_ordered_by_priority() {
    let two = |deny: i64, accept: i64| {
        [
            cnp2(
                "b-deny",
                &format!("tier: Baseline\npriority: {deny}\nsubject: {{namespaces: {{}}}}\ningress: [{{action: Deny, from: [{{namespaces: {{}}}}]}}]"),
            ),
            cnp2(
                "b-accept",
                &format!("tier: Baseline\npriority: {accept}\nsubject: {{namespaces: {{}}}}\ningress: [{{action: Accept, from: [{{namespaces: {{}}}}]}}]"),
            ),
        ]
    };
    assert!(!env(&two(1, 2)).tcp("y/b", "x/a", 80));
    assert!(env(&two(2, 1)).tcp("y/b", "x/a", 80));
}

#[test]
fn host_policies_select_nodes() {
    let e = env(&[ccnp(
        "host",
        "nodeSelector: {}\ningress: [{fromEntities: [cluster]}, {fromEntities: [world], toPorts: [{ports: [{port: '443', protocol: TCP}]}]}]",
    )]);
    assert!(e.tcp("y/b", "node:node-1", 22));
    assert!(e.tcp("node:node-2", "node:node-1", 22));
    assert!(!e.tcp("external:ext", "node:node-1", 22));
    assert!(e.tcp("external:ext", "node:node-1", 443));
    assert!(
        e.tcp("external:ext", "x/a", 22),
        "pods are not subjects of host policies"
    );
}

// ---------------------------------------------------------------------------------------
// Incremental updates
// ---------------------------------------------------------------------------------------

const ENDPOINTS: [&str; 9] = [
    "x/a",
    "x/b",
    "x/c",
    "y/a",
    "y/b",
    "z/a",
    "node:node-1",
    "external:ext",
    "external:ext2",
];

/// Every flow among the endpoints on a few ports and protocols.
fn matrix(m: &Model) -> Vec<(String, String, u16, bool)> {
    let mut out = Vec::new();
    for from in ENDPOINTS {
        for to in ENDPOINTS {
            if from == to {
                continue;
            }
            for port in [80, 8080, 443] {
                let v = m
                    .query(&policy_model::Query {
                        from: policy_model::EndpointRef::parse(from).unwrap(),
                        to: policy_model::EndpointRef::parse(to).unwrap(),
                        port,
                        protocol: policy_model::Protocol::Tcp,
                        http: None,
                        dns: None,
                    })
                    .unwrap();
                out.push((from.to_string(), to.to_string(), port, v.allowed));
            }
        }
    }
    out
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Applies the label change incrementally and by a full recompile, and checks that both
/// models agree on every flow.
fn relabel(m: &mut Model, pod: &str, new: &[(&str, &str)], policies: &str) {
    m.set_pod_labels(pod, labels(new)).unwrap();
    let mut c = (*m.cluster).clone();
    let p = c.pods.iter_mut().find(|p| p.id() == pod).unwrap();
    assert_eq!(p.labels, labels(new));
    let fresh = Model::compile(&c, accept(policies), m.options);
    let (inc, full) = (matrix(m), matrix(&fresh));
    for (a, b) in inc.iter().zip(&full) {
        assert_eq!(
            a, b,
            "incremental vs full recompile after relabelling {pod}"
        );
    }
    assert_eq!(inc.len(), full.len());
}

fn allowed(m: &Model, from: &str, to: &str, port: u16) -> bool {
    m.query(&policy_model::Query {
        from: policy_model::EndpointRef::parse(from).unwrap(),
        to: policy_model::EndpointRef::parse(to).unwrap(),
        port,
        protocol: policy_model::Protocol::Tcp,
        http: None,
        dns: None,
    })
    .unwrap()
    .allowed
}

#[test]
fn set_pod_labels_matches_a_full_recompile_for_subjects() {
    let policies = [
        cnp(
            "x",
            "lock",
            "endpointSelector: {matchLabels: {role: locked}}\ningress: [{fromEndpoints: [{matchLabels: {app: a}}]}]\negress: [{toEntities: [world]}]",
        ),
        np("y", "np", "podSelector: {matchLabels: {role: locked}}"),
    ]
    .concat();
    let mut m = Model::compile(
        &cluster(CLUSTER),
        accept(&policies),
        CompileOptions::default(),
    );
    assert!(allowed(&m, "z/a", "x/b", 8080));
    assert!(allowed(&m, "x/b", "y/a", 80));
    // x/b becomes selected
    relabel(
        &mut m,
        "x/b",
        &[("app", "b"), ("role", "locked")],
        &policies,
    );
    assert!(!allowed(&m, "z/a", "x/b", 8080));
    assert!(allowed(&m, "x/a", "x/b", 8080));
    assert!(!allowed(&m, "x/b", "y/a", 80), "egress to world only");
    assert!(allowed(&m, "x/b", "external:ext", 443));
    // y/a becomes selected by the NetworkPolicy
    relabel(
        &mut m,
        "y/a",
        &[("app", "a"), ("role", "locked")],
        &policies,
    );
    assert!(!allowed(&m, "z/a", "y/a", 80));
    // and both become unselected again
    relabel(&mut m, "x/b", &[("app", "b")], &policies);
    relabel(&mut m, "y/a", &[("app", "a")], &policies);
    assert!(allowed(&m, "z/a", "x/b", 8080));
    assert!(allowed(&m, "z/a", "y/a", 80));
}

#[test]
fn set_pod_labels_matches_a_full_recompile_for_peers() {
    let policies = [
        cnp(
            "x",
            "friends-in",
            "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{matchLabels: {role: friend, io.kubernetes.pod.namespace: z}}]}]",
        ),
        cnp(
            "x",
            "friends-out",
            "endpointSelector: {matchLabels: {app: c}}\negress: [{toEndpoints: [{matchLabels: {role: friend, io.kubernetes.pod.namespace: y}}], toPorts: [{ports: [{port: http}]}]}]",
        ),
        np(
            "y",
            "np",
            "podSelector: {matchLabels: {app: b}}\ningress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: friend}}}]}]",
        ),
    ]
    .concat();
    let mut m = Model::compile(
        &cluster(CLUSTER),
        accept(&policies),
        CompileOptions::default(),
    );
    assert!(!allowed(&m, "z/a", "x/a", 80));
    assert!(!allowed(&m, "x/c", "y/a", 80));
    assert!(!allowed(&m, "x/a", "y/b", 80));
    // z/a becomes a friend: allowed into x/a
    relabel(
        &mut m,
        "z/a",
        &[("app", "a"), ("role", "friend")],
        &policies,
    );
    assert!(allowed(&m, "z/a", "x/a", 80));
    assert!(allowed(&m, "z/a", "y/b", 80));
    // y/a becomes a friend: x/c may reach its named http port
    relabel(
        &mut m,
        "y/a",
        &[("app", "a"), ("role", "friend")],
        &policies,
    );
    assert!(allowed(&m, "x/c", "y/a", 80));
    assert!(!allowed(&m, "x/c", "y/a", 8080));
    // x/a becomes a friend of y/b
    relabel(
        &mut m,
        "x/a",
        &[("app", "a"), ("tier", "web"), ("role", "friend")],
        &policies,
    );
    assert!(allowed(&m, "x/a", "y/b", 80));
    // and they stop being friends
    relabel(&mut m, "z/a", &[("app", "a")], &policies);
    relabel(&mut m, "y/a", &[("app", "a")], &policies);
    relabel(&mut m, "x/a", &[("app", "a"), ("tier", "web")], &policies);
    assert!(!allowed(&m, "z/a", "x/a", 80));
    assert!(!allowed(&m, "x/c", "y/a", 80));
    assert!(!allowed(&m, "x/a", "y/b", 80));
}

#[test]
fn set_pod_labels_for_an_unknown_pod_is_an_error() {
    let mut m = Model::compile(&cluster(CLUSTER), Vec::new(), CompileOptions::default());
    assert!(m.set_pod_labels("x/nope", labels(&[("a", "b")])).is_err());
}

#[test]
fn set_pod_labels_into_a_shared_identity_matches_a_full_recompile() {
    // egress named ports resolve per destination identity: when x/b takes x/a's labels,
    // the identity's `http` port is both 80 (x/a) and 8080 (x/b)
    let policies = cnp(
        "y",
        "named",
        "endpointSelector: {}\negress: [{toEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: x}}], toPorts: [{ports: [{port: http, protocol: TCP}]}]}]",
    );
    let mut m = Model::compile(
        &cluster(CLUSTER),
        accept(&policies),
        CompileOptions::default(),
    );
    assert!(!allowed(&m, "y/a", "x/a", 8080));
    assert!(!allowed(&m, "y/a", "x/b", 80));
    relabel(&mut m, "x/b", &[("app", "a"), ("tier", "web")], &policies);
    assert!(allowed(&m, "y/a", "x/a", 8080));
    assert!(allowed(&m, "y/a", "x/b", 80));
    relabel(&mut m, "x/b", &[("app", "b")], &policies);
    assert!(!allowed(&m, "y/a", "x/a", 8080));
    assert!(!allowed(&m, "y/a", "x/b", 80));
    assert!(allowed(&m, "y/a", "x/b", 8080));
}

// ---------------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------------

/// A pod cannot claim another namespace, or another namespace's labels, through its own
/// labels: Ward derives those keys itself.
#[test]
fn pod_labels_cannot_fake_the_namespace() {
    let cluster_yaml = CLUSTER.replace(
        "externals:\n",
        "  - namespace: z\n    name: evil\n    labels: {app: e, io.kubernetes.pod.namespace: x, io.cilium.k8s.namespace.labels.team: blue, io.cilium.k8s.policy.cluster: other}\n    ip: 10.0.2.66\n    node: node-1\nexternals:\n",
    );
    assert!(cluster_yaml.contains("evil"));
    let policies = [
        cnp("x", "i", "endpointSelector: {matchLabels: {app: a}}\ningress: [{fromEndpoints: [{}]}]"),
        np(
            "y",
            "n",
            "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
        ),
    ]
    .concat();
    let e = Env::with(&cluster_yaml, &policies, false);
    assert!(!e.tcp("z/evil", "x/a", 80), "CNP peers stay in namespace x");
    assert!(
        !e.tcp("z/evil", "y/a", 80),
        "namespace z has no team=blue label"
    );
    assert!(e.tcp("x/b", "x/a", 80), "a real pod of x is allowed");
}

/// An ANP `nodes` peer selects nodes only, also when the selector is empty or matches on
/// an absent label.
#[test]
fn anp_nodes_peer_selects_only_nodes() {
    for nodes in ["{}", "{matchExpressions: [{key: node-role.kubernetes.io/control-plane, operator: DoesNotExist}]}"] {
        let e = env(&[anp(
            "nodes",
            &format!("priority: 1\nsubject: {{namespaces: {{}}}}\negress: [{{action: Deny, to: [{{nodes: {nodes}}}]}}]"),
        )]);
        assert!(!e.tcp("x/a", "node:node-2", 10250), "{nodes}: node denied");
        assert!(e.tcp("x/a", "y/b", 80), "{nodes}: pods are not nodes");
        assert!(e.tcp("x/a", "external:ext", 443), "{nodes}: outside hosts are not nodes");
    }
}

#[test]
fn dns_allows_decides_and_names_the_rule_as_check_dns_does() {
    let e = env(&[
        cnp(
            "y",
            "dns",
            "endpointSelector: {matchLabels: {app: a}}\negress:\n- toEndpoints: [{matchLabels: {app: b, io.kubernetes.pod.namespace: x}}]\n  toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n    rules:\n      dns: [{matchName: allowed.example.com}]\n",
        ),
        cnp(
            "y",
            "dns2",
            "endpointSelector: {matchLabels: {app: a}}\negress:\n- toEndpoints: [{matchLabels: {app: b, io.kubernetes.pod.namespace: x}}]\n  toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n    rules:\n      dns: [{matchName: nothing.test}, {matchPattern: '*.example.org'}]\n",
        ),
    ]);
    let m = &e.model;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    // y/a -> x/b: y/a's egress has the DNS rules of both policies.
    let conn = m.connection_policy(
        ip("10.0.1.1"),
        ip("10.0.0.2"),
        policy_model::Protocol::Udp,
        53,
        None,
    );
    for (name, policy, rule) in [
        (
            "allowed.example.com",
            "CiliumNetworkPolicy y/dns",
            "spec.egress[0].toPorts[0].rules.dns[0]",
        ),
        (
            "WWW.Example.Org.",
            "CiliumNetworkPolicy y/dns2",
            "spec.egress[0].toPorts[0].rules.dns[1]",
        ),
    ] {
        let full = m.check_dns(&conn, name);
        assert!(full.allowed, "{name}");
        let hit = m.dns_allows(&conn, name).unwrap().expect("a rule decided");
        let matched = m.dns_matched(&conn, hit);
        assert_eq!(matched.policy, policy, "{name}");
        assert_eq!(matched.rule, rule, "{name}");
        assert_eq!(full.matched, vec![matched], "{name}");
    }
    let full = m.check_dns(&conn, "other.test");
    assert!(!full.allowed);
    let reason = m.dns_allows(&conn, "other.test").unwrap_err();
    assert_eq!(reason, full.reason);
    assert!(reason.contains("no DNS rule"), "{reason}");
    // x/a -> y/b: no side has DNS rules, so every name passes and no rule decided.
    let open = m.connection_policy(
        ip("10.0.0.1"),
        ip("10.0.1.2"),
        policy_model::Protocol::Udp,
        53,
        None,
    );
    assert_eq!(m.dns_allows(&open, "any.test"), Ok(None));
    assert!(m.check_dns(&open, "any.test").matched.is_empty());
}
