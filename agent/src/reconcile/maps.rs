//! What the agent wants in the datapath maps, what is there, and the diff between them.
//!
//! `Applied` mirrors the maps (read back from the pinned maps at start, so a restarted
//! agent diffs against what the previous run left and rewrites nothing that is right).
//! `apply` writes only what differs, in an order that never opens a transient deny or a
//! transient allow: new and changed policy entries first (a new peer class's entries are
//! complete before any identity is put in it), then the identities' classes, ipcache and
//! endpoints, then the removal of classes, policy entries, endpoints and prefixes that are
//! gone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use redirect_bpf::common::EndpointInfo;
use redirect_bpf::{PolicyEntry, PolicyEntryKey};

use crate::datapath::Datapath;

/// The content of the maps the agent owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub ipcache: BTreeMap<IpNet, u32>,
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    /// Per endpoint id: its policy entries.
    pub policy: BTreeMap<u32, BTreeSet<PolicyEntry>>,
    /// Peer identity -> class (`redirect_bpf::PeerClasses::assignments`); changed through
    /// [`MapState::set_class`], [`MapState::unset_class`] and [`MapState::set_classes`].
    classes: BTreeMap<u32, u32>,
    /// Class -> how many identities `classes` puts in it: the distinct classes are
    /// counted at every round for the status, without a walk of every identity.
    class_sizes: BTreeMap<u32, usize>,
}

impl MapState {
    /// Reads what the pinned maps hold.
    pub fn read(dp: &impl Datapath) -> Result<MapState, redirect_bpf::Error> {
        let mut s = MapState::default();
        s.ipcache.extend(dp.ipcache_entries()?);
        s.endpoints.extend(dp.endpoints()?);
        for e in dp.policy_entries()? {
            s.policy.entry(e.endpoint_id).or_default().insert(e);
        }
        for (identity, class) in dp.peer_classes()? {
            s.set_class(identity, class);
        }
        Ok(s)
    }

    /// Peer identity -> class.
    pub fn classes(&self) -> &BTreeMap<u32, u32> {
        &self.classes
    }

    /// Distinct classes the identities are in.
    pub fn distinct_classes(&self) -> usize {
        self.class_sizes.len()
    }

    /// Puts `identity` in `class`.
    pub fn set_class(&mut self, identity: u32, class: u32) {
        if let Some(old) = self.classes.insert(identity, class) {
            self.leave_class(old);
        }
        *self.class_sizes.entry(class).or_default() += 1;
    }

    /// Takes `identity` out of its class.
    pub fn unset_class(&mut self, identity: u32) {
        if let Some(old) = self.classes.remove(&identity) {
            self.leave_class(old);
        }
    }

    /// Replaces every assignment.
    pub fn set_classes(&mut self, classes: BTreeMap<u32, u32>) {
        self.classes.clear();
        self.class_sizes.clear();
        for (identity, class) in classes {
            self.set_class(identity, class);
        }
    }

    fn leave_class(&mut self, class: u32) {
        if let Some(n) = self.class_sizes.get_mut(&class) {
            *n -= 1;
            if *n == 0 {
                self.class_sizes.remove(&class);
            }
        }
    }

    /// Number of policy entries.
    pub fn policy_len(&self) -> usize {
        self.policy.values().map(BTreeSet::len).sum()
    }
}

/// What a datapath update changes: per key, what the maps are to hold (`None`: nothing).
/// A full push diffs the whole state (`Changes::between`); a learning step lists only the
/// keys its DNS answers touched, so its cost follows the answers, not the maps' size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Per endpoint id: all its entries from now on (empty: none).
    pub policy: BTreeMap<u32, BTreeSet<PolicyEntry>>,
    pub classes: BTreeMap<u32, Option<u32>>,
    pub ipcache: BTreeMap<IpNet, Option<u32>>,
    pub endpoints: BTreeMap<IpAddr, Option<EndpointInfo>>,
}

impl Changes {
    /// The keys where `applied` and `desired` differ, with what `desired` holds there.
    pub fn between(applied: &MapState, desired: &MapState) -> Changes {
        let empty = BTreeSet::new();
        let mut policy = BTreeMap::new();
        for id in desired.policy.keys().chain(applied.policy.keys()) {
            let want = desired.policy.get(id).unwrap_or(&empty);
            if applied.policy.get(id).unwrap_or(&empty) != want {
                policy.insert(*id, want.clone());
            }
        }
        Changes {
            policy,
            classes: differences(&applied.classes, &desired.classes),
            ipcache: differences(&applied.ipcache, &desired.ipcache),
            endpoints: differences(&applied.endpoints, &desired.endpoints),
        }
    }
}

/// Per key where `have` and `want` differ: what `want` holds.
fn differences<K: Ord + Copy, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> BTreeMap<K, Option<V>> {
    let mut out: BTreeMap<K, Option<V>> = want
        .iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .map(|(k, v)| (*k, Some(*v)))
        .collect();
    out.extend(
        have.keys()
            .filter(|k| !want.contains_key(k))
            .map(|k| (*k, None)),
    );
    out
}

/// Moves the maps from `applied` to `desired`, keeping `applied` equal to the maps after
/// every write (also when one fails). Returns the number of map writes.
pub fn apply(
    dp: &mut impl Datapath,
    applied: &mut MapState,
    desired: &MapState,
) -> Result<usize, redirect_bpf::Error> {
    let changes = Changes::between(applied, desired);
    apply_changes(dp, applied, &changes)
}

/// Writes `changes` to the maps in the order of the module documentation, keeping
/// `applied` equal to the maps after every write (also when one fails). Returns the
/// number of map writes.
pub fn apply_changes(
    dp: &mut impl Datapath,
    applied: &mut MapState,
    changes: &Changes,
) -> Result<usize, redirect_bpf::Error> {
    let mut writes = 0;
    // 1. new and changed policy entries
    for (id, entries) in &changes.policy {
        let have = applied.policy.get(id);
        let changed: Vec<PolicyEntry> = entries
            .iter()
            .filter(|e| !have.is_some_and(|h| h.contains(e)))
            .copied()
            .collect();
        if changed.is_empty() {
            continue;
        }
        dp.insert_policy(&changed)?;
        writes += changed.len();
        let slot = applied.policy.entry(*id).or_default();
        let keys: BTreeSet<PolicyEntryKey> = changed.iter().map(PolicyEntry::key).collect();
        slot.retain(|e| !keys.contains(&e.key()));
        slot.extend(changed);
    }
    // 2. identities into their classes
    for (identity, class) in set(&changes.classes) {
        if applied.classes.get(identity) != Some(class) {
            dp.set_peer_class(*identity, *class)?;
            applied.set_class(*identity, *class);
            writes += 1;
        }
    }
    // 3. ipcache
    for (net, id) in set(&changes.ipcache) {
        if applied.ipcache.get(net) != Some(id) {
            dp.set_ipcache(*net, *id)?;
            applied.ipcache.insert(*net, *id);
            writes += 1;
        }
    }
    // 4. endpoints
    for (ip, info) in set(&changes.endpoints) {
        if applied.endpoints.get(ip) != Some(info) {
            dp.set_endpoint(*ip, *info)?;
            applied.endpoints.insert(*ip, *info);
            writes += 1;
        }
    }
    // 5. identities that left (their classes' entries go next)
    for identity in unset(&changes.classes) {
        if applied.classes.contains_key(identity) {
            dp.remove_peer_class(*identity)?;
            applied.unset_class(*identity);
            writes += 1;
        }
    }
    // 6. policy entries that are gone
    for (id, entries) in &changes.policy {
        let keep: BTreeSet<PolicyEntryKey> = entries.iter().map(PolicyEntry::key).collect();
        let gone: Vec<PolicyEntry> = applied
            .policy
            .get(id)
            .into_iter()
            .flatten()
            .filter(|e| !keep.contains(&e.key()))
            .copied()
            .collect();
        if gone.is_empty() {
            continue;
        }
        dp.remove_policy(&gone)?;
        writes += gone.len();
        if let Some(slot) = applied.policy.get_mut(id) {
            slot.retain(|e| keep.contains(&e.key()));
            if slot.is_empty() {
                applied.policy.remove(id);
            }
        }
    }
    // 7. endpoints that left
    for ip in unset(&changes.endpoints) {
        if applied.endpoints.contains_key(ip) {
            dp.remove_endpoint(*ip)?;
            applied.endpoints.remove(ip);
            writes += 1;
        }
    }
    // 8. prefixes that left
    for net in unset(&changes.ipcache) {
        if applied.ipcache.contains_key(net) {
            dp.remove_ipcache(*net)?;
            applied.ipcache.remove(net);
            writes += 1;
        }
    }
    Ok(writes)
}

/// The keys `changes` gives a value, with it.
fn set<K, V>(changes: &BTreeMap<K, Option<V>>) -> impl Iterator<Item = (&K, &V)> {
    changes.iter().filter_map(|(k, v)| Some((k, v.as_ref()?)))
}

/// The keys `changes` empties.
fn unset<K, V>(changes: &BTreeMap<K, Option<V>>) -> impl Iterator<Item = &K> {
    changes.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::datapath::fake::FakeDatapath;

    fn entry(endpoint_id: u32, peer: u32, port: u16, action: u8) -> PolicyEntry {
        PolicyEntry {
            endpoint_id,
            peer,
            direction: 0,
            protocol: 6,
            port,
            port_prefix_len: 16,
            action,
            proxy_port: 0,
            cookie: 0,
        }
    }

    fn state(ips: &[(&str, u32)], classes: &[(u32, u32)], policy: &[PolicyEntry]) -> MapState {
        let mut s = MapState::default();
        for (net, id) in ips {
            s.ipcache.insert(net.parse().unwrap(), *id);
        }
        for (identity, class) in classes {
            s.set_class(*identity, *class);
        }
        for e in policy {
            s.policy.entry(e.endpoint_id).or_default().insert(*e);
        }
        s
    }

    /// Writes `s` to a fresh fake datapath; returns it with what it holds.
    fn written(s: &MapState) -> (FakeDatapath, MapState) {
        let mut dp = FakeDatapath::new();
        let mut applied = MapState::default();
        apply(&mut dp, &mut applied, s).unwrap();
        dp.take_journal();
        (dp, applied)
    }

    #[test]
    fn the_distinct_classes_follow_every_change_of_the_assignments() {
        let recount = |s: &MapState| s.classes().values().collect::<BTreeSet<_>>().len();
        let mut s = MapState::default();
        // (identity, Some(class)) puts it there, (identity, None) takes it out
        let steps: [(u32, Option<u32>); 9] = [
            (100, Some(1)),
            (101, Some(1)),
            (102, Some(2)),
            (101, Some(2)),
            (100, Some(3)),
            (100, Some(3)),
            (102, None),
            (101, None),
            (999, None),
        ];
        for (identity, class) in steps {
            match class {
                Some(c) => s.set_class(identity, c),
                None => s.unset_class(identity),
            }
            assert_eq!(
                s.distinct_classes(),
                recount(&s),
                "after {identity} -> {class:?}"
            );
        }
        assert_eq!(s.distinct_classes(), 1);
        s.set_classes([(1, 7), (2, 7), (3, 8)].into_iter().collect());
        assert_eq!(s.distinct_classes(), 2);
        s.unset_class(3);
        assert_eq!(s.distinct_classes(), 1);
        s.set_classes(BTreeMap::new());
        assert_eq!(s.distinct_classes(), 0);
    }

    #[test]
    fn the_changes_between_two_states_take_the_maps_from_one_to_the_other() {
        let before = state(
            &[("10.0.0.1/32", 100), ("10.0.0.2/32", 101)],
            &[(100, 1), (101, 2)],
            &[entry(7, 1, 80, 1), entry(7, 2, 443, 1), entry(8, 1, 53, 1)],
        );
        let after = state(
            &[("10.0.0.1/32", 102), ("10.0.0.3/32", 100)],
            &[(100, 1), (102, 2)],
            &[entry(7, 1, 80, 0), entry(9, 2, 8080, 1)],
        );
        let (mut dp, mut applied) = written(&before);
        let changes = Changes::between(&applied, &after);
        assert!(
            !changes.classes.contains_key(&100),
            "unchanged keys are left out"
        );
        apply_changes(&mut dp, &mut applied, &changes).unwrap();
        assert_eq!(applied, after);
        assert_eq!(MapState::read(&dp).unwrap(), after);
        assert_eq!(Changes::between(&applied, &after), Changes::default());
    }

    #[test]
    fn changes_touch_only_the_keys_they_name() {
        let before = state(
            &[("10.0.0.1/32", 100), ("10.0.0.2/32", 101)],
            &[(100, 1), (101, 1)],
            &[entry(7, 1, 80, 1), entry(8, 1, 53, 1)],
        );
        let (mut dp, mut applied) = written(&before);
        let mut changes = Changes::default();
        changes.ipcache.insert("10.0.0.2/32".parse().unwrap(), None);
        changes
            .ipcache
            .insert("10.0.0.9/32".parse().unwrap(), Some(103));
        changes.classes.insert(101, None);
        changes.classes.insert(103, Some(1));
        changes
            .policy
            .insert(8, BTreeSet::from([entry(8, 1, 5353, 1)]));
        let writes = apply_changes(&mut dp, &mut applied, &changes).unwrap();
        assert_eq!(writes, 6, "{:#?}", dp.take_journal());
        let want = state(
            &[("10.0.0.1/32", 100), ("10.0.0.9/32", 103)],
            &[(100, 1), (103, 1)],
            &[entry(7, 1, 80, 1), entry(8, 1, 5353, 1)],
        );
        assert_eq!(applied, want);
        assert_eq!(MapState::read(&dp).unwrap(), want);
    }
}
