//! `lint`: one manifest per finding under `tests/lint/` (named after its check), each
//! yielding that finding and no other, and a clean set that yields none. Checked against
//! the cluster in `tests/lint/cluster.yaml`, as `ward policy lint --cluster` does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use policy_model::cluster::Cluster;
use policy_model::lint::{lint, Finding, Severity, Source};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lint")
}

fn cluster() -> Cluster {
    let text = std::fs::read_to_string(dir().join("cluster.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn source(path: &Path) -> Source {
    Source {
        file: Some(path.file_name().unwrap().to_string_lossy().into_owned()),
        text: std::fs::read_to_string(path).unwrap(),
    }
}

fn findings(name: &str, with_cluster: bool) -> Vec<Finding> {
    let c = cluster();
    lint(
        &[source(&dir().join(format!("{name}.yaml")))],
        with_cluster.then_some(&c),
    )
}

fn only(name: &str, with_cluster: bool) -> Finding {
    let f = findings(name, with_cluster);
    assert!(!f.is_empty(), "{name}: no finding");
    for x in &f {
        assert_eq!(x.check, name, "{name}: unexpected finding {x}");
    }
    f.into_iter().next().unwrap()
}

#[test]
fn every_fixture_yields_its_own_finding_only() {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let stem = p.file_stem()?.to_str()?.to_string();
            (p.extension()? == "yaml" && stem != "cluster").then_some(stem)
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 10, "{names:?}");
    for n in &names {
        only(n, true);
    }
}

#[test]
fn findings_name_file_line_object_path_and_fix() {
    let f = only("or-peers", true);
    assert_eq!(f.file.as_deref(), Some("or-peers.yaml"));
    assert_eq!(f.line, Some(14), "{f}");
    assert_eq!(f.object, "NetworkPolicy shop/api-from-web");
    assert_eq!(f.path, "spec.ingress[0].from[1]");
    assert_eq!(f.severity, Severity::Warning);
    assert!(f.fix.contains("one peer"), "{f}");

    let f = only("egress-without-dns", false);
    assert_eq!(
        (f.path.as_str(), f.line),
        ("spec.policyTypes", Some(9)),
        "{f}"
    );
    assert_eq!(f.severity, Severity::Error);

    let f = only("cidr-covers-cluster", true);
    assert_eq!(
        (f.path.as_str(), f.line),
        ("spec.ingress[0]", Some(11)),
        "{f}"
    );
    assert!(f.message.contains("3 pods (shop/web, ...)"), "{f}");

    let f = only("selects-no-pod", true);
    assert_eq!(
        (f.path.as_str(), f.line),
        ("spec.podSelector", Some(8)),
        "{f}"
    );

    let f = only("allow-all-beside-default-deny", false);
    assert_eq!(f.object, "NetworkPolicy shop/open-api");
    assert_eq!(
        (f.path.as_str(), f.line),
        ("spec.ingress[0]", Some(20)),
        "{f}"
    );
    assert!(f.message.contains("NetworkPolicy shop/default-deny"), "{f}");

    let f = only("fqdn-without-dns-rule", false);
    assert_eq!(
        (f.path.as_str(), f.line),
        ("spec.egress[1]", Some(17)),
        "{f}"
    );
    assert_eq!(f.severity, Severity::Error);

    let f = only("moot-l7", false);
    assert_eq!(
        (f.path.as_str(), f.line),
        ("spec.ingress[1]", Some(18)),
        "{f}"
    );

    let f = only("calico-order-missing", false);
    assert_eq!(f.object, "GlobalNetworkPolicy allow-web");
    assert_eq!(f.line, Some(20), "{f}");

    let f = only("calico-rules-ignored", false);
    assert_eq!((f.path.as_str(), f.line), ("spec.egress", Some(14)), "{f}");

    let f = only("invalid", false);
    assert_eq!((f.path.as_str(), f.line), ("spec.selector", Some(8)), "{f}");
    assert!(f.message.contains("at character 5"), "{f}");
    assert_eq!(f.severity, Severity::Error);
}

#[test]
fn checks_that_need_pods_stay_quiet_without_a_cluster() {
    assert!(findings("cidr-covers-cluster", false).is_empty());
    assert!(findings("selects-no-pod", false).is_empty());
}

#[test]
fn the_clean_set_yields_nothing() {
    let c = cluster();
    let f = lint(&[source(&dir().join("clean/policies.yaml"))], Some(&c));
    assert!(
        f.is_empty(),
        "{}",
        f.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(lint(&[source(&dir().join("clean/policies.yaml"))], None).is_empty());
}
