//! DNS names and patterns as Cilium matches them (`matchName`, `matchPattern`): lower-cased,
//! fully qualified with a trailing dot, `*` within one label, a leading `**.` for one or
//! more labels.

use std::borrow::Cow;
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
    /// Shared with every other pattern of the same text (`shared_regex`).
    regex: Arc<Regex>,
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
        let regex = crate::shared_regex::shared("dns-name", &text, || {
            Regex::new(&format!("^{}$", regex::escape(&text)))
        })
        .map_err(|e| e.to_string())?;
        Ok(NamePattern {
            text,
            is_pattern: false,
            regex,
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
            regex,
        })
    }

    /// Whether a name (in any case, with or without trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        self.matches_normalized(&normalized(name))
    }

    /// Whether an already normalised name matches (the per-query fast path).
    pub fn matches_normalized(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
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
