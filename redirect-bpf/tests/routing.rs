//! The redirect routing in a throwaway network namespace (root): installed once, never
//! duplicated by a second `ensure`, gone after `remove`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use redirect_bpf::routing::{self, Family};
use testkit::Netns;

fn netns(name: &str) -> Netns {
    testkit::require_root("routing tests", "network namespaces");
    Netns::new(testkit::unique(&format!("ward-routing-{name}"))).unwrap()
}

#[test]
fn ensure_installs_once_and_remove_cleans_up() {
    let ns = netns("once");
    ns.run(|| {
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(f).unwrap(), 0);
            assert!(!routing::has_local_route(f).unwrap());
        }
        assert!(routing::ensure().unwrap(), "first ensure adds");
        assert!(!routing::ensure().unwrap(), "second ensure adds nothing");
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(f).unwrap(), 1, "{f:?}");
            assert!(routing::has_local_route(f).unwrap(), "{f:?}");
        }
        let rules = Command::new("ip").args(["rule", "show"]).output().unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains("90:\tfrom all fwmark 0x200/0xf00 lookup 100"),
            "{rules}"
        );
        routing::remove().unwrap();
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(f).unwrap(), 0);
            assert!(!routing::has_local_route(f).unwrap());
        }
        routing::remove().unwrap();
    });
}

/// A namespace with IPv6 disabled (where `ip -6 route add local ::/0 dev lo` fails): the
/// IPv4 routing is installed and removed, IPv6 is left alone instead of failing.
#[test]
fn ipv6_disabled_namespace_gets_the_ipv4_routing() {
    let ns = netns("nov6");
    ns.run(|| {
        assert!(routing::ipv6_enabled(), "a fresh namespace has IPv6");
        let ok = Command::new("sysctl")
            .args([
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.lo.disable_ipv6=1",
            ])
            .status()
            .expect("sysctl");
        assert!(ok.success());
        assert!(!routing::ipv6_enabled());
        assert_eq!(Family::present(), vec![Family::V4]);
        assert!(routing::ensure().unwrap(), "ensure adds the IPv4 routing");
        assert_eq!(routing::rule_count(Family::V4).unwrap(), 1);
        assert!(routing::has_local_route(Family::V4).unwrap());
        routing::remove().unwrap();
        assert_eq!(routing::rule_count(Family::V4).unwrap(), 0);
    });
}
