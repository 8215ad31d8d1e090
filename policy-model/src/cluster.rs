//! Cluster state: namespaces, nodes, pods, outside hosts and observed DNS answers. This is
//! the `cluster:` shape of the conformance format; the agent's sources produce the same.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::labels::{well_known, Label, LabelSet};
use crate::policy::Protocol;
use crate::tls::{SecretRef, Secrets};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub externals: Vec<External>,
    #[serde(default)]
    pub dns: Vec<DnsObservation>,
    /// Secrets that policies name (TLS contexts, `headerMatches`): which keys they hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<Secret>,
    /// ServiceAccounts with labels (Calico's `serviceAccountSelector` and
    /// `serviceAccounts.selector` select them); a pod's account need not be listed.
    #[serde(
        default,
        rename = "serviceAccounts",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_accounts: Vec<ServiceAccount>,
}

/// A ServiceAccount's labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's IP; `ips` adds more (dual stack).
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// The pod serves TLS (for runners that start real servers; the model needs nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServesTls>,
    /// `spec.serviceAccountName`; None is `default`, as the API server fills it in.
    #[serde(
        default,
        rename = "serviceAccount",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_account: Option<String>,
}

/// The service account of a pod that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

impl Pod {
    /// The pod's service account name.
    pub fn service_account(&self) -> &str {
        self.service_account
            .as_deref()
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
    }

    pub fn all_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip.into_iter().chain(self.ips.iter().copied())
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A container port; named ones resolve named ports of policies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    pub name: String,
    pub ip: IpAddr,
    /// The host serves TLS (for runners that start real servers; the model needs nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServesTls>,
}

/// A server that speaks TLS (HTTP/1.1 and h2 by ALPN) on every probed port, with a
/// certificate for `names` from the case's public CA.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServesTls {
    #[serde(default)]
    pub names: Vec<String>,
}

/// A Secret that policies name. The model only needs which keys it holds (and the value
/// of a `headerMatches` secret); `generate` tells a runner what material to build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<Generate>,
    /// `generate: leaf`: the names of the server certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// `generate: value`: the value of the secret's one key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What material a runner builds for a secret (conformance format, TLS additions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Generate {
    /// `tls.crt`/`tls.key`: a CA certificate and key (the proxy mints leaves from it).
    Ca,
    /// `tls.crt`/`tls.key`: a server certificate for `names`, signed by the interception CA.
    Leaf,
    /// `ca.crt`: the CA that signed the externals' certificates.
    Trust,
    /// One key `value` (a `headerMatches` secret).
    Value,
}

impl Secrets for Cluster {
    fn keys(&self, secret: &SecretRef) -> Option<Vec<String>> {
        self.secret(secret).map(|s| s.keys.clone())
    }

    fn value(&self, secret: &SecretRef) -> Option<Arc<str>> {
        let s = self.secret(secret)?;
        match s.keys.as_slice() {
            [_] => s.value.as_deref().map(Arc::from),
            _ => None,
        }
    }
}

/// A DNS answer the DNS proxy observed for a client: the source of toFQDNs IPs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsObservation {
    /// `namespace/pod` of the endpoint that asked.
    pub client: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
}

impl Cluster {
    pub fn secret(&self, r: &SecretRef) -> Option<&Secret> {
        self.secrets
            .iter()
            .find(|s| s.namespace == r.namespace && s.name == r.name)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, id: &str) -> Option<&Pod> {
        let (ns, name) = id.split_once('/')?;
        self.pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
    }

    /// The labels of a pod as Cilium's identity sees them: its own labels, the namespace
    /// name, the namespace's labels, the service account's name and the cluster name, all
    /// of source `k8s`; and the service account's labels (which Calico selects).
    pub fn pod_labels(&self, pod: &Pod) -> LabelSet {
        Self::pod_labels_in(
            pod,
            &self.namespace_labels(&pod.namespace),
            self.service_account_labels(&pod.namespace, pod.service_account()),
        )
    }

    /// The labels of a ServiceAccount (none if it is not listed).
    pub fn service_account_labels(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<&BTreeMap<String, String>> {
        self.service_accounts
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
            .map(|s| &s.labels)
    }

    /// [`Cluster::pod_labels`] with the namespace's labels (implicit name included) and
    /// the service account's labels already looked up, for callers that index them.
    pub fn pod_labels_in(
        pod: &Pod,
        namespace_labels: &BTreeMap<String, String>,
        service_account_labels: Option<&BTreeMap<String, String>>,
    ) -> LabelSet {
        // A pod cannot claim another namespace or namespace labels through its own labels:
        // the keys Ward derives itself are dropped from what the pod says (as Cilium does).
        let mut labels: Vec<Label> = pod
            .labels
            .iter()
            .filter(|(k, _)| !well_known::is_derived(k))
            .map(|(k, v)| Label::k8s(k, v))
            .collect();
        labels.push(Label::k8s(well_known::POD_NAMESPACE, &pod.namespace));
        labels.push(Label::k8s(
            well_known::POLICY_CLUSTER,
            well_known::CLUSTER_NAME,
        ));
        for (k, v) in namespace_labels {
            labels.push(Label::k8s(
                format!("{}{k}", well_known::NAMESPACE_LABELS_PREFIX),
                v,
            ));
        }
        labels.push(Label::k8s(
            well_known::SERVICE_ACCOUNT,
            pod.service_account(),
        ));
        for (k, v) in service_account_labels.into_iter().flatten() {
            labels.push(Label::k8s(
                format!("{}{k}", well_known::SERVICE_ACCOUNT_LABELS_PREFIX),
                v,
            ));
        }
        LabelSet::new(labels)
    }

    /// A namespace's labels including the implicit `kubernetes.io/metadata.name`.
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespace(ns)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert(well_known::NAMESPACE_NAME.to_string(), ns.to_string());
        labels
    }

    pub fn namespace_label_set(&self, ns: &str) -> LabelSet {
        LabelSet::new(
            self.namespace_labels(ns)
                .into_iter()
                .map(|(k, v)| Label::k8s(k, v))
                .collect(),
        )
    }

    /// Every namespace mentioned, declared or implied by a pod.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .namespaces
            .iter()
            .map(|n| n.name.clone())
            .chain(self.pods.iter().map(|p| p.namespace.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A reference to a thing that sends or receives traffic in a query: a pod, a node, an
/// outside host by name, or a bare IP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointRef {
    Pod { namespace: String, name: String },
    Node(String),
    External(String),
    Ip(IpAddr),
}

impl EndpointRef {
    /// `ns/pod`, `node:NAME`, `external:NAME` or an IP address.
    pub fn parse(s: &str) -> Result<EndpointRef, String> {
        if let Some(n) = s.strip_prefix("node:") {
            return Ok(EndpointRef::Node(n.to_string()));
        }
        if let Some(n) = s.strip_prefix("external:") {
            return Ok(EndpointRef::External(n.to_string()));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(EndpointRef::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(EndpointRef::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "{s:?} is not an endpoint: expected NAMESPACE/POD, node:NAME, external:NAME or an IP address"
            )),
        }
    }
}

impl std::fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointRef::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            EndpointRef::Node(n) => write!(f, "node:{n}"),
            EndpointRef::External(n) => write!(f, "external:{n}"),
            EndpointRef::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{Key, Source};

    #[test]
    fn pods_carry_ciliums_implicit_labels() {
        let c: Cluster = serde_yaml::from_str(
            "namespaces: [{name: x, labels: {team: a}}]\npods: [{namespace: x, name: p, labels: {app: web}, ip: 10.0.0.1}]",
        )
        .unwrap();
        let l = c.pod_labels(&c.pods[0]);
        let get = |k: &str| l.get(&Key::new(Source::K8s, k)).map(str::to_string);
        assert_eq!(get("app").as_deref(), Some("web"));
        assert_eq!(get("io.kubernetes.pod.namespace").as_deref(), Some("x"));
        assert_eq!(
            get("io.cilium.k8s.namespace.labels.team").as_deref(),
            Some("a")
        );
        assert_eq!(
            get("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name").as_deref(),
            Some("x")
        );
        assert_eq!(
            get("io.cilium.k8s.policy.cluster").as_deref(),
            Some("default")
        );
        assert_eq!(
            get("io.cilium.k8s.policy.serviceaccount").as_deref(),
            Some("default")
        );
    }

    #[test]
    fn pods_carry_their_service_account_and_its_labels() {
        let c: Cluster = serde_yaml::from_str(
            "serviceAccounts: [{namespace: x, name: api, labels: {tier: gold}}, {namespace: y, name: api, labels: {tier: lead}}]\npods: [{namespace: x, name: p, serviceAccount: api, labels: {io.cilium.k8s.policy.serviceaccount: forged}}]",
        )
        .unwrap();
        let l = c.pod_labels(&c.pods[0]);
        let get = |k: &str| l.get(&Key::new(Source::K8s, k)).map(str::to_string);
        assert_eq!(get(well_known::SERVICE_ACCOUNT).as_deref(), Some("api"));
        assert_eq!(
            get(&format!(
                "{}tier",
                well_known::SERVICE_ACCOUNT_LABELS_PREFIX
            ))
            .as_deref(),
            Some("gold")
        );
    }

    #[test]
    fn namespaces_have_the_implicit_name_label() {
        let c = Cluster::default();
        assert_eq!(
            c.namespace_labels("y")
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("y")
        );
    }

    #[test]
    fn endpoint_refs() {
        assert!(matches!(
            EndpointRef::parse("a/b"),
            Ok(EndpointRef::Pod { .. })
        ));
        assert!(matches!(
            EndpointRef::parse("node:n1"),
            Ok(EndpointRef::Node(_))
        ));
        assert!(matches!(
            EndpointRef::parse("external:w"),
            Ok(EndpointRef::External(_))
        ));
        assert!(matches!(
            EndpointRef::parse("192.0.2.1"),
            Ok(EndpointRef::Ip(_))
        ));
        assert!(EndpointRef::parse("nope").is_err());
        assert!(EndpointRef::parse("a/b/c").is_err());
    }
}
