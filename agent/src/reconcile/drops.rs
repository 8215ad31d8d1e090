//! The drop-event reader: moves the datapath's drop events to the event stream (named
//! with the pods of the published model) and its per-reason drop counters to the
//! metrics and the status.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use redirect_bpf::common::drop_reason;
use tokio::sync::watch;

use super::Published;
use crate::datapath::{Datapath, Shared};
use crate::telemetry::events::{drop_event, Events};
use crate::telemetry::metrics::{reason_name, AgentMetrics};

/// How often drop events and counters are read.
pub const EVENTS_EVERY: Duration = Duration::from_millis(200);

/// Drops by reason name, as the kernel counts them.
pub type DropCounts = BTreeMap<&'static str, u64>;

/// The drop-event reader's state.
pub struct DropReader<D> {
    dp: Shared<D>,
    events: Events,
    metrics: AgentMetrics,
    every: Duration,
    published: watch::Receiver<Option<Published>>,
    out: watch::Sender<DropCounts>,
    /// The kernel counters as last read, by reason.
    seen: BTreeMap<u32, u64>,
}

impl<D: Datapath> DropReader<D> {
    pub fn new(
        dp: Shared<D>,
        events: Events,
        metrics: AgentMetrics,
        published: watch::Receiver<Option<Published>>,
        out: watch::Sender<DropCounts>,
    ) -> DropReader<D> {
        DropReader {
            dp,
            events,
            metrics,
            every: EVENTS_EVERY,
            published,
            out,
            seen: BTreeMap::new(),
        }
    }

    /// Sets how often the events are read.
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

    /// Reads the events and counters once.
    pub fn read(&mut self) {
        let (events, counts, suppressed) = {
            let mut dp = self.dp.lock();
            let events = dp.drain_events();
            let counts: Vec<(u32, u64)> = (1..drop_reason::COUNT)
                .filter_map(|r| dp.drops(r).ok().map(|c| (r, c)))
                .collect();
            (events, counts, dp.events_suppressed().unwrap_or(0))
        };
        let model = self.published.borrow().as_ref().map(|p| p.model.clone());
        let pod_of = |ip: IpAddr| {
            model
                .as_ref()
                .and_then(|m| m.endpoint_of_ip(ip).map(|e| e.name.clone()))
        };
        for e in &events {
            self.events.publish(&drop_event(e, pod_of));
        }
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
