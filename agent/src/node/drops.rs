//! The drop event reader: a task of its own that sleeps on the datapath's ring buffer
//! (tokio's `AsyncFd`, woken by the kernel when a drop is recorded) and moves each event
//! to the event stream, naming the pods of its addresses from the model in force. It
//! holds no lock of the datapath: the ring buffer was handed out of it at start.

use std::net::IpAddr;
use std::sync::Arc;

use redirect_bpf::AsyncDropEvents;

use super::events::{drop_event, Events};

/// Publishes drop events until the ring buffer cannot be read any more.
pub async fn read(mut ring: AsyncDropEvents, events: Events, policy: Arc<proxy::PolicyStore>) {
    loop {
        let batch = match ring.next_batch().await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "reading drop events stopped");
                return;
            }
        };
        let snapshot = policy.load();
        let pod_of = |ip: IpAddr| snapshot.model.endpoint_of_ip(ip).map(|e| e.name.clone());
        for e in &batch {
            events.publish(&drop_event(e, pod_of));
        }
    }
}
