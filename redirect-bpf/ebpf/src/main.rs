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

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns,
        gen::{bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    },
    macros::{classifier, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use redirect_bpf_common::{
    action, ct_flags, drop_reason, endpoint_flags, CtKeyV4, CtValue, DropEvent, EndpointInfo,
    EventRate, IpcacheValue, PolicyKeyData, PolicyValue, CONNTRACK_MAX, DIR_EGRESS, DIR_INGRESS,
    ENDPOINTS_MAX, EVENTS_BYTES, EVENTS_PER_CPU_PER_SECOND, IDENTITY_ANY, IDENTITY_WORLD,
    IPCACHE_MAX, MARK_FROM_EGRESS_PROXY, MARK_FROM_INGRESS_PROXY, MARK_MASK, MARK_TO_PROXY,
    POLICY_FIXED_BITS, POLICY_MAX, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
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
static POLICY: LpmTrie<PolicyKeyData, PolicyValue> = LpmTrie::pinned(POLICY_MAX, BPF_F_NO_PREALLOC);

#[map]
static CONNTRACK_V4: LruHashMap<CtKeyV4, CtValue> = LruHashMap::pinned(CONNTRACK_MAX, 0);

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
const BPF_F_CURRENT_NETNS: u64 = u64::MAX; // -1
const BPF_TCP_TIME_WAIT: u32 = 6;
const BPF_TCP_LISTEN: u32 = 10;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;
const LOCALHOST: [u8; 4] = [127, 0, 0, 1];

/// What the programs read from an IPv4 packet.
struct Packet {
    /// Conntrack tuple: ICMP has zero ports, so a reply matches its request.
    tuple: CtKeyV4,
    /// What policy keys call the port: the destination port, or the ICMP type.
    port: [u8; 2],
    tcp_flags: u8,
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

#[classifier]
pub fn ward_from_pod(ctx: TcContext) -> i32 {
    match from_pod(&ctx) {
        Ok(v) => v,
        Err(()) => drop(&ctx, None, drop_reason::MALFORMED, 0, 0, DIR_EGRESS, 0),
    }
}

#[classifier]
pub fn ward_to_pod(ctx: TcContext) -> i32 {
    match to_pod(&ctx) {
        Ok(v) => v,
        Err(()) => drop(&ctx, None, drop_reason::MALFORMED, 0, 0, DIR_INGRESS, 0),
    }
}

fn from_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse(ctx)? else {
        // Not IPv4: IPv6 is not enforced yet (ARP and the rest must pass).
        return Ok(TC_ACT_OK);
    };
    if proxy_marked(ctx) {
        return Ok(TC_ACT_OK);
    }
    let t = &pkt.tuple;

    // 1. A local socket that owns this exact tuple: a flow that a proxy already took, or
    //    a reply to a proxy's transparent upstream connection.
    if let Some(r) = assign_established(ctx, t) {
        return Ok(r);
    }

    // 2. Conntrack: replies and established flows pass. Proxied flows without their
    //    socket fall through to policy, which redirects again or fails closed.
    if ct_hit(t, pkt.tcp_flags) {
        return Ok(TC_ACT_OK);
    }

    // 3. Policy: the source's egress and, for a local destination, its ingress.
    let src_ep = endpoint(&t.saddr);
    let dst_ep = endpoint(&t.daddr);
    let src_id = src_ep
        .map(|e| e.identity)
        .unwrap_or_else(|| identity_v4(&t.saddr));
    let dst_id = dst_ep
        .map(|e| e.identity)
        .unwrap_or_else(|| identity_v4(&t.daddr));
    let mut v = side_verdict(src_ep, DIR_EGRESS, dst_id, t.protocol, pkt.port);
    let mut dir = DIR_EGRESS;
    if dst_ep.is_some() {
        let i = side_verdict(dst_ep, DIR_INGRESS, src_id, t.protocol, pkt.port);
        if i.action > v.action {
            dir = DIR_INGRESS;
        }
        v = v.combine(i);
    }
    match v.action {
        action::DENY => Ok(drop(ctx, Some(t), v.reason, src_id, dst_id, dir, v.cookie)),
        action::REDIRECT => Ok(redirect(ctx, t, v, src_id, dst_id, dir)),
        _ => {
            ct_create(t, 0, BPF_ANY);
            Ok(TC_ACT_OK)
        }
    }
}

fn to_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let t = &pkt.tuple;
    if proxy_marked(ctx) {
        // A proxy's upstream connection: the proxy enforced policy already. Tracked, so
        // that the pod's replies pass whatever its egress policy says.
        ct_create(t, 0, BPF_NOEXIST);
        return Ok(TC_ACT_OK);
    }
    if ct_hit(t, pkt.tcp_flags) {
        return Ok(TC_ACT_OK);
    }
    let dst_ep = endpoint(&t.daddr);
    if dst_ep.is_none() {
        return Ok(TC_ACT_OK);
    }
    let src_id = identity_v4(&t.saddr);
    let dst_id = dst_ep.map(|e| e.identity).unwrap_or(IDENTITY_WORLD);
    let v = side_verdict(dst_ep, DIR_INGRESS, src_id, t.protocol, pkt.port);
    match v.action {
        action::DENY => Ok(drop(
            ctx,
            Some(t),
            v.reason,
            src_id,
            dst_id,
            DIR_INGRESS,
            v.cookie,
        )),
        // bpf_sk_assign works only at ingress hooks; flows from other nodes are
        // redirected at the uplink's ingress, so reaching this is a configuration gap.
        action::REDIRECT => Ok(drop(
            ctx,
            Some(t),
            drop_reason::REDIRECT_UNSUPPORTED,
            src_id,
            dst_id,
            DIR_INGRESS,
            v.cookie,
        )),
        _ => {
            ct_create(t, 0, BPF_ANY);
            Ok(TC_ACT_OK)
        }
    }
}

fn parse(ctx: &TcContext) -> Result<Option<Packet>, ()> {
    let proto: u16 = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    if proto != ETH_P_IP {
        return Ok(None);
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if ver_ihl >> 4 != 4 {
        return Err(());
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let protocol: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    let saddr: [u8; 4] = ctx.load(ETH_HLEN + 12).map_err(|_| ())?;
    let daddr: [u8; 4] = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
    let frag: u16 = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| ())?);
    let l4 = ETH_HLEN + ihl;
    let mut tuple = CtKeyV4 {
        saddr,
        daddr,
        sport: [0; 2],
        dport: [0; 2],
        protocol,
        _pad: [0; 3],
    };
    let mut tcp_flags = 0;
    let mut port = [0u8; 2];
    // Later fragments carry no ports: they keep the zero ports (and so match only
    // port-wildcard entries); reassembly is left to the kernel's defrag.
    let first_fragment = frag & 0x1fff == 0;
    if first_fragment && matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        tuple.sport = ctx.load(l4).map_err(|_| ())?;
        tuple.dport = ctx.load(l4 + 2).map_err(|_| ())?;
        if protocol == PROTO_TCP {
            tcp_flags = ctx.load(l4 + 13).map_err(|_| ())?;
        }
        port = tuple.dport;
    } else if first_fragment && protocol == PROTO_ICMP {
        port[1] = ctx.load(l4).map_err(|_| ())?;
    }
    Ok(Some(Packet {
        tuple,
        port,
        tcp_flags,
    }))
}

fn proxy_marked(ctx: &TcContext) -> bool {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark } & MARK_MASK;
    mark == MARK_FROM_INGRESS_PROXY || mark == MARK_FROM_EGRESS_PROXY
}

fn endpoint(addr: &[u8; 4]) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out before the map can change it under us.
    unsafe { ENDPOINTS_V4.get(addr) }.copied()
}

fn identity_v4(addr: &[u8; 4]) -> u32 {
    let key = Key::new(32, *addr);
    IPCACHE_V4
        .get(&key)
        .map(|v| v.identity)
        .unwrap_or(IDENTITY_WORLD)
}

fn policy_lookup(
    endpoint_id: u32,
    dir: u8,
    identity: u32,
    protocol: u8,
    port: [u8; 2],
) -> Option<PolicyValue> {
    let key = Key::new(
        POLICY_FIXED_BITS + 16,
        PolicyKeyData {
            endpoint_id,
            identity,
            direction: dir,
            protocol,
            port,
        },
    );
    POLICY.get(&key).copied()
}

/// The verdict of one endpoint in one direction against a peer identity.
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
    for id in [peer, IDENTITY_ANY] {
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

/// Whether conntrack lets the packet through without a policy decision.
fn ct_hit(t: &CtKeyV4, tcp_flags: u8) -> bool {
    let closing = tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let new_syn = tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0;
    if let Some(v) = CONNTRACK_V4.get_ptr_mut(t) {
        // SAFETY: the pointer comes from a successful map lookup; the fields are plain
        // integers and racing updates from other CPUs only lose a count.
        let v = unsafe { &mut *v };
        if v.flags & ct_flags::PROXIED != 0 {
            return false;
        }
        // A new SYN on a closed tuple is a new connection: decide it again.
        if new_syn && v.flags & ct_flags::CLOSING != 0 {
            return false;
        }
        v.last_seen_ns = now();
        v.packets = v.packets.wrapping_add(1);
        if closing {
            v.flags |= ct_flags::CLOSING;
        }
        return true;
    }
    let r = t.reverse();
    if let Some(v) = CONNTRACK_V4.get_ptr_mut(&r) {
        // SAFETY: as above.
        let v = unsafe { &mut *v };
        if new_syn {
            // A SYN is never a reply.
            return false;
        }
        v.last_seen_ns = now();
        if closing {
            v.flags |= ct_flags::CLOSING;
        }
        return true;
    }
    false
}

fn ct_create(t: &CtKeyV4, flags: u32, update: u64) {
    let n = now();
    let v = CtValue {
        created_ns: n,
        last_seen_ns: n,
        flags,
        packets: 1,
    };
    // A full LRU evicts; an insert can only fail on a kernel error, and then the next
    // packet is decided by policy again.
    let _ = CONNTRACK_V4.insert(t, &v, update);
}

fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

fn ipv4_tuple(saddr: [u8; 4], daddr: [u8; 4], sport: [u8; 2], dport: [u8; 2]) -> bpf_sock_tuple {
    // SAFETY: bpf_sock_tuple is a plain C union of integers; all zeroes is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(saddr);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(daddr);
    tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes(sport);
    tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes(dport);
    tuple
}

const TUPLE_V4_LEN: u32 = 12;

/// Assigns the packet to a local socket that owns its exact tuple (not a listener, not
/// TIME_WAIT for TCP; a connected socket for UDP) and marks it for local delivery.
fn assign_established(ctx: &TcContext, t: &CtKeyV4) -> Option<i32> {
    let mut tuple = ipv4_tuple(t.saddr, t.daddr, t.sport, t.dport);
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    if t.protocol == PROTO_TCP {
        // SAFETY: skb is the program's context, tuple a stack buffer of TUPLE_V4_LEN
        // valid bytes; the returned reference is released on every path below.
        let sk =
            unsafe { bpf_skc_lookup_tcp(skb, &mut tuple, TUPLE_V4_LEN, BPF_F_CURRENT_NETNS, 0) };
        if sk.is_null() {
            return None;
        }
        // SAFETY: sk is a non-null socket reference from the lookup.
        let state = unsafe { (*sk).state };
        if state == BPF_TCP_LISTEN || state == BPF_TCP_TIME_WAIT {
            // SAFETY: releasing the reference taken above.
            unsafe { bpf_sk_release(sk as *mut _) };
            return None;
        }
        return Some(assign(ctx, sk));
    }
    if t.protocol == PROTO_UDP {
        // SAFETY: as for TCP.
        let sk =
            unsafe { bpf_sk_lookup_udp(skb, &mut tuple, TUPLE_V4_LEN, BPF_F_CURRENT_NETNS, 0) };
        if sk.is_null() {
            return None;
        }
        // A bound but unconnected socket would match any peer: only connected ones own
        // the tuple.
        // SAFETY: sk is a non-null socket reference from the lookup.
        let connected = unsafe { (*sk).dst_ip4 } != 0;
        if !connected {
            // SAFETY: releasing the reference taken above.
            unsafe { bpf_sk_release(sk as *mut _) };
            return None;
        }
        return Some(assign(ctx, sk));
    }
    None
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

/// Hands a new flow to the proxy listening on 127.0.0.1:proxy_port; fails closed.
fn redirect(ctx: &TcContext, t: &CtKeyV4, v: Verdict, src_id: u32, dst_id: u32, dir: u8) -> i32 {
    let port = v.proxy_port.to_be_bytes();
    let mut tuple = ipv4_tuple([0; 4], LOCALHOST, [0; 2], port);
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    let sk = if t.protocol == PROTO_TCP {
        // SAFETY: as in assign_established.
        unsafe { bpf_skc_lookup_tcp(skb, &mut tuple, TUPLE_V4_LEN, BPF_F_CURRENT_NETNS, 0) }
    } else if t.protocol == PROTO_UDP {
        // SAFETY: as in assign_established.
        unsafe { bpf_sk_lookup_udp(skb, &mut tuple, TUPLE_V4_LEN, BPF_F_CURRENT_NETNS, 0) }
    } else {
        core::ptr::null_mut()
    };
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
fn drop(
    ctx: &TcContext,
    t: Option<&CtKeyV4>,
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
        ev.saddr = t.saddr;
        ev.daddr = t.daddr;
        ev.sport = t.sport;
        ev.dport = t.dport;
        ev.protocol = t.protocol;
    }
    if event_allowed() {
        // A full ring buffer loses the event; the counter above still has it.
        let _ = EVENTS.output(&ev, 0);
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
