//! Learning IPs from DNS answers without a full compile.
//!
//! An IP learned for a name carries, for every toFQDNs pattern matching the name, the
//! label `fqdn:PATTERN@CLIENT` of the endpoint that asked. Teaching or forgetting IPs
//! therefore changes only the identities of those IPs: the new label set is interned,
//! evaluated against the cached selectors (as a pod relabel is), and an identity no IP
//! holds any more is retired from them. Endpoint entries refer to peer sets, whose
//! bitsets follow, so no endpoint is recompiled. The result names what the datapath must
//! be told: the IPs whose identity changed, and the endpoints whose peer sets gained or
//! lost an identity.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::{HashMap as ImHashMap, OrdMap};

use super::{EndpointKey, IpOwner, Model};
use crate::cluster::DnsObservation;
use crate::fqdn::FqdnPatterns;
use crate::identity::{fqdn_key, IdentityKind, Idx};
use crate::labels::{Label, LabelSet};

/// (client endpoint `ns/pod`, name as observed), shared: see [`Learned`].
type ObsKey = Arc<(String, String)>;

/// What one (client, name) learned: the patterns matching the name (indices into
/// `Model::fqdn_patterns`) and the IPs; shared, see [`Learned`].
type ObsValue = Arc<(Vec<usize>, BTreeSet<IpAddr>)>;

/// The observations behind the FQDN labels, indexed both ways. Persistent maps (`imbl`):
/// they grow with what a node learned, and every learning step works on a copy. A change
/// copies the map's nodes on its path with every entry in them, so keys and values are
/// shared (`Arc`): a copy costs a count per entry, not its strings and sets, and so does
/// freeing the old version once no one holds it.
#[derive(Clone, Debug, Default)]
pub(super) struct Learned {
    /// Per (client, name): the patterns (indices into `Model::fqdn_patterns`) matching the
    /// name, and the IPs.
    by_name: OrdMap<ObsKey, ObsValue>,
    /// Per IP: the observations naming it.
    by_ip: ImHashMap<IpAddr, Arc<BTreeSet<ObsKey>>>,
    /// Per FQDN identity: how many IPs hold it.
    holders: ImHashMap<Idx, usize>,
}

impl Learned {
    /// Merges an observation (several for one client and name add up, as in a compile).
    /// Returns the IPs it brought to that (client, name).
    pub(super) fn add(&mut self, patterns: &FqdnPatterns, obs: &DnsObservation) -> Vec<IpAddr> {
        // The map's own key when it has one: the per-IP sets then share its strings.
        let key: ObsKey = match self
            .by_name
            .get_key_value(&(obs.client.clone(), obs.name.clone()))
        {
            Some((k, _)) => Arc::clone(k),
            None => Arc::new((obs.client.clone(), obs.name.clone())),
        };
        let entry = self
            .by_name
            .entry(key.clone())
            .or_insert_with(|| Arc::new((patterns.matching(&obs.name), BTreeSet::new())));
        let (_, ips) = Arc::make_mut(entry);
        let mut new = Vec::new();
        for ip in &obs.ips {
            if ips.insert(*ip) {
                Arc::make_mut(self.by_ip.entry(*ip).or_default()).insert(key.clone());
                new.push(*ip);
            }
        }
        if ips.is_empty() {
            self.by_name.remove(&key);
        }
        new
    }

    /// Every (client, name) with its IPs, as observations, in key order.
    pub(super) fn observations(&self) -> Vec<DnsObservation> {
        self.by_name
            .iter()
            .map(|(key, value)| DnsObservation {
                client: key.0.clone(),
                name: key.1.clone(),
                ips: value.1.iter().copied().collect(),
            })
            .collect()
    }

    /// Removes IPs from one (client, name). Returns those it held.
    fn remove(&mut self, key: &(String, String), gone: &[IpAddr]) -> Vec<IpAddr> {
        let Some(entry) = self.by_name.get_mut(key) else {
            return Vec::new();
        };
        let (_, ips) = Arc::make_mut(entry);
        let mut removed = Vec::new();
        for ip in gone {
            if ips.remove(ip) {
                removed.push(*ip);
                if let Some(keys) = self.by_ip.get_mut(ip) {
                    let keys = Arc::make_mut(keys);
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_ip.remove(ip);
                    }
                }
            }
        }
        if ips.is_empty() {
            self.by_name.remove(key);
        }
        removed
    }

    /// Lets go of one IP's hold on an FQDN identity. Returns whether nothing holds it any
    /// more (the caller retires it).
    pub(super) fn release(&mut self, i: Idx) -> bool {
        match self.holders.get_mut(&i) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.holders.remove(&i);
                true
            }
        }
    }

    /// Whether an IP holds the FQDN identity `i`.
    pub(super) fn is_held(&self, i: Idx) -> bool {
        self.holders.contains_key(&i)
    }

    /// The `fqdn:` labels an IP carries.
    fn labels(&self, patterns: &FqdnPatterns, ip: IpAddr) -> BTreeSet<Label> {
        let mut out = BTreeSet::new();
        for key in self.by_ip.get(&ip).into_iter().flat_map(|keys| keys.iter()) {
            let Some(value) = self.by_name.get(key) else {
                continue;
            };
            for (text, _) in value.0.iter().filter_map(|&p| patterns.get(p)) {
                out.insert(Label {
                    key: fqdn_key(text, &key.0),
                    value: String::new(),
                });
            }
        }
        out
    }
}

/// What one learning step changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FqdnChange {
    /// IPs whose identity changed: (IP, identity before, identity after), as
    /// [`Model::identity_of`] gives them. Their ipcache entries are to be rewritten.
    pub ips: Vec<(IpAddr, Idx, Idx)>,
    /// Identities that came into use (new to the cached selectors).
    pub added: Vec<Idx>,
    /// Identities no IP holds any more, taken out of the cached selectors.
    pub retired: Vec<Idx>,
    /// Endpoints with an entry whose peers gained or lost one of those identities: their
    /// policy entries are to be rewritten. The others are unchanged.
    pub endpoints: Vec<EndpointKey>,
}

impl FqdnChange {
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.added.is_empty() && self.retired.is_empty()
    }
}

impl Model {
    /// Sets the IPs `client` (`ns/pod`) learned for `name`, replacing what it had learned
    /// for that name (no IPs: the name is forgotten), and updates what depends on them.
    /// Equivalent to a full compile with `cluster.dns` changed the same way, which
    /// [`Model::dns`] then reflects.
    pub fn set_fqdn_ips(
        &mut self,
        client: &str,
        name: &str,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> FqdnChange {
        let ips: BTreeSet<IpAddr> = ips.into_iter().collect();
        let key = (client.to_string(), name.to_string());
        let before: BTreeSet<IpAddr> = self
            .learned
            .by_name
            .get(&key)
            .map(|v| v.1.clone())
            .unwrap_or_default();
        let gone: Vec<IpAddr> = before.difference(&ips).copied().collect();
        let mut touched = self.learned.remove(&key, &gone);
        touched.extend(self.learned.add(
            &self.fqdn_patterns,
            &DnsObservation {
                client: key.0.clone(),
                name: key.1.clone(),
                ips: ips.difference(&before).copied().collect(),
            },
        ));
        self.relabel_fqdn_ips(touched)
    }

    /// Adds the IPs of an observation to what its client learned for its name.
    pub fn observe_dns(&mut self, obs: &DnsObservation) -> FqdnChange {
        let mut ips = self.fqdn_ips(&obs.client, &obs.name);
        ips.extend(obs.ips.iter().copied());
        self.set_fqdn_ips(&obs.client, &obs.name, ips)
    }

    /// Removes IPs from what `client` learned for `name` (an expiry).
    pub fn forget_dns(&mut self, client: &str, name: &str, gone: &[IpAddr]) -> FqdnChange {
        let mut ips = self.fqdn_ips(client, name);
        for ip in gone {
            ips.remove(ip);
        }
        self.set_fqdn_ips(client, name, ips)
    }

    /// The IPs `client` learned for `name` (as observed, not normalised).
    pub fn fqdn_ips(&self, client: &str, name: &str) -> BTreeSet<IpAddr> {
        self.learned
            .by_name
            .get(&(client.to_string(), name.to_string()))
            .map(|v| v.1.clone())
            .unwrap_or_default()
    }

    fn relabel_fqdn_ips(&mut self, ips: Vec<IpAddr>) -> FqdnChange {
        let mut change = FqdnChange::default();
        let mut released = Vec::new();
        for ip in ips {
            if let Some(old) = self.relabel_fqdn_ip(ip, &mut change) {
                released.push(old);
            }
        }
        released.sort_unstable();
        released.dedup();
        let retiring: Vec<Idx> = released
            .into_iter()
            .filter(|i| !self.learned.holders.contains_key(i))
            .collect();
        // Endpoints are found while the retiring identities are still in the bitsets.
        let moved: Vec<Idx> = change.added.iter().chain(&retiring).copied().collect();
        if !moved.is_empty() {
            change.endpoints = self.endpoints_selecting(&moved);
        }
        for &i in &retiring {
            self.selectors.remove_identity(&self.identities, i);
            self.identities.retire(i);
        }
        change.retired = retiring;
        change
    }

    /// Gives one IP the identity of its current FQDN labels (or none: it falls back to
    /// its prefix or world). Cluster IPs are never relabelled. Returns the FQDN identity
    /// the IP released, if any, for the caller to retire once nothing holds it.
    pub(super) fn relabel_fqdn_ip(&mut self, ip: IpAddr, change: &mut FqdnChange) -> Option<Idx> {
        let old_fqdn = match self.exact.get(&ip) {
            Some(IpOwner::Pod(_) | IpOwner::Node(_)) => return None, // toFQDNs never applies
            Some(IpOwner::World(i)) => Some(*i),
            None => None,
        };
        let before = self.identity_of(ip, None);
        let fqdn = self.learned.labels(&self.fqdn_patterns, ip);
        if fqdn.is_empty() {
            self.exact.remove(&ip);
        } else {
            let mut labels = vec![super::reserved_label("world")];
            labels.extend(self.prefix_labels(std::iter::once(ip), false));
            labels.extend(fqdn);
            let (i, fresh) = self
                .identities
                .intern(LabelSet::new(labels), IdentityKind::Fqdn);
            if fresh {
                self.selectors.add_identity(&self.identities, i);
                change.added.push(i);
            }
            *self.learned.holders.entry(i).or_insert(0) += 1;
            self.exact.insert(ip, IpOwner::World(i));
        }
        let after = self.identity_of(ip, None);
        if before != after {
            change.ips.push((ip, before, after));
        }
        let old = old_fqdn?;
        match self.learned.holders.get_mut(&old) {
            Some(n) if *n > 1 => {
                *n -= 1;
                None
            }
            _ => {
                self.learned.holders.remove(&old);
                Some(old)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation(client: &str, name: &str, ips: &[&str]) -> DnsObservation {
        DnsObservation {
            client: client.into(),
            name: name.into(),
            ips: ips.iter().filter_map(|s| s.parse().ok()).collect(),
        }
    }

    /// A learning step works on a copy of what the published model holds: the entries it
    /// does not touch stay shared with the original, not copied with their strings and
    /// sets (a copied node of the persistent map copies pointers).
    #[test]
    fn a_copy_changed_in_one_entry_shares_the_others() {
        let patterns = FqdnPatterns::default();
        let mut original = Learned::default();
        for k in 0..200 {
            let name = format!("n{k}.example.");
            let ip = format!("203.0.113.{}", k % 250);
            original.add(&patterns, &observation("a/p", &name, &[&ip]));
        }
        let mut copy = original.clone();
        copy.add(
            &patterns,
            &observation("a/p", "n7.example.", &["198.51.100.7"]),
        );
        let changed = ("a/p".to_string(), "n7.example.".to_string());
        for (key, value) in original.by_name.iter() {
            let (copied_key, copied) = copy.by_name.get_key_value(&**key).expect("kept");
            if **key == changed {
                assert_eq!(copied.1.len(), 2, "the copy learned the new IP");
                assert_eq!(value.1.len(), 1, "the original did not");
            } else {
                assert!(Arc::ptr_eq(key, copied_key), "{key:?}: key copied");
                assert!(Arc::ptr_eq(value, copied), "{key:?}: value copied");
            }
        }
        for (ip, keys) in original.by_ip.iter() {
            assert!(
                Arc::ptr_eq(keys, &copy.by_ip[ip]),
                "{ip}: observations copied"
            );
        }
    }
}
