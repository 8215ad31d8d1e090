//! The conformance cases: the repository's copy in `conformance/`, and `cargo xtask
//! sync-cases`, which refreshes it from `../shared/conformance` (the design folder beside
//! the checkout on the developers' machines; a clone has none and needs none).

use std::fs;
use std::path::{Path, PathBuf};

use crate::{root, Result};

/// What the copy holds, relative to `conformance/` on both sides.
const SYNCED: &[&str] = &["cases", "cases-tls", "cases-calico", "FORMAT.md"];

/// The repository's copy of the conformance folder.
pub fn copy_dir() -> PathBuf {
    root().join("conformance")
}

/// The case files the policy model, the datapath and the lab are tested against.
pub fn cases() -> PathBuf {
    copy_dir().join("cases")
}

/// The case folders run in full on the policy model, the datapath and the lab: `cases/`
/// and, beside it, the additions that Ward implements (`cases-calico/`).
pub fn case_folders() -> Vec<PathBuf> {
    vec![cases(), copy_dir().join("cases-calico")]
}

/// `../shared/conformance`, when it is there.
pub fn shared_dir() -> Option<PathBuf> {
    let p = root().join("../shared/conformance");
    p.is_dir().then_some(p)
}

/// `cargo xtask sync-cases`: the copy becomes what ../shared holds (files added, changed
/// and removed), and says what changed.
pub fn sync() -> Result {
    let shared = shared_dir().ok_or("../shared/conformance is missing: nothing to sync from")?;
    let changes = mirror(&shared, &copy_dir())?;
    for c in &changes {
        eprintln!("{c}");
    }
    eprintln!(
        "conformance/: {} change(s) from {}",
        changes.len(),
        shared.display()
    );
    Ok(())
}

/// Makes `copy` hold what `shared` holds; returns what differed.
fn mirror(shared: &Path, copy: &Path) -> Result<Vec<String>> {
    let changes = differences(shared, copy)?;
    if changes.is_empty() {
        return Ok(changes);
    }
    for entry in SYNCED {
        let to = copy.join(entry);
        if to.is_dir() {
            fs::remove_dir_all(&to).map_err(|e| format!("{}: {e}", to.display()))?;
        } else if to.exists() {
            fs::remove_file(&to).map_err(|e| format!("{}: {e}", to.display()))?;
        }
        copy_tree(&shared.join(entry), &to)?;
    }
    Ok(changes)
}

/// Every file that differs between `shared` and `copy`, one line each (`changed`,
/// `new in ../shared`, `gone from ../shared`), in name order.
pub fn differences(shared: &Path, copy: &Path) -> Result<Vec<String>> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for entry in SYNCED {
        files(shared, Path::new(entry), &mut a)?;
        files(copy, Path::new(entry), &mut b)?;
    }
    a.sort();
    b.sort();
    let mut out = Vec::new();
    for f in &a {
        if !b.contains(f) {
            out.push(format!("new in ../shared: {}", f.display()));
        } else if read(&shared.join(f))? != read(&copy.join(f))? {
            out.push(format!("changed: {}", f.display()));
        }
    }
    for f in b.iter().filter(|f| !a.contains(f)) {
        out.push(format!("gone from ../shared: {}", f.display()));
    }
    Ok(out)
}

fn read(p: &Path) -> Result<Vec<u8>> {
    fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The files under `base/rel` (a file or a folder), as paths relative to `base`.
fn files(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result {
    let path = base.join(rel);
    if path.is_file() {
        out.push(rel.to_path_buf());
    } else if path.is_dir() {
        for e in fs::read_dir(&path).map_err(|e| format!("{}: {e}", path.display()))? {
            let e = e.map_err(|e| format!("{}: {e}", path.display()))?;
            files(base, &rel.join(e.file_name()), out)?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result {
    if from.is_dir() {
        fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
        for e in fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
            let e = e.map_err(|e| format!("{}: {e}", from.display()))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else if from.is_file() {
        fs::copy(from, to).map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The repository's cases are the ones in ../shared: a case added or changed there
    /// reaches the tests only through `cargo xtask sync-cases`, never silently.
    #[test]
    fn the_conformance_copy_matches_shared() {
        let Some(shared) = shared_dir() else {
            eprintln!("skipped: no ../shared/conformance beside the checkout to compare with");
            return;
        };
        let changes = differences(&shared, &copy_dir()).unwrap();
        assert!(
            changes.is_empty(),
            "conformance/ differs from {} (run `cargo xtask sync-cases`):\n{}",
            shared.display(),
            changes.join("\n")
        );
    }

    #[test]
    fn differences_name_new_changed_and_gone_files_and_mirror_applies_them() {
        let dir = std::env::temp_dir().join(format!("xtask-cases-{}", std::process::id()));
        let (shared, copy) = (dir.join("shared"), dir.join("copy"));
        for (base, files) in [
            (&shared, [("cases/a.yaml", "a"), ("cases/b.yaml", "b2")]),
            (&copy, [("cases/b.yaml", "b1"), ("cases/c.yaml", "c")]),
        ] {
            for (f, text) in files {
                fs::create_dir_all(base.join(f).parent().unwrap()).unwrap();
                fs::write(base.join(f), text).unwrap();
            }
        }
        fs::write(shared.join("FORMAT.md"), "format").unwrap();
        let d = differences(&shared, &copy).unwrap();
        assert_eq!(
            d,
            [
                "new in ../shared: FORMAT.md",
                "new in ../shared: cases/a.yaml",
                "changed: cases/b.yaml",
                "gone from ../shared: cases/c.yaml",
            ]
        );
        assert_eq!(mirror(&shared, &copy).unwrap(), d);
        assert!(differences(&shared, &copy).unwrap().is_empty());
        assert!(
            !copy.join("cases/c.yaml").exists(),
            "a case gone from ../shared goes"
        );
        assert_eq!(fs::read_to_string(copy.join("cases/b.yaml")).unwrap(), "b2");
        fs::remove_dir_all(&dir).unwrap();
    }
}
