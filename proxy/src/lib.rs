//! Ward's L7 HTTP proxy: receives connections the datapath steered to it (or, standalone,
//! every connection of a listener), enforces the HTTP rules of the compiled policy on
//! every request, forwards what is allowed to the original destination, answers what is
//! denied with 403, and writes one audit record per request.
//!
//! The path of a connection: [`listener`] -> [`detect`] -> [`server`] (hyper HTTP/1.1 or
//! h2c) -> [`request`] (one normalised form, decided on and forwarded) -> [`policy`]
//! (resolved per connection, re-checked per request against the snapshot generation) ->
//! [`upstream`] -> [`audit`] and [`metrics`].

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod detect;
pub mod framing;
pub mod h2budget;
pub mod idle;
pub mod listener;
pub mod metrics;
pub mod normalize;
pub mod policy;
pub mod request;
pub mod server;
pub mod upstream;

pub use audit::{AuditEvent, AuditLog, DroppedCounter, Record, Verdict};
pub use config::Config;
pub use listener::{Accepted, FixedListener, Listener, TransparentListener};
pub use metrics::Metrics;
pub use policy::{Mode, PolicyStore, Snapshot};
pub use server::{Decided, Observer, Proxy};
