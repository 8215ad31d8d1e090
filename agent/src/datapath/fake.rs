//! An in-memory datapath for tests of the reconcile tasks: maps, attachments, conntrack
//! and drop counters as plain collections, drop events through a channel that stands for
//! the ring buffer ([`FakeDatapath::record_drop`], [`FakeDatapath::take_drop_events`]), and a journal of every change in the order it
//! happened, so a test can check what was written, in which order, and that nothing was
//! written at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use redirect_bpf::common::{ct_flags, DropEvent, EndpointInfo};
use redirect_bpf::{ConntrackFlow, Error, PolicyEntry};
use tokio::sync::mpsc;

use super::Datapath;
use crate::reconcile::drops::DropEventSource;
use crate::source::BoxFuture;

/// One change to the fake datapath, or a mark a test put between changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    SetIpcache(IpNet, u32),
    RemoveIpcache(IpNet),
    SetEndpoint(IpAddr, EndpointInfo),
    RemoveEndpoint(IpAddr),
    InsertPolicy(Vec<PolicyEntry>),
    RemovePolicy(Vec<PolicyEntry>),
    /// (identity, class)
    SetPeerClass(u32, u32),
    RemovePeerClass(u32),
    Attach(String),
    Detach(String),
    /// Conntrack entries removed because policy denies their flows.
    Revoke(Vec<ConntrackFlow>),
    /// Conntrack entries removed because they were idle.
    Expire(Vec<ConntrackFlow>),
    /// Put by a test ([`FakeDatapath::mark`]), to order its own observations among the
    /// writes.
    Mark(String),
}

impl Op {
    /// Whether the op changed a policy, ipcache or endpoints map.
    pub fn is_map_write(&self) -> bool {
        matches!(
            self,
            Op::SetIpcache(..)
                | Op::RemoveIpcache(_)
                | Op::SetEndpoint(..)
                | Op::RemoveEndpoint(_)
                | Op::InsertPolicy(_)
                | Op::RemovePolicy(_)
                | Op::SetPeerClass(..)
                | Op::RemovePeerClass(_)
        )
    }
}

/// Key of a policy entry: everything but its value.
pub type EntryKey = redirect_bpf::PolicyEntryKey;

/// The fake datapath. Its fields are the state; tests set them up and read them.
#[derive(Debug)]
pub struct FakeDatapath {
    pub ipcache: BTreeMap<IpNet, u32>,
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    pub policy: BTreeMap<EntryKey, PolicyEntry>,
    /// Peer identity -> class.
    pub peer_classes: BTreeMap<u32, u32>,
    /// Interfaces carrying Ward's programs.
    pub attached: BTreeSet<String>,
    pub conntrack: Vec<ConntrackFlow>,
    /// The clock `expire_conntrack` compares `last_seen_ns` with.
    pub now_ns: u64,
    /// The drop event "ring buffer": recorded events wait here for the reader.
    drop_tx: mpsc::UnboundedSender<DropEvent>,
    /// Its reading end, until [`FakeDatapath::take_drop_events`] hands it out.
    drop_rx: Option<mpsc::UnboundedReceiver<DropEvent>>,
    /// Kernel drop counters by reason.
    pub drop_counts: BTreeMap<u32, u64>,
    pub suppressed: u64,
    /// Every change, in order.
    pub journal: Vec<Op>,
    /// Map writes to fail (counted down, one per failed write).
    pub fail_writes: usize,
    /// Revocation walks done, also those that removed nothing.
    pub revocations: usize,
}

impl Default for FakeDatapath {
    fn default() -> FakeDatapath {
        let (drop_tx, drop_rx) = mpsc::unbounded_channel();
        FakeDatapath {
            ipcache: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            policy: BTreeMap::new(),
            peer_classes: BTreeMap::new(),
            attached: BTreeSet::new(),
            conntrack: Vec::new(),
            now_ns: 0,
            drop_counts: BTreeMap::new(),
            suppressed: 0,
            drop_tx,
            drop_rx: Some(drop_rx),
            journal: Vec::new(),
            fail_writes: 0,
            revocations: 0,
        }
    }
}

impl FakeDatapath {
    pub fn new() -> FakeDatapath {
        FakeDatapath::default()
    }

    /// Records a drop event, as the programs do into the ring buffer: it waits there
    /// until the reader takes it.
    pub fn record_drop(&mut self, e: DropEvent) {
        // the receiver is only gone when the reader was dropped: nobody to tell
        let _ = self.drop_tx.send(e);
    }

    /// Hands the drop events' reading end out, as the real datapath's `take_drop_events`
    /// does. A later call stands for a new agent process opening the pinned ring buffer:
    /// it gets a new reading end, and the earlier one gets nothing more.
    pub fn take_drop_events(&mut self) -> FakeDropEvents {
        let rx = self.drop_rx.take().unwrap_or_else(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.drop_tx = tx;
            rx
        });
        FakeDropEvents { rx }
    }

    /// Appends a mark to the journal.
    pub fn mark(&mut self, what: &str) {
        self.journal.push(Op::Mark(what.to_string()));
    }

    /// The journal so far; the journal starts again empty.
    pub fn take_journal(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.journal)
    }

    /// The policy entries as a set.
    pub fn policy_entries_set(&self) -> BTreeSet<PolicyEntry> {
        self.policy.values().copied().collect()
    }

    fn write(&mut self, op: Op) -> Result<(), Error> {
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            return Err(Error::Io {
                path: PathBuf::from("fake"),
                source: std::io::Error::other("injected map write failure"),
            });
        }
        self.journal.push(op);
        Ok(())
    }

    fn remove_flows(
        &mut self,
        mut doomed: impl FnMut(&ConntrackFlow) -> bool,
    ) -> Vec<ConntrackFlow> {
        let (gone, kept) = self.conntrack.drain(..).partition(|f| doomed(f));
        self.conntrack = kept;
        gone
    }
}

impl Datapath for FakeDatapath {
    fn set_ipcache(&mut self, net: IpNet, identity: u32) -> Result<(), Error> {
        self.write(Op::SetIpcache(net, identity))?;
        self.ipcache.insert(net, identity);
        Ok(())
    }

    fn remove_ipcache(&mut self, net: IpNet) -> Result<(), Error> {
        self.write(Op::RemoveIpcache(net))?;
        self.ipcache.remove(&net);
        Ok(())
    }

    fn set_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), Error> {
        self.write(Op::SetEndpoint(ip, info))?;
        self.endpoints.insert(ip, info);
        Ok(())
    }

    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), Error> {
        self.write(Op::RemoveEndpoint(ip))?;
        self.endpoints.remove(&ip);
        Ok(())
    }

    fn insert_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error> {
        self.write(Op::InsertPolicy(entries.to_vec()))?;
        for e in entries {
            self.policy.insert(e.key(), *e);
        }
        Ok(())
    }

    fn remove_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error> {
        self.write(Op::RemovePolicy(entries.to_vec()))?;
        for e in entries {
            self.policy.remove(&e.key());
        }
        Ok(())
    }

    fn set_peer_class(&mut self, identity: u32, class: u32) -> Result<(), Error> {
        self.write(Op::SetPeerClass(identity, class))?;
        self.peer_classes.insert(identity, class);
        Ok(())
    }

    fn remove_peer_class(&mut self, identity: u32) -> Result<(), Error> {
        self.write(Op::RemovePeerClass(identity))?;
        self.peer_classes.remove(&identity);
        Ok(())
    }

    fn peer_classes(&self) -> Result<Vec<(u32, u32)>, Error> {
        Ok(self.peer_classes.iter().map(|(i, c)| (*i, *c)).collect())
    }

    fn ipcache_entries(&self) -> Result<Vec<(IpNet, u32)>, Error> {
        Ok(self.ipcache.iter().map(|(n, i)| (*n, *i)).collect())
    }

    fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointInfo)>, Error> {
        Ok(self.endpoints.iter().map(|(ip, i)| (*ip, *i)).collect())
    }

    fn policy_entries(&self) -> Result<Vec<PolicyEntry>, Error> {
        Ok(self.policy.values().copied().collect())
    }

    fn attach(&mut self, iface: &str) -> Result<(), Error> {
        if self.attached.insert(iface.to_string()) {
            self.journal.push(Op::Attach(iface.to_string()));
        }
        Ok(())
    }

    fn detach(&mut self, iface: &str) -> Result<(), Error> {
        if self.attached.remove(iface) {
            self.journal.push(Op::Detach(iface.to_string()));
        }
        Ok(())
    }

    fn is_attached(&self, iface: &str) -> bool {
        self.attached.contains(iface)
    }

    fn attached_interfaces(&self) -> Result<Vec<String>, Error> {
        Ok(self.attached.iter().cloned().collect())
    }

    fn expire_conntrack(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error> {
        let now = self.now_ns;
        let gone = self.remove_flows(|f| {
            let limit = if f.flags & ct_flags::CLOSING != 0 {
                closing
            } else {
                idle
            };
            u128::from(now.saturating_sub(f.last_seen_ns)) > limit.as_nanos()
        });
        let n = gone.len();
        if n > 0 {
            self.journal.push(Op::Expire(gone));
        }
        Ok(n)
    }

    fn revoke_conntrack(
        &mut self,
        revoke: &mut dyn FnMut(&ConntrackFlow) -> bool,
    ) -> Result<usize, Error> {
        self.revocations += 1;
        let gone = self.remove_flows(revoke);
        let n = gone.len();
        if n > 0 {
            self.journal.push(Op::Revoke(gone));
        }
        Ok(n)
    }

    fn drops(&self, reason: u32) -> Result<u64, Error> {
        Ok(self.drop_counts.get(&reason).copied().unwrap_or(0))
    }

    fn events_suppressed(&self) -> Result<u64, Error> {
        Ok(self.suppressed)
    }
}

/// The reading end of the fake's drop events ([`FakeDatapath::take_drop_events`]).
#[derive(Debug)]
pub struct FakeDropEvents {
    rx: mpsc::UnboundedReceiver<DropEvent>,
}

impl DropEventSource for FakeDropEvents {
    fn next_batch(&mut self) -> BoxFuture<'_, std::io::Result<Vec<DropEvent>>> {
        Box::pin(async move {
            // The datapath is gone or has a newer reader: like a ring buffer nothing
            // writes to any more, this one stays empty.
            let Some(first) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            let mut batch = vec![first];
            while let Ok(e) = self.rx.try_recv() {
                batch.push(e);
            }
            Ok(batch)
        })
    }
}
