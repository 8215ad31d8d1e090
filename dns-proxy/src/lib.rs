//! Ward's DNS proxy: enforces DNS rules on the queries of redirected pods, forwards the
//! allowed ones to the server the pod asked, learns from each answer which IPs belong
//! to names that `toFQDNs` selectors match, hands them to the datapath and only then
//! releases the answer. See README.md for configuration, audit fields and metrics.

#![forbid(unsafe_code)]

pub mod audit;
pub mod busy_poll;
pub mod cache;
pub mod config;
pub mod forward;
pub mod known;
pub mod limits;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod persist;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod read;
pub mod sink;
pub mod socket;
pub mod udp_pool;
pub mod wire;

pub use config::{Config, RefuseCode};
pub use policy::Scope;
pub use proxy::{Proxy, QueryContext, Transport};
pub use sink::{DatapathSink, InUse, NeverInUse, NullSink, SelectorIps, Update};
