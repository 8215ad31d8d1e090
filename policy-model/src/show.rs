//! What the policies say about a pod, as `ward policy show` (and np-viewer) lists it: per
//! direction whether the pod is isolated and by which policies, then every policy that
//! selects it, in evaluation order (admin tier, Calico tiers and the namespace tier,
//! baseline), with the peers, ports and L7 rules each of its rules grants or denies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::compile::{EndpointKey, EndpointPolicy, Entry, Model, PortMatch};
use crate::l7::L7Rules;
use crate::policy::{Action, Direction, Tier};

/// A pod's policy, both directions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointView {
    /// `namespace/pod` (or `node:NAME`).
    pub endpoint: String,
    pub identity: u32,
    /// The pod's own labels, `key=value`.
    pub labels: Vec<String>,
    pub ingress: DirectionView,
    pub egress: DirectionView,
}

impl EndpointView {
    pub fn direction(&self, d: Direction) -> &DirectionView {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// One direction of a pod's policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionView {
    /// Whether only what a rule allows passes (some policy puts the pod in default deny,
    /// or a Calico tier selecting it ends in Deny).
    pub isolated: bool,
    /// The policies that isolate it.
    pub isolated_by: Vec<String>,
    /// Every policy that selects the pod in this direction, in evaluation order.
    pub policies: Vec<PolicyView>,
}

/// One policy selecting a pod, with its rules for the pod in one direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    /// `Kind namespace/name`.
    pub policy: String,
    /// `admin (priority N)`, `calico tier NAME`, `namespace` or `baseline`.
    pub tier: String,
    /// Whether this policy puts the pod in default deny in this direction.
    pub default_deny: bool,
    pub rules: Vec<RuleView>,
}

/// One rule of a policy, as compiled for the pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleView {
    /// `allow`, `deny` or `pass`.
    pub action: String,
    /// Field path of the rule (with its `toPorts` entry).
    pub rule: String,
    /// The peers as the rule selects them (`endpoints {...}`, `cidr ...`, `entity ...`).
    pub peers: String,
    /// The pods of the cluster among those peers.
    pub peer_pods: Vec<String>,
    /// `TCP/8080`, `UDP/53`, `any` (every protocol and port), named ports by name.
    pub ports: Vec<String>,
    /// The L7 rules the proxy applies, as `rule path: rule`.
    pub l7: Vec<String>,
}

/// A Kubernetes label selector as `kubectl -l` takes it: `k=v`, `k==v`, `k!=v`,
/// `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, joined by commas (all must hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelQuery(Vec<Requirement>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// A label selector that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("label selector {input:?}: {reason}")]
pub struct LabelQueryError {
    pub input: String,
    pub reason: String,
}

impl LabelQuery {
    pub fn parse(input: &str) -> Result<LabelQuery, LabelQueryError> {
        let err = |reason: String| LabelQueryError {
            input: input.to_string(),
            reason,
        };
        let mut out = Vec::new();
        if input.trim().is_empty() {
            // no requirement: every pod
            return Ok(LabelQuery(out));
        }
        for part in split_top(input) {
            let part = part.trim();
            if part.is_empty() {
                return Err(err("an empty requirement".into()));
            }
            out.push(requirement(part).map_err(err)?);
        }
        Ok(LabelQuery(out))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// Splits at the commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn requirement(part: &str) -> Result<Requirement, String> {
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        let ok = !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if ok {
            Ok(k.to_string())
        } else {
            Err(format!("{k:?} is not a label key"))
        }
    };
    if let Some(k) = part.strip_prefix('!') {
        return Ok(Requirement::Absent(key(k)?));
    }
    for (op, negated) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let v = v.trim().to_string();
            return Ok(if negated {
                Requirement::NotIn(key(k)?, vec![v])
            } else {
                Requirement::In(key(k)?, vec![v])
            });
        }
    }
    for (op, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = part.split_once(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("{set:?}: expected a set like (a,b)"))?;
            let values = inner.split(',').map(|v| v.trim().to_string()).collect();
            return Ok(if negated {
                Requirement::NotIn(key(k)?, values)
            } else {
                Requirement::In(key(k)?, values)
            });
        }
    }
    Ok(Requirement::Exists(key(part)?))
}

/// Which pods to show: one by name, or those of a namespace (every namespace when None)
/// whose labels match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// `namespace/pod`.
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub labels: LabelQuery,
}

/// A selection that names a pod the cluster does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no pod {0} in the cluster (expected NAMESPACE/POD)")]
pub struct NoSuchPod(pub String);

impl Model {
    /// What the policies say about every pod of the selection.
    pub fn show_selection(&self, s: &Selection) -> Result<Vec<EndpointView>, NoSuchPod> {
        if let Some(p) = &s.pod {
            let ep = self.pod_endpoint(p).ok_or_else(|| NoSuchPod(p.clone()))?;
            return Ok(vec![self.show(ep)]);
        }
        Ok(self
            .select_pods(s.namespace.as_deref(), &s.labels)
            .into_iter()
            .map(|ep| self.show(ep))
            .collect())
    }

    /// The pods of `namespace` (every namespace when None) whose labels match `labels`,
    /// in the cluster's order.
    pub fn select_pods(
        &self,
        namespace: Option<&str>,
        labels: &LabelQuery,
    ) -> Vec<&EndpointPolicy> {
        self.cluster
            .pods
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                namespace.is_none_or(|ns| p.namespace == ns) && labels.matches(&p.labels)
            })
            .filter_map(|(i, _)| self.endpoint(EndpointKey::Pod(i)))
            .collect()
    }

    /// What the policies say about one endpoint.
    pub fn show(&self, ep: &EndpointPolicy) -> EndpointView {
        let labels = match ep.key {
            EndpointKey::Pod(p) => self.cluster.pods[p]
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            EndpointKey::Node(_) => Vec::new(),
        };
        EndpointView {
            endpoint: ep.name.clone(),
            identity: self.identities.get(ep.identity).id,
            labels,
            ingress: self.show_direction(ep, Direction::Ingress),
            egress: self.show_direction(ep, Direction::Egress),
        }
    }

    fn show_direction(&self, ep: &EndpointPolicy, dir: Direction) -> DirectionView {
        let d = &ep.dirs[dir.index()];
        let mut isolated_by: Vec<u32> = d.default_deny.clone();
        for t in d.tiers.iter().filter(|t| t.action == Action::Deny) {
            isolated_by.extend(&t.selected_by);
        }
        isolated_by.sort_unstable();
        isolated_by.dedup();
        let mut selecting = d.selected_by.clone();
        selecting.sort_by_key(|&pi| self.evaluation_key(pi));
        selecting.dedup();
        let policies = selecting
            .iter()
            .map(|&pi| PolicyView {
                policy: self.policies[pi as usize].object.to_string(),
                tier: self.tier_of(pi),
                default_deny: isolated_by.contains(&pi),
                rules: self.rules_of(&d.entries, pi),
            })
            .collect();
        DirectionView {
            isolated: !isolated_by.is_empty(),
            isolated_by: isolated_by
                .iter()
                .map(|&pi| self.policies[pi as usize].object.to_string())
                .collect(),
            policies,
        }
    }

    /// The order entries are evaluated in, for a whole policy (see `compile_endpoint`).
    fn evaluation_key(&self, pi: u32) -> (u8, u32, u32) {
        let order = self.policy_order[pi as usize];
        match self.policies[pi as usize].tier {
            Tier::Admin => (0, order, pi),
            Tier::Calico | Tier::Namespace => (1, order, pi),
            Tier::Baseline => (2, order, pi),
        }
    }

    fn tier_of(&self, pi: u32) -> String {
        let p = &self.policies[pi as usize];
        match p.tier {
            Tier::Admin => format!("admin (priority {})", p.priority),
            Tier::Calico => match &p.calico {
                Some(crate::policy::Calico::Policy { tier, .. }) => format!("calico tier {tier}"),
                _ => "calico".into(),
            },
            Tier::Namespace => "namespace".into(),
            Tier::Baseline => "baseline".into(),
        }
    }

    /// The policy's entries of one direction, one view per rule and `toPorts` entry.
    fn rules_of(&self, entries: &[Entry], pi: u32) -> Vec<RuleView> {
        let mut out: Vec<(crate::compile::Origin, RuleView)> = Vec::new();
        for e in entries.iter().filter(|e| e.origin.policy == pi) {
            let port = port_word(e);
            if let Some((_, v)) = out.iter_mut().find(|(o, _)| *o == e.origin) {
                if !v.ports.contains(&port) {
                    v.ports.push(port);
                }
                continue;
            }
            let view = RuleView {
                action: match e.action {
                    Action::Allow => "allow",
                    Action::Deny => "deny",
                    Action::Pass => "pass",
                }
                .into(),
                rule: self.entry_rule_path(e),
                peers: self.describe_peers(e.peers),
                peer_pods: self.pods_in(e),
                ports: vec![port],
                l7: self.l7_words(e),
            };
            out.push((e.origin, view));
        }
        out.into_iter().map(|(_, v)| v).collect()
    }

    fn entry_rule_path(&self, e: &Entry) -> String {
        let p = &self.policies[e.origin.policy as usize];
        let Some(r) = p.rules.get(e.origin.rule as usize) else {
            return String::new();
        };
        match e.origin.port_rule {
            Some(g) => r
                .ports
                .get(g as usize)
                .map_or(r.path.clone(), |g| g.path.clone()),
            None => r.path.clone(),
        }
    }

    fn pods_in(&self, e: &Entry) -> Vec<String> {
        self.cluster
            .pods
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                self.selectors
                    .peer_set_contains(e.peers, self.pod_identity(*i))
            })
            .map(|(_, p)| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    fn l7_words(&self, e: &Entry) -> Vec<String> {
        let Some(set) = e.l7.and_then(|id| self.l7.get(id as usize)) else {
            return Vec::new();
        };
        let n = match &set.rules {
            L7Rules::Http(r) => r.len(),
            L7Rules::Dns(p) => p.len(),
        };
        (0..n)
            .map(|i| format!("{}: {}", set.rule_path(i), set.describe_rule(i)))
            .collect()
    }
}

fn port_word(e: &Entry) -> String {
    let proto = match e.protocol {
        None => return "any".into(),
        Some(p) => p.to_string(),
    };
    match &e.port {
        PortMatch::Range(0, u16::MAX) => format!("{proto}/*"),
        PortMatch::Range(a, b) if a == b => format!("{proto}/{a}"),
        PortMatch::Range(a, b) => format!("{proto}/{a}-{b}"),
        PortMatch::Named(n) => format!("{proto}/{n}"),
    }
}

#[cfg(test)]
mod tests;
