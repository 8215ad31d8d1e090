//! The hand-off to the datapath: learned IPs joining (or leaving) the identities of
//! toFQDNs selectors, and the question "does a live connection use this IP".

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

/// Whether a live connection (datapath conntrack) uses an IP.
pub trait InUse: Send + Sync + 'static {
    fn in_use(&self, ip: IpAddr) -> bool;
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
    fn in_use(&self, _ip: IpAddr) -> bool {
        false
    }
}
