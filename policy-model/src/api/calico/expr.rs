//! Calico's selector expression language: a tokenizer and a recursive-descent parser
//! that follow `libcalico-go/lib/selector` (tokenizer.go, parser.go), and the
//! translation of a parsed expression into Ward's selectors.
//!
//! Grammar (lowest precedence first):
//!
//! ```text
//! or   := and ( "||" and )*
//! and  := op ( "&&" op )*
//! op   := "!"* ( "has(" label ")" | "all()" | "global()" | "(" or ")"
//!              | label ( "==" | "!=" | "contains" | "starts with" | "ends with" ) string
//!              | label ( "in" | "not in" ) "{" [ string ( "," string )* ] "}" )
//! label  := [a-zA-Z0-9_./-]+
//! string := '...' | "..."   (no escapes)
//! ```
//!
//! An empty expression is `all()`. Errors name the character (1-based) where the parser
//! stopped.
//!
//! Ward's selectors are conjunctions of requirements over identity labels, and a peer set
//! is a union of them, so an expression is brought into disjunctive normal form (negations
//! pushed onto the requirements, whose operators all have exact negations) with a bound on
//! the number of alternatives.

use std::fmt;

use crate::labels::{well_known, Key, Label, LabelSet, Source};
use crate::selector::{Op, Requirement, Selector};

/// A parsed selector expression, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    All,
    Global,
    Has(String),
    /// `key == 'v'`, `key != 'v'`, `contains`, `starts with`, `ends with`.
    Compare {
        key: String,
        op: Compare,
        value: String,
    },
    /// `key in {..}` or (negated) `key not in {..}`.
    Set {
        key: String,
        negated: bool,
        values: Vec<String>,
    },
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    Eq,
    Ne,
    Contains,
    StartsWith,
    EndsWith,
}

/// Why an expression does not parse: the reason and the 1-based character position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub position: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at character {}", self.reason, self.position)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Label(String),
    Str(String),
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    Not,
    And,
    Or,
    In,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    Has(String),
    All,
    Global,
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Label(l) => format!("label {l:?}"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::LParen => "\"(\"".into(),
            Tok::RParen => "\")\"".into(),
            Tok::LBrace => "\"{\"".into(),
            Tok::RBrace => "\"}\"".into(),
            Tok::Comma => "\",\"".into(),
            Tok::Eq => "\"==\"".into(),
            Tok::Ne => "\"!=\"".into(),
            Tok::Not => "\"!\"".into(),
            Tok::And => "\"&&\"".into(),
            Tok::Or => "\"||\"".into(),
            Tok::In => "\"in\"".into(),
            Tok::NotIn => "\"not in\"".into(),
            Tok::Contains => "\"contains\"".into(),
            Tok::StartsWith => "\"starts with\"".into(),
            Tok::EndsWith => "\"ends with\"".into(),
            Tok::Has(l) => format!("has({l})"),
            Tok::All => "all()".into(),
            Tok::Global => "global()".into(),
            Tok::Eof => "the end of the expression".into(),
        }
    }
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

/// Longest label at the start of `s` (Calico: `[a-zA-Z0-9_./-]{1,512}`).
fn label_len(s: &[u8]) -> usize {
    s.iter().take_while(|b| is_label_byte(**b)).count()
}

const MAX_LABEL: usize = 512;

/// Splits an expression into tokens with their byte offsets.
fn tokenize(input: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let b = input.as_bytes();
    let mut out: Vec<(Tok, usize)> = Vec::new();
    let mut i = 0;
    let err = |at: usize, reason: String| ParseError {
        position: input[..at.min(input.len())].chars().count() + 1,
        reason,
    };
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            out.push((Tok::Eof, i));
            return Ok(out);
        }
        let start = i;
        let rest = &b[i..];
        let after_label = matches!(out.last(), Some((Tok::Label(_), _)));
        let (tok, len) = match rest[0] {
            b'(' => (Tok::LParen, 1),
            b')' => (Tok::RParen, 1),
            b'{' => (Tok::LBrace, 1),
            b'}' => (Tok::RBrace, 1),
            b',' => (Tok::Comma, 1),
            q @ (b'"' | b'\'') => match rest[1..].iter().position(|c| *c == q) {
                Some(end) => (Tok::Str(input[i + 1..i + 1 + end].to_string()), end + 2),
                None => return Err(err(start, "unterminated string".into())),
            },
            b'=' if rest.get(1) == Some(&b'=') => (Tok::Eq, 2),
            b'=' => return Err(err(start, "expected \"==\"".into())),
            b'!' if rest.get(1) == Some(&b'=') => (Tok::Ne, 2),
            b'!' => (Tok::Not, 1),
            b'&' if rest.get(1) == Some(&b'&') => (Tok::And, 2),
            b'&' => return Err(err(start, "expected \"&&\"".into())),
            b'|' if rest.get(1) == Some(&b'|') => (Tok::Or, 2),
            b'|' => return Err(err(start, "expected \"||\"".into())),
            _ if after_label => operator_word(input, i).map_err(|r| err(start, r))?,
            _ => {
                if let Some((tok, len)) = function(input, i).map_err(|(at, r)| err(at, r))? {
                    (tok, len)
                } else {
                    let n = label_len(rest);
                    if n == 0 {
                        let c = input[i..].chars().next().unwrap_or(' ');
                        return Err(err(start, format!("unexpected character {c:?}")));
                    }
                    if n > MAX_LABEL {
                        return Err(err(
                            start,
                            format!("label is longer than {MAX_LABEL} characters"),
                        ));
                    }
                    (Tok::Label(input[i..i + n].to_string()), n)
                }
            }
        };
        out.push((tok, start));
        i += len;
    }
}

/// The operator after a label: `in`, `not in`, `contains`, `starts with`, `ends with`.
fn operator_word(input: &str, i: usize) -> Result<(Tok, usize), String> {
    let rest = &input[i..];
    let two = |first: &str, second: &str, tok: Tok| -> Option<(Tok, usize)> {
        let after = rest.strip_prefix(first)?;
        let trimmed = after.trim_start();
        let gap = after.len() - trimmed.len();
        trimmed
            .strip_prefix(second)
            .map(|_| (tok, first.len() + gap + second.len()))
    };
    if rest.starts_with("contains") {
        return Ok((Tok::Contains, "contains".len()));
    }
    for (first, second, tok) in [
        ("starts", "with", Tok::StartsWith),
        ("ends", "with", Tok::EndsWith),
        ("not", "in", Tok::NotIn),
    ] {
        if let Some(t) = two(first, second, tok) {
            return Ok(t);
        }
    }
    if rest.starts_with("in") {
        return Ok((Tok::In, 2));
    }
    Err("expected an operator (==, !=, in, not in, contains, starts with, ends with)".into())
}

/// `has(label)`, `all()`, `global()` at `i`, if one starts there.
fn function(input: &str, i: usize) -> Result<Option<(Tok, usize)>, (usize, String)> {
    let rest = &input[i..];
    for name in ["has(", "all(", "global("] {
        let Some(after) = rest.strip_prefix(name) else {
            continue;
        };
        let inner = after.trim_start();
        let mut used = name.len() + (after.len() - inner.len());
        let tok = if name == "has(" {
            let n = label_len(inner.as_bytes());
            if n == 0 {
                return Err((i + used, "no label name in has(".into()));
            }
            used += n;
            Tok::Has(inner[..n].to_string())
        } else if name == "all(" {
            Tok::All
        } else {
            Tok::Global
        };
        let tail = &input[i + used..];
        let close = tail.trim_start();
        used += tail.len() - close.len();
        if !close.starts_with(')') {
            return Err((
                i + used,
                format!("expected \")\" to close {}", &name[..name.len() - 1]),
            ));
        }
        return Ok(Some((tok, used + 1)));
    }
    Ok(None)
}

struct Parser<'a> {
    input: &'a str,
    toks: Vec<(Tok, usize)>,
    at: usize,
}

/// Deeper nesting than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.at.min(self.toks.len() - 1)].0
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.at < self.toks.len() - 1 {
            self.at += 1;
        }
        t
    }

    fn error(&self, reason: impl Into<String>) -> ParseError {
        let offset = self.toks[self.at.min(self.toks.len() - 1)].1;
        ParseError {
            position: self.input[..offset.min(self.input.len())].chars().count() + 1,
            reason: reason.into(),
        }
    }

    fn or(&mut self, depth: usize) -> Result<Node, ParseError> {
        let mut terms = vec![self.and(depth)?];
        while *self.peek() == Tok::Or {
            self.next();
            terms.push(self.and(depth)?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Node::Or(terms)
        })
    }

    fn and(&mut self, depth: usize) -> Result<Node, ParseError> {
        let mut terms = vec![self.operation(depth)?];
        while *self.peek() == Tok::And {
            self.next();
            terms.push(self.operation(depth)?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Node::And(terms)
        })
    }

    fn operation(&mut self, depth: usize) -> Result<Node, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let mut negated = false;
        while *self.peek() == Tok::Not {
            self.next();
            negated = !negated;
        }
        let node = match self.peek().clone() {
            Tok::Has(l) => {
                self.next();
                Node::Has(l)
            }
            Tok::All => {
                self.next();
                Node::All
            }
            Tok::Global => {
                self.next();
                Node::Global
            }
            Tok::LParen => {
                self.next();
                let inner = self.or(depth + 1)?;
                if *self.peek() != Tok::RParen {
                    return Err(
                        self.error(format!("expected \")\", found {}", self.peek().describe()))
                    );
                }
                self.next();
                inner
            }
            Tok::Label(key) => {
                self.next();
                self.comparison(key)?
            }
            other => {
                return Err(self.error(format!(
                    "expected a label, has(), all(), global(), \"!\" or \"(\", found {}",
                    other.describe()
                )))
            }
        };
        Ok(if negated {
            Node::Not(Box::new(node))
        } else {
            node
        })
    }

    fn comparison(&mut self, key: String) -> Result<Node, ParseError> {
        let op = match self.peek() {
            Tok::Eq => Compare::Eq,
            Tok::Ne => Compare::Ne,
            Tok::Contains => Compare::Contains,
            Tok::StartsWith => Compare::StartsWith,
            Tok::EndsWith => Compare::EndsWith,
            Tok::In | Tok::NotIn => {
                let negated = *self.peek() == Tok::NotIn;
                self.next();
                return self.set(key, negated);
            }
            other => {
                return Err(self.error(format!(
                    "expected an operator after label {key:?}, found {}",
                    other.describe()
                )))
            }
        };
        self.next();
        match self.peek().clone() {
            Tok::Str(value) => {
                self.next();
                Ok(Node::Compare { key, op, value })
            }
            other => Err(self.error(format!(
                "expected a quoted string, found {}",
                other.describe()
            ))),
        }
    }

    fn set(&mut self, key: String, negated: bool) -> Result<Node, ParseError> {
        if *self.peek() != Tok::LBrace {
            return Err(self.error(format!(
                "expected \"{{\" to start a set, found {}",
                self.peek().describe()
            )));
        }
        self.next();
        let mut values = Vec::new();
        if let Tok::Str(_) = self.peek() {
            loop {
                match self.peek().clone() {
                    Tok::Str(v) => {
                        self.next();
                        values.push(v);
                    }
                    other => {
                        return Err(self.error(format!(
                            "expected a quoted string, found {}",
                            other.describe()
                        )));
                    }
                }
                if *self.peek() != Tok::Comma {
                    break;
                }
                self.next();
            }
        }
        if *self.peek() != Tok::RBrace {
            return Err(self.error(format!(
                "expected \"}}\" to close the set, found {}",
                self.peek().describe()
            )));
        }
        self.next();
        values.sort();
        values.dedup();
        Ok(Node::Set {
            key,
            negated,
            values,
        })
    }
}

/// Parses a selector expression. The empty expression is `all()`.
pub fn parse(input: &str) -> Result<Node, ParseError> {
    let toks = tokenize(input)?;
    if toks.len() == 1 {
        return Ok(Node::All);
    }
    let mut p = Parser { input, toks, at: 0 };
    let node = p.or(0)?;
    if *p.peek() != Tok::Eof {
        return Err(p.error(format!("unexpected {}", p.peek().describe())));
    }
    Ok(node)
}

impl Node {
    /// Whether `global()` appears anywhere.
    pub fn uses_global(&self) -> bool {
        match self {
            Node::Global => true,
            Node::Not(n) => n.uses_global(),
            Node::And(v) | Node::Or(v) => v.iter().any(Node::uses_global),
            _ => false,
        }
    }
}

/// What a selector's labels are: an endpoint's (pod labels and Calico's automatic labels),
/// a namespace's (`namespaceSelector`) or a service account's (`serviceAccountSelector`,
/// `serviceAccounts.selector`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Endpoint,
    Namespace,
    ServiceAccount,
}

/// The value every pod has under `projectcalico.org/orchestrator`.
const ORCHESTRATOR: &str = "k8s";

/// Where a Calico label lives on a pod identity.
enum Mapped {
    Label(Key),
    /// A label whose value is the same on every pod.
    Constant(&'static str),
}

fn k8s(name: impl Into<String>) -> Mapped {
    Mapped::Label(Key::new(Source::K8s, name))
}

fn namespace_label(key: &str) -> Mapped {
    let key = if key == "projectcalico.org/name" {
        well_known::NAMESPACE_NAME
    } else {
        key
    };
    k8s(format!("{}{key}", well_known::NAMESPACE_LABELS_PREFIX))
}

fn service_account_label(key: &str) -> Mapped {
    if key == "projectcalico.org/name" {
        return k8s(well_known::SERVICE_ACCOUNT);
    }
    k8s(format!(
        "{}{key}",
        well_known::SERVICE_ACCOUNT_LABELS_PREFIX
    ))
}

/// Calico's labels as Ward's pod identities carry them: `projectcalico.org/namespace` is
/// the pod namespace, `pcns.K` the namespace's label K, `pcsa.K` the service account's
/// label K, `projectcalico.org/serviceaccount` the service account's name.
fn map_key(scope: Scope, key: &str) -> Mapped {
    match scope {
        Scope::Namespace => namespace_label(key),
        Scope::ServiceAccount => service_account_label(key),
        Scope::Endpoint => match key {
            "projectcalico.org/namespace" => k8s(well_known::POD_NAMESPACE),
            "projectcalico.org/orchestrator" => Mapped::Constant(ORCHESTRATOR),
            "projectcalico.org/serviceaccount" => k8s(well_known::SERVICE_ACCOUNT),
            _ => {
                if let Some(k) = key.strip_prefix("pcns.") {
                    namespace_label(k)
                } else if let Some(k) = key.strip_prefix("pcsa.") {
                    service_account_label(k)
                } else {
                    k8s(key)
                }
            }
        },
    }
}

/// A boolean expression over requirements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Const(bool),
    Lit(Requirement),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

impl Expr {
    pub fn lit(key: Key, op: Op) -> Expr {
        Expr::Lit(Requirement { key, op })
    }

    /// Every pod (and only pods) carries its namespace.
    pub fn pod() -> Expr {
        Expr::lit(Key::new(Source::K8s, well_known::POD_NAMESPACE), Op::Exists)
    }

    pub fn negation(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    /// The expression over pod identity labels that `node` means in `scope`. `global()`
    /// (non-namespaced resources: host endpoints and network sets, which Ward does not
    /// have) matches no pod.
    pub fn from_node(node: &Node, scope: Scope) -> Expr {
        let lit = |key: &str, op: Op| match map_key(scope, key) {
            Mapped::Label(k) => Expr::lit(k, op),
            Mapped::Constant(v) => {
                let one = LabelSet::new(vec![Label::k8s(key, v)]);
                Expr::Const(
                    Requirement {
                        key: Key::new(Source::K8s, key),
                        op,
                    }
                    .matches(&one),
                )
            }
        };
        match node {
            Node::All => Expr::Const(true),
            Node::Global => Expr::Const(false),
            Node::Has(k) => lit(k, Op::Exists),
            Node::Compare { key, op, value } => {
                let v = value.clone();
                lit(
                    key,
                    match op {
                        Compare::Eq => Op::In(vec![v]),
                        Compare::Ne => Op::NotIn(vec![v]),
                        Compare::Contains => Op::Contains(v),
                        Compare::StartsWith => Op::StartsWith(v),
                        Compare::EndsWith => Op::EndsWith(v),
                    },
                )
            }
            Node::Set {
                key,
                negated,
                values,
            } => {
                if values.is_empty() {
                    // `k in {}` holds for nothing, `k not in {}` for everything.
                    return Expr::Const(*negated);
                }
                let op = Op::In(values.clone());
                lit(key, if *negated { op.negated() } else { op })
            }
            Node::Not(n) => Expr::negation(Expr::from_node(n, scope)),
            Node::And(v) => Expr::And(v.iter().map(|n| Expr::from_node(n, scope)).collect()),
            Node::Or(v) => Expr::Or(v.iter().map(|n| Expr::from_node(n, scope)).collect()),
        }
    }

    /// Disjunctive normal form as selectors (a union of conjunctions). `[]` selects
    /// nothing; `[Selector::all()]` everything. More than `limit` alternatives is an error.
    pub fn to_selectors(&self, limit: usize) -> Result<Vec<Selector>, String> {
        let terms = self.dnf(false, limit)?;
        let mut out: Vec<Selector> = Vec::new();
        for mut t in terms {
            t.sort();
            t.dedup();
            let contradiction = t
                .iter()
                .any(|r| t.iter().any(|s| s.key == r.key && s.op == r.op.negated()));
            if contradiction {
                continue;
            }
            let sel = Selector { requirements: t };
            if !out.contains(&sel) {
                out.push(sel);
            }
        }
        // A conjunction with no requirement selects everything and absorbs the others.
        if out.iter().any(Selector::is_all) {
            return Ok(vec![Selector::all()]);
        }
        Ok(out)
    }

    fn dnf(&self, negate: bool, limit: usize) -> Result<Vec<Vec<Requirement>>, String> {
        let too_many = || {
            format!(
                "the expression expands to more than {limit} alternatives (Ward matches a union of conjunctions); simplify it"
            )
        };
        Ok(match (self, negate) {
            (Expr::Const(b), n) => {
                if *b != n {
                    vec![Vec::new()]
                } else {
                    Vec::new()
                }
            }
            (Expr::Lit(r), false) => vec![vec![r.clone()]],
            (Expr::Lit(r), true) => vec![vec![Requirement {
                key: r.key.clone(),
                op: r.op.negated(),
            }]],
            (Expr::Not(e), n) => e.dnf(!n, limit)?,
            (Expr::Or(v), false) | (Expr::And(v), true) => {
                let mut out = Vec::new();
                for e in v {
                    out.extend(e.dnf(negate, limit)?);
                    if out.len() > limit {
                        return Err(too_many());
                    }
                }
                out
            }
            (Expr::And(v), false) | (Expr::Or(v), true) => {
                let mut out: Vec<Vec<Requirement>> = vec![Vec::new()];
                for e in v {
                    let d = e.dnf(negate, limit)?;
                    if out.len().saturating_mul(d.len()) > limit {
                        return Err(too_many());
                    }
                    let mut next = Vec::with_capacity(out.len() * d.len());
                    for a in &out {
                        for b in &d {
                            let mut t = a.clone();
                            t.extend(b.iter().cloned());
                            next.push(t);
                        }
                    }
                    out = next;
                }
                out
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(kv: &[(&str, &str)]) -> LabelSet {
        LabelSet::new(kv.iter().map(|(k, v)| Label::k8s(*k, *v)).collect())
    }

    fn matches(expr: &str, labels: &LabelSet) -> bool {
        let node = parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let sels = Expr::from_node(&node, Scope::Endpoint)
            .to_selectors(256)
            .expect("dnf");
        sels.iter().any(|s| s.matches(labels))
    }

    #[test]
    fn operators_follow_calicos_table() {
        let p = pod(&[("a", "prod-eu"), ("b", "x")]);
        let none = pod(&[]);
        assert!(matches("a == 'prod-eu'", &p));
        assert!(matches("a != 'x'", &p));
        assert!(matches("a != 'x'", &none), "!= matches an absent label");
        assert!(matches("a in {'x', 'prod-eu'}", &p));
        assert!(!matches("a in {'x'}", &p));
        assert!(
            matches("a not in {'x'}", &none),
            "not in matches an absent label"
        );
        assert!(!matches("a not in {'prod-eu'}", &p));
        assert!(matches("has(a)", &p));
        assert!(matches("!has(c)", &p));
        assert!(matches("a contains 'd-e'", &p));
        assert!(matches("a starts with 'prod'", &p));
        assert!(matches("a ends with '-eu'", &p));
        assert!(!matches("a ends with '-us'", &p));
        assert!(matches("all()", &none));
        assert!(matches("", &none));
        assert!(!matches("global()", &p));
        assert!(!matches("a in {}", &p));
        assert!(matches("a not in {}", &none));
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        // Calico's documented example: ((!has(l)) || ((l starts with 'prod') && (role in {..}))).
        let e = "! has(my-label) || my-label starts with 'prod' && role in {'frontend','business'}";
        assert!(matches(e, &pod(&[("role", "backend")])));
        assert!(matches(
            e,
            &pod(&[("my-label", "prod-1"), ("role", "frontend")])
        ));
        assert!(!matches(
            e,
            &pod(&[("my-label", "prod-1"), ("role", "backend")])
        ));
        let g =
            "(! has(my-label) || my-label starts with 'prod') && role in {'frontend','business'}";
        assert!(!matches(g, &pod(&[("role", "backend")])));
        assert!(matches(g, &pod(&[("role", "business")])));
        // from parser_test.go
        assert!(matches("!(!has(a) || has(b))", &pod(&[("a", "1")])));
        assert!(!matches(
            "!(!has(a) || has(b))",
            &pod(&[("a", "1"), ("b", "")])
        ));
        assert!(matches("a != 'a1' && !b == 'b1'", &pod(&[("b", "b2")])));
        assert!(matches("!!has(a)", &pod(&[("a", "")])));
    }

    #[test]
    fn both_quote_styles_and_label_characters() {
        let p = pod(&[("app.kubernetes.io/name", "x y"), ("k_1-2", "'")]);
        assert!(matches("app.kubernetes.io/name == \"x y\"", &p));
        assert!(matches("k_1-2 == \"'\"", &p));
        assert!(matches("k_1-2 in {\"'\", '\"'}", &p));
    }

    #[test]
    fn errors_name_the_position() {
        let err = |s: &str| parse(s).expect_err(s);
        let e = err("app = 'x'");
        assert_eq!(e.position, 5, "{e}");
        assert!(e.reason.contains("=="), "{e}");
        let e = err("app == x");
        assert_eq!(e.position, 8, "{e}");
        assert!(e.reason.contains("quoted string"), "{e}");
        let e = err("app == 'x");
        assert_eq!(e.position, 8, "{e}");
        assert!(e.reason.contains("unterminated"), "{e}");
        let e = err("(a == 'b'");
        assert_eq!(e.position, 10, "{e}");
        let e = err("a == 'b' b == 'c'");
        assert_eq!(e.position, 10, "{e}");
        let e = err("a in {'x' 'y'}");
        assert_eq!(e.position, 11, "{e}");
        let e = err("has(a");
        assert!(e.reason.contains("\")\""), "{e}");
        let e = err("a & b");
        assert_eq!(e.position, 3, "{e}");
        let e = err("a is 'x'");
        assert_eq!(e.position, 3, "{e}");
        let e = err("&& a == 'x'");
        assert_eq!(e.position, 1, "{e}");
        let e = err("é == 'x'");
        assert_eq!(e.position, 1, "{e}");
        assert_eq!(err("x == 'é' &").position, 10);
    }

    #[test]
    fn calicos_automatic_labels_map_onto_pod_identities() {
        let l = LabelSet::new(vec![
            Label::k8s(well_known::POD_NAMESPACE, "prod"),
            Label::k8s(format!("{}team", well_known::NAMESPACE_LABELS_PREFIX), "a"),
            Label::k8s(
                format!(
                    "{}{}",
                    well_known::NAMESPACE_LABELS_PREFIX,
                    well_known::NAMESPACE_NAME
                ),
                "prod",
            ),
            Label::k8s(well_known::SERVICE_ACCOUNT, "api"),
            Label::k8s(
                format!("{}tier", well_known::SERVICE_ACCOUNT_LABELS_PREFIX),
                "gold",
            ),
        ]);
        for e in [
            "projectcalico.org/namespace == 'prod'",
            "projectcalico.org/orchestrator == 'k8s'",
            "has(projectcalico.org/orchestrator)",
            "projectcalico.org/serviceaccount == 'api'",
            "pcns.team == 'a'",
            "pcns.projectcalico.org/name == 'prod'",
            "pcsa.tier == 'gold'",
            "pcsa.projectcalico.org/name == 'api'",
        ] {
            assert!(matches(e, &l), "{e}");
        }
        assert!(!matches(
            "projectcalico.org/orchestrator == 'openstack'",
            &l
        ));
        let ns = |e: &str| {
            Expr::from_node(&parse(e).unwrap(), Scope::Namespace)
                .to_selectors(8)
                .unwrap()
                .iter()
                .any(|s| s.matches(&l))
        };
        assert!(ns("projectcalico.org/name == 'prod'"));
        assert!(ns("team == 'a'"));
        assert!(!ns("global()"));
        let sa = |e: &str| {
            Expr::from_node(&parse(e).unwrap(), Scope::ServiceAccount)
                .to_selectors(8)
                .unwrap()
                .iter()
                .any(|s| s.matches(&l))
        };
        assert!(sa("tier == 'gold'"));
        assert!(sa("projectcalico.org/name == 'api'"));
    }

    #[test]
    fn normal_form_is_bounded_and_drops_contradictions() {
        let e = Expr::from_node(&parse("has(a) && !has(a)").unwrap(), Scope::Endpoint);
        assert_eq!(e.to_selectors(8).unwrap(), Vec::<Selector>::new());
        let e = Expr::from_node(&parse("has(a) || all()").unwrap(), Scope::Endpoint);
        assert_eq!(e.to_selectors(8).unwrap(), vec![Selector::all()]);
        let wide = "(a == '1' || a == '2') && (b == '1' || b == '2') && (c == '1' || c == '2') && (d == '1' || d == '2')";
        let e = Expr::from_node(&parse(wide).unwrap(), Scope::Endpoint);
        assert_eq!(e.to_selectors(16).unwrap().len(), 16);
        assert!(e.to_selectors(15).unwrap_err().contains("more than 15"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}has(a){}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse(&deep).unwrap_err().reason.contains("nested"));
    }
}
