//! The audit stream: every HTTP request, DNS query and datapath drop becomes one
//! [`AuditEvent`], a JSON line whose `type` field (`http`, `dns`, `drop`) says which
//! schema the rest of the line follows. The proxies and the agent's drop reader hand
//! events to one bounded [`AuditLog`] and never wait on it: when the queue is full the
//! event is dropped and counted in `ward_audit_dropped_total{type}`. One writer
//! ([`write_lines`]) turns the queue into lines on a blocking thread.
//!
//! The record types keep the schemas users already parse: HTTP records use the field
//! names of Cilium's access-log `LogRecord`; DNS records and drops use lower-case names.

pub mod dns;
pub mod drop;
pub mod http;
mod log;
mod writer;

use serde::{Deserialize, Serialize};

pub use log::{AuditLog, DroppedCounter};
pub use writer::write_lines;

/// One line of the audit stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AuditEvent {
    /// One HTTP request, decided by the HTTP proxy.
    Http(http::Record),
    /// One DNS query, decided by the DNS proxy.
    Dns(dns::Record),
    /// A packet the datapath dropped.
    Drop(drop::Record),
}

impl AuditEvent {
    /// The `type` tag, also the `type` label of `ward_audit_dropped_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::Http(_) => "http",
            AuditEvent::Dns(_) => "dns",
            AuditEvent::Drop(_) => "drop",
        }
    }

    /// The event as one JSON line without its newline.
    pub fn to_line(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }
}

impl From<http::Record> for AuditEvent {
    fn from(r: http::Record) -> AuditEvent {
        AuditEvent::Http(r)
    }
}

impl From<dns::Record> for AuditEvent {
    fn from(r: dns::Record) -> AuditEvent {
        AuditEvent::Dns(r)
    }
}

impl From<drop::Record> for AuditEvent {
    fn from(r: drop::Record) -> AuditEvent {
        AuditEvent::Drop(r)
    }
}
