//! `ward observe`'s filters, Hubble's: values of one flag are alternatives (any may
//! match), different flags must all match.

use std::net::IpAddr;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use regex::Regex;

use super::flow::{Flow, Kind, Side, Verdict};

/// `--protocol`: an L4 protocol, or `http`/`dns` for the proxies' records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    Http,
    Dns,
}

/// `NAMESPACE/POD` or `POD`, matched as Hubble does: the namespace exactly and the pod
/// name as a prefix (`production/api` matches `production/api-7d9c5`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMatch {
    pub namespace: String,
    pub prefix: String,
}

impl PodMatch {
    /// `default_namespace` is taken for a bare `POD` (Hubble takes `default`, or the one
    /// `--namespace` given).
    pub fn parse(s: &str, default_namespace: &str) -> Result<PodMatch> {
        let (ns, pod) = s.split_once('/').unwrap_or((default_namespace, s));
        if ns.is_empty() || pod.contains('/') {
            bail!("{s:?}: expected NAMESPACE/POD or POD");
        }
        Ok(PodMatch {
            namespace: ns.to_string(),
            prefix: pod.to_string(),
        })
    }

    fn matches(&self, side: &Side) -> bool {
        side.pod
            .as_deref()
            .and_then(|p| p.split_once('/'))
            .is_some_and(|(ns, name)| ns == self.namespace && name.starts_with(&self.prefix))
    }
}

/// A time for `--since`/`--until`: a duration back from now (`5m`, `1h30m`, `90s`) or an
/// RFC 3339 time (`2026-12-07T08:00:00Z`).
pub fn parse_time(s: &str, now: SystemTime) -> Result<SystemTime> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(s).with_context(|| {
        format!("{s:?}: expected a duration like 5m or 1h30m, or an RFC 3339 time like 2026-12-07T08:00:00Z")
    })
}

/// Every filter of one `ward observe`.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pods: Vec<PodMatch>,
    pub from_pods: Vec<PodMatch>,
    pub to_pods: Vec<PodMatch>,
    pub namespaces: Vec<String>,
    pub from_namespaces: Vec<String>,
    pub to_namespaces: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub from_ips: Vec<IpAddr>,
    pub to_ips: Vec<IpAddr>,
    pub verdicts: Vec<Verdict>,
    pub kinds: Vec<Kind>,
    pub protocols: Vec<Protocol>,
    pub ports: Vec<u16>,
    pub from_ports: Vec<u16>,
    pub to_ports: Vec<u16>,
    /// Upper case.
    pub http_methods: Vec<String>,
    pub http_paths: Vec<Regex>,
    pub nodes: Vec<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

/// Any of `list` satisfies `f`, or the list is empty (no such filter).
fn any<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

impl Filter {
    /// Whether the flow passes every filter. The stream's notes (lost events) always do.
    pub fn matches(&self, f: &Flow) -> bool {
        if !f.is_record() {
            return true;
        }
        let (src, dst) = (f.source(), f.destination());
        let ns_is = |side: &Side, ns: &String| side.namespace() == Some(ns.as_str());
        let time_ok = match f.time() {
            Some(t) => self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u),
            None => self.since.is_none() && self.until.is_none(),
        };
        time_ok
            && any(&self.pods, |p| p.matches(&src) || p.matches(&dst))
            && any(&self.from_pods, |p| p.matches(&src))
            && any(&self.to_pods, |p| p.matches(&dst))
            && any(&self.namespaces, |n| ns_is(&src, n) || ns_is(&dst, n))
            && any(&self.from_namespaces, |n| ns_is(&src, n))
            && any(&self.to_namespaces, |n| ns_is(&dst, n))
            && any(&self.ips, |ip| src.ip == Some(*ip) || dst.ip == Some(*ip))
            && any(&self.from_ips, |ip| src.ip == Some(*ip))
            && any(&self.to_ips, |ip| dst.ip == Some(*ip))
            && any(&self.verdicts, |v| f.verdict() == Some(*v))
            && any(&self.kinds, |k| f.is(*k))
            && any(&self.protocols, |p| protocol_matches(*p, f))
            && any(&self.ports, |p| src.port == *p || dst.port == *p)
            && any(&self.from_ports, |p| src.port == *p)
            && any(&self.to_ports, |p| dst.port == *p)
            && any(&self.http_methods, |m| {
                f.http().is_some_and(|h| h.method.eq_ignore_ascii_case(m))
            })
            && any(&self.http_paths, |re| {
                f.http().is_some_and(|h| re.is_match(&h.path))
            })
            && any(&self.nodes, |n| f.node == *n)
    }
}

fn protocol_matches(p: Protocol, f: &Flow) -> bool {
    let l4 = |name: &str| f.l4().is_some_and(|x| x.eq_ignore_ascii_case(name));
    match p {
        Protocol::Tcp => l4("TCP"),
        Protocol::Udp => l4("UDP"),
        Protocol::Sctp => l4("SCTP"),
        Protocol::Icmp => l4("ICMP"),
        Protocol::Icmpv6 => l4("ICMPv6"),
        Protocol::Http => f.is(Kind::Http),
        Protocol::Dns => f.is(Kind::Dns),
    }
}

/// The last `n` of `flows` (all when `n` is None).
pub fn last(flows: Vec<Flow>, n: Option<usize>) -> Vec<Flow> {
    match n {
        Some(n) if n < flows.len() => flows[flows.len() - n..].to_vec(),
        _ => flows,
    }
}

/// Sorts flows of several agents by time, stably (the stream's notes, without a time,
/// come first).
pub fn by_time(flows: &mut [Flow]) {
    flows.sort_by_key(|f| f.time().unwrap_or(SystemTime::UNIX_EPOCH));
}
