//! The files source: a directory of YAML files (cluster state and policy manifests),
//! the embedded default of `ward agent`.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use policy_model::api;
use policy_model::{Cluster, PolicyError};
use serde_yaml::Value;
use tokio::sync::mpsc;

use super::{BoxFuture, Error, Snapshot, Source};
use crate::inputs::yaml_files;

/// A directory of YAML files, read recursively: cluster state (the `cluster:` shape of
/// the conformance format, on its own or under a `cluster:` key) and policy manifests.
/// Changes are noticed through the kernel's file notifications (`notify`: inotify);
/// a burst of writes becomes one snapshot once the directory is quiet for [`DEBOUNCE`],
/// and the whole directory is also re-read every [`DEFAULT_RESCAN`] as a safety net
/// (notifications can be lost when the kernel's queue overflows). Only changes notify:
/// opening and reading a file (the source's own reads among them) does not. The files
/// are parsed, and a snapshot delivered, only when their names or content changed, so a
/// re-read of an unchanged directory costs its reading and hashing. Files are read on a
/// blocking thread.
pub struct FilesSource {
    dir: PathBuf,
    /// Hash of the content the last snapshot was read from; None before the first.
    seen: Option<u64>,
    rescan: Duration,
    /// The watcher (kept alive) and its notifications; None before the first snapshot,
    /// or when watching failed (then the directory is re-read every [`FALLBACK_RESCAN`]).
    watch: Option<(RecommendedWatcher, mpsc::UnboundedReceiver<()>)>,
    watching: bool,
    /// Whether to ask for notifications at all.
    notify: bool,
    /// Directory reads and parses so far.
    counts: Counts,
}

/// How often the source read its directory, and how often it parsed what it read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub reads: u64,
    pub parses: u64,
}

/// How often the directory is re-read in full when nothing was notified.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(30);
/// The shortest re-read interval (`--source-poll-ms` below it is raised to it).
pub const MIN_RESCAN: Duration = Duration::from_secs(1);
/// The re-read interval when the directory cannot be watched (inotify limits).
pub const FALLBACK_RESCAN: Duration = Duration::from_secs(1);
/// Quiet time after a notification before the directory is read.
pub const DEBOUNCE: Duration = Duration::from_millis(5);
/// Longest a burst of writes may delay a snapshot.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> FilesSource {
        FilesSource {
            dir: dir.into(),
            seen: None,
            rescan: DEFAULT_RESCAN,
            watch: None,
            watching: false,
            notify: true,
            counts: Counts::default(),
        }
    }

    /// Re-reads periodically only, without notifications: for file systems that send
    /// none (some network file systems).
    pub fn polling_only(mut self) -> FilesSource {
        self.notify = false;
        self
    }

    /// Sets how often the directory is re-read in full behind the notifications (at
    /// least [`MIN_RESCAN`]).
    pub fn with_rescan(mut self, every: Duration) -> FilesSource {
        self.rescan = every.max(MIN_RESCAN);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads everything. Only an unreadable directory is an error; bad files are reported
    /// in the snapshot and the rest is used.
    pub fn load(&self) -> Result<Snapshot, Error> {
        read_files(&self.dir).map(|files| parse(&files))
    }

    /// Reads and parses so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Starts watching the directory; a failure leaves the periodic re-read.
    fn start_watching(&mut self) {
        if !self.notify {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if is_change(&event) {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&self.dir, RecursiveMode::Recursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => {
                self.watch = Some((w, rx));
                self.watching = true;
            }
            Err(e) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    error = %e,
                    every = ?FALLBACK_RESCAN,
                    "cannot watch the source directory; re-reading it periodically"
                );
                self.watching = false;
            }
        }
    }

    /// Waits for a notification (then for the burst to end) or for the re-read timer.
    async fn changed(&mut self) {
        let every = if self.watching || !self.notify {
            self.rescan
        } else {
            FALLBACK_RESCAN
        };
        let Some((_, rx)) = self.watch.as_mut() else {
            tokio::time::sleep(every).await;
            return;
        };
        match tokio::time::timeout(every, rx.recv()).await {
            Err(_) => return,
            Ok(None) => {
                // the watcher stopped: re-read periodically from now on
                self.watch = None;
                self.watching = false;
                return;
            }
            Ok(Some(())) => {}
        }
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        loop {
            let quiet = tokio::time::Instant::now() + DEBOUNCE;
            match tokio::time::timeout_at(quiet.min(deadline), rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Reads the directory on a blocking thread and, when its names or content differ from
    /// the last snapshot's, parses it there too: `None` when nothing changed.
    async fn read(&mut self) -> Result<Option<(Snapshot, u64)>, Error> {
        let dir = self.dir.clone();
        let seen = self.seen;
        let read = tokio::task::spawn_blocking(move || {
            let files = read_files(&dir)?;
            let hash = files.hash();
            Ok::<_, Error>((Some(hash) != seen).then(|| (parse(&files), hash)))
        })
        .await
        .map_err(|e| Error::ReadTask {
            dir: self.dir.clone(),
            reason: e.to_string(),
        })??;
        self.counts.reads += 1;
        self.counts.parses += u64::from(read.is_some());
        Ok(read)
    }
}

/// Whether a notification may mean new content: anything but an access (a file opened,
/// read or closed without writing: the source's own reads are such). An error means
/// events were lost, so it counts.
fn is_change(event: &notify::Result<notify::Event>) -> bool {
    event.as_ref().map_or(true, |e| !e.kind.is_access())
}

/// The YAML files of a directory as read: names and text, and what could not be read.
struct Files {
    texts: Vec<(String, String)>,
    unreadable: Vec<PolicyError>,
}

impl Files {
    /// A hash of the files' names and content.
    fn hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.texts.hash(&mut h);
        h.finish()
    }
}

/// Reads every YAML file under `dir`.
fn read_files(dir: &Path) -> Result<Files, Error> {
    let paths = yaml_files(&[dir.to_path_buf()]).map_err(|source| Error::Files {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files = Files {
        texts: Vec::with_capacity(paths.len()),
        unreadable: Vec::new(),
    };
    for f in paths {
        let name = f.display().to_string();
        match fs::read_to_string(&f) {
            Ok(text) => files.texts.push((name, text)),
            // gone between listing and reading: the next notification reads again
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => files
                .unreadable
                .push(loose(&name, None, format!("cannot read: {e}"))),
        }
    }
    Ok(files)
}

/// The snapshot the files describe.
fn parse(files: &Files) -> Snapshot {
    let mut snap = Snapshot::default();
    snap.errors.extend(files.unreadable.iter().cloned());
    for (name, text) in &files.texts {
        let parsed = api::parse(text, Some(name));
        snap.objects.extend(parsed.objects);
        snap.errors.extend(parsed.errors);
        for (value, line) in parsed.other {
            other(value, line, name, &mut snap);
        }
    }
    snap
}

/// A document that is not a Kubernetes object: cluster state (on its own or under
/// `cluster:`), and a conformance case's `policies`. The cluster part is deserialized from
/// the document itself, not a copy (cluster files are the largest inputs).
fn other(mut value: Value, line: Option<usize>, file: &str, snap: &mut Snapshot) {
    // a conformance case also carries policies
    let policies = match value.get_mut("policies") {
        Some(Value::Sequence(items)) => std::mem::take(items),
        _ => Vec::new(),
    };
    let state = |v: &Value| {
        ["namespaces", "pods", "nodes", "externals", "dns"]
            .iter()
            .any(|k| v.get(k).is_some())
    };
    let cluster_value = match value.get_mut("cluster").map(std::mem::take) {
        Some(c) => c,
        None if state(&value) => value,
        None => {
            snap.errors.push(loose(
                file,
                line,
                "not a Kubernetes object (no apiVersion) and not cluster state".into(),
            ));
            return;
        }
    };
    match serde_path_to_error::deserialize::<_, Cluster>(cluster_value) {
        Ok(c) => merge(&mut snap.cluster, c),
        Err(e) => {
            let path = e.path().to_string();
            snap.errors.push(PolicyError {
                file: Some(file.to_string()),
                line,
                object: Some("cluster state".into()),
                path,
                reason: e.into_inner().to_string(),
            });
        }
    }
    for item in policies {
        let p = api::parse_value(item, Some(file));
        snap.objects.extend(p.objects);
        snap.errors.extend(p.errors);
    }
}

impl Source for FilesSource {
    fn name(&self) -> &'static str {
        "files"
    }

    /// The first call reads at once (and starts watching, before the read, so no change
    /// falls between); later calls return when the files' content changed.
    fn next(&mut self) -> BoxFuture<'_, Result<Snapshot, Error>> {
        Box::pin(async move {
            if self.seen.is_none() && self.watch.is_none() {
                self.start_watching();
            }
            loop {
                if self.seen.is_some() {
                    self.changed().await;
                }
                match self.read().await {
                    Ok(Some((snap, hash))) => {
                        self.seen = Some(hash);
                        return Ok(snap);
                    }
                    Ok(None) => {}
                    Err(e) if self.seen.is_none() => return Err(e),
                    // the directory went away meanwhile: keep what is in force, look again
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the source directory")
                    }
                }
            }
        })
    }
}

fn loose(file: &str, line: Option<usize>, reason: String) -> PolicyError {
    PolicyError {
        file: Some(file.to_string()),
        line,
        object: None,
        path: String::new(),
        reason,
    }
}

fn merge(into: &mut Cluster, c: Cluster) {
    into.namespaces.extend(c.namespaces);
    into.nodes.extend(c.nodes);
    into.pods.extend(c.pods);
    into.externals.extend(c.externals);
    into.dns.extend(c.dns);
    into.service_accounts.extend(c.service_accounts);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("ward-source-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(p.join("sub")).expect("dir");
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_cluster_state_and_policies_and_reports_bad_files() {
        let d = Dir::new("read");
        fs::write(
            d.0.join("cluster.yaml"),
            "namespaces: [{name: a}]\npods: [{namespace: a, name: p, ip: 10.0.0.1}]\n",
        )
        .expect("write");
        fs::write(
            d.0.join("sub/more-cluster.yml"),
            "cluster:\n  pods: [{namespace: a, name: q, ip: 10.0.0.2}]\n",
        )
        .expect("write");
        fs::write(
            d.0.join("sub/policy.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}}\n---\nkey: [unclosed\n",
        )
        .expect("write");
        fs::write(d.0.join("ignored.txt"), "not yaml").expect("write");
        let snap = FilesSource::new(&d.0).load().expect("load");
        assert_eq!(snap.cluster.pods.len(), 2, "cluster files are merged");
        assert_eq!(snap.objects.len(), 1);
        assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
        assert!(snap.errors[0].reason.contains("invalid YAML"));
        // the document starts at line 6; the parser reports where it gave up
        assert!(
            snap.errors[0].line.is_some_and(|l| l >= 6),
            "{:?}",
            snap.errors[0]
        );
    }

    #[test]
    fn reads_calico_manifests_and_service_accounts() {
        let d = Dir::new("calico");
        fs::write(
            d.0.join("cluster.yaml"),
            "namespaces: [{name: a}]\npods: [{namespace: a, name: p, ip: 10.0.0.1, serviceAccount: robot}]\nserviceAccounts: [{namespace: a, name: robot, labels: {role: ci}}]\n",
        )
        .expect("write");
        fs::write(
            d.0.join("calico.yaml"),
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-ssh-external}\nspec:\n  tier: security\n  order: 10\n  selector: all()\n  ingress: [{action: Deny, protocol: TCP, source: {nets: [0.0.0.0/0], notNets: [10.0.0.0/8]}, destination: {ports: [22]}}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: api, namespace: a}\nspec:\n  selector: app == 'api'\n  ingress: [{action: Allow, source: {serviceAccounts: {selector: role == 'ci'}}}]\n",
        )
        .expect("write");
        let snap = FilesSource::new(&d.0).load().expect("load");
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        assert_eq!(snap.cluster.service_accounts.len(), 1);
        assert_eq!(snap.cluster.pods[0].service_account(), "robot");
        let kinds: Vec<String> = snap
            .objects
            .iter()
            .map(|o| o.reference.to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "Tier security",
                "GlobalNetworkPolicy deny-ssh-external",
                "CalicoNetworkPolicy a/api"
            ]
        );
        for o in &snap.objects {
            assert!(o.translate().is_ok(), "{}", o.reference);
        }
    }

    fn write(d: &Dir, file: &str, text: &str) {
        // as the tests and editors do: a temporary file renamed over the old one
        let tmp = d.0.join(format!(".{}.tmp", file.replace('/', "_")));
        fs::write(&tmp, text).expect("write");
        fs::rename(&tmp, d.0.join(file)).expect("rename");
    }

    async fn within(src: &mut FilesSource, secs: u64) -> Snapshot {
        tokio::time::timeout(Duration::from_secs(secs), src.next())
            .await
            .expect("a snapshot in time")
            .expect("load")
    }

    #[tokio::test]
    async fn next_returns_at_once_then_on_a_notified_change() {
        let d = Dir::new("next");
        write(&d, "c.yaml", "namespaces: [{name: a}]\n");
        // no re-read in the test's time: only a notification can bring the change
        let mut src = FilesSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        let first = within(&mut src, 5).await;
        assert_eq!(first.cluster.namespaces.len(), 1);
        let pending = tokio::time::timeout(Duration::from_millis(200), src.next()).await;
        assert!(pending.is_err(), "no change, no snapshot");
        write(&d, "c.yaml", "namespaces: [{name: a}, {name: b}]\n");
        assert_eq!(within(&mut src, 5).await.cluster.namespaces.len(), 2);
        // a new file in a new subdirectory
        fs::create_dir_all(d.0.join("sub/deeper")).expect("mkdir");
        write(&d, "sub/deeper/more.yaml", "namespaces: [{name: c}]\n");
        let mut seen = within(&mut src, 5).await.cluster.namespaces.len();
        // the new directory's notification may come before its file's
        while seen < 3 {
            seen = within(&mut src, 5).await.cluster.namespaces.len();
        }
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_one_read_and_a_rewrite_of_the_same_content_none() {
        let d = Dir::new("burst");
        write(&d, "c.yaml", "namespaces: []\n");
        let mut src = FilesSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        within(&mut src, 5).await;
        for i in 0..20 {
            write(
                &d,
                &format!("n{i}.yaml"),
                &format!("namespaces: [{{name: n{i}}}]\n"),
            );
        }
        let mut snapshots = 1;
        let mut seen = within(&mut src, 5).await.cluster.namespaces.len();
        while seen < 20 {
            seen = within(&mut src, 5).await.cluster.namespaces.len();
            snapshots += 1;
        }
        assert!(
            snapshots < 20,
            "each write read on its own: {snapshots} snapshots"
        );
        write(&d, "n0.yaml", "namespaces: [{name: n0}]\n");
        let again = tokio::time::timeout(Duration::from_millis(300), src.next()).await;
        assert!(again.is_err(), "the same content again is no change");
    }

    #[tokio::test]
    async fn reading_the_files_is_not_a_change() {
        let d = Dir::new("ownreads");
        write(&d, "c.yaml", "namespaces: [{name: a}]\n");
        write(&d, "sub/p.yaml", "namespaces: [{name: b}]\n");
        let mut src = FilesSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        within(&mut src, 5).await;
        // the first read opened and read every file under the watch; someone else reads too
        fs::read_to_string(d.0.join("c.yaml")).expect("read");
        let pending = tokio::time::timeout(Duration::from_millis(500), src.next()).await;
        assert!(pending.is_err(), "no change, no snapshot");
        assert_eq!(
            src.counts(),
            Counts {
                reads: 1,
                parses: 1
            },
            "reads notified as changes"
        );
    }

    #[tokio::test]
    async fn a_re_read_of_the_same_content_parses_nothing() {
        let d = Dir::new("reread");
        write(&d, "c.yaml", "namespaces: [{name: a}]\n");
        let mut src = FilesSource::new(&d.0)
            .polling_only()
            .with_rescan(MIN_RESCAN);
        within(&mut src, 5).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while src.counts().reads < 3 {
            assert!(std::time::Instant::now() < deadline, "no periodic re-read");
            let _ = tokio::time::timeout(MIN_RESCAN * 3 / 2, src.next()).await;
        }
        assert_eq!(
            src.counts().parses,
            1,
            "an unchanged directory parsed again"
        );
    }

    #[tokio::test]
    async fn without_notifications_the_periodic_read_finds_the_change() {
        let d = Dir::new("poll");
        write(&d, "c.yaml", "namespaces: [{name: a}]\n");
        let mut src = FilesSource::new(&d.0)
            .polling_only()
            .with_rescan(MIN_RESCAN);
        within(&mut src, 5).await;
        write(&d, "c.yaml", "namespaces: [{name: a}, {name: b}]\n");
        assert_eq!(within(&mut src, 5).await.cluster.namespaces.len(), 2);
    }

    #[test]
    fn reads_a_conformance_case_with_its_cluster_and_policies() {
        let d = Dir::new("case");
        fs::write(
            d.0.join("case.yaml"),
            "cluster:\n  namespaces: [{name: a}]\n  pods: [{namespace: a, name: p, ip: 10.0.0.1}]\npolicies:\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: deny, namespace: a}\n  spec: {podSelector: {}}\n",
        )
        .expect("write");
        let snap = FilesSource::new(&d.0).load().expect("load");
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        assert_eq!(snap.cluster.pods.len(), 1);
        let names: Vec<String> = snap
            .objects
            .iter()
            .map(|o| o.reference.to_string())
            .collect();
        assert_eq!(names, ["NetworkPolicy a/deny"]);
    }

    #[test]
    fn a_bad_cluster_file_names_the_field() {
        let d = Dir::new("badcluster");
        fs::write(
            d.0.join("c.yaml"),
            "pods: [{namespace: a, name: p, ip: not-an-ip}]\n",
        )
        .expect("write");
        let snap = FilesSource::new(&d.0).load().expect("load");
        assert_eq!(snap.errors.len(), 1);
        assert_eq!(snap.errors[0].path, "pods[0].ip");
    }
}
