//! The agent's store of policy objects: what is in force for each object, so that a new
//! version that fails validation leaves the last good version enforced (invariant 5), and
//! its errors stay visible until it is fixed or deleted.

use std::collections::BTreeMap;
use std::sync::Arc;

use policy_model::api::Object;
use policy_model::policy::{Kind, Policy};
use policy_model::PolicyError;

/// An object's identity across versions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn of(o: &Object) -> ObjectKey {
        ObjectKey {
            kind: o.reference.kind,
            namespace: o.reference.namespace.clone(),
            name: o.reference.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Stored {
    /// The newest version as the source gave it: an equal version is not translated
    /// again, and its policies stay the same shared values (the model compares those
    /// by pointer first).
    newest: Option<Object>,
    /// The policies of the last version that validated.
    in_force: Option<Vec<Arc<Policy>>>,
    /// Errors of the newest version, if it is invalid.
    errors: Vec<PolicyError>,
}

/// What a change did, for logs and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub applied: Vec<ObjectKey>,
    pub removed: Vec<ObjectKey>,
    /// Invalid new versions; the previous version (if any) stays in force.
    pub rejected: Vec<ObjectKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.removed.is_empty() && self.rejected.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct PolicyStore {
    objects: BTreeMap<ObjectKey, Stored>,
    /// Errors that belong to no object (unparsable YAML, unknown kinds).
    loose_errors: Vec<PolicyError>,
}

impl PolicyStore {
    /// Adds or replaces one object.
    pub fn upsert(&mut self, o: &Object) -> Changes {
        let key = ObjectKey::of(o);
        let mut changes = Changes::default();
        let stored = self.objects.entry(key.clone()).or_default();
        if stored.newest.as_ref() == Some(o) {
            return changes;
        }
        stored.newest = Some(o.clone());
        match o.translate() {
            Ok(policies) => {
                let same = stored.in_force.as_ref().is_some_and(|old| {
                    old.len() == policies.len() && old.iter().zip(&policies).all(|(a, b)| **a == *b)
                });
                if !same || !stored.errors.is_empty() {
                    changes.applied.push(key);
                }
                if !same {
                    stored.in_force = Some(policies.into_iter().map(Arc::new).collect());
                }
                stored.errors.clear();
            }
            Err(errors) => {
                if stored.errors != errors {
                    changes.rejected.push(key);
                }
                stored.errors = errors;
            }
        }
        changes
    }

    pub fn remove(&mut self, key: &ObjectKey) -> Changes {
        let mut changes = Changes::default();
        if self.objects.remove(key).is_some() {
            changes.removed.push(key.clone());
        }
        changes
    }

    /// Replaces the whole content with a full listing from a source: objects absent from
    /// it are removed; `loose_errors` are those that name no object.
    pub fn replace_all(&mut self, objects: &[Object], loose_errors: Vec<PolicyError>) -> Changes {
        let mut changes = Changes::default();
        let keep: std::collections::BTreeSet<ObjectKey> =
            objects.iter().map(ObjectKey::of).collect();
        let gone: Vec<ObjectKey> = self
            .objects
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            let c = self.remove(&k);
            changes.removed.extend(c.removed);
        }
        for o in objects {
            let c = self.upsert(o);
            changes.applied.extend(c.applied);
            changes.rejected.extend(c.rejected);
        }
        self.loose_errors = loose_errors;
        changes
    }

    /// Every policy in force (shared: an object's policies are the same values until it
    /// changes).
    pub fn policies(&self) -> Vec<Arc<Policy>> {
        self.objects
            .values()
            .filter_map(|s| s.in_force.as_ref())
            .flatten()
            .cloned()
            .collect()
    }

    /// Every current error: of invalid objects (whose last good version, if any, is in
    /// force) and of input that names no object.
    pub fn errors(&self) -> Vec<PolicyError> {
        self.objects
            .values()
            .flat_map(|s| s.errors.iter().cloned())
            .chain(self.loose_errors.iter().cloned())
            .collect()
    }

    /// Whether the object's enforced version is older than what was submitted.
    pub fn is_stale(&self, key: &ObjectKey) -> bool {
        self.objects
            .get(key)
            .is_some_and(|s| !s.errors.is_empty() && s.in_force.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_model::api::parse;

    fn object(yaml: &str) -> Object {
        let p = parse(yaml, Some("test.yaml"));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        p.objects.into_iter().next().expect("one object")
    }

    const GOOD_V1: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {matchLabels: {app: v1}}}\n";
    const GOOD_V2: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {matchLabels: {app: v2}}}\n";
    const BAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, policyTypes: [Sideways]}\n";

    fn selects(store: &PolicyStore, app: &str) -> bool {
        store
            .policies()
            .iter()
            .any(|p| format!("{:?}", p.subject).contains(&format!("\"{app}\"")))
    }

    #[test]
    fn an_invalid_new_version_leaves_the_last_good_one_in_force() {
        let mut s = PolicyStore::default();
        let c = s.upsert(&object(GOOD_V1));
        assert_eq!(c.applied.len(), 1);
        assert!(selects(&s, "v1"));

        let c = s.upsert(&object(BAD));
        assert_eq!(c.rejected.len(), 1);
        assert!(selects(&s, "v1"), "v1 still enforced");
        assert_eq!(s.policies().len(), 1);
        let errors = s.errors();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "spec.policyTypes[0]");
        assert!(s.is_stale(&ObjectKey::of(&object(GOOD_V1))));

        let c = s.upsert(&object(GOOD_V2));
        assert_eq!(c.applied.len(), 1);
        assert!(selects(&s, "v2") && !selects(&s, "v1"));
        assert!(s.errors().is_empty());
    }

    #[test]
    fn an_object_that_was_never_valid_enforces_nothing_but_reports() {
        let mut s = PolicyStore::default();
        let c = s.upsert(&object(BAD));
        assert_eq!(c.rejected.len(), 1);
        assert!(s.policies().is_empty());
        assert_eq!(s.errors().len(), 1);
    }

    #[test]
    fn replace_all_removes_what_is_gone_and_reports_no_change_when_equal() {
        let mut s = PolicyStore::default();
        s.replace_all(&[object(GOOD_V1)], vec![]);
        let c = s.replace_all(&[object(GOOD_V1)], vec![]);
        assert!(c.is_empty(), "{c:?}");
        let c = s.replace_all(&[], vec![]);
        assert_eq!(c.removed.len(), 1);
        assert!(s.policies().is_empty());
    }

    #[test]
    fn an_unchanged_object_keeps_its_policies_shared() {
        let mut s = PolicyStore::default();
        s.replace_all(&[object(GOOD_V1)], vec![]);
        let before = s.policies();
        s.replace_all(&[object(GOOD_V1)], vec![]);
        let after = s.policies();
        assert!(Arc::ptr_eq(&before[0], &after[0]), "the same shared policy");
        // a new version that translates to the same policy keeps it too (only the file
        // it came from differs)
        let mut moved = object(GOOD_V1);
        moved.file = Some("elsewhere.yaml".into());
        let c = s.replace_all(&[moved], vec![]);
        assert!(c.is_empty(), "{c:?}");
        assert!(Arc::ptr_eq(&before[0], &s.policies()[0]));
        s.replace_all(&[object(GOOD_V2)], vec![]);
        assert!(!Arc::ptr_eq(&before[0], &s.policies()[0]));
        assert!(selects(&s, "v2"));
    }
}
