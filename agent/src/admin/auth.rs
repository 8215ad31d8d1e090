//! The admin listener's token (`ward agent --admin-token-file`): who may read `/v1/*`
//! and `/ui/*`. Flows and policies are what the token guards; `/healthz`, `/readyz` and
//! `/metrics` stay open for kubelet probes and Prometheus scrapes (metrics carry no
//! flows). A request shows the token as `Authorization: Bearer TOKEN` (`ward status`,
//! `ward observe`, `ward policy show`, curl) or as the cookie `ward_admin_token` (a
//! browser, which gets the cookie by opening `/ui/?token=TOKEN` once).

use std::fmt;
use std::path::{Path, PathBuf};

use http::HeaderMap;
use subtle::ConstantTimeEq;

/// The cookie a browser keeps the token in.
pub const COOKIE: &str = "ward_admin_token";

/// Paths that need no token: health, readiness and metrics.
const OPEN: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The shared secret of the admin listener, read once at start.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token file {path}: {reason}")]
    Invalid { path: PathBuf, reason: &'static str },
}

impl Token {
    /// The token in `path`, without surrounding whitespace. An unreadable or empty file is
    /// an error, never an open listener.
    pub fn read(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Token::parse(&text).map_err(|reason| TokenError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// A token from text: trimmed, not empty, and only characters a Bearer header and a
    /// cookie carry unquoted (RFC 6750 token68).
    pub fn parse(text: &str) -> Result<Token, &'static str> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty (write a token into it, e.g. `openssl rand -hex 32`)");
        }
        let token68 = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        if !t.chars().all(token68) {
            return Err(
                "the token may hold only letters, digits and -._~+/= (e.g. `openssl rand -hex 32`)",
            );
        }
        Ok(Token(t.to_string()))
    }

    /// The token, for a client's `Authorization` header.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is the token, in time that does not depend on where they differ.
    fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What the token check makes of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// Served as asked: no token configured, an open path, or the right token.
    Granted,
    /// A browser's `/ui/...?token=TOKEN` with the right token: 303 to `location` (the
    /// same path, the other query parameters kept) with the cookie set.
    Login { location: String },
    /// No token, or a wrong one: 401.
    Denied,
}

/// The decision for a request to `path?query` with `headers`.
pub fn check(token: Option<&Token>, path: &str, query: &str, headers: &HeaderMap) -> Access {
    let Some(token) = token else {
        return Access::Granted;
    };
    if OPEN.contains(&path) {
        return Access::Granted;
    }
    let is_ui = path == "/ui" || path.starts_with("/ui/");
    if is_ui && !query.is_empty() {
        if let Some(given) = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
        {
            if !token.matches(&given) {
                return Access::Denied;
            }
            let rest: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| k != "token")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let mut location = if path == "/ui" { "/ui/" } else { path }.to_string();
            if !rest.is_empty() {
                location.push('?');
                location.push_str(
                    &form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(rest)
                        .finish(),
                );
            }
            return Access::Login { location };
        }
    }
    if bearer(headers).any(|t| token.matches(t)) || cookies(headers).any(|t| token.matches(t)) {
        Access::Granted
    } else {
        Access::Denied
    }
}

/// The `Set-Cookie` value that keeps `token` in the browser, for every path of this
/// listener (the page's requests to `/v1/*` carry it), never to scripts or other sites.
pub fn set_cookie(token: &Token) -> String {
    format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", token.0)
}

/// The tokens of `Authorization: Bearer TOKEN` headers.
fn bearer(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, t) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
        })
}

/// The values of `ward_admin_token` cookies.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    fn token() -> Token {
        Token::parse(" s3cret-T0ken\n").unwrap()
    }

    #[test]
    fn without_a_token_everything_is_served() {
        for p in ["/v1/status", "/ui/", "/metrics"] {
            assert_eq!(
                check(None, p, "", &HeaderMap::new()),
                Access::Granted,
                "{p}"
            );
        }
    }

    #[test]
    fn health_readiness_and_metrics_stay_open() {
        let t = token();
        for p in OPEN {
            assert_eq!(check(Some(&t), p, "", &HeaderMap::new()), Access::Granted);
        }
        // everything else is guarded, also paths that would be 404
        for p in [
            "/v1/status",
            "/v1/events",
            "/v1/policy/app/web",
            "/ui",
            "/ui/",
            "/ui/app.js",
            "/v1",
            "/nope",
            "/metricsx",
        ] {
            assert_eq!(
                check(Some(&t), p, "", &HeaderMap::new()),
                Access::Denied,
                "{p}"
            );
        }
    }

    #[test]
    fn a_bearer_header_or_the_cookie_grants_and_a_wrong_token_does_not() {
        let t = token();
        let ok =
            |h: &[(&'static str, &'static str)]| check(Some(&t), "/v1/status", "", &headers(h));
        assert_eq!(
            ok(&[("authorization", "Bearer s3cret-T0ken")]),
            Access::Granted
        );
        assert_eq!(
            ok(&[("authorization", "bearer  s3cret-T0ken")]),
            Access::Granted
        );
        assert_eq!(
            ok(&[("cookie", "a=b; ward_admin_token=s3cret-T0ken; c=d")]),
            Access::Granted
        );
        assert_eq!(
            ok(&[
                ("cookie", "a=b"),
                ("cookie", "ward_admin_token=s3cret-T0ken")
            ]),
            Access::Granted
        );
        assert_eq!(
            ok(&[("authorization", "Bearer s3cret-T0kem")]),
            Access::Denied
        );
        assert_eq!(
            ok(&[("authorization", "Bearer s3cret-T0ke")]),
            Access::Denied
        );
        assert_eq!(
            ok(&[("authorization", "Basic s3cret-T0ken")]),
            Access::Denied
        );
        assert_eq!(ok(&[("authorization", "s3cret-T0ken")]), Access::Denied);
        assert_eq!(ok(&[("cookie", "other=s3cret-T0ken")]), Access::Denied);
        assert_eq!(ok(&[("cookie", "ward_admin_token=")]), Access::Denied);
        // a token in the query is for the browser's first visit to /ui/ only
        assert_eq!(
            check(
                Some(&t),
                "/v1/status",
                "token=s3cret-T0ken",
                &HeaderMap::new()
            ),
            Access::Denied
        );
    }

    #[test]
    fn the_ui_token_in_the_query_becomes_a_cookie_and_a_303() {
        let t = token();
        let none = HeaderMap::new();
        assert_eq!(
            check(Some(&t), "/ui/", "token=s3cret-T0ken", &none),
            Access::Login {
                location: "/ui/".into()
            }
        );
        assert_eq!(
            check(
                Some(&t),
                "/ui",
                "pod=app%2Fweb&token=s3cret-T0ken&verdict=DROPPED",
                &none
            ),
            Access::Login {
                location: "/ui/?pod=app%2Fweb&verdict=DROPPED".into()
            }
        );
        assert_eq!(
            check(Some(&t), "/ui/", "token=wrong", &none),
            Access::Denied
        );
        assert_eq!(check(Some(&t), "/ui/", "pod=x", &none), Access::Denied);
        assert_eq!(
            set_cookie(&t),
            "ward_admin_token=s3cret-T0ken; Path=/; HttpOnly; SameSite=Strict"
        );
    }

    #[test]
    fn a_token_file_is_trimmed_and_an_empty_or_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  abc123\n\n").unwrap();
        assert_eq!(Token::read(&f).unwrap().as_str(), "abc123");
        std::fs::write(&f, " \n").unwrap();
        let e = Token::read(&f).unwrap_err().to_string();
        assert!(
            e.contains(&f.display().to_string()) && e.contains("empty"),
            "{e}"
        );
        std::fs::write(&f, "two words").unwrap();
        let e = Token::read(&f).unwrap_err().to_string();
        assert!(e.contains("only letters"), "{e}");
        let gone = dir.path().join("gone");
        let e = Token::read(&gone).unwrap_err().to_string();
        assert!(
            e.contains(&gone.display().to_string()) && e.contains("No such file"),
            "{e}"
        );
        assert_eq!(format!("{:?}", token()), "Token(..)", "never logged");
    }
}
