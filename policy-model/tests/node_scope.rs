//! A model compiled for one node (`Scope::Node`, as its agent compiles it) gives that
//! node's endpoints exactly what the whole-cluster model gives them: the same entries
//! (peers by members, L7 sets by content), the same verdicts, the same ipcache, and the
//! same connection policies for flows from them (the remote destination's ingress side
//! built on demand). Checked over every shared conformance case, for each of its nodes,
//! and over generated clusters.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

#[path = "../benches/gen.rs"]
mod gen;

use std::net::IpAddr;
use std::path::Path;

use common::{assert_endpoints_match, ipcache};
use policy_model::cluster::Cluster;
use policy_model::compile::Scope;
use policy_model::conformance::parse_case;
use policy_model::verdict::QueryError;
use policy_model::{CompileOptions, EndpointRef, Model, Protocol};

/// Every IP of the cluster (pods, nodes, externals) and a few outside it.
fn probe_ips(c: &Cluster) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = c.pods.iter().flat_map(|p| p.all_ips()).collect();
    ips.extend(c.nodes.iter().map(|n| n.ip));
    ips.extend(c.externals.iter().map(|e| e.ip));
    ips.extend(["203.0.113.77", "192.0.2.1", "2001:db8::1"].map(|s| s.parse::<IpAddr>().unwrap()));
    ips.sort();
    ips.dedup();
    ips
}

/// The node of a probe's source, when it is a pod or a node.
fn source_node(c: &Cluster, from: &EndpointRef) -> Option<String> {
    match from {
        EndpointRef::Pod { namespace, name } => c
            .pods
            .iter()
            .find(|p| &p.namespace == namespace && &p.name == name)
            .and_then(|p| p.node.clone()),
        EndpointRef::Node(n) => Some(n.clone()),
        EndpointRef::Ip(ip) => c
            .pods
            .iter()
            .find(|p| p.all_ips().any(|x| x == *ip))
            .and_then(|p| p.node.clone()),
        EndpointRef::External(_) => None,
    }
}

/// Compares a node's model with the whole cluster's: endpoints, ipcache, and the
/// connection policy of flows from the node's pods to the probe IPs (every `stride`th of
/// each, so that large clusters stay quick).
fn assert_node_matches(scoped: &Model, full: &Model, node: &str, stride: usize, what: &str) {
    let ips: Vec<IpAddr> = probe_ips(&full.cluster)
        .into_iter()
        .step_by(stride)
        .collect();
    assert_eq!(ipcache(scoped), ipcache(full), "{what}: ipcache");
    assert_endpoints_match(scoped, full, &ips, Some(node), what);
    let local = full
        .cluster
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(node));
    for p in local.step_by(stride) {
        for src in p.all_ips() {
            for &dst in &ips {
                for (proto, port) in [
                    (Protocol::Tcp, 80),
                    (Protocol::Tcp, 8080),
                    (Protocol::Udp, 53),
                ] {
                    let a = scoped.connection_policy(src, dst, proto, port, Some(node));
                    let b = full.connection_policy(src, dst, proto, port, Some(node));
                    assert_eq!(
                        format!("{a:?}"),
                        format!("{b:?}"),
                        "{what}: {src} -> {dst} {proto:?}/{port}"
                    );
                }
            }
        }
    }
}

fn cases(folder: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/conformance")
        .join(folder);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let case = parse_case(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let file = f.to_str();
        let profiles: Vec<Option<&str>> = std::iter::once(None)
            .chain(case.variants.keys().map(|k| Some(k.as_str())))
            .collect();
        for profile in profiles {
            let full = case.compile(profile, file).unwrap();
            for n in &case.cluster.nodes {
                let what = format!("{} {profile:?} node {}", f.display(), n.name);
                let scoped = case
                    .compile_scoped(profile, file, Scope::Node(n.name.clone()))
                    .unwrap();
                assert_node_matches(&scoped, &full, &n.name, 1, &what);
                for probe in case.probes_for(profile) {
                    let q = probe.query().unwrap();
                    let want = full.query(&q);
                    let local = source_node(&case.cluster, &q.from).as_deref() == Some(&*n.name);
                    match scoped.query(&q) {
                        Ok(v) => {
                            assert_eq!(
                                format!("{v:?}"),
                                format!("{:?}", want.as_ref().unwrap()),
                                "{what}: {}",
                                probe.describe()
                            );
                            checked += usize::from(local);
                        }
                        Err(QueryError::OutOfScope(_)) if !local => {}
                        Err(e) => panic!("{what}: {}: {e}", probe.describe()),
                    }
                }
            }
        }
    }
    checked
}

#[test]
fn every_shared_case_gives_each_node_what_the_whole_cluster_gives() {
    let checked = cases("cases") + cases("cases-calico");
    // probes from pods on a node, answered by that node's model
    assert!(checked > 100, "{checked}");
}

#[test]
fn generated_clusters_give_each_node_what_the_whole_cluster_gives() {
    for (pods, nodes) in [(300, ["node-1", "node-7"]), (600, ["node-1", "node-2"])] {
        let s = gen::Scale::pods(pods);
        let cluster = gen::cluster_at(s);
        let policies = gen::policies_at(s);
        let full = Model::compile(&cluster, policies.clone(), CompileOptions::default());
        for node in nodes {
            let scoped = Model::compile_scoped(
                &cluster,
                policies.clone(),
                CompileOptions::default(),
                Scope::Node(node.into()),
            );
            let local = cluster
                .pods
                .iter()
                .filter(|p| p.node.as_deref() == Some(node))
                .count();
            assert_eq!(scoped.endpoints().count(), local + 1, "{pods} pods, {node}");
            assert!(local > 0);
            assert_node_matches(&scoped, &full, node, 17, &format!("{pods} pods, {node}"));
        }
    }
}
