//! Network namespaces and what goes in them: veths, addresses, routes, commands and
//! closures.

use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Instant;

use nix::sched::{setns, CloneFlags};

use crate::{run, Result};

/// A network namespace this process made, with loopback up. Dropping it deletes it and
/// everything in it (veths, addresses, routes), also when a test panics.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (see [`crate::unique`]); fails when one of that name
    /// exists already, so that two runs never share a namespace.
    pub fn new(name: impl Into<String>) -> Result<Netns> {
        let name = name.into();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on, Drop deletes it whatever fails next.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        ip(&self.name, args)
    }

    /// Adds `cidr` to `dev` (see [`addr`]).
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        addr(&self.name, dev, cidr)
    }

    /// Sets sysctls (`key=value`) of this namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        sysctl(&self.name, settings)
    }

    /// `program` in this namespace's network only (see [`nsenter`]).
    pub fn nsenter(&self, program: &str) -> Command {
        nsenter(&self.name, program)
    }

    /// `program` under `ip netns exec` (see [`ip_netns_exec`]).
    pub fn exec(&self, program: &str) -> Command {
        ip_netns_exec(&self.name, program)
    }

    /// Runs `f` on a thread inside this namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.name, f)
    }

    /// Runs `f` on a new thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        spawn_in(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete(&self.name);
    }
}

/// Creates the namespace `name` with loopback up, for a caller that keeps track of it
/// itself (the lab records its namespaces in its state file and deletes them with
/// [`delete`]).
pub fn create(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", name]))?;
    ip(name, &["link", "set", "lo", "up"]).inspect_err(|_| {
        let _ = delete(name);
    })
}

/// Deletes the namespace `name` and everything in it.
pub fn delete(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "del", name]))
}

fn path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// `ip -n NS ARGS`.
pub fn ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Adds `cidr` to `dev` in `ns`. IPv6 addresses skip duplicate address detection
/// (`nodad`): usable at once instead of tentative for a second.
pub fn addr(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    let mut args = vec!["addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ip(ns, &args)
}

/// A veth pair: `name` in `ns`, its peer `peer_name` in `peer_ns` (both down).
pub fn veth(ns: &str, name: &str, peer_ns: &str, peer_name: &str) -> Result<()> {
    ip(
        ns,
        &[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_ns,
        ],
    )
}

/// Delivers packets that carry `fwmark` (`VALUE/MASK`) to local sockets in `ns`, as a
/// transparent proxy needs: a rule at `pref` that looks them up in `table`, whose
/// default route is local (for IPv6 with `ipv6`, else IPv4).
pub fn local_delivery(ns: &str, ipv6: bool, fwmark: &str, table: u32, pref: u32) -> Result<()> {
    let (family, any) = if ipv6 {
        ("-6", "::/0")
    } else {
        ("-4", "0.0.0.0/0")
    };
    let (table, pref) = (table.to_string(), pref.to_string());
    ip(
        ns,
        &[
            family, "rule", "add", "fwmark", fwmark, "lookup", &table, "pref", &pref,
        ],
    )?;
    ip(
        ns,
        &[
            family, "route", "add", "local", any, "dev", "lo", "table", &table,
        ],
    )
}

/// Sets sysctls (`key=value`) of the namespace `ns`.
pub fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    run(nsenter(ns, "sysctl").arg("-qw").args(settings))
}

/// A command that runs `program` in the network namespace `ns` only (`nsenter --net`):
/// unlike `ip netns exec` it keeps the machine's mounts, so pins under /sys/fs/bpf stay
/// visible to it and outlive it.
pub fn nsenter(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", path(ns).display()))
        .arg("--")
        .arg(program);
    c
}

/// A command that runs `program` under `ip netns exec NS`, which also mounts the
/// namespace's own /sys (its interfaces' counters) and execs the program, so that the
/// child's PID is the program's.
pub fn ip_netns_exec(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `f` on a thread that has joined the network namespace `ns`, and returns what it
/// returns; a panic in `f` goes on in the caller. Panics when the namespace cannot be
/// entered (a set-up error).
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = path(ns);
    thread::scope(|s| {
        let joined = s
            .spawn(|| {
                enter(&path);
                f()
            })
            .join();
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `f` on a new thread that has joined the network namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = path(ns);
    thread::spawn(move || {
        enter(&path);
        f()
    })
}

fn enter(path: &std::path::Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Err(e) = setns(file, CloneFlags::CLONE_NEWNET) {
        panic!("cannot enter {}: {e}", path.display());
    }
}

/// One address family of a pod's link into its node: the pod's address, the node side's
/// address (the pod's gateway) and the prefix length both carry.
#[derive(Clone, Copy, Debug)]
pub struct Subnet {
    pub ip: IpAddr,
    pub gateway: IpAddr,
    pub prefix: u8,
}

impl Subnet {
    fn is_host(&self) -> bool {
        self.prefix == if self.ip.is_ipv6() { 128 } else { 32 }
    }

    fn family(&self) -> &'static str {
        if self.ip.is_ipv6() {
            "-6"
        } else {
            "-4"
        }
    }
}

/// Joins the namespace `pod` to `node` as tests wire a pod: a veth `veth` in the node and
/// `eth0` in the pod, both up; per subnet the gateway address on `veth`, the pod's address
/// on `eth0` and the pod's default route via the gateway. A host prefix (/32, /128) gets
/// the routes a CNI installs instead of a shared subnet: the pod's address via `veth` in
/// the node, the gateway on-link in the pod.
///
/// Returns when the node's first route to the pod was added (None without a host
/// prefix): the moment a CNI announces the pod, which endpoint discovery reacts to.
pub fn link_pod(
    node: &str,
    veth_name: &str,
    pod: &str,
    subnets: &[Subnet],
) -> Result<Option<Instant>> {
    veth(node, veth_name, pod, "eth0")?;
    for s in subnets {
        addr(node, veth_name, &format!("{}/{}", s.gateway, s.prefix))?;
    }
    ip(node, &["link", "set", veth_name, "up"])?;
    for s in subnets {
        addr(pod, "eth0", &format!("{}/{}", s.ip, s.prefix))?;
    }
    ip(pod, &["link", "set", "eth0", "up"])?;
    let mut routed = None;
    for s in subnets {
        let (pod_ip, gw) = (s.ip.to_string(), s.gateway.to_string());
        if s.is_host() {
            ip(
                node,
                &[s.family(), "route", "add", &pod_ip, "dev", veth_name],
            )?;
            routed.get_or_insert_with(Instant::now);
            ip(pod, &[s.family(), "route", "add", &gw, "dev", "eth0"])?;
        }
        ip(pod, &[s.family(), "route", "add", "default", "via", &gw])?;
    }
    Ok(routed)
}
