//! The lab's network: namespaces, veths, a bridge, addresses and routes, all inside
//! namespaces this lab created. The machine's root namespace gets nothing.
//!
//! ```text
//!  pod ns: eth0 (POD_IP/32, default via NODE_IP) ── veth ── node ns: lxcN (route POD_IP/32)
//!  node ns: up0 (NODE_IP/32) ── veth ── fabric ns: br0 ── veth ── world ns: eth0 (external IPs)
//! ```
//! Nodes reach each other and the world on the bridge (on-link /32 routes); remote pods
//! via their node. Pods that the cluster gives an IPv6 address beside the IPv4 one get it
//! too (POD_IP6/128, default via the link-local `fe80::1` of their veth, as CNIs do); their
//! nodes then get `fd00:ffff::N` on up0 and /128 routes to each other's pods (the world
//! stays IPv4). Everything created is recorded in the run's `state.json` before it is
//! made, so that `down` (and `down --all` after a crash) removes it.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use policy_model::Cluster;
use serde::{Deserialize, Serialize};
use testkit::{addr, ip as ipn, sysctl, veth};

/// Where every lab keeps its run directory.
pub const RUN_ROOT: &str = "/run/ward-lab";
/// Prefix of every bpffs root a lab's agents pin under.
pub const BPF_PREFIX: &str = "/sys/fs/bpf/ward-lab-";

/// One network namespace of the lab and the address it speaks from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ns/pod`, `node:NAME` or `external:NAME`.
    pub key: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The IPv6 address of a dual-stack pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The node's IPv6 address on up0, when it has dual-stack pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub bpf_root: PathBuf,
    /// The agent's PID on this machine (of the container's process with `--agent-image`).
    pub agent_pid: Option<u32>,
    /// The agent's container in the lab's podman store (`--agent-image`), recorded
    /// before it is started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Everything a lab made, saved as `state.json` in its run directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    pub run_dir: PathBuf,
    /// Where the scenario came from (for the record).
    pub source: String,
    pub profile: Option<String>,
    pub agents: bool,
    /// Namespaces in creation order (recorded before each is created).
    pub namespaces: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub endpoints: Vec<Endpoint>,
    /// Every process the lab started (agents, servers), by PID.
    pub pids: Vec<u32>,
    /// The node image the agents run as containers (`--agent-image`), and the lab's
    /// podman store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::image::ImageState>,
}

impl LabState {
    /// A fresh, unique lab id: `wl` and 8 hex digits from the PID and the clock.
    pub fn new_id() -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
            .unwrap_or(0);
        let mixed = nanos.wrapping_mul(2_654_435_761) ^ std::process::id().rotate_left(20);
        format!("wl{mixed:08x}")
    }

    pub fn state_file(run_dir: &Path) -> PathBuf {
        run_dir.join("state.json")
    }

    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        let path = LabState::state_file(&self.run_dir);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn load(run_dir: &Path) -> Result<LabState> {
        let path = LabState::state_file(run_dir);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid state", path.display()))
    }

    pub fn endpoint(&self, key: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.key == key)
    }
}

impl Endpoint {
    /// The address a probe uses: IPv4, or IPv6 for `family: ipv6` (None when the
    /// endpoint has no IPv6 address).
    pub fn addr(&self, ipv6: bool) -> Option<IpAddr> {
        if ipv6 {
            self.ip6.map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(self.ip))
        }
    }
}

impl LabState {
    fn netns(&self, suffix: &str) -> String {
        let clean: String = suffix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!("{}-{clean}", self.id)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        if crate::lifecycle::stopping() {
            bail!("interrupted");
        }
        if self.namespaces.iter().any(|n| n == name) {
            bail!("two lab objects map to the network namespace {name}");
        }
        self.namespaces.push(name.to_string());
        self.save()?;
        Ok(testkit::create(name)?)
    }

    /// Creates the whole topology for `cluster`. Nodes without an IP in the cluster (and a
    /// node for pods without one) get addresses from 172.31.255.0/24.
    pub fn build(&mut self, cluster: &Cluster) -> Result<()> {
        let nodes = lab_nodes(cluster);
        let dual = cluster.pods.iter().any(|p| pod_ipv6(p).is_some());
        let fabric = self.netns("fabric");
        self.add_ns(&fabric)?;
        ipn(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ipn(&fabric, &["link", "set", "br0", "up"])?;

        for (i, (name, ip4)) in nodes.iter().enumerate() {
            let ns = self.netns(name);
            self.add_ns(&ns)?;
            let port = format!("u{i}");
            veth(&fabric, &port, &ns, "up0")?;
            ipn(&fabric, &["link", "set", &port, "master", "br0", "up"])?;
            sysctl(
                &ns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            addr(&ns, "up0", &format!("{ip4}/32"))?;
            let ip6 = dual.then(|| generated_node_ip6(i));
            if let Some(ip6) = ip6 {
                sysctl(&ns, &["net.ipv6.conf.all.forwarding=1"])?;
                // nodad: usable at once. The link-local one is the source of neighbour
                // solicitations for packets the node forwards, and a tentative one would
                // hold them for a second.
                for a in [format!("{ip6}/128"), format!("fe80::ffff:{:x}/64", i + 1)] {
                    addr(&ns, "up0", &a)?;
                }
            }
            ipn(&ns, &["link", "set", "up0", "up"])?;
            self.nodes.push(NodeState {
                name: name.clone(),
                netns: ns.clone(),
                ip: *ip4,
                ip6,
                bpf_root: PathBuf::from(format!("{BPF_PREFIX}{}-{i}", self.id)),
                agent_pid: None,
                container: None,
            });
            self.endpoints.push(Endpoint {
                key: format!("node:{name}"),
                netns: ns,
                ip: *ip4,
                ip6,
            });
        }

        let externals: Vec<(String, Ipv4Addr)> = cluster
            .externals
            .iter()
            .filter_map(|e| match e.ip {
                IpAddr::V4(v4) => Some((e.name.clone(), v4)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let world = self.netns("world");
        self.add_ns(&world)?;
        veth(&fabric, "w0", &world, "eth0")?;
        ipn(&fabric, &["link", "set", "w0", "master", "br0", "up"])?;
        sysctl(
            &world,
            &[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        let mut world_ips: Vec<Ipv4Addr> = Vec::new();
        for (name, ip4) in &externals {
            if !world_ips.contains(ip4) {
                addr(&world, "eth0", &format!("{ip4}/32"))?;
                world_ips.push(*ip4);
            }
            self.endpoints.push(Endpoint {
                key: format!("external:{name}"),
                netns: world.clone(),
                ip: *ip4,
                ip6: None,
            });
        }
        ipn(&world, &["link", "set", "eth0", "up"])?;

        // Pods, each on its node.
        let mut pods_of: BTreeMap<String, Vec<(String, Ipv4Addr)>> = BTreeMap::new();
        let mut pods6_of: BTreeMap<String, Vec<Ipv6Addr>> = BTreeMap::new();
        for (i, p) in cluster.pods.iter().enumerate() {
            let Some(ip4) = pod_ipv4(p) else { continue };
            let node_name = p.node.clone().unwrap_or_else(|| nodes[0].0.clone());
            let Some(node) = self.nodes.iter().find(|n| n.name == node_name).cloned() else {
                bail!(
                    "pod {}/{}: node {node_name} is not in the cluster",
                    p.namespace,
                    p.name
                );
            };
            let ns = self.netns(&format!("{}-{}", p.namespace, p.name));
            self.add_ns(&ns)?;
            let veth_name = format!("lxc{i:x}");
            veth(&node.netns, &veth_name, &ns, "eth0")?;
            addr(&ns, "eth0", &format!("{ip4}/32"))?;
            ipn(&ns, &["link", "set", "eth0", "up"])?;
            let gw = node.ip.to_string();
            ipn(&ns, &["route", "add", &format!("{gw}/32"), "dev", "eth0"])?;
            ipn(&ns, &["route", "add", "default", "via", &gw, "dev", "eth0"])?;
            ipn(&node.netns, &["link", "set", &veth_name, "up"])?;
            ipn(
                &node.netns,
                &["route", "add", &format!("{ip4}/32"), "dev", &veth_name],
            )?;
            let ip6 = pod_ipv6(p);
            if let Some(ip6) = ip6 {
                let a = ip6.to_string();
                addr(&ns, "eth0", &format!("{a}/128"))?;
                addr(&node.netns, &veth_name, "fe80::1/64")?;
                ipn(
                    &ns,
                    &[
                        "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                    ],
                )?;
                ipn(
                    &node.netns,
                    &["-6", "route", "add", &format!("{a}/128"), "dev", &veth_name],
                )?;
                pods6_of.entry(node.name.clone()).or_default().push(ip6);
            }
            pods_of
                .entry(node.name.clone())
                .or_default()
                .push((ns.clone(), ip4));
            self.endpoints.push(Endpoint {
                key: format!("{}/{}", p.namespace, p.name),
                netns: ns,
                ip: ip4,
                ip6,
            });
        }

        // Routes between nodes, to the world, and from the world back.
        for n in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.name != n.name) {
                if let (Some(_), Some(o6)) = (n.ip6, other.ip6) {
                    let o6 = o6.to_string();
                    ipn(
                        &n.netns,
                        &["-6", "route", "add", &format!("{o6}/128"), "dev", "up0"],
                    )?;
                    for p6 in pods6_of.get(&other.name).into_iter().flatten() {
                        ipn(
                            &n.netns,
                            &[
                                "-6",
                                "route",
                                "add",
                                &format!("{p6}/128"),
                                "via",
                                &o6,
                                "dev",
                                "up0",
                            ],
                        )?;
                    }
                }
                let oip = other.ip.to_string();
                ipn(
                    &n.netns,
                    &["route", "add", &format!("{oip}/32"), "dev", "up0"],
                )?;
                for (_, pip) in pods_of.get(&other.name).into_iter().flatten() {
                    ipn(
                        &n.netns,
                        &[
                            "route",
                            "add",
                            &format!("{pip}/32"),
                            "via",
                            &oip,
                            "dev",
                            "up0",
                        ],
                    )?;
                }
            }
            for w in &world_ips {
                ipn(
                    &n.netns,
                    &["route", "add", &format!("{w}/32"), "dev", "up0"],
                )?;
            }
            let nip = n.ip.to_string();
            ipn(
                &world,
                &["route", "add", &format!("{nip}/32"), "dev", "eth0"],
            )?;
            for (_, pip) in pods_of.get(&n.name).into_iter().flatten() {
                ipn(
                    &world,
                    &[
                        "route",
                        "add",
                        &format!("{pip}/32"),
                        "via",
                        &nip,
                        "dev",
                        "eth0",
                    ],
                )?;
            }
        }
        self.save()
    }
}

/// The lab's nodes: the cluster's, plus a generated `node-1` when pods name none.
pub fn lab_nodes(cluster: &Cluster) -> Vec<(String, Ipv4Addr)> {
    let mut nodes: Vec<(String, Ipv4Addr)> = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let ip4 = match n.ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => generated_node_ip(i),
        };
        nodes.push((n.name.clone(), ip4));
    }
    let needs_default = nodes.is_empty()
        || cluster.pods.iter().any(|p| {
            p.node
                .as_ref()
                .is_some_and(|n| !nodes.iter().any(|(m, _)| m == n))
        });
    if needs_default && nodes.is_empty() {
        nodes.push(("node-1".into(), generated_node_ip(0)));
    }
    // pods naming a node the cluster does not list: that node exists too
    for p in &cluster.pods {
        if let Some(n) = &p.node {
            if !nodes.iter().any(|(m, _)| m == n) {
                let i = nodes.len();
                nodes.push((n.clone(), generated_node_ip(i)));
            }
        }
    }
    nodes
}

fn generated_node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 255, 1 + (i % 250) as u8)
}

/// The IPv6 address of the `i`th node of a lab with dual-stack pods (a ULA).
fn generated_node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 1 + (i % 0xfff0) as u16)
}

/// A pod's IPv6 address, when the cluster gives it one.
pub fn pod_ipv6(p: &policy_model::cluster::Pod) -> Option<Ipv6Addr> {
    p.all_ips().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    })
}

/// A pod's IPv4 address: every lab pod has one; IPv6 comes beside it.
pub fn pod_ipv4(p: &policy_model::cluster::Pod) -> Option<Ipv4Addr> {
    p.ip.iter().chain(p.ips.iter()).find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}
