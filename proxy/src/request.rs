//! One request representation: a request is parsed and normalised once, in place, into
//! the form that goes upstream, and the policy decides on exactly that form. What could
//! make the upstream read a request differently than the decision saw it is either
//! rewritten to one meaning or refused (400):
//!
//! - authority: from an absolute-form target (HTTP/1.1; the Host header is replaced by
//!   it, RFC 9112 section 3.2.2) or `:authority` (HTTP/2; a `host` header must name the
//!   same authority and is then folded into it, RFC 9113 section 8.3.1); the syntax is
//!   validated (no userinfo, path, whitespace or empty host);
//! - hop-by-hop headers: the fixed set and whatever `Connection` names, removed before
//!   the decision; a `Connection` option that names an end-to-end header a rule of the
//!   connection uses, or one of [`PROTECTED`], is refused;
//! - upgrades: only WebSocket passes (as `Connection: upgrade`, `Upgrade: websocket`),
//!   every other upgrade offer (h2c included) is removed and the request served as a
//!   plain request, as Envoy does;
//! - header names with `_` are refused or dropped ([`Underscores`]);
//! - `Content-Length`: one field of digits, forwarded in canonical form;
//! - the path: normalised ([`crate::normalize`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri, Version};
use serde::Deserialize;
use std::borrow::Cow;

use crate::normalize::{normalize, Backslash, PathError};

/// What to do with a header whose name contains `_` (config key
/// `headers_with_underscores`). Some servers (CGI, WSGI, PHP) read `_` and `-` alike, so
/// `Transfer_Encoding` or `X_User` could mean to them what the policy never saw.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Underscores {
    /// 400 (the default; Envoy's `REJECT_REQUEST`).
    #[default]
    Reject,
    /// Removed before the decision (nginx's default, Envoy's `DROP_HEADER`).
    Drop,
}

/// How requests are normalised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub backslash: Backslash,
    pub underscores: Underscores,
}

/// End-to-end headers no `Connection` option may name, whatever the rules: removing
/// them changes what the request means to any server.
pub const PROTECTED: [HeaderName; 9] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::TRANSFER_ENCODING,
    header::AUTHORIZATION,
    header::COOKIE,
    header::ORIGIN,
];

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Why a request is refused before the decision (answered 400, never forwarded).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("HTTP/1.1 request without Host")]
    NoHost,
    #[error("more than one Host header")]
    TwoHosts,
    #[error("HTTP/2 request without :authority or host")]
    NoAuthority,
    #[error("host header {host:?} differs from :authority {authority:?}")]
    HostDiffers { host: String, authority: String },
    #[error("invalid authority {0:?}")]
    Authority(String),
    #[error("absolute-form target with scheme {0:?}")]
    Scheme(String),
    #[error("CONNECT is not proxied")]
    Connect,
    #[error("header name {0:?} contains '_'")]
    Underscore(String),
    #[error("invalid Connection header")]
    ConnectionSyntax,
    #[error("Connection names {0:?}, an end-to-end header the policy relies on")]
    ConnectionNames(String),
    #[error("Content-Length {0:?} is not one decimal number")]
    ContentLength(String),
    #[error("invalid request target")]
    Target,
}

/// What the normalised request is, beyond its method, URI and headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// A WebSocket upgrade (HTTP/1.1 GET): forwarded with `Connection: upgrade` and
    /// `Upgrade: websocket`, and tunnelled after a 101 that switches to `websocket`.
    pub websocket: bool,
}

/// Normalises `req` in place into the form that is decided on and forwarded: for
/// HTTP/1.x an origin-form target and a Host header holding the authority; for HTTP/2
/// an absolute URI whose authority is `:authority` and no `host` header.
/// `rule_headers` are the (lower-case) header names the connection's rules use.
pub fn prepare<B>(
    req: &mut Request<B>,
    h2: bool,
    opts: &Options,
    rule_headers: &[HeaderName],
) -> Result<Prepared, Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    underscores(req.headers_mut(), opts.underscores)?;
    let websocket = hop_by_hop(req, h2, rule_headers)?;
    content_length(req.headers_mut())?;
    let authority = if h2 {
        h2_authority(req)?
    } else {
        h1_authority(req)?;
        None
    };
    let raw = match req.uri().path_and_query() {
        Some(p) => p.clone(),
        None => PathAndQuery::from_static("/"),
    };
    let path = match normalize(raw.as_str(), opts.backslash)? {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(PathAndQuery::try_from(p).map_err(|_| Refusal::Target)?),
    };
    let uri = req.uri();
    if h2 {
        let scheme_ok = uri.scheme() == Some(&Scheme::HTTP);
        if path.is_some() || authority.is_some() || !scheme_ok {
            let auth = match authority {
                Some(a) => a,
                None => uri.authority().cloned().ok_or(Refusal::NoAuthority)?,
            };
            *req.uri_mut() = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(auth)
                .path_and_query(path.unwrap_or(raw))
                .build()
                .map_err(|_| Refusal::Target)?;
        }
    } else if path.is_some() || uri.scheme().is_some() || uri.authority().is_some() {
        *req.uri_mut() = Uri::from(path.unwrap_or(raw));
    }
    Ok(Prepared { websocket })
}

fn underscores(h: &mut HeaderMap, how: Underscores) -> Result<(), Refusal> {
    let has = |n: &HeaderName| n.as_str().as_bytes().contains(&b'_');
    let Some(first) = h.keys().find(|n| has(n)) else {
        return Ok(());
    };
    match how {
        Underscores::Reject => Err(Refusal::Underscore(first.as_str().to_string())),
        Underscores::Drop => {
            let names: Vec<HeaderName> = h.keys().filter(|n| has(n)).cloned().collect();
            for n in names {
                h.remove(n);
            }
            Ok(())
        }
    }
}

/// Removes the hop-by-hop headers (the fixed set and what `Connection` names); returns
/// whether the request is a WebSocket upgrade, which keeps `Connection: upgrade` and
/// `Upgrade: websocket`.
fn hop_by_hop<B>(
    req: &mut Request<B>,
    h2: bool,
    rule_headers: &[HeaderName],
) -> Result<bool, Refusal> {
    let may_upgrade = !h2 && req.method() == Method::GET && req.version() == Version::HTTP_11;
    let h = req.headers_mut();
    let mut upgrade_option = false;
    if h.contains_key(header::CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            let v = v.to_str().map_err(|_| Refusal::ConnectionSyntax)?;
            for t in v.split(',') {
                let t = t.trim_matches([' ', '\t']);
                if t.is_empty() {
                    continue;
                }
                let name =
                    HeaderName::from_bytes(t.as_bytes()).map_err(|_| Refusal::ConnectionSyntax)?;
                if name == header::UPGRADE {
                    upgrade_option = true;
                } else if PROTECTED.contains(&name) || rule_headers.contains(&name) {
                    return Err(Refusal::ConnectionNames(t.to_string()));
                } else {
                    named.push(name);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    let websocket = may_upgrade
        && upgrade_option
        && h.get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.trim_matches([' ', '\t'])
                    .eq_ignore_ascii_case("websocket")
            });
    let te_trailers = h
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim_matches([' ', '\t'])
                .eq_ignore_ascii_case("trailers")
        });
    for n in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        HTTP2_SETTINGS,
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if websocket {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(websocket)
}

/// One Content-Length field of decimal digits, forwarded without leading zeros.
fn content_length(h: &mut HeaderMap) -> Result<(), Refusal> {
    let mut values = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(v) = values.next() else {
        return Ok(());
    };
    let refuse = || Refusal::ContentLength(String::from_utf8_lossy(v.as_bytes()).into_owned());
    if values.next().is_some() {
        return Err(refuse());
    }
    let b = v.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Err(refuse());
    }
    if b.len() > 1 && b[0] == b'0' {
        let n: u64 = v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(refuse)?;
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(())
}

/// HTTP/1.x: exactly one valid Host (HTTP/1.0 may have none); an absolute-form target's
/// authority replaces it: the authority lives in the Host header.
fn h1_authority<B>(req: &mut Request<B>) -> Result<(), Refusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::TwoHosts);
    }
    if host.is_none() && req.version() != Version::HTTP_10 && req.version() != Version::HTTP_09 {
        return Err(Refusal::NoHost);
    }
    if let Some(target) = req.uri().authority() {
        if !valid_authority(target.as_str().as_bytes()) {
            return Err(Refusal::Authority(target.as_str().to_string()));
        }
        match req.uri().scheme_str() {
            Some("http" | "https") => {}
            other => return Err(Refusal::Scheme(other.unwrap_or("").to_string())),
        }
        let v = HeaderValue::from_str(target.as_str())
            .map_err(|_| Refusal::Authority(target.as_str().to_string()))?;
        req.headers_mut().insert(header::HOST, v);
    } else if let Some(h) = host {
        if !valid_authority(h.as_bytes()) {
            return Err(Refusal::Authority(
                String::from_utf8_lossy(h.as_bytes()).into_owned(),
            ));
        }
    }
    Ok(())
}

/// HTTP/2: `:authority`, or a single `host` header when there is none; a `host` beside
/// `:authority` must name the same authority (ASCII case aside) and is removed. Returns
/// the authority when it came from `host` (the URI must be rebuilt with it).
fn h2_authority<B>(req: &mut Request<B>) -> Result<Option<Authority>, Refusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(Refusal::TwoHosts);
    }
    let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let from_host = match (req.uri().authority(), &host) {
        (Some(a), Some(h)) => {
            if !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) {
                return Err(Refusal::HostDiffers {
                    host: text(h),
                    authority: a.as_str().to_string(),
                });
            }
            None
        }
        (None, Some(h)) => {
            if !valid_authority(h.as_bytes()) {
                return Err(Refusal::Authority(text(h)));
            }
            Some(Authority::try_from(h.as_bytes()).map_err(|_| Refusal::Authority(text(h)))?)
        }
        (None, None) => return Err(Refusal::NoAuthority),
        (Some(_), None) => None,
    };
    if let Some(a) = req.uri().authority() {
        if !valid_authority(a.as_str().as_bytes()) {
            return Err(Refusal::Authority(a.as_str().to_string()));
        }
    }
    if host.is_some() {
        req.headers_mut().remove(header::HOST);
    }
    Ok(from_host)
}

/// `host [":" port]`: host a name of letters, digits and `-._~` or an IP literal in
/// brackets; port 1 to 5 digits up to 65535. No userinfo, path, query, whitespace or
/// percent-encoding, and never empty.
pub fn valid_authority(s: &[u8]) -> bool {
    let (host_ok, port) = if s.first() == Some(&b'[') {
        let Some(end) = s.iter().position(|&c| c == b']') else {
            return false;
        };
        let inside = &s[1..end];
        let ok = !inside.is_empty()
            && inside
                .iter()
                .all(|c| c.is_ascii_hexdigit() || *c == b':' || *c == b'.');
        match &s[end + 1..] {
            [] => (ok, None),
            [b':', port @ ..] => (ok, Some(port)),
            _ => return false,
        }
    } else {
        let (host, port) = match s.iter().position(|&c| c == b':') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let ok = !host.is_empty()
            && host
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c));
        (ok, port)
    };
    let port_ok = match port {
        None => true,
        Some(p) => {
            !p.is_empty()
                && p.len() <= 5
                && p.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(p)
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|n| n <= 65535)
        }
    };
    host_ok && port_ok
}

/// The authority a prepared request goes upstream with (and is decided on): the Host
/// header (HTTP/1.x) or the URI's authority (HTTP/2).
pub fn authority_of<B>(req: &Request<B>, h2: bool) -> Option<&str> {
    if h2 {
        req.uri().authority().map(Authority::as_str)
    } else {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn h1(uri: &str, headers: &[(&str, &str)]) -> Result<Request<()>, Refusal> {
        let mut r = req(uri, Version::HTTP_11, headers);
        prepare(&mut r, false, &Options::default(), &[]).map(|_| r)
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_authority_as_host() {
        let r = h1(
            "http://api.example:8080/v1/../items?x=1",
            &[("host", "admin.example")],
        )
        .unwrap();
        assert_eq!(r.uri(), "/items?x=1");
        assert_eq!(r.headers()["host"], "api.example:8080");
        assert_eq!(authority_of(&r, false), Some("api.example:8080"));
        assert_eq!(
            h1("ftp://api.example/x", &[("host", "a")]).unwrap_err(),
            Refusal::Scheme("ftp".into())
        );
        assert_eq!(
            h1("http://a@api.example/x", &[("host", "a")]).unwrap_err(),
            Refusal::Authority("a@api.example".into())
        );
        assert_eq!(h1("/x", &[]).unwrap_err(), Refusal::NoHost);
        assert_eq!(
            h1("/x", &[("host", "a"), ("host", "a")]).unwrap_err(),
            Refusal::TwoHosts
        );
    }

    #[test]
    fn authorities() {
        for ok in [
            "web",
            "web:80",
            "web.example.",
            "a-b_c~d",
            "10.0.0.1:65535",
            "[::1]",
            "[fe80::1]:443",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "web:",
            "web:65536",
            "web:123456",
            "web:80:80",
            "a@web",
            "web/admin",
            "web?x",
            "web#x",
            "web x",
            "web%2e",
            "[::1",
            "[]",
            "[::1]x",
            "[g::1]",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn h2_host_must_agree_with_authority_and_is_folded_into_it() {
        let h2 = |uri: &str, headers: &[(&str, &str)]| {
            let mut r = req(uri, Version::HTTP_2, headers);
            prepare(&mut r, true, &Options::default(), &[]).map(|_| r)
        };
        let r = h2("http://web/x", &[("host", "WEB")]).unwrap();
        assert!(r.headers().get("host").is_none());
        assert_eq!(r.uri(), "http://web/x");
        assert!(matches!(
            h2("http://web/x", &[("host", "admin")]),
            Err(Refusal::HostDiffers { .. })
        ));
        assert_eq!(
            h2("http://web/x", &[("host", "web"), ("host", "web")]).unwrap_err(),
            Refusal::TwoHosts
        );
        let r = h2("/x", &[("host", "web:81")]).unwrap();
        assert_eq!(r.uri(), "http://web:81/x");
        assert_eq!(h2("/x", &[]).unwrap_err(), Refusal::NoAuthority);
        let r = h2("https://web/a/../b", &[]).unwrap();
        assert_eq!(r.uri(), "http://web/b");
    }

    #[test]
    fn connection_options_are_stripped_unless_they_name_what_rules_see() {
        let r = h1(
            "/x",
            &[
                ("host", "w"),
                ("connection", "keep-alive, X-Hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers, deflate"),
                ("x-end", "1"),
                ("http2-settings", "AAA"),
                ("proxy-authorization", "Basic x"),
            ],
        )
        .unwrap();
        let names: Vec<&str> = r.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "x-end", "te"]);
        assert_eq!(r.headers()["te"], "trailers");
        assert_eq!(
            h1("/x", &[("host", "w"), ("connection", "Content-Type")]).unwrap_err(),
            Refusal::ConnectionNames("Content-Type".into())
        );
        let mut r = req(
            "/x",
            Version::HTTP_11,
            &[("host", "w"), ("connection", "x-rule"), ("x-rule", "1")],
        );
        let rule = [HeaderName::from_static("x-rule")];
        assert_eq!(
            prepare(&mut r, false, &Options::default(), &rule).unwrap_err(),
            Refusal::ConnectionNames("x-rule".into())
        );
        assert_eq!(
            h1("/x", &[("host", "w"), ("connection", "a b")]).unwrap_err(),
            Refusal::ConnectionSyntax
        );
    }

    #[test]
    fn only_websocket_upgrades_stay() {
        let up = |u: &str| {
            let mut r = req(
                "/x",
                Version::HTTP_11,
                &[
                    ("host", "w"),
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", u),
                    ("http2-settings", "AAMAAABkAAQAAP__"),
                ],
            );
            let p = prepare(&mut r, false, &Options::default(), &[]).unwrap();
            (p.websocket, r)
        };
        let (ws, r) = up("websocket, h2c");
        assert!(ws);
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["connection"], "upgrade");
        assert!(r.headers().get("http2-settings").is_none());
        for other in ["h2c", "foo/1", "TLS/1.2, h2c"] {
            let (ws, r) = up(other);
            assert!(!ws, "{other}");
            assert!(r.headers().get("upgrade").is_none(), "{other}");
            assert!(r.headers().get("connection").is_none(), "{other}");
        }
        // Upgrade without the Connection option is no upgrade
        let mut r = req(
            "/x",
            Version::HTTP_11,
            &[("host", "w"), ("upgrade", "websocket")],
        );
        assert!(
            !prepare(&mut r, false, &Options::default(), &[])
                .unwrap()
                .websocket
        );
        assert!(r.headers().get("upgrade").is_none());
    }

    #[test]
    fn underscores_and_content_length() {
        assert_eq!(
            h1("/x", &[("host", "w"), ("transfer_encoding", "chunked")]).unwrap_err(),
            Refusal::Underscore("transfer_encoding".into())
        );
        let mut r = req(
            "/x",
            Version::HTTP_11,
            &[("host", "w"), ("x_a", "1"), ("x-b", "2")],
        );
        let drop = Options {
            underscores: Underscores::Drop,
            ..Options::default()
        };
        prepare(&mut r, false, &drop, &[]).unwrap();
        assert!(r.headers().get("x_a").is_none());
        assert_eq!(r.headers()["x-b"], "2");

        let r = h1("/x", &[("host", "w"), ("content-length", "045")]).unwrap();
        assert_eq!(r.headers()["content-length"], "45");
        let r = h1("/x", &[("host", "w"), ("content-length", "0")]).unwrap();
        assert_eq!(r.headers()["content-length"], "0");
        for bad in [
            &[("content-length", "4"), ("content-length", "4")][..],
            &[("content-length", "4, 4")],
            &[("content-length", "+4")],
        ] {
            let mut h = vec![("host", "w")];
            h.extend_from_slice(bad);
            assert!(
                matches!(h1("/x", &h), Err(Refusal::ContentLength(_))),
                "{bad:?}"
            );
        }
    }
}
