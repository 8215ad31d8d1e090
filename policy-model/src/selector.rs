//! Kubernetes label selectors: the wire form (`matchLabels`, `matchExpressions`) and the
//! compiled form that matches label sets.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::labels::{Key, LabelSet, Source};

/// `metav1.LabelSelector` as written in manifests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    #[cfg_attr(
        feature = "schema",
        schemars(extend("enum" = ["In", "NotIn", "Exists", "DoesNotExist"]))
    )]
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// An operator of a requirement: Kubernetes' set-based ones, and the string matches of
/// Calico's selector language. The negative forms (`NotIn`, `DoesNotExist`, `Not*`) also
/// match a label set without the key, as Calico's `!=` and `not in` do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Contains(String),
    NotContains(String),
    StartsWith(String),
    NotStartsWith(String),
    EndsWith(String),
    NotEndsWith(String),
}

impl Op {
    /// The operator that matches exactly the label sets this one does not.
    pub fn negated(&self) -> Op {
        match self {
            Op::In(v) => Op::NotIn(v.clone()),
            Op::NotIn(v) => Op::In(v.clone()),
            Op::Exists => Op::DoesNotExist,
            Op::DoesNotExist => Op::Exists,
            Op::Contains(s) => Op::NotContains(s.clone()),
            Op::NotContains(s) => Op::Contains(s.clone()),
            Op::StartsWith(s) => Op::NotStartsWith(s.clone()),
            Op::NotStartsWith(s) => Op::StartsWith(s.clone()),
            Op::EndsWith(s) => Op::NotEndsWith(s.clone()),
            Op::NotEndsWith(s) => Op::EndsWith(s.clone()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: Key,
    pub op: Op,
}

impl Requirement {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let mut values = labels.values(&self.key);
        match &self.op {
            Op::In(vs) => values.any(|v| vs.iter().any(|w| w == v)),
            Op::NotIn(vs) => values.all(|v| !vs.iter().any(|w| w == v)),
            Op::Exists => values.next().is_some(),
            Op::DoesNotExist => values.next().is_none(),
            Op::Contains(s) => values.any(|v| v.contains(s.as_str())),
            Op::NotContains(s) => values.all(|v| !v.contains(s.as_str())),
            Op::StartsWith(s) => values.any(|v| v.starts_with(s.as_str())),
            Op::NotStartsWith(s) => values.all(|v| !v.starts_with(s.as_str())),
            Op::EndsWith(s) => values.any(|v| v.ends_with(s.as_str())),
            Op::NotEndsWith(s) => values.all(|v| !v.ends_with(s.as_str())),
        }
    }
}

/// A compiled selector: all requirements must hold. No requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// Why a wire selector could not be compiled, with the field path below the selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    pub path: String,
    pub reason: String,
}

impl Selector {
    /// Selects everything.
    pub fn all() -> Selector {
        Selector::default()
    }

    pub fn is_all(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Compiles a wire selector. Keys may carry a Cilium source prefix when
    /// `source_prefixes` is set (CiliumNetworkPolicy); otherwise (NetworkPolicy, ANP)
    /// keys are plain Kubernetes label keys of source `k8s`.
    pub fn compile(sel: &LabelSelector, source_prefixes: bool) -> Result<Selector, SelectorError> {
        let key = |k: &str| {
            if source_prefixes {
                Key::parse_selector_key(k)
            } else {
                Key::new(Source::K8s, k)
            }
        };
        let mut requirements = Vec::new();
        if let Some(ml) = &sel.match_labels {
            for (k, v) in ml {
                if k.is_empty() {
                    return Err(SelectorError {
                        path: "matchLabels".into(),
                        reason: "empty label key".into(),
                    });
                }
                requirements.push(Requirement {
                    key: key(k),
                    op: Op::In(vec![v.clone()]),
                });
            }
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let path = format!("matchExpressions[{i}]");
            if e.key.is_empty() {
                return Err(SelectorError {
                    path: format!("{path}.key"),
                    reason: "empty label key".into(),
                });
            }
            let values = e.values.clone().unwrap_or_default();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError {
                        path: format!("{path}.values"),
                        reason: format!("operator {} needs at least one value", e.operator),
                    })
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError {
                        path: format!("{path}.values"),
                        reason: format!("operator {} takes no values", e.operator),
                    })
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(SelectorError {
                        path: format!("{path}.operator"),
                        reason: format!(
                        "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                    })
                }
            };
            requirements.push(Requirement {
                key: key(&e.key),
                op,
            });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Adds a requirement (used for Cilium's namespace injection).
    pub fn with(mut self, key: Key, op: Op) -> Selector {
        self.requirements.push(Requirement { key, op });
        self.requirements.sort();
        self.requirements.dedup();
        self
    }

    /// Whether some requirement uses this exact key.
    pub fn has_key(&self, key: &Key) -> bool {
        self.requirements.iter().any(|r| &r.key == key)
    }

    /// Whether some requirement's key name starts with `prefix` under `source`.
    pub fn has_key_prefix(&self, source: &Source, prefix: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| &r.key.source == source && r.key.name.starts_with(prefix))
    }

    pub fn has_source(&self, source: &Source) -> bool {
        self.requirements.iter().any(|r| &r.key.source == source)
    }

    /// Removes requirements on `key` (Cilium drops a user's differing namespace match
    /// from a CNP's endpointSelector).
    pub fn without(mut self, key_name: &str) -> Selector {
        self.requirements.retain(|r| r.key.name != key_name);
        self
    }

    /// A requirement `key In [value]` that every match must satisfy, if there is one: used to
    /// narrow the candidates through an index.
    pub fn equality(&self) -> impl Iterator<Item = (&Key, &str)> {
        self.requirements.iter().filter_map(|r| match &r.op {
            Op::In(vs) if vs.len() == 1 => Some((&r.key, vs[0].as_str())),
            _ => None,
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match &r.op {
                Op::In(v) if v.len() == 1 => write!(f, "{}={}", r.key, v[0])?,
                Op::In(v) => write!(f, "{} in ({})", r.key, v.join(","))?,
                Op::NotIn(v) => write!(f, "{} notin ({})", r.key, v.join(","))?,
                Op::Exists => write!(f, "{}", r.key)?,
                Op::DoesNotExist => write!(f, "!{}", r.key)?,
                Op::Contains(s) => write!(f, "{} contains {s:?}", r.key)?,
                Op::NotContains(s) => write!(f, "{} !contains {s:?}", r.key)?,
                Op::StartsWith(s) => write!(f, "{} starts with {s:?}", r.key)?,
                Op::NotStartsWith(s) => write!(f, "{} !starts with {s:?}", r.key)?,
                Op::EndsWith(s) => write!(f, "{} ends with {s:?}", r.key)?,
                Op::NotEndsWith(s) => write!(f, "{} !ends with {s:?}", r.key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn sel(yaml: &str) -> Selector {
        let s: LabelSelector = serde_yaml::from_str(yaml).unwrap();
        Selector::compile(&s, true).unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> LabelSet {
        LabelSet::new(kv.iter().map(|(k, v)| Label::k8s(*k, *v)).collect())
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(sel("{}").matches(&labels(&[])));
        assert!(sel("{}").matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_are_anded() {
        let s = sel("matchLabels: {a: '1', b: '2'}");
        assert!(s.matches(&labels(&[("a", "1"), ("b", "2"), ("c", "3")])));
        assert!(!s.matches(&labels(&[("a", "1")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "3")])));
    }

    #[test]
    fn operators() {
        let in_ = sel("matchExpressions: [{key: a, operator: In, values: ['1','2']}]");
        assert!(in_.matches(&labels(&[("a", "2")])));
        assert!(!in_.matches(&labels(&[("a", "3")])));
        assert!(!in_.matches(&labels(&[])));
        let notin = sel("matchExpressions: [{key: a, operator: NotIn, values: ['1']}]");
        assert!(notin.matches(&labels(&[("a", "2")])));
        assert!(notin.matches(&labels(&[])), "NotIn matches an absent key");
        assert!(!notin.matches(&labels(&[("a", "1")])));
        let exists = sel("matchExpressions: [{key: a, operator: Exists}]");
        assert!(exists.matches(&labels(&[("a", "")])));
        assert!(!exists.matches(&labels(&[("b", "")])));
        let dne = sel("matchExpressions: [{key: a, operator: DoesNotExist}]");
        assert!(dne.matches(&labels(&[("b", "")])));
        assert!(!dne.matches(&labels(&[("a", "x")])));
    }

    #[test]
    fn string_operators_and_their_negations() {
        let req = |op: Op| Requirement {
            key: Key::new(Source::K8s, "a"),
            op,
        };
        let l = labels(&[("a", "prod-eu")]);
        let none = labels(&[]);
        for (op, on_l) in [
            (Op::Contains("d-e".into()), true),
            (Op::StartsWith("prod".into()), true),
            (Op::EndsWith("-us".into()), false),
        ] {
            let r = req(op.clone());
            assert_eq!(r.matches(&l), on_l, "{op:?}");
            assert!(!r.matches(&none), "{op:?} needs the label");
            let n = req(op.negated());
            assert_eq!(n.matches(&l), !on_l, "{op:?} negated");
            assert!(
                n.matches(&none),
                "the negation of {op:?} matches an absent key"
            );
            assert_eq!(op.negated().negated(), op);
        }
    }

    #[test]
    fn source_prefix_restricts_the_match() {
        let reserved = sel("matchLabels: {'reserved:app': x}");
        assert!(!reserved.matches(&labels(&[("app", "x")])));
        let k8s = sel("matchLabels: {'k8s:app': x}");
        assert!(k8s.matches(&labels(&[("app", "x")])));
    }

    #[test]
    fn bad_operators_and_values_are_errors() {
        let bad = |y: &str| {
            let s: LabelSelector = serde_yaml::from_str(y).unwrap();
            Selector::compile(&s, true).unwrap_err()
        };
        assert_eq!(
            bad("matchExpressions: [{key: a, operator: Has}]").path,
            "matchExpressions[0].operator"
        );
        assert_eq!(
            bad("matchExpressions: [{key: a, operator: In}]").path,
            "matchExpressions[0].values"
        );
        assert_eq!(
            bad("matchExpressions: [{key: a, operator: Exists, values: [x]}]").path,
            "matchExpressions[0].values"
        );
    }
}
