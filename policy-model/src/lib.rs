//! Ward's policy model: what CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
//! Kubernetes NetworkPolicy and the AdminNetworkPolicy family mean for a flow.
//!
//! Pipeline: YAML -> [`api`] objects (validated, with precise errors) -> internal
//! [`policy::Policy`] -> [`compile::Model`] (identities, ipcache, per-endpoint entries and
//! interned L7 rule sets) -> [`verdict`] decisions with explanations. No I/O happens here.

pub mod api;
pub mod cluster;
pub mod compile;
pub mod conformance;
pub mod error;
pub mod flow;
pub mod fqdn;
pub mod http;
pub mod identity;
pub mod l7;
pub mod labels;
pub mod lint;
pub mod policy;
pub mod selector;
mod shared_regex;
pub mod show;
pub mod tls;
pub mod verdict;

pub use cluster::{Cluster, EndpointRef};
pub use compile::{CompileOptions, Model};
pub use error::PolicyError;
pub use policy::{Direction, Protocol};
pub use verdict::{Query, Verdict};
