//! DNS names and patterns as Cilium matches them (`matchName`, `matchPattern`): lower-cased,
//! fully qualified with a trailing dot, `*` within one label, a leading `**.` for one or
//! more labels.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use regex::Regex;

const LABEL_CHARS: &str = "[-a-zA-Z0-9_]";
const MAX_LEN: usize = 255;

/// Lower-cases a name and gives it its trailing dot: `WWW.Example.com` -> `www.example.com.`.
pub fn normalize(name: &str) -> String {
    let mut n = name.trim().to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

/// [`normalize`] without a copy when `name` already is normalised (lower case, trailing
/// dot, no surrounding space): the per-query path hands over names normalised once.
pub fn normalized(name: &str) -> Cow<'_, str> {
    let is_normal = name.ends_with('.')
        && !name.bytes().any(|b| b.is_ascii_uppercase())
        && name.trim().len() == name.len();
    if is_normal {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(normalize(name))
    }
}

/// A compiled `matchName` or `matchPattern`.
#[derive(Clone)]
pub struct NamePattern {
    /// The normalised source text (`matchPattern` keeps its `*`).
    pub text: String,
    pub is_pattern: bool,
    /// None for a `matchName` or a `matchPattern` without `*`, which match their
    /// normalised text exactly; else shared with every other pattern of the same text
    /// (`shared_regex`). A compiled regex holds kilobytes, and a node's policies may name
    /// thousands of names (the model indexes every toFQDNs name as a pattern).
    regex: Option<Arc<Regex>>,
}

impl PartialEq for NamePattern {
    fn eq(&self, other: &NamePattern) -> bool {
        self.text == other.text && self.is_pattern == other.is_pattern
    }
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.is_pattern {
            "matchPattern"
        } else {
            "matchName"
        };
        write!(f, "{field}: {}", self.text)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl NamePattern {
    /// A `matchName`: letters, digits, `-`, `_` and `.`, at most 255 characters.
    pub fn name(name: &str) -> Result<NamePattern, String> {
        check_chars(name, false)?;
        let text = normalize(name);
        if text == "." && !name.trim().is_empty() && name.trim() != "." {
            return Err("a name needs at least one label".into());
        }
        if name.trim().is_empty() {
            return Err("empty name".into());
        }
        Ok(NamePattern {
            text,
            is_pattern: false,
            regex: None,
        })
    }

    /// A `matchPattern`: like a name, plus `*` (any characters of one label, possibly
    /// none) and a leading `**.` (one or more whole labels). `*` alone matches every name.
    pub fn pattern(pattern: &str) -> Result<NamePattern, String> {
        check_chars(pattern, true)?;
        if pattern.trim().is_empty() {
            return Err("empty pattern".into());
        }
        let text = normalize(pattern);
        if !text.contains('*') {
            return Ok(NamePattern {
                text,
                is_pattern: true,
                regex: None,
            });
        }
        let re = if matches!(text.as_str(), "*." | "**.") {
            format!(r"^(?:(?:{LABEL_CHARS}+[.])+|[.])$")
        } else {
            let (prefix, rest) = match text.strip_prefix("**.") {
                Some(rest) => (format!(r"{LABEL_CHARS}+(?:[.]{LABEL_CHARS}+)*[.]"), rest),
                None => (String::new(), text.as_str()),
            };
            if rest.contains("**") {
                return Err("`**` is only allowed as a leading `**.`".into());
            }
            let body = rest
                .replace('.', "[.]")
                .replace('*', &format!("{LABEL_CHARS}*"));
            format!("^{prefix}{body}$")
        };
        let regex = crate::shared_regex::shared("dns-pattern", &re, || Regex::new(&re))
            .map_err(|e| e.to_string())?;
        Ok(NamePattern {
            text,
            is_pattern: true,
            regex: Some(regex),
        })
    }

    /// Whether a name (in any case, with or without trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        self.matches_normalized(&normalized(name))
    }

    /// Whether an already normalised name matches (the per-query fast path).
    pub fn matches_normalized(&self, name: &str) -> bool {
        match &self.regex {
            Some(regex) => regex.is_match(name),
            None => name == self.text,
        }
    }
}

/// The toFQDNs patterns of a model, indexed so that the ones a name matches are found
/// with a few hash lookups instead of one regex per pattern: a node with thousands of
/// toFQDNs names looks them up for every DNS answer and every cached name.
///
/// A name without `*` is found by its text. A pattern with `*` ends in a fixed tail, the
/// labels after its last label with a `*` (`*.api.example.com.` -> `api.example.com.`,
/// `*.` -> ``): every name it matches ends in `.` + that tail, so a name is checked only
/// against the patterns whose tail is one of its own suffixes.
#[derive(Clone, Debug, Default)]
pub struct FqdnPatterns {
    /// (the pattern as the policies spell it, compiled), in the model's order.
    list: Vec<(String, NamePattern)>,
    /// Normalised text of the patterns without `*` -> their indices.
    exact: HashMap<String, Vec<usize>>,
    /// Fixed tail of the patterns with `*` -> their indices.
    by_tail: HashMap<String, Vec<usize>>,
}

impl FqdnPatterns {
    pub fn new(list: Vec<(String, NamePattern)>) -> FqdnPatterns {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_tail: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, (_, p)) in list.iter().enumerate() {
            match wildcard_tail(&p.text) {
                Some(tail) => by_tail.entry(tail.to_string()).or_default().push(i),
                None => exact.entry(p.text.clone()).or_default().push(i),
            }
        }
        FqdnPatterns {
            list,
            exact,
            by_tail,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Pattern `i`: (as the policies spell it, compiled).
    pub fn get(&self, i: usize) -> Option<&(String, NamePattern)> {
        self.list.get(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, NamePattern)> {
        self.list.iter()
    }

    /// Indices of the patterns a name (in any case, with or without trailing dot)
    /// matches, ascending.
    pub fn matching(&self, name: &str) -> Vec<usize> {
        let name = normalized(name);
        let mut out: Vec<usize> = self.exact.get(name.as_ref()).cloned().unwrap_or_default();
        let tails = name
            .char_indices()
            .filter(|&(_, c)| c == '.')
            .map(|(at, _)| &name[at + 1..]);
        for tail in tails {
            if let Some(candidates) = self.by_tail.get(tail) {
                out.extend(
                    candidates
                        .iter()
                        .filter(|&&i| self.list[i].1.matches_normalized(&name)),
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl PartialEq for FqdnPatterns {
    fn eq(&self, other: &FqdnPatterns) -> bool {
        self.list == other.list
    }
}

/// The fixed tail of a pattern with `*` (see [`FqdnPatterns`]); None without `*`.
fn wildcard_tail(text: &str) -> Option<&str> {
    let star = text.rfind('*')?;
    Some(match text[star..].find('.') {
        Some(dot) => &text[star + dot + 1..],
        None => "",
    })
}

fn check_chars(s: &str, star: bool) -> Result<(), String> {
    if s.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} characters"));
    }
    if let Some(c) = s.trim().chars().find(|&c| {
        !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || (star && c == '*'))
    }) {
        let allowed = if star {
            r#"letters, digits, "-", "_", "." and "*""#
        } else {
            r#"letters, digits, "-", "_" and ".""#
        };
        return Err(format!("character {c:?} is not allowed (only {allowed})"));
    }
    if s.trim().contains("..") {
        return Err("empty label (\"..\")".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_borrows_only_what_needs_no_change() {
        for name in ["www.example.com.", "a-b_c.example.", ".", "*.x."] {
            assert!(matches!(normalized(name), Cow::Borrowed(_)), "{name}");
            assert_eq!(normalized(name), normalize(name));
        }
        for name in [
            "WWW.example.com.",
            "www.example.com",
            " www.example.com. ",
            "",
        ] {
            assert!(matches!(normalized(name), Cow::Owned(_)), "{name}");
            assert_eq!(normalized(name), normalize(name));
        }
    }

    fn pat(p: &str) -> NamePattern {
        NamePattern::pattern(p).unwrap()
    }

    /// A `matchName`, or a `matchPattern` without `*`, is its normalised text, compared as
    /// it is: no regex is compiled for it (thousands of names would hold kilobytes each),
    /// and its dots match only dots.
    #[test]
    fn a_name_without_star_is_compared_not_compiled() {
        let name = NamePattern::name("Api-1.Example_x.com").unwrap();
        assert!(name.regex.is_none());
        assert!(name.matches("api-1.example_x.com."));
        assert!(name.matches_normalized("api-1.example_x.com."));
        for other in [
            "api-1xexample_x.com.",
            "api-1.example_x.com.x.",
            "pi-1.example_x.com.",
        ] {
            assert!(!name.matches(other), "{other}");
        }
        assert!(pat("*.example.com").regex.is_some());
        // a pattern without `*` is a name
        let exact = pat("Api-1.Example_x.com");
        assert!(exact.regex.is_none());
        assert!(exact.matches("api-1.example_x.com"));
        assert!(!exact.matches("api-1xexample_x.com"));
    }

    /// The table of reference section 3.1, row by row.
    #[test]
    fn reference_table() {
        let name = NamePattern::name("example.com").unwrap();
        assert!(name.matches("example.com."));
        assert!(name.matches("EXAMPLE.com"));
        assert!(!name.matches("a.example.com"));

        let p = pat("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));

        let p = pat("*example.com");
        for n in ["example.com", "subexample.com", "sub-example.com"] {
            assert!(p.matches(n), "{n}");
        }
        assert!(!p.matches("www.example.com"));

        let p = pat("sub*.example.com");
        assert!(p.matches("sub.example.com"));
        assert!(p.matches("subdomain.example.com"));
        assert!(!p.matches("www.example.com"));

        let p = pat("part*ial.com");
        assert!(p.matches("partial.com"));
        assert!(p.matches("part-extra-ial.com"));
        assert!(!p.matches("apartial.com"));

        let p = pat("**.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));

        for all in ["*", "**", "*."] {
            let p = pat(all);
            assert!(p.matches("anything.example.com"), "{all}");
            assert!(p.matches("."), "{all} matches the root");
        }
    }

    /// The index finds exactly what one regex per pattern finds, for every kind of
    /// pattern and names that match none, one or several.
    #[test]
    fn the_index_finds_what_every_pattern_would() {
        let texts = [
            "example.com",
            "EXAMPLE.com.",
            "*.example.com",
            "*example.com",
            "sub*.example.com",
            "part*ial.com",
            "**.example.com",
            "*",
            "**",
            "*.",
            "a*.b*.example.com",
            "*.*.io",
            "x.*.io",
            "api.saas.example",
            "*.saas.example",
            "**.saas.example",
            "s*",
        ];
        let list: Vec<(String, NamePattern)> =
            texts.iter().map(|t| (t.to_string(), pat(t))).collect();
        let index = FqdnPatterns::new(list.clone());
        let names = [
            ".",
            "example.com",
            "Example.COM.",
            "a.example.com",
            "a.b.example.com",
            "subexample.com",
            "sub.example.com",
            "partial.com",
            "part-x-ial.com",
            "com",
            "aa.bb.example.com",
            "a.b.io",
            "x.y.io",
            "api.saas.example",
            "v1.api.saas.example",
            "s",
            "s.",
            "other.org",
            "example.com.evil.org",
        ];
        for name in names {
            let every: Vec<usize> = list
                .iter()
                .enumerate()
                .filter(|(_, (_, p))| p.matches(name))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(index.matching(name), every, "{name}");
        }
        // the catch-alls (`*`, `**`, `*.`) and nothing else
        assert_eq!(index.matching("other.org"), vec![7, 8, 9]);
        assert_eq!(
            wildcard_tail("*.api.example.com."),
            Some("api.example.com.")
        );
        assert_eq!(wildcard_tail("**."), Some(""));
        assert_eq!(wildcard_tail("example.com."), None);
    }

    #[test]
    fn case_and_trailing_dot_do_not_matter() {
        assert!(NamePattern::name("API.Example.COM")
            .unwrap()
            .matches("api.example.com."));
        assert!(NamePattern::name("www.example.org.")
            .unwrap()
            .matches("WWW.EXAMPLE.ORG"));
        assert!(pat("*.Example.NET").matches("web.example.net."));
    }

    #[test]
    fn star_never_crosses_a_label() {
        assert!(!pat("*.cilium.io").matches("a.b.cilium.io"));
        assert!(!pat("a*.io").matches("a.b.io"));
    }

    #[test]
    fn invalid_characters_are_rejected() {
        assert!(NamePattern::name("exa*mple.com").is_err());
        assert!(NamePattern::name("exa mple.com").is_err());
        assert!(NamePattern::pattern("[a-z].com").is_err());
        assert!(NamePattern::pattern("a+.com").is_err());
        assert!(NamePattern::name(&"a".repeat(256)).is_err());
        assert!(NamePattern::name("").is_err());
        assert!(NamePattern::pattern("a.**.com").is_err());
    }
}
