//! The internal form every policy kind translates to: subjects, rules, peers and ports
//! as label selectors over identities. The compiler consumes only this.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::l7::L7Rules;
use crate::selector::Selector;
use crate::tls::TlsRule;

/// An IP protocol as policies name it. `Any` matches TCP, UDP and SCTP (not ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    #[serde(rename = "ICMP")]
    Icmp,
    #[serde(rename = "ICMPv6")]
    IcmpV6,
    #[serde(rename = "ANY")]
    Any,
}

impl Protocol {
    /// Whether a rule naming `self` covers traffic of protocol `p`.
    pub fn covers(self, p: Protocol) -> bool {
        self == p
            || (self == Protocol::Any
                && matches!(p, Protocol::Tcp | Protocol::Udp | Protocol::Sctp))
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ICMPV6" => Protocol::IcmpV6,
            "ANY" => Protocol::Any,
            _ => return None,
        })
    }

    /// The IANA protocol number, for datapath keys (0 = any).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
            Protocol::IcmpV6 => 58,
            Protocol::Any => 0,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
            Protocol::IcmpV6 => "ICMPv6",
            Protocol::Any => "ANY",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// The kinds of policy object Ward reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    /// `projectcalico.org/v3` NetworkPolicy (namespaced).
    CalicoNetworkPolicy,
    /// `projectcalico.org/v3` GlobalNetworkPolicy.
    GlobalNetworkPolicy,
    /// `projectcalico.org/v3` Tier.
    Tier,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Which object a policy came from, for explanations and errors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Evaluation tiers, in order: Admin (ANP, ClusterNetworkPolicy tier Admin), Calico's
/// ordered tiers (`projectcalico.org/v3` policies; the namespace tier sits inside Calico's
/// `default` tier at order 1000), the namespace tier (NetworkPolicy, CNP, CCNP), Baseline
/// (BANP, tier Baseline).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Calico,
    Namespace,
    Baseline,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Admin tier: skip the rest of the admin tier and decide in the next tier. Calico
    /// tiers: skip the rest of this Calico tier.
    Pass,
}

/// Where a `projectcalico.org/v3` object sits in Calico's ordered tiers.
#[derive(Clone, Debug, PartialEq)]
pub enum Calico {
    /// A NetworkPolicy or GlobalNetworkPolicy: its tier and its order in the tier (None:
    /// after every ordered policy). Ties are broken by `name`.
    Policy {
        tier: String,
        order: Option<f64>,
        name: String,
    },
    /// A Tier object: its order among the tiers (None: after every ordered tier) and what a
    /// flow gets that reaches the end of the tier undecided (`Deny` or `Pass`).
    Tier {
        order: Option<f64>,
        default_action: Action,
    },
}

/// Who a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Pods whose identity labels match.
    Pods(Selector),
    /// Nodes (host policies of a CCNP `nodeSelector`) whose node labels match.
    Nodes(Selector),
    /// Pods whose identity labels match one of the selectors (Calico selector
    /// expressions with `||`); none selects nothing.
    AnyPods(Vec<Selector>),
}

/// A set of peers: the union of its selectors over identity labels. Entities, CIDRs and
/// FQDN selectors are expressed as selectors over `reserved:`, `cidr:` and `fqdn:` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peers {
    pub selectors: Vec<Selector>,
    /// The CIDRs (with excepts) this peer set names: the compiler gives them ipcache
    /// prefixes so that IPs inside them carry `cidr:` labels.
    pub cidrs: Vec<ipnet::IpNet>,
    /// ANP `networks` prefixes: like `cidrs` but, as the AdminNetworkPolicy API says,
    /// they also match cluster-internal IPs whatever the CIDR option.
    pub networks: Vec<ipnet::IpNet>,
    /// The toFQDNs patterns this peer set names (normalised). They select the IPs that
    /// DNS answers *to the subject endpoint* carried for matching names, so the compiler
    /// turns them into per-endpoint selectors over `fqdn:` labels.
    pub fqdns: Vec<String>,
}

impl Peers {
    pub fn all() -> Peers {
        Peers {
            selectors: vec![Selector::all()],
            ..Peers::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.selectors.is_empty() && self.fqdns.is_empty()
    }
}

/// A port (or port range) of a rule, or a named port resolved per destination pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Port {
    Range(u16, u16),
    Named(String),
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Port::Range(0, u16::MAX) => f.write_str("*"),
            Port::Range(a, b) if a == b => write!(f, "{a}"),
            Port::Range(a, b) => write!(f, "{a}-{b}"),
            Port::Named(n) => write!(f, "{n}"),
        }
    }
}

/// One protocol and port of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortProto {
    pub protocol: Protocol,
    pub port: Port,
}

/// A group of ports sharing L7 rules (`toPorts[i]` of a CNP).
#[derive(Clone, Debug, PartialEq)]
pub struct PortRule {
    pub ports: Vec<PortProto>,
    pub l7: Option<L7Rules>,
    /// `serverNames`, `terminatingTLS`, `originatingTLS` (CNP/CCNP only).
    pub tls: Option<TlsRule>,
    /// Field path of this group, e.g. `spec.ingress[0].toPorts[1]`.
    pub path: String,
}

/// One rule of a policy in one direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub direction: Direction,
    pub action: Action,
    pub peers: Peers,
    /// Empty: every protocol and port.
    pub ports: Vec<PortRule>,
    /// Field path, e.g. `spec.egress[1]` or `spec.ingress[0] (allow-from-x)`.
    pub path: String,
    /// Calico: which of the policy's subjects the rule applies to (the rule's own side,
    /// `destination` of an ingress rule and `source` of an egress rule), as a union of
    /// selectors over the subject's identity labels. None: every subject.
    pub subject_filter: Option<Vec<Selector>>,
    /// Calico `notPorts`: ports excluded from `ports` (ranges, and named ports of the
    /// subject itself, resolved per endpoint).
    pub not_ports: Vec<Port>,
}

/// One policy (one `spec` of a CNP) after translation.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub object: ObjectRef,
    /// `spec` or `specs[i]`.
    pub path: String,
    pub tier: Tier,
    /// Admin and baseline ordering: lower first.
    pub priority: i64,
    pub subject: Subject,
    /// Whether this policy puts its subjects in default deny, per direction
    /// (`[ingress, egress]`).
    pub default_deny: [bool; 2],
    pub rules: Vec<Rule>,
    /// Calico objects: their place in Calico's tiers.
    pub calico: Option<Calico>,
}
