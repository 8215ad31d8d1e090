//! Compiled regexes shared by pattern. Policies repeat the same HTTP methods and paths
//! and the same DNS patterns across namespaces (one template per team or app), and a
//! compiled regex costs kilobytes (its automata), while a shared one costs a pointer. One
//! compiled regex is kept per distinct pattern for as long as a policy holds it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use regex::Regex;

/// Where shared regexes are found: by kind of pattern (each kind builds its regexes its
/// own way) and pattern text. Entries whose regex is gone are dropped when the table
/// has doubled since the last sweep.
struct Table {
    by_pattern: HashMap<(&'static str, String), Weak<Regex>>,
    sweep_at: usize,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        by_pattern: HashMap::new(),
        sweep_at: 1024,
    })
});

/// The compiled regex of `pattern` of `kind`: a live one when some policy holds it, else
/// one built by `build` (and shared from then on).
pub(crate) fn shared<E>(
    kind: &'static str,
    pattern: &str,
    build: impl FnOnce() -> Result<Regex, E>,
) -> Result<Arc<Regex>, E> {
    let mut t = TABLE.lock().unwrap_or_else(PoisonError::into_inner);
    let key = (kind, pattern.to_string());
    if let Some(r) = t.by_pattern.get(&key).and_then(Weak::upgrade) {
        return Ok(r);
    }
    let r = Arc::new(build()?);
    t.by_pattern.insert(key, Arc::downgrade(&r));
    if t.by_pattern.len() >= t.sweep_at {
        t.by_pattern.retain(|_, w| w.strong_count() > 0);
        t.sweep_at = (2 * t.by_pattern.len()).max(1024);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(p: &str) -> Result<Regex, regex::Error> {
        Regex::new(p)
    }

    #[test]
    fn one_regex_per_live_pattern() {
        let a = shared("test", "^a+$", || build("^a+$")).expect("valid");
        let b = shared("test", "^a+$", || build("^a+$")).expect("valid");
        assert!(Arc::ptr_eq(&a, &b));
        // another kind builds its own
        let c = shared("other", "^a+$", || build("^a+$")).expect("valid");
        assert!(!Arc::ptr_eq(&a, &c));
        // once no one holds it, the next use builds again
        drop((a, b));
        let mut built = false;
        let d = shared("test", "^a+$", || {
            built = true;
            build("^a+$")
        })
        .expect("valid");
        assert!(built && d.is_match("aa"));
        let e: Result<_, regex::Error> = shared("test", "(", || build("("));
        assert!(e.is_err());
    }
}
