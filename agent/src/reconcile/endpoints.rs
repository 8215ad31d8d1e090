//! Endpoint discovery: which host-side interface leads to a local pod. The CNI (here the
//! lab and the tests) installs a route `POD_IP dev VETH` in the node's namespace; the
//! kernel's own route lookup (RTM_GETROUTE over netlink, what `ip route get` asks)
//! answers, so whatever route shape the CNI chose (a /32 per pod, a subnet per veth) is
//! understood the same way.

use std::collections::BTreeMap;
use std::net::IpAddr;

use redirect_bpf::netlink::Netlink;
use serde::{Deserialize, Serialize};

/// Endpoint ids: stable per pod across restarts. They are recovered from the endpoints
/// map (pod IP -> id) that survives in bpffs, and new pods get the lowest free id.
#[derive(Debug, Default)]
pub struct EndpointIds {
    by_pod: BTreeMap<String, u32>,
}

impl EndpointIds {
    /// The id of `pod` with addresses `ips`: the one it has, the one the maps hold for
    /// one of its addresses (`recovered`), or the lowest id nobody uses.
    pub fn id(&mut self, pod: &str, ips: &[IpAddr], recovered: &BTreeMap<IpAddr, u32>) -> u32 {
        if let Some(id) = self.by_pod.get(pod) {
            return *id;
        }
        let used: std::collections::BTreeSet<u32> = self
            .by_pod
            .values()
            .copied()
            .chain(recovered.values().copied())
            .collect();
        let id = ips
            .iter()
            .find_map(|ip| recovered.get(ip).copied())
            .filter(|id| !self.by_pod.values().any(|v| v == id))
            .unwrap_or_else(|| (1..).find(|i| !used.contains(i)).unwrap_or(u32::MAX));
        self.by_pod.insert(pod.to_string(), id);
        id
    }

    /// Forgets pods that are not local any more, so their ids can be reused.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.by_pod.retain(|p, _| keep(p));
    }
}

/// One local endpoint as `/v1/endpoints` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub ips: Vec<IpAddr>,
    pub endpoint_id: u32,
    pub identity: u32,
    /// Host-side interface; None until discovered.
    pub interface: Option<String>,
    pub ifindex: u32,
    pub attached: bool,
}

/// The interface the node's routing table sends `ip` to, when it is a plain unicast
/// route through an interface other than loopback; None when there is none (yet), and
/// when the lookup fails (logged; the pod is looked for again later).
pub async fn veth_of(netlink: &Netlink, ip: IpAddr) -> Option<String> {
    match netlink.unicast_interface(ip).await {
        Ok(veth) => veth,
        Err(e) => {
            tracing::warn!(%ip, error = %e, "endpoint discovery: route lookup failed");
            None
        }
    }
}

/// The ifindex of an interface in this network namespace (0 when it has none).
pub fn ifindex(iface: &str) -> u32 {
    nix::net::if_::if_nametoindex(iface).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_recovered_and_reused() {
        let a: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "10.0.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut recovered = BTreeMap::new();
        recovered.insert(b, 7);
        let mut ids = EndpointIds::default();
        assert_eq!(ids.id("ns/a", &[a], &recovered), 1);
        assert_eq!(ids.id("ns/b", &[b], &recovered), 7, "from the maps");
        assert_eq!(ids.id("ns/a", &[a], &recovered), 1, "stable");
        ids.retain(|p| p != "ns/a");
        assert_eq!(ids.id("ns/c", &[], &recovered), 1, "freed id reused");
    }
}
