//! The reconcile tasks: what keeps the datapath and the proxies in step with the source.

pub mod endpoints;
pub mod fqdn;
pub mod identities;
pub mod maps;
pub mod publisher;
pub mod rebuild;
pub mod revoke;
