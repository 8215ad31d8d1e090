//! One audit record per query, handed to the shared audit queue without waiting: a slow
//! log never slows DNS; when the queue is full the record is dropped and counted in
//! `ward_audit_dropped_total{type="dns"}`. The record type lives in the `audit` crate,
//! which owns the one audit stream of both proxies and the datapath; its fields are
//! documented in this crate's README.

pub use ::audit::dns::{rfc3339, Record as AuditRecord, Source, Verdict};
pub use ::audit::{write_lines, AuditEvent, AuditLog as Audit, DroppedCounter};
