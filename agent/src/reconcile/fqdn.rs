//! IPs learned from DNS answers: the DNS proxy hands them over as `Update`s through the
//! DNS lane (`super::dns`); the policy publisher keeps them as `DnsObservation`s merged
//! into the cluster it compiles, pushes, and only then confirms, so an answer reaches the
//! pod after its IPs are enforced. The observations are saved in the state directory
//! after every round of changes, so a restarted agent enforces what it learned before its
//! first push.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use dns_proxy::Update;
use policy_model::cluster::DnsObservation;

/// endpoint (`ns/pod`) -> name -> IPs. Persistent maps (`imbl`): every model the
/// publisher hands out carries a copy to the status, which then costs nothing.
pub type Learned = imbl::OrdMap<String, imbl::OrdMap<String, BTreeSet<IpAddr>>>;

/// The learned names and IPs, with their file.
#[derive(Debug, Default)]
pub struct Observations {
    pub learned: Learned,
    file: Option<PathBuf>,
}

const FILE: &str = "fqdn-observations.json";

impl Observations {
    /// Loads `<dir>/fqdn-observations.json` (absent: nothing learned) and merges the
    /// DNS proxy's persisted cache, which may know names this file missed.
    pub fn load(dir: &Path, dns_state: &Path) -> Observations {
        let file = dir.join(FILE);
        let mut learned: Learned = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
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
        before != after
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

    /// Writes the file (atomically: temporary file, then rename).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension("json.tmp");
        let body = serde_json::to_vec(&self.learned).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, file)
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
}
