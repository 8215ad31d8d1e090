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
    /// Peer identity -> class (`redirect_bpf::PeerClasses::assignments`).
    pub classes: BTreeMap<u32, u32>,
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
        s.classes.extend(dp.peer_classes()?);
        Ok(s)
    }

    /// Number of policy entries.
    pub fn policy_len(&self) -> usize {
        self.policy.values().map(BTreeSet::len).sum()
    }
}

/// Moves the maps from `applied` to `desired`, keeping `applied` equal to the maps after
/// every write (also when one fails). Returns the number of map writes.
pub fn apply(
    dp: &mut impl Datapath,
    applied: &mut MapState,
    desired: &MapState,
) -> Result<usize, redirect_bpf::Error> {
    let mut writes = 0;
    // 1. new and changed policy entries
    for (id, entries) in &desired.policy {
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
    for (identity, class) in &desired.classes {
        if applied.classes.get(identity) != Some(class) {
            dp.set_peer_class(*identity, *class)?;
            applied.classes.insert(*identity, *class);
            writes += 1;
        }
    }
    // 3. ipcache
    for (net, id) in &desired.ipcache {
        if applied.ipcache.get(net) != Some(id) {
            dp.set_ipcache(*net, *id)?;
            applied.ipcache.insert(*net, *id);
            writes += 1;
        }
    }
    // 4. endpoints
    for (ip, info) in &desired.endpoints {
        if applied.endpoints.get(ip) != Some(info) {
            dp.set_endpoint(*ip, *info)?;
            applied.endpoints.insert(*ip, *info);
            writes += 1;
        }
    }
    // 5. identities that left (their classes' entries go next)
    let gone: Vec<u32> = applied
        .classes
        .keys()
        .filter(|i| !desired.classes.contains_key(i))
        .copied()
        .collect();
    for identity in gone {
        dp.remove_peer_class(identity)?;
        applied.classes.remove(&identity);
        writes += 1;
    }
    // 6. policy entries that are gone
    let ids: Vec<u32> = applied.policy.keys().copied().collect();
    for id in ids {
        let keep: BTreeSet<PolicyEntryKey> = desired
            .policy
            .get(&id)
            .map(|s| s.iter().map(PolicyEntry::key).collect())
            .unwrap_or_default();
        let gone: Vec<PolicyEntry> = applied.policy[&id]
            .iter()
            .filter(|e| !keep.contains(&e.key()))
            .copied()
            .collect();
        if gone.is_empty() {
            continue;
        }
        dp.remove_policy(&gone)?;
        writes += gone.len();
        if let Some(slot) = applied.policy.get_mut(&id) {
            slot.retain(|e| keep.contains(&e.key()));
            if slot.is_empty() {
                applied.policy.remove(&id);
            }
        }
    }
    // 7. endpoints that left
    let gone: Vec<IpAddr> = applied
        .endpoints
        .keys()
        .filter(|ip| !desired.endpoints.contains_key(ip))
        .copied()
        .collect();
    for ip in gone {
        dp.remove_endpoint(ip)?;
        applied.endpoints.remove(&ip);
        writes += 1;
    }
    // 8. prefixes that left
    let gone: Vec<IpNet> = applied
        .ipcache
        .keys()
        .filter(|n| !desired.ipcache.contains_key(n))
        .copied()
        .collect();
    for net in gone {
        dp.remove_ipcache(net)?;
        applied.ipcache.remove(&net);
        writes += 1;
    }
    Ok(writes)
}
