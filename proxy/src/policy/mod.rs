//! Policy as the proxy sees it: immutable snapshots of the compiled model, swapped
//! atomically, and the per-connection resolution of the rules that apply.

mod snapshot;

pub use snapshot::{ConnPolicy, Mode, Peer, PolicyStore, Snapshot};
