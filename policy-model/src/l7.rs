//! L7 rule sets attached to ports: HTTP rules for the HTTP proxy, DNS rules for the DNS
//! proxy. The compiler interns them; the proxies receive them in compiled snapshots.

use std::fmt;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::Arc;

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::util::pool::Pool;
use regex_automata::{Anchored, Input, MatchKind};

use crate::fqdn::NamePattern;
use crate::http::{HttpRule, Request, RuleOutcome};
use crate::tls::{NoSecrets, Secrets, TlsRule};

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
    /// Precomputed from `rules` (HTTP): which rules can match a method and a path.
    index: Option<Arc<HttpIndex>>,
    /// `rule_path(i)` of every rule, so a decision does not format per request.
    rule_paths: Arc<[String]>,
    /// `serverNames` and TLS contexts of the `toPorts` entry.
    pub tls: Option<Arc<TlsRule>>,
    /// The entry has no `rules` (only TLS): every request passes it.
    pub every_request: bool,
}

/// Which rule of a set allowed a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Match {
    /// Index into the set's rules.
    pub index: usize,
    pub outcome: RuleOutcome,
}

impl L7Set {
    pub fn new(rules: L7Rules, path: String) -> L7Set {
        let index = match &rules {
            L7Rules::Http(r) => Some(Arc::new(HttpIndex::new(r))),
            L7Rules::Dns(_) => None,
        };
        let field = match &rules {
            L7Rules::Http(_) => "http",
            L7Rules::Dns(_) => "dns",
        };
        let n = match &rules {
            L7Rules::Http(r) => r.len(),
            L7Rules::Dns(p) => p.len(),
        };
        let rule_paths = (0..n).map(|i| format!("{path}.{field}[{i}]")).collect();
        L7Set {
            rules,
            path,
            index,
            rule_paths,
            tls: None,
            every_request: false,
        }
    }

    /// The set of a `toPorts` entry with TLS (`serverNames`, `terminatingTLS`,
    /// `originatingTLS`), with its HTTP rules or none (`port_path` is the entry's path):
    /// without rules every request passes, and the proxy is still in the path for the
    /// TLS part.
    pub fn with_tls(rules: Option<L7Rules>, tls: TlsRule, port_path: &str) -> L7Set {
        let every_request = rules.is_none();
        let mut set = match rules {
            Some(r) => L7Set::new(r, format!("{port_path}.rules")),
            None => L7Set::new(L7Rules::Http(Vec::new()), port_path.to_string()),
        };
        set.tls = Some(Arc::new(tls));
        set.every_request = every_request;
        set
    }

    /// The path of the `toPorts` entry the set belongs to.
    pub fn port_path(&self) -> &str {
        self.path.strip_suffix(".rules").unwrap_or(&self.path)
    }

    /// Whether the entry has HTTP rules to check (and not "every request").
    pub fn has_http_rules(&self) -> bool {
        !self.every_request && self.rules.protocol() == L7Protocol::Http
    }

    /// The HTTP rules that allow this request, in order. Evaluation stops at the first
    /// match unless some rule has side effects (LOG/ADD/DELETE/REPLACE), in which case
    /// every rule runs, as Envoy's Cilium filter does.
    pub fn http_matches(&self, req: &dyn Request) -> Vec<L7Match> {
        self.http_matches_with(req, &NoSecrets)
    }

    /// [`L7Set::http_matches`] with the values of secret-backed header matches.
    pub fn http_matches_with(&self, req: &dyn Request, secrets: &dyn Secrets) -> Vec<L7Match> {
        let L7Rules::Http(rules) = &self.rules else {
            return Vec::new();
        };
        if let Some(ix) = &self.index {
            if let Some(out) = ix.matches(rules, req, secrets) {
                return out;
            }
        }
        http_matches_linear(rules, req, secrets)
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
        if let Some(p) = self.rule_paths.get(index) {
            return p.clone();
        }
        let field = match self.rules {
            L7Rules::Http(_) => "http",
            L7Rules::Dns(_) => "dns",
        };
        format!("{}.{field}[{index}]", self.path)
    }

    /// The rules the index could not narrow down and would scan one by one (tests).
    #[cfg(test)]
    fn indexed(&self) -> bool {
        self.index.as_ref().is_some_and(|i| i.paths.is_some())
    }

    pub fn describe_rule(&self, index: usize) -> String {
        match &self.rules {
            L7Rules::Http(r) => r.get(index).map(ToString::to_string).unwrap_or_default(),
            L7Rules::Dns(p) => p.get(index).map(ToString::to_string).unwrap_or_default(),
        }
    }
}

/// The reference semantics: every rule in order.
fn http_matches_linear(
    rules: &[HttpRule],
    req: &dyn Request,
    secrets: &dyn Secrets,
) -> Vec<L7Match> {
    let exhaustive = rules.iter().any(HttpRule::has_side_effects);
    let mut out = Vec::new();
    for (index, r) in rules.iter().enumerate() {
        if let Some(outcome) = r.evaluate_with(req, secrets) {
            out.push(L7Match { index, outcome });
            if !exhaustive {
                break;
            }
        }
    }
    out
}

/// Methods with a bit in the method mask; other methods fall back to the regex.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn method_bit(m: &str) -> Option<u16> {
    METHODS.iter().position(|x| *x == m).map(|i| 1 << i)
}

type CachePool = Pool<Cache, Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe>>;

/// What makes a request's decision independent of the number of rules: a method bitmask
/// per rule and one anchored multi-pattern lazy DFA over the distinct path regexes,
/// whose final state names every path pattern that matches (all matches of a full-match
/// pattern end at the end of the path). Candidates are then confirmed in rule order with
/// the remaining fields, so the result is exactly the linear scan's.
struct HttpIndex {
    /// Some rule has side effects: every matching rule is reported.
    exhaustive: bool,
    /// Per rule: the standard methods its method regex accepts (all bits when none).
    method_mask: Vec<u16>,
    /// None when the DFA could not be built (the linear scan is used).
    paths: Option<(DFA, CachePool)>,
    /// Per distinct path pattern: the rules using it, ascending.
    path_rules: Vec<Vec<u32>>,
    /// Rules without a path (they match every path), ascending.
    pathless: Vec<u32>,
}

impl fmt::Debug for HttpIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpIndex")
            .field("patterns", &self.path_rules.len())
            .field("pathless", &self.pathless.len())
            .field("exhaustive", &self.exhaustive)
            .finish()
    }
}

impl PartialEq for HttpIndex {
    /// Derived from the rules, which the set compares.
    fn eq(&self, _: &HttpIndex) -> bool {
        true
    }
}

impl HttpIndex {
    fn new(rules: &[HttpRule]) -> HttpIndex {
        let mut texts: Vec<&str> = Vec::new();
        let mut path_rules: Vec<Vec<u32>> = Vec::new();
        let mut pathless = Vec::new();
        let mut method_mask = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let i = i as u32;
            method_mask.push(match &r.method {
                None => u16::MAX,
                Some(m) => METHODS
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| m.is_match(x))
                    .fold(0, |acc, (b, _)| acc | (1 << b)),
            });
            match &r.path {
                None => pathless.push(i),
                Some(p) => match texts.iter().position(|t| *t == p.text) {
                    Some(k) => path_rules[k].push(i),
                    None => {
                        texts.push(&p.text);
                        path_rules.push(vec![i]);
                    }
                },
            }
        }
        let patterns: Vec<String> = texts.iter().map(|t| format!("^(?:{t})$")).collect();
        let paths = if patterns.is_empty() {
            None
        } else {
            DFA::builder()
                .configure(
                    DFA::config()
                        .match_kind(MatchKind::All)
                        .cache_capacity(4 << 20),
                )
                .build_many(&patterns)
                .ok()
                .map(|dfa| {
                    let d = dfa.clone();
                    let create: Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe> =
                        Box::new(move || d.create_cache());
                    (dfa, Pool::new(create))
                })
        };
        HttpIndex {
            exhaustive: rules.iter().any(HttpRule::has_side_effects),
            method_mask,
            paths,
            path_rules,
            pathless,
        }
    }

    /// Calls `found` with every path pattern that matches; None when the lazy DFA gave
    /// up (then the caller scans linearly).
    fn path_patterns(&self, path: &str, mut found: impl FnMut(usize)) -> Option<()> {
        let (dfa, pool) = self.paths.as_ref()?;
        let mut cache = pool.get();
        let input = Input::new(path).anchored(Anchored::Yes);
        let mut sid = dfa.start_state_forward(&mut cache, &input).ok()?;
        for &b in path.as_bytes() {
            sid = dfa.next_state(&mut cache, sid, b).ok()?;
            if sid.is_tagged() {
                if sid.is_dead() {
                    return Some(());
                }
                if sid.is_quit() {
                    return None;
                }
            }
        }
        sid = dfa.next_eoi_state(&mut cache, sid).ok()?;
        if sid.is_quit() {
            return None;
        }
        if sid.is_match() {
            for i in 0..dfa.match_len(&cache, sid) {
                found(dfa.match_pattern(&cache, sid, i).as_usize());
            }
        }
        Some(())
    }

    fn matches(
        &self,
        rules: &[HttpRule],
        req: &dyn Request,
        secrets: &dyn Secrets,
    ) -> Option<Vec<L7Match>> {
        let mut candidates: Vec<u32> = Vec::new();
        let mut sources = 0;
        let mut missing = false;
        self.path_patterns(req.path(), |p| {
            sources += 1;
            match self.path_rules.get(p) {
                Some(r) => candidates.extend_from_slice(r),
                None => missing = true,
            }
        })?;
        if missing {
            return None;
        }
        if !self.pathless.is_empty() {
            sources += 1;
            candidates.extend_from_slice(&self.pathless);
        }
        if sources > 1 {
            // each source is ascending; rule order is what decides
            candidates.sort_unstable();
        }
        let bit = method_bit(req.method());
        let mut out = Vec::new();
        for i in candidates {
            let index = i as usize;
            let r = rules.get(index)?;
            let method_ok = match (bit, &r.method) {
                (_, None) => true,
                (Some(b), Some(_)) => self.method_mask.get(index)? & b != 0,
                (None, Some(m)) => m.is_match(req.method()),
            };
            if !method_ok {
                continue;
            }
            if let Some(outcome) = r.evaluate_rest(req, secrets) {
                out.push(L7Match { index, outcome });
                if !self.exhaustive {
                    break;
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{FullMatch, HeaderMatch, HeaderRule, Mismatch, SimpleRequest};

    fn rule(method: Option<&str>, path: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(|m| FullMatch::new(m).unwrap()),
            path: path.map(|p| FullMatch::new(p).unwrap()),
            host: None,
            headers: vec![],
            header_matches: vec![],
        }
    }

    fn req(method: &str, path: &str) -> SimpleRequest {
        SimpleRequest {
            method: method.into(),
            path: path.into(),
            host: Some("h".into()),
            headers: vec![("x-a".into(), "1".into())],
        }
    }

    fn summary(v: &[L7Match]) -> Vec<(usize, RuleOutcome)> {
        v.iter().map(|m| (m.index, m.outcome.clone())).collect()
    }

    /// The index gives exactly what the linear scan gives, over a mix of rules that
    /// share paths, lack paths or methods, use method regexes and non-standard methods.
    #[test]
    fn index_agrees_with_the_linear_scan() {
        let mut rules = vec![
            rule(Some("GET"), Some("/a/.*")),
            rule(Some("POST|PUT"), Some("/a/.*")),
            rule(None, Some("/b")),
            rule(Some("G.*"), None),
            rule(Some("PURGE"), Some("/c(\\?.*)?")),
            rule(Some("DELETE"), Some("/d/[0-9]+")),
            rule(None, Some("/unicode/é+")),
        ];
        let mut with_header = rule(Some("GET"), Some("/h"));
        with_header.headers = vec![HeaderRule::parse("X-A: 1").unwrap()];
        rules.push(with_header);
        let mut no_header = rule(Some("GET"), Some("/h"));
        no_header.headers = vec![HeaderRule::parse("X-B").unwrap()];
        rules.insert(0, no_header);
        let requests = [
            ("GET", "/a/x"),
            ("PUT", "/a/x"),
            ("PATCH", "/a/x"),
            ("GET", "/b"),
            ("POST", "/b"),
            ("GET", "/zzz"),
            ("PURGE", "/c?x"),
            ("purge", "/c"),
            ("DELETE", "/d/12"),
            ("DELETE", "/d/x"),
            ("GET", "/h"),
            ("GET", "/unicode/éé"),
            ("GET", ""),
        ];
        for exhaustive in [false, true] {
            if exhaustive {
                let mut r = rule(None, Some("/a/.*"));
                r.header_matches = vec![HeaderMatch {
                    name: "X-Z".into(),
                    value: Some("v".into()),
                    secret: None,
                    mismatch: Mismatch::Add,
                }];
                rules.push(r);
            }
            let set = L7Set::new(L7Rules::Http(rules.clone()), "spec".into());
            assert!(set.indexed());
            for (m, p) in requests {
                let r = req(m, p);
                assert_eq!(
                    summary(&set.http_matches(&r)),
                    summary(&http_matches_linear(&rules, &r, &NoSecrets)),
                    "{m} {p} exhaustive={exhaustive}"
                );
            }
        }
    }
}
