//! Calico `projectcalico.org/v3` policies: what they mean (tiers, order, Pass, the
//! namespace tier inside the `default` tier, service accounts, negations, ports, ICMP,
//! HTTP) and what is refused, with the field path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{reject, Env, CLUSTER};
use policy_model::Protocol;

/// A spec written as `first line\n   more lines` (the later lines indented alike), under
/// `spec:`.
fn body(spec: &str) -> String {
    let (first, rest) = spec.split_once('\n').unwrap_or((spec, ""));
    format!("{}\n{}", first.trim(), common::dedent(rest))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect()
}

fn gnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}",
        body(spec)
    )
}

fn cnp_calico(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{}",
        body(spec)
    )
}

fn tier(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

fn env(docs: &[String]) -> Env {
    Env::with(CLUSTER, &docs.join("---\n"), false)
}

#[test]
fn pass_skips_to_the_next_tier_and_tiers_run_in_order() {
    let e = env(&[
        tier("security", "{order: 100}"),
        gnp(
            "pass-web",
            "tier: security
             selector: app == 'a'
             ingress:
             - action: Pass
               protocol: TCP
               destination: {ports: [80]}
             - action: Deny",
        ),
        gnp(
            "allow-80",
            "selector: app == 'a'
             ingress:
             - action: Allow
               protocol: TCP
               destination: {ports: [80]}",
        ),
    ]);
    // security passes TCP 80 to the default tier, which allows it
    assert!(e.tcp("x/b", "x/a", 80));
    // anything else is denied by security's second rule before the default tier
    let v = e.flow("x/b", "x/a", 81, Protocol::Tcp);
    assert!(!v.allowed);
    assert!(
        v.sides[1].reason.contains("GlobalNetworkPolicy pass-web"),
        "{v}"
    );
    assert!(v.sides[1].reason.contains("Calico tier security"), "{v}");
    // unselected pods are untouched
    assert!(e.tcp("x/a", "x/b", 81));
}

#[test]
fn a_tier_ends_with_its_default_action() {
    let deny_end = env(&[
        tier("security", "{order: 100}"),
        gnp(
            "watch-a",
            "tier: security
             selector: app == 'a'
             types: [Ingress]",
        ),
        gnp(
            "allow-all",
            "selector: all()
             ingress: [{action: Allow}]",
        ),
    ]);
    let v = deny_end.flow("x/b", "x/a", 80, Protocol::Tcp);
    assert!(!v.allowed, "{v}");
    assert!(
        v.sides[1].reason.contains("end of Calico tier security"),
        "{v}"
    );
    let pass_end = env(&[
        tier("security", "{order: 100, defaultAction: Pass}"),
        gnp(
            "watch-a",
            "tier: security
             selector: app == 'a'
             types: [Ingress]",
        ),
        gnp(
            "allow-all",
            "selector: all()
             ingress: [{action: Allow}]",
        ),
    ]);
    assert!(pass_end.tcp("x/b", "x/a", 80));
}

#[test]
fn a_tier_without_an_object_comes_after_the_defined_ones() {
    let e = env(&[
        gnp(
            "deny-in-ghost",
            "tier: ghost
             selector: app == 'a'
             ingress: [{action: Deny}]",
        ),
        gnp(
            "allow-in-default",
            "selector: app == 'a'
             ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]",
        ),
    ]);
    // default (order 1,000,000) runs first and allows TCP 80; the rest reaches the ghost tier
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 81));
    assert_eq!(
        e.model
            .calico_tiers
            .iter()
            .map(|t| (t.name.as_str(), t.defined))
            .collect::<Vec<_>>(),
        vec![("default", true), ("ghost", false)]
    );
}

#[test]
fn kubernetes_policies_sit_in_the_default_tier_at_order_1000() {
    let np_allow = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
"
    .to_string();
    // a Calico Deny before 1000 wins over the NetworkPolicy's allow
    let before = env(&[
        np_allow.clone(),
        gnp(
            "deny-early",
            "order: 500
             selector: app == 'a'
             ingress: [{action: Deny, protocol: TCP, destination: {ports: [80]}}]",
        ),
    ]);
    assert!(!before.tcp("x/b", "x/a", 80));
    assert!(before.tcp("x/b", "x/a", 81));
    // after 1000 it never sees what the NetworkPolicy allowed
    let after = env(&[
        np_allow.clone(),
        gnp(
            "deny-late",
            "order: 2000
             selector: app == 'a'
             ingress: [{action: Deny, protocol: TCP, destination: {ports: [80]}}]",
        ),
    ]);
    assert!(after.tcp("x/b", "x/a", 80));
    // ... but it decides what the NetworkPolicy does not match
    assert!(!after.tcp("x/c", "x/a", 80));
    let v = after.flow("x/c", "x/a", 80, Protocol::Tcp);
    assert!(v.sides[1].reason.contains("deny-late"), "{v}");
    // a later Calico Allow is reached when the NetworkPolicy matches nothing
    let allow_late = env(&[
        np_allow,
        gnp(
            "allow-late",
            "order: 2000
             selector: app == 'a'
             ingress: [{action: Allow, source: {selector: app == 'c'}}]",
        ),
    ]);
    assert!(allow_late.tcp("x/c", "x/a", 80));
    assert!(!allow_late.tcp("y/a", "x/a", 80), "end of the default tier");
}

#[test]
fn cilium_policies_decide_inside_the_default_tier_as_one_policy() {
    let cnp = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: b}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: '81', protocol: TCP}]}]
"
    .to_string();
    let e = env(&[
        cnp,
        gnp(
            "allow-b-late",
            "order: 5000
             selector: app == 'a'
             ingress: [{action: Allow}]",
        ),
    ]);
    // the CNP's deny wins inside its block; its allow decides before the order-5000 allow
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 81));
    // the CNP matches nothing from x/c: the default tier goes on to allow-b-late
    assert!(e.tcp("x/c", "x/a", 80));
}

#[test]
fn admin_policies_come_before_every_tier_and_baseline_after() {
    let anp = "apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: guard}
spec:
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - action: Allow
    from: [{namespaces: {matchLabels: {team: red}}}]
"
    .to_string();
    let banp = "apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {matchLabels: {team: blue}}}]
"
    .to_string();
    let e = env(&[
        anp,
        banp,
        tier("first", "{order: 1}"),
        gnp(
            "deny-all",
            "tier: first
             selector: app == 'a'
             ingress:
             - action: Deny
               source: {namespaceSelector: team == 'red'}
             - action: Pass",
        ),
    ]);
    // the ANP allows red before the Calico tier can deny it
    assert!(e.tcp("y/b", "x/a", 80));
    // everything else passes the tier (no other policy selects x/a): baseline denies blue
    assert!(!e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("z/a", "x/a", 80));
}

#[test]
fn service_accounts_by_name_and_labels() {
    let cluster = format!(
        "{CLUSTER}serviceAccounts:\n  - {{namespace: x, name: robot, labels: {{role: ci}}}}\n"
    )
    .replace(
        "    labels: {app: b}\n    ip: 10.0.0.2",
        "    labels: {app: b}\n    serviceAccount: robot\n    ip: 10.0.0.2",
    );
    let e = Env::with(
        &cluster,
        &[gnp(
            "sa",
            "selector: app == 'a'
             ingress:
             - action: Allow
               protocol: TCP
               source: {serviceAccounts: {names: [robot]}}
               destination: {ports: [80]}
             - action: Allow
               protocol: TCP
               source: {serviceAccounts: {selector: role == 'ci'}}
               destination: {ports: [81]}
             - action: Allow
               protocol: TCP
               source: {selector: pcsa.projectcalico.org/name == 'default'}
               destination: {ports: [82]}",
        )]
        .join(""),
        false,
    );
    assert!(e.model.cluster.pods[1].service_account() == "robot");
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(e.tcp("x/b", "x/a", 81));
    assert!(!e.tcp("x/c", "x/a", 80), "x/c runs as default");
    assert!(!e.tcp("x/b", "x/a", 82));
    assert!(e.tcp("x/c", "x/a", 82));
    // a GNP rule selector spans namespaces: y/b also runs as default
    assert!(e.tcp("y/b", "x/a", 82));
    // the top-level serviceAccountSelector selects by the account's labels
    let top = Env::with(
        &cluster,
        &gnp(
            "by-sa",
            "serviceAccountSelector: role == 'ci'
             types: [Egress]",
        ),
        false,
    );
    assert!(!top.tcp("x/b", "x/a", 80));
    assert!(top.tcp("x/c", "x/a", 80));
}

#[test]
fn not_selector_and_not_nets_match_outside_addresses() {
    let e = env(&[gnp(
        "in",
        "selector: app == 'a'
         ingress:
         - action: Allow
           protocol: TCP
           source: {notSelector: app == 'b'}
           destination: {ports: [80]}
         - action: Allow
           protocol: TCP
           source: {notNets: [203.0.113.0/24, 10.0.0.0/8]}
           destination: {ports: [81]}",
    )]);
    assert!(e.tcp("x/c", "x/a", 80));
    assert!(!e.tcp("x/b", "x/a", 80));
    assert!(
        e.tcp("external:ext", "x/a", 80),
        "notSelector lets non-endpoints in"
    );
    assert!(e.tcp("external:ext2", "x/a", 81));
    assert!(!e.tcp("external:ext", "x/a", 81));
    assert!(!e.tcp("x/b", "x/a", 81), "pod addresses are in 10.0.0.0/8");
}

#[test]
fn a_namespaced_not_selector_alone_means_the_policys_namespace() {
    let e = env(&[cnp_calico(
        "x",
        "in",
        "selector: app == 'a'
         ingress:
         - action: Allow
           source: {notSelector: app == 'b'}",
    )]);
    assert!(e.tcp("x/c", "x/a", 80));
    assert!(
        !e.tcp("y/a", "x/a", 80),
        "other namespaces are out of scope"
    );
    assert!(
        !e.tcp("external:ext", "x/a", 80),
        "so are outside addresses"
    );
}

#[test]
fn destination_criteria_narrow_the_subjects_of_an_ingress_rule() {
    let e = env(&[gnp(
        "in",
        "selector: has(app)
         ingress:
         - action: Allow
           destination: {selector: tier == 'web'}
         - action: Allow
           destination: {nets: [10.0.0.3/32]}",
    )]);
    assert!(e.tcp("x/b", "x/a", 80), "x/a has tier web");
    assert!(e.tcp("x/b", "x/c", 80), "x/c is 10.0.0.3");
    assert!(!e.tcp("x/a", "x/b", 80));
}

#[test]
fn not_ports_and_named_ports() {
    let e = env(&[gnp(
        "in",
        "selector: app == 'a' && projectcalico.org/namespace == 'x'
         ingress:
         - action: Allow
           protocol: TCP
           destination: {notPorts: [http, '1000:2000']}
         - action: Allow
           protocol: UDP
           destination: {ports: [dns]}",
    )]);
    assert!(!e.tcp("x/b", "x/a", 80), "http is x/a's port 80");
    assert!(!e.tcp("x/b", "x/a", 1500));
    assert!(e.tcp("x/b", "x/a", 999));
    assert!(e.tcp("x/b", "x/a", 2001));
    assert!(e.udp("x/b", "x/a", 53));
    assert!(!e.udp("x/b", "x/a", 54));
}

#[test]
fn icmp_types_and_not_icmp() {
    let e = env(&[gnp(
        "ping",
        "selector: app == 'a'
         ingress:
         - action: Allow
           protocol: ICMP
           icmp: {type: 8}
         - action: Allow
           protocol: ICMPv6
           notICMP: {type: 128}",
    )]);
    assert!(e.flow("x/b", "x/a", 8, Protocol::Icmp).allowed);
    assert!(!e.flow("x/b", "x/a", 13, Protocol::Icmp).allowed);
    assert!(!e.flow("x/b", "x/a", 128, Protocol::IcmpV6).allowed);
    assert!(e.flow("x/b", "x/a", 129, Protocol::IcmpV6).allowed);
    assert!(!e.tcp("x/b", "x/a", 80));
}

#[test]
fn http_methods_and_paths_go_to_the_proxy() {
    let e = env(&[gnp(
        "api",
        "selector: app == 'a'
         ingress:
         - action: Allow
           http:
             methods: [GET]
             paths: [{exact: /health}, {prefix: /v1/}]
         - action: Allow
           source: {selector: app == 'c'}",
    )]);
    assert!(e.http("x/b", "x/a", 80, "GET", "/health"));
    assert!(e.http("x/b", "x/a", 80, "GET", "/v1/items"));
    assert!(!e.http("x/b", "x/a", 80, "GET", "/healthz"));
    assert!(!e.http("x/b", "x/a", 80, "POST", "/health"));
    // an L4 allow after the HTTP rule lets every request of x/c through
    assert!(e.http("x/c", "x/a", 80, "POST", "/admin"));
    let v = e.http_verdict("x/b", "x/a", 80, "POST", "/health", &[]);
    assert_eq!(v.layer, Some(policy_model::verdict::Layer::L7), "{v}");
}

#[test]
fn log_rules_decide_nothing_and_types_default() {
    let e = env(&[
        gnp(
            "log-then-allow",
            "selector: app == 'a'
             order: 1
             ingress:
             - action: Log
             - action: Allow
               source: {selector: app == 'b'}",
        ),
        gnp(
            "egress-only",
            "selector: app == 'b'
             egress: [{action: Deny, destination: {selector: app == 'c'}}, {action: Allow}]",
        ),
    ]);
    assert!(e.tcp("x/b", "x/a", 80));
    assert!(!e.tcp("x/c", "x/a", 80), "Log matched but did not allow");
    // egress-only has egress rules only: types [Egress], so x/b's ingress is not governed
    assert!(e.tcp("x/c", "x/b", 80));
    assert!(!e.tcp("x/b", "x/c", 80));
}

#[test]
fn a_rules_ip_family_restricts_outside_peers() {
    let cluster = format!("{CLUSTER}  - {{name: ext6, ip: '2001:db8::10'}}\n");
    let e = Env::with(
        &cluster,
        &gnp(
            "v4-only",
            "selector: app == 'a'
             ingress:
             - action: Allow
               source: {notNets: [10.0.0.0/8]}",
        ),
        false,
    );
    assert!(e.tcp("external:ext", "x/a", 80));
    assert!(
        !e.tcp("external:ext6", "x/a", 80),
        "an IPv4 rule does not match IPv6"
    );
}

#[test]
fn invalid_calico_policies_name_the_field() {
    let bad = |spec: &str| gnp("bad", spec);
    let e = reject(
        &bad("selector: app = 'a'"),
        "spec.selector",
        "expected \"==\" at character 5",
    );
    assert!(e.to_string().contains("GlobalNetworkPolicy bad"), "{e}");
    reject(
        &bad("ingress: [{action: Allow, source: {selector: \"a == 'x' &&\"}}]"),
        "spec.ingress[0].source.selector",
        "at character 12",
    );
    reject(
        &bad("ingress: [{action: Allow, protocol: TCP, source: {ports: [80]}}]"),
        "spec.ingress[0].source.ports",
        "source ports are not enforced",
    );
    reject(
        &bad("ingress: [{action: Allow, protocol: ICMP, icmp: {type: 3, code: 1}}]"),
        "spec.ingress[0].icmp.code",
        "ICMP codes are not enforced",
    );
    reject(
        &bad("ingress: [{action: Allow, icmp: {type: 3}}]"),
        "spec.ingress[0].icmp",
        "need protocol ICMP",
    );
    reject(
        &bad("ingress: [{action: Allow, destination: {ports: [80]}}]"),
        "spec.ingress[0].destination",
        "need protocol TCP, UDP or SCTP",
    );
    reject(
        &bad("ingress: [{action: Allow, protocol: UDPLite}]"),
        "spec.ingress[0].protocol",
        "not enforced by Ward's datapath",
    );
    reject(
        &bad("ingress: [{action: Deny, http: {methods: [GET]}}]"),
        "spec.ingress[0].http",
        "only valid on Allow rules",
    );
    reject(
        &bad("egress: [{action: Allow, http: {methods: [GET]}}]"),
        "spec.egress[0].http",
        "not allowed in egress rules",
    );
    reject(
        &bad("ingress: [{action: Allow, http: {paths: [{exact: /a, prefix: /b}]}}]"),
        "spec.ingress[0].http.paths[0]",
        "exactly one of exact or prefix",
    );
    reject(
        &bad("ingress: [{action: Allow, destination: {services: {name: api}}}]"),
        "spec.ingress[0].destination.services",
        "Service matches are not supported",
    );
    reject(
        &bad("ingress: [{action: Accept}]"),
        "spec.ingress[0].action",
        "not Allow, Deny, Log or Pass",
    );
    reject(
        &bad(
            "ingress: [{action: Allow, source: {nets: [10.0.0.0/8], notNets: ['2001:db8::/32']}}]",
        ),
        "spec.ingress[0]",
        "both IPv4 and IPv6",
    );
    reject(
        &bad("ingress: [{action: Allow, ipVersion: 6, source: {nets: [10.0.0.0/8]}}]"),
        "spec.ingress[0].ipVersion",
        "does not match its CIDRs",
    );
    reject(
        &bad("ingress: [{action: Allow, source: {nets: [10.0.0.1/8]}}]"),
        "spec.ingress[0].source.nets[0]",
        "host bits",
    );
    reject(
        &bad("ingress: [{action: Allow, protocol: TCP, destination: {ports: ['90:80']}}]"),
        "spec.ingress[0].destination.ports[0]",
        "start is after its end",
    );
    reject(
        &bad("selector: global()"),
        "spec.selector",
        "global() may only be used alone",
    );
    reject(
        &bad("ingress: [{action: Allow, source: {namespaceSelector: global() || all()}}]"),
        "spec.ingress[0].source.namespaceSelector",
        "global() may only be used alone",
    );
    reject(
        &bad("types: [Ingress, Ingress]"),
        "spec.types[1]",
        "listed twice",
    );
    reject(&bad("tier: Security"), "spec.tier", "not valid");
    reject(
        &bad("doNotTrack: true\napplyOnForward: true"),
        "spec.doNotTrack",
        "host endpoints",
    );
    reject(&bad("order: .nan"), "spec.order", "finite");
    reject(
        &bad("egress: [{action: Allow, protocol: TCP, destination: {notPorts: [http]}}]"),
        "spec.egress[0].destination.notPorts",
        "named ports in notPorts",
    );
    reject(
        &bad("selectr: all()"),
        "spec.selectr",
        "unknown field `selectr`",
    );
    reject(
        &cnp_calico("default", "bad", "namespaceSelector: all()"),
        "spec.namespaceSelector",
        "a NetworkPolicy does not have it",
    );
    reject(
        &tier("bad", "{order: 10, defaultAction: Allow}"),
        "spec.defaultAction",
        "not Deny or Pass",
    );
    reject(
        &tier("default", "{order: 5}"),
        "spec.order",
        "default tier's order must be",
    );
}
