//! Pieces shared by the policy kinds: ports, CIDRs, namespace selectors.

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::labels::{well_known, Key, Source};
use crate::selector::{LabelSelector, Op, Requirement, Selector};

/// A port written as a number or a name (`intstr.IntOrString`, or CNP's string port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

/// `x-kubernetes-int-or-string`: a structural CRD schema cannot say `anyOf` integer or
/// string, so it uses the Kubernetes extension as `intstr.IntOrString` does.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for IntOrString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrString".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(i) => write!(f, "{i}"),
            IntOrString::Str(s) => f.write_str(s),
        }
    }
}

/// A parsed port: a number, or a (lower-cased) IANA service name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortValue {
    Number(u16),
    Name(String),
}

/// Parses a port number (0-65535) or an IANA service name: at most 15 characters,
/// letters, digits and single hyphens, at least one letter, no leading/trailing hyphen.
pub fn parse_port(v: &IntOrString) -> Result<PortValue, String> {
    match v {
        IntOrString::Int(i) => u16::try_from(*i)
            .map(PortValue::Number)
            .map_err(|_| format!("port {i} is out of range 0-65535")),
        IntOrString::Str(s) => {
            if let Ok(n) = s.parse::<i64>() {
                return u16::try_from(n)
                    .map(PortValue::Number)
                    .map_err(|_| format!("port {n} is out of range 0-65535"));
            }
            if is_port_name(s) {
                Ok(PortValue::Name(s.to_ascii_lowercase()))
            } else {
                Err(format!(
                    "{s:?} is neither a port number nor a valid port name (at most 15 letters, digits and single hyphens, with a letter)"
                ))
            }
        }
    }
}

fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_alphabetic())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Parses a CIDR; a bare address becomes a host prefix (/32 or /128), as Cilium allows.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        if n.trunc() != n {
            // Kubernetes rejects host bits in ipBlock; Cilium masks them. Masking silently
            // would widen nothing but hide a typo: reject it.
            return Err(format!(
                "{s:?} has host bits set (did you mean {}?)",
                n.trunc()
            ));
        }
        return Ok(n);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("{s:?} is not a CIDR"))
}

/// Checks that every `except` lies inside `cidr` with a longer prefix.
pub fn check_except(cidr: &IpNet, except: &IpNet) -> Result<(), String> {
    if !cidr.contains(except) || except.prefix_len() <= cidr.prefix_len() {
        return Err(format!(
            "except {except} is not inside {cidr} with a longer prefix"
        ));
    }
    Ok(())
}

/// Turns a namespace selector (over namespace labels) into a selector over pod identity
/// labels: namespace label `k` is the pod label `io.cilium.k8s.namespace.labels.k`. The
/// result also requires a pod namespace, so that it selects pods only.
pub fn namespace_selector_to_pods(ns: &Selector) -> Selector {
    let mut requirements: Vec<Requirement> = ns
        .requirements
        .iter()
        .map(|r| Requirement {
            key: Key::new(
                Source::K8s,
                format!("{}{}", well_known::NAMESPACE_LABELS_PREFIX, r.key.name),
            ),
            op: r.op.clone(),
        })
        .collect();
    requirements.push(Requirement {
        key: Key::new(Source::K8s, well_known::POD_NAMESPACE),
        op: Op::Exists,
    });
    requirements.sort();
    requirements.dedup();
    Selector { requirements }
}

/// A pod selector restricted to one namespace.
pub fn in_namespace(pods: Selector, ns: &str) -> Selector {
    pods.with(
        Key::new(Source::K8s, well_known::POD_NAMESPACE),
        Op::In(vec![ns.to_string()]),
    )
}

/// Compiles a Kubernetes selector (no source prefixes) or records the error.
pub fn k8s_selector(sel: &LabelSelector) -> Result<Selector, (String, String)> {
    Selector::compile(sel, false).map_err(|e| (e.path, e.reason))
}

/// Selector over `cidr:` labels for a CIDR with excepts.
pub fn cidr_selector(net: &IpNet, except: &[IpNet]) -> Selector {
    let mut s = Selector::all().with(Key::new(Source::Cidr, net.to_string()), Op::Exists);
    for e in except {
        s = s.with(Key::new(Source::Cidr, e.to_string()), Op::DoesNotExist);
    }
    s
}

/// The label source of ANP `networks` prefixes.
pub fn network_source() -> Source {
    Source::Other("network".into())
}

/// Selector over `network:` labels for an ANP `networks` entry.
pub fn network_selector(net: &IpNet) -> Selector {
    Selector::all().with(Key::new(network_source(), net.to_string()), Op::Exists)
}

/// Selector for a reserved label (entities).
pub fn reserved(name: &str) -> Selector {
    Selector::all().with(Key::new(Source::Reserved, name), Op::Exists)
}

/// The label source of node labels, so node selectors never match pod labels.
pub fn node_source() -> Source {
    Source::Other("node".into())
}

/// A node selector: keys under the `node` source, and only nodes (`reserved:node`), so
/// that an empty selector or `DoesNotExist` never selects pods or outside addresses.
pub fn node_selector(sel: &LabelSelector) -> Result<Selector, (String, String)> {
    let s = k8s_selector(sel)?;
    let mut requirements: Vec<Requirement> = s
        .requirements
        .into_iter()
        .map(|r| Requirement {
            key: Key::new(node_source(), r.key.name),
            op: r.op,
        })
        .collect();
    requirements.push(Requirement {
        key: Key::new(Source::Reserved, NODE_MARKER),
        op: Op::Exists,
    });
    requirements.sort();
    Ok(Selector { requirements })
}

/// The reserved label every node identity (host or remote-node) carries.
pub const NODE_MARKER: &str = "node";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port(&IntOrString::Int(80)), Ok(PortValue::Number(80)));
        assert_eq!(
            parse_port(&IntOrString::Str("80".into())),
            Ok(PortValue::Number(80))
        );
        assert_eq!(
            parse_port(&IntOrString::Str("HTTP-alt".into())),
            Ok(PortValue::Name("http-alt".into()))
        );
        assert!(parse_port(&IntOrString::Int(65536)).is_err());
        assert!(parse_port(&IntOrString::Int(-1)).is_err());
        assert!(parse_port(&IntOrString::Str("a--b".into())).is_err());
        assert!(parse_port(&IntOrString::Str("-ab".into())).is_err());
        assert!(parse_port(&IntOrString::Str("1234-5678".into())).is_err());
        assert!(parse_port(&IntOrString::Str("abcdefghijklmnop".into())).is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert!(parse_cidr("10.0.0.1/8").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        let net = parse_cidr("10.0.0.0/8").unwrap();
        assert!(check_except(&net, &parse_cidr("10.1.0.0/16").unwrap()).is_ok());
        assert!(check_except(&net, &parse_cidr("11.0.0.0/16").unwrap()).is_err());
        assert!(check_except(&net, &parse_cidr("10.0.0.0/8").unwrap()).is_err());
        assert!(check_except(&net, &parse_cidr("0.0.0.0/0").unwrap()).is_err());
    }
}
