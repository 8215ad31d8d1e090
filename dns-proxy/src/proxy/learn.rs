//! Learning from an answer: its IPs into the cache under the toFQDNs selectors that
//! match its name, the datapath updates queued per name in order, and the bounded wait
//! for their confirmation before the answer is released.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use policy_model::identity::fqdn_key;
use tokio::sync::watch;

use crate::known::Known;
use crate::policy::Resolved;
use crate::sink::{SelectorIps, Update};

use crate::audit::AuditRecord;
use crate::read::Learned;

use super::early::{Held, HELD_MARGIN_MS};
use super::{Asked, Proxy};

/// What learning an answer left to do ([`Proxy::learn`]).
pub(super) enum Learning {
    /// Nothing: no IPs, no endpoint, or the datapath confirmed without a wait.
    Done,
    /// The datapath held every IP already: the answer leaves first, and this refresh of
    /// the cache follows it.
    Late(LateHandOff),
    /// Datapath updates the answer waits for ([`Proxy::await_datapath`]).
    Wait(Vec<watch::Receiver<bool>>),
}

/// What the datapath hand-off of one answer came to.
pub(super) struct HandOff {
    pub(super) selectors: Vec<String>,
    /// Known without waiting: `Some(true)` when the datapath already had everything,
    /// `None` when no selector matched.
    pub(super) confirmed: Option<bool>,
    /// The updates to wait for ([`Proxy::await_datapath`]), when any was queued.
    pub(super) waits: Option<Vec<watch::Receiver<bool>>>,
}

/// The hand-off of an answer whose IPs the datapath already held: run after the reply
/// ([`Proxy::record`]), or when dropped, so that a query dropped on its way still
/// refreshes the cache. It only moves the expiry: nothing is queued for the datapath
/// unless the cache changed since the check.
pub(super) struct LateHandOff {
    pub(super) proxy: Proxy,
    /// The connection's policy, whose endpoint learned the answer (shared, not copied:
    /// this is built on the answer's way out).
    pub(super) resolved: Arc<Resolved>,
    /// The question name and the answer's IPs, moved here; the audit record takes them
    /// back once the hand-off ran ([`Proxy::record`]).
    pub(super) qname: String,
    pub(super) cname_targets: Vec<String>,
    pub(super) ips: Vec<IpAddr>,
    /// The known answer the reply repeated, whose IPs these are (then `ips` is empty).
    pub(super) known: Option<Arc<Known>>,
    pub(super) ttl: u32,
    pub(super) now_ms: u64,
    pub(super) done: bool,
}

impl LateHandOff {
    pub(super) fn run(&mut self) -> Option<HandOff> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        let endpoint = self.resolved.endpoint.as_deref()?;
        let ips = match &self.known {
            Some(k) => &k.ips,
            None => &self.ips,
        };
        let h = self.proxy.hand_off(
            endpoint,
            &self.qname,
            &self.cname_targets,
            ips,
            self.ttl,
            self.now_ms,
        );
        if h.waits.is_some() {
            tracing::debug!(
                endpoint,
                name = self.qname,
                "the cache changed between the check and the refresh; datapath update queued"
            );
        }
        Some(h)
    }
}

impl Drop for LateHandOff {
    fn drop(&mut self) {
        self.run();
    }
}

impl std::fmt::Debug for LateHandOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateHandOff")
            .field("endpoint", &self.resolved.endpoint)
            .field("qname", &self.qname)
            .field("ips", &self.ips)
            .field("done", &self.done)
            .finish()
    }
}

impl Proxy {
    /// Whether the datapath holds every IP of an answer already, for the question name
    /// and each of `cname_targets`, for [`HELD_MARGIN_MS`] more at least, with no update
    /// of these names in flight: then the answer can leave before the hand-off, which
    /// only refreshes the expiry. What [`FqdnCache::learn_under`] calls covered, checked
    /// without computing the names' selectors (see [`FqdnCache::holds`]).
    pub(super) fn datapath_holds(
        &self,
        endpoint: &str,
        qname: &str,
        cname_targets: &[String],
        ips: &[IpAddr],
        now_ms: u64,
    ) -> bool {
        // Lock order as in `hand_off`: chains, then cache.
        let chains = self.chains();
        let cache = self.cache();
        let until_ms = now_ms.saturating_add(HELD_MARGIN_MS);
        std::iter::once(qname)
            .chain(cname_targets.iter().map(String::as_str))
            .all(|name| !chains.contains_key(name) && cache.holds(endpoint, name, ips, until_ms))
    }

    /// Records the IPs and queues the datapath updates for every selector matching the
    /// question name and each of `cname_targets`; the caller then waits for them
    /// ([`Proxy::await_datapath`]) when any was queued.
    pub(super) fn hand_off(
        &self,
        endpoint: &str,
        qname: &str,
        cname_targets: &[String],
        ips: &[IpAddr],
        ttl: u32,
        now_ms: u64,
    ) -> HandOff {
        let mut waits = Vec::new();
        let mut all_selectors: Vec<String> = Vec::new();
        let mut any_selector = false;
        // The selectors only go to the audit record: not built without an audit output.
        let audit = self.inner.audit.enabled();
        let names = std::iter::once(qname).chain(cname_targets.iter().map(String::as_str));
        for name in names {
            // Lock order: chains, then cache. The selectors come from the current model,
            // read under the cache lock: `set_model` swaps and prunes under it too, so an
            // answer matched against selectors that just left is not learned after the
            // prune.
            let mut chains = self.chains();
            let mut cache = self.cache();
            let model = self.inner.policy.current();
            let selectors = model.fqdn_selectors_matching(name);
            if selectors.is_empty() {
                // Selected by no toFQDNs rule: nothing for the datapath (Cilium #30110).
                continue;
            }
            any_selector = true;
            if audit {
                for s in &selectors {
                    if !all_selectors.iter().any(|a| a == s) {
                        all_selectors.push(s.to_string());
                    }
                }
            }
            let learned = cache.learn_under(endpoint, name, ips, &selectors, ttl, now_ms);
            if learned.sooner || !learned.evicted.is_empty() || learned.node_evicted > 0 {
                // IPs others may have counted on leave sooner.
                self.moved();
            }
            drop(cache);
            if learned.node_evicted > 0 {
                let n = learned.node_evicted as u64;
                self.inner.metrics.node_evictions.inc_by(n);
                tracing::debug!(evicted = n, "per-node IP limit reached");
            }
            let (known, evicted) = (learned.covered, learned.evicted);
            self.inner.dirty.store(true, Ordering::Relaxed);
            if !evicted.is_empty() {
                self.inner.metrics.evictions.inc_by(evicted.len() as u64);
                tracing::debug!(endpoint, name, ?evicted, "per-name IP limit reached");
            }
            // The datapath already holds these IPs under these selectors, and no update
            // of this name is in flight (or failed): only the expiry moved, which is ours.
            if known && !chains.contains_key(name) {
                continue;
            }
            let update = Update {
                endpoint: endpoint.to_string(),
                name: name.to_string(),
                add: selectors
                    .iter()
                    .map(|s| SelectorIps {
                        selector: s.to_string(),
                        label: fqdn_key(s, endpoint).to_string(),
                        ips: ips.to_vec(),
                    })
                    .collect(),
                remove: Vec::new(),
            };
            waits.push(self.queue_update_locked(&mut chains, name, update));
        }
        if waits.is_empty() {
            // Either no selector matched, or the datapath already had everything.
            let confirmed = any_selector.then_some(true);
            return HandOff {
                selectors: all_selectors,
                confirmed,
                waits: None,
            };
        }
        HandOff {
            selectors: all_selectors,
            confirmed: None,
            waits: Some(waits),
        }
    }

    /// Waits (bounded by `datapath_wait`) until the datapath confirmed every update in
    /// `waits`; whether it did in time. A timeout is counted and logged.
    pub(super) async fn await_datapath(
        &self,
        waits: Vec<watch::Receiver<bool>>,
        endpoint: &str,
        qname: &str,
    ) -> bool {
        let start = Instant::now();
        let all = async {
            for mut w in waits {
                // An error means the update task is gone: nothing more to wait for.
                let _ = w.wait_for(|done| *done).await;
            }
        };
        let confirmed = tokio::time::timeout(self.inner.config.datapath_wait, all)
            .await
            .is_ok();
        if confirmed {
            self.inner
                .metrics
                .datapath_seconds
                .observe(start.elapsed().as_secs_f64());
        } else {
            self.inner.metrics.datapath_timeouts.inc();
            tracing::warn!(
                endpoint,
                name = qname,
                wait_ms = self.inner.config.datapath_wait.as_millis() as u64,
                "datapath did not confirm in time; answer released anyway"
            );
        }
        confirmed
    }

    pub(super) fn chains(&self) -> MutexGuard<'_, HashMap<String, watch::Receiver<bool>>> {
        match self.inner.chains.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub(super) fn queue_update(&self, name: &str, update: Update) -> watch::Receiver<bool> {
        let mut chains = self.chains();
        self.queue_update_locked(&mut chains, name, update)
    }

    /// Queues `update` behind the previous update of the same name; the receiver turns
    /// true once the datapath confirmed (or failed) it. The update runs to completion
    /// even when the query stops waiting. A failed update leaves its entry, so the next
    /// answer for the name is handed over again.
    pub(super) fn queue_update_locked(
        &self,
        chains: &mut HashMap<String, watch::Receiver<bool>>,
        name: &str,
        update: Update,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let prev = chains.insert(name.to_string(), rx.clone());
        // An answer for this name now waits for the update.
        self.moved();
        let inner = self.inner.clone();
        let name = name.to_string();
        let mine = rx.clone();
        tokio::spawn(async move {
            if let Some(mut prev) = prev {
                let _ = prev.wait_for(|done| *done).await;
            }
            let ok = match inner.sink.apply(update).await {
                Ok(()) => true,
                Err(e) => {
                    inner.metrics.datapath_errors.inc();
                    tracing::warn!(name, "{e}");
                    false
                }
            };
            // The entry goes before the answers waiting for it are released: the next
            // query for the name then finds nothing in flight.
            {
                let mut chains = match inner.chains.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if ok && chains.get(&name).is_some_and(|r| r.same_channel(&mine)) {
                    chains.remove(&name);
                }
            }
            let _ = tx.send(true);
        });
        rx
    }

    /// Learns an answer's IPs for the query's endpoint; `rec` gets the TTL, the
    /// selectors and, when known without a wait, whether the datapath confirmed. When
    /// the datapath holds them all already (from what was taken while the query was
    /// upstream, `held`, or from the cache), only the expiry moves, after the reply:
    /// what that needs is moved out of `asked` and `learned`, not copied.
    pub(super) fn learn(
        &self,
        rec: &mut AuditRecord,
        asked: &mut Asked,
        learned: &mut Learned,
        held: Option<&Held>,
        until_ms: u64,
    ) -> Learning {
        if learned.ips.is_empty() {
            return Learning::Done;
        }
        let ttl = learned.ttl.max(self.inner.config.min_ttl);
        rec.ttl = Some(ttl);
        let Some(ep) = asked.resolved.endpoint.as_deref() else {
            return Learning::Done;
        };
        let targets: &[String] = if self.inner.config.attribute_cname_targets {
            &learned.cname_targets
        } else {
            &[]
        };
        let holds =
            targets.is_empty() && held.is_some_and(|h| self.still_holds(h, &learned.ips, until_ms));
        if holds || self.datapath_holds(ep, &asked.qname, targets, &learned.ips, asked.now_ms) {
            rec.datapath_confirmed = Some(true);
            let cname_targets = if targets.is_empty() {
                Vec::new()
            } else {
                std::mem::take(&mut learned.cname_targets)
            };
            return Learning::Late(LateHandOff {
                proxy: self.clone(),
                resolved: asked.resolved.clone(),
                qname: std::mem::take(&mut asked.qname),
                cname_targets,
                ips: std::mem::take(&mut learned.ips),
                known: None,
                ttl,
                now_ms: asked.now_ms,
                done: false,
            });
        }
        let h = self.hand_off(ep, &asked.qname, targets, &learned.ips, ttl, asked.now_ms);
        rec.selectors = h.selectors;
        match h.waits {
            Some(waits) => Learning::Wait(waits),
            None => {
                rec.datapath_confirmed = h.confirmed;
                Learning::Done
            }
        }
    }
}
