//! What the agent tells its operator: metrics, the event stream of drops and audit
//! records, and the audit log.

pub mod events;
pub mod metrics;
