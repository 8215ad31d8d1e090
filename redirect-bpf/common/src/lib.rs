//! The layout of Ward's datapath maps, shared by the eBPF programs (`no_std`) and the
//! loader (with the `user` feature, which implements `aya::Pod`).
//!
//! Addresses and ports in keys are in network byte order (as they appear on the wire), so
//! the programs copy them from packets without swapping and the LPM tries compare their
//! bits most significant first. Values are in host byte order.

#![no_std]

/// Names of the maps in the object; the loader pins each under its bpffs root.
pub mod map_names {
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    pub const IPCACHE_V6: &str = "IPCACHE_V6";
    pub const ENDPOINTS_V4: &str = "ENDPOINTS_V4";
    pub const ENDPOINTS_V6: &str = "ENDPOINTS_V6";
    pub const POLICY: &str = "POLICY";
    pub const PEER_CLASSES: &str = "PEER_CLASSES";
    pub const CONNTRACK_V4: &str = "CONNTRACK_V4";
    pub const CONNTRACK_V6: &str = "CONNTRACK_V6";
    pub const DROPS: &str = "DROPS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_RATE: &str = "EVENT_RATE";
    pub const ALL: [&str; 11] = [
        IPCACHE_V4,
        IPCACHE_V6,
        ENDPOINTS_V4,
        ENDPOINTS_V6,
        POLICY,
        PEER_CLASSES,
        CONNTRACK_V4,
        CONNTRACK_V6,
        DROPS,
        EVENTS,
        EVENT_RATE,
    ];
}

/// Names of the programs in the object.
pub mod program_names {
    /// tc ingress of a pod's host-side veth: traffic leaving the pod.
    pub const FROM_POD: &str = "ward_from_pod";
    /// tc egress of a pod's host-side veth: traffic the node delivers to the pod.
    pub const TO_POD: &str = "ward_to_pod";
    /// tc ingress of the node's uplink: traffic from other nodes and outside.
    pub const FROM_UPLINK: &str = "ward_from_uplink";
}

/// Capacities of the maps.
pub const IPCACHE_MAX: u32 = 262_144;
pub const ENDPOINTS_MAX: u32 = 65_536;
pub const POLICY_MAX: u32 = 1_048_576;
/// One entry per live identity of the cluster (as many as the ipcache can name).
pub const PEER_CLASSES_MAX: u32 = IPCACHE_MAX;
pub const CONNTRACK_MAX: u32 = 262_144;
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Identities the datapath itself needs (same numbers as policy-model's reserved ones).
pub const IDENTITY_WORLD: u32 = 2;
/// In a policy key: every peer identity.
pub const IDENTITY_ANY: u32 = 0;
/// The first peer class number. Classes and identities share the `peer` field of policy
/// keys, so classes are numbered above every identity (pods below 2^24, CIDR and FQDN
/// prefixes from 2^24).
pub const CLASS_FIRST: u32 = 1 << 31;

/// Marks (`skb->mark & MARK_MASK`), as Cilium uses them.
pub const MARK_MASK: u32 = 0xf00;
/// Set by the datapath on packets it assigned to a local (proxy) socket; the node's ip
/// rule `fwmark 0x200/0xf00 lookup <table>` with `local 0.0.0.0/0 dev lo` delivers them.
pub const MARK_TO_PROXY: u32 = 0x200;
/// Set (SO_MARK) by the ingress and the egress proxy on their upstream sockets.
pub const MARK_FROM_INGRESS_PROXY: u32 = 0xa00;
pub const MARK_FROM_EGRESS_PROXY: u32 = 0xb00;

/// Directions, as indices of a policy key (same order as policy-model's `Direction`).
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// IP protocol numbers used in keys.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_ICMPV6: u8 = 58;

/// The value of both ipcache tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    /// Numeric security identity.
    pub identity: u32,
    pub flags: u32,
}

/// Endpoint flags.
pub mod endpoint_flags {
    /// Something not allowed is denied in the endpoint's ingress direction.
    pub const DEFAULT_DENY_INGRESS: u32 = 1 << 0;
    /// Something not allowed is denied in the endpoint's egress direction.
    pub const DEFAULT_DENY_EGRESS: u32 = 1 << 1;
}

/// Value of the endpoints map (key: the pod's IPv4 address, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint id used in policy keys (allocated by the agent, never 0).
    pub endpoint_id: u32,
    /// The endpoint's own numeric identity.
    pub identity: u32,
    /// Host-side veth ifindex (0 when unknown).
    pub ifindex: u32,
    pub flags: u32,
}

/// Data of a policy LPM key. Every field but the port is always fully covered by the
/// prefix: `prefix_len = POLICY_FIXED_BITS + port prefix bits (0..=16)`.
///
/// The peer is a class of identities, not an identity: identities that every policy of
/// the node's endpoints treats alike (the same selectors select them) share a class
/// (`PEER_CLASSES`: identity -> class), so a policy that admits thousands of identities
/// costs an entry per class, not per identity. A peer without a class is looked up by its
/// identity (what a map written before classes holds), and every peer also by
/// `IDENTITY_ANY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyKeyData {
    pub endpoint_id: u32,
    /// Peer class (from `CLASS_FIRST`), peer identity, or `IDENTITY_ANY`.
    pub peer: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, network byte order.
    pub port: [u8; 2],
}

/// Bits of a policy key before the port.
pub const POLICY_FIXED_BITS: u32 = 80;

/// Verdicts of a policy entry, in increasing precedence: when several entries match
/// (the exact identity and the wildcard one), the greatest wins.
pub mod action {
    pub const NONE: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const REDIRECT: u8 = 2;
    pub const DENY: u8 = 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub action: u8,
    pub _pad: u8,
    /// Proxy listener port (host order) for `REDIRECT`.
    pub proxy_port: u16,
    /// Opaque rule reference for events (policy-model origin, packed by the loader).
    pub cookie: u32,
}

/// Conntrack key: the 5-tuple as seen in the packet (addresses and ports network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyV4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl CtKeyV4 {
    /// The key of the reply direction.
    pub fn reverse(&self) -> CtKeyV4 {
        CtKeyV4 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            _pad: [0; 3],
        }
    }
}

/// Conntrack key of IPv6 flows, as `CtKeyV4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyV6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl CtKeyV6 {
    /// The key of the reply direction.
    pub fn reverse(&self) -> CtKeyV6 {
        CtKeyV6 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            _pad: [0; 3],
        }
    }
}

pub mod ct_flags {
    /// The flow was redirected to a proxy.
    pub const PROXIED: u32 = 1 << 0;
    /// The TCP flow is closed: an RST was seen, or a FIN in each direction. The entry
    /// expires under the (short) closing timeout and a new SYN on the tuple is decided
    /// by policy again.
    pub const CLOSING: u32 = 1 << 1;
    /// A FIN from the side that opened the flow (the key's source) was seen.
    pub const FIN_ORIGINAL: u32 = 1 << 2;
    /// A FIN from the side that answered (the key's destination) was seen.
    pub const FIN_REPLY: u32 = 1 << 3;
    /// A proxy's upstream connection (created from its marked packets): the replies
    /// belong to the proxy's socket, so they never pass on this entry alone.
    pub const PROXY_UPSTREAM: u32 = 1 << 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of creation and of the last packet (refreshed at most once a
    /// second, which the idle and closing timeouts allow).
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub flags: u32,
    /// 1 at creation. Not counted per packet: that write, from both ends of a flow and
    /// so from different CPUs, was a shared cache line on the hot path.
    pub packets: u32,
}

/// Declares the drop reasons and their names together, so that no reason can exist
/// without the name that metrics labels and events carry.
macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $name:ident = $num:literal => $label:literal,)+) => {
        $($(#[$doc])* pub const $name: u32 = $num;)+
        /// Every reason with its name (label of `ward_datapath_drops_total`, `reason` of
        /// events), in number order.
        pub const ALL: &[(u32, &str)] = &[$(($num, $label),)+];
    };
}

/// Drop reasons: indices of the per-CPU `DROPS` counters and the `reason` of events.
pub mod drop_reason {
    drop_reasons! {
        POLICY_DENY = 1 => "policy_deny",
        POLICY_DEFAULT_DENY = 2 => "policy_default_deny",
        PROXY_UNAVAILABLE = 3 => "proxy_unavailable",
        /// A redirect decided on a hook where `bpf_sk_assign` cannot run (tc egress).
        REDIRECT_UNSUPPORTED = 4 => "redirect_unsupported",
        MALFORMED = 5 => "malformed",
        SK_ASSIGN_FAILED = 6 => "sk_assign_failed",
        /// An ICMP error (unreachable, packet too big, time exceeded, parameter problem)
        /// whose quoted packet belongs to no tracked flow.
        ICMP_ERROR_UNRELATED = 7 => "icmp_error_unrelated",
    }

    /// Slots of the `DROPS` array (reason numbers are below it).
    pub const COUNT: u32 = 16;

    /// The name of a reason, for metric labels and events; `"other"` for a number no
    /// reason has (a newer program than this user space, or a corrupt event).
    pub fn name(reason: u32) -> &'static str {
        ALL.iter()
            .find(|(n, _)| *n == reason)
            .map_or("other", |(_, label)| label)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_reason_has_a_distinct_name_and_a_counter_slot() {
            for (i, (n, label)) in ALL.iter().enumerate() {
                // numbered 1, 2, ... without gaps, each below the array's size
                assert_eq!(*n as usize, i + 1, "{label}");
                assert!(*n < COUNT, "{label}: no DROPS slot");
                assert_eq!(name(*n), *label);
                assert!(!label.is_empty() && *label != "other");
                assert_eq!(ALL.iter().filter(|(_, l)| l == label).count(), 1, "{label}");
            }
            assert_eq!(name(ICMP_ERROR_UNRELATED), "icmp_error_unrelated");
            assert_eq!(name(0), "other");
            assert_eq!(name(COUNT), "other");
        }
    }
}

/// Events each CPU may emit per second; drops beyond are counted, not reported.
pub const EVENTS_PER_CPU_PER_SECOND: u32 = 1000;

/// Per-CPU state of the event rate limit (`EVENT_RATE`, one slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    pub window_start_ns: u64,
    pub in_window: u32,
    pub _pad: u32,
    /// Events not emitted because of the limit, ever.
    pub suppressed: u64,
}

/// One record of the `EVENTS` ring buffer. IPv4 flows fill `saddr`/`daddr`, IPv6 flows
/// `saddr6`/`daddr6` (`family` 4 or 6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub reason: u32,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub protocol: u8,
    pub direction: u8,
    pub family: u8,
    pub _pad: u8,
    pub cookie: u32,
    pub saddr6: [u8; 16],
    pub daddr6: [u8; 16],
}

// aya::Pod is an unsafe trait; everything else in this crate is plain data.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    use super::*;
    // SAFETY: every type below is #[repr(C)], Copy, made only of integers and byte
    // arrays with explicit padding fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for IpcacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKeyData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DropEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventRate {}
}
