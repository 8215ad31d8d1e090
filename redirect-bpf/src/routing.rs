//! The node routing the redirect needs: a packet the datapath assigned to a proxy socket
//! carries [`MARK_TO_PROXY`] and must be delivered locally, not forwarded (forwarding
//! drops an skb that holds a socket). One ip rule per family sends marked packets to
//! table [`TABLE`], whose only route is `local default dev lo`.
//!
//! Installed only when absent (an agent restart never duplicates it) and removed at a
//! clean shutdown. Works on the calling thread's network namespace, through the `ip`
//! command (iproute2), which every node has.

use std::process::Command;

use redirect_bpf_common::{MARK_MASK, MARK_TO_PROXY};

use crate::Error;

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
    /// or it is disabled here (`net.ipv6.conf.lo.disable_ipv6`), where `ip -6 route add`
    /// fails and no IPv6 flow can reach a proxy anyway.
    pub fn present() -> Vec<Family> {
        let mut v = vec![Family::V4];
        if ipv6_enabled() {
            v.push(Family::V6);
        }
        v
    }

    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// Whether the calling thread's network namespace has IPv6 (compiled in, not disabled on
/// loopback).
pub fn ipv6_enabled() -> bool {
    // /proc/sys/net shows the network namespace of the thread that opens it.
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

fn ip(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Routing(format!("cannot run ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(Error::Routing(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mark() -> String {
    format!("{MARK_TO_PROXY:#x}/{MARK_MASK:#x}")
}

/// How many of Ward's ip rules exist in `family` (0 or 1 unless something duplicated it).
pub fn rule_count(family: Family) -> Result<usize, Error> {
    let pref = RULE_PREF.to_string();
    let out = ip(&[family.flag(), "rule", "show", "pref", &pref])?;
    let want = format!("fwmark {} lookup {TABLE}", mark());
    Ok(out.lines().filter(|l| l.contains(&want)).count())
}

/// Whether table [`TABLE`] has the local default route in `family`.
pub fn has_local_route(family: Family) -> Result<bool, Error> {
    let table = TABLE.to_string();
    let out = match ip(&[family.flag(), "route", "show", "table", &table]) {
        Ok(out) => out,
        // A table that never had a route does not exist yet.
        Err(Error::Routing(e)) if e.contains("does not exist") => String::new(),
        Err(e) => return Err(e),
    };
    Ok(out
        .lines()
        .any(|l| l.starts_with("local default dev lo") || l.starts_with("local ::/0 dev lo")))
}

/// Installs the rule and the route of every family of the namespace
/// ([`Family::present`]) where they are absent. Returns whether anything was added.
pub fn ensure() -> Result<bool, Error> {
    let mut added = false;
    let table = TABLE.to_string();
    let pref = RULE_PREF.to_string();
    let mark = mark();
    for f in Family::present() {
        if !has_local_route(f)? {
            ip(&[
                f.flag(),
                "route",
                "add",
                "local",
                f.default_route(),
                "dev",
                "lo",
                "table",
                &table,
            ])?;
            added = true;
        }
        if rule_count(f)? == 0 {
            ip(&[
                f.flag(),
                "rule",
                "add",
                "fwmark",
                &mark,
                "lookup",
                &table,
                "pref",
                &pref,
            ])?;
            added = true;
        }
    }
    Ok(added)
}

/// Removes the rules and routes (every copy) of the namespace's families; what is absent
/// is fine.
pub fn remove() -> Result<(), Error> {
    let table = TABLE.to_string();
    let pref = RULE_PREF.to_string();
    let mark = mark();
    for f in Family::present() {
        for _ in 0..rule_count(f)? {
            ip(&[
                f.flag(),
                "rule",
                "del",
                "fwmark",
                &mark,
                "lookup",
                &table,
                "pref",
                &pref,
            ])?;
        }
        if has_local_route(f)? {
            ip(&[
                f.flag(),
                "route",
                "del",
                "local",
                f.default_route(),
                "dev",
                "lo",
                "table",
                &table,
            ])?;
        }
    }
    Ok(())
}
