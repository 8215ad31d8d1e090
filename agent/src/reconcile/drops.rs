//! The datapath's drops, in two tasks:
//!
//! - [`EventReader`]: sleeps on the drop event ring buffer ([`DropEventSource`]; the
//!   kernel's is read on tokio's `AsyncFd`, woken when a drop is recorded) and moves each
//!   event to the audit stream (and so the event stream), named with the pods of the
//!   published model. It holds no
//!   lock of the datapath: the ring buffer was handed out of it at start.
//! - [`DropCounters`]: reads the per-reason drop counters into the metrics and the
//!   status, every [`COUNTERS_EVERY`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use redirect_bpf::common::{drop_reason, DropEvent};
use redirect_bpf::AsyncDropEvents;
use tokio::sync::watch;

use super::Published;
use crate::datapath::{Datapath, Shared};
use crate::source::BoxFuture;
use audit::AuditLog;

use crate::telemetry::events::{drop_record, explain_drop};
use crate::telemetry::metrics::{reason_name, AgentMetrics};

/// How often the drop counters are read.
pub const COUNTERS_EVERY: Duration = Duration::from_millis(200);

/// Drops by reason name, as the kernel counts them.
pub type DropCounts = BTreeMap<&'static str, u64>;

/// Where drop events come from: the datapath's ring buffer (or a test's stand-in,
/// [`crate::datapath::fake::FakeDropEvents`]).
pub trait DropEventSource: Send + 'static {
    /// Waits until at least one event is queued and returns every queued one, oldest
    /// first. An error ends the reader.
    fn next_batch(&mut self) -> BoxFuture<'_, std::io::Result<Vec<DropEvent>>>;
}

impl DropEventSource for AsyncDropEvents {
    fn next_batch(&mut self) -> BoxFuture<'_, std::io::Result<Vec<DropEvent>>> {
        Box::pin(AsyncDropEvents::next_batch(self))
    }
}

/// The drop event reader's state.
pub struct EventReader {
    ring: Box<dyn DropEventSource>,
    audit: AuditLog,
    published: watch::Receiver<Option<Published>>,
}

impl EventReader {
    pub fn new(
        ring: Box<dyn DropEventSource>,
        audit: AuditLog,
        published: watch::Receiver<Option<Published>>,
    ) -> EventReader {
        EventReader {
            ring,
            audit,
            published,
        }
    }

    /// Publishes drop events until the ring buffer cannot be read any more.
    pub async fn run(mut self) {
        loop {
            match self.ring.next_batch().await {
                Ok(batch) => self.publish(&batch),
                Err(e) => {
                    tracing::error!(error = %e, "reading drop events stopped");
                    return;
                }
            }
        }
    }

    /// Moves a batch of events to the audit stream.
    fn publish(&self, batch: &[DropEvent]) {
        let model = self.published.borrow().as_ref().map(|p| p.model.clone());
        let pod_of = |ip: IpAddr| model.as_ref().and_then(|m| m.endpoint_name_of_ip(ip));
        for e in batch {
            let mut record = drop_record(e, pod_of);
            if let Some(m) = &model {
                explain_drop(m, &mut record);
            }
            self.audit.record(record);
        }
    }
}

/// The drop counter reader's state.
pub struct DropCounters<D> {
    dp: Shared<D>,
    metrics: AgentMetrics,
    every: Duration,
    published: watch::Receiver<Option<Published>>,
    out: watch::Sender<DropCounts>,
    /// The kernel counters as last read, by reason.
    seen: BTreeMap<u32, u64>,
}

impl<D: Datapath> DropCounters<D> {
    pub fn new(
        dp: Shared<D>,
        metrics: AgentMetrics,
        published: watch::Receiver<Option<Published>>,
        out: watch::Sender<DropCounts>,
    ) -> DropCounters<D> {
        DropCounters {
            dp,
            metrics,
            every: COUNTERS_EVERY,
            published,
            out,
            seen: BTreeMap::new(),
        }
    }

    /// Sets how often the counters are read.
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Runs until the publisher is gone.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.published.has_changed().is_err() {
                return;
            }
            self.read();
        }
    }

    /// Reads the counters once.
    pub fn read(&mut self) {
        let (counts, suppressed) = {
            let dp = self.dp.lock();
            let counts: Vec<(u32, u64)> = (1..drop_reason::COUNT)
                .filter_map(|r| dp.drops(r).ok().map(|c| (r, c)))
                .collect();
            (counts, dp.events_suppressed().unwrap_or(0))
        };
        let mut by_name = DropCounts::new();
        for (r, c) in counts {
            let seen = self.seen.entry(r).or_insert(0);
            // Counters restart from zero when the maps are recreated.
            let delta = c.checked_sub(*seen).unwrap_or(c);
            if delta > 0 {
                self.metrics
                    .drops
                    .with_label_values(&[reason_name(r)])
                    .inc_by(delta);
            }
            *seen = c;
            *by_name.entry(reason_name(r)).or_insert(0) += c;
        }
        self.metrics
            .events_suppressed
            .set(i64::try_from(suppressed).unwrap_or(i64::MAX));
        self.out.send_if_modified(|d| {
            let changed = *d != by_name;
            *d = by_name;
            changed
        });
    }
}
