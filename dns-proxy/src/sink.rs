//! The hand-off to the datapath: learned IPs joining (or leaving) the identities of
//! toFQDNs selectors, and the question "which IPs do live connections use".

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use serde::Serialize;

/// A boxed future, so the traits stay object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// IPs of one selector as observed by one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SelectorIps {
    /// The toFQDNs pattern (normalised text).
    pub selector: String,
    /// The label the IPs carry: `policy_model::identity::fqdn_key(selector, endpoint)`.
    pub label: String,
    pub ips: Vec<IpAddr>,
}

/// One change for the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Update {
    /// `ns/pod` of the endpoint that asked.
    pub endpoint: String,
    /// The DNS name the IPs were learned for.
    pub name: String,
    pub add: Vec<SelectorIps>,
    pub remove: Vec<SelectorIps>,
}

#[derive(Debug, thiserror::Error)]
#[error("datapath update failed: {0}")]
pub struct SinkError(pub String);

/// Where learned IPs go. `apply` resolves once the datapath enforces the update.
pub trait DatapathSink: Send + Sync + 'static {
    fn apply(&self, update: Update) -> BoxFuture<'static, Result<(), SinkError>>;
}

/// The addresses live connections use (datapath conntrack), read once per expiry sweep
/// on a blocking thread, with no lock of the proxy held: the query path never waits on
/// it, and a sweep costs one pass over the connections whatever number of IPs expire.
pub trait InUse: Send + Sync + 'static {
    /// Every address on either side of a live connection; an error skips the sweep
    /// (an expired IP stays until a later sweep can tell).
    fn live_ips(&self) -> Result<HashSet<IpAddr>, String>;
}

/// A sink that confirms at once (standalone mode, where no datapath exists).
#[derive(Clone, Copy, Debug, Default)]
pub struct NullSink;

impl DatapathSink for NullSink {
    fn apply(&self, _update: Update) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// No connection is ever in use.
#[derive(Clone, Copy, Debug, Default)]
pub struct NeverInUse;

impl InUse for NeverInUse {
    fn live_ips(&self) -> Result<HashSet<IpAddr>, String> {
        Ok(HashSet::new())
    }
}
