//! Helpers shared by the integration tests: YAML snippets, loading with error checks, a
//! small cluster and flow queries.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use policy_model::api::load;
use policy_model::cluster::Cluster;
use policy_model::http::SimpleRequest;
use policy_model::identity::Idx;
use policy_model::policy::Policy;
use policy_model::verdict::Verdict;
use policy_model::{CompileOptions, EndpointRef, Model, PolicyError, Protocol, Query};

/// Removes the common leading indentation of the non-blank lines, so that YAML can be
/// written indented inside raw strings.
pub fn dedent(s: &str) -> String {
    let indent = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    s.lines()
        .map(|l| if l.len() >= indent { &l[indent..] } else { "" })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    dedent(s)
        .lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// A CiliumNetworkPolicy `default/bad` with the given spec.
pub fn cnp(spec: &str) -> String {
    cnp_named("bad", spec)
}

pub fn cnp_named(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A CiliumClusterwideNetworkPolicy `bad` with the given spec.
pub fn ccnp(spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: bad}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A NetworkPolicy `default/bad` with the given spec.
pub fn np(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: default}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// An AdminNetworkPolicy `bad` with the given spec.
pub fn anp(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: bad}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A BaselineAdminNetworkPolicy with the given name and spec.
pub fn banp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A v1alpha2 ClusterNetworkPolicy `bad` with the given spec.
pub fn cnp2(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: bad}}\nspec:\n{}",
        indent(spec, 2)
    )
}

/// A valid policy put next to an invalid one, to show that it still loads.
pub const SIBLING: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sibling, namespace: default}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
";

pub const FILE: &str = "policies.yaml";

/// Loads a text that must be free of errors and returns its policies.
pub fn accept(yaml: &str) -> Vec<Policy> {
    let (policies, errors, _) = load(yaml, Some(FILE));
    assert!(
        errors.is_empty(),
        "expected no errors, got:\n{}\nfor:\n{yaml}",
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!policies.is_empty(), "no policy loaded from:\n{yaml}");
    policies
}

/// Loads the invalid object `bad` next to a valid sibling and checks that the bad object is
/// reported with an error at exactly `path` whose reason contains `reason`, that every
/// error names the file and the bad object, that the bad object yields no policy, and
/// that the sibling still loads. Returns the matching error.
pub fn reject(bad: &str, path: &str, reason: &str) -> PolicyError {
    let text = format!("{SIBLING}---\n{bad}");
    let (policies, errors, _) = load(&text, Some(FILE));
    let dump = errors
        .iter()
        .map(|e| format!("  path={:?} reason={:?}", e.path, e.reason))
        .collect::<Vec<_>>()
        .join("\n");
    let found = errors
        .iter()
        .find(|e| e.path == path && e.reason.contains(reason))
        .unwrap_or_else(|| {
            panic!("no error at {path:?} containing {reason:?}; errors:\n{dump}\nfor:\n{bad}")
        })
        .clone();
    let object = found.object.clone().expect("error names its object");
    assert!(
        !object.contains("sibling"),
        "error blamed the valid sibling: {found}"
    );
    for e in &errors {
        assert_eq!(e.file.as_deref(), Some(FILE), "error without file: {e}");
        assert_eq!(
            e.object.as_ref(),
            Some(&object),
            "error names another object: {e}"
        );
    }
    assert!(
        policies.iter().all(|p| p.object.to_string() != object),
        "the invalid object yielded a policy"
    );
    assert!(
        policies.iter().any(|p| p.object.name == "sibling"),
        "the valid sibling did not load; errors:\n{dump}"
    );
    found
}

/// The cluster most semantic tests use.
///
/// * namespaces `x` (`team: blue`) and `y` (`team: red`), plus `z` (no labels)
/// * nodes `node-1` (172.18.0.2) and `node-2` (172.18.0.3)
/// * pods (all on node-1 unless said otherwise):
///   - `x/a` `{app: a, tier: web}` 10.0.0.1, ports http=80/TCP, dns=53/UDP
///   - `x/b` `{app: b}` 10.0.0.2, ports http=8080/TCP
///   - `x/c` `{app: c, tier: db}` 10.0.0.3 on node-2
///   - `y/a` `{app: a}` 10.0.1.1, ports http=80/TCP
///   - `y/b` `{app: b}` 10.0.1.2 on node-2
///   - `z/a` `{app: a}` 10.0.2.1
/// * externals `ext` 203.0.113.10, `ext2` 198.51.100.20, `ext3` 192.0.2.5
pub const CLUSTER: &str = r#"
namespaces:
  - {name: x, labels: {team: blue}}
  - {name: y, labels: {team: red}}
  - {name: z}
nodes:
  - {name: node-1, ip: 172.18.0.2}
  - {name: node-2, ip: 172.18.0.3}
pods:
  - namespace: x
    name: a
    labels: {app: a, tier: web}
    ip: 10.0.0.1
    node: node-1
    ports:
      - {name: http, port: 80, protocol: TCP}
      - {name: dns, port: 53, protocol: UDP}
  - namespace: x
    name: b
    labels: {app: b}
    ip: 10.0.0.2
    node: node-1
    ports:
      - {name: http, port: 8080, protocol: TCP}
  - namespace: x
    name: c
    labels: {app: c, tier: db}
    ip: 10.0.0.3
    node: node-2
  - namespace: y
    name: a
    labels: {app: a}
    ip: 10.0.1.1
    node: node-1
    ports:
      - {name: http, port: 80, protocol: TCP}
  - namespace: y
    name: b
    labels: {app: b}
    ip: 10.0.1.2
    node: node-2
  - namespace: z
    name: a
    labels: {app: a}
    ip: 10.0.2.1
    node: node-1
externals:
  - {name: ext, ip: 203.0.113.10}
  - {name: ext2, ip: 198.51.100.20}
  - {name: ext3, ip: 192.0.2.5}
"#;

pub fn cluster(yaml: &str) -> Cluster {
    serde_yaml::from_str(&dedent(yaml)).expect("cluster YAML")
}

/// A compiled model with query helpers.
pub struct Env {
    pub model: Model,
}

impl Env {
    /// The standard cluster with these policies (CIDRs do not match cluster IPs).
    pub fn new(policies: &str) -> Env {
        Env::with(CLUSTER, policies, false)
    }

    pub fn with(cluster_yaml: &str, policies: &str, cidr_matches_cluster: bool) -> Env {
        let policies = accept(&dedent(policies));
        Env {
            model: Model::compile(
                &cluster(cluster_yaml),
                policies,
                CompileOptions {
                    cidr_matches_cluster,
                },
            ),
        }
    }

    /// The standard cluster with no policy at all.
    pub fn empty() -> Env {
        Env {
            model: Model::compile(&cluster(CLUSTER), Vec::new(), CompileOptions::default()),
        }
    }

    pub fn query(&self, q: &Query) -> Verdict {
        self.model
            .query(q)
            .unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    pub fn flow(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Verdict {
        self.query(&Query {
            from: EndpointRef::parse(from).unwrap(),
            to: EndpointRef::parse(to).unwrap(),
            port,
            protocol,
            http: None,
            dns: None,
        })
    }

    /// Whether a TCP connection is allowed.
    pub fn tcp(&self, from: &str, to: &str, port: u16) -> bool {
        self.flow(from, to, port, Protocol::Tcp).allowed
    }

    pub fn udp(&self, from: &str, to: &str, port: u16) -> bool {
        self.flow(from, to, port, Protocol::Udp).allowed
    }

    pub fn sctp(&self, from: &str, to: &str, port: u16) -> bool {
        self.flow(from, to, port, Protocol::Sctp).allowed
    }

    /// The verdict of an HTTP request (`headers` as `Name: value` pairs).
    pub fn http_verdict(
        &self,
        from: &str,
        to: &str,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Verdict {
        self.query(&Query {
            from: EndpointRef::parse(from).unwrap(),
            to: EndpointRef::parse(to).unwrap(),
            port,
            protocol: Protocol::Tcp,
            http: Some(SimpleRequest {
                method: method.into(),
                path: path.into(),
                host: None,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            dns: None,
        })
    }

    pub fn http(&self, from: &str, to: &str, port: u16, method: &str, path: &str) -> bool {
        self.http_verdict(from, to, port, method, path, &[]).allowed
    }

    pub fn http_h(
        &self,
        from: &str,
        to: &str,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> bool {
        self.http_verdict(from, to, port, method, path, headers)
            .allowed
    }

    /// Whether a DNS query (UDP/53) for `name` sent to `server` is answered.
    pub fn dns(&self, from: &str, server: &str, name: &str) -> bool {
        self.query(&Query {
            from: EndpointRef::parse(from).unwrap(),
            to: EndpointRef::parse(server).unwrap(),
            port: 53,
            protocol: Protocol::Udp,
            http: None,
            dns: Some(name.into()),
        })
        .allowed
    }
}

/// An identity by its labels, so that models compiled apart can be compared.
pub fn labels(m: &Model, i: Idx) -> String {
    m.identities.get(i).labels.to_string()
}

/// The identities of a peer set, by labels (a retired identity must have left it).
pub fn peers(m: &Model, ps: u32) -> std::collections::BTreeSet<String> {
    m.selectors
        .peer_set_members(ps)
        .iter()
        .map(|i| labels(m, i))
        .collect()
}

/// node-1's ipcache, prefixes with the labels of their identities, sorted.
pub fn ipcache(m: &Model) -> Vec<(String, String)> {
    let by_number: std::collections::HashMap<u32, String> = (0..m.identities.len() as Idx)
        .filter(|&i| m.identities.is_live(i))
        .map(|i| (m.identities.get(i).id, labels(m, i)))
        .collect();
    let mut out: Vec<(String, String)> = m
        .ipcache(Some("node-1"))
        .into_iter()
        .map(|(p, id)| (p.to_string(), by_number[&id].clone()))
        .collect();
    out.sort();
    out
}

/// Asserts that `inc` (incremental, possibly node-scoped) has exactly the endpoints of
/// `full` (a full compile of the whole cluster) that its scope covers, in the same slots,
/// with the same identities (by labels), the same entries (peers by members, L7 sets by
/// content) and the same verdicts for a peer at each of `probe` seen from `observer`.
pub fn assert_endpoints_match(
    inc: &Model,
    full: &Model,
    probe: &[std::net::IpAddr],
    observer: Option<&str>,
    step: &str,
) {
    use policy_model::compile::{EndpointKey, Scope};
    use policy_model::Direction;
    let covered = |key: EndpointKey| match (inc.scope(), key) {
        (Scope::Cluster, _) => true,
        (Scope::Node(n), EndpointKey::Pod(p)) => full.cluster.pods[p].node.as_deref() == Some(n),
        (Scope::Node(n), EndpointKey::Node(x)) => &full.cluster.nodes[x].name == n,
    };
    let expected: Vec<_> = full.endpoints().filter(|e| covered(e.key)).collect();
    let got: Vec<_> = inc.endpoints().collect();
    assert_eq!(
        got.iter().map(|e| (&e.name, e.key)).collect::<Vec<_>>(),
        expected
            .iter()
            .map(|e| (&e.name, e.key))
            .collect::<Vec<_>>(),
        "endpoints in scope after {step}"
    );
    for (a, b) in got.into_iter().zip(expected) {
        let slot = full.endpoint_slot(b.key);
        assert_eq!(
            inc.endpoint_slot(a.key),
            slot,
            "{} slot after {step}",
            a.name
        );
        assert_eq!(
            labels(inc, a.identity),
            labels(full, b.identity),
            "{} identity after {step}",
            a.name
        );
        if let EndpointKey::Pod(p) = a.key {
            assert_eq!(inc.pod_identity(p), a.identity, "{} after {step}", a.name);
            assert_eq!(
                inc.pod_endpoint(&a.name).map(|e| e.key),
                Some(a.key),
                "{step}"
            );
        }
        for d in Direction::BOTH {
            let (da, db) = (&a.dirs[d.index()], &b.dirs[d.index()]);
            assert_eq!(
                (&da.default_deny, &da.selected_by, &da.tiers),
                (&db.default_deny, &db.selected_by, &db.tiers),
                "{} {d:?} after {step}",
                a.name
            );
            assert_eq!(
                da.entries.len(),
                db.entries.len(),
                "{} {d:?} entries after {step}",
                a.name
            );
            for (x, y) in da.entries.iter().zip(&db.entries) {
                assert_eq!(
                    peers(inc, x.peers),
                    peers(full, y.peers),
                    "{} {d:?} peers after {step}",
                    a.name
                );
                assert_eq!(
                    (x.protocol, &x.port, x.action, x.tier, x.rank, x.origin, x.l7),
                    (y.protocol, &y.port, y.action, y.tier, y.rank, y.origin, y.l7),
                    "{} {d:?} entry after {step}",
                    a.name
                );
                if let (Some(i), Some(j)) = (x.l7, y.l7) {
                    let (si, sj) = (inc.l7.get(i as usize), full.l7.get(j as usize));
                    assert!(
                        si.is_some(),
                        "{} uses an unbuilt L7 set after {step}",
                        a.name
                    );
                    assert_eq!(si, sj, "{} {d:?} L7 set after {step}", a.name);
                }
            }
            for &ip in probe {
                for (proto, port) in [
                    (Protocol::Tcp, 80),
                    (Protocol::Tcp, 443),
                    (Protocol::Tcp, 8080),
                    (Protocol::Udp, 53),
                ] {
                    let va = inc.decide(a, d, inc.identity_of(ip, observer), proto, port);
                    let vb = full.decide(b, d, full.identity_of(ip, observer), proto, port);
                    assert_eq!(
                        format!("{va:?}"),
                        format!("{vb:?}"),
                        "{} {d:?} {ip} {proto:?}/{port} after {step}",
                        a.name
                    );
                }
            }
        }
    }
}
