//! Stable numeric identities. policy-model numbers identities in the order a compile
//! meets them, so a new pod or a newly learned FQDN IP can shift the numbers of others
//! from one compile to the next. The datapath keys policy entries and the ipcache by
//! number: a shift would rewrite entries that did not change, and for the moment between
//! two map writes give one peer another's number. The agent therefore keeps its own
//! table, label set -> number, renumbers each compiled model with it (numbers are only
//! read through `Identities::get(..).id`), and saves it in the state directory so a
//! restarted agent reuses the same numbers (a learning step's new numbers appended to a
//! journal, `journal`).

use std::collections::{BTreeMap, BTreeSet};

use policy_model::identity::{reserved, Idx, NumericId};
use policy_model::Model;
use serde::{Deserialize, Serialize};

use super::journal::Journaled;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StableIds {
    /// Label set (text form) -> number.
    by_labels: BTreeMap<String, NumericId>,
    next_cluster: NumericId,
    next_local: NumericId,
    #[serde(skip)]
    file: Option<Journaled>,
    /// Label sets numbered or forgotten since the last save.
    #[serde(skip)]
    dirty: BTreeSet<String>,
    /// A full renumbering since the last save: the next one writes the whole table.
    #[serde(skip)]
    renumbered: bool,
}

const FILE: &str = "identities.json";

/// One saved round: the label sets numbered (Some) or forgotten (None), and the next
/// numbers after it.
#[derive(Serialize, Deserialize)]
struct Round {
    ids: Vec<(String, Option<NumericId>)>,
    next_cluster: NumericId,
    next_local: NumericId,
}

impl StableIds {
    /// Loads `<dir>/identities.json`; absent or unreadable: an empty table.
    pub fn load(dir: &std::path::Path) -> StableIds {
        let mut file = Journaled::new(dir, FILE);
        let (snapshot, rounds) = file.load::<StableIds, Round>();
        let mut ids = snapshot.unwrap_or_default();
        for r in rounds {
            for (labels, id) in r.ids {
                match id {
                    Some(id) => ids.by_labels.insert(labels, id),
                    None => ids.by_labels.remove(&labels),
                };
            }
            ids.next_cluster = ids.next_cluster.max(r.next_cluster);
            ids.next_local = ids.next_local.max(r.next_local);
        }
        ids.file = Some(file);
        ids
    }

    /// Renumbers `model`'s identities: reserved ones keep their number, the others get
    /// the number their label set had before, or a new one never handed out. Label sets
    /// gone from the model are forgotten. Returns whether the table changed.
    pub fn apply(&mut self, model: &mut Model) -> bool {
        self.next_cluster = self.next_cluster.max(reserved::FIRST_CLUSTER);
        self.next_local = self.next_local.max(reserved::FIRST_LOCAL);
        let mut changed = false;
        let mut seen = BTreeSet::new();
        let retired: BTreeSet<usize> = (0..model.identities.len())
            .filter(|&i| !model.identities.is_live(i as Idx))
            .collect();
        for (i, ident) in model.identities.list.iter_mut().enumerate() {
            if ident.id < reserved::FIRST_CLUSTER || retired.contains(&i) {
                continue;
            }
            let key = ident.labels.to_string();
            let id = match self.by_labels.get(&key) {
                Some(id) => *id,
                None => {
                    let next = if ident.id >= reserved::FIRST_LOCAL {
                        &mut self.next_local
                    } else {
                        &mut self.next_cluster
                    };
                    let id = *next;
                    *next += 1;
                    self.by_labels.insert(key.clone(), id);
                    changed = true;
                    id
                }
            };
            ident.id = id;
            seen.insert(key);
        }
        let before = self.by_labels.len();
        self.by_labels.retain(|k, _| seen.contains(k));
        changed |= self.by_labels.len() != before;
        self.renumbered |= changed;
        changed
    }

    /// Numbers identities that came into use in `model` since it was renumbered (an
    /// incremental FQDN update): their label set's number, or a new one. Nothing is
    /// forgotten here; the next full [`StableIds::apply`] forgets what left. Returns
    /// whether the table changed.
    pub fn apply_new(&mut self, model: &mut Model, added: &[Idx]) -> bool {
        self.next_cluster = self.next_cluster.max(reserved::FIRST_CLUSTER);
        self.next_local = self.next_local.max(reserved::FIRST_LOCAL);
        let mut changed = false;
        for &i in added {
            let Some(ident) = model.identities.list.get_mut(i as usize) else {
                continue;
            };
            if ident.id < reserved::FIRST_CLUSTER {
                continue;
            }
            let key = ident.labels.to_string();
            ident.id = match self.by_labels.get(&key) {
                Some(id) => *id,
                None => {
                    let next = if ident.id >= reserved::FIRST_LOCAL {
                        &mut self.next_local
                    } else {
                        &mut self.next_cluster
                    };
                    let id = *next;
                    *next += 1;
                    self.dirty.insert(key.clone());
                    self.by_labels.insert(key, id);
                    changed = true;
                    id
                }
            };
        }
        changed
    }

    /// Forgets the label sets of identities an incremental update retired (no pod holds
    /// them any more), as the next full [`StableIds::apply`] would: a label set that
    /// comes back later gets a new number, as after a full compile. Live identities are
    /// kept. Returns whether the table changed.
    pub fn forget(&mut self, model: &Model, retired: &[Idx]) -> bool {
        let mut changed = false;
        for &i in retired {
            if (i as usize) < model.identities.len() && !model.identities.is_live(i) {
                let key = model.identities.get(i).labels.to_string();
                if self.by_labels.remove(&key).is_some() {
                    self.dirty.insert(key);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Saves what changed since the last save: the label sets numbered or forgotten
    /// appended to the journal, or the whole table (temporary file, then rename) after a
    /// full renumbering or when the journal has outgrown it.
    pub fn save(&mut self) -> std::io::Result<()> {
        let Some(mut file) = self.file.take() else {
            // No file (a table made in memory): nothing to save, nothing kept for it.
            self.dirty.clear();
            self.renumbered = false;
            return Ok(());
        };
        let result = if self.renumbered {
            file.write_snapshot(&*self)
        } else if self.dirty.is_empty() {
            Ok(())
        } else {
            let round = Round {
                ids: self
                    .dirty
                    .iter()
                    .map(|k| (k.clone(), self.by_labels.get(k).copied()))
                    .collect(),
                next_cluster: self.next_cluster,
                next_local: self.next_local,
            };
            file.append(&round, || &*self)
        };
        self.file = Some(file);
        if result.is_ok() {
            self.dirty.clear();
            self.renumbered = false;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use policy_model::{Cluster, CompileOptions};

    fn model(pods: &[(&str, &str)]) -> Model {
        let mut yaml = String::from("namespaces: [{name: a}]\npods:\n");
        for (i, (name, app)) in pods.iter().enumerate() {
            yaml.push_str(&format!(
                "- {{namespace: a, name: {name}, ip: 10.0.0.{}, labels: {{app: {app}}}}}\n",
                i + 1
            ));
        }
        let c: Cluster = serde_yaml::from_str(&yaml).unwrap();
        Model::compile(&c, vec![], CompileOptions::default())
    }

    fn id_of(m: &Model, pod: &str) -> NumericId {
        let ep = m.pod_endpoint(pod).unwrap();
        m.identities.get(ep.identity).id
    }

    #[test]
    fn numbers_survive_a_pod_inserted_before_others() {
        let mut ids = StableIds::default();
        let mut m1 = model(&[("x", "x"), ("y", "y")]);
        assert!(ids.apply(&mut m1));
        let (x, y) = (id_of(&m1, "a/x"), id_of(&m1, "a/y"));
        // a new label set first in order: policy-model alone would shift x and y
        let mut m2 = model(&[("w", "w"), ("x", "x"), ("y", "y")]);
        let raw_x = id_of(&m2, "a/x");
        ids.apply(&mut m2);
        assert_ne!(raw_x, x, "the compile alone renumbers");
        assert_eq!(id_of(&m2, "a/x"), x);
        assert_eq!(id_of(&m2, "a/y"), y);
        let w = id_of(&m2, "a/w");
        assert!(w != x && w != y);
        // and the ipcache carries the stable numbers
        let ipc = m2.ipcache(None);
        assert!(ipc
            .iter()
            .any(|(n, id)| n.to_string() == "10.0.0.2/32" && *id == x));
        // nothing new: no change
        let mut m3 = model(&[("w", "w"), ("x", "x"), ("y", "y")]);
        assert!(!ids.apply(&mut m3));
    }

    #[test]
    fn label_sets_retired_by_churn_are_forgotten_live_ones_kept() {
        let mut ids = StableIds::default();
        let mut m = model(&[("x", "x"), ("y", "y")]);
        ids.apply(&mut m);
        let (x, y) = (id_of(&m, "a/x"), id_of(&m, "a/y"));
        let retired_x = m.pod_endpoint("a/x").unwrap().identity;
        let live_y = m.pod_endpoint("a/y").unwrap().identity;
        let mut c = (*m.cluster).clone();
        c.pods.retain(|p| p.name != "x");
        let change = m.apply_cluster(&c).unwrap();
        assert_eq!(change.retired, vec![retired_x]);
        assert!(ids.forget(&m, &[retired_x, live_y]));
        assert!(!ids.forget(&m, &[retired_x]), "forgotten once");
        assert_eq!(id_of(&m, "a/y"), y, "the live one keeps its number");
        // x back: a new number, as a full compile after it left would give
        let mut back = (*m.cluster).clone();
        back.pods.push(
            serde_yaml::from_str("{namespace: a, name: x, ip: 10.0.0.9, labels: {app: x}}")
                .unwrap(),
        );
        let change = m.apply_cluster(&back).unwrap();
        assert!(ids.apply_new(&mut m, &change.new_identities));
        assert_ne!(id_of(&m, "a/x"), x);
        assert_eq!(id_of(&m, "a/y"), y);
    }

    #[test]
    fn without_a_file_saving_keeps_no_list_of_changes() {
        let mut ids = StableIds::default();
        let mut m = model(&[("x", "x"), ("y", "y")]);
        ids.apply(&mut m);
        assert!(!ids.dirty.is_empty() || ids.renumbered);
        ids.save().unwrap();
        assert!(ids.dirty.is_empty() && !ids.renumbered);
    }

    #[test]
    fn a_reload_finds_the_numbers_of_every_save_full_or_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = StableIds::load(dir.path());
        let mut m = model(&[("x", "x"), ("y", "y")]);
        ids.apply(&mut m);
        ids.save().unwrap();
        let y = id_of(&m, "a/y");
        // x leaves, z comes: a forgotten and a new label set, journaled
        let retired_x = m.pod_endpoint("a/x").unwrap().identity;
        let mut c = (*m.cluster).clone();
        c.pods.retain(|p| p.name != "x");
        c.pods.push(
            serde_yaml::from_str("{namespace: a, name: z, ip: 10.0.0.9, labels: {app: z}}")
                .unwrap(),
        );
        let change = m.apply_cluster(&c).unwrap();
        assert!(ids.forget(&m, &[retired_x]));
        assert!(ids.apply_new(&mut m, &change.new_identities));
        ids.save().unwrap();
        assert!(dir.path().join("identities.json.journal").exists());
        let z = id_of(&m, "a/z");
        let back = StableIds::load(dir.path());
        assert_eq!(back.by_labels, ids.by_labels);
        assert_eq!(
            (back.next_cluster, back.next_local),
            (ids.next_cluster, ids.next_local)
        );
        // the reloaded table numbers a fresh compile as before
        let mut again = StableIds::load(dir.path());
        let mut m2 = model(&[("y", "y"), ("z", "z")]);
        assert!(!again.apply(&mut m2));
        assert_eq!((id_of(&m2, "a/y"), id_of(&m2, "a/z")), (y, z));
    }
}
