//! Route lookups and the change stream, in a throwaway network namespace (root): the
//! kernel's own answers through netlink, for the route shapes a CNI makes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::StreamExt;
use redirect_bpf::netlink::{NetChange, NetChanges, Netlink};
use rtnetlink::packet_route::route::RouteType;
use testkit::Netns;

fn netns(name: &str) -> Netns {
    testkit::require_root("netlink tests", "network namespaces");
    Netns::new(testkit::unique(&format!("ward-netlink-{name}"))).unwrap()
}

/// `ip -n NS ARGS`.
fn nip(ns: &Netns, args: &[&str]) {
    ns.ip(args).unwrap();
}

/// A veth pair with both ends in `ns`, both up.
fn veth(ns: &Netns, name: &str) {
    let peer = format!("{name}p");
    testkit::veth(ns.name(), name, ns.name(), &peer).unwrap();
    nip(ns, &["link", "set", name, "up"]);
    nip(ns, &["link", "set", &peer, "up"]);
}

/// Runs `f` on a thread in the namespace, on a runtime of its own.
fn block_on_in<T: Send, F: Future<Output = T>>(ns: &Netns, f: impl FnOnce() -> F + Send) -> T {
    ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn lookup_finds_the_veth_of_host_and_subnet_routes() {
    let ns = netns("lookup");
    veth(&ns, "lxc1");
    veth(&ns, "lxc2");
    // A CNI's shapes: a /32 and a /128 per pod, a subnet per veth.
    nip(&ns, &["route", "add", "10.90.1.2/32", "dev", "lxc1"]);
    nip(
        &ns,
        &["-6", "route", "add", "fd00:90:1::2/128", "dev", "lxc1"],
    );
    nip(&ns, &["route", "add", "10.90.2.0/24", "dev", "lxc2"]);
    nip(
        &ns,
        &["-6", "route", "add", "fd00:90:2::/64", "dev", "lxc2"],
    );
    block_on_in(&ns, || async {
        let nl = Netlink::connect().unwrap();
        for (addr, veth) in [
            ("10.90.1.2", "lxc1"),
            ("fd00:90:1::2", "lxc1"),
            ("10.90.2.7", "lxc2"),
            ("fd00:90:2::7", "lxc2"),
        ] {
            assert_eq!(
                nl.unicast_interface(ip(addr)).await.unwrap().as_deref(),
                Some(veth),
                "{addr}"
            );
        }
        let r = nl.route_to(ip("10.90.1.2")).await.unwrap().unwrap();
        assert_eq!(r.kind, RouteType::Unicast);
        assert_eq!(r.interface.as_deref(), Some("lxc1"));
        assert_eq!(nl.link_name(r.ifindex.unwrap()).await.unwrap(), r.interface);
    });
}

#[test]
fn lookup_has_no_veth_for_local_unreachable_or_unrouted_addresses() {
    let ns = netns("none");
    veth(&ns, "lxc1");
    nip(&ns, &["addr", "add", "10.91.0.1/32", "dev", "lxc1"]);
    nip(
        &ns,
        &["addr", "add", "fd00:91::1/128", "dev", "lxc1", "nodad"],
    );
    nip(&ns, &["route", "add", "unreachable", "10.91.4.0/24"]);
    nip(&ns, &["route", "add", "prohibit", "10.91.5.0/24"]);
    nip(&ns, &["route", "add", "blackhole", "10.91.6.0/24"]);
    nip(
        &ns,
        &["-6", "route", "add", "unreachable", "fd00:91:4::/64"],
    );
    nip(&ns, &["-6", "route", "add", "blackhole", "fd00:91:6::/64"]);
    block_on_in(&ns, || async {
        let nl = Netlink::connect().unwrap();
        // Local addresses: a local route through lo.
        for addr in ["10.91.0.1", "127.0.0.1", "fd00:91::1", "::1"] {
            let r = nl.route_to(ip(addr)).await.unwrap();
            assert!(
                r.as_ref().is_none_or(
                    |r| r.kind == RouteType::Local || r.interface.as_deref() == Some("lo")
                ),
                "{addr}: {r:?}"
            );
            assert_eq!(
                nl.unicast_interface(ip(addr)).await.unwrap(),
                None,
                "{addr}"
            );
        }
        // Unreachable, prohibit, blackhole; and no route at all (no default route here).
        for addr in [
            "10.91.4.1",
            "10.91.5.1",
            "10.91.6.1",
            "fd00:91:4::1",
            "fd00:91:6::1",
            "10.99.0.1",
            "fd00:99::1",
        ] {
            assert_eq!(
                nl.unicast_interface(ip(addr)).await.unwrap(),
                None,
                "{addr}"
            );
        }
        assert_eq!(nl.link_name(999_999).await.unwrap(), None, "no such link");
        assert_eq!(nl.link_index("nosuch0").await.unwrap(), None);
    });
}

/// Reads changes until one `want` takes (each within 5 s); returns all it read. The
/// `ip` commands ran while nothing read: their announcements queued in the socket.
async fn wait_for(changes: &mut NetChanges, want: fn(&NetChange) -> bool) -> Vec<NetChange> {
    let mut seen = Vec::new();
    loop {
        let c = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .unwrap_or_else(|_| panic!("no wanted change within 5 s, saw {seen:?}"))
            .expect("the stream goes on");
        seen.push(c);
        if want(&c) {
            return seen;
        }
    }
}

/// The stream announces routes and links made after it started, IPv4 and IPv6.
#[test]
fn changes_announce_routes_and_links() {
    let ns = netns("changes");
    veth(&ns, "lxc1");
    block_on_in(&ns, || async {
        let mut changes = NetChanges::watch().unwrap();
        nip(&ns, &["route", "add", "10.92.1.2/32", "dev", "lxc1"]);
        wait_for(&mut changes, |c| *c == NetChange::Route { removed: false }).await;
        nip(
            &ns,
            &["-6", "route", "add", "fd00:92:1::2/128", "dev", "lxc1"],
        );
        wait_for(&mut changes, |c| *c == NetChange::Route { removed: false }).await;
        nip(&ns, &["route", "del", "10.92.1.2/32", "dev", "lxc1"]);
        wait_for(&mut changes, |c| *c == NetChange::Route { removed: true }).await;
        let nl = Netlink::connect().unwrap();
        let lxc1 = nl.link_index("lxc1").await.unwrap().unwrap();
        nip(&ns, &["link", "del", "lxc1"]);
        let seen = wait_for(&mut changes, |c| {
            matches!(c, NetChange::Link { removed: true, .. })
        })
        .await;
        assert!(
            seen.contains(&NetChange::Link {
                ifindex: lxc1,
                removed: true
            }),
            "{seen:?}"
        );
    });
}
