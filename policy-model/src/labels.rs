//! Labels as Cilium models them: a source (`k8s`, `reserved`, `cidr`, `fqdn`, ...), a key
//! and a value. Selectors written in policies may carry the source as a key prefix
//! (`k8s:app`, `any:app`, `reserved:host`); a key without prefix matches any source.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

/// Where a label comes from. `Any` only appears in selectors: it matches every source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Any,
    K8s,
    Reserved,
    Cidr,
    Fqdn,
    Other(String),
}

impl Source {
    fn parse(s: &str) -> Source {
        match s {
            "any" => Source::Any,
            "k8s" => Source::K8s,
            "reserved" => Source::Reserved,
            "cidr" => Source::Cidr,
            "fqdn" => Source::Fqdn,
            other => Source::Other(other.to_string()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Source::Any => "any",
            Source::K8s => "k8s",
            Source::Reserved => "reserved",
            Source::Cidr => "cidr",
            Source::Fqdn => "fqdn",
            Source::Other(s) => s,
        }
    }

    /// Whether a selector written with `self` as source matches a label of `label`.
    pub fn matches(&self, label: &Source) -> bool {
        *self == Source::Any || self == label
    }
}

/// A label key with its source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub source: Source,
    pub name: String,
}

impl Key {
    pub fn new(source: Source, name: impl Into<String>) -> Key {
        Key {
            source,
            name: name.into(),
        }
    }

    /// Parses a key as written in a selector: `k8s:app`, `reserved:host` or plain `app`
    /// (which becomes `any:app`). CIDR labels contain colons (IPv6), so only the first
    /// colon splits, and only when what precedes it is a plausible source name.
    pub fn parse_selector_key(s: &str) -> Key {
        match s.split_once(':') {
            Some((src, rest))
                if !src.is_empty()
                    && src
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                Key::new(Source::parse(src), rest)
            }
            _ => Key::new(Source::Any, s),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source.as_str(), self.name)
    }
}

/// One label of an identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub key: Key,
    pub value: String,
}

impl Label {
    pub fn new(source: Source, name: impl Into<String>, value: impl Into<String>) -> Label {
        Label {
            key: Key::new(source, name),
            value: value.into(),
        }
    }

    pub fn k8s(name: impl Into<String>, value: impl Into<String>) -> Label {
        Label::new(Source::K8s, name, value)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}", self.key)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

/// A sorted, duplicate-free set of labels: the identity of an endpoint or a prefix.
/// Immutable and shared (`Arc`), so copying a model's identity table does not copy its
/// labels; and each label is one shared value however many sets hold it (every pod of a
/// namespace carries its namespace's labels, every replica its app's).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(Arc<[Arc<Label>]>);

/// The labels some set holds, by value: a new set takes the shared one when there is one.
/// Entries whose label is gone are dropped when the table has doubled since the last
/// sweep.
struct Labels {
    by_value: HashMap<Label, Weak<Label>>,
    sweep_at: usize,
}

static LABELS: LazyLock<Mutex<Labels>> = LazyLock::new(|| {
    Mutex::new(Labels {
        by_value: HashMap::new(),
        sweep_at: 4096,
    })
});

/// The shared value of a label.
fn shared(label: Label) -> Arc<Label> {
    let mut t = LABELS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(l) = t.by_value.get(&label).and_then(Weak::upgrade) {
        return l;
    }
    let l = Arc::new(label.clone());
    t.by_value.insert(label, Arc::downgrade(&l));
    if t.by_value.len() >= t.sweep_at {
        t.by_value.retain(|_, w| w.strong_count() > 0);
        t.sweep_at = (2 * t.by_value.len()).max(4096);
    }
    l
}

impl LabelSet {
    pub fn new(mut labels: Vec<Label>) -> LabelSet {
        labels.sort();
        labels.dedup_by(|a, b| a.key == b.key);
        LabelSet(labels.into_iter().map(shared).collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter().map(|l| &**l)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of the first label whose key matches `key` (source `Any` matches all).
    pub fn get(&self, key: &Key) -> Option<&str> {
        if key.source == Source::Any {
            self.iter()
                .find(|l| l.key.name == key.name)
                .map(|l| l.value.as_str())
        } else {
            self.0
                .binary_search_by(|l| l.key.cmp(key))
                .ok()
                .map(|i| self.0[i].value.as_str())
        }
    }

    /// Every value under keys that match `key` (a key of source `Any` can match several
    /// labels that differ only in source).
    pub fn values<'a>(&'a self, key: &'a Key) -> impl Iterator<Item = &'a str> + 'a {
        self.iter()
            .filter(move |l| l.key.name == key.name && key.source.matches(&l.key.source))
            .map(|l| l.value.as_str())
    }

    pub fn contains_source(&self, source: &Source) -> bool {
        self.iter().any(|l| &l.key.source == source)
    }

    /// Whether two sets hold the very same label values (not only equal ones).
    pub fn shares_labels_with(&self, other: &LabelSet) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Label keys of Cilium's implicit pod labels.
pub mod well_known {
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
    pub const POLICY_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
    pub const NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";
    pub const CLUSTER_NAME: &str = "default";
    /// The pod's service account name (Cilium's label).
    pub const SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
    /// The labels of the pod's service account (Ward's; Calico selects them as `pcsa.*`).
    pub const SERVICE_ACCOUNT_LABELS_PREFIX: &str = "io.ward.k8s.serviceaccount.labels.";

    /// Whether a pod label key is one Ward derives from the pod's namespace, service
    /// account and cluster, which a pod must not set itself.
    pub fn is_derived(key: &str) -> bool {
        key == POD_NAMESPACE
            || key == POLICY_CLUSTER
            || key == SERVICE_ACCOUNT
            || key.starts_with(NAMESPACE_LABELS_PREFIX)
            || key.starts_with(SERVICE_ACCOUNT_LABELS_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_keys_parse_their_source() {
        assert_eq!(
            Key::parse_selector_key("k8s:app"),
            Key::new(Source::K8s, "app")
        );
        assert_eq!(Key::parse_selector_key("app"), Key::new(Source::Any, "app"));
        assert_eq!(
            Key::parse_selector_key("reserved:host"),
            Key::new(Source::Reserved, "host")
        );
        assert_eq!(
            Key::parse_selector_key("any:io.kubernetes.pod.namespace"),
            Key::new(Source::Any, "io.kubernetes.pod.namespace")
        );
        // a key with a DNS prefix and no source stays whole
        assert_eq!(
            Key::parse_selector_key("app.kubernetes.io/name"),
            Key::new(Source::Any, "app.kubernetes.io/name")
        );
    }

    #[test]
    fn any_source_matches_every_source_but_a_given_source_only_itself() {
        let set = LabelSet::new(vec![Label::k8s("app", "web")]);
        assert_eq!(set.get(&Key::new(Source::Any, "app")), Some("web"));
        assert_eq!(set.get(&Key::new(Source::K8s, "app")), Some("web"));
        assert_eq!(set.get(&Key::new(Source::Reserved, "app")), None);
    }

    #[test]
    fn sets_share_their_labels() {
        let a = LabelSet::new(vec![Label::k8s("app", "web"), Label::k8s("team", "blue")]);
        let b = LabelSet::new(vec![Label::k8s("team", "blue"), Label::k8s("app", "web")]);
        assert_eq!(a, b);
        assert!(a.shares_labels_with(&b), "the same label values");
        let c = LabelSet::new(vec![Label::k8s("app", "web"), Label::k8s("team", "red")]);
        assert!(Arc::ptr_eq(&a.0[0], &c.0[0]));
        assert!(!a.shares_labels_with(&c));
    }
}
