//! The node routing the redirect needs: a packet the datapath assigned to a proxy socket
//! carries [`MARK_TO_PROXY`] and must be delivered locally, not forwarded (forwarding
//! drops an skb that holds a socket). One ip rule per family sends marked packets to
//! table [`TABLE`], whose only route is `local default dev lo`.
//!
//! Installed only when absent (an agent restart never duplicates it) and removed at a
//! clean shutdown; an "exists" on adding and a "not found" on removing (another process
//! got there first) are fine. Works on the network namespace of a [`Netlink`]
//! connection, through rtnetlink.

use std::fmt;

use futures_util::stream::TryStreamExt;
use nix::errno::Errno;
use redirect_bpf_common::{MARK_MASK, MARK_TO_PROXY};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::IpVersion;

use crate::netlink::{Netlink, NetlinkError};

/// The routing table of marked packets.
pub const TABLE: u32 = 100;
/// The preference of the ip rule (before `main`, 32766).
pub const RULE_PREF: u32 = 90;

/// An address family of the routing setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// The families of this network namespace: IPv4, and IPv6 unless the kernel has none
    /// or it is disabled here (`net.ipv6.conf.lo.disable_ipv6`), where the IPv6 local
    /// route cannot be added and no IPv6 flow can reach a proxy anyway.
    pub fn present() -> Vec<Family> {
        let mut v = vec![Family::V4];
        if ipv6_enabled() {
            v.push(Family::V6);
        }
        v
    }

    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    fn ip_version(self) -> IpVersion {
        match self {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Whether the calling thread's network namespace has IPv6 (compiled in, not disabled on
/// loopback).
pub fn ipv6_enabled() -> bool {
    // /proc/sys/net shows the network namespace of the thread that opens it.
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// The rule as `ip rule` shows it, for error messages.
fn rule_text(family: Family) -> String {
    format!("ip rule fwmark {MARK_TO_PROXY:#x}/{MARK_MASK:#x} lookup {TABLE} pref {RULE_PREF} ({family})")
}

/// The route as `ip route` shows it, for error messages.
fn route_text(family: Family) -> String {
    format!("ip route local default dev lo table {TABLE} ({family})")
}

/// Whether a rule is Ward's: the mark and mask, table [`TABLE`], preference
/// [`RULE_PREF`].
fn is_ours(rule: &RuleMessage) -> bool {
    let attr = |want: fn(&RuleAttribute) -> Option<u32>| rule.attributes.iter().find_map(want);
    let table = attr(|a| match a {
        RuleAttribute::Table(t) => Some(*t),
        _ => None,
    })
    .unwrap_or(u32::from(rule.header.table));
    rule.header.action == RuleAction::ToTable
        && table == TABLE
        && attr(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        }) == Some(RULE_PREF)
        && attr(|a| match a {
            RuleAttribute::FwMark(m) => Some(*m),
            _ => None,
        }) == Some(MARK_TO_PROXY)
        && attr(|a| match a {
            RuleAttribute::FwMask(m) => Some(*m),
            _ => None,
        }) == Some(MARK_MASK)
}

/// Ward's ip rules in `family` (one, unless something duplicated it).
async fn our_rules(nl: &Netlink, family: Family) -> Result<Vec<RuleMessage>, NetlinkError> {
    nl.handle()
        .rule()
        .get(family.ip_version())
        .execute()
        .try_filter(|r| std::future::ready(is_ours(r)))
        .try_collect()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink(format!("listing ip rules ({family})"), e))
}

/// How many of Ward's ip rules exist in `family` (0 or 1 unless something duplicated it).
pub async fn rule_count(nl: &Netlink, family: Family) -> Result<usize, NetlinkError> {
    Ok(our_rules(nl, family).await?.len())
}

/// The index of `lo`, the device of the local route.
async fn loopback(nl: &Netlink) -> Result<u32, NetlinkError> {
    nl.link_index("lo")
        .await?
        .ok_or_else(|| NetlinkError::new("link lo", crate::netlink::Reason::Kernel(Errno::ENODEV)))
}

/// `local default dev lo table 100` in `family`, as added; with `for_removal`, in the
/// shape a removal matches any scope and protocol with (as `ip route del` sends it).
fn local_route(family: Family, lo: u32, for_removal: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family.address_family();
    m.header.table = u8::try_from(TABLE).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.header.kind = RouteType::Local;
    (m.header.scope, m.header.protocol) = if for_removal {
        (RouteScope::NoWhere, RouteProtocol::Unspec)
    } else {
        (RouteScope::Host, RouteProtocol::Boot)
    };
    m.attributes.push(RouteAttribute::Table(TABLE));
    m.attributes.push(RouteAttribute::Oif(lo));
    m
}

/// Whether table [`TABLE`] has the local default route through `lo` in `family`.
pub async fn has_local_route(nl: &Netlink, family: Family) -> Result<bool, NetlinkError> {
    let lo = loopback(nl).await?;
    let mut dump = RouteMessage::default();
    dump.header.address_family = family.address_family();
    let routes: Vec<RouteMessage> = nl
        .handle()
        .route()
        .get(dump)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink(format!("listing routes ({family})"), e))?;
    Ok(routes.iter().any(|r| {
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(r.header.table));
        table == TABLE
            && r.header.kind == RouteType::Local
            && r.header.destination_prefix_length == 0
            && r.attributes.contains(&RouteAttribute::Oif(lo))
    }))
}

/// Installs the rule and the route of every family of the namespace
/// ([`Family::present`]) where they are absent. Returns whether anything was added.
pub async fn ensure(nl: &Netlink) -> Result<bool, NetlinkError> {
    let lo = loopback(nl).await?;
    let mut added = false;
    for f in Family::present() {
        if !has_local_route(nl, f).await? {
            let add = nl
                .handle()
                .route()
                .add(local_route(f, lo, false))
                .execute()
                .await;
            added |= tolerate(add, Errno::EEXIST, || format!("adding {}", route_text(f)))?;
        }
        if rule_count(nl, f).await? == 0 {
            let mut rule = nl
                .handle()
                .rule()
                .add()
                .table_id(TABLE)
                .priority(RULE_PREF)
                .fw_mark(MARK_TO_PROXY)
                .action(RuleAction::ToTable);
            rule.message_mut().header.family = f.address_family();
            rule.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(MARK_MASK));
            added |= tolerate(rule.execute().await, Errno::EEXIST, || {
                format!("adding {}", rule_text(f))
            })?;
        }
    }
    Ok(added)
}

/// Removes the rules (every copy) and routes of the namespace's families; what is
/// absent is fine.
pub async fn remove(nl: &Netlink) -> Result<(), NetlinkError> {
    let lo = loopback(nl).await?;
    for f in Family::present() {
        for rule in our_rules(nl, f).await? {
            let del = nl.handle().rule().del(rule).execute().await;
            tolerate(del, Errno::ENOENT, || format!("removing {}", rule_text(f)))?;
        }
        if has_local_route(nl, f).await? {
            let del = nl
                .handle()
                .route()
                .del(local_route(f, lo, true))
                .execute()
                .await;
            tolerate(del, Errno::ESRCH, || format!("removing {}", route_text(f)))?;
        }
    }
    Ok(())
}

/// Whether a change was made: `Ok` is true, the kernel's `fine` errno (the rule or
/// route is already there, or already gone) is false, any other error is the error.
fn tolerate(
    r: Result<(), rtnetlink::Error>,
    fine: Errno,
    object: impl FnOnce() -> String,
) -> Result<bool, NetlinkError> {
    match r {
        Ok(()) => Ok(true),
        Err(e) => {
            let e = NetlinkError::from_rtnetlink(object(), e);
            if e.errno() == Some(fine) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}
