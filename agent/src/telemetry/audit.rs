//! The audit log: one queue that the HTTP proxy, the DNS proxy and the drop reader feed
//! ([`audit::AuditLog`], bounded; a full queue drops and counts in
//! `ward_audit_dropped_total{type}`), one writer on a blocking thread that writes each
//! event as a JSON line with its `type` and then publishes the same line on the event
//! stream (`/v1/events`, `ward observe`).

use std::io::Write;
use std::sync::Arc;

use audit::{AuditLog, DroppedCounter};

use super::events::Events;

/// Where audit lines are written.
pub enum AuditSink {
    /// Nowhere (the event stream still gets them).
    None,
    Stdout,
    File(std::fs::File),
}

impl AuditSink {
    /// `-` is stdout, `none` disables the log, anything else is a file appended to.
    pub fn open(spec: &str) -> std::io::Result<AuditSink> {
        Ok(match spec {
            "-" => AuditSink::Stdout,
            "none" => AuditSink::None,
            path => AuditSink::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }

    fn writer(self) -> Box<dyn Write + Send> {
        match self {
            AuditSink::None => Box::new(std::io::sink()),
            AuditSink::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            AuditSink::File(f) => Box::new(std::io::BufWriter::new(f)),
        }
    }
}

/// Starts the one audit writer and returns the queue's handle for the proxies and the
/// drop reader. The queue holds `capacity` events; drops count in `dropped`.
pub fn start(
    capacity: usize,
    sink: AuditSink,
    events: Events,
    dropped: DroppedCounter,
) -> AuditLog {
    let (log, rx) = AuditLog::channel(capacity, dropped);
    let out = sink.writer();
    tokio::task::spawn_blocking(move || {
        audit::write_lines(rx, out, |line| events.publish_line(Arc::from(line)));
    });
    log
}
