//! The secrets the proxy may read: TLS material of `terminatingTLS` / `originatingTLS`
//! contexts and the values of `headerMatches` secrets. The agent publishes the whole set
//! (from a certificates directory or the Kubernetes API); a changed secret gets a new
//! version, so the material built from it is built again for the next connection while
//! connections already set up keep what they have.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use policy_model::tls::{SecretRef, Secrets};

/// One secret: its keys (file names) and their bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Secret {
    pub keys: BTreeMap<String, Arc<[u8]>>,
    /// Changes whenever the content changes (never reused within a store).
    pub version: u64,
}

impl Secret {
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.keys.get(key).map(|v| &v[..])
    }
}

/// The content of a secret as a source reads it.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// Every secret at one moment.
#[derive(Debug, Default)]
pub struct SecretSet {
    secrets: HashMap<SecretRef, Arc<Secret>>,
    /// Strictly increasing per store: what the built material is cached against.
    pub generation: u64,
}

/// The current secrets. Readers never block; `publish` swaps atomically.
#[derive(Debug)]
pub struct SecretStore {
    current: ArcSwap<SecretSet>,
    next_version: AtomicU64,
}

impl Default for SecretStore {
    fn default() -> SecretStore {
        SecretStore::new()
    }
}

impl SecretStore {
    /// A store without secrets: every context fails closed until material arrives.
    pub fn new() -> SecretStore {
        SecretStore {
            current: ArcSwap::from_pointee(SecretSet::default()),
            next_version: AtomicU64::new(1),
        }
    }

    /// Installs a new set of secrets. A secret whose content did not change keeps its
    /// version (and the material built from it). Returns whether anything changed.
    pub fn publish(&self, secrets: HashMap<SecretRef, SecretData>) -> bool {
        let old = self.current.load_full();
        let mut changed = secrets.len() != old.secrets.len();
        let mut next = HashMap::with_capacity(secrets.len());
        for (r, data) in secrets {
            let same = old.secrets.get(&r).filter(|s| {
                s.keys.len() == data.len()
                    && data
                        .iter()
                        .all(|(k, v)| s.keys.get(k).is_some_and(|x| x[..] == v[..]))
            });
            let secret = match same {
                Some(s) => s.clone(),
                None => {
                    changed = true;
                    Arc::new(Secret {
                        keys: data
                            .into_iter()
                            .map(|(k, v)| (k, Arc::from(v.into_boxed_slice())))
                            .collect(),
                        version: self.next_version.fetch_add(1, Ordering::Relaxed),
                    })
                }
            };
            next.insert(r, secret);
        }
        if changed {
            self.current.store(Arc::new(SecretSet {
                secrets: next,
                generation: old.generation + 1,
            }));
        }
        changed
    }

    pub fn load(&self) -> Arc<SecretSet> {
        self.current.load_full()
    }

    pub fn get(&self, r: &SecretRef) -> Option<Arc<Secret>> {
        self.current.load().secrets.get(r).cloned()
    }

    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }
}

impl SecretSet {
    pub fn get(&self, r: &SecretRef) -> Option<&Arc<Secret>> {
        self.secrets.get(r)
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

impl Secrets for SecretStore {
    fn keys(&self, secret: &SecretRef) -> Option<Vec<String>> {
        self.get(secret).map(|s| s.keys.keys().cloned().collect())
    }

    /// The secret's one key, as text, without one trailing newline (files written by
    /// `echo` end with one; a header value never does). Several keys, or bytes that are
    /// not UTF-8: no value (Cilium's `GetSecretString` refuses them too).
    fn value(&self, secret: &SecretRef) -> Option<Arc<str>> {
        let s = self.get(secret)?;
        let mut values = s.keys.values();
        let (Some(v), None) = (values.next(), values.next()) else {
            return None;
        };
        let text = std::str::from_utf8(v).ok()?;
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text);
        Some(Arc::from(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> SecretRef {
        SecretRef {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn one(key: &str, value: &str) -> SecretData {
        BTreeMap::from([(key.to_string(), value.as_bytes().to_vec())])
    }

    #[test]
    fn versions_change_with_content_only() {
        let store = SecretStore::new();
        assert!(store.publish(HashMap::from([
            (r("a"), one("k", "1")),
            (r("b"), one("k", "2"))
        ])));
        let (a, b) = (store.get(&r("a")).unwrap(), store.get(&r("b")).unwrap());
        let g = store.generation();
        assert!(!store.publish(HashMap::from([
            (r("a"), one("k", "1")),
            (r("b"), one("k", "2"))
        ])));
        assert_eq!(store.generation(), g, "nothing changed");
        assert!(store.publish(HashMap::from([
            (r("a"), one("k", "1")),
            (r("b"), one("k", "3"))
        ])));
        assert_eq!(store.get(&r("a")).unwrap().version, a.version);
        assert_ne!(store.get(&r("b")).unwrap().version, b.version);
        assert!(store.publish(HashMap::from([(r("a"), one("k", "1"))])));
        assert!(store.get(&r("b")).is_none(), "a removed secret is gone");
    }

    #[test]
    fn header_values_are_the_one_key_without_its_newline() {
        let store = SecretStore::new();
        let mut two = one("a", "x");
        two.insert("b".into(), b"y".to_vec());
        store.publish(HashMap::from([
            (r("tok"), one("value", "s3cr3t\n")),
            (r("crlf"), one("value", "v\r\n")),
            (r("two"), two),
            (
                r("bin"),
                BTreeMap::from([("v".to_string(), vec![0xff, 0xfe])]),
            ),
        ]));
        assert_eq!(store.value(&r("tok")).as_deref(), Some("s3cr3t"));
        assert_eq!(store.value(&r("crlf")).as_deref(), Some("v"));
        assert_eq!(store.value(&r("two")), None);
        assert_eq!(store.value(&r("bin")), None);
        assert_eq!(store.value(&r("gone")), None);
        assert_eq!(store.keys(&r("two")).unwrap(), vec!["a", "b"]);
    }
}
