//! Loads the eBPF object, pins its maps under a bpffs root (reusing them after a restart),
//! attaches the programs to interfaces (TCX on kernels >= 6.6) with pinned links, and
//! reads and writes the maps.

use std::fs;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use redirect_bpf_common::{
    ct_flags, map_names, program_names, CtKeyV4, CtKeyV6, CtValue, DropEvent, EndpointInfo,
    EventRate, IpcacheValue, PolicyKeyData, PolicyValue, POLICY_FIXED_BITS,
};

use crate::compile::PolicyEntry;
use crate::events::DropEvents;
use crate::pinned::{self, ReplacedMap};
use crate::Error;

/// The default bpffs root of Ward's pins.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/ward";

/// The object built by `cargo xtask build-ebpf`, or empty when it was not built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ward-redirect.o"));

/// Whether this build carries the eBPF object.
pub fn object_embedded() -> bool {
    !OBJECT.is_empty()
}

/// The embedded eBPF object.
#[cfg(test)]
pub(crate) fn object() -> &'static [u8] {
    OBJECT
}

/// The sizes of the maps that grow with the cluster and the node. A size that differs
/// from the pinned map's replaces that map at load, its entries carried over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Policy map entries: (endpoint, peer class, direction, protocol, port block)
    /// over all local endpoints. An LPM trie allocated as it fills.
    pub policy: u32,
}

impl Default for MapSizes {
    fn default() -> MapSizes {
        MapSizes {
            policy: redirect_bpf_common::POLICY_MAX,
        }
    }
}

/// The loaded datapath: programs ready to attach, maps pinned under `root`.
pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    ipcache_v4: LpmTrie<MapData, [u8; 4], IpcacheValue>,
    ipcache_v6: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    endpoints_v4: HashMap<MapData, [u8; 4], EndpointInfo>,
    endpoints_v6: HashMap<MapData, [u8; 16], EndpointInfo>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    peer_classes: HashMap<MapData, u32, u32>,
    conntrack_v4: HashMap<MapData, CtKeyV4, CtValue>,
    conntrack_v6: HashMap<MapData, CtKeyV6, CtValue>,
    drops: PerCpuArray<MapData, u64>,
    /// None once [`Datapath::take_drop_events`] handed it out.
    events: Option<DropEvents>,
    event_rate: PerCpuArray<MapData, EventRate>,
    /// Pinned maps of another definition this load replaced.
    replaced: Vec<ReplacedMap>,
}

/// The hooks of a pod's host-side veth.
const POD_HOOKS: [(&str, TcAttachType, &str); 2] = [
    (program_names::FROM_POD, TcAttachType::Ingress, "ingress"),
    (program_names::TO_POD, TcAttachType::Egress, "egress"),
];

/// The hook of a node's uplink.
const UPLINK_HOOKS: [(&str, TcAttachType, &str); 1] = [(
    program_names::FROM_UPLINK,
    TcAttachType::Ingress,
    "uplink-ingress",
)];

const PROGRAMS: [&str; 3] = [
    program_names::FROM_POD,
    program_names::TO_POD,
    program_names::FROM_UPLINK,
];

impl Datapath {
    /// Loads the object with its maps pinned under `root` (created, and bpffs mounted on
    /// /sys/fs/bpf, when missing). Maps already pinned there are reused, so their
    /// content survives a restart of the agent.
    pub fn load(root: &Path) -> Result<Datapath, Error> {
        Datapath::load_sized(root, MapSizes::default())
    }

    /// [`Datapath::load`] with map sizes of the caller's. A pinned map whose definition
    /// differs from the object's with these sizes (an earlier release's, or other sizes)
    /// is replaced, its entries carried over when key and value are unchanged
    /// ([`Datapath::replaced_maps`]); the programs still attached keep reading the old map
    /// until [`Datapath::attach`] moves their links to the new programs.
    pub fn load_sized(root: &Path, sizes: MapSizes) -> Result<Datapath, Error> {
        if !object_embedded() {
            return Err(Error::ObjectMissing);
        }
        ensure_bpffs(root)?;
        fs::create_dir_all(root.join("links")).map_err(|e| Error::io(root, e))?;
        let overrides: std::collections::HashMap<&str, u32> =
            [(map_names::POLICY, sizes.policy)].into();
        let defs = pinned::object_defs(OBJECT, &overrides)?;
        let unpinned = pinned::unpin_mismatched(root, &defs)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(root);
        for (name, size) in &overrides {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        for name in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(Error::NoSuchProgram(name))?
                .try_into()
                .map_err(|e| Error::program(name, e))?;
            prog.load().map_err(|e| Error::program(name, e))?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(Error::NoSuchMap(name));
        let ipcache_v4 = take(map_names::IPCACHE_V4)?;
        let ipcache_v6 = take(map_names::IPCACHE_V6)?;
        let endpoints_v4 = take(map_names::ENDPOINTS_V4)?;
        let endpoints_v6 = take(map_names::ENDPOINTS_V6)?;
        let policy = take(map_names::POLICY)?;
        let peer_classes = take(map_names::PEER_CLASSES)?;
        let conntrack_v4 = take(map_names::CONNTRACK_V4)?;
        let conntrack_v6 = take(map_names::CONNTRACK_V6)?;
        let drops = take(map_names::DROPS)?;
        let events =
            DropEvents::new(RingBuf::try_from(take(map_names::EVENTS)?).map_err(Error::map)?);
        let event_rate = take(map_names::EVENT_RATE)?;
        let mut dp = Datapath {
            root: root.to_path_buf(),
            ipcache_v4: LpmTrie::try_from(ipcache_v4).map_err(Error::map)?,
            ipcache_v6: LpmTrie::try_from(ipcache_v6).map_err(Error::map)?,
            endpoints_v4: HashMap::try_from(endpoints_v4).map_err(Error::map)?,
            endpoints_v6: HashMap::try_from(endpoints_v6).map_err(Error::map)?,
            policy: LpmTrie::try_from(policy).map_err(Error::map)?,
            peer_classes: HashMap::try_from(peer_classes).map_err(Error::map)?,
            conntrack_v4: HashMap::try_from(conntrack_v4).map_err(Error::map)?,
            conntrack_v6: HashMap::try_from(conntrack_v6).map_err(Error::map)?,
            drops: PerCpuArray::try_from(drops).map_err(Error::map)?,
            events: Some(events),
            event_rate: PerCpuArray::try_from(event_rate).map_err(Error::map)?,
            ebpf,
            replaced: Vec::new(),
        };
        for old in unpinned {
            dp.carry_over(old)?;
        }
        Ok(dp)
    }

    /// Pinned maps of another definition that this load replaced, and what was carried.
    pub fn replaced_maps(&self) -> &[ReplacedMap] {
        &self.replaced
    }

    /// Copies the entries of a replaced map into its successor when key and value are
    /// unchanged: the state the programs enforce (endpoints, identities, policy) and the
    /// flows they track. Counters and the ring buffer start anew.
    fn carry_over(&mut self, old: pinned::Unpinned) -> Result<(), Error> {
        let pinned::Unpinned { mut replaced, map } = old;
        let (p, l) = (replaced.pinned, replaced.loaded);
        let same_shape =
            p.map_type == l.map_type && p.key_size == l.key_size && p.value_size == l.value_size;
        replaced.carried = if !same_shape {
            None
        } else {
            match replaced.name.as_str() {
                map_names::IPCACHE_V4 => Some(copy_lpm(map, &mut self.ipcache_v4)?),
                map_names::IPCACHE_V6 => Some(copy_lpm(map, &mut self.ipcache_v6)?),
                map_names::POLICY => Some(copy_lpm(map, &mut self.policy)?),
                map_names::PEER_CLASSES => Some(copy_hash(map, &mut self.peer_classes)?),
                map_names::ENDPOINTS_V4 => Some(copy_hash(map, &mut self.endpoints_v4)?),
                map_names::ENDPOINTS_V6 => Some(copy_hash(map, &mut self.endpoints_v6)?),
                map_names::CONNTRACK_V4 => Some(copy_hash(map, &mut self.conntrack_v4)?),
                map_names::CONNTRACK_V6 => Some(copy_hash(map, &mut self.conntrack_v6)?),
                _ => None,
            }
        };
        self.replaced.push(replaced);
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file descriptor of a loaded program (one of `program_names`), for measuring
    /// it with `BPF_PROG_TEST_RUN` on packets of one's own (the datapath load test).
    pub fn program_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>, Error> {
        let prog = self.ebpf.program(name).ok_or(Error::NoSuchProgram(name))?;
        let fd = prog.fd().map_err(|e| Error::program(name, e))?;
        Ok(fd.as_fd())
    }

    fn link_pin(&self, iface: &str, ifindex: u32, hook: &str) -> PathBuf {
        self.root
            .join("links")
            // bpffs refuses names with a dot; interface names cannot hold a colon.
            .join(format!("{iface}:{ifindex}:{hook}"))
    }

    /// Attaches the pod programs to a pod's host-side veth `iface` (looked up in the
    /// calling thread's network namespace). Idempotent: a hook that already has Ward's
    /// pinned link is left alone, and pins of an earlier interface of the same name
    /// (another ifindex) are dropped.
    pub fn attach(&mut self, iface: &str) -> Result<(), Error> {
        self.attach_hooks(iface, &POD_HOOKS)
    }

    /// Attaches the uplink program to the node's uplink `iface`, as `attach` does.
    pub fn attach_uplink(&mut self, iface: &str) -> Result<(), Error> {
        self.attach_hooks(iface, &UPLINK_HOOKS)
    }

    fn attach_hooks(
        &mut self,
        iface: &str,
        hooks: &[(&'static str, TcAttachType, &str)],
    ) -> Result<(), Error> {
        let ifindex = ifindex(iface)?;
        self.remove_stale_links(iface, ifindex)?;
        for &(name, attach_type, hook) in hooks {
            let pin = self.link_pin(iface, ifindex, hook);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(Error::NoSuchProgram(name))?
                .try_into()
                .map_err(|e| Error::program(name, e))?;
            if pin.exists() {
                move_link(prog, name, &pin)?;
                continue;
            }
            let id = prog
                .attach(iface, attach_type)
                .map_err(|e| Error::program(name, e))?;
            let link = prog.take_link(id).map_err(|e| Error::program(name, e))?;
            let link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| Error::Link(e.to_string()))?;
            link.pin(&pin)
                .map_err(|e| Error::Link(format!("pin {}: {e:?}", pin.display())))?;
        }
        Ok(())
    }

    /// Detaches Ward's programs from `iface`. Idempotent.
    pub fn detach(&mut self, iface: &str) -> Result<(), Error> {
        let links = self.root.join("links");
        let prefix = format!("{iface}:");
        for entry in fs::read_dir(&links).map_err(|e| Error::io(&links, e))? {
            let entry = entry.map_err(|e| Error::io(&links, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                unpin(&entry.path())?;
            }
        }
        Ok(())
    }

    fn remove_stale_links(&self, iface: &str, ifindex: u32) -> Result<(), Error> {
        let links = self.root.join("links");
        let prefix = format!("{iface}:");
        let current = format!("{iface}:{ifindex}:");
        for entry in fs::read_dir(&links).map_err(|e| Error::io(&links, e))? {
            let entry = entry.map_err(|e| Error::io(&links, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && !name.starts_with(&current) {
                unpin(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Maps a prefix to a numeric identity.
    pub fn set_ipcache(&mut self, net: IpNet, identity: u32) -> Result<(), Error> {
        let v = IpcacheValue { identity, flags: 0 };
        match net {
            IpNet::V4(n) => self.ipcache_v4.insert(
                &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                v,
                0,
            ),
            IpNet::V6(n) => self.ipcache_v6.insert(
                &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                v,
                0,
            ),
        }
        .map_err(Error::map)
    }

    pub fn remove_ipcache(&mut self, net: IpNet) -> Result<(), Error> {
        match net {
            IpNet::V4(n) => self
                .ipcache_v4
                .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V6(n) => self
                .ipcache_v6
                .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
        }
        .map_err(Error::map)
    }

    /// Declares a local pod endpoint by one of its addresses.
    pub fn set_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), Error> {
        match ip {
            IpAddr::V4(ip) => self.endpoints_v4.insert(ip.octets(), info, 0),
            IpAddr::V6(ip) => self.endpoints_v6.insert(ip.octets(), info, 0),
        }
        .map_err(Error::map)
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), Error> {
        match ip {
            IpAddr::V4(ip) => self.endpoints_v4.remove(&ip.octets()),
            IpAddr::V6(ip) => self.endpoints_v6.remove(&ip.octets()),
        }
        .map_err(Error::map)
    }

    fn policy_key(e: &PolicyEntry) -> Key<PolicyKeyData> {
        Key::new(
            POLICY_FIXED_BITS + u32::from(e.port_prefix_len),
            e.key_data(),
        )
    }

    /// Writes policy entries (an entry with the same key is replaced).
    pub fn insert_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error> {
        for e in entries {
            self.policy
                .insert(&Self::policy_key(e), e.value(), 0)
                .map_err(Error::map)?;
        }
        Ok(())
    }

    /// Removes policy entries by key; missing ones are ignored.
    pub fn remove_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), Error> {
        for e in entries {
            match self.policy.remove(&Self::policy_key(e)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map(e)),
            }
        }
        Ok(())
    }

    /// Puts a peer identity in a class (the `peer` of the policy entries that apply to it).
    pub fn set_peer_class(&mut self, identity: u32, class: u32) -> Result<(), Error> {
        self.peer_classes
            .insert(identity, class, 0)
            .map_err(Error::map)
    }

    /// Takes a peer identity out of its class: policy entries of the identity itself
    /// and of every peer apply to it.
    pub fn remove_peer_class(&mut self, identity: u32) -> Result<(), Error> {
        self.peer_classes.remove(&identity).map_err(Error::map)
    }

    /// Every (identity, class) of the peer classes map.
    pub fn peer_classes(&self) -> Result<Vec<(u32, u32)>, Error> {
        self.peer_classes
            .iter()
            .map(|item| item.map_err(Error::map))
            .collect()
    }

    /// Moves an endpoint's policy from `old` to `new` entries: writes every new entry
    /// first (replacing same keys in place), then removes the old keys that are gone, so
    /// that a flow allowed before and after never meets a transient deny. When this
    /// returns, the kernel has the new policy (map updates are synchronous).
    pub fn update_policy(&mut self, old: &[PolicyEntry], new: &[PolicyEntry]) -> Result<(), Error> {
        self.insert_policy(new)?;
        let kept: std::collections::HashSet<_> = new.iter().map(PolicyEntry::key).collect();
        let gone: Vec<PolicyEntry> = old
            .iter()
            .filter(|e| !kept.contains(&e.key()))
            .copied()
            .collect();
        self.remove_policy(&gone)
    }

    /// Every ipcache entry in the maps, so that an agent starting on pinned maps can diff
    /// against what the previous run left.
    pub fn ipcache_entries(&self) -> Result<Vec<(IpNet, u32)>, Error> {
        let mut out = Vec::new();
        for item in self.ipcache_v4.iter() {
            let (k, v) = item.map_err(Error::map)?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(32);
            if let Ok(n) = ipnet::Ipv4Net::new(k.data().into(), len) {
                out.push((IpNet::V4(n), v.identity));
            }
        }
        for item in self.ipcache_v6.iter() {
            let (k, v) = item.map_err(Error::map)?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(128);
            if let Ok(n) = ipnet::Ipv6Net::new(k.data().into(), len) {
                out.push((IpNet::V6(n), v.identity));
            }
        }
        Ok(out)
    }

    /// Every endpoints map entry: address and endpoint info.
    pub fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointInfo)>, Error> {
        let mut out = Vec::new();
        for item in self.endpoints_v4.iter() {
            let (k, v) = item.map_err(Error::map)?;
            out.push((IpAddr::from(k), v));
        }
        for item in self.endpoints_v6.iter() {
            let (k, v) = item.map_err(Error::map)?;
            out.push((IpAddr::from(k), v));
        }
        Ok(out)
    }

    /// Every policy map entry, as `insert_policy` takes them.
    pub fn policy_entries(&self) -> Result<Vec<PolicyEntry>, Error> {
        let mut out = Vec::new();
        for item in self.policy.iter() {
            let (k, v) = item.map_err(Error::map)?;
            let d = k.data();
            out.push(PolicyEntry {
                endpoint_id: d.endpoint_id,
                peer: d.peer,
                direction: d.direction,
                protocol: d.protocol,
                port: u16::from_be_bytes(d.port),
                port_prefix_len: u8::try_from(k.prefix_len().saturating_sub(POLICY_FIXED_BITS))
                    .unwrap_or(16),
                action: v.action,
                proxy_port: v.proxy_port,
                cookie: v.cookie,
            });
        }
        Ok(out)
    }

    /// Names of the interfaces that carry Ward's pinned links (pod veths and uplinks).
    pub fn attached_interfaces(&self) -> Result<Vec<String>, Error> {
        let links = self.root.join("links");
        let mut out = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&links).map_err(|e| Error::io(&links, e))? {
            let entry = entry.map_err(|e| Error::io(&links, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((iface, _)) = name.split_once(':') {
                out.insert(iface.to_string());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Whether `iface` (as it is now, by ifindex) has Ward's pod programs attached.
    pub fn is_attached(&self, iface: &str) -> bool {
        let Ok(ifindex) = ifindex(iface) else {
            return false;
        };
        POD_HOOKS
            .iter()
            .all(|(_, _, hook)| self.link_pin(iface, ifindex, hook).exists())
    }

    /// The drop count of a reason, summed over CPUs.
    pub fn drops(&self, reason: u32) -> Result<u64, Error> {
        let values = self.drops.get(&reason, 0).map_err(Error::map)?;
        Ok(values.iter().sum())
    }

    /// Drop events not reported because of the rate limit, summed over CPUs.
    pub fn events_suppressed(&self) -> Result<u64, Error> {
        let values = self.event_rate.get(&0, 0).map_err(Error::map)?;
        Ok(values.iter().map(|r| r.suppressed).sum())
    }

    /// Drains the drop events queued so far (none once [`Datapath::take_drop_events`]
    /// handed the ring buffer out).
    pub fn drain_events(&mut self) -> Vec<DropEvent> {
        self.events
            .as_mut()
            .map(DropEvents::drain)
            .unwrap_or_default()
    }

    /// Hands the drop event ring buffer to a reader of its own (the agent reads it
    /// asynchronously, [`DropEvents::into_async`], without holding the datapath). A ring
    /// buffer has one consumer: the first call gets it, later ones None.
    pub fn take_drop_events(&mut self) -> Option<DropEvents> {
        self.events.take()
    }

    /// Removes conntrack entries idle for longer than `idle`, and closed TCP flows (FIN or
    /// RST seen) idle for longer than `closing`. Returns how many were removed. The map
    /// is an LRU as well, so this keeps it accurate rather than merely bounded.
    pub fn expire_conntrack(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error> {
        let now = monotonic_ns()?;
        self.remove_conntrack(expired(now, idle, closing))
    }

    /// Removes the conntrack entries of the flows `revoke` says policy no longer allows,
    /// and returns how many were removed. Without its entry, the next packet of such a
    /// flow is decided by policy again as a new one and dropped: an established
    /// connection that a policy change denies stops, as Cilium's per-packet policy
    /// lookup makes it (the map is read once; entries created meanwhile are left alone).
    pub fn revoke_conntrack(
        &mut self,
        revoke: impl FnMut(&ConntrackFlow) -> bool,
    ) -> Result<usize, Error> {
        self.remove_conntrack(revoke)
    }

    fn remove_conntrack(
        &mut self,
        doomed: impl FnMut(&ConntrackFlow) -> bool,
    ) -> Result<usize, Error> {
        remove_flows(&mut self.conntrack_v4, &mut self.conntrack_v6, doomed)
    }

    /// Whether `ip` is an endpoint of a live conntrack entry (either side).
    /// The conntrack maps opened once more, to be read apart from this datapath: on
    /// another thread, without the lock its owner keeps around it.
    pub fn conntrack_view(&self) -> Result<ConntrackView, Error> {
        let open = |name: &str| {
            let path = self.root.join(name);
            MapData::from_pin(&path).map_err(|e| Error::Pin {
                path,
                reason: e.to_string(),
            })
        };
        Ok(ConntrackView {
            v4: HashMap::try_from(aya::maps::Map::LruHashMap(open(map_names::CONNTRACK_V4)?))
                .map_err(Error::map)?,
            v6: HashMap::try_from(aya::maps::Map::LruHashMap(open(map_names::CONNTRACK_V6)?))
                .map_err(Error::map)?,
        })
    }

    pub fn in_live_connection(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => {
                let o = ip.octets();
                self.conntrack_v4
                    .keys()
                    .flatten()
                    .any(|k| k.saddr == o || k.daddr == o)
            }
            IpAddr::V6(ip) => {
                let o = ip.octets();
                self.conntrack_v6
                    .keys()
                    .flatten()
                    .any(|k| k.saddr == o || k.daddr == o)
            }
        }
    }
}

/// The conntrack maps, read without the [`Datapath`] ([`Datapath::conntrack_view`]).
pub struct ConntrackView {
    v4: HashMap<MapData, CtKeyV4, CtValue>,
    v6: HashMap<MapData, CtKeyV6, CtValue>,
}

impl ConntrackView {
    /// [`Datapath::expire_conntrack`] on this handle.
    pub fn expire(&mut self, idle: Duration, closing: Duration) -> Result<usize, Error> {
        let now = monotonic_ns()?;
        remove_flows(&mut self.v4, &mut self.v6, expired(now, idle, closing))
    }

    /// [`Datapath::revoke_conntrack`] on this handle.
    pub fn revoke(&mut self, revoke: impl FnMut(&ConntrackFlow) -> bool) -> Result<usize, Error> {
        remove_flows(&mut self.v4, &mut self.v6, revoke)
    }

    /// Every address on either side of a tracked flow: one pass over the maps (the
    /// datapath may add and remove flows meanwhile; a flow added during the pass may be
    /// missed, as it would be by a pass a moment earlier).
    pub fn live_ips(&self) -> Result<std::collections::HashSet<IpAddr>, Error> {
        let mut out = std::collections::HashSet::new();
        for k in self.v4.keys() {
            let k = k.map_err(Error::map)?;
            out.insert(IpAddr::from(k.saddr));
            out.insert(IpAddr::from(k.daddr));
        }
        for k in self.v6.keys() {
            let k = k.map_err(Error::map)?;
            out.insert(IpAddr::from(k.saddr));
            out.insert(IpAddr::from(k.daddr));
        }
        Ok(out)
    }
}

/// Whether a flow is idle past its limit at `now` (`Datapath::expire_conntrack`).
fn expired(now: u64, idle: Duration, closing: Duration) -> impl FnMut(&ConntrackFlow) -> bool {
    move |f| {
        let age = now.saturating_sub(f.last_seen_ns);
        let limit = if f.flags & ct_flags::CLOSING != 0 {
            closing
        } else {
            idle
        };
        u128::from(age) > limit.as_nanos()
    }
}

/// Removes the entries of both families that `doomed` picks; returns how many were
/// removed (an entry gone meanwhile, by LRU eviction or a concurrent run, is fine).
fn remove_flows(
    v4: &mut HashMap<MapData, CtKeyV4, CtValue>,
    v6: &mut HashMap<MapData, CtKeyV6, CtValue>,
    mut doomed: impl FnMut(&ConntrackFlow) -> bool,
) -> Result<usize, Error> {
    let gone4: Vec<CtKeyV4> = v4
        .iter()
        .flatten()
        .filter(|(k, v)| {
            doomed(&ConntrackFlow::new(
                k.saddr, k.daddr, k.dport, k.protocol, v,
            ))
        })
        .map(|(k, _)| k)
        .collect();
    let gone6: Vec<CtKeyV6> = v6
        .iter()
        .flatten()
        .filter(|(k, v)| {
            doomed(&ConntrackFlow::new(
                k.saddr, k.daddr, k.dport, k.protocol, v,
            ))
        })
        .map(|(k, _)| k)
        .collect();
    let removed = gone4.iter().filter(|k| v4.remove(k).is_ok()).count()
        + gone6.iter().filter(|k| v6.remove(k).is_ok()).count();
    Ok(removed)
}

/// A conntrack entry as policy sees it: the flow in the direction that opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The destination port (ICMP: the echo identifier, or 0).
    pub dport: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// `common::ct_flags`.
    pub flags: u32,
    /// `bpf_ktime_get_ns` of the flow's last refresh (at most a second old while it is busy).
    pub last_seen_ns: u64,
}

impl ConntrackFlow {
    fn new(
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        dport: [u8; 2],
        protocol: u8,
        v: &CtValue,
    ) -> ConntrackFlow {
        ConntrackFlow {
            src: src.into(),
            dst: dst.into(),
            dport: u16::from_be_bytes(dport),
            protocol,
            flags: v.flags,
            last_seen_ns: v.last_seen_ns,
        }
    }
}

/// Moves the link pinned at `pin` to `prog` when it runs another program (an earlier
/// agent's, which reads that agent's maps): one atomic swap, no packet unhooked.
fn move_link(prog: &mut SchedClassifier, name: &'static str, pin: &Path) -> Result<(), Error> {
    let link: FdLink = PinnedLink::from_pin(pin)
        .map_err(|e| Error::Link(format!("open {}: {e}", pin.display())))?
        .into();
    let running = link
        .info()
        .map_err(|e| Error::Link(format!("{}: {e}", pin.display())))?
        .program_id();
    let ours = prog.info().map_err(|e| Error::program(name, e))?.id();
    if running == ours {
        return Ok(());
    }
    let link = SchedClassifierLink::try_from(link)
        .map_err(|e| Error::Link(format!("{}: {e}", pin.display())))?;
    let id = prog
        .attach_to_link(link)
        .map_err(|e| Error::program(name, e))?;
    // the pin keeps the link; the program's own handle on it can go
    drop(prog.take_link(id).map_err(|e| Error::program(name, e))?);
    Ok(())
}

/// Copies every entry of the LPM trie `old` into `new`; returns how many.
fn copy_lpm<K: aya::Pod, V: aya::Pod>(
    old: MapData,
    new: &mut LpmTrie<MapData, K, V>,
) -> Result<usize, Error> {
    let old: LpmTrie<MapData, K, V> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(old)).map_err(Error::map)?;
    let mut n = 0;
    for item in old.iter() {
        let (k, v) = item.map_err(Error::map)?;
        new.insert(&k, v, 0).map_err(Error::map)?;
        n += 1;
    }
    Ok(n)
}

/// Copies every entry of the hash map `old` (plain or LRU) into `new`; returns how many.
fn copy_hash<K: aya::Pod, V: aya::Pod>(
    old: MapData,
    new: &mut HashMap<MapData, K, V>,
) -> Result<usize, Error> {
    let old: HashMap<MapData, K, V> =
        HashMap::try_from(aya::maps::Map::HashMap(old)).map_err(Error::map)?;
    let mut n = 0;
    for item in old.iter() {
        let (k, v) = item.map_err(Error::map)?;
        new.insert(k, v, 0).map_err(Error::map)?;
        n += 1;
    }
    Ok(n)
}

fn unpin(path: &Path) -> Result<(), Error> {
    let link = PinnedLink::from_pin(path)
        .map_err(|e| Error::Link(format!("open {}: {e}", path.display())))?;
    // Unpinning and dropping the last reference detaches the program.
    let link = link
        .unpin()
        .map_err(|e| Error::Link(format!("unpin {}: {e}", path.display())))?;
    drop(link);
    Ok(())
}

/// The clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC), in nanoseconds.
fn monotonic_ns() -> Result<u64, Error> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(Error::Clock)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

fn ifindex(iface: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(iface).map_err(|e| Error::NoSuchInterface(iface.into(), e))
}

/// Mounts bpffs on /sys/fs/bpf when `root` lies below it and it is not mounted yet.
fn ensure_bpffs(root: &Path) -> Result<(), Error> {
    let bpffs = Path::new("/sys/fs/bpf");
    if !root.starts_with(bpffs) {
        return Ok(());
    }
    // Two loads racing here would stack two mounts, the second hiding what the first
    // pinned: check and mount under one lock.
    static MOUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MOUNT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|e| Error::io(Path::new("/proc/self/mounts"), e))?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next(), f.next(), f.next());
        at == Some("/sys/fs/bpf") && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(Error::Mount)
}
