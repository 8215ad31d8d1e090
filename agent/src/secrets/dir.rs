//! A certificates directory: one directory per namespace, one per secret in it, one
//! file per key (`DIR/NAMESPACE/NAME/KEY`). Watched with the kernel's file notifications
//! (`notify`: inotify), and read again in full every [`RESCAN`] behind them.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use policy_model::tls::SecretRef;
use proxy::tls::{SecretData, SecretStore};
use tokio::sync::{mpsc, watch};

/// How often the directory is read again when nothing was notified (and how often
/// while it cannot be watched, e.g. before it exists).
pub const RESCAN: Duration = Duration::from_secs(10);
/// The re-read interval while the directory cannot be watched.
pub const FALLBACK_RESCAN: Duration = Duration::from_secs(1);
/// Quiet time after a notification before the directory is read (a Secret update by
/// the kubelet is several renames).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Larger keys are not read (a certificate bundle is far smaller).
const MAX_KEY_BYTES: u64 = 1 << 20;

/// Reads a certificates directory. Entries starting with `.` are skipped (the `..data`
/// links of a mounted Secret; its keys are links into it and are followed). A missing
/// directory holds no secrets; what cannot be read is said in the second list and left
/// out (its rules then fail closed with "not found").
pub fn read_dir(dir: &Path) -> (HashMap<SecretRef, SecretData>, Vec<String>) {
    let mut out = HashMap::new();
    let mut problems = Vec::new();
    for ns in entries(dir, &mut problems) {
        for name in entries(&ns, &mut problems) {
            let mut keys = BTreeMap::new();
            for key in entries(&name, &mut problems) {
                match read_key(&key) {
                    Ok(bytes) => {
                        keys.insert(file_name(&key), bytes);
                    }
                    Err(e) => problems.push(format!("{}: {e}", key.display())),
                }
            }
            out.insert(
                SecretRef {
                    namespace: file_name(&ns),
                    name: file_name(&name),
                },
                keys,
            );
        }
    }
    (out, problems)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The entries of a directory not starting with `.`, sorted. Not a directory, or
/// missing: none.
fn entries(dir: &Path, problems: &mut Vec<String>) -> Vec<PathBuf> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Vec::new()
        }
        Err(e) => {
            problems.push(format!("{}: {e}", dir.display()));
            return Vec::new();
        }
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn read_key(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(p)?
        .take(MAX_KEY_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KEY_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

/// A certificates directory to watch.
pub struct DirWatch {
    pub dir: PathBuf,
    pub rescan: Duration,
}

impl DirWatch {
    pub fn new(dir: impl Into<PathBuf>) -> DirWatch {
        DirWatch {
            dir: dir.into(),
            rescan: RESCAN,
        }
    }

    /// Publishes the directory's secrets to `store` now and after every change,
    /// telling `changed` the store's generation after the first read and each change.
    pub async fn run(self, store: Arc<SecretStore>, changed: watch::Sender<u64>) {
        let mut notified: Option<(RecommendedWatcher, mpsc::UnboundedReceiver<()>)> = None;
        let mut reported = Vec::new();
        let mut first = true;
        loop {
            if notified.is_none() {
                notified = self.watcher();
            }
            let dir = self.dir.clone();
            let (secrets, problems) =
                match tokio::task::spawn_blocking(move || read_dir(&dir)).await {
                    Ok(r) => r,
                    Err(e) => (HashMap::new(), vec![format!("the read stopped: {e}")]),
                };
            if problems != reported {
                for p in &problems {
                    tracing::warn!(dir = %self.dir.display(), problem = %p, "certificates directory");
                }
                reported = problems;
            }
            let n = secrets.len();
            if store.publish(secrets) {
                tracing::info!(dir = %self.dir.display(), secrets = n, "TLS secrets changed");
                changed.send_replace(store.generation());
            } else if first {
                changed.send_replace(store.generation());
            }
            first = false;
            match notified.as_mut() {
                None => tokio::time::sleep(FALLBACK_RESCAN).await,
                Some((_, rx)) => match tokio::time::timeout(self.rescan, rx.recv()).await {
                    Ok(Some(())) => {
                        // the end of the burst
                        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    }
                    Ok(None) => notified = None,
                    Err(_) => {}
                },
            }
        }
    }

    /// Notifications of changes under the directory; None when it cannot be watched
    /// (it does not exist yet, or inotify's limits): then it is read every
    /// [`FALLBACK_RESCAN`].
    fn watcher(&self) -> Option<(RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // any event (or error: lost events) means "read again"
            let _ = event;
            let _ = tx.send(());
        })
        .and_then(|mut w| {
            w.watch(&self.dir, RecursiveMode::Recursive)?;
            Ok(w)
        });
        match w {
            Ok(w) => Some((w, rx)),
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "certificates directory not watched; read every second");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn r(ns: &str, name: &str) -> SecretRef {
        SecretRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// `DIR/NS/NAME/KEY`, mounted-Secret links followed and their `..data` skipped.
    #[test]
    fn a_certificates_directory_is_read_as_namespaces_secrets_and_keys() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("kube-system/intercept/tls.crt"), "CERT");
        write(&d.path().join("kube-system/intercept/tls.key"), "KEY");
        write(&d.path().join("app/token/value"), "s3cr3t\n");
        // a Secret as the kubelet mounts it: keys are links into a hidden directory
        let mounted = d.path().join("app/mounted");
        write(&mounted.join("..2026_12_07/ca.crt"), "CA");
        std::os::unix::fs::symlink("..2026_12_07", mounted.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/ca.crt", mounted.join("ca.crt")).unwrap();
        write(&d.path().join("stray-file"), "ignored");
        let (secrets, problems) = read_dir(d.path());
        assert!(problems.is_empty(), "{problems:?}");
        let keys = |ns, name| -> Vec<(String, String)> {
            secrets[&r(ns, name)]
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
                .collect()
        };
        assert_eq!(
            keys("kube-system", "intercept"),
            [
                ("tls.crt".into(), "CERT".into()),
                ("tls.key".into(), "KEY".into())
            ]
        );
        assert_eq!(keys("app", "token"), [("value".into(), "s3cr3t\n".into())]);
        assert_eq!(keys("app", "mounted"), [("ca.crt".into(), "CA".into())]);
        assert_eq!(secrets.len(), 3);
        let (none, problems) = read_dir(&d.path().join("missing"));
        assert!(none.is_empty() && problems.is_empty());
    }

    /// An oversized key is left out and said; the other keys of the secret stay.
    #[test]
    fn an_oversized_key_is_a_problem_not_a_secret() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("app/big/tls.key"), "KEY");
        let big = "x".repeat(usize::try_from(MAX_KEY_BYTES).unwrap() + 1);
        write(&d.path().join("app/big/tls.crt"), &big);
        let (secrets, problems) = read_dir(d.path());
        assert_eq!(
            secrets[&r("app", "big")].keys().collect::<Vec<_>>(),
            ["tls.key"]
        );
        assert!(
            problems.len() == 1 && problems[0].contains("tls.crt: larger than"),
            "{problems:?}"
        );
    }

    async fn next_change(rx: &mut watch::Receiver<u64>) {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a change within 5 s")
            .unwrap();
    }

    /// Changes apply without a restart, woken by the notification (the re-read timer is
    /// an hour here): a rewritten key, a mounted Secret's atomic link swap, a new
    /// secret in a directory created later, and a deletion.
    #[tokio::test]
    async fn the_directory_is_watched() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("app/token/value");
        write(&key, "one");
        let store = Arc::new(SecretStore::new());
        let (tx, mut rx) = watch::channel(0);
        let w = DirWatch {
            dir: d.path().to_path_buf(),
            rescan: Duration::from_secs(3600),
        };
        let task = tokio::spawn(w.run(store.clone(), tx));
        let value = |ns, name| {
            policy_model::tls::Secrets::value(store.as_ref(), &r(ns, name)).map(|v| v.to_string())
        };
        next_change(&mut rx).await;
        assert_eq!(value("app", "token").as_deref(), Some("one"));

        write(&key, "two");
        next_change(&mut rx).await;
        assert_eq!(value("app", "token").as_deref(), Some("two"));

        // the kubelet's update: a new hidden directory, then `..data` renamed over
        let mounted = d.path().join("app/mounted");
        write(&mounted.join("..v1/value"), "v1");
        std::os::unix::fs::symlink("..v1", mounted.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/value", mounted.join("value")).unwrap();
        next_change(&mut rx).await;
        while value("app", "mounted").is_none() {
            next_change(&mut rx).await;
        }
        assert_eq!(value("app", "mounted").as_deref(), Some("v1"));
        write(&mounted.join("..v2/value"), "v2");
        std::os::unix::fs::symlink("..v2", mounted.join("..data_tmp")).unwrap();
        std::fs::rename(mounted.join("..data_tmp"), mounted.join("..data")).unwrap();
        next_change(&mut rx).await;
        assert_eq!(value("app", "mounted").as_deref(), Some("v2"));

        write(&d.path().join("later/ns-made-later/value"), "new");
        next_change(&mut rx).await;
        while value("later", "ns-made-later").is_none() {
            next_change(&mut rx).await;
        }

        std::fs::remove_dir_all(d.path().join("app/token")).unwrap();
        next_change(&mut rx).await;
        assert_eq!(value("app", "token"), None);
        task.abort();
    }

    /// A directory that does not exist yet holds no secrets; once made, it is read.
    #[tokio::test]
    async fn a_directory_made_later_is_read() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        let store = Arc::new(SecretStore::new());
        let (tx, mut rx) = watch::channel(0);
        let task = tokio::spawn(DirWatch::new(&dir).run(store.clone(), tx));
        write(&dir.join("app/token/value"), "one");
        next_change(&mut rx).await;
        assert!(store.get(&r("app", "token")).is_some());
        task.abort();
    }
}
