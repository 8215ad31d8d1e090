//! The audit log: both proxies' records, written unchanged as JSON lines, and published
//! on the event stream with their `type`. Records reach this writer through the proxies'
//! own bounded queues.

use std::io::Write;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::events::Events;
use crate::admin::api::Event;

/// Where audit records are written.
pub enum AuditSink {
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

    fn write(&mut self, line: &str) {
        let r = match self {
            AuditSink::None => Ok(()),
            AuditSink::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush())
            }
            AuditSink::File(f) => writeln!(f, "{line}"),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "audit log write failed");
        }
    }
}

/// Writes the records of both proxies to the audit log and the event stream, until both
/// channels close. Runs on a blocking thread: file writes never stall the data path.
pub fn pump_audit(
    mut http: mpsc::Receiver<proxy::Record>,
    mut dns: mpsc::Receiver<dns_proxy::audit::AuditRecord>,
    mut sink: AuditSink,
    events: Events,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, Map<String, Value>)>();
    let t1 = tx.clone();
    tokio::spawn(async move {
        while let Some(r) = http.recv().await {
            if t1.send((true, to_map(&r))).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(r) = dns.recv().await {
            if tx.send((false, to_map(&r))).is_err() {
                return;
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        while let Some((http, m)) = rx.blocking_recv() {
            sink.write(&Value::Object(m.clone()).to_string());
            events.publish(&if http { Event::Http(m) } else { Event::Dns(m) });
        }
    });
}

fn to_map<T: Serialize>(r: &T) -> Map<String, Value> {
    match serde_json::to_value(r) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
