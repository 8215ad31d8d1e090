//! The endpoint attacher: finds the host-side interface of each local pod, attaches the
//! pod programs to it and detaches them from pods that left. It owns the pod ->
//! interface table and publishes it ([`Attachments`]) for the policy publisher, which
//! writes the interfaces into the endpoints map and shows them in the status. Nothing
//! else waits on it: a slow or stuck lookup delays only the attachment of new pods.
//!
//! A round runs when the local pods change, when the node's routes or links change
//! ([`Wakeups`], the netlink watch: a CNI adding a pod's veth and route), and every
//! [`ENDPOINT_RECHECK`] in any case, the safety net of the watch.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use redirect_bpf::netlink::{NetChanges, Netlink};
use tokio::sync::watch;

use super::endpoints::{ifindex, veth_of};
use super::{Attached, Attachments, LocalPods};
use crate::datapath::{Datapath, Shared};
use crate::source::BoxFuture;
use crate::telemetry::metrics::AgentMetrics;

/// How often pods not found yet are looked for again, and attachments checked, when no
/// route or link change woke the attacher (`--endpoint-recheck-ms`).
pub const ENDPOINT_RECHECK: Duration = Duration::from_secs(10);

/// Where a pod's interface is found.
pub trait Discovery: Send + Sync + 'static {
    /// The interface the node routes `ip` to, when that is a pod's (a unicast route
    /// through an interface other than loopback); None when there is none (yet).
    fn interface_of(&self, ip: IpAddr) -> BoxFuture<'_, Option<String>>;
    /// The interface's index in the node's namespace (0 when there is none).
    fn ifindex(&self, iface: &str) -> u32;
}

/// The node's routing table, asked over rtnetlink: the route the CNI installed for the
/// pod's IP.
pub struct Routes {
    netlink: Netlink,
}

impl Routes {
    pub fn new(netlink: Netlink) -> Routes {
        Routes { netlink }
    }
}

impl Discovery for Routes {
    fn interface_of(&self, ip: IpAddr) -> BoxFuture<'_, Option<String>> {
        Box::pin(veth_of(&self.netlink, ip))
    }

    fn ifindex(&self, iface: &str) -> u32 {
        ifindex(iface)
    }
}

/// What wakes the attacher between re-checks: one item per change that may have given a
/// pod its interface (or taken it away).
pub type Wakeups = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// The node namespace's route and link changes (announced over netlink) as wake-ups.
pub fn net_wakeups(changes: NetChanges) -> Wakeups {
    Box::pin(changes.map(|_| ()))
}

/// The endpoint attacher's state (see the module documentation).
pub struct Attacher<D, R> {
    dp: Shared<D>,
    discovery: R,
    /// Uplink interfaces: attached at start by the agent, never a pod's.
    uplinks: Vec<String>,
    metrics: AgentMetrics,
    recheck: Duration,
    /// None when nothing but the re-check wakes the attacher (or the watch ended).
    wakeups: Option<Wakeups>,
    /// pod -> the interface carrying its programs.
    attached: BTreeMap<String, Attached>,
    pods: watch::Receiver<Option<LocalPods>>,
    out: watch::Sender<Attachments>,
}

impl<D: Datapath, R: Discovery> Attacher<D, R> {
    pub fn new(
        dp: Shared<D>,
        discovery: R,
        uplinks: Vec<String>,
        metrics: AgentMetrics,
        pods: watch::Receiver<Option<LocalPods>>,
        out: watch::Sender<Attachments>,
    ) -> Attacher<D, R> {
        Attacher {
            dp,
            discovery,
            uplinks,
            metrics,
            recheck: ENDPOINT_RECHECK,
            wakeups: None,
            attached: BTreeMap::new(),
            pods,
            out,
        }
    }

    /// Sets how often pods not found are looked for again without a wake-up.
    pub fn recheck(mut self, recheck: Duration) -> Self {
        self.recheck = recheck;
        self
    }

    /// Sets what wakes the attacher between re-checks.
    pub fn wakeups(mut self, wakeups: Option<Wakeups>) -> Self {
        self.wakeups = wakeups;
        self
    }

    /// Runs until the publisher is gone. The first round starts with the first snapshot's
    /// local pods; after it, links pinned by an earlier run on interfaces that are no
    /// local pod's any more are removed.
    pub async fn run(mut self) {
        let mut pods = loop {
            if let Some(p) = self.pods.borrow_and_update().clone() {
                break p;
            }
            if self.pods.changed().await.is_err() {
                return;
            }
        };
        self.round(&pods).await;
        self.detach_leftovers();
        self.publish(true);
        let mut tick = tokio::time::interval(self.recheck);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                r = self.pods.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if let Some(p) = self.pods.borrow_and_update().clone() {
                        pods = p;
                    }
                }
                () = woken(&mut self.wakeups) => {}
                _ = tick.tick() => {}
            }
            // every round counts as the re-check
            tick.reset();
            if self.round(&pods).await {
                self.publish(false);
            }
        }
    }

    fn publish(&self, first: bool) {
        let now = self.attached.clone();
        self.out.send_if_modified(|a| {
            let changed = a.by_pod != now || (first && !a.discovered);
            a.by_pod = now;
            a.discovered |= first;
            changed
        });
    }

    /// Attaches the programs to the interfaces of local pods found in the routing table,
    /// and detaches them from pods that left. Returns whether anything changed.
    async fn round(&mut self, local: &LocalPods) -> bool {
        let mut changed = false;
        // pods that left (or moved): detach
        let gone: Vec<(String, Attached)> = self
            .attached
            .iter()
            .filter(|(p, _)| !local.contains_key(*p))
            .map(|(p, a)| (p.clone(), a.clone()))
            .collect();
        for (pod, a) in gone {
            self.attached.remove(&pod);
            if let Err(e) = self.dp.lock().detach(&a.iface) {
                tracing::warn!(interface = %a.iface, pod = %pod, error = %e, "cannot detach");
                self.metrics.update_errors.inc();
            }
            changed = true;
        }
        for (pod, ips) in local {
            let Some(ip) = ips.first() else { continue };
            let known = self.attached.get(pod).cloned();
            if let Some(k) = &known {
                if self.dp.lock().is_attached(&k.iface) {
                    continue;
                }
            }
            // A route through an uplink means the pod is not (yet) on this node's veths.
            let found = self
                .discovery
                .interface_of(*ip)
                .await
                .filter(|i| !self.uplinks.contains(i));
            match (found, known) {
                (Some(iface), known) => {
                    if let Some(old) = known.filter(|o| o.iface != iface) {
                        let _ = self.dp.lock().detach(&old.iface);
                    }
                    let attached = self.dp.lock().attach(&iface);
                    match attached {
                        Ok(()) => {
                            let ifindex = self.discovery.ifindex(&iface);
                            tracing::debug!(pod = %pod, interface = %iface, ifindex, "attached");
                            self.attached
                                .insert(pod.clone(), Attached { iface, ifindex });
                            changed = true;
                        }
                        Err(e) => {
                            tracing::warn!(interface = %iface, pod = %pod, error = %e, "cannot attach");
                            self.metrics.update_errors.inc();
                        }
                    }
                }
                (None, Some(_)) => {
                    // the veth went away with the pod's sandbox; its links went with it
                    self.attached.remove(pod);
                    changed = true;
                }
                (None, None) => {}
            }
        }
        changed
    }

    /// Links pinned by an earlier run on interfaces that are no local pod's and no
    /// uplink any more (pods deleted while no agent ran) are removed, so that nothing is
    /// attached twice or forever.
    fn detach_leftovers(&mut self) {
        let listed = self.dp.lock().attached_interfaces();
        let attached = match listed {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list attachments");
                return;
            }
        };
        for iface in attached {
            if self.uplinks.contains(&iface) || self.attached.values().any(|a| a.iface == iface) {
                continue;
            }
            let detached = self.dp.lock().detach(&iface);
            match detached {
                Ok(()) => tracing::info!(interface = %iface, "detached leftover links"),
                Err(e) => {
                    tracing::warn!(interface = %iface, error = %e, "cannot detach leftover links");
                    self.metrics.update_errors.inc();
                }
            }
        }
    }
}

/// Waits for the next wake-up, and takes the ones already queued behind it: a burst (a
/// CNI adds a veth, its addresses and its routes in a row) makes one round. Never
/// returns once the wake-ups ended (the watch's socket failed): the re-check goes on
/// alone.
async fn woken(wakeups: &mut Option<Wakeups>) {
    if let Some(w) = wakeups {
        if w.next().await.is_some() {
            while let Some(Some(())) = w.next().now_or_never() {}
            return;
        }
        tracing::warn!(
            "the netlink watch of routes and links ended: endpoints are looked for only by \
             the periodic re-check from now on"
        );
        *wakeups = None;
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use futures_util::stream;

    use super::*;

    /// Resolves `f` if it is ready now; None if it would wait.
    fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
        Box::pin(f).now_or_never()
    }

    #[test]
    fn a_burst_of_wakeups_makes_one_round() {
        let burst = stream::iter([(), (), ()]).chain(stream::pending());
        let mut w: Option<Wakeups> = Some(Box::pin(burst));
        assert_eq!(ready_now(woken(&mut w)), Some(()), "the burst wakes");
        assert_eq!(ready_now(woken(&mut w)), None, "and is taken whole");
        assert!(w.is_some());
    }

    #[test]
    fn ended_wakeups_leave_the_recheck_alone() {
        let mut w: Option<Wakeups> = Some(Box::pin(stream::iter([()])));
        assert_eq!(ready_now(woken(&mut w)), Some(()));
        assert_eq!(ready_now(woken(&mut w)), None, "never wakes again");
        assert!(w.is_none(), "the ended watch is dropped");
        let mut none: Option<Wakeups> = None;
        assert_eq!(ready_now(woken(&mut none)), None);
    }
}
