//! The access log: one record per request, handed to the shared audit queue
//! ([`::audit::AuditLog`]) without waiting; a full queue drops the record and counts it
//! in `ward_audit_dropped_total{type="http"}`. The record types live in the `audit`
//! crate, which owns the one audit stream of the HTTP proxy, the DNS proxy and the
//! datapath; field names follow Cilium's access-log `LogRecord` (see the crate README).

pub use ::audit::http::{timestamp, Endpoint, Http, Record, Rule, Verdict};
pub use ::audit::{AuditEvent, AuditLog, DroppedCounter};
