//! The conntrack task: sweeps idle and closed flows out of conntrack, and after each
//! published policy change revokes the established flows the new policy denies (their
//! next packet is decided again, and dropped). It follows the published model, so a
//! revocation always comes after the datapath enforces the policy that denies. It walks
//! the maps on a handle of their own ([`ConntrackMaps`]): a pass over 200,000 flows never
//! holds the datapath's lock, under which the publisher writes learned DNS answers.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::watch;

use super::publisher::local_pods;
use super::revoke::Enforced;
use super::Published;
use redirect_bpf::{ConntrackFlow, ConntrackView, Error};

use crate::datapath::{Datapath, Shared};
use crate::telemetry::metrics::AgentMetrics;

/// How often conntrack is swept and how old a flow gets.
#[derive(Clone, Copy, Debug)]
pub struct Sweep {
    pub every: Duration,
    /// A flow idle this long leaves conntrack (Cilium's regular TCP timeout).
    pub idle: Duration,
    /// A closed TCP flow (FIN or RST seen) leaves after this much idleness.
    pub closing: Duration,
}

impl Default for Sweep {
    fn default() -> Sweep {
        Sweep {
            every: Duration::from_secs(10),
            idle: Duration::from_secs(6 * 3600),
            closing: Duration::from_secs(10),
        }
    }
}

/// The conntrack maps as the conntrack task walks and prunes them.
pub trait ConntrackMaps: Send + 'static {
    /// Removes the flows idle past their limit; returns how many.
    fn expire(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error>;
    /// Removes the flows `revoke` picks; returns how many.
    fn revoke(&mut self, revoke: &mut dyn FnMut(&ConntrackFlow) -> bool) -> Result<usize, Error>;
}

/// The kernel's maps, opened apart from the datapath (`Datapath::conntrack_view`).
impl ConntrackMaps for ConntrackView {
    fn expire(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error> {
        ConntrackView::expire(self, idle, closing)
    }

    fn revoke(&mut self, revoke: &mut dyn FnMut(&ConntrackFlow) -> bool) -> Result<usize, Error> {
        ConntrackView::revoke(self, revoke)
    }
}

/// Through the datapath, taking its lock for each pass (the tests' fake datapath, whose
/// journal then orders the passes among the map writes).
impl<D: Datapath> ConntrackMaps for Shared<D> {
    fn expire(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error> {
        self.lock().expire_conntrack(idle, closing)
    }

    fn revoke(&mut self, revoke: &mut dyn FnMut(&ConntrackFlow) -> bool) -> Result<usize, Error> {
        self.lock().revoke_conntrack(revoke)
    }
}

/// The conntrack task's state.
pub struct ConntrackTask {
    maps: Box<dyn ConntrackMaps>,
    node: String,
    sweep: Sweep,
    metrics: AgentMetrics,
    published: watch::Receiver<Option<Published>>,
    /// `Published::pushes` of the last model revoked on.
    revoked_at: u64,
}

impl ConntrackTask {
    pub fn new(
        maps: Box<dyn ConntrackMaps>,
        node: String,
        sweep: Sweep,
        metrics: AgentMetrics,
        published: watch::Receiver<Option<Published>>,
    ) -> ConntrackTask {
        ConntrackTask {
            maps,
            node,
            sweep,
            metrics,
            published,
            revoked_at: 0,
        }
    }

    /// Runs until the publisher is gone.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.sweep.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                r = self.published.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let p = self.published.borrow_and_update().clone();
                    if let Some(p) = p.filter(|p| p.pushes != self.revoked_at) {
                        self.revoked_at = p.pushes;
                        self.revoke_denied(&p);
                    }
                }
                _ = tick.tick() => self.expire(),
            }
        }
    }

    fn expire(&mut self) {
        let swept = self.maps.expire(self.sweep.idle, self.sweep.closing);
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::debug!(flows = n, "conntrack swept"),
            Err(e) => tracing::warn!(error = %e, "conntrack sweep failed"),
        }
    }

    /// Removes the conntrack entries of established flows that the published model
    /// denies on this node (`revoke`).
    fn revoke_denied(&mut self, p: &Published) {
        let local: HashSet<IpAddr> = local_pods(&p.model.cluster, &self.node)
            .into_values()
            .flatten()
            .collect();
        let enforced = Enforced {
            model: &p.model,
            node: &self.node,
            local: &local,
        };
        let revoked = self.maps.revoke(&mut |f| enforced.denies(f));
        match revoked {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(flows = n, generation = p.generation, "revoked denied flows");
                self.metrics.conntrack_revoked.inc_by(n as u64);
            }
            Err(e) => tracing::warn!(error = %e, "cannot revoke denied flows from conntrack"),
        }
    }
}
