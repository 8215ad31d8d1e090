//! TLS in policies: `serverNames` (SNI patterns, as Cilium's proxy matches them), the TLS
//! contexts of a `toPorts` entry (`terminatingTLS`, `originatingTLS`) as references to
//! secrets, and what a TLS session or a plaintext connection may do on a port whose rules
//! carry them (reference `cilium-tls-and-restart.md`, A1 and A2).
//!
//! A `toPorts` entry with serverNames or a TLS context is an L7 rule set: the datapath
//! sends its port to the proxy, which reads the ClientHello and asks
//! [`Model::tls_session`](crate::Model::tls_session) what to do with the session: reset
//! it, splice it to the server untouched, or terminate it and check the decrypted
//! requests against the HTTP rules.

use std::fmt;
use std::sync::Arc;

use regex::Regex;
use serde::Serialize;

use crate::compile::Model;
use crate::flow::{ConnectionPolicy, Matched, RuleSetRef, SideDecision, SidePolicy, TlsSide};
use crate::l7::L7Set;

/// Longest server name pattern accepted (a DNS name is at most 253 characters).
const MAX_LEN: usize = 253;

/// One `serverNames` entry: lower-cased; without `*` an exact name; `*` matches zero or
/// more of `[-a-z0-9_]` inside one label; `**` one or more whole labels; a bare `*`
/// any name (cilium/proxy `SniPattern`).
#[derive(Clone)]
pub struct SniPattern {
    /// The pattern, lower-cased.
    pub text: String,
    matcher: SniMatcher,
}

#[derive(Clone)]
enum SniMatcher {
    Exact,
    Regex(Regex),
}

impl PartialEq for SniPattern {
    fn eq(&self, other: &SniPattern) -> bool {
        self.text == other.text
    }
}

impl fmt::Debug for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Characters of a DNS label in a pattern (matched lower-cased).
const LABEL: &str = "[-a-z0-9_]";

impl SniPattern {
    /// Parses a server name pattern with Cilium's validation (the proxy's `server_names`
    /// pattern, synced with the CRD): dot-separated labels, each `*`, `**`, or
    /// `[*]?[-a-zA-Z0-9_]+([*][-a-zA-Z0-9_]+)*[*]?`; no empty label, no trailing dot.
    pub fn parse(pattern: &str) -> Result<SniPattern, String> {
        if pattern.is_empty() {
            return Err("empty server name".into());
        }
        if pattern.len() > MAX_LEN {
            return Err(format!("longer than {MAX_LEN} characters"));
        }
        if pattern.ends_with('.') {
            return Err("a server name has no trailing dot".into());
        }
        for label in pattern.split('.') {
            check_label(label)?;
        }
        let text = pattern.to_ascii_lowercase();
        let matcher = if !text.contains('*') {
            SniMatcher::Exact
        } else if text == "*" {
            SniMatcher::Regex(anchored(&format!("{LABEL}+(?:[.]{LABEL}+)*"))?)
        } else {
            let body: Vec<String> = text
                .split('.')
                .map(|label| match label {
                    "**" => format!("{LABEL}+(?:[.]{LABEL}+)*"),
                    _ => label.replace('*', &format!("{LABEL}*")),
                })
                .collect();
            SniMatcher::Regex(anchored(&body.join("[.]"))?)
        };
        Ok(SniPattern { text, matcher })
    }

    /// Whether an SNI matches (compared lower-cased, as Cilium does).
    pub fn matches(&self, sni: &str) -> bool {
        let sni = sni.to_ascii_lowercase();
        match &self.matcher {
            SniMatcher::Exact => sni == self.text,
            SniMatcher::Regex(r) => r.is_match(&sni),
        }
    }
}

fn anchored(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| e.to_string())
}

/// One label of a server name pattern.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label (a server name has no \"..\", leading or trailing dot)".into());
    }
    if label == "*" || label == "**" {
        return Ok(());
    }
    let is_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if let Some(c) = label.chars().find(|&c| !is_char(c) && c != '*') {
        return Err(format!(
            "character {c:?} is not allowed (only letters, digits, \"-\", \"_\", \".\" and \"*\")"
        ));
    }
    // between stars there must be at least one character: no `**` inside a label
    if label.contains("**") {
        return Err(format!(
            "label {label:?}: \"**\" stands alone as a label (one or more labels)"
        ));
    }
    Ok(())
}

/// The SNI of a ClientHello as the proxy reads it (rustls, whose rules this follows):
/// lower-cased and without one trailing dot (the same DNS name; Cilium's proxy compares
/// the dot and resets); an IP address is no server name (RFC 6066: as if none was sent,
/// `Ok(None)`); anything else that is not a DNS name (labels of 1 to 63 letters, digits,
/// `_` and inner `-`, at most 253 characters, the last label not a number) fails the
/// handshake (`Err`).
pub fn client_sni(raw: &str) -> Result<Option<String>, String> {
    if raw.parse::<std::net::IpAddr>().is_ok() {
        return Ok(None);
    }
    let invalid = || Err(format!("{raw:?} is not a DNS name"));
    if raw.is_empty() || raw.len() > MAX_LEN {
        return invalid();
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !labels.iter().all(|l| label_ok(l)) {
        return invalid();
    }
    let last = labels.last().copied().unwrap_or_default();
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || ((last.starts_with("0x") || last.starts_with("0X"))
            && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return invalid();
    }
    Ok(Some(name.to_ascii_lowercase()))
}

/// A secret a policy names, with its namespace resolved (the policy's when omitted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which end of the proxy a TLS context is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsRole {
    /// `terminatingTLS`: the proxy is the server of the client's session.
    Terminating,
    /// `originatingTLS`: the proxy is the client of the session to the real server.
    Originating,
}

impl fmt::Display for TlsRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsRole::Terminating => "terminatingTLS",
            TlsRole::Originating => "originatingTLS",
        })
    }
}

/// Default key names inside a secret (Cilium's).
pub const CA_KEY: &str = "ca.crt";
pub const CERT_KEY: &str = "tls.crt";
pub const PRIVATE_KEY_KEY: &str = "tls.key";

/// A `terminatingTLS` or `originatingTLS` context: a secret and the names of the keys in
/// it (`trustedCA`, `certificate`, `privateKey`; defaults `ca.crt`, `tls.crt`,
/// `tls.key`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct TlsContext {
    pub role: TlsRole,
    pub secret: SecretRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

/// A key of a secret a context needs, and whether its name was written in the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeededKey {
    pub key: String,
    pub what: &'static str,
}

impl TlsContext {
    pub fn ca_key(&self) -> &str {
        self.trusted_ca.as_deref().unwrap_or(CA_KEY)
    }
    pub fn cert_key(&self) -> &str {
        self.certificate.as_deref().unwrap_or(CERT_KEY)
    }
    pub fn private_key_key(&self) -> &str {
        self.private_key.as_deref().unwrap_or(PRIVATE_KEY_KEY)
    }

    /// The keys of the secret this context cannot work without: certificate and private
    /// key to terminate, the trusted CA to originate. A terminating context's CA is not
    /// used (Ward asks no client certificate, as Cilium since #31903), nor an originating
    /// context's certificate (no client certificate upstream, Cilium's default).
    pub fn needed_keys(&self) -> Vec<NeededKey> {
        match self.role {
            TlsRole::Terminating => vec![
                NeededKey {
                    key: self.cert_key().to_string(),
                    what: "certificate",
                },
                NeededKey {
                    key: self.private_key_key().to_string(),
                    what: "private key",
                },
            ],
            TlsRole::Originating => vec![NeededKey {
                key: self.ca_key().to_string(),
                what: "trusted CA",
            }],
        }
    }
}

impl fmt::Display for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} secret {}", self.role, self.secret)
    }
}

/// The TLS part of one `toPorts` entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TlsRule {
    pub server_names: Vec<SniPattern>,
    pub terminating: Option<TlsContext>,
    pub originating: Option<TlsContext>,
}

impl TlsRule {
    /// Whether the entry restricts the SNI (no verdict without a matching one).
    pub fn restricts_sni(&self) -> bool {
        !self.server_names.is_empty()
    }

    /// Whether `sni` matches one of the server names (false without SNI).
    pub fn sni_matches(&self, sni: Option<&str>) -> bool {
        sni.is_some_and(|s| self.server_names.iter().any(|p| p.matches(s)))
    }

    /// Whether the entry has anything to say about a session with this SNI: it lists no
    /// server names, or one of them matches.
    pub fn applies_to(&self, sni: Option<&str>) -> bool {
        !self.restricts_sni() || self.sni_matches(sni)
    }

    /// Whether the entry carries a TLS context (then it gives no verdict for plaintext).
    pub fn has_context(&self) -> bool {
        self.terminating.is_some() || self.originating.is_some()
    }
}

/// What the secrets a case or an agent knows of hold: the model checks that the keys a
/// context needs are there (the proxy then checks that they are usable); header
/// matches read values from it.
pub trait Secrets {
    /// The key names present in a secret; None when the secret does not exist.
    fn keys(&self, secret: &SecretRef) -> Option<Vec<String>>;
    /// The value of a secret for `headerMatches`: the secret must hold exactly one key
    /// (Cilium's `GetSecretString`); one trailing newline is not part of the value.
    fn value(&self, secret: &SecretRef) -> Option<Arc<str>>;
}

/// No secrets at all: every secret is missing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSecrets;

impl Secrets for NoSecrets {
    fn keys(&self, _: &SecretRef) -> Option<Vec<String>> {
        None
    }
    fn value(&self, _: &SecretRef) -> Option<Arc<str>> {
        None
    }
}

/// Why a context cannot be used with the secrets at hand, in words naming the secret.
pub fn missing_material(ctx: &TlsContext, secrets: &dyn Secrets) -> Option<String> {
    let Some(keys) = secrets.keys(&ctx.secret) else {
        return Some(format!("{ctx}: secret {} not found", ctx.secret));
    };
    let missing: Vec<String> = ctx
        .needed_keys()
        .into_iter()
        .filter(|k| !keys.contains(&k.key))
        .map(|k| format!("{} ({})", k.key, k.what))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{ctx}: secret {} has no {}",
            ctx.secret,
            missing.join(" and ")
        )
    })
}

/// What to do with a TLS session, decided on its ClientHello's SNI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum TlsSession {
    /// Reset the connection: no rule admits the session.
    Reset {
        reason: Arc<str>,
        /// The rule whose check failed, when one rule is to blame.
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<Matched>,
    },
    /// Pass the bytes to the server untouched; the session is not decrypted.
    Splice {
        /// The rule that admitted the session, per side that has one.
        allowed_by: Vec<Matched>,
    },
    /// Terminate the session and check the decrypted requests.
    Intercept(Box<Interception>),
}

/// A session the proxy terminates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interception {
    pub terminating: TlsContext,
    /// None: the rule names no originating context (see the proxy's README for what
    /// Ward does then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub originating: Option<TlsContext>,
    /// The rule whose TLS contexts are used.
    pub rule: Matched,
    /// What the decrypted requests must pass.
    pub policy: ConnectionPolicy,
}

/// One side's part of a session's decision.
struct SideSession {
    decision: SideDecision,
    admitted_by: Option<Matched>,
    contexts: Option<(TlsContext, Option<TlsContext>, Matched)>,
}

impl Model {
    /// Decides a TLS session of a connection (`conn` from
    /// [`Model::connection_policy`]) by its SNI (None: the ClientHello has none). Per
    /// side, the allows that matched the peer and port are merged: with serverNames in
    /// any of them, the SNI must match one (otherwise reset). Of the merged allows, those
    /// that list no server names or one matching the SNI apply: the first with
    /// `terminatingTLS` has the session terminated with its contexts; then its HTTP rules
    /// (and those of the other applying rules with `terminatingTLS`) decide each request,
    /// and an applying rule without HTTP rules lets every request through. Without a
    /// terminating rule the session is spliced when an applying rule has no HTTP rules,
    /// and reset when every one of them needs HTTP (it cannot see inside TLS).
    pub fn tls_session(&self, conn: &ConnectionPolicy, sni: Option<&str>) -> TlsSession {
        let mut sides = Vec::new();
        let mut allowed_by = Vec::new();
        let mut chosen = None;
        for side in &conn.sides {
            let at = |why: &str| -> Arc<str> {
                format!("{} of {}: {why}", side.direction, side.endpoint).into()
            };
            let s = match (&side.tls, &side.decision) {
                (Some(t), _) => match self.tls_side(side, t, sni) {
                    Ok(s) => s,
                    Err((why, rule)) => {
                        return TlsSession::Reset {
                            reason: at(&why),
                            rule,
                        }
                    }
                },
                (None, SideDecision::Deny { reason }) => {
                    return TlsSession::Reset {
                        reason: at(reason),
                        rule: None,
                    }
                }
                (None, SideDecision::AllowAll { policy, rule }) => SideSession {
                    decision: side.decision.clone(),
                    admitted_by: match (policy, rule) {
                        (Some(p), Some(r)) => Some(Matched {
                            direction: side.direction,
                            policy: p.clone(),
                            rule: r.clone(),
                        }),
                        _ => None,
                    },
                    contexts: None,
                },
                (None, SideDecision::Rules { sets, .. }) => {
                    return TlsSession::Reset {
                        reason: at(&format!(
                            "{} cannot see inside TLS: no rule terminates it (terminatingTLS)",
                            self.names_of(sets.iter())
                        )),
                        rule: sets.first().map(|s| self.port_rule(side, s)),
                    }
                }
            };
            if let Some(m) = s.admitted_by {
                allowed_by.push(m);
            }
            if chosen.is_none() {
                chosen = s.contexts;
            }
            sides.push(SidePolicy {
                direction: side.direction,
                endpoint: side.endpoint.clone(),
                decision: s.decision,
                tls: None,
            });
        }
        match chosen {
            Some((terminating, originating, rule)) => {
                TlsSession::Intercept(Box::new(Interception {
                    terminating,
                    originating,
                    rule,
                    policy: ConnectionPolicy { sides },
                }))
            }
            None => TlsSession::Splice { allowed_by },
        }
    }

    fn set_of(&self, s: &RuleSetRef) -> &L7Set {
        &self.l7[s.l7 as usize]
    }

    fn port_rule(&self, side: &SidePolicy, s: &RuleSetRef) -> Matched {
        Matched {
            direction: side.direction,
            policy: s.policy.clone(),
            rule: self.set_of(s).port_path().to_string(),
        }
    }

    /// `Kind ns/name path; ...` of rule sets.
    fn names_of<'a>(&self, sets: impl Iterator<Item = &'a RuleSetRef>) -> String {
        let v: Vec<String> = sets
            .map(|s| format!("{} {}", s.policy, self.set_of(s).port_path()))
            .collect();
        v.join("; ")
    }

    /// One side of [`Model::tls_session`]; Err: the reason for a reset and the rule.
    fn tls_side(
        &self,
        side: &SidePolicy,
        t: &TlsSide,
        sni: Option<&str>,
    ) -> Result<SideSession, (String, Option<Matched>)> {
        let tls_of = |s: &RuleSetRef| self.set_of(s).tls.clone();
        let listing: Vec<&RuleSetRef> = t
            .sets
            .iter()
            .filter(|s| tls_of(s).is_some_and(|x| x.restricts_sni()))
            .collect();
        let named = listing
            .iter()
            .find(|s| tls_of(s).is_some_and(|x| x.sni_matches(sni)));
        if !listing.is_empty() && named.is_none() {
            let listed = self.names_of(listing.iter().copied());
            let why = match sni {
                None => format!("no SNI, and {listed} admits only listed serverNames"),
                Some(n) => format!("SNI {n} matches no serverNames of {listed}"),
            };
            return Err((why, listing.first().map(|s| self.port_rule(side, s))));
        }
        let applying: Vec<&RuleSetRef> = t
            .sets
            .iter()
            .filter(|s| tls_of(s).is_none_or(|x| x.applies_to(sni)))
            .collect();
        let every = applying.iter().find(|s| self.set_of(s).every_request);
        let admitted_by = named
            .or(every)
            .map(|s| self.port_rule(side, s))
            .or_else(|| t.l4_allow.clone());
        let lets_all_through = every.is_some() || t.l4_allow.is_some();
        let all = |m: &Option<Matched>| SideDecision::AllowAll {
            policy: m.as_ref().map(|m| m.policy.clone()),
            rule: m.as_ref().map(|m| m.rule.clone()),
        };
        let terminating = applying.iter().find_map(|s| {
            let x = tls_of(s)?;
            let term = x.terminating.clone()?;
            Some((term, x.originating.clone(), self.port_rule(side, s)))
        });
        match terminating {
            Some(contexts) => {
                let decision = if lets_all_through {
                    all(&admitted_by)
                } else {
                    let sets: Vec<RuleSetRef> = applying
                        .iter()
                        .filter(|s| {
                            self.set_of(s).has_http_rules()
                                && tls_of(s).is_some_and(|x| x.terminating.is_some())
                        })
                        .map(|s| (*s).clone())
                        .collect();
                    let denial = self.denial(side.direction, &side.endpoint, &sets);
                    SideDecision::Rules { sets, denial }
                };
                Ok(SideSession {
                    decision,
                    admitted_by,
                    contexts: Some(contexts),
                })
            }
            None if lets_all_through => Ok(SideSession {
                decision: all(&admitted_by),
                admitted_by,
                contexts: None,
            }),
            None => Err((
                format!(
                    "{} cannot see inside TLS: no rule terminates it (terminatingTLS)",
                    self.names_of(applying.iter().copied())
                ),
                applying.first().map(|s| self.port_rule(side, s)),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SniPattern {
        SniPattern::parse(s).unwrap()
    }

    /// The examples of cilium/proxy's `SniPattern` doc comment.
    #[test]
    fn cilium_examples() {
        let x = p("*.cilium.io");
        assert!(x.matches("www.cilium.io"));
        assert!(x.matches("blog.cilium.io"));
        assert!(!x.matches("cilium.io"));
        assert!(!x.matches("a.b.cilium.io"));
        let x = p("*cilium.io");
        assert!(x.matches("cilium.io"));
        assert!(x.matches("sub-cilium.io"));
        assert!(!x.matches("www.cilium.io"));
        let x = p("sub*.cilium.io");
        assert!(x.matches("sub.cilium.io"));
        assert!(x.matches("subdomain.cilium.io"));
        assert!(!x.matches("www.cilium.io"));
        let x = p("**.cilium.io");
        assert!(x.matches("www.cilium.io"));
        assert!(x.matches("a.b.c.cilium.io"));
        assert!(!x.matches("cilium.io"));
        assert!(!x.matches("xcilium.io"));
        let x = p("*");
        assert!(x.matches("anything.at.any.depth"));
        assert!(x.matches("x"));
        assert!(!x.matches(""));
    }

    #[test]
    fn exact_names_compare_lower_cased() {
        let x = p("Api.SaaS.Example");
        assert_eq!(x.text, "api.saas.example");
        assert!(x.matches("API.saas.EXAMPLE"));
        assert!(
            !x.matches("api.saas.example."),
            "a trailing dot is not dropped"
        );
        assert!(!x.matches("www.api.saas.example"));
        assert!(!x.matches("saas.example"));
    }

    #[test]
    fn wildcards_inside_labels_and_double_star_in_the_middle() {
        let x = p("a*b.example");
        assert!(x.matches("ab.example"));
        assert!(x.matches("a-x-b.example"));
        assert!(!x.matches("a.b.example"));
        let x = p("api.**.example");
        assert!(x.matches("api.eu.example"));
        assert!(x.matches("api.eu.west.example"));
        assert!(!x.matches("api.example"));
        let x = p("*.CDN.example");
        assert!(x.matches("img.cdn.example"));
        assert!(!x.matches("eu.img.cdn.example"));
    }

    #[test]
    fn invalid_patterns_say_why() {
        for (bad, why) in [
            ("", "empty server name"),
            ("example.com.", "trailing dot"),
            ("a..b", "empty label"),
            (".a", "empty label"),
            ("***.a", "stands alone"),
            ("a**.b", "stands alone"),
            ("ex ample.com", "not allowed"),
            ("exa/mple", "not allowed"),
            ("é.example", "not allowed"),
        ] {
            let e = SniPattern::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(SniPattern::parse(&"a".repeat(254)).is_err());
        for ok in [
            "a",
            "*",
            "**",
            "**.a",
            "a.*",
            "*a*b*.c",
            "x_y.example",
            "1.2.3.4",
        ] {
            SniPattern::parse(ok).unwrap();
        }
    }

    #[test]
    fn client_sni_is_what_rustls_reports() {
        assert_eq!(
            client_sni("API.Example.com"),
            Ok(Some("api.example.com".into()))
        );
        assert_eq!(
            client_sni("api.example.com."),
            Ok(Some("api.example.com".into()))
        );
        assert_eq!(
            client_sni("my_host.example"),
            Ok(Some("my_host.example".into()))
        );
        assert_eq!(client_sni("192.0.2.1"), Ok(None));
        assert_eq!(client_sni("2001:db8::1"), Ok(None));
        let long = format!("{}.example", "a".repeat(63));
        assert_eq!(client_sni(&long), Ok(Some(long.clone())));
        for bad in [
            "",
            "a..b",
            ".a",
            "a.example..",
            "-a.example",
            "a-.example",
            "a b.example",
            "a.123",
            "a.0x1f",
            "é.example",
        ] {
            assert!(client_sni(bad).is_err(), "{bad:?}");
        }
        assert!(client_sni(&format!("{}.example", "a".repeat(64))).is_err());
        assert!(client_sni(&format!("{}a", "a.".repeat(127))).is_err());
    }

    #[test]
    fn a_rule_with_names_gives_no_verdict_without_sni() {
        let r = TlsRule {
            server_names: vec![p("api.example")],
            ..TlsRule::default()
        };
        assert!(!r.applies_to(None));
        assert!(!r.applies_to(Some("www.example")));
        assert!(r.applies_to(Some("API.example")));
        assert!(TlsRule::default().applies_to(None));
    }

    #[test]
    fn missing_material_names_the_secret_and_the_keys() {
        struct One;
        impl Secrets for One {
            fn keys(&self, s: &SecretRef) -> Option<Vec<String>> {
                (s.name == "half").then(|| vec!["tls.crt".to_string()])
            }
            fn value(&self, _: &SecretRef) -> Option<Arc<str>> {
                None
            }
        }
        let ctx = |name: &str, role| TlsContext {
            role,
            secret: SecretRef {
                namespace: "ns".into(),
                name: name.into(),
            },
            trusted_ca: None,
            certificate: None,
            private_key: None,
        };
        let why = missing_material(&ctx("gone", TlsRole::Terminating), &One).unwrap();
        assert_eq!(
            why,
            "terminatingTLS secret ns/gone: secret ns/gone not found"
        );
        let why = missing_material(&ctx("half", TlsRole::Terminating), &One).unwrap();
        assert!(why.ends_with("has no tls.key (private key)"), "{why}");
        let why = missing_material(&ctx("half", TlsRole::Originating), &One).unwrap();
        assert!(why.ends_with("has no ca.crt (trusted CA)"), "{why}");
    }
}
