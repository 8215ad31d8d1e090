#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::conformance::parse_case;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A conformance case's model.
fn case(file: &str) -> Model {
    let text = std::fs::read_to_string(repo(&format!("conformance/cases/{file}"))).unwrap();
    parse_case(&text)
        .unwrap()
        .compile(None, Some(file))
        .unwrap()
}

/// The lab's default scenario (deploy/lab): its cluster and every policy file.
fn lab() -> Model {
    #[derive(serde::Deserialize)]
    struct Scenario {
        cluster: crate::Cluster,
    }
    let text = std::fs::read_to_string(repo("deploy/lab/cluster.yaml")).unwrap();
    let cluster = serde_yaml::from_str::<Scenario>(&text).unwrap().cluster;
    let mut policies = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo("deploy/lab/policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let (p, errors, _) = crate::api::load(&std::fs::read_to_string(&f).unwrap(), None);
        assert!(errors.is_empty(), "{f:?}: {errors:?}");
        policies.extend(p);
    }
    Model::compile(
        &cluster,
        policies,
        crate::conformance::options_for(crate::conformance::Semantics::Cilium, None),
    )
}

fn show(m: &Model, pod: &str) -> EndpointView {
    m.show(m.pod_endpoint(pod).unwrap())
}

fn names(d: &DirectionView) -> Vec<&str> {
    d.policies.iter().map(|p| p.policy.as_str()).collect()
}

/// AdminNetworkPolicy, then NetworkPolicy, then BaselineAdminNetworkPolicy: the order
/// the model evaluates them in, whatever the order of the case's files.
#[test]
fn policies_are_listed_in_tier_order_with_their_rules() {
    let m = case("049-anp-np-banp-deny.yaml");
    let v = show(&m, "network-policy-conformance-gryffindor/harry-potter-0");
    let np = "NetworkPolicy network-policy-conformance-gryffindor/allow-gress-from-to-slytherin-to-gryffindor";
    for d in [&v.ingress, &v.egress] {
        assert_eq!(
            names(d),
            vec![
                "AdminNetworkPolicy pass-example",
                np,
                "BaselineAdminNetworkPolicy default"
            ]
        );
        assert!(d.isolated);
        assert_eq!(d.isolated_by, vec![np.to_string()]);
        let tiers: Vec<&str> = d.policies.iter().map(|p| p.tier.as_str()).collect();
        assert_eq!(tiers, vec!["admin (priority 10)", "namespace", "baseline"]);
        let actions: Vec<&str> = d
            .policies
            .iter()
            .map(|p| p.rules[0].action.as_str())
            .collect();
        assert_eq!(actions, vec!["deny", "allow", "deny"]);
        for p in &d.policies {
            assert_eq!(
                p.rules[0].peer_pods,
                vec![
                    "network-policy-conformance-slytherin/draco-malfoy-0",
                    "network-policy-conformance-slytherin/draco-malfoy-1"
                ]
            );
            assert_eq!(p.rules[0].ports, vec!["any"]);
        }
    }
    assert_eq!(
        v.ingress.policies[0].rules[0].rule,
        "spec.ingress[0] (deny-all-ingress-from-slytherin)"
    );
    // a pod no policy selects
    let v = show(&m, "network-policy-conformance-hufflepuff/cedric-diggory-0");
    assert_eq!(v.ingress, DirectionView::default());
    assert!(!v.egress.isolated && v.egress.policies.is_empty());
}

/// The lab's API pod: isolated both ways, its L7 and DNS rules, its peers by name.
#[test]
fn the_lab_api_pod_with_its_l7_and_dns_rules() {
    let m = lab();
    let v = show(&m, "production/api");
    assert_eq!(v.labels, vec!["app=api", "tier=backend"]);
    assert!(v.ingress.isolated && v.egress.isolated);
    assert_eq!(
        names(&v.ingress),
        vec![
            "NetworkPolicy production/default-deny-all",
            "CiliumNetworkPolicy production/api-l7",
            "CiliumNetworkPolicy production/allow-prometheus-scrape"
        ]
    );
    let deny_all = &v.ingress.policies[0];
    assert!(deny_all.default_deny && deny_all.rules.is_empty());
    let l7 = &v.ingress.policies[1].rules[0];
    assert_eq!(
        (l7.action.as_str(), l7.rule.as_str()),
        ("allow", "spec.ingress[0].toPorts[0]")
    );
    assert_eq!(l7.peer_pods, vec!["production/frontend"]);
    assert_eq!(l7.ports, vec!["TCP/8080"]);
    assert_eq!(
        l7.l7[0],
        "spec.ingress[0].toPorts[0].rules.http[0]: method=GET path=/v1/.*"
    );
    let dns = v
        .egress
        .policies
        .iter()
        .find(|p| p.policy == "CiliumNetworkPolicy production/allow-cluster-dns")
        .unwrap();
    assert_eq!(dns.rules[0].peer_pods, vec!["kube-system/coredns"]);
    assert_eq!(dns.rules[0].ports, vec!["UDP/53", "TCP/53"]);
    assert!(dns.rules[0].l7[1].ends_with("matchName: api.payments.example."));
    let cidr = v
        .egress
        .policies
        .iter()
        .flat_map(|p| &p.rules)
        .find(|r| r.peers.starts_with("cidr "))
        .unwrap();
    assert_eq!(cidr.peers, "cidr 192.0.2.0/24 except 192.0.2.254/32");
    assert!(cidr.peer_pods.is_empty());
    // a JSON round trip (what the agent serves and the CLI reads)
    let back: EndpointView = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(back, v);
}

#[test]
fn label_queries_select_pods_as_kubectl_does() {
    let m = lab();
    let pods = |ns: Option<&str>, q: &str| -> Vec<String> {
        m.select_pods(ns, &LabelQuery::parse(q).unwrap())
            .iter()
            .map(|e| e.name.clone())
            .collect()
    };
    assert_eq!(pods(Some("production"), "app=api"), vec!["production/api"]);
    assert_eq!(pods(Some("production"), "app==api"), vec!["production/api"]);
    assert_eq!(
        pods(Some("production"), "tier in (web, backend)"),
        vec![
            "production/frontend",
            "production/api",
            "production/payments"
        ]
    );
    assert_eq!(
        pods(Some("production"), "tier=database,role!=primary"),
        vec!["production/postgres-1"]
    );
    assert_eq!(
        pods(Some("analytics"), ""),
        pods(Some("analytics"), "!nope")
    );
    assert!(pods(
        Some("production"),
        "app notin (api,frontend,payments,postgres)"
    )
    .is_empty());
    assert!(pods(None, "app=api").contains(&"production/api".to_string()));
    assert!(pods(Some("nowhere"), "").is_empty());

    let by_name = Selection {
        pod: Some("production/api".into()),
        ..Selection::default()
    };
    assert_eq!(
        m.show_selection(&by_name).unwrap()[0].endpoint,
        "production/api"
    );
    let missing = Selection {
        pod: Some("production/nope".into()),
        ..Selection::default()
    };
    assert_eq!(
        m.show_selection(&missing).unwrap_err().to_string(),
        "no pod production/nope in the cluster (expected NAMESPACE/POD)"
    );
    let by_labels = Selection {
        namespace: Some("production".into()),
        labels: LabelQuery::parse("tier=backend").unwrap(),
        ..Selection::default()
    };
    let shown: Vec<String> = m
        .show_selection(&by_labels)
        .unwrap()
        .into_iter()
        .map(|v| v.endpoint)
        .collect();
    assert_eq!(shown, vec!["production/api", "production/payments"]);

    let labels: BTreeMap<String, String> = [("app".to_string(), "api".to_string())].into();
    assert!(LabelQuery::parse("app").unwrap().matches(&labels));
    assert!(!LabelQuery::parse("!app").unwrap().matches(&labels));
    for (bad, why) in [
        ("app=api,", "an empty requirement"),
        ("tier in web", "expected a set"),
        ("a b=c", "not a label key"),
    ] {
        let err = LabelQuery::parse(bad).unwrap_err().to_string();
        assert!(err.contains(bad) && err.contains(why), "{err}");
    }
}
