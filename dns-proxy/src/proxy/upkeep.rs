//! The cache's upkeep: expiry of IPs no connection uses, persistence to the state
//! directory, and restore after a restart.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use policy_model::identity::fqdn_key;

use crate::persist::{self, PersistError};
use crate::sink::{SelectorIps, Update};

use super::{now_ms, Proxy};

impl Proxy {
    /// Expires IPs whose TTL ran out and that no live connection uses, and tells the
    /// datapath. Returns how many IPs left. The live connections are read once, before
    /// the cache is locked, and only when something has expired; such a sweep is timed
    /// (`ward_dns_cache_sweep_seconds`).
    pub async fn collect(&self) -> usize {
        let now = now_ms(SystemTime::now());
        if !self.cache().has_expired(now) {
            return 0;
        }
        let _timer = self.inner.metrics.sweep_seconds.start_timer();
        let in_use = self.inner.in_use.clone();
        let live = match tokio::task::spawn_blocking(move || in_use.live_ips()).await {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => {
                tracing::warn!("reading the live connections, expiry skipped: {e}");
                return 0;
            }
            Err(e) => {
                tracing::warn!("reading the live connections, expiry skipped: {e}");
                return 0;
            }
        };
        let removed = {
            let mut cache = self.cache();
            let removed = cache.collect(now, |ip| live.contains(&ip));
            if !removed.is_empty() {
                self.moved();
            }
            removed
        };
        if removed.is_empty() {
            return 0;
        }
        self.inner.dirty.store(true, Ordering::Relaxed);
        self.inner.metrics.expirations.inc_by(removed.len() as u64);
        let mut grouped: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
        for r in &removed {
            grouped
                .entry((r.endpoint.clone(), r.name.clone()))
                .or_default()
                .push(r.ip);
        }
        let model = self.inner.policy.current();
        let slice = match self.inner.config.sweep_slice {
            0 => grouped.len().max(1),
            n => n,
        };
        let mut removals = grouped.into_iter().peekable();
        // A slice's removals are queued together (the datapath takes them in one round),
        // and the next slice waits for them: answers queued meanwhile go in between.
        while removals.peek().is_some() {
            let queued: Vec<_> = removals
                .by_ref()
                .take(slice)
                .map(|((endpoint, name), ips)| {
                    let update = removal(&model, endpoint, name.clone(), ips);
                    self.queue_update(&name, update)
                })
                .collect();
            for mut done in queued {
                let _ = done.wait_for(|d| *d).await;
            }
        }
        removed.len()
    }

    /// Writes the cache to the state directory when it changed since the last write.
    pub fn persist(&self) -> Result<bool, PersistError> {
        let Some(dir) = &self.inner.config.state_dir else {
            return Ok(false);
        };
        if !self.inner.dirty.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        // An endpoint at a time: the cache's lock is held for one endpoint's names, not
        // for a copy of the whole cache (queries wait on it).
        let mut entries = crate::cache::Entries::new();
        let endpoints = self.cache().endpoints();
        for endpoint in endpoints {
            let names = self.cache().snapshot_endpoint(&endpoint);
            if let Some(names) = names.filter(|n| !n.is_empty()) {
                entries.insert(endpoint, names);
            }
        }
        persist::save(dir, &entries).inspect_err(|_| {
            self.inner.dirty.store(true, Ordering::Relaxed);
            self.inner.metrics.persist_errors.inc();
        })?;
        Ok(true)
    }

    /// Loads the cache from the state directory and hands every restored IP to the
    /// datapath again (it may have been rebuilt). Returns the number of names restored.
    pub async fn restore(&self) -> Result<usize, PersistError> {
        let Some(dir) = &self.inner.config.state_dir else {
            return Ok(0);
        };
        let entries = persist::load(dir)?;
        let model = self.inner.policy.current();
        let mut updates = Vec::new();
        for (endpoint, names) in &entries {
            for (name, e) in names {
                let ips: Vec<IpAddr> = e.ips.iter().chain(&e.zombies).map(|e| e.ip).collect();
                let add: Vec<SelectorIps> = model
                    .fqdn_selectors_matching(name)
                    .into_iter()
                    .map(|s| SelectorIps {
                        selector: s.to_string(),
                        label: fqdn_key(s, endpoint).to_string(),
                        ips: ips.clone(),
                    })
                    .collect();
                if !add.is_empty() {
                    updates.push(Update {
                        endpoint: endpoint.clone(),
                        name: name.clone(),
                        add,
                        remove: Vec::new(),
                    });
                }
            }
        }
        {
            let mut cache = self.cache();
            cache.restore(entries);
            self.moved();
        }
        // What the policy no longer selects is not restored.
        self.follow_selectors(&model);
        let count = self.cache().names();
        let queued: Vec<_> = updates
            .into_iter()
            .map(|u| {
                let name = u.name.clone();
                self.queue_update(&name, u)
            })
            .collect();
        for mut done in queued {
            let _ = done.wait_for(|d| *d).await;
        }
        Ok(count)
    }

    /// Runs expiry and persistence every `maintenance_interval` until the proxy is
    /// dropped by everyone else.
    pub fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let every = self
            .inner
            .config
            .maintenance_interval
            .max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let proxy = Proxy { inner };
                proxy.collect().await;
                let p = proxy.clone();
                match tokio::task::spawn_blocking(move || p.persist()).await {
                    Ok(Err(e)) => tracing::warn!("persisting the FQDN cache: {e}"),
                    Ok(Ok(_)) => {}
                    Err(e) => tracing::warn!("persist task: {e}"),
                }
            }
        })
    }
}

/// The update that takes `ips` of `name` away from `endpoint`'s selectors matching it.
fn removal(
    model: &policy_model::Model,
    endpoint: String,
    name: String,
    ips: Vec<IpAddr>,
) -> Update {
    Update {
        remove: model
            .fqdn_selectors_matching(&name)
            .into_iter()
            .map(|s| SelectorIps {
                selector: s.to_string(),
                label: fqdn_key(s, &endpoint).to_string(),
                ips: ips.clone(),
            })
            .collect(),
        endpoint,
        name,
        add: Vec::new(),
    }
}
