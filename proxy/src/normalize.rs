//! Path normalisation before matching, as Cilium configures Envoy by default
//! (`normalize_path` + `merge_slashes`): repeated slashes merged, `.` and `..` segments
//! removed (RFC 3986 section 5.2.4). The query is left as sent. The normalised path is
//! both what rules see and what goes upstream, so `/public/../admin` cannot pass a rule
//! for `/public/.*`.

use std::borrow::Cow;

/// Why a path cannot be normalised (answered with 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target does not start with '/'")]
    NotAbsolute,
    #[error("the path contains an encoded slash or backslash")]
    EncodedSlash,
}

/// Normalises `path_and_query` (the raw request target). Borrowed when nothing changed.
pub fn normalize(path_and_query: &str) -> Result<Cow<'_, str>, PathError> {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    if path == "*" {
        // OPTIONS * : nothing to normalise
        return Ok(Cow::Borrowed(path_and_query));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Envoy's default for escaped slashes in Cilium is UNESCAPE_AND_REDIRECT; a proxy in
    // the middle cannot redirect, so an encoded slash is refused rather than passed in a
    // form that rules and upstream would read differently.
    if has_encoded_slash(path) {
        return Err(PathError::EncodedSlash);
    }
    if !needs_work(path) {
        return Ok(Cow::Borrowed(path_and_query));
    }
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
    let mut s = String::with_capacity(path_and_query.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        s.push('/');
    }
    s.push_str(query);
    Ok(Cow::Owned(s))
}

fn has_encoded_slash(path: &str) -> bool {
    let b = path.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
                || (w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c')))
    })
}

fn needs_work(path: &str) -> bool {
    path.contains("//")
        || path
            .split('/')
            .skip(1)
            .any(|s| matches!(dots(s), Some(1 | 2)))
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
        normalize(s).unwrap().into_owned()
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
        assert!(matches!(normalize("/p?q=1"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn rejects_what_cannot_be_normalised_safely() {
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("/a%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(n("*"), "*");
    }
}
