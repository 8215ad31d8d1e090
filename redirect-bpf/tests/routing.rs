//! The redirect routing in a throwaway network namespace (root): installed once, never
//! duplicated by a second `ensure`, gone after `remove`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs::File;
use std::process::Command;
use std::thread;

use nix::sched::{setns, CloneFlags};
use redirect_bpf::routing::{self, Family};

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "routing tests need root (network namespaces): run them as root, as CI does"
        );
        let ns = format!("ward-routing-{name}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .expect("ip netns add");
        assert!(ok.success());
        let ns = Netns(ns);
        let ok = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .expect("ip link");
        assert!(ok.success());
        ns
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        thread::scope(|s| {
            s.spawn(|| {
                setns(File::open(&path).expect("netns"), CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn ensure_installs_once_and_remove_cleans_up() {
    let ns = Netns::new("once");
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
