//! L7 rule sets attached to ports: HTTP rules for the HTTP proxy, DNS rules for the DNS
//! proxy. The compiler interns them; the proxies receive them in compiled snapshots.

use crate::fqdn::NamePattern;
use crate::http::{HttpRule, Request, RuleOutcome};

/// The `rules` of one `toPorts` entry.
#[derive(Clone, Debug, PartialEq)]
pub enum L7Rules {
    Http(Vec<HttpRule>),
    Dns(Vec<NamePattern>),
}

impl L7Rules {
    pub fn protocol(&self) -> L7Protocol {
        match self {
            L7Rules::Http(_) => L7Protocol::Http,
            L7Rules::Dns(_) => L7Protocol::Dns,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L7Protocol {
    Http,
    Dns,
}

impl std::fmt::Display for L7Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            L7Protocol::Http => "HTTP",
            L7Protocol::Dns => "DNS",
        })
    }
}

/// An interned L7 rule set: the rules of one `toPorts` entry, with the path of that entry
/// so every decision can name the rule that made it.
#[derive(Clone, Debug, PartialEq)]
pub struct L7Set {
    pub rules: L7Rules,
    /// Field path of the `rules` block, e.g. `spec.egress[0].toPorts[0].rules`.
    pub path: String,
}

/// Which rule of a set allowed a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Match {
    /// Index into the set's rules.
    pub index: usize,
    pub outcome: RuleOutcome,
}

impl L7Set {
    /// The HTTP rules that allow this request, in order. Evaluation stops at the first
    /// match unless some rule has side effects (LOG/ADD/DELETE/REPLACE), in which case
    /// every rule runs, as Envoy's Cilium filter does.
    pub fn http_matches(&self, req: &dyn Request) -> Vec<L7Match> {
        let L7Rules::Http(rules) = &self.rules else {
            return Vec::new();
        };
        let exhaustive = rules.iter().any(HttpRule::has_side_effects);
        let mut out = Vec::new();
        for (index, r) in rules.iter().enumerate() {
            if let Some(outcome) = r.evaluate(req) {
                out.push(L7Match { index, outcome });
                if !exhaustive {
                    break;
                }
            }
        }
        out
    }

    /// The first DNS rule that allows a (normalised) query name.
    pub fn dns_match(&self, qname: &str) -> Option<usize> {
        let L7Rules::Dns(patterns) = &self.rules else {
            return None;
        };
        patterns.iter().position(|p| p.matches_normalized(qname))
    }

    /// The field path of rule `index`, e.g. `spec.egress[0].toPorts[0].rules.http[1]`.
    pub fn rule_path(&self, index: usize) -> String {
        let field = match self.rules {
            L7Rules::Http(_) => "http",
            L7Rules::Dns(_) => "dns",
        };
        format!("{}.{field}[{index}]", self.path)
    }

    pub fn describe_rule(&self, index: usize) -> String {
        match &self.rules {
            L7Rules::Http(r) => r.get(index).map(ToString::to_string).unwrap_or_default(),
            L7Rules::Dns(p) => p.get(index).map(ToString::to_string).unwrap_or_default(),
        }
    }
}
