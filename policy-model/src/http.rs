//! HTTP rules as Cilium (through Envoy) applies them: `method`, `path` and `host` are RE2
//! regexes matched against the whole `:method`, the raw `:path` (query included) and
//! `:authority`; `headers` entries are presence (`Name`) or exact value (`Name: value`)
//! checks; `headerMatches` compare exactly and may LOG, ADD, DELETE or REPLACE on mismatch.
//! Rules are ORed, the fields of a rule ANDed.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use regex::Regex;
use serde::{Serialize, Serializer};

use crate::tls::{NoSecrets, SecretRef, Secrets};

/// The parts of a request that rules look at. The proxy implements it over its own
/// request type so that nothing is copied per request.
pub trait Request {
    fn method(&self) -> &str;
    /// The raw request target (`:path`), query included.
    fn path(&self) -> &str;
    /// `:authority` / `Host`, if any.
    fn host(&self) -> Option<&str>;
    /// Every value of the header (case-insensitive name) joined with `,`; None if absent.
    fn header(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// A request built from plain values (the trace command, tests, conformance probes).
#[derive(Clone, Debug, Default)]
pub struct SimpleRequest {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Request for SimpleRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn host(&self) -> Option<&str> {
        self.host.as_deref().or_else(|| {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.as_str())
        })
    }
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first},{second}");
                for v in values {
                    joined.push(',');
                    joined.push_str(v);
                }
                Some(Cow::Owned(joined))
            }
        }
    }
}

/// An anchored, full-match regex with its source text.
#[derive(Clone)]
pub struct FullMatch {
    pub text: String,
    /// Shared with every other rule of the same text (`shared_regex`).
    regex: Arc<Regex>,
}

impl FullMatch {
    pub fn new(text: &str) -> Result<FullMatch, String> {
        let regex = crate::shared_regex::shared("http", text, || {
            regex::RegexBuilder::new(&format!("^(?:{text})$"))
                .size_limit(1 << 20)
                .build()
        })
        .map_err(|e| format!("invalid regex {text:?}: {}", first_line(&e.to_string())))?;
        Ok(FullMatch {
            text: text.to_string(),
            regex,
        })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.regex.is_match(s)
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_string()
}

impl PartialEq for FullMatch {
    fn eq(&self, other: &FullMatch) -> bool {
        self.text == other.text
    }
}

impl fmt::Debug for FullMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

/// `headers` entry: presence, or exact value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRule {
    pub name: String,
    pub value: Option<String>,
}

impl HeaderRule {
    /// `"X-Foo: bar"` is an exact match on `X-Foo`; `"X-Foo"` a presence match. As in
    /// Cilium, the text is split at the first space and a trailing `:` of the name dropped.
    pub fn parse(s: &str) -> Result<HeaderRule, String> {
        let s = s.trim();
        let (name, value) = match s.split_once(' ') {
            Some((n, v)) => (n.trim_end_matches(':'), Some(v.trim().to_string())),
            None => (s.trim_end_matches(':'), None),
        };
        if name.is_empty() {
            return Err("empty header name".into());
        }
        if !name.bytes().all(is_token_char) {
            return Err(format!("{name:?} is not a valid header name"));
        }
        Ok(HeaderRule {
            name: name.to_string(),
            value,
        })
    }
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a `headerMatches` entry does when the header does not have the expected value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mismatch {
    /// The rule does not match (the default).
    Fail,
    /// The rule matches; the header is logged as missing.
    Log,
    /// The rule matches; the value is appended.
    Add,
    /// The rule matches; the header is removed.
    Delete,
    /// The rule matches; the value replaces what was sent.
    Replace,
}

impl Mismatch {
    pub fn parse(s: &str) -> Option<Mismatch> {
        Some(match s {
            "" => Mismatch::Fail,
            "LOG" => Mismatch::Log,
            "ADD" => Mismatch::Add,
            "DELETE" => Mismatch::Delete,
            "REPLACE" => Mismatch::Replace,
            _ => return None,
        })
    }
}

/// `headerMatches` entry. With a secret, the value is the secret's (resolved per request
/// from the proxy's secrets); a missing secret falls back to `value`, and without one the
/// match can never succeed, whatever the mismatch action (Cilium's agent and proxy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: Option<String>,
    pub secret: Option<SecretRef>,
    pub mismatch: Mismatch,
}

/// The value of a header action: written in the policy, or read from a secret (never
/// shown: `Debug` and serialisation print `[redacted]`).
#[derive(Clone, PartialEq, Eq)]
pub enum ActionValue {
    Inline(String),
    Secret(Arc<str>),
}

impl ActionValue {
    pub fn as_str(&self) -> &str {
        match self {
            ActionValue::Inline(s) => s,
            ActionValue::Secret(s) => s,
        }
    }
}

impl From<&str> for ActionValue {
    fn from(s: &str) -> ActionValue {
        ActionValue::Inline(s.to_string())
    }
}

impl fmt::Debug for ActionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActionValue::Inline(s) => write!(f, "{s:?}"),
            ActionValue::Secret(_) => f.write_str(REDACTED),
        }
    }
}

impl Serialize for ActionValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ActionValue::Inline(v) => s.serialize_str(v),
            ActionValue::Secret(_) => s.serialize_str(REDACTED),
        }
    }
}

/// How secret-backed values appear wherever a value would be shown.
pub const REDACTED: &str = "[redacted]";

/// A side effect a matching rule asks the proxy to apply to the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum HeaderAction {
    Add { name: String, value: ActionValue },
    Delete { name: String },
    Replace { name: String, value: ActionValue },
}

/// One `rules.http[i]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRule {
    pub method: Option<FullMatch>,
    pub path: Option<FullMatch>,
    pub host: Option<FullMatch>,
    pub headers: Vec<HeaderRule>,
    pub header_matches: Vec<HeaderMatch>,
}

/// The result of one rule against one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RuleOutcome {
    pub actions: Vec<HeaderAction>,
    /// Headers logged as missing (LOG, REPLACE).
    pub missing: Vec<String>,
    /// Headers logged as rejected (DELETE, REPLACE).
    pub rejected: Vec<String>,
}

impl HttpRule {
    /// A rule with no field set allows every request.
    pub fn is_wildcard(&self) -> bool {
        self.method.is_none()
            && self.path.is_none()
            && self.host.is_none()
            && self.headers.is_empty()
            && self.header_matches.is_empty()
    }

    pub fn has_side_effects(&self) -> bool {
        self.header_matches
            .iter()
            .any(|m| m.mismatch != Mismatch::Fail)
    }

    /// Whether the rule matches, and with which side effects (secret-backed header
    /// matches find no secret).
    pub fn evaluate(&self, req: &dyn Request) -> Option<RuleOutcome> {
        self.evaluate_with(req, &NoSecrets)
    }

    /// [`HttpRule::evaluate`] with the values of secret-backed header matches.
    pub fn evaluate_with(&self, req: &dyn Request, secrets: &dyn Secrets) -> Option<RuleOutcome> {
        if let Some(m) = &self.method {
            if !m.is_match(req.method()) {
                return None;
            }
        }
        if let Some(p) = &self.path {
            if !p.is_match(req.path()) {
                return None;
            }
        }
        self.evaluate_rest(req, secrets)
    }

    /// [`HttpRule::evaluate_with`] for a request whose method and path are already known
    /// to match (the rule-set index checked them).
    pub(crate) fn evaluate_rest(
        &self,
        req: &dyn Request,
        secrets: &dyn Secrets,
    ) -> Option<RuleOutcome> {
        if let Some(h) = &self.host {
            if !h.is_match(req.host().unwrap_or("")) {
                return None;
            }
        }
        for h in &self.headers {
            match (req.header(&h.name), &h.value) {
                (None, _) => return None,
                (Some(v), Some(want)) if v.as_ref() != want => return None,
                _ => {}
            }
        }
        let mut outcome = RuleOutcome::default();
        for m in &self.header_matches {
            let want = match (&m.secret, &m.value) {
                (Some(s), inline) => match secrets.value(s) {
                    Some(v) => Some(ActionValue::Secret(v)),
                    None => match inline {
                        Some(v) => Some(ActionValue::Inline(v.clone())),
                        // the secret is missing and nothing stands in: never matches
                        None => return None,
                    },
                },
                (None, Some(v)) => Some(ActionValue::Inline(v.clone())),
                (None, None) => None,
            };
            let got = req.header(&m.name);
            let ok = match (&want, &got) {
                // neither value nor secret: a presence check
                (None, _) => got.is_some(),
                (Some(want), Some(v)) => constant_time_eq(want.as_str().as_bytes(), v.as_bytes()),
                (Some(_), None) => false,
            };
            if ok {
                continue;
            }
            match m.mismatch {
                Mismatch::Fail => return None,
                Mismatch::Log => outcome.missing.push(m.name.clone()),
                Mismatch::Add => {
                    if let Some(v) = want {
                        outcome.actions.push(HeaderAction::Add {
                            name: m.name.clone(),
                            value: v,
                        });
                    }
                    outcome.missing.push(m.name.clone());
                }
                Mismatch::Delete => {
                    outcome.actions.push(HeaderAction::Delete {
                        name: m.name.clone(),
                    });
                    outcome.rejected.push(m.name.clone());
                }
                Mismatch::Replace => {
                    if let Some(v) = want {
                        outcome.actions.push(HeaderAction::Replace {
                            name: m.name.clone(),
                            value: v,
                        });
                    }
                    if got.is_some() {
                        outcome.rejected.push(m.name.clone());
                    }
                    outcome.missing.push(m.name.clone());
                }
            }
        }
        Some(outcome)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Display for HttpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(m) = &self.method {
            parts.push(format!("method={}", m.text));
        }
        if let Some(p) = &self.path {
            parts.push(format!("path={}", p.text));
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={}", h.text));
        }
        for h in &self.headers {
            match &h.value {
                Some(v) => parts.push(format!("header {}={v}", h.name)),
                None => parts.push(format!("header {}", h.name)),
            }
        }
        for m in &self.header_matches {
            match (&m.secret, &m.value) {
                (Some(s), _) => parts.push(format!(
                    "headerMatch {}={REDACTED} (secret {s}, {:?})",
                    m.name, m.mismatch
                )),
                (None, Some(v)) => {
                    parts.push(format!("headerMatch {}={v} ({:?})", m.name, m.mismatch))
                }
                (None, None) => parts.push(format!("headerMatch {} ({:?})", m.name, m.mismatch)),
            }
        }
        if parts.is_empty() {
            f.write_str("any request")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: Option<&str>, path: Option<&str>, host: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(|m| FullMatch::new(m).unwrap()),
            path: path.map(|m| FullMatch::new(m).unwrap()),
            host: host.map(|m| FullMatch::new(m).unwrap()),
            headers: vec![],
            header_matches: vec![],
        }
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> SimpleRequest {
        SimpleRequest {
            method: method.into(),
            path: path.into(),
            host: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn regexes_are_anchored_full_matches() {
        let r = rule(Some("GET"), Some("/public"), None);
        assert!(r.evaluate(&req("GET", "/public", &[])).is_some());
        assert!(r.evaluate(&req("GET", "/public/x", &[])).is_none());
        assert!(r.evaluate(&req("GET", "/x/public", &[])).is_none());
        assert!(r.evaluate(&req("GETX", "/public", &[])).is_none());
        // the query is part of the path
        assert!(r.evaluate(&req("GET", "/public?x=1", &[])).is_none());
        let r = rule(None, Some(r"/public(\?.*)?"), None);
        assert!(r.evaluate(&req("POST", "/public?x=1", &[])).is_some());
    }

    #[test]
    fn host_matches_authority_and_unescaped_dots_match_anything() {
        let r = rule(None, None, Some("foo.bar.com"));
        assert!(r
            .evaluate(&req("GET", "/", &[("Host", "fooXbar.com")]))
            .is_some());
        let r = rule(None, None, Some(r"foo\.bar\.com"));
        assert!(r
            .evaluate(&req("GET", "/", &[("Host", "fooXbar.com")]))
            .is_none());
        assert!(r
            .evaluate(&req("GET", "/", &[("Host", "foo.bar.com")]))
            .is_some());
        assert!(
            r.evaluate(&req("GET", "/", &[])).is_none(),
            "no host: no match"
        );
    }

    #[test]
    fn header_presence_and_exact_value() {
        let exact = HeaderRule::parse("X-My-Header: true").unwrap();
        assert_eq!(exact.value.as_deref(), Some("true"));
        let presence = HeaderRule::parse("X-Debug").unwrap();
        assert_eq!(presence.value, None);
        let mut r = rule(None, None, None);
        r.headers = vec![exact];
        assert!(r
            .evaluate(&req("GET", "/", &[("x-my-header", "true")]))
            .is_some());
        assert!(r
            .evaluate(&req("GET", "/", &[("X-My-Header", "false")]))
            .is_none());
        assert!(r.evaluate(&req("GET", "/", &[])).is_none());
        r.headers = vec![presence];
        assert!(r.evaluate(&req("GET", "/", &[("X-Debug", "")])).is_some());
        assert!(r.evaluate(&req("GET", "/", &[])).is_none());
    }

    #[test]
    fn multi_valued_headers_are_joined() {
        let mut r = rule(None, None, None);
        r.headers = vec![HeaderRule::parse("X-A: 1,2").unwrap()];
        assert!(r
            .evaluate(&req("GET", "/", &[("X-A", "1"), ("x-a", "2")]))
            .is_some());
    }

    #[test]
    fn header_match_mismatch_actions() {
        let hm = |mismatch| HeaderMatch {
            name: "X-Token".into(),
            value: Some("s3cret".into()),
            secret: None,
            mismatch,
        };
        let mut r = rule(None, None, None);
        r.header_matches = vec![hm(Mismatch::Fail)];
        assert!(r
            .evaluate(&req("GET", "/", &[("X-Token", "nope")]))
            .is_none());
        assert!(r
            .evaluate(&req("GET", "/", &[("X-Token", "s3cret")]))
            .is_some());

        r.header_matches = vec![hm(Mismatch::Log)];
        let o = r
            .evaluate(&req("GET", "/", &[("X-Token", "nope")]))
            .unwrap();
        assert_eq!(o.missing, vec!["X-Token"]);
        assert!(o.actions.is_empty());

        r.header_matches = vec![hm(Mismatch::Add)];
        let o = r.evaluate(&req("GET", "/", &[])).unwrap();
        assert_eq!(
            o.actions,
            vec![HeaderAction::Add {
                name: "X-Token".into(),
                value: "s3cret".into()
            }]
        );

        r.header_matches = vec![hm(Mismatch::Delete)];
        let o = r
            .evaluate(&req("GET", "/", &[("X-Token", "nope")]))
            .unwrap();
        assert_eq!(
            o.actions,
            vec![HeaderAction::Delete {
                name: "X-Token".into()
            }]
        );
        assert_eq!(o.rejected, vec!["X-Token"]);

        r.header_matches = vec![hm(Mismatch::Replace)];
        let o = r
            .evaluate(&req("GET", "/", &[("X-Token", "nope")]))
            .unwrap();
        assert_eq!(
            o.actions,
            vec![HeaderAction::Replace {
                name: "X-Token".into(),
                value: "s3cret".into()
            }]
        );
        assert_eq!(o.rejected, vec!["X-Token"]);
        assert_eq!(o.missing, vec!["X-Token"]);
    }

    struct Vault(Vec<(&'static str, &'static str)>);

    impl Secrets for Vault {
        fn keys(&self, s: &SecretRef) -> Option<Vec<String>> {
            self.value(s).map(|_| vec!["value".to_string()])
        }
        fn value(&self, s: &SecretRef) -> Option<Arc<str>> {
            self.0
                .iter()
                .find(|(n, _)| *n == s.name)
                .map(|(_, v)| Arc::from(*v))
        }
    }

    fn secret_match(value: Option<&str>, secret: &str, mismatch: Mismatch) -> HttpRule {
        let mut r = rule(None, None, None);
        r.header_matches = vec![HeaderMatch {
            name: "X-Token".into(),
            value: value.map(str::to_string),
            secret: Some(SecretRef {
                namespace: "ns".into(),
                name: secret.into(),
            }),
            mismatch,
        }];
        r
    }

    #[test]
    fn secret_only_header_match_never_matches_without_the_secret() {
        let r = secret_match(None, "gone", Mismatch::Fail);
        assert!(r.evaluate(&req("GET", "/", &[("X-Token", "x")])).is_none());
        assert!(r.evaluate(&req("GET", "/", &[])).is_none());
        // not even with a lenient mismatch action
        let r = secret_match(None, "gone", Mismatch::Log);
        assert!(r.evaluate(&req("GET", "/", &[("X-Token", "x")])).is_none());
    }

    #[test]
    fn secret_values_win_and_inline_values_stand_in() {
        let vault = Vault(vec![("tok", "s3cr3t-42")]);
        let r = secret_match(Some("inline-7"), "tok", Mismatch::Fail);
        let ok = |r: &HttpRule, v: &str| {
            r.evaluate_with(&req("GET", "/", &[("X-Token", v)]), &vault)
                .is_some()
        };
        assert!(ok(&r, "s3cr3t-42"));
        assert!(!ok(&r, "inline-7"), "the secret wins over the inline value");
        assert!(!ok(&r, "s3cr3t-4"));
        let r = secret_match(Some("inline-7"), "gone", Mismatch::Fail);
        assert!(ok(&r, "inline-7"));
        assert!(!ok(&r, "s3cr3t-42"));
    }

    #[test]
    fn secret_values_are_redacted_where_shown() {
        let vault = Vault(vec![("tok", "s3cr3t-42")]);
        let r = secret_match(None, "tok", Mismatch::Replace);
        let o = r
            .evaluate_with(&req("GET", "/", &[("X-Token", "nope")]), &vault)
            .unwrap();
        let HeaderAction::Replace { value, .. } = &o.actions[0] else {
            panic!("{o:?}")
        };
        assert_eq!(
            value.as_str(),
            "s3cr3t-42",
            "the proxy sends the real value"
        );
        for shown in [
            format!("{o:?}"),
            serde_json::to_string(&o).unwrap(),
            r.to_string(),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
    }

    #[test]
    fn invalid_regex_is_an_error() {
        assert!(FullMatch::new("(").is_err());
        assert!(FullMatch::new("[a-").is_err());
    }

    #[test]
    fn empty_rule_is_wildcard() {
        assert!(rule(None, None, None).is_wildcard());
        assert!(rule(None, None, None)
            .evaluate(&req("DELETE", "/x", &[]))
            .is_some());
    }
}
