//! How the reconciler builds the next model after a source change: incrementally
//! (`Model::apply_cluster`) when only pods and namespaces changed, by a full compile
//! when policies, nodes, the source's own DNS observations or the compile options changed,
//! or when there is no model yet. The incremental path never guesses: a change it does
//! not take falls back to a full compile.

use policy_model::cluster::DnsObservation;
use policy_model::compile::ChurnUnsupported;
use policy_model::identity::Idx;
use policy_model::policy::Policy;
use policy_model::{Cluster, CompileOptions, Model};

/// Why the next model is compiled in full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Full {
    /// Nothing compiled yet.
    NoModel,
    /// Policies were added, changed or removed.
    Policies,
    /// The source's own DNS observations changed.
    SourceDns,
    /// The compile options differ from the current model's.
    Options,
    /// A cluster change the incremental path does not take (nodes, duplicate pods).
    Unsupported(ChurnUnsupported),
}

/// How the next model was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Incremental,
    Full(Full),
}

/// What changed since the current model was built, as the reconciler saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub policies: bool,
    pub source_dns: bool,
}

/// The next model and how it was built.
pub struct Next {
    pub model: Model,
    pub plan: Plan,
    /// Identities that came into use on the incremental path, to be numbered
    /// (`StableIds::apply_new`); a full compile is renumbered as a whole.
    pub new_identities: Vec<Idx>,
    /// Identities the incremental path retired, whose numbers are to be forgotten
    /// (`StableIds::forget`).
    pub retired: Vec<Idx>,
}

/// Builds the model for the source's `cluster` (without learned DNS observations) and the
/// policies in force. `copy` gives a working copy of the current model for the incremental
/// path; `learned` and `policies` are only asked for on a full compile.
pub fn next_model(
    current: Option<&Model>,
    copy: impl FnOnce(&Model) -> Model,
    pending: Pending,
    cluster: &Cluster,
    options: CompileOptions,
    learned: impl FnOnce() -> Vec<DnsObservation>,
    policies: impl FnOnce() -> Vec<Policy>,
) -> Next {
    let why = match current {
        None => Full::NoModel,
        Some(_) if pending.policies => Full::Policies,
        Some(_) if pending.source_dns => Full::SourceDns,
        Some(m) if m.options != options => Full::Options,
        Some(m) => {
            // The proxies keep reading the current model; this copy becomes the next one.
            let mut model = copy(m);
            match model.apply_cluster(cluster) {
                Ok(change) => {
                    return Next {
                        model,
                        plan: Plan::Incremental,
                        new_identities: change.new_identities,
                        retired: change.retired,
                    }
                }
                Err(e) => Full::Unsupported(e),
            }
        }
    };
    let mut full = cluster.clone();
    full.dns.extend(learned());
    Next {
        model: Model::compile(&full, policies(), options),
        plan: Plan::Full(why),
        new_identities: Vec::new(),
        retired: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use policy_model::api::load;
    use policy_model::Direction;

    use super::*;

    const CLUSTER: &str = r#"
namespaces: [{name: a, labels: {team: blue}}, {name: b}]
nodes: [{name: n1, ip: 172.18.0.2}, {name: n2, ip: 172.18.0.3}]
pods:
- {namespace: a, name: web, labels: {app: web}, ip: 10.0.0.1, node: n1, ports: [{name: http, port: 80}]}
- {namespace: a, name: db, labels: {app: db}, ip: 10.0.0.2, node: n1}
- {namespace: b, name: web, labels: {app: web}, ip: 10.0.1.1, node: n2}
dns:
- {client: a/web, name: api.example.com, ips: [203.0.113.7]}
"#;

    const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web, io.cilium.k8s.namespace.labels.team: blue}}]
    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  ingress:
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
"#;

    fn policies(yaml: &str) -> Vec<Policy> {
        let (p, errors, _) = load(yaml, Some("test.yaml"));
        assert!(errors.is_empty(), "{errors:?}");
        p
    }

    fn cluster() -> Cluster {
        serde_yaml::from_str(CLUSTER).unwrap()
    }

    fn compile(c: &Cluster) -> Model {
        Model::compile(c, policies(POLICIES), CompileOptions::default())
    }

    fn next(current: Option<&Model>, pending: Pending, c: &Cluster) -> Next {
        next_model(
            current,
            Model::clone,
            pending,
            c,
            CompileOptions::default(),
            Vec::new,
            || policies(POLICIES),
        )
    }

    /// Everything the datapath and the proxies read, with identities by labels.
    fn view(m: &Model) -> Vec<String> {
        let labels = |i: Idx| m.identities.get(i).labels.to_string();
        let mut out = Vec::new();
        for ep in &m.endpoints {
            out.push(format!("{} {:?} {}", ep.name, ep.key, labels(ep.identity)));
            for d in Direction::BOTH {
                for e in &ep.dirs[d.index()].entries {
                    let peers: BTreeSet<String> = m
                        .selectors
                        .peer_set_members(e.peers)
                        .iter()
                        .map(labels)
                        .collect();
                    out.push(format!(
                        "  {d:?} {peers:?} {:?} {:?} {:?} {:?}",
                        e.protocol, e.port, e.action, e.origin
                    ));
                }
            }
        }
        let by_number: std::collections::HashMap<u32, String> = (0..m.identities.len() as Idx)
            .filter(|&i| m.identities.is_live(i))
            .map(|i| (m.identities.get(i).id, labels(i)))
            .collect();
        for (net, id) in m.ipcache(Some("n1")) {
            out.push(format!("ipcache {net} {}", by_number[&id]));
        }
        out
    }

    #[test]
    fn pod_churn_is_applied_incrementally_and_equals_a_full_compile() {
        let start = compile(&cluster());
        let mut c = cluster();
        // a pod added before the others, one removed, one relabelled, one moved to
        // another IP, and a namespace relabelled
        c.pods.insert(
            0,
            serde_yaml::from_str(
                "{namespace: b, name: new, labels: {app: db}, ip: 10.0.1.9, node: n2}",
            )
            .unwrap(),
        );
        c.pods.retain(|p| p.id() != "a/db");
        c.pods[1].labels.insert("app".into(), "db".into());
        c.pods[2].ip = Some("10.0.1.5".parse::<IpAddr>().unwrap());
        c.namespaces[1].labels.insert("team".into(), "blue".into());
        let n = next(Some(&start), Pending::default(), &c);
        assert_eq!(n.plan, Plan::Incremental);
        assert!(!n.new_identities.is_empty());
        let mut expected = c.clone();
        expected.dns = cluster().dns;
        assert_eq!(view(&n.model), view(&compile(&expected)));
        assert_eq!(n.model.cluster, expected);
    }

    #[test]
    fn what_the_incremental_path_does_not_take_is_compiled_in_full() {
        let start = compile(&cluster());
        let c = cluster();
        assert_eq!(
            next(None, Pending::default(), &c).plan,
            Plan::Full(Full::NoModel)
        );
        let changed = Pending {
            policies: true,
            source_dns: false,
        };
        assert_eq!(
            next(Some(&start), changed, &c).plan,
            Plan::Full(Full::Policies)
        );
        let dns = Pending {
            policies: false,
            source_dns: true,
        };
        assert_eq!(
            next(Some(&start), dns, &c).plan,
            Plan::Full(Full::SourceDns)
        );
        let mut nodes = cluster();
        nodes.nodes.pop();
        let n = next(Some(&start), Pending::default(), &nodes);
        assert_eq!(
            n.plan,
            Plan::Full(Full::Unsupported(ChurnUnsupported::Nodes))
        );
        assert_eq!(view(&n.model), view(&compile(&nodes)));
        let cidr = next_model(
            Some(&start),
            Model::clone,
            Pending::default(),
            &c,
            CompileOptions {
                cidr_matches_cluster: true,
            },
            Vec::new,
            || policies(POLICIES),
        );
        assert_eq!(cidr.plan, Plan::Full(Full::Options));
    }

    #[test]
    fn a_full_compile_takes_the_learned_observations() {
        let mut c = cluster();
        c.dns.clear();
        let learned = || {
            vec![DnsObservation {
                client: "a/web".into(),
                name: "api.example.com".into(),
                ips: vec!["203.0.113.7".parse().unwrap()],
            }]
        };
        let n = next_model(
            None,
            Model::clone,
            Pending::default(),
            &c,
            CompileOptions::default(),
            learned,
            || policies(POLICIES),
        );
        assert_eq!(view(&n.model), view(&compile(&cluster())));
    }
}
