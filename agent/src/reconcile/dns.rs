//! The DNS hand-off lane: the DNS proxy's learned IPs go to the policy publisher on a
//! channel of their own, which the publisher serves before anything else and which no
//! other task's work (endpoint discovery, conntrack sweeps, drop events) stands in. Each
//! update is confirmed once the datapath enforces it, so an answer reaches the pod only
//! after its IPs are in the maps.

use std::collections::HashSet;
use std::net::IpAddr;

use dns_proxy::sink::{BoxFuture, SinkError};
use dns_proxy::{DatapathSink, InUse, Update};
use tokio::sync::{mpsc, oneshot};

/// Hand-offs the lane holds before the DNS proxy waits to queue more.
pub const CAPACITY: usize = 1024;

/// One hand-off: the update, and where its outcome goes once the datapath has it.
pub struct Request {
    pub update: Update,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The DNS proxy's end of the lane.
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::Sender<Request>,
}

/// A lane and the publisher's end of it.
pub fn lane() -> (Lane, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    (Lane { tx }, rx)
}

impl DatapathSink for Lane {
    fn apply(&self, update: Update) -> BoxFuture<'static, Result<(), SinkError>> {
        let tx = self.tx.clone();
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            tx.send(Request { update, done })
                .await
                .map_err(|_| SinkError("the policy publisher stopped".into()))?;
            match wait.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError(e)),
                Err(_) => Err(SinkError("the policy publisher dropped the update".into())),
            }
        })
    }
}

/// The IPs live connections use, from the datapath's conntrack maps, read without the
/// datapath's lock (policy pushes and learned answers do not wait for the pass).
pub struct Conntrack(pub redirect_bpf::ConntrackView);

impl InUse for Conntrack {
    fn live_ips(&self) -> Result<HashSet<IpAddr>, String> {
        self.0.live_ips().map_err(|e| e.to_string())
    }
}
