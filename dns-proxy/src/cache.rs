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
}

#[derive(Clone, Debug)]
pub struct FqdnCache {
    max_ips_per_name: usize,
    entries: Live,
}

impl FqdnCache {
    pub fn new(max_ips_per_name: usize) -> FqdnCache {
        FqdnCache {
            max_ips_per_name: max_ips_per_name.max(1),
            entries: Live::new(),
        }
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
        match self.entry_mut(endpoint, name) {
            Some(entry) => refresh(entry, max, ips, ttl, now_ms).0,
            None => Vec::new(),
        }
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
        let (evicted, sooner) = refresh(entry, max, ips, ttl, now_ms);
        Learned {
            covered,
            evicted,
            sooner,
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
        removed
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

    /// A sorted copy of the content (persistence).
    pub fn snapshot(&self) -> Entries {
        self.entries
            .iter()
            .map(|(endpoint, names)| {
                let names = names.iter().map(|(n, e)| (n.clone(), e.clone()));
                (endpoint.clone(), names.collect())
            })
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
        dropped
    }

    /// Replaces the content (restore at start).
    pub fn restore(&mut self, entries: Entries) {
        self.entries = entries
            .into_iter()
            .map(|(endpoint, names)| (endpoint, names.into_iter().collect()))
            .collect();
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
