//! The namespace set-up itself, in namespaces of its own (root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::{link_pod, unique, Netns, Poll, Subnet};

/// The node and pod namespaces, and what `link_pod` said about when it routed the pod.
fn pod_link(name: &str, subnets: &[Subnet]) -> (Netns, Netns, Option<Instant>) {
    testkit::require_root("testkit's namespace tests", "network namespaces");
    let node = Netns::new(unique(&format!("ward-testkit-{name}-node"))).unwrap();
    let pod = Netns::new(unique(&format!("ward-testkit-{name}-pod"))).unwrap();
    let before = Instant::now();
    let routed = link_pod(node.name(), "veth1", pod.name(), subnets).unwrap();
    assert!(routed.is_none_or(|t| t >= before && t <= Instant::now()));
    (node, pod, routed)
}

/// A TCP connect from the pod to a listener on the node side's address.
fn connects(node: &Netns, pod: &Netns, to: &str) -> bool {
    let listener = node.run(|| TcpListener::bind((to, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    pod.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

#[test]
fn a_pod_on_a_subnet_reaches_its_gateway_and_its_namespaces_go_with_it() {
    let subnets = [
        Subnet {
            ip: "10.79.1.2".parse().unwrap(),
            gateway: "10.79.1.1".parse().unwrap(),
            prefix: 24,
        },
        Subnet {
            ip: "fd79:1::2".parse().unwrap(),
            gateway: "fd79:1::1".parse().unwrap(),
            prefix: 64,
        },
    ];
    let (node, pod, routed) = pod_link("subnet", &subnets);
    assert_eq!(
        routed, None,
        "a shared subnet: no route to the pod in the node"
    );
    assert!(connects(&node, &pod, "10.79.1.1"));
    assert!(connects(&node, &pod, "fd79:1::1"), "nodad: usable at once");
    // closures and commands run in the namespace: the pod's address is theirs alone
    assert!(pod.run(|| TcpListener::bind(("10.79.1.2", 0)).is_ok()));
    assert!(TcpListener::bind(("10.79.1.2", 0)).is_err());
    let routes = testkit::output(pod.exec("ip").args(["route", "show"])).unwrap();
    assert!(
        routes.contains("default via 10.79.1.1 dev eth0"),
        "{routes}"
    );

    let paths = [node.name(), pod.name()].map(|n| Path::new("/run/netns").join(n));
    drop((node, pod));
    for p in paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn a_pod_with_host_prefixes_gets_the_routes_a_cni_installs() {
    let subnets = [
        Subnet {
            ip: "10.79.2.2".parse().unwrap(),
            gateway: "10.79.2.1".parse().unwrap(),
            prefix: 32,
        },
        Subnet {
            ip: "fd79:2::2".parse().unwrap(),
            gateway: "fd79:2::1".parse().unwrap(),
            prefix: 128,
        },
    ];
    let (node, pod, routed) = pod_link("host", &subnets);
    assert!(
        routed.is_some(),
        "the node's host routes: when the first was added"
    );
    assert!(connects(&node, &pod, "10.79.2.1"));
    assert!(connects(&node, &pod, "fd79:2::1"));
    let routes = testkit::output(node.exec("ip").args(["-6", "route", "show"])).unwrap();
    assert!(routes.contains("fd79:2::2 dev veth1"), "{routes}");
}

#[test]
fn a_name_in_use_is_refused_not_shared() {
    testkit::require_root("testkit's namespace tests", "network namespaces");
    let first = Netns::new(unique("ward-testkit-twice")).unwrap();
    let second = Netns::new(first.name().to_string());
    assert!(second.is_err());
    // the refused one did not delete the first one on its way out
    assert!(Path::new("/run/netns").join(first.name()).exists());
}

#[test]
fn sysctls_apply_in_the_namespace() {
    testkit::require_root("testkit's namespace tests", "network namespaces");
    let ns = Netns::new(unique("ward-testkit-sysctl")).unwrap();
    let forwarding = || {
        ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/forwarding"))
            .unwrap()
    };
    assert_eq!(forwarding().trim(), "0");
    ns.sysctl(&["net.ipv4.conf.all.forwarding=1"]).unwrap();
    assert_eq!(forwarding().trim(), "1");
}

#[test]
fn a_spawned_thread_waits_in_the_namespace() {
    testkit::require_root("testkit's namespace tests", "network namespaces");
    let ns = Netns::new(unique("ward-testkit-spawn")).unwrap();
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = listener.local_addr().unwrap();
    let client = ns.spawn(move || {
        Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(5))
            .until("the listener", || TcpStream::connect(addr).is_ok())
    });
    assert!(client.join().unwrap().is_ok());
}
