//! The FQDN cache: per endpoint, per name, the IPs learned from answers with their expiry.
//! IPs that expire or are evicted become zombies; a zombie leaves once no live connection
//! uses it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One learned IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpEntry {
    pub ip: IpAddr,
    /// When it was (last) learned, ms since the Unix epoch.
    pub learned_ms: u64,
    /// When its TTL runs out, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// The IPs of one name for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    /// Live IPs, oldest learned first.
    pub ips: Vec<IpEntry>,
    /// Expired or evicted IPs, kept while a connection may use them.
    #[serde(default)]
    pub zombies: Vec<IpEntry>,
    /// The selectors the IPs were last handed to the datapath under.
    #[serde(default)]
    pub selectors: Vec<String>,
}

/// endpoint -> name -> IPs, in order: what is persisted and restored.
pub type Entries = BTreeMap<String, BTreeMap<String, NameEntry>>;

/// endpoint -> name -> IPs, as the cache holds them: hashed, since every forwarded answer
/// looks its name up (a sorted map compares the name with a string per tree level).
type Live = HashMap<String, HashMap<String, NameEntry>>;

/// An IP that left the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub endpoint: String,
    pub name: String,
    pub ip: IpAddr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub names: usize,
    pub ips: usize,
    pub zombies: usize,
}

/// What [`FqdnCache::learn_under`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The datapath held every IP under these selectors already: only the expiry moved.
    pub covered: bool,
    /// IPs past the per-name limit, now zombies.
    pub evicted: Vec<IpAddr>,
    /// Some IP that was live expires sooner than before (the answer had a lower TTL).
    pub sooner: bool,
    /// Live IPs of any endpoint and name made zombies by the per-node limit.
    pub node_evicted: usize,
}

#[derive(Clone, Debug)]
pub struct FqdnCache {
    max_ips_per_name: usize,
    /// Live IPs over every endpoint and name; 0: no limit.
    max_ips_per_node: usize,
    /// Live IPs held now (kept with every change of an entry's `ips`).
    live: usize,
    entries: Live,
}

impl FqdnCache {
    /// A cache with a per-name limit and no per-node limit.
    pub fn new(max_ips_per_name: usize) -> FqdnCache {
        FqdnCache::with_limits(max_ips_per_name, 0)
    }

    /// A cache that keeps at most `max_ips_per_name` live IPs per name per endpoint and
    /// `max_ips_per_node` over all (0: no limit): the names a `matchPattern` admits are
    /// unbounded, so without it the cache grows with every new name a pod looks up.
    pub fn with_limits(max_ips_per_name: usize, max_ips_per_node: usize) -> FqdnCache {
        FqdnCache {
            max_ips_per_name: max_ips_per_name.max(1),
            max_ips_per_node,
            live: 0,
            entries: Live::new(),
        }
    }

    /// Live IPs held now, over every endpoint and name.
    pub fn live_ips(&self) -> usize {
        self.live
    }

    /// Past the per-node limit, the oldest learned live IPs of the node (any endpoint,
    /// any name) become zombies, like those past the per-name limit: they leave the
    /// datapath at the next sweep unless a connection uses them. Evicts down to 1%
    /// under the limit, so that the scan over the cache runs once per hundredth of it
    /// learned, not per answer. Returns how many it evicted.
    fn enforce_node_limit(&mut self) -> usize {
        let max = self.max_ips_per_node;
        if max == 0 || self.live <= max {
            return 0;
        }
        let target = max - max / 100;
        let n = self.live - target;
        let mut all: Vec<u64> = self
            .entries
            .values()
            .flat_map(|names| names.values())
            .flat_map(|e| e.ips.iter().map(|x| x.learned_ms))
            .collect();
        // the learned time of the n-th oldest: those before it go, and of those learned
        // at that same time as many as are still needed
        let (_, nth, _) = all.select_nth_unstable(n - 1);
        let cut = *nth;
        let mut at_cut = n - all.iter().filter(|t| **t < cut).count();
        let mut evicted = 0;
        for names in self.entries.values_mut() {
            for e in names.values_mut() {
                let mut kept = Vec::with_capacity(e.ips.len());
                for x in e.ips.drain(..) {
                    let go = x.learned_ms < cut || (x.learned_ms == cut && at_cut > 0);
                    if go {
                        if x.learned_ms == cut {
                            at_cut -= 1;
                        }
                        evicted += 1;
                        e.zombies.push(x);
                    } else {
                        kept.push(x);
                    }
                }
                e.ips = kept;
            }
        }
        self.live -= evicted;
        evicted
    }

    /// Records that `endpoint` learned `ips` for `name`, valid for `ttl` seconds from
    /// `now_ms`. Known IPs are refreshed and become the newest; past the per-name limit
    /// the oldest become zombies. Returns the evicted IPs.
    pub fn learn(
        &mut self,
        endpoint: &str,
        name: &str,
        ips: &[IpAddr],
        ttl: u32,
        now_ms: u64,
    ) -> Vec<IpAddr> {
        let max = self.max_ips_per_name;
        let Some(entry) = self.entry_mut(endpoint, name) else {
            return Vec::new();
        };
        let before = entry.ips.len();
        let evicted = refresh(entry, max, ips, ttl, now_ms).0;
        let after = entry.ips.len();
        self.live = (self.live + after).saturating_sub(before);
        self.enforce_node_limit();
        evicted
    }

    /// [`FqdnCache::learn`] for IPs handed to the datapath under `selectors`, which it
    /// records. Also says whether the datapath held them already: every IP was live for
    /// `name` and handed over under these same selectors before. One lookup of the name.
    pub fn learn_under(
        &mut self,
        endpoint: &str,
        name: &str,
        ips: &[IpAddr],
        selectors: &[&str],
        ttl: u32,
        now_ms: u64,
    ) -> Learned {
        let max = self.max_ips_per_name;
        let Some(entry) = self.entry_mut(endpoint, name) else {
            return Learned {
                covered: false,
                evicted: Vec::new(),
                sooner: false,
                node_evicted: 0,
            };
        };
        let same_selectors = entry
            .selectors
            .iter()
            .map(String::as_str)
            .eq(selectors.iter().copied());
        let covered = same_selectors && ips.iter().all(|ip| entry.ips.iter().any(|x| x.ip == *ip));
        if !same_selectors {
            entry.selectors = selectors.iter().map(|s| s.to_string()).collect();
        }
        let before = entry.ips.len();
        let (evicted, sooner) = refresh(entry, max, ips, ttl, now_ms);
        let after = entry.ips.len();
        self.live = (self.live + after).saturating_sub(before);
        let node_evicted = self.enforce_node_limit();
        Learned {
            covered: covered && node_evicted == 0,
            evicted,
            sooner,
            node_evicted,
        }
    }

    /// The live IPs of `name` for `endpoint` with their expiry (ms since the Unix epoch),
    /// when the datapath was handed them (the entry has selectors): what
    /// [`FqdnCache::holds`] looks at, taken ahead of an answer.
    pub fn held(&self, endpoint: &str, name: &str) -> Option<Vec<(IpAddr, u64)>> {
        let e = self.entry(endpoint, name)?;
        (!e.selectors.is_empty()).then(|| e.ips.iter().map(|x| (x.ip, x.expires_ms)).collect())
    }

    /// Whether every IP in `ips` is live for `name` of `endpoint` until `until_ms` at
    /// least: then the datapath holds them. The selectors need no comparing: a name's
    /// entry carries the current model's selectors (set when learned, updated at every
    /// model swap under the same lock, `retain_selected`), and a name no selector matches
    /// has no entry, or one with no selectors.
    pub fn holds(&self, endpoint: &str, name: &str, ips: &[IpAddr], until_ms: u64) -> bool {
        self.entry(endpoint, name).is_some_and(|e| {
            !e.selectors.is_empty()
                && ips.iter().all(|ip| {
                    e.ips
                        .iter()
                        .any(|x| x.ip == *ip && x.expires_ms >= until_ms)
                })
        })
    }

    /// The entry of `name` for `endpoint`, made when missing (always `Some`). A known
    /// name (the common case) costs no key allocation.
    fn entry_mut(&mut self, endpoint: &str, name: &str) -> Option<&mut NameEntry> {
        let known = self
            .entries
            .get(endpoint)
            .is_some_and(|names| names.contains_key(name));
        if !known {
            self.entries
                .entry(endpoint.to_string())
                .or_default()
                .insert(name.to_string(), NameEntry::default());
        }
        self.entries
            .get_mut(endpoint)
            .and_then(|names| names.get_mut(name))
    }

    /// Whether an IP expired by `now_ms` or a zombie waits: whether [`FqdnCache::collect`]
    /// has anything to do.
    pub fn has_expired(&self, now_ms: u64) -> bool {
        self.entries
            .values()
            .flat_map(|names| names.values())
            .any(|e| !e.zombies.is_empty() || e.ips.iter().any(|ip| ip.expires_ms <= now_ms))
    }

    /// Turns expired IPs into zombies and removes the zombies no live connection uses.
    pub fn collect(&mut self, now_ms: u64, in_use: impl Fn(IpAddr) -> bool) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (endpoint, names) in &mut self.entries {
            for (name, entry) in names.iter_mut() {
                let (expired, live): (Vec<IpEntry>, Vec<IpEntry>) =
                    entry.ips.iter().partition(|e| e.expires_ms <= now_ms);
                entry.ips = live;
                entry.zombies.extend(expired);
                entry.zombies.retain(|z| {
                    let keep = in_use(z.ip);
                    if !keep {
                        removed.push(Removed {
                            endpoint: endpoint.clone(),
                            name: name.clone(),
                            ip: z.ip,
                        });
                    }
                    keep
                });
            }
            names.retain(|_, e| !e.ips.is_empty() || !e.zombies.is_empty());
        }
        self.entries.retain(|_, names| !names.is_empty());
        self.recount();
        removed
    }

    /// Counts the live IPs again (after a change of many entries at once).
    fn recount(&mut self) {
        self.live = self
            .entries
            .values()
            .flat_map(|names| names.values())
            .map(|e| e.ips.len())
            .sum();
    }

    /// The live IPs of a name for an endpoint, oldest first.
    pub fn ips(&self, endpoint: &str, name: &str) -> Vec<IpAddr> {
        self.entry(endpoint, name)
            .map(|e| e.ips.iter().map(|e| e.ip).collect())
            .unwrap_or_default()
    }

    /// The live IPs of a name with when each expires (ms since the Unix epoch).
    pub fn expiries(&self, endpoint: &str, name: &str) -> Vec<(IpAddr, u64)> {
        self.entry(endpoint, name)
            .map(|e| e.ips.iter().map(|e| (e.ip, e.expires_ms)).collect())
            .unwrap_or_default()
    }

    /// Live IPs and zombies of a name: everything the datapath still holds.
    pub fn held_ips(&self, endpoint: &str, name: &str) -> Vec<IpAddr> {
        self.entry(endpoint, name)
            .map(|e| e.ips.iter().chain(&e.zombies).map(|e| e.ip).collect())
            .unwrap_or_default()
    }

    pub fn entry(&self, endpoint: &str, name: &str) -> Option<&NameEntry> {
        self.entries.get(endpoint)?.get(name)
    }

    /// The endpoints with names in the cache.
    pub fn endpoints(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// One endpoint's names, as [`FqdnCache::snapshot`] holds them.
    pub fn snapshot_endpoint(&self, endpoint: &str) -> Option<BTreeMap<String, NameEntry>> {
        let names = self.entries.get(endpoint)?;
        Some(names.iter().map(|(n, e)| (n.clone(), e.clone())).collect())
    }

    /// A sorted copy of the content (persistence).
    pub fn snapshot(&self) -> Entries {
        self.entries
            .keys()
            .filter_map(|e| Some((e.clone(), self.snapshot_endpoint(e)?)))
            .collect()
    }

    /// How many names the cache holds, over all endpoints.
    pub fn names(&self) -> usize {
        self.entries.values().map(HashMap::len).sum()
    }

    /// Keeps the names for which `selectors` (the toFQDNs selectors matching a name)
    /// is not empty, recording those selectors; returns how many names left.
    pub fn retain_selected<'m>(&mut self, selectors: impl Fn(&str) -> Vec<&'m str>) -> usize {
        let mut dropped = 0;
        for names in self.entries.values_mut() {
            names.retain(|name, e| {
                let now = selectors(name);
                if now.is_empty() {
                    dropped += 1;
                    return false;
                }
                if e.selectors
                    .iter()
                    .map(String::as_str)
                    .ne(now.iter().copied())
                {
                    e.selectors = now.iter().map(|s| s.to_string()).collect();
                }
                true
            });
        }
        self.entries.retain(|_, names| !names.is_empty());
        self.recount();
        dropped
    }

    /// Replaces the content (restore at start).
    pub fn restore(&mut self, entries: Entries) {
        self.entries = entries
            .into_iter()
            .map(|(endpoint, names)| (endpoint, names.into_iter().collect()))
            .collect();
        self.recount();
        self.enforce_node_limit();
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for names in self.entries.values() {
            for e in names.values() {
                s.names += usize::from(!e.ips.is_empty());
                s.ips += e.ips.len();
                s.zombies += e.zombies.len();
            }
        }
        s
    }
}

/// Refreshes `ips` in `entry` (they become the newest, live until `ttl` from `now_ms`)
/// and turns the oldest past `max` into zombies, which it returns.
/// Refreshes `ips` in `entry`; returns the IPs evicted past `max`, and whether some live
/// IP now expires sooner than before.
fn refresh(
    entry: &mut NameEntry,
    max: usize,
    ips: &[IpAddr],
    ttl: u32,
    now_ms: u64,
) -> (Vec<IpAddr>, bool) {
    let expires_ms = now_ms.saturating_add(u64::from(ttl) * 1000);
    let sooner = entry
        .ips
        .iter()
        .any(|e| e.expires_ms > expires_ms && ips.contains(&e.ip));
    for &ip in ips {
        entry.ips.retain(|e| e.ip != ip);
        entry.zombies.retain(|e| e.ip != ip);
        entry.ips.push(IpEntry {
            ip,
            learned_ms: now_ms,
            expires_ms,
        });
    }
    let mut evicted = Vec::new();
    if entry.ips.len() > max {
        let n = entry.ips.len() - max;
        for e in entry.ips.drain(..n) {
            evicted.push(e.ip);
            entry.zombies.push(e);
        }
    }
    (evicted, sooner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_limit_makes_the_oldest_of_the_node_zombies() {
        let mut c = FqdnCache::with_limits(10, 4);
        let sel = ["*.app.test."];
        let (a, b, d, e, f) = (
            ip("192.0.2.1"),
            ip("192.0.2.2"),
            ip("192.0.2.3"),
            ip("192.0.2.4"),
            ip("192.0.2.5"),
        );
        c.learn_under("ns/one", "x.app.test.", &[a], &sel, 60, 1_000);
        c.learn_under("ns/two", "y.app.test.", &[b], &sel, 60, 2_000);
        c.learn_under("ns/one", "z.app.test.", &[d, e], &sel, 60, 3_000);
        assert_eq!(c.live_ips(), 4);
        // a fifth IP for another endpoint: the node's oldest (a, of ns/one) goes
        let l = c.learn_under("ns/two", "w.app.test.", &[f], &sel, 60, 4_000);
        assert_eq!(l.node_evicted, 1);
        assert!(l.evicted.is_empty(), "no per-name eviction");
        assert_eq!(c.live_ips(), 4);
        assert!(c.ips("ns/one", "x.app.test.").is_empty());
        assert_eq!(c.held_ips("ns/one", "x.app.test."), vec![a], "a zombie");
        assert_eq!(c.ips("ns/two", "w.app.test."), vec![f]);
        // the zombie leaves at the next sweep when no connection uses it
        let removed = c.collect(5_000, |_| false);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].ip, a);
        assert_eq!(c.live_ips(), 4);
        assert_eq!(c.stats().ips, 4);
    }

    #[test]
    fn node_limit_holds_over_many_names_and_evicts_in_age_order() {
        let mut c = FqdnCache::with_limits(1_000, 1_000);
        let mut peak = 0;
        for i in 0..1_500u32 {
            let ip = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            c.learn("ns/p", &format!("h{i}.app.test."), &[ip], 60, u64::from(i));
            peak = peak.max(c.live_ips());
            assert_eq!(c.live_ips(), c.stats().ips, "the count follows the entries");
        }
        assert_eq!(peak, 1_000, "never over the limit");
        // what is left live is the newest learned, and every older one is a zombie
        let oldest_live = (0..1_500u32)
            .find(|i| !c.ips("ns/p", &format!("h{i}.app.test.")).is_empty())
            .unwrap();
        assert!((1_500 - oldest_live) as usize <= 1_000);
        for i in 0..oldest_live {
            assert_eq!(c.held_ips("ns/p", &format!("h{i}.app.test.")).len(), 1);
        }
        assert_eq!(c.stats().zombies, oldest_live as usize);
        // no limit: nothing evicted
        let mut c = FqdnCache::new(1_000);
        for i in 0..1_500u32 {
            let ip = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            c.learn("ns/p", &format!("h{i}.app.test."), &[ip], 60, u64::from(i));
        }
        assert_eq!((c.live_ips(), c.stats().zombies), (1_500, 0));
    }

    #[test]
    fn a_restored_cache_over_the_node_limit_is_cut_down() {
        let mut c = FqdnCache::new(10);
        for i in 0..10u8 {
            c.learn(
                "ns/p",
                &format!("h{i}."),
                &[IpAddr::from([10, 0, 0, i])],
                60,
                u64::from(i),
            );
        }
        let mut small = FqdnCache::with_limits(10, 5);
        small.restore(c.snapshot());
        assert!(small.live_ips() <= 5);
        assert_eq!(small.live_ips(), small.stats().ips);
        assert_eq!(small.ips("ns/p", "h9."), vec![IpAddr::from([10, 0, 0, 9])]);
        assert!(small.ips("ns/p", "h0.").is_empty());
    }

    #[test]
    fn learning_says_when_a_live_ip_now_expires_sooner() {
        let mut c = FqdnCache::new(10);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let sel = ["*.app.test."];
        let l = c.learn_under("app/client", "x.app.test.", &[a], &sel, 60, 1_000);
        assert!(!l.sooner, "nothing was live");
        // Later, a longer expiry: not sooner; a new IP: not sooner.
        let l = c.learn_under("app/client", "x.app.test.", &[a, b], &sel, 60, 2_000);
        assert!(!l.sooner);
        // A lower TTL for a live IP: it now expires sooner.
        let l = c.learn_under("app/client", "x.app.test.", &[b], &sel, 10, 3_000);
        assert!(l.sooner);
        assert!(!c.holds("app/client", "x.app.test.", &[b], 14_000));
    }

    #[test]
    fn holds_only_live_ips_under_selectors_until_the_given_time() {
        let mut c = FqdnCache::new(2);
        let (a, b, d) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        // Learned without selectors (no toFQDNs selector): not held for the datapath.
        c.learn("ns/a", "plain.", &[a], 60, 0);
        assert!(!c.holds("ns/a", "plain.", &[a], 0));
        c.learn_under("ns/a", "x.", &[a, b], &["sel"], 60, 0);
        assert!(c.holds("ns/a", "x.", &[a, b], 60_000));
        assert!(c.holds("ns/a", "x.", &[b], 1));
        // Not past its expiry, not another IP, name or endpoint.
        assert!(!c.holds("ns/a", "x.", &[a, b], 60_001));
        assert!(!c.holds("ns/a", "x.", &[a, d], 0));
        assert!(!c.holds("ns/a", "y.", &[a], 0));
        assert!(!c.holds("ns/b", "x.", &[a], 0));
        // An evicted IP (a zombie) is no longer held for new answers.
        c.learn_under("ns/a", "x.", &[d], &["sel"], 60, 1);
        assert!(!c.holds("ns/a", "x.", &[a], 0));
        assert!(c.holds("ns/a", "x.", &[b, d], 0));
    }

    #[test]
    fn limit_evicts_the_oldest_into_zombies() {
        let mut c = FqdnCache::new(2);
        assert!(c.learn("ns/a", "x.", &[ip("192.0.2.1")], 60, 0).is_empty());
        assert!(c.learn("ns/a", "x.", &[ip("192.0.2.2")], 60, 1).is_empty());
        // refreshing .1 makes .2 the oldest
        assert!(c.learn("ns/a", "x.", &[ip("192.0.2.1")], 60, 2).is_empty());
        assert_eq!(
            c.learn("ns/a", "x.", &[ip("192.0.2.3")], 60, 3),
            vec![ip("192.0.2.2")]
        );
        assert_eq!(c.ips("ns/a", "x."), vec![ip("192.0.2.1"), ip("192.0.2.3")]);
        assert_eq!(c.stats().zombies, 1);
        let removed = c.collect(4, |_| false);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].ip, ip("192.0.2.2"));
    }

    #[test]
    fn expired_in_use_ips_are_kept() {
        let mut c = FqdnCache::new(10);
        assert!(!c.has_expired(0));
        c.learn("ns/a", "x.", &[ip("192.0.2.1"), ip("192.0.2.2")], 1, 0);
        assert!(!c.has_expired(999));
        assert!(c.has_expired(1000));
        assert!(c.collect(999, |_| false).is_empty());
        let removed = c.collect(1000, |i| i == ip("192.0.2.1"));
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].ip, ip("192.0.2.2"));
        assert!(c.ips("ns/a", "x.").is_empty());
        assert_eq!(c.held_ips("ns/a", "x."), vec![ip("192.0.2.1")]);
        assert!(
            c.has_expired(1000),
            "a zombie waits for its connection to end"
        );
        // learned again: live again
        c.learn("ns/a", "x.", &[ip("192.0.2.1")], 1, 2000);
        assert_eq!(
            c.stats(),
            Stats {
                names: 1,
                ips: 1,
                zombies: 0
            }
        );
        assert_eq!(c.collect(5000, |_| false).len(), 1);
        assert!(c.snapshot().is_empty());
        assert!(!c.has_expired(5000));
    }

    #[test]
    fn learn_under_says_whether_the_datapath_held_the_ips() {
        let mut c = FqdnCache::new(10);
        let one = [ip("192.0.2.1")];
        let l = c.learn_under("ns/a", "x.app.", &one, &["*.app."], 60, 0);
        assert_eq!((l.covered, l.evicted.len()), (false, 0), "a new name");
        assert_eq!(c.entry("ns/a", "x.app.").unwrap().selectors, ["*.app."]);
        let l = c.learn_under("ns/a", "x.app.", &one, &["*.app."], 60, 1000);
        assert!(l.covered, "same IP, same selectors");
        assert_eq!(c.entry("ns/a", "x.app.").unwrap().ips[0].expires_ms, 61_000);
        let l = c.learn_under("ns/a", "x.app.", &one, &["*.app.", "x.app."], 60, 2000);
        assert!(!l.covered, "another selector matches now");
        assert_eq!(
            c.entry("ns/a", "x.app.").unwrap().selectors,
            ["*.app.", "x.app."]
        );
        let two = [ip("192.0.2.1"), ip("192.0.2.2")];
        let l = c.learn_under("ns/a", "x.app.", &two, &["*.app.", "x.app."], 60, 3000);
        assert!(!l.covered, "a new IP");
        let l = c.learn_under("ns/b", "x.app.", &one, &["*.app.", "x.app."], 60, 3000);
        assert!(!l.covered, "known to another endpoint only");
        let mut small = FqdnCache::new(1);
        small.learn_under("ns/a", "x.app.", &one, &["*.app."], 60, 0);
        let l = small.learn_under("ns/a", "x.app.", &[ip("192.0.2.2")], &["*.app."], 60, 1);
        assert_eq!(l.evicted, vec![ip("192.0.2.1")]);
    }

    #[test]
    fn names_follow_the_selectors() {
        let mut c = FqdnCache::new(10);
        c.learn_under(
            "ns/a",
            "x.app.",
            &[ip("192.0.2.1")],
            &["*.app.", "x.app."],
            60,
            0,
        );
        c.learn("ns/b", "y.gone.", &[ip("192.0.2.2")], 60, 0);
        let dropped = c.retain_selected(|name| match name {
            "x.app." => vec!["*.app."],
            _ => Vec::new(),
        });
        assert_eq!(dropped, 1);
        assert!(!c.snapshot().contains_key("ns/b"), "no empty endpoint left");
        assert_eq!(
            c.entry("ns/a", "x.app.").unwrap().selectors,
            vec!["*.app.".to_string()]
        );
        assert_eq!(c.ips("ns/a", "x.app."), vec![ip("192.0.2.1")]);
    }
}
