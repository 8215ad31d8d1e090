//! Ward's TC programs. They execute what policy-model compiled into the maps; the
//! verdict logic here is only: conntrack, identity lookup, policy lookup with the
//! precedence deny > redirect > allow, and the default of the endpoint's direction.
//!
//! `ward_from_pod` runs on tc ingress of a pod's host-side veth (traffic leaving the
//! pod). It decides the source's egress policy and, when the destination is a pod of this
//! node, the destination's ingress policy in the same run, so a flow is redirected at
//! most once and always at an ingress hook (where `bpf_sk_assign` works).
//!
//! `ward_to_pod` runs on tc egress of the same veth (traffic the node delivers to the
//! pod) and decides the pod's ingress policy for flows that did not start at a local pod.
//!
//! `ward_from_uplink` runs on tc ingress of the node's uplink(s) (traffic from other
//! nodes and outside): it decides the ingress policy of the local pod it is for, and can
//! redirect there, being an ingress hook.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    },
    macros::{classifier, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use redirect_bpf_common::{
    action, ct_flags, drop_reason, endpoint_flags, CtKeyV4, CtKeyV6, CtValue, DropEvent,
    EndpointInfo, EventRate, IpcacheValue, PolicyKeyData, PolicyValue, CONNTRACK_MAX, DIR_EGRESS,
    DIR_INGRESS, ENDPOINTS_MAX, EVENTS_BYTES, EVENTS_PER_CPU_PER_SECOND, IDENTITY_ANY,
    IDENTITY_WORLD, IPCACHE_MAX, MARK_FROM_EGRESS_PROXY, MARK_FROM_INGRESS_PROXY, MARK_MASK,
    MARK_TO_PROXY, PEER_CLASSES_MAX, POLICY_FIXED_BITS, POLICY_MAX, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 4] = *b"GPL\0";

// Every map is pinned by name under the loader's bpffs root, so that a restarted agent
// finds the same maps and enforcement never stops.
#[map]
static IPCACHE_V4: LpmTrie<[u8; 4], IpcacheValue> = LpmTrie::pinned(IPCACHE_MAX, BPF_F_NO_PREALLOC);

#[map]
static IPCACHE_V6: LpmTrie<[u8; 16], IpcacheValue> =
    LpmTrie::pinned(IPCACHE_MAX, BPF_F_NO_PREALLOC);

#[map]
static ENDPOINTS_V4: HashMap<[u8; 4], EndpointInfo> = HashMap::pinned(ENDPOINTS_MAX, 0);

#[map]
static ENDPOINTS_V6: HashMap<[u8; 16], EndpointInfo> = HashMap::pinned(ENDPOINTS_MAX, 0);

#[map]
static POLICY: LpmTrie<PolicyKeyData, PolicyValue> = LpmTrie::pinned(POLICY_MAX, BPF_F_NO_PREALLOC);

/// Peer identity -> peer class (the `peer` of policy keys).
#[map]
static PEER_CLASSES: HashMap<u32, u32> = HashMap::pinned(PEER_CLASSES_MAX, BPF_F_NO_PREALLOC);

#[map]
static CONNTRACK_V4: LruHashMap<CtKeyV4, CtValue> = LruHashMap::pinned(CONNTRACK_MAX, 0);

#[map]
static CONNTRACK_V6: LruHashMap<CtKeyV6, CtValue> = LruHashMap::pinned(CONNTRACK_MAX, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drop_reason::COUNT, 0);

#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map]
static EVENT_RATE: PerCpuArray<EventRate> = PerCpuArray::pinned(1, 0);

const ETH_HLEN: usize = 14;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMPv6 router solicitation .. redirect (133..=137).
const ICMPV6_ND_FIRST: u8 = 133;
const ICMPV6_ND_LAST: u8 = 137;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 destination unreachable, packet too big, time exceeded, parameter problem.
const ICMPV6_ERROR_FIRST: u8 = 1;
const ICMPV6_ERROR_LAST: u8 = 4;
/// The ICMP header before the quoted packet of an error.
const ICMP_ERROR_HLEN: usize = 8;
/// IPv6 extension headers skipped to reach the transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers followed at most (a bounded loop for the verifier); a packet with
/// more is dropped as malformed.
const IPV6_MAX_EXT_HEADERS: usize = 8;
/// Extension headers followed at most in the packet an ICMPv6 error quotes: an error
/// quoting more matches no flow and is decided by policy. Fewer than for the packet
/// itself, as each round multiplies the verifier's work on the error path (and the
/// programs' load time).
const IPV6_MAX_QUOTED_EXT_HEADERS: usize = 3;
/// How stale a conntrack entry's `last_seen_ns` may get before a packet refreshes it:
/// far below the idle (hours) and closing (seconds) timeouts it serves.
const CT_REFRESH_NS: u64 = 1_000_000_000;
const BPF_F_CURRENT_NETNS: u64 = u64::MAX; // -1
const BPF_TCP_TIME_WAIT: u32 = 6;
const BPF_TCP_LISTEN: u32 = 10;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

/// What the programs read from a packet.
struct Packet<T> {
    /// Conntrack tuple: ICMP has zero ports, so a reply matches its request.
    tuple: T,
    /// What policy keys call the port: the destination port, or the ICMP type.
    port: [u8; 2],
    tcp_flags: u8,
    /// An ICMP error (destination unreachable, packet too big, time exceeded, parameter
    /// problem): it passes only as part of the flow it quotes.
    icmp_error: bool,
    /// Whether the packet an ICMP error quotes belongs to a tracked flow (either
    /// direction: the quoted packet is one the error's receiver sent).
    quoted_tracked: bool,
}

enum Parsed {
    V4(Packet<CtKeyV4>),
    V6(Packet<CtKeyV6>),
    /// ARP and the rest: not ours to judge.
    Other,
}

#[derive(Clone, Copy)]
struct Verdict {
    action: u8,
    proxy_port: u16,
    cookie: u32,
    reason: u32,
}

impl Verdict {
    const ALLOW: Verdict = Verdict {
        action: action::ALLOW,
        proxy_port: 0,
        cookie: 0,
        reason: 0,
    };

    /// Precedence: deny over redirect over allow; the first redirect keeps its port.
    fn combine(self, other: Verdict) -> Verdict {
        if other.action > self.action {
            other
        } else {
            self
        }
    }
}

/// What differs between IPv4 and IPv6 flows: their maps, socket tuples and events.
trait Flow: Sized {
    fn protocol(&self) -> u8;
    fn reverse(&self) -> Self;
    fn ct(&self) -> Option<*mut CtValue>;
    fn ct_insert(&self, v: &CtValue, flags: u64);
    fn src_endpoint(&self) -> Option<EndpointInfo>;
    fn dst_endpoint(&self) -> Option<EndpointInfo>;
    fn src_identity(&self) -> u32;
    fn dst_identity(&self) -> u32;
    /// The socket tuple of this flow, and of the proxy listener on `port` at localhost.
    fn sock_tuple(&self) -> (bpf_sock_tuple, u32);
    fn listener_tuple(port: u16) -> (bpf_sock_tuple, u32);
    /// Whether a UDP socket found for the exact tuple is connected (owns the tuple).
    fn udp_connected(sk: *mut bpf_sock) -> bool;
    fn fill_event(&self, ev: &mut DropEvent);
}

impl Flow for CtKeyV4 {
    fn protocol(&self) -> u8 {
        self.protocol
    }
    fn reverse(&self) -> Self {
        CtKeyV4::reverse(self)
    }
    fn ct(&self) -> Option<*mut CtValue> {
        CONNTRACK_V4.get_ptr_mut(self)
    }
    fn ct_insert(&self, v: &CtValue, flags: u64) {
        let _ = CONNTRACK_V4.insert(self, v, flags);
    }
    fn src_endpoint(&self) -> Option<EndpointInfo> {
        // SAFETY: the value is copied out before the map can change it under us.
        unsafe { ENDPOINTS_V4.get(self.saddr) }.copied()
    }
    fn dst_endpoint(&self) -> Option<EndpointInfo> {
        // SAFETY: as above.
        unsafe { ENDPOINTS_V4.get(self.daddr) }.copied()
    }
    fn src_identity(&self) -> u32 {
        ipcache_v4(&self.saddr)
    }
    fn dst_identity(&self) -> u32 {
        ipcache_v4(&self.daddr)
    }
    fn sock_tuple(&self) -> (bpf_sock_tuple, u32) {
        ipv4_tuple(self.saddr, self.daddr, self.sport, self.dport)
    }
    fn listener_tuple(port: u16) -> (bpf_sock_tuple, u32) {
        ipv4_tuple([0; 4], [127, 0, 0, 1], [0; 2], port.to_be_bytes())
    }
    fn udp_connected(sk: *mut bpf_sock) -> bool {
        // SAFETY: sk is a non-null socket reference from a lookup.
        unsafe { (*sk).dst_ip4 != 0 }
    }
    fn fill_event(&self, ev: &mut DropEvent) {
        ev.family = 4;
        ev.saddr = self.saddr;
        ev.daddr = self.daddr;
        ev.sport = self.sport;
        ev.dport = self.dport;
        ev.protocol = self.protocol;
    }
}

impl Flow for CtKeyV6 {
    fn protocol(&self) -> u8 {
        self.protocol
    }
    fn reverse(&self) -> Self {
        CtKeyV6::reverse(self)
    }
    fn ct(&self) -> Option<*mut CtValue> {
        CONNTRACK_V6.get_ptr_mut(self)
    }
    fn ct_insert(&self, v: &CtValue, flags: u64) {
        let _ = CONNTRACK_V6.insert(self, v, flags);
    }
    fn src_endpoint(&self) -> Option<EndpointInfo> {
        // SAFETY: the value is copied out before the map can change it under us.
        unsafe { ENDPOINTS_V6.get(self.saddr) }.copied()
    }
    fn dst_endpoint(&self) -> Option<EndpointInfo> {
        // SAFETY: as above.
        unsafe { ENDPOINTS_V6.get(self.daddr) }.copied()
    }
    fn src_identity(&self) -> u32 {
        ipcache_v6(&self.saddr)
    }
    fn dst_identity(&self) -> u32 {
        ipcache_v6(&self.daddr)
    }
    fn sock_tuple(&self) -> (bpf_sock_tuple, u32) {
        ipv6_tuple(&self.saddr, &self.daddr, self.sport, self.dport)
    }
    fn listener_tuple(port: u16) -> (bpf_sock_tuple, u32) {
        let mut localhost = [0u8; 16];
        localhost[15] = 1;
        ipv6_tuple(&[0; 16], &localhost, [0; 2], port.to_be_bytes())
    }
    fn udp_connected(sk: *mut bpf_sock) -> bool {
        // SAFETY: sk is a non-null socket reference from a lookup.
        let d = unsafe { (*sk).dst_ip6 };
        d[0] | d[1] | d[2] | d[3] != 0
    }
    fn fill_event(&self, ev: &mut DropEvent) {
        ev.family = 6;
        ev.saddr6 = self.saddr;
        ev.daddr6 = self.daddr;
        ev.sport = self.sport;
        ev.dport = self.dport;
        ev.protocol = self.protocol;
    }
}

#[classifier]
pub fn ward_from_pod(ctx: TcContext) -> i32 {
    let r = match parse(&ctx) {
        Ok(Parsed::V4(p)) => Ok(from_pod(&ctx, p)),
        Ok(Parsed::V6(p)) => Ok(from_pod(&ctx, p)),
        Ok(Parsed::Other) => Ok(TC_ACT_OK),
        Err(()) => Err(()),
    };
    match r {
        Ok(v) => v,
        Err(()) => drop::<CtKeyV4>(&ctx, None, drop_reason::MALFORMED, 0, 0, DIR_EGRESS, 0),
    }
}

#[classifier]
pub fn ward_to_pod(ctx: TcContext) -> i32 {
    let r = match parse(&ctx) {
        Ok(Parsed::V4(p)) => to_pod(&ctx, p),
        Ok(Parsed::V6(p)) => to_pod(&ctx, p),
        Ok(Parsed::Other) => Ok(TC_ACT_OK),
        Err(()) => Err(()),
    };
    match r {
        Ok(v) => v,
        Err(()) => drop::<CtKeyV4>(&ctx, None, drop_reason::MALFORMED, 0, 0, DIR_INGRESS, 0),
    }
}

// Not inlined: the IPv4 and IPv6 instances get frames of their own rather than adding
// up in the program's, which keeps the combined stack of the deepest call chain (with the
// ICMP-error lookups called from `parse`) under the verifier's 512 bytes.
#[inline(never)]
fn from_pod<T: Flow>(ctx: &TcContext, pkt: Packet<T>) -> i32 {
    if proxy_marked(ctx) {
        return TC_ACT_OK;
    }
    let t = &pkt.tuple;

    // 0. The hot path: a packet of an established flow that no proxy takes part in
    //    passes on its conntrack entry alone, without the socket lookup below (it finds
    //    only proxies' sockets, and such flows' entries carry PROXIED or PROXY_UPSTREAM).
    if !pkt.icmp_error && ct_hit(t, pkt.tcp_flags, true) {
        return TC_ACT_OK;
    }

    // 1. A local socket that owns this exact tuple: a flow that a proxy already took, or
    //    a reply to a proxy's transparent upstream connection.
    if let Some(r) = assign_established(ctx, t) {
        return r;
    }

    // 2. Conntrack: replies and established flows pass. Proxied flows without their
    //    socket fall through to policy, which redirects again or fails closed. An ICMP
    //    error passes as part of the flow it quotes; one quoting no tracked flow is
    //    decided by policy (as ICMP of its type), never by conntrack.
    if pkt.icmp_error {
        if pkt.quoted_tracked {
            return TC_ACT_OK;
        }
    } else if ct_hit(t, pkt.tcp_flags, false) {
        return TC_ACT_OK;
    }

    // 3. Policy: the source's egress and, for a local destination, its ingress.
    let src_ep = t.src_endpoint();
    let dst_ep = t.dst_endpoint();
    let src_id = match src_ep {
        Some(e) => e.identity,
        None => t.src_identity(),
    };
    let dst_id = match dst_ep {
        Some(e) => e.identity,
        None => t.dst_identity(),
    };
    let mut v = side_verdict(src_ep, DIR_EGRESS, dst_id, t.protocol(), pkt.port);
    let mut dir = DIR_EGRESS;
    if dst_ep.is_some() {
        let i = side_verdict(dst_ep, DIR_INGRESS, src_id, t.protocol(), pkt.port);
        if i.action > v.action {
            dir = DIR_INGRESS;
        }
        v = v.combine(i);
    }
    match v.action {
        action::DENY => drop(
            ctx,
            Some(t),
            deny_reason(&pkt, v),
            src_id,
            dst_id,
            dir,
            v.cookie,
        ),
        action::REDIRECT => redirect(ctx, t, v, src_id, dst_id, dir),
        _ => {
            // An allowed ICMP error opens no flow of its own.
            if !pkt.icmp_error {
                ct_create(t, 0, BPF_ANY);
            }
            TC_ACT_OK
        }
    }
}

/// The drop reason of a denied packet: an ICMP error that quotes no tracked flow is
/// counted as such, whatever entry or default denied it.
#[inline(always)]
fn deny_reason<T>(pkt: &Packet<T>, v: Verdict) -> u32 {
    if pkt.icmp_error {
        drop_reason::ICMP_ERROR_UNRELATED
    } else {
        v.reason
    }
}

#[inline(always)]
#[classifier]
pub fn ward_from_uplink(ctx: TcContext) -> i32 {
    let r = match parse(&ctx) {
        Ok(Parsed::V4(p)) => Ok(to_local_pod(&ctx, p, true)),
        Ok(Parsed::V6(p)) => Ok(to_local_pod(&ctx, p, true)),
        Ok(Parsed::Other) => Ok(TC_ACT_OK),
        Err(()) => Err(()),
    };
    match r {
        Ok(v) => v,
        Err(()) => drop::<CtKeyV4>(&ctx, None, drop_reason::MALFORMED, 0, 0, DIR_INGRESS, 0),
    }
}

#[inline(always)]
fn to_pod<T: Flow>(ctx: &TcContext, pkt: Packet<T>) -> Result<i32, ()> {
    Ok(to_local_pod(ctx, pkt, false))
}

/// The ingress policy of the local pod a packet is for. `at_ingress`: the hook can
/// redirect (tc ingress of an uplink) and owns the exact-socket lookup for the replies
/// to the proxies' transparent upstream connections.
// Not inlined, as `from_pod`.
#[inline(never)]
fn to_local_pod<T: Flow>(ctx: &TcContext, pkt: Packet<T>, at_ingress: bool) -> i32 {
    let t = &pkt.tuple;
    if at_ingress {
        if let Some(r) = assign_established(ctx, t) {
            return r;
        }
    }
    if proxy_marked(ctx) {
        // A proxy's upstream connection: the proxy enforced policy already. Tracked, so
        // that the pod's replies pass whatever its egress policy says, and flagged, so
        // that they are looked up for the proxy's socket rather than passed on conntrack.
        ct_create(t, ct_flags::PROXY_UPSTREAM, BPF_NOEXIST);
        return TC_ACT_OK;
    }
    if pkt.icmp_error {
        if pkt.quoted_tracked {
            return TC_ACT_OK;
        }
    } else if ct_hit(t, pkt.tcp_flags, false) {
        return TC_ACT_OK;
    }
    let Some(dst) = t.dst_endpoint() else {
        return TC_ACT_OK;
    };
    let src_id = t.src_identity();
    let dst_id = dst.identity;
    let v = side_verdict(Some(dst), DIR_INGRESS, src_id, t.protocol(), pkt.port);
    match v.action {
        action::DENY => drop(
            ctx,
            Some(t),
            deny_reason(&pkt, v),
            src_id,
            dst_id,
            DIR_INGRESS,
            v.cookie,
        ),
        action::REDIRECT if at_ingress => redirect(ctx, t, v, src_id, dst_id, DIR_INGRESS),
        // bpf_sk_assign works only at ingress hooks; flows from other nodes are
        // redirected at the uplink's ingress, so reaching this is a configuration gap.
        action::REDIRECT => drop(
            ctx,
            Some(t),
            drop_reason::REDIRECT_UNSUPPORTED,
            src_id,
            dst_id,
            DIR_INGRESS,
            v.cookie,
        ),
        _ => {
            if !pkt.icmp_error {
                ct_create(t, 0, BPF_ANY);
            }
            TC_ACT_OK
        }
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Parsed, ()> {
    let proto: u16 = u16::from_be(load::<u16>(ctx, 12)?);
    if proto == ETH_P_IPV6 {
        return parse_v6(ctx);
    }
    if proto != ETH_P_IP {
        return Ok(Parsed::Other);
    }
    let ver_ihl: u8 = load(ctx, ETH_HLEN)?;
    if ver_ihl >> 4 != 4 {
        return Err(());
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let protocol: u8 = load(ctx, ETH_HLEN + 9)?;
    let saddr: [u8; 4] = load(ctx, ETH_HLEN + 12)?;
    let daddr: [u8; 4] = load(ctx, ETH_HLEN + 16)?;
    let frag: u16 = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
    let mut tuple = CtKeyV4 {
        saddr,
        daddr,
        protocol,
        ..CtKeyV4::default()
    };
    // Later fragments carry no ports: they keep the zero ports (and so match only
    // port-wildcard entries); reassembly is left to the kernel's defrag.
    let first_fragment = frag & 0x1fff == 0;
    let (port, tcp_flags) = if first_fragment {
        l4(
            ctx,
            ETH_HLEN + ihl,
            protocol,
            &mut tuple.sport,
            &mut tuple.dport,
        )?
    } else {
        ([0; 2], 0)
    };
    let icmp_error = first_fragment
        && protocol == PROTO_ICMP
        && matches!(
            port[1],
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        );
    let quoted_tracked = icmp_error && quoted_v4_tracked(ctx, ETH_HLEN + ihl + ICMP_ERROR_HLEN);
    Ok(Parsed::V4(Packet {
        tuple,
        port,
        tcp_flags,
        icmp_error,
        quoted_tracked,
    }))
}

/// Whether the IPv4 packet an ICMP error quotes at `off` belongs to a tracked flow
/// (either direction). Its own function (a BPF-to-BPF call), kept lean: its frame adds
/// to the caller's under the verifier's 512-byte limit.
#[inline(never)]
fn quoted_v4_tracked(ctx: &TcContext, off: usize) -> bool {
    let Ok(ver_ihl) = load::<u8>(ctx, off) else {
        return false;
    };
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return false;
    }
    let mut t = CtKeyV4::default();
    let (Ok(saddr), Ok(daddr)) = (load(ctx, off + 12), load(ctx, off + 16)) else {
        return false;
    };
    t.saddr = saddr;
    t.daddr = daddr;
    let Ok(protocol) = load::<u8>(ctx, off + 9) else {
        return false;
    };
    t.protocol = protocol;
    if quoted_ports(ctx, off + ihl, protocol, &mut t.sport, &mut t.dport).is_none() {
        return false;
    }
    if CONNTRACK_V4.get_ptr(t).is_some() {
        return true;
    }
    core::mem::swap(&mut t.saddr, &mut t.daddr);
    core::mem::swap(&mut t.sport, &mut t.dport);
    CONNTRACK_V4.get_ptr(t).is_some()
}

/// As `quoted_v4_tracked`, for IPv6 (the quoted transport header after the fixed header
/// and any extension headers).
#[inline(never)]
fn quoted_v6_tracked(ctx: &TcContext, off: usize) -> bool {
    let Ok(ver) = load::<u8>(ctx, off) else {
        return false;
    };
    if ver >> 4 != 6 {
        return false;
    }
    let mut t = CtKeyV6::default();
    let (Ok(saddr), Ok(daddr)) = (load(ctx, off + 8), load(ctx, off + 24)) else {
        return false;
    };
    t.saddr = saddr;
    t.daddr = daddr;
    let Ok(next) = load::<u8>(ctx, off + 6) else {
        return false;
    };
    // The quoted packet's extension headers are skipped as the outer packet's, fewer of
    // them; a quoted later fragment has no ports to match a flow by.
    let Ok((protocol, l4, false)) = skip_v6_ext::<IPV6_MAX_QUOTED_EXT_HEADERS>(ctx, next, off + 40)
    else {
        return false;
    };
    t.protocol = protocol;
    if quoted_ports(ctx, l4, protocol, &mut t.sport, &mut t.dport).is_none() {
        return false;
    }
    if CONNTRACK_V6.get_ptr(t).is_some() {
        return true;
    }
    core::mem::swap(&mut t.saddr, &mut t.daddr);
    core::mem::swap(&mut t.sport, &mut t.dport);
    CONNTRACK_V6.get_ptr(t).is_some()
}

/// The ports of a quoted packet, as `l4` puts them in a tuple. Only the first 8 bytes of
/// the quoted transport header are read: that much every ICMP error carries.
#[inline(always)]
fn quoted_ports(
    ctx: &TcContext,
    off: usize,
    protocol: u8,
    sport: &mut [u8; 2],
    dport: &mut [u8; 2],
) -> Option<()> {
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            *sport = load(ctx, off).ok()?;
            *dport = load(ctx, off + 2).ok()?;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let ty: u8 = load(ctx, off).ok()?;
            let (request, reply) = if protocol == PROTO_ICMP {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            } else {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            };
            if ty == request {
                *sport = load(ctx, off + 4).ok()?;
            } else if ty == reply {
                *dport = load(ctx, off + 4).ok()?;
            }
        }
        _ => {}
    }
    Some(())
}

/// Follows an IPv6 packet's extension headers (hop-by-hop, routing, destination options,
/// AH, fragment) from `protocol`, the fixed header's next header, at `off`, just after
/// the fixed header, to the transport header: (its protocol, its offset, whether the
/// packet is a later fragment, which has none). A bounded loop for the verifier; more
/// than `MAX` headers, or one that cannot be read, is an error. Read
/// through the helper only: extension headers are rare, and the two ways of `load`
/// in each of the unrolled rounds multiplied the verifier's work (and the load time).
#[inline(always)]
fn skip_v6_ext<const MAX: usize>(
    ctx: &TcContext,
    protocol: u8,
    off: usize,
) -> Result<(u8, usize, bool), ()> {
    let (mut protocol, mut off) = (protocol, off);
    // One round more than headers: the last finds the transport header.
    for _ in 0..MAX + 1 {
        match protocol {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let next: u8 = load_bytes(ctx, off)?;
                let len: u8 = load_bytes(ctx, off + 1)?;
                protocol = next;
                off += (len as usize + 1) * 8;
            }
            IPV6_AH => {
                let next: u8 = load_bytes(ctx, off)?;
                let len: u8 = load_bytes(ctx, off + 1)?;
                protocol = next;
                off += (len as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let next: u8 = load_bytes(ctx, off)?;
                let frag: u16 = u16::from_be(load_bytes::<u16>(ctx, off + 2)?);
                protocol = next;
                off += 8;
                if frag & 0xfff8 != 0 {
                    return Ok((protocol, off, true));
                }
            }
            _ => return Ok((protocol, off, false)),
        }
    }
    Err(())
}

/// IPv6: extension headers (hop-by-hop, routing, destination options, AH, fragment) are
/// skipped to reach the transport header, in a bounded loop. A later fragment carries no
/// transport header: it keeps zero ports and matches only port-wildcard entries.
#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Result<Parsed, ()> {
    let ver: u8 = load(ctx, ETH_HLEN)?;
    if ver >> 4 != 6 {
        return Err(());
    }
    let protocol: u8 = load(ctx, ETH_HLEN + 6)?;
    let saddr: [u8; 16] = load(ctx, ETH_HLEN + 8)?;
    let daddr: [u8; 16] = load(ctx, ETH_HLEN + 24)?;
    // More extension headers than followed: the transport header (and its ports) would
    // stay hidden from policy, so that a port deny could be passed by adding headers.
    // Dropped as malformed.
    let (protocol, off, later_fragment) =
        skip_v6_ext::<IPV6_MAX_EXT_HEADERS>(ctx, protocol, ETH_HLEN + 40)?;
    let mut tuple = CtKeyV6 {
        saddr,
        daddr,
        protocol,
        ..CtKeyV6::default()
    };
    let (port, tcp_flags) = if later_fragment {
        ([0; 2], 0)
    } else {
        l4(ctx, off, protocol, &mut tuple.sport, &mut tuple.dport)?
    };
    if later_fragment {
        // No ICMPv6 header to read: not an error, not discovery.
    } else if protocol == PROTO_ICMPV6 && port[1] >= ICMPV6_ND_FIRST && port[1] <= ICMPV6_ND_LAST {
        // Router and neighbour discovery: the link itself, never policy's business.
        return Ok(Parsed::Other);
    }
    let icmp_error = !later_fragment
        && protocol == PROTO_ICMPV6
        && port[1] >= ICMPV6_ERROR_FIRST
        && port[1] <= ICMPV6_ERROR_LAST;
    let quoted_tracked = icmp_error && quoted_v6_tracked(ctx, off + ICMP_ERROR_HLEN);
    Ok(Parsed::V6(Packet {
        tuple,
        port,
        tcp_flags,
        icmp_error,
        quoted_tracked,
    }))
}

/// Reads a `T` at `off` of the packet: straight from the linear data when it is there
/// (the headers of nearly every packet), else through `bpf_skb_load_bytes`. A helper call
/// per field was most of the cost of parsing.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    // One byte is checked as two: LLVM turns `p + 1 <= end` into `p < end`, which the
    // verifier does not take as a bound when `p` has a variable offset. A byte that ends
    // the linear data takes the helper instead; the result is the same.
    let size = core::mem::size_of::<T>();
    let checked = if size == 1 { 2 } else { size };
    if start + off + checked <= end {
        // SAFETY: the bounds check above (the one the verifier follows) keeps the read
        // inside the packet's linear data; `T` is an integer or a byte array, valid for
        // any bytes, read unaligned as headers need not be aligned.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load(off).map_err(|_| ())
}

/// Reads a `T` at `off` through `bpf_skb_load_bytes`, wherever it lies.
#[inline(always)]
fn load_bytes<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load(off).map_err(|_| ())
}

/// Reads ports (into the tuple) or the ICMP type: (policy port, TCP flags).
#[inline(always)]
fn l4(
    ctx: &TcContext,
    off: usize,
    protocol: u8,
    sport: &mut [u8; 2],
    dport: &mut [u8; 2],
) -> Result<([u8; 2], u8), ()> {
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            *sport = load(ctx, off)?;
            *dport = load(ctx, off + 2)?;
            let flags = if protocol == PROTO_TCP {
                load(ctx, off + 13)?
            } else {
                0
            };
            Ok((*dport, flags))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let ty: u8 = load(ctx, off)?;
            // Echo request and reply carry their identifier in the tuple (request as the
            // source "port", reply as the destination), so that only the reply to a
            // tracked request passes as a reply; other ICMP keeps zero ports.
            let (request, reply) = if protocol == PROTO_ICMP {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            } else {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            };
            if ty == request {
                *sport = load(ctx, off + 4)?;
            } else if ty == reply {
                *dport = load(ctx, off + 4)?;
            }
            Ok(([0, ty], 0))
        }
        _ => Ok(([0; 2], 0)),
    }
}

fn proxy_marked(ctx: &TcContext) -> bool {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark } & MARK_MASK;
    mark == MARK_FROM_INGRESS_PROXY || mark == MARK_FROM_EGRESS_PROXY
}

#[inline(always)]
fn ipcache_v4(addr: &[u8; 4]) -> u32 {
    let key = Key::new(32, *addr);
    IPCACHE_V4
        .get(&key)
        .map(|v| v.identity)
        .unwrap_or(IDENTITY_WORLD)
}

#[inline(always)]
fn ipcache_v6(addr: &[u8; 16]) -> u32 {
    let key = Key::new(128, *addr);
    IPCACHE_V6
        .get(&key)
        .map(|v| v.identity)
        .unwrap_or(IDENTITY_WORLD)
}

#[inline(always)]
fn policy_lookup(
    endpoint_id: u32,
    dir: u8,
    peer: u32,
    protocol: u8,
    port: [u8; 2],
) -> Option<PolicyValue> {
    let key = Key::new(
        POLICY_FIXED_BITS + 16,
        PolicyKeyData {
            endpoint_id,
            peer,
            direction: dir,
            protocol,
            port,
        },
    );
    POLICY.get(&key).copied()
}

/// The verdict of one endpoint in one direction against a peer identity.
#[inline(always)]
fn side_verdict(
    ep: Option<EndpointInfo>,
    dir: u8,
    peer: u32,
    protocol: u8,
    port: [u8; 2],
) -> Verdict {
    let Some(ep) = ep else {
        // Not a local endpoint: nothing of ours to enforce on this side.
        return Verdict::ALLOW;
    };
    let mut v = Verdict {
        action: action::NONE,
        proxy_port: 0,
        cookie: 0,
        reason: drop_reason::POLICY_DENY,
    };
    // SAFETY: a lookup in a map of plain integers; the value is copied out at once.
    let class = unsafe { PEER_CLASSES.get(peer) }.copied().unwrap_or(peer);
    for id in [class, IDENTITY_ANY] {
        if let Some(p) = policy_lookup(ep.endpoint_id, dir, id, protocol, port) {
            v = v.combine(Verdict {
                action: p.action,
                proxy_port: p.proxy_port,
                cookie: p.cookie,
                reason: drop_reason::POLICY_DENY,
            });
        }
    }
    if v.action == action::NONE {
        let deny_flag = if dir == DIR_INGRESS {
            endpoint_flags::DEFAULT_DENY_INGRESS
        } else {
            endpoint_flags::DEFAULT_DENY_EGRESS
        };
        if ep.flags & deny_flag != 0 {
            v.action = action::DENY;
            v.reason = drop_reason::POLICY_DEFAULT_DENY;
        } else {
            v.action = action::ALLOW;
        }
    }
    v
}

/// Whether conntrack lets the packet through without a policy decision. `plain`: only
/// for flows without a proxy (neither entry flagged PROXIED or PROXY_UPSTREAM), and
/// nothing is written when the answer is no, so that the full path can ask again.
#[inline(always)]
fn ct_hit<T: Flow>(t: &T, tcp_flags: u8, plain: bool) -> bool {
    let closing = tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let new_syn = tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0;
    let proxy = if plain {
        ct_flags::PROXIED | ct_flags::PROXY_UPSTREAM
    } else {
        ct_flags::PROXIED
    };
    if let Some(v) = t.ct() {
        // SAFETY: the pointer comes from a successful map lookup; the fields are plain
        // integers and racing updates from other CPUs only lose a refresh.
        let v = unsafe { &mut *v };
        if v.flags & proxy != 0 {
            return false;
        }
        // A new SYN on a closed tuple is a new connection: decide it again.
        if new_syn && v.flags & ct_flags::CLOSING != 0 {
            return false;
        }
        ct_touch(v, closing, tcp_flags, ct_flags::FIN_ORIGINAL);
        return true;
    }
    if let Some(v) = t.reverse().ct() {
        // SAFETY: as above.
        let v = unsafe { &mut *v };
        // A SYN is never a reply.
        if new_syn || (plain && v.flags & proxy != 0) {
            return false;
        }
        ct_touch(v, closing, tcp_flags, ct_flags::FIN_REPLY);
        return true;
    }
    false
}

/// Records a packet of a tracked flow: FIN and RST always; the time of the last packet
/// only when it is older than CT_REFRESH_NS, so that the packets of a busy flow, from
/// both ends and so from different CPUs, do not all write the entry's cache line.
#[inline(always)]
fn ct_touch(v: &mut CtValue, closing: bool, tcp_flags: u8, fin_side: u32) {
    let n = now();
    if n.wrapping_sub(v.last_seen_ns) >= CT_REFRESH_NS {
        v.last_seen_ns = n;
    }
    if closing {
        v.flags = closing_flags(v.flags, tcp_flags, fin_side);
    }
}

/// The conntrack flags after a FIN or RST: a FIN marks its side; an RST, or FINs from
/// both sides, close the flow.
#[inline(always)]
fn closing_flags(flags: u32, tcp_flags: u8, fin_side: u32) -> u32 {
    let mut f = flags;
    if tcp_flags & TCP_FIN != 0 {
        f |= fin_side;
    }
    let both = ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY;
    if tcp_flags & TCP_RST != 0 || f & both == both {
        f |= ct_flags::CLOSING;
    }
    f
}

#[inline(always)]
fn ct_create<T: Flow>(t: &T, flags: u32, update: u64) {
    let n = now();
    let v = CtValue {
        created_ns: n,
        last_seen_ns: n,
        flags,
        packets: 1,
    };
    // A full LRU evicts; an insert can only fail on a kernel error (or an existing entry
    // with BPF_NOEXIST), and then the next packet is decided by policy again.
    t.ct_insert(&v, update);
}

fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn ipv4_tuple(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
) -> (bpf_sock_tuple, u32) {
    // SAFETY: bpf_sock_tuple is a plain C union of integers; all zeroes is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(saddr);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(daddr);
    tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes(sport);
    tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes(dport);
    (tuple, 12)
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn ipv6_tuple(
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
) -> (bpf_sock_tuple, u32) {
    // SAFETY: bpf_sock_tuple is a plain C union of integers; all zeroes is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv6.saddr = words(saddr);
    tuple.__bindgen_anon_1.ipv6.daddr = words(daddr);
    tuple.__bindgen_anon_1.ipv6.sport = u16::from_ne_bytes(sport);
    tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes(dport);
    (tuple, 36)
}

/// Looks a socket up by tuple for TCP (any state, listeners included) or UDP.
#[inline(always)]
fn sk_lookup(ctx: &TcContext, protocol: u8, tuple: &mut bpf_sock_tuple, len: u32) -> *mut bpf_sock {
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    if protocol == PROTO_TCP {
        // SAFETY: skb is the program's context, tuple a stack buffer of `len` valid
        // bytes; the caller releases a non-null result on every path.
        unsafe { bpf_skc_lookup_tcp(skb, tuple, len, BPF_F_CURRENT_NETNS, 0) }
    } else if protocol == PROTO_UDP {
        // SAFETY: as for TCP.
        unsafe { bpf_sk_lookup_udp(skb, tuple, len, BPF_F_CURRENT_NETNS, 0) }
    } else {
        core::ptr::null_mut()
    }
}

/// Assigns the packet to a local socket that owns its exact tuple (not a listener, not
/// TIME_WAIT for TCP; a connected socket for UDP) and marks it for local delivery.
#[inline(always)]
fn assign_established<T: Flow>(ctx: &TcContext, t: &T) -> Option<i32> {
    let protocol = t.protocol();
    let (mut tuple, len) = t.sock_tuple();
    let sk = sk_lookup(ctx, protocol, &mut tuple, len);
    if sk.is_null() {
        return None;
    }
    // TCP and UDP sockets are read in separate branches (the verifier tracks them as
    // different pointer types).
    let owns = if protocol == PROTO_TCP {
        // SAFETY: sk is a non-null socket reference from the lookup.
        let state = unsafe { (*sk).state };
        state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT
    } else {
        // A bound but unconnected socket would match any peer.
        T::udp_connected(sk)
    };
    if !owns {
        // SAFETY: releasing the reference taken above.
        unsafe { bpf_sk_release(sk as *mut _) };
        return None;
    }
    Some(assign(ctx, sk))
}

/// Assigns, releases the socket reference, marks. Returns the TC action.
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> i32 {
    // SAFETY: sk is a live socket reference owned by the caller and released right after.
    let r = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) };
    // SAFETY: releasing the caller's reference, exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    if r != 0 {
        return TC_ACT_SHOT;
    }
    // SAFETY: writing the mark of the program's own skb is allowed at tc.
    unsafe { (*ctx.skb.skb).mark = MARK_TO_PROXY };
    TC_ACT_OK
}

/// Hands a new flow to the proxy listening on localhost:proxy_port; fails closed.
#[inline(always)]
fn redirect<T: Flow>(ctx: &TcContext, t: &T, v: Verdict, src_id: u32, dst_id: u32, dir: u8) -> i32 {
    let (mut tuple, len) = T::listener_tuple(v.proxy_port);
    let sk = sk_lookup(ctx, t.protocol(), &mut tuple, len);
    if sk.is_null() {
        return drop(
            ctx,
            Some(t),
            drop_reason::PROXY_UNAVAILABLE,
            src_id,
            dst_id,
            dir,
            v.cookie,
        );
    }
    let r = assign(ctx, sk);
    if r != TC_ACT_OK {
        return drop(
            ctx,
            Some(t),
            drop_reason::SK_ASSIGN_FAILED,
            src_id,
            dst_id,
            dir,
            v.cookie,
        );
    }
    ct_create(t, ct_flags::PROXIED, BPF_ANY);
    TC_ACT_OK
}

/// Counts the drop under its reason, emits an event, and returns TC_ACT_SHOT.
fn drop<T: Flow>(
    ctx: &TcContext,
    t: Option<&T>,
    reason: u32,
    src_identity: u32,
    dst_identity: u32,
    direction: u8,
    cookie: u32,
) -> i32 {
    if let Some(c) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot of this CPU; nothing else writes it concurrently.
        unsafe { *c += 1 };
    }
    let mut ev = DropEvent {
        reason,
        // SAFETY: reading a field of the program's context.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        src_identity,
        dst_identity,
        direction,
        cookie,
        ..DropEvent::default()
    };
    if let Some(t) = t {
        t.fill_event(&mut ev);
    }
    if event_allowed() {
        // A full ring buffer loses the event; the counter above still has it.
        let _ = EVENTS.output::<DropEvent>(&ev, 0);
    }
    TC_ACT_SHOT
}

/// Per-CPU fixed window: at most EVENTS_PER_CPU_PER_SECOND events per second.
fn event_allowed() -> bool {
    let Some(r) = EVENT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; programs do not migrate between CPUs while running.
    let r = unsafe { &mut *r };
    let n = now();
    if n.wrapping_sub(r.window_start_ns) >= 1_000_000_000 {
        r.window_start_ns = n;
        r.in_window = 0;
    }
    if r.in_window >= EVENTS_PER_CPU_PER_SECOND {
        r.suppressed += 1;
        return false;
    }
    r.in_window += 1;
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
