//! How the reconciler builds the next model after a source change: incrementally when
//! pods and namespaces changed (`Model::apply_cluster`) and when policies changed
//! (`Model::apply_policies`), by a full compile when the source's own DNS observations
//! or the compile options changed, when nothing is compiled yet, or when a change is one
//! the incremental paths do not take (nodes, duplicate pods; a change of the policies'
//! CIDR prefixes, toFQDNs patterns or Calico tiers). The incremental paths never guess:
//! a change they do not take falls back to a full compile. Either way the model
//! compiles the node's own endpoints only ([`Scope`]).

use std::sync::Arc;

use policy_model::cluster::DnsObservation;
use policy_model::compile::{ChurnUnsupported, PolicyUnsupported, Scope};
use policy_model::identity::Idx;
use policy_model::policy::Policy;
use policy_model::{Cluster, CompileOptions, Model};

/// Why the next model is compiled in full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Full {
    /// Nothing compiled yet.
    NoModel,
    /// A policy change the incremental path does not take.
    Policies(PolicyUnsupported),
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

/// What the next model is built from.
pub struct Inputs<'a, L, P> {
    /// The source's cluster (without learned DNS observations), shared with the model.
    pub cluster: &'a Arc<Cluster>,
    pub options: CompileOptions,
    /// The endpoints compiled: the agent's node.
    pub scope: &'a Scope,
    /// The learned DNS observations (asked for on a full compile only).
    pub learned: L,
    /// The policies in force (asked for when they changed, or on a full compile).
    pub policies: P,
}

/// Builds the model for `inputs`. `copy` gives a working copy of the current model for
/// the incremental paths.
pub fn next_model<L, P>(
    current: Option<&Model>,
    copy: impl FnOnce(&Model) -> Model,
    pending: Pending,
    inputs: Inputs<'_, L, P>,
) -> Next
where
    L: FnOnce() -> Vec<DnsObservation>,
    P: FnOnce() -> Vec<Arc<Policy>>,
{
    let mut ask = Some(inputs.policies);
    // the policies in force, once asked for
    let mut fresh: Option<Vec<Arc<Policy>>> = None;
    let why = match current {
        None => Full::NoModel,
        Some(_) if pending.source_dns => Full::SourceDns,
        Some(m) if m.options != inputs.options || m.scope() != inputs.scope => Full::Options,
        Some(m) => {
            // The proxies keep reading the current model; this copy becomes the next one.
            let mut model = copy(m);
            let churn = if Arc::ptr_eq(&model.cluster, inputs.cluster) {
                Ok(Default::default())
            } else {
                model.apply_shared_cluster(Arc::clone(inputs.cluster))
            };
            match churn {
                Err(e) => Full::Unsupported(e),
                Ok(change) => {
                    let refused = match ask.take().filter(|_| pending.policies) {
                        Some(ask) => {
                            let p = ask();
                            let r = model.apply_policies(p.clone()).err();
                            fresh = Some(p);
                            r
                        }
                        None => None,
                    };
                    match refused {
                        Some(e) => Full::Policies(e),
                        None => {
                            return Next {
                                model,
                                plan: Plan::Incremental,
                                new_identities: change.new_identities,
                                retired: change.retired,
                            }
                        }
                    }
                }
            }
        }
    };
    let mut dns = inputs.cluster.dns.clone();
    dns.extend((inputs.learned)());
    let policies = match (fresh, ask) {
        (Some(p), _) => p,
        (None, Some(ask)) => ask(),
        // taken only on the incremental path, which asked unless nothing changed
        (None, None) => current.map(|m| m.policies.clone()).unwrap_or_default(),
    };
    Next {
        model: Model::build(
            Arc::clone(inputs.cluster),
            dns,
            policies,
            inputs.options,
            inputs.scope.clone(),
        ),
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

    fn policies(yaml: &str) -> Vec<Arc<Policy>> {
        let (p, errors, _) = load(yaml, Some("test.yaml"));
        assert!(errors.is_empty(), "{errors:?}");
        p.into_iter().map(Arc::new).collect()
    }

    fn scope() -> Scope {
        Scope::Node("n1".into())
    }

    fn cluster() -> Cluster {
        serde_yaml::from_str(CLUSTER).unwrap()
    }

    /// The node-scoped model of `c` and `yaml`, compiled in full.
    fn compile_with(c: &Cluster, yaml: &str) -> Model {
        Model::build(
            Arc::new(c.clone()),
            c.dns.clone(),
            policies(yaml),
            CompileOptions::default(),
            scope(),
        )
    }

    fn compile(c: &Cluster) -> Model {
        compile_with(c, POLICIES)
    }

    fn next_with(current: Option<&Model>, pending: Pending, c: &Cluster, yaml: &str) -> Next {
        next_model(
            current,
            Model::clone,
            pending,
            Inputs {
                cluster: &Arc::new(c.clone()),
                options: CompileOptions::default(),
                scope: &scope(),
                learned: Vec::new,
                policies: || policies(yaml),
            },
        )
    }

    fn next(current: Option<&Model>, pending: Pending, c: &Cluster) -> Next {
        next_with(current, pending, c, POLICIES)
    }

    /// Everything the datapath and the proxies read, with identities by labels.
    fn view(m: &Model) -> Vec<String> {
        let labels = |i: Idx| m.identities.get(i).labels.to_string();
        let mut out = Vec::new();
        for ep in m.endpoints() {
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
        assert_eq!(*n.model.cluster, c);
        assert_eq!(n.model.dns(), expected.dns);
    }

    #[test]
    fn what_the_incremental_path_does_not_take_is_compiled_in_full() {
        let start = compile(&cluster());
        let c = cluster();
        assert_eq!(
            next(None, Pending::default(), &c).plan,
            Plan::Full(Full::NoModel)
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
            Inputs {
                cluster: &Arc::new(c.clone()),
                options: CompileOptions {
                    cidr_matches_cluster: true,
                },
                scope: &scope(),
                learned: Vec::new,
                policies: || policies(POLICIES),
            },
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
            Inputs {
                cluster: &Arc::new(c),
                options: CompileOptions::default(),
                scope: &scope(),
                learned,
                policies: || policies(POLICIES),
            },
        );
        assert_eq!(view(&n.model), view(&compile(&cluster())));
    }

    const CHANGED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: '5433', protocol: TCP}]}]
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

    #[test]
    fn a_policy_change_is_applied_incrementally_and_equals_a_full_compile() {
        let start = compile(&cluster());
        let changed = Pending {
            policies: true,
            source_dns: false,
        };
        let n = next_with(Some(&start), changed, &cluster(), CHANGED);
        assert_eq!(n.plan, Plan::Incremental);
        assert_eq!(view(&n.model), view(&compile_with(&cluster(), CHANGED)));
        assert_ne!(view(&n.model), view(&start));
        // with pods changed in the same push
        let mut c = cluster();
        c.pods[1].labels.insert("app".into(), "web".into());
        let n = next_with(Some(&start), changed, &c, CHANGED);
        assert_eq!(n.plan, Plan::Incremental);
        assert_eq!(view(&n.model), view(&compile_with(&c, CHANGED)));
    }

    #[test]
    fn a_policy_change_of_prefixes_is_compiled_in_full() {
        let start = compile(&cluster());
        let with_cidr = format!(
            "{POLICIES}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: out, namespace: a}}\nspec:\n  endpointSelector: {{}}\n  egress: [{{toCIDR: [192.0.2.0/24]}}]\n"
        );
        let changed = Pending {
            policies: true,
            source_dns: false,
        };
        let n = next_with(Some(&start), changed, &cluster(), &with_cidr);
        assert_eq!(
            n.plan,
            Plan::Full(Full::Policies(PolicyUnsupported::Prefixes))
        );
        assert_eq!(view(&n.model), view(&compile_with(&cluster(), &with_cidr)));
    }

    #[test]
    fn the_model_compiles_the_nodes_own_endpoints_only() {
        let m = next(None, Pending::default(), &cluster()).model;
        let names: Vec<&str> = m.endpoints().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a/web", "a/db", "node:n1"]);
        // the other node's pod is still known: identity and ipcache
        let remote: IpAddr = "10.0.1.1".parse().unwrap();
        assert!(m.ipcache_entry(remote, Some("n1")).is_some());
        assert!(m.pod_endpoint("b/web").is_none());
    }
}
