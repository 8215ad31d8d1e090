//! Path normalisation before matching, as Cilium configures Envoy by default
//! (`normalize_path` + `merge_slashes`): repeated slashes merged, `.` and `..` segments
//! removed (RFC 3986 section 5.2.4). The query is left as sent. The normalised path is
//! both what rules see and what goes upstream, so `/public/../admin` cannot pass a rule
//! for `/public/.*`.
//!
//! What upstream servers would resolve differently than this normaliser is refused
//! instead: encoded slashes and backslashes, raw backslashes (unless configured to read
//! as `/`), dot segments hidden behind `;` path parameters (`..;/`, which Tomcat and
//! Jetty resolve), and overlong UTF-8 encodings of `.` and `/` (`%c0%ae`).

use std::borrow::Cow;

use serde::Deserialize;

/// What a raw `\` in a path means (config key `path_backslash`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backslash {
    /// 400: some servers read it as `/`, most as a plain character (the default).
    #[default]
    Reject,
    /// Read as `/` (as browsers and IIS do) before normalising; what goes upstream has `/`.
    Slash,
}

/// Why a path cannot be normalised (answered with 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target does not start with '/'")]
    NotAbsolute,
    #[error("the path contains an encoded slash or backslash")]
    EncodedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path has a dot segment with a ';' parameter")]
    DotSegmentParameter,
    #[error("the path contains an overlong UTF-8 encoding (%c0 or %c1)")]
    OverlongUtf8,
}

/// Normalises `path_and_query` (the raw request target). Borrowed when nothing changed.
pub fn normalize(path_and_query: &str, backslash: Backslash) -> Result<Cow<'_, str>, PathError> {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    if path == "*" {
        // OPTIONS * : nothing to normalise
        return Ok(Cow::Borrowed(path_and_query));
    }
    let slashed;
    let backslashed = path.contains('\\');
    let path = if backslashed {
        if backslash == Backslash::Reject {
            return Err(PathError::Backslash);
        }
        slashed = path.replace('\\', "/");
        slashed.as_str()
    } else {
        path
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Envoy's default for escaped slashes in Cilium is UNESCAPE_AND_REDIRECT; a proxy in
    // the middle cannot redirect, so an encoded slash is refused rather than passed in a
    // form that rules and upstream would read differently.
    check_bytes(path)?;
    let work = needs_work(path)?;
    if !backslashed && !work {
        return Ok(Cow::Borrowed(path_and_query));
    }
    Ok(Cow::Owned(resolve(path, query)))
}

/// Merges slashes and removes dot segments of `path` (starting with `/`), then appends
/// `query`.
fn resolve(path: &str, query: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match dots(seg) {
            Some(1) | Some(0) => {
                // an empty segment is merged, `.` dropped; either keeps a trailing slash
                trailing_slash = i == last;
            }
            Some(_) => {
                out.pop();
                trailing_slash = i == last;
            }
            None => {
                out.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len() + query.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        s.push('/');
    }
    s.push_str(query);
    s
}

/// Refuses percent-encodings the upstream could decode into a separator or a dot:
/// `%2F`, `%5C`, and the overlong UTF-8 lead bytes `%C0` and `%C1`.
fn check_bytes(path: &str) -> Result<(), PathError> {
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|&c| c == b'%') {
        let p = i + at;
        if let (Some(&h), Some(&l)) = (b.get(p + 1), b.get(p + 2)) {
            let l = l.to_ascii_lowercase();
            match (h.to_ascii_lowercase(), l) {
                (b'2', b'f') | (b'5', b'c') => return Err(PathError::EncodedSlash),
                (b'c', b'0' | b'1') => return Err(PathError::OverlongUtf8),
                _ => {}
            }
        }
        i = p + 1;
    }
    Ok(())
}

/// Whether the path has something to merge or remove; refuses dot segments behind a
/// `;` parameter, which the normaliser would keep and a servlet container would resolve.
fn needs_work(path: &str) -> Result<bool, PathError> {
    let mut work = path.contains("//");
    for seg in path.split('/').skip(1) {
        match dots(seg) {
            Some(1 | 2) => work = true,
            Some(_) => {}
            None => {
                if dots(before_parameter(seg)).is_some_and(|n| n > 0) {
                    return Err(PathError::DotSegmentParameter);
                }
            }
        }
    }
    Ok(work)
}

/// A segment up to its first `;` (raw or `%3B`).
fn before_parameter(seg: &str) -> &str {
    let b = seg.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b';' {
            return &seg[..i];
        }
        if c == b'%'
            && b.get(i + 1) == Some(&b'3')
            && b.get(i + 2).is_some_and(|c| c.eq_ignore_ascii_case(&b'b'))
        {
            return &seg[..i];
        }
    }
    seg
}

/// Some(0) for an empty segment, Some(1) for `.`, Some(2) for `..`, where a dot may be
/// percent-encoded (`%2e`), as browsers and Envoy's normaliser read it.
fn dots(seg: &str) -> Option<u8> {
    let mut rest = seg.as_bytes();
    let mut n = 0u8;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && (rest[2] | 0x20) == b'e'
        {
            rest = &rest[3..];
        } else {
            return None;
        }
        n += 1;
        if n > 2 {
            return None;
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalize(s, Backslash::Reject).unwrap().into_owned()
    }

    fn refused(s: &str) -> PathError {
        normalize(s, Backslash::Reject).unwrap_err()
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/a/./b"), "/a/b");
        assert_eq!(n("//a///b"), "/a/b");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/..b/c"), "/a/..b/c");
        assert_eq!(n("/a/.../c"), "/a/.../c");
        assert_eq!(n("/public/%2e%2e/admin"), "/admin");
        assert_eq!(n("/public/.%2E/admin"), "/admin");
    }

    #[test]
    fn query_is_kept_and_not_normalised() {
        assert_eq!(n("/a/../b?x=/../y"), "/b?x=/../y");
        assert_eq!(n("/p?q=1"), "/p?q=1");
        assert!(matches!(
            normalize("/p?q=1", Backslash::Reject),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn rejects_what_cannot_be_normalised_safely() {
        assert_eq!(refused("a/b"), PathError::NotAbsolute);
        assert_eq!(refused("/a%2fb"), PathError::EncodedSlash);
        assert_eq!(refused("/a%5Cb"), PathError::EncodedSlash);
        assert_eq!(refused("/a/..\\b"), PathError::Backslash);
        assert_eq!(refused("/a/%c0%ae%c0%ae/b"), PathError::OverlongUtf8);
        assert_eq!(refused("/a/%C1%9C"), PathError::OverlongUtf8);
        assert_eq!(n("*"), "*");
    }

    #[test]
    fn dot_segments_behind_parameters_are_refused_other_parameters_kept() {
        for p in [
            "/a/..;/b",
            "/a/.;x/b",
            "/a/%2e%2e;x/b",
            "/a/..%3B/b",
            "/a/..;",
        ] {
            assert_eq!(refused(p), PathError::DotSegmentParameter, "{p}");
        }
        assert_eq!(n("/a;v=1/b"), "/a;v=1/b");
        assert_eq!(n("/a/;x/b"), "/a/;x/b");
        assert_eq!(n("/a/...;x/b"), "/a/...;x/b");
    }

    #[test]
    fn backslash_reads_as_slash_when_configured() {
        let s = |p| normalize(p, Backslash::Slash).unwrap().into_owned();
        assert_eq!(s("/public/..\\admin"), "/admin");
        assert_eq!(s("/a\\b?x=\\"), "/a/b?x=\\");
        assert_eq!(s("\\a"), "/a");
    }
}
