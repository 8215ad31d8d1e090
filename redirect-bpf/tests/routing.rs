//! The redirect routing in a throwaway network namespace (root), through netlink:
//! installed once, never duplicated by a second `ensure`, gone after `remove`; the
//! kernel's refusal reported with what was asked and why.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::future::Future;
use std::process::Command;

use redirect_bpf::netlink::Netlink;
use redirect_bpf::routing::{self, Family};
use testkit::Netns;

fn netns(name: &str) -> Netns {
    testkit::require_root("routing tests", "network namespaces");
    Netns::new(testkit::unique(&format!("ward-routing-{name}"))).unwrap()
}

/// Runs `f` on a thread in the namespace, on a runtime of its own, with a netlink
/// connection opened there.
fn on_netlink<T: Send, F: Future<Output = T>>(
    ns: &Netns,
    f: impl FnOnce(Netlink) -> F + Send,
) -> T {
    ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async { f(Netlink::connect().expect("netlink")).await })
    })
}

#[test]
fn ensure_installs_once_and_remove_cleans_up() {
    let ns = netns("once");
    on_netlink(&ns, |nl| async move {
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(&nl, f).await.unwrap(), 0);
            assert!(!routing::has_local_route(&nl, f).await.unwrap());
        }
        assert!(routing::ensure(&nl).await.unwrap(), "first ensure adds");
        assert!(
            !routing::ensure(&nl).await.unwrap(),
            "second ensure adds nothing"
        );
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(&nl, f).await.unwrap(), 1, "{f:?}");
            assert!(routing::has_local_route(&nl, f).await.unwrap(), "{f:?}");
        }
        // What iproute2 shows: the same rule and routes as `ip rule add` and
        // `ip route add local` would have made.
        let show = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for flag in ["-4", "-6"] {
            let rules = show(&[flag, "rule", "show"]);
            assert!(
                rules.contains("90:\tfrom all fwmark 0x200/0xf00 lookup 100"),
                "{flag}: {rules}"
            );
        }
        let routes = show(&["route", "show", "table", "100"]);
        assert_eq!(routes.trim(), "local default dev lo scope host", "{routes}");
        let routes = show(&["-6", "route", "show", "table", "100"]);
        assert!(
            routes.trim().starts_with("local default dev lo"),
            "{routes}"
        );
        routing::remove(&nl).await.unwrap();
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(&nl, f).await.unwrap(), 0);
            assert!(!routing::has_local_route(&nl, f).await.unwrap());
        }
        routing::remove(&nl).await.unwrap();
    });
}

/// Rules that `ip` added are Ward's too (an older agent made them that way): found, not
/// duplicated, and every copy removed.
#[test]
fn rules_added_by_ip_are_recognised_and_removed() {
    let ns = netns("byip");
    let ip = |args: &[&str]| ns.ip(args).unwrap();
    ip(&[
        "rule",
        "add",
        "fwmark",
        "0x200/0xf00",
        "lookup",
        "100",
        "pref",
        "90",
    ]);
    ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);
    on_netlink(&ns, |nl| async move {
        assert_eq!(routing::rule_count(&nl, Family::V4).await.unwrap(), 1);
        assert!(routing::has_local_route(&nl, Family::V4).await.unwrap());
        assert!(
            routing::ensure(&nl).await.unwrap(),
            "adds only what is missing: the IPv6 half"
        );
        assert_eq!(routing::rule_count(&nl, Family::V4).await.unwrap(), 1);
        routing::remove(&nl).await.unwrap();
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(&nl, f).await.unwrap(), 0);
            assert!(!routing::has_local_route(&nl, f).await.unwrap());
        }
    });
}

/// A namespace with IPv6 disabled (where the IPv6 local route cannot be added): the IPv4
/// routing is installed and removed, IPv6 is left alone instead of failing.
#[test]
fn ipv6_disabled_namespace_gets_the_ipv4_routing() {
    let ns = netns("nov6");
    on_netlink(&ns, |nl| async move {
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
        assert!(
            routing::ensure(&nl).await.unwrap(),
            "ensure adds the IPv4 routing"
        );
        assert_eq!(routing::rule_count(&nl, Family::V4).await.unwrap(), 1);
        assert!(routing::has_local_route(&nl, Family::V4).await.unwrap());
        routing::remove(&nl).await.unwrap();
        assert_eq!(routing::rule_count(&nl, Family::V4).await.unwrap(), 0);
        assert!(!routing::has_local_route(&nl, Family::V4).await.unwrap());
    });
}

/// `struct __user_cap_header_struct` and `__user_cap_data_struct` (capability(7)).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops CAP_NET_ADMIN from the calling thread's effective set (capabilities are per
/// thread; the raw system calls touch no other thread).
fn drop_cap_net_admin() {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with a version 3 header and room for its two data structs,
    // both alive across the call; pid 0 is the calling thread.
    #[allow(unsafe_code)]
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset(2) with the header and data capget filled, less one bit.
    #[allow(unsafe_code)]
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}

/// Without CAP_NET_ADMIN the kernel refuses the route: the error names the object and
/// the kernel's reason, and nothing is half installed.
#[test]
fn a_refused_install_says_what_and_why() {
    let ns = netns("eperm");
    let err = on_netlink(&ns, |nl| async move {
        drop_cap_net_admin();
        routing::ensure(&nl).await.expect_err("EPERM")
    });
    assert_eq!(
        err.to_string(),
        "adding ip route local default dev lo table 100 (IPv4): Operation not permitted"
    );
    assert_eq!(err.errno(), Some(nix::errno::Errno::EPERM));
    on_netlink(&ns, |nl| async move {
        for f in Family::BOTH {
            assert_eq!(routing::rule_count(&nl, f).await.unwrap(), 0);
            assert!(!routing::has_local_route(&nl, f).await.unwrap());
        }
    });
}
