//! The datapath as the reconcile tasks see it: the operations they perform on the maps,
//! the attachments, conntrack and the drop counters, behind one trait. (The drop events
//! are not in it: their ring buffer is handed out of the datapath at start, to a reader
//! of its own, [`crate::reconcile::drops::EventReader`].) The kernel loader
//! ([`redirect_bpf::Datapath`]) implements it; [`fake::FakeDatapath`] keeps everything in
//! memory and journals every write, so that the tasks are tested without root.
//!
//! The map layout (`PolicyEntry`, `EndpointInfo`, the conntrack flow, drop events) is
//! redirect-bpf's; this trait only names what the agent does with it.

pub mod fake;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use redirect_bpf::common::EndpointInfo;
use redirect_bpf::{ConntrackFlow, Error, PolicyEntry};

pub use fake::{FakeDatapath, FakeDropEvents};

/// What the reconcile tasks do with the datapath. Map writes are synchronous: when a write
/// returns, the kernel enforces it. Removals of absent keys succeed (nothing to do).
pub trait Datapath: Send + 'static {
    /// Maps a prefix to a numeric identity.
    fn set_ipcache(&mut self, net: IpNet, identity: u32) -> Result<(), Error>;
    /// Removes a prefix from the ipcache.
    fn remove_ipcache(&mut self, net: IpNet) -> Result<(), Error>;
    /// Declares a local endpoint by one of its addresses.
    fn set_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), Error>;
    /// Removes a local endpoint's address.
    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), Error>;
    /// Writes policy entries (an entry with the same key is replaced).
    fn insert_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error>;
    /// Removes policy entries by key.
    fn remove_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error>;
    /// Puts a peer identity in a class (`redirect_bpf::PeerClasses`).
    fn set_peer_class(&mut self, identity: u32, class: u32) -> Result<(), Error>;
    /// Takes a peer identity out of its class.
    fn remove_peer_class(&mut self, identity: u32) -> Result<(), Error>;

    /// Every ipcache entry (read back at start: a restarted agent diffs against it).
    fn ipcache_entries(&self) -> Result<Vec<(IpNet, u32)>, Error>;
    /// Every endpoints map entry.
    fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointInfo)>, Error>;
    /// Every policy map entry.
    fn policy_entries(&self) -> Result<Vec<PolicyEntry>, Error>;
    /// Every (identity, class) of the peer classes map.
    fn peer_classes(&self) -> Result<Vec<(u32, u32)>, Error>;

    /// Attaches the pod programs to a pod's host-side interface (idempotent).
    fn attach(&mut self, iface: &str) -> Result<(), Error>;
    /// Detaches Ward's programs from an interface (idempotent).
    fn detach(&mut self, iface: &str) -> Result<(), Error>;
    /// Whether the interface, as it is now, carries the pod programs.
    fn is_attached(&self, iface: &str) -> bool;
    /// Interfaces that carry Ward's programs (pod veths and uplinks).
    fn attached_interfaces(&self) -> Result<Vec<String>, Error>;

    /// Removes conntrack entries idle longer than `idle`, and closed flows idle longer
    /// than `closing`; returns how many.
    fn expire_conntrack(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error>;
    /// Removes the conntrack entries of the flows `revoke` picks; returns how many.
    fn revoke_conntrack(
        &mut self,
        revoke: &mut dyn FnMut(&ConntrackFlow) -> bool,
    ) -> Result<usize, Error>;

    /// The kernel's drop counter of a reason.
    fn drops(&self, reason: u32) -> Result<u64, Error>;
    /// Drop events the rate limit held back.
    fn events_suppressed(&self) -> Result<u64, Error>;
}

/// The datapath shared by the tasks: each takes the lock for one operation (or one diff)
/// at a time. The policy publisher is the only writer of the policy maps, the endpoint
/// attacher the only one of attachments, the conntrack task the only remover of flows.
pub struct Shared<D>(Arc<Mutex<D>>);

impl<D> Clone for Shared<D> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<D: Datapath> Shared<D> {
    pub fn new(dp: D) -> Shared<D> {
        Shared(Arc::new(Mutex::new(dp)))
    }

    /// The datapath, locked. A task that panicked holding the lock left the maps as they
    /// were after its last write: they are still usable.
    pub fn lock(&self) -> MutexGuard<'_, D> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Datapath for redirect_bpf::Datapath {
    fn set_ipcache(&mut self, net: IpNet, identity: u32) -> Result<(), Error> {
        redirect_bpf::Datapath::set_ipcache(self, net, identity)
    }

    fn remove_ipcache(&mut self, net: IpNet) -> Result<(), Error> {
        absent_is_fine(redirect_bpf::Datapath::remove_ipcache(self, net))
    }

    fn set_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), Error> {
        redirect_bpf::Datapath::set_endpoint(self, ip, info)
    }

    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), Error> {
        absent_is_fine(redirect_bpf::Datapath::remove_endpoint(self, ip))
    }

    fn insert_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error> {
        redirect_bpf::Datapath::insert_policy(self, entries)
    }

    fn remove_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error> {
        redirect_bpf::Datapath::remove_policy(self, entries)
    }

    fn set_peer_class(&mut self, identity: u32, class: u32) -> Result<(), Error> {
        redirect_bpf::Datapath::set_peer_class(self, identity, class)
    }

    fn remove_peer_class(&mut self, identity: u32) -> Result<(), Error> {
        absent_is_fine(redirect_bpf::Datapath::remove_peer_class(self, identity))
    }

    fn peer_classes(&self) -> Result<Vec<(u32, u32)>, Error> {
        redirect_bpf::Datapath::peer_classes(self)
    }

    fn ipcache_entries(&self) -> Result<Vec<(IpNet, u32)>, Error> {
        redirect_bpf::Datapath::ipcache_entries(self)
    }

    fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointInfo)>, Error> {
        redirect_bpf::Datapath::endpoints(self)
    }

    fn policy_entries(&self) -> Result<Vec<PolicyEntry>, Error> {
        redirect_bpf::Datapath::policy_entries(self)
    }

    fn attach(&mut self, iface: &str) -> Result<(), Error> {
        redirect_bpf::Datapath::attach(self, iface)
    }

    fn detach(&mut self, iface: &str) -> Result<(), Error> {
        redirect_bpf::Datapath::detach(self, iface)
    }

    fn is_attached(&self, iface: &str) -> bool {
        redirect_bpf::Datapath::is_attached(self, iface)
    }

    fn attached_interfaces(&self) -> Result<Vec<String>, Error> {
        redirect_bpf::Datapath::attached_interfaces(self)
    }

    fn expire_conntrack(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error> {
        redirect_bpf::Datapath::expire_conntrack(self, idle, closing)
    }

    fn revoke_conntrack(
        &mut self,
        revoke: &mut dyn FnMut(&ConntrackFlow) -> bool,
    ) -> Result<usize, Error> {
        redirect_bpf::Datapath::revoke_conntrack(self, revoke)
    }

    fn drops(&self, reason: u32) -> Result<u64, Error> {
        redirect_bpf::Datapath::drops(self, reason)
    }

    fn events_suppressed(&self) -> Result<u64, Error> {
        redirect_bpf::Datapath::events_suppressed(self)
    }
}

/// A removal whose key was not there has nothing to do.
fn absent_is_fine(r: Result<(), Error>) -> Result<(), Error> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}
