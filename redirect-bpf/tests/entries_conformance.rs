//! The map entries of every endpoint of every conformance case reproduce
//! policy-model's verdicts, as the datapath looks them up (the peer's class, or the
//! identity without one, and the wildcard; longest port prefix, greatest action, else the
//! direction's default), with peer classes computed for every endpoint of the case
//! together and for each endpoint alone (the coarsest classes a node could have).
//! No root needed. The cases are the repository's (`conformance/cases`, `conformance/cases-calico`); without them
//! this test fails rather than pass on nothing.

use std::collections::BTreeSet;
use std::path::Path;

use policy_model::compile::{EndpointPolicy, PortMatch};
use policy_model::conformance::parse_case;
use policy_model::identity::Idx;
use policy_model::l7::L7Protocol;
use policy_model::verdict::L4Decision;
use policy_model::{Direction, Model, Protocol};
use redirect_bpf::common::{action, endpoint_flags, DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY};
use redirect_bpf::{endpoint_entries, EndpointEntries, PeerClasses, ProxyPorts};

const PROXIES: ProxyPorts = ProxyPorts {
    http: 15001,
    dns: 15053,
};

const PROTOCOLS: [(Protocol, u8); 5] = [
    (Protocol::Tcp, 6),
    (Protocol::Udp, 17),
    (Protocol::Sctp, 132),
    (Protocol::Icmp, 1),
    (Protocol::IcmpV6, 58),
];

/// The verdict policy-model gives, in the datapath's terms.
fn oracle(model: &Model, d: L4Decision) -> (u8, u16) {
    match d {
        L4Decision::NoPolicy
        | L4Decision::DefaultAllow
        | L4Decision::Allow(_)
        | L4Decision::Redirect {
            allow_all: Some(_), ..
        } => (action::ALLOW, 0),
        L4Decision::Deny(_) | L4Decision::DefaultDeny { .. } => (action::DENY, 0),
        L4Decision::Redirect {
            sets,
            allow_all: None,
        } => {
            let dns = sets
                .iter()
                .any(|(_, s)| model.l7[*s as usize].rules.protocol() == L7Protocol::Dns);
            (
                action::REDIRECT,
                if dns { PROXIES.dns } else { PROXIES.http },
            )
        }
    }
}

/// What the datapath decides with these entries.
fn lookup(
    out: &EndpointEntries,
    classes: &PeerClasses,
    dir: u8,
    identity: u32,
    protocol: u8,
    port: u16,
) -> (u8, u16) {
    let class = classes.class_of(identity).unwrap_or(identity);
    let lpm = |id: u32| {
        out.entries
            .iter()
            .filter(|e| e.peer == id && e.direction == dir && e.protocol == protocol)
            .filter(|e| {
                let shift = 16 - u32::from(e.port_prefix_len);
                u32::from(e.port) >> shift == u32::from(port) >> shift
            })
            .max_by_key(|e| e.port_prefix_len)
            .map(|e| (e.action, e.proxy_port))
    };
    [lpm(class), lpm(IDENTITY_ANY)]
        .into_iter()
        .flatten()
        .max_by_key(|(a, _)| *a)
        .unwrap_or_else(|| {
            let flag = if dir == DIR_INGRESS {
                endpoint_flags::DEFAULT_DENY_INGRESS
            } else {
                endpoint_flags::DEFAULT_DENY_EGRESS
            };
            if out.flags & flag != 0 {
                (action::DENY, 0)
            } else {
                (action::ALLOW, 0)
            }
        })
}

/// Ports worth probing: well-known ones, and both sides of every range boundary.
fn sample_ports(model: &Model, ep: &EndpointPolicy) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = [0, 1, 8, 22, 53, 80, 443, 1024, 8080, 9090, 65535].into();
    for d in &ep.dirs {
        for e in &d.entries {
            if let PortMatch::Range(a, b) = e.port {
                for p in [a.saturating_sub(1), a, b, b.saturating_add(1)] {
                    ports.insert(p);
                }
            }
        }
    }
    for i in &model.identities.list {
        ports.extend(i.named_ports.iter().map(|p| p.port));
    }
    ports
}

#[test]
fn entries_reproduce_every_conformance_case() {
    check_folder("cases");
}

#[test]
fn entries_reproduce_every_calico_case() {
    check_folder("cases-calico");
}

fn check_folder(folder: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance")
        .join(folder);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the repository's conformance cases)",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    let mut checked = 0u64;
    for file in &files {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let case = parse_case(&text).unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        let model = case
            .compile(None, file.to_str())
            .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        let all: Vec<&EndpointPolicy> = model.endpoints().collect();
        let together = PeerClasses::compute(&model, &all, &Default::default());
        for ep in model.endpoints() {
            let alone = PeerClasses::compute(&model, &[ep], &Default::default());
            for classes in [&together, &alone] {
                checked += check_endpoint(&model, ep, classes, &file.display().to_string());
            }
        }
    }
    assert!(checked > 0);
    eprintln!("{} cases, {checked} verdicts checked", files.len());
}

/// Checks every identity's verdict on the sample ports; returns how many were checked.
fn check_endpoint(model: &Model, ep: &EndpointPolicy, classes: &PeerClasses, file: &str) -> u64 {
    let out = endpoint_entries(model, ep, 1, PROXIES, classes);
    let ports = sample_ports(model, ep);
    let mut checked = 0;
    for d in Direction::BOTH {
        let code = match d {
            Direction::Ingress => DIR_INGRESS,
            Direction::Egress => DIR_EGRESS,
        };
        for idx in 0..model.identities.len() as Idx {
            let id = model.identities.get(idx).id;
            for (proto, proto_code) in PROTOCOLS {
                for &port in &ports {
                    let want = oracle(model, model.decide(ep, d, idx, proto, port));
                    let got = lookup(&out, classes, code, id, proto_code, port);
                    assert_eq!(
                        got, want,
                        "{file}: {} {d} identity {id} {proto:?}/{port}",
                        ep.name
                    );
                    checked += 1;
                }
            }
        }
    }
    checked
}
