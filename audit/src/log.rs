//! The data path's handle on the audit queue: cheap to clone, never blocks.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;

use crate::AuditEvent;

/// `ward_audit_dropped_total{type}`: events dropped because the audit queue was full.
#[derive(Clone, Debug)]
pub struct DroppedCounter {
    vec: IntCounterVec,
    http: IntCounter,
    dns: IntCounter,
    drop: IntCounter,
}

impl Default for DroppedCounter {
    fn default() -> DroppedCounter {
        DroppedCounter::new()
    }
}

impl DroppedCounter {
    pub fn new() -> DroppedCounter {
        let vec = IntCounterVec::new(
            Opts::new(
                "ward_audit_dropped_total",
                "Audit events dropped because the audit queue was full, by type.",
            ),
            &["type"],
        )
        .unwrap_or_else(|e| unreachable!("a fixed, valid metric: {e}"));
        // Every type shows from the start, at 0.
        let by = |t: &str| vec.with_label_values(&[t]);
        DroppedCounter {
            http: by("http"),
            dns: by("dns"),
            drop: by("drop"),
            vec,
        }
    }

    /// Adds the counter to `registry` (the registry the metrics endpoint serves).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.vec.clone()))
    }

    /// Events of `kind` (`http`, `dns`, `drop`) dropped so far.
    pub fn get(&self, kind: &str) -> u64 {
        self.vec.with_label_values(&[kind]).get()
    }

    fn of(&self, e: &AuditEvent) -> &IntCounter {
        match e {
            AuditEvent::Http(_) => &self.http,
            AuditEvent::Dns(_) => &self.dns,
            AuditEvent::Drop(_) => &self.drop,
        }
    }
}

/// Where events go: a bounded queue to the writer, or nowhere.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<AuditEvent>>,
    dropped: DroppedCounter,
}

impl AuditLog {
    /// A log that takes nothing: no audit output configured.
    pub fn disabled() -> AuditLog {
        AuditLog {
            tx: None,
            dropped: DroppedCounter::new(),
        }
    }

    /// A log with a queue of `capacity` events (at least one) and its receiving end,
    /// for [`crate::write_lines`]. Drops count in `dropped`.
    pub fn channel(
        capacity: usize,
        dropped: DroppedCounter,
    ) -> (AuditLog, mpsc::Receiver<AuditEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            AuditLog {
                tx: Some(tx),
                dropped,
            },
            rx,
        )
    }

    /// Whether events go anywhere: when not, callers skip building them (a record is a
    /// dozen small allocations).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one event without waiting; a full queue drops it and counts the drop.
    pub fn record(&self, e: impl Into<AuditEvent>) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(e.into()) {
            let e = match e {
                mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e) => e,
            };
            self.dropped.of(&e).inc();
        }
    }

    /// The drop counter this log counts in.
    pub fn dropped(&self) -> &DroppedCounter {
        &self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dns, http};

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_by_type_without_waiting() {
        let (log, mut rx) = AuditLog::channel(1, DroppedCounter::new());
        log.record(http::tests::record());
        log.record(http::tests::record());
        log.record(dns::tests::record());
        assert_eq!(log.dropped().get("http"), 1);
        assert_eq!(log.dropped().get("dns"), 1);
        assert_eq!(log.dropped().get("drop"), 0);
        assert!(matches!(rx.try_recv(), Ok(AuditEvent::Http(_))));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn only_a_log_with_an_output_asks_for_records() {
        assert!(!AuditLog::disabled().enabled());
        assert!(AuditLog::channel(1, DroppedCounter::new()).0.enabled());
    }

    #[test]
    fn every_type_is_exported_from_the_start() {
        let c = DroppedCounter::new();
        let r = Registry::new();
        c.register(&r).unwrap();
        let labels: Vec<String> = r.gather()[0]
            .get_metric()
            .iter()
            .map(|m| m.get_label()[0].value().to_string())
            .collect();
        assert_eq!(labels, ["dns", "drop", "http"]);
    }
}
