//! IPs learned from DNS answers: the DNS proxy hands them over as `Update`s through the
//! DNS lane (`super::dns`); the policy publisher keeps them as `DnsObservation`s merged
//! into the cluster it compiles, pushes, and only then confirms, so an answer reaches the
//! pod after its IPs are enforced. The observations are saved in the state directory
//! after every round of changes (the round's names appended to a journal, `journal`), so
//! a restarted agent enforces what it learned before its first push.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use dns_proxy::Update;
use policy_model::cluster::DnsObservation;

use super::journal::Journaled;

/// endpoint (`ns/pod`) -> name -> IPs. Persistent maps (`imbl`): every model the
/// publisher hands out carries a copy to the status, which then costs nothing.
pub type Learned = imbl::OrdMap<String, imbl::OrdMap<String, BTreeSet<IpAddr>>>;

/// The learned names and IPs, with their file.
#[derive(Debug, Default)]
pub struct Observations {
    pub learned: Learned,
    file: Option<Journaled>,
    /// (endpoint, name) changed since the last save.
    dirty: BTreeSet<(String, String)>,
}

/// One saved round: each (endpoint, name) changed, with all its IPs (none: forgotten).
type Round = Vec<(String, String, BTreeSet<IpAddr>)>;

const FILE: &str = "fqdn-observations.json";

impl Observations {
    /// Loads `<dir>/fqdn-observations.json` (absent: nothing learned) and merges the
    /// DNS proxy's persisted cache, which may know names this file missed.
    pub fn load(dir: &Path, dns_state: &Path) -> Observations {
        let mut file = Journaled::new(dir, FILE);
        let (snapshot, rounds) = file.load::<Learned, Round>();
        let mut learned = snapshot.unwrap_or_default();
        for (endpoint, name, ips) in rounds.into_iter().flatten() {
            set(&mut learned, endpoint, name, ips);
        }
        if let Ok(entries) = dns_proxy::persist::load(dns_state) {
            for (endpoint, names) in entries {
                for (name, e) in names {
                    learned
                        .entry(endpoint.clone())
                        .or_default()
                        .entry(name)
                        .or_default()
                        .extend(e.ips.iter().chain(&e.zombies).map(|e| e.ip));
                }
            }
        }
        Observations {
            learned,
            file: Some(file),
            dirty: BTreeSet::new(),
        }
    }

    /// Applies an update; returns whether anything changed.
    pub fn apply(&mut self, u: &Update) -> bool {
        let before = self
            .learned
            .get(&u.endpoint)
            .and_then(|n| n.get(&u.name))
            .cloned();
        let names = self.learned.entry(u.endpoint.clone()).or_default();
        let ips = names.entry(u.name.clone()).or_default();
        for s in &u.add {
            ips.extend(s.ips.iter().copied());
        }
        // An IP leaves when a removal names it and no addition of the same update keeps it.
        let added: BTreeSet<IpAddr> = u.add.iter().flat_map(|s| s.ips.iter().copied()).collect();
        for s in &u.remove {
            for ip in &s.ips {
                if !added.contains(ip) {
                    ips.remove(ip);
                }
            }
        }
        let after = if ips.is_empty() {
            names.remove(&u.name);
            None
        } else {
            Some(ips.clone())
        };
        if names.is_empty() {
            self.learned.remove(&u.endpoint);
        }
        let changed = before != after;
        if changed {
            self.dirty.insert((u.endpoint.clone(), u.name.clone()));
        }
        changed
    }

    /// The observations for the compiler.
    pub fn to_cluster(&self) -> Vec<DnsObservation> {
        self.learned
            .iter()
            .flat_map(|(endpoint, names)| {
                names.iter().map(move |(name, ips)| DnsObservation {
                    client: endpoint.clone(),
                    name: name.clone(),
                    ips: ips.iter().copied().collect(),
                })
            })
            .collect()
    }

    pub fn names(&self) -> usize {
        self.learned.values().map(imbl::OrdMap::len).sum()
    }

    /// Saves what changed since the last save: appended to the journal, or the whole
    /// (temporary file, then rename) when the journal has outgrown it. Without a file
    /// (the tests' `Default`) there is nothing to save and nothing is kept for it.
    pub fn save(&mut self) -> std::io::Result<()> {
        let Some(file) = &mut self.file else {
            self.dirty.clear();
            return Ok(());
        };
        if self.dirty.is_empty() {
            return Ok(());
        }
        let round: Round = self
            .dirty
            .iter()
            .map(|(endpoint, name)| {
                let ips = self
                    .learned
                    .get(endpoint)
                    .and_then(|n| n.get(name))
                    .cloned()
                    .unwrap_or_default();
                (endpoint.clone(), name.clone(), ips)
            })
            .collect();
        let learned = &self.learned;
        file.append(&round, || learned)?;
        self.dirty.clear();
        Ok(())
    }
}

/// Sets the IPs of `name` for `endpoint` (none: forgets the name).
fn set(learned: &mut Learned, endpoint: String, name: String, ips: BTreeSet<IpAddr>) {
    if ips.is_empty() {
        if let Some(names) = learned.get_mut(&endpoint) {
            names.remove(&name);
            if names.is_empty() {
                learned.remove(&endpoint);
            }
        }
    } else {
        learned.entry(endpoint).or_default().insert(name, ips);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dns_proxy::SelectorIps;

    fn sel(ips: &[&str]) -> SelectorIps {
        SelectorIps {
            selector: "x.example.".into(),
            label: "fqdn:x".into(),
            ips: ips.iter().filter_map(|s| s.parse().ok()).collect(),
        }
    }

    #[test]
    fn updates_add_and_remove_and_report_changes() {
        let mut o = Observations::default();
        let mut u = Update {
            endpoint: "a/p".into(),
            name: "x.example.".into(),
            add: vec![sel(&["203.0.113.1"])],
            remove: vec![],
        };
        assert!(o.apply(&u));
        assert!(!o.apply(&u), "same again: no change");
        assert_eq!(o.to_cluster().len(), 1);
        u.add.clear();
        u.remove = vec![sel(&["203.0.113.1"])];
        assert!(o.apply(&u));
        assert!(o.learned.is_empty());
        assert!(o.to_cluster().is_empty());
    }

    #[test]
    fn without_a_file_saving_keeps_no_list_of_changes() {
        let mut o = Observations::default();
        for k in 0..100u8 {
            let u = Update {
                endpoint: "a/p".into(),
                name: format!("n{k}.example."),
                add: vec![sel(&["203.0.113.1"])],
                remove: vec![],
            };
            assert!(o.apply(&u));
        }
        assert_eq!(o.dirty.len(), 100);
        o.save().expect("nothing to write");
        assert!(o.dirty.is_empty(), "{} changes kept", o.dirty.len());
    }
}

#[cfg(test)]
mod saved {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use dns_proxy::SelectorIps;

    fn update(endpoint: &str, name: &str, add: &[String], remove: &[String]) -> Update {
        let sel = |ips: &[String]| SelectorIps {
            selector: name.into(),
            label: format!("fqdn:{name}"),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        };
        Update {
            endpoint: endpoint.into(),
            name: name.into(),
            add: vec![sel(add)],
            remove: vec![sel(remove)],
        }
    }

    #[test]
    fn a_reload_finds_every_saved_round_through_snapshots_and_journal() {
        let dir = tempfile::tempdir().unwrap();
        let dns_state = dir.path().join("no-dns-cache");
        let mut o = Observations::load(dir.path(), &dns_state);
        for i in 0..8_000u32 {
            let ip = |k: u32| format!("10.{}.{}.{}", k / 65536 % 256, k / 256 % 256, k % 256);
            let endpoint = format!("ns/pod-{}", i % 7);
            let name = format!("n{}.example.", i % 50);
            // each name keeps its two latest IPs; every tenth round forgets a name
            let u = if i % 10 == 9 {
                let gone: Vec<String> = o
                    .learned
                    .get(&endpoint)
                    .and_then(|n| n.get(&name))
                    .map(|s| s.iter().map(ToString::to_string).collect())
                    .unwrap_or_default();
                update(&endpoint, &name, &[], &gone)
            } else {
                update(&endpoint, &name, &[ip(i)], &[ip(i.saturating_sub(14))])
            };
            o.apply(&u);
            o.save().unwrap();
            if i % 500 == 0 {
                assert_eq!(
                    Observations::load(dir.path(), &dns_state).learned,
                    o.learned
                );
            }
        }
        assert!(o.names() > 0);
        assert_eq!(
            Observations::load(dir.path(), &dns_state).learned,
            o.learned
        );
    }
}
