//! The reconcile tasks: what keeps the datapath and the proxies in step with the source.
//! Each task owns its state and talks to the others over channels:
//!
//! ```text
//!  source ──snapshots──▶ publisher ──published model──▶ conntrack (sweep, revoke)
//!  DNS proxy ──dns lane──▶   │  ▲                   ├──▶ drop counters ──▶ metrics
//!                  local pods│  │attachments        └──▶ event reader ──▶ audit
//!                            ▼  │                          ▲ ring buffer
//!                          attacher (discovery, attach/detach)
//!                            ▲ route and link changes (netlink)
//! ```
//!
//! - [`publisher`]: store -> model -> one diff to the maps, and the model to the proxies.
//! - [`attacher`]: finds the pods' interfaces and attaches the programs, woken by the
//!   node's route and link changes.
//! - [`conntrack`]: expires idle flows, revokes flows a new policy denies.
//! - [`drops`]: drop events to the audit stream, drop counters to the metrics.
//! - [`dns`]: the DNS proxy's hand-off lane into the publisher.

pub mod attacher;
pub mod conntrack;
pub mod dns;
pub mod drops;
pub mod endpoints;
pub mod fqdn;
pub mod identities;
pub mod journal;
pub mod maps;
pub mod publisher;
pub mod rebuild;
pub mod revoke;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use policy_model::Model;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::datapath::{Datapath, Shared};
use crate::source::Snapshot;
use crate::telemetry::metrics::AgentMetrics;
use attacher::{Attacher, Discovery, Wakeups};
use conntrack::{ConntrackMaps, ConntrackTask, Sweep};
use drops::{DropCounters, DropCounts, DropEventSource, EventReader};
use publisher::{Inputs, Outputs, PolicyStatus, Proxies, Publisher, Start};

/// A model the datapath enforces, as the publisher handed it out.
#[derive(Clone)]
pub struct Published {
    pub model: Arc<Model>,
    pub generation: u64,
    /// Pushes of policy or cluster changes so far (learned DNS IPs do not count): the
    /// conntrack task revokes denied flows when it grows.
    pub pushes: u64,
}

/// The pods of this node: `namespace/name` -> IPs.
pub type LocalPods = BTreeMap<String, Vec<IpAddr>>;

/// A pod's host-side interface that carries the programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
}

/// The endpoint attacher's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachments {
    /// The first discovery round is done: the pods found then are attached.
    pub discovered: bool,
    pub by_pod: BTreeMap<String, Attached>,
}

/// How often the periodic tasks run (shortened in tests).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Endpoint discovery without a wake-up ([`attacher::ENDPOINT_RECHECK`]).
    pub endpoint_recheck: Duration,
    /// Reading the drop counters ([`drops::COUNTERS_EVERY`]).
    pub counters: Duration,
    pub sweep: Sweep,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            endpoint_recheck: attacher::ENDPOINT_RECHECK,
            counters: drops::COUNTERS_EVERY,
            sweep: Sweep::default(),
        }
    }
}

/// What the tasks need besides the publisher's start.
pub struct Wiring<R> {
    pub discovery: R,
    /// What wakes discovery between re-checks (the node's route and link changes).
    pub wakeups: Option<Wakeups>,
    pub uplinks: Vec<String>,
    /// The drop event ring buffer, read by its own task into `audit`.
    pub drop_events: Box<dyn DropEventSource>,
    /// The conntrack maps, swept and pruned by their own task.
    pub conntrack: Box<dyn ConntrackMaps>,
    /// The audit stream (its writer also feeds the event stream).
    pub audit: audit::AuditLog,
    pub timing: Timing,
    /// The publisher's end of the DNS lane ([`dns::lane`]).
    pub dns: mpsc::Receiver<dns::Request>,
}

/// The running tasks' ends.
pub struct Handles {
    /// Full snapshots from the source go here.
    pub snapshots: mpsc::Sender<Snapshot>,
    pub status: watch::Receiver<PolicyStatus>,
    pub drops: watch::Receiver<DropCounts>,
    pub published: watch::Receiver<Option<Published>>,
    pub attachments: watch::Receiver<Attachments>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Handles {
    /// Stops every task.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the reconcile tasks on the current runtime.
pub fn spawn<D: Datapath, P: Proxies, R: Discovery>(
    start: Start<D, P>,
    wiring: Wiring<R>,
) -> Handles {
    let dp: Shared<D> = start.dp.clone();
    let metrics: AgentMetrics = start.metrics.clone();
    let node = start.node.clone();
    let (snapshots, snapshots_rx) = mpsc::channel(16);
    let (local_pods, local_pods_rx) = watch::channel(None);
    let (attachments_tx, attachments) = watch::channel(Attachments::default());
    let (published_tx, published) = watch::channel(None);
    let (status_tx, status) = watch::channel(PolicyStatus::default());
    let (drops_tx, drops) = watch::channel(DropCounts::new());
    let publisher = Publisher::new(
        start,
        Outputs {
            local_pods,
            published: published_tx,
            status: status_tx,
        },
    );
    let inputs = Inputs {
        snapshots: snapshots_rx,
        dns: wiring.dns,
        attachments: attachments.clone(),
    };
    let attacher = Attacher::new(
        dp.clone(),
        wiring.discovery,
        wiring.uplinks,
        metrics.clone(),
        local_pods_rx,
        attachments_tx,
    )
    .recheck(wiring.timing.endpoint_recheck)
    .wakeups(wiring.wakeups);
    let conntrack = ConntrackTask::new(
        wiring.conntrack,
        node,
        wiring.timing.sweep,
        metrics.clone(),
        published.clone(),
    );
    let counters =
        DropCounters::new(dp, metrics, published.clone(), drops_tx).every(wiring.timing.counters);
    let events = EventReader::new(wiring.drop_events, wiring.audit, published.clone());
    // The tasks that write the maps make a system call per key and wait on the
    // datapath's lock: each runs on a thread of its own, so that a long map walk never
    // holds one of the runtime's workers (the admin endpoint, the proxies).
    let tasks = vec![
        on_own_thread("ward-publisher", publisher.run(inputs)),
        on_own_thread("ward-attacher", attacher.run()),
        on_own_thread("ward-conntrack", conntrack.run()),
        on_own_thread("ward-counters", counters.run()),
        tokio::spawn(events.run()),
    ];
    Handles {
        snapshots,
        status,
        drops,
        published,
        attachments,
        tasks,
    }
}

/// Runs `task` on a thread of its own (a single-threaded runtime) and returns a handle on
/// the current runtime that ends with it; aborting or dropping the handle's task stops it.
/// A thread that cannot be started runs the task on the current runtime instead.
fn on_own_thread<F>(name: &str, task: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let (done, finished) = oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(task = name, error = %e, "no runtime of its own; sharing the main one");
            return tokio::spawn(task);
        }
    };
    let body = async move {
        tokio::select! {
            () = task => {}
            _ = stopped => {}
        }
    };
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            runtime.block_on(body);
            let _ = done.send(());
        });
    if let Err(e) = thread {
        tracing::error!(task = name, error = %e, "cannot start the task's thread");
    }
    tokio::spawn(async move {
        // Held until the thread is done: dropping it (abort) stops the task.
        let _stop = stop;
        let _ = finished.await;
    })
}
