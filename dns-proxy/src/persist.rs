//! The FQDN cache on disk: one JSON file in the state directory, replaced atomically
//! (write a temporary file, fsync, rename), so a crash leaves the old or the new file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::Entries;

const FILE: &str = "fqdn-cache.json";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid cache file: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: cache file version {found}, expected {VERSION}")]
    Version { path: PathBuf, found: u32 },
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    endpoints: Entries,
}

#[derive(Serialize)]
struct FileRef<'a> {
    version: u32,
    endpoints: &'a Entries,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes the cache to `dir`, replacing the previous file atomically.
pub fn save(dir: &Path, entries: &Entries) -> Result<(), PersistError> {
    let target = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let io = |source| PersistError::Io {
        path: tmp.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let body = serde_json::to_vec(&FileRef {
        version: VERSION,
        endpoints: entries,
    })
    .map_err(|source| PersistError::Format {
        path: tmp.clone(),
        source,
    })?;
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, &target).map_err(|source| PersistError::Io {
        path: target.clone(),
        source,
    })
}

/// Reads the cache from `dir`; no file is an empty cache.
pub fn load(dir: &Path) -> Result<Entries, PersistError> {
    let path = path(dir);
    let body = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Entries::new()),
        Err(source) => return Err(PersistError::Io { path, source }),
    };
    let file: File = serde_json::from_slice(&body).map_err(|source| PersistError::Format {
        path: path.clone(),
        source,
    })?;
    if file.version != VERSION {
        return Err(PersistError::Version {
            path,
            found: file.version,
        });
    }
    Ok(file.endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::FqdnCache;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let mut c = FqdnCache::new(10);
        c.learn("ns/a", "x.", &["192.0.2.1".parse().unwrap()], 30, 5);
        save(dir.path(), &c.snapshot()).unwrap();
        save(dir.path(), &c.snapshot()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), c.snapshot());
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
        fs::write(path(dir.path()), b"{").unwrap();
        assert!(matches!(load(dir.path()), Err(PersistError::Format { .. })));
    }
}
