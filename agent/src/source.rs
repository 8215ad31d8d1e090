//! Sources of cluster state and policies. A source delivers full snapshots; the agent
//! diffs them through the policy store. `files` (a directory of YAML) is the embedded
//! default; the Kubernetes source will deliver the same `Snapshot`.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use policy_model::api::{self, Object};
use policy_model::{Cluster, PolicyError};
use serde_yaml::Value;

use crate::inputs::yaml_files;

/// Everything a source knows at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cluster: Cluster,
    pub objects: Vec<Object>,
    /// Input problems that name no valid object (YAML errors, unknown kinds, bad cluster
    /// files). Invalid objects are in `objects` and report through the store.
    pub errors: Vec<PolicyError>,
}

/// A boxed future, so that `Source` stays object safe.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where the agent learns cluster state and policies. The files source and the
/// Kubernetes source (issue 7) both implement it; the agent loop sees only this trait.
pub trait Source: Send {
    /// A short name for logs and status: "files", "kubernetes".
    fn name(&self) -> &'static str;

    /// Waits for the next full snapshot. The first call returns the initial state once
    /// the source has synced; later calls return when something changed. On an error the
    /// agent logs it, keeps what is in force, and calls again.
    fn next(&mut self) -> BoxFuture<'_, anyhow::Result<Snapshot>>;
}

/// A directory of YAML files, read recursively: cluster state (the `cluster:` shape of
/// the conformance format, on its own or under a `cluster:` key) and policy manifests.
/// Changes are found by polling a fingerprint of the files' names, sizes and times,
/// which is cheap and needs no inotify limits.
pub struct FilesSource {
    dir: PathBuf,
    /// The fingerprint of what the last snapshot read; None before the first.
    seen: Option<u64>,
    poll: std::time::Duration,
}

/// How often [`FilesSource`] looks for changes: well under the 100 ms a policy change
/// may take to be enforced, and a few `stat`s per file each time.
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> FilesSource {
        FilesSource {
            dir: dir.into(),
            seen: None,
            poll: DEFAULT_POLL,
        }
    }

    /// Sets how often the directory is checked for changes.
    pub fn with_poll(mut self, poll: std::time::Duration) -> FilesSource {
        self.poll = poll.max(std::time::Duration::from_millis(1));
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A value that changes when any YAML file is added, removed or modified.
    pub fn fingerprint(&self) -> std::io::Result<u64> {
        let mut h = DefaultHasher::new();
        let files = yaml_files(std::slice::from_ref(&self.dir)).map_err(std::io::Error::other)?;
        for f in files {
            let m = fs::metadata(&f)?;
            f.hash(&mut h);
            m.len().hash(&mut h);
            m.modified()?.hash(&mut h);
        }
        Ok(h.finish())
    }

    /// Reads everything. Only an unreadable directory is an error; bad files are reported
    /// in the snapshot and the rest is used.
    pub fn load(&self) -> anyhow::Result<Snapshot> {
        let mut snap = Snapshot::default();
        for f in yaml_files(std::slice::from_ref(&self.dir))? {
            let name = f.display().to_string();
            let text = match fs::read_to_string(&f) {
                Ok(t) => t,
                Err(e) => {
                    snap.errors
                        .push(loose(&name, None, format!("cannot read: {e}")));
                    continue;
                }
            };
            let parsed = api::parse(&text, Some(&name));
            snap.objects.extend(parsed.objects);
            snap.errors.extend(parsed.errors);
            for (value, line) in parsed.other {
                self.other(value, line, &name, &mut snap);
            }
        }
        Ok(snap)
    }

    fn other(&self, value: Value, line: Option<usize>, file: &str, snap: &mut Snapshot) {
        let cluster_value = match value.get("cluster") {
            Some(c) => c.clone(),
            None if ["namespaces", "pods", "nodes", "externals", "dns"]
                .iter()
                .any(|k| value.get(k).is_some()) =>
            {
                value.clone()
            }
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
        // a conformance case also carries policies
        if let Some(Value::Sequence(items)) = value.get("policies") {
            for item in items {
                let p = api::parse_value(item.clone(), Some(file));
                snap.objects.extend(p.objects);
                snap.errors.extend(p.errors);
            }
        }
    }
}

impl Source for FilesSource {
    fn name(&self) -> &'static str {
        "files"
    }

    /// The first call reads at once; later calls poll the fingerprint and read when it
    /// changes. A read that races a writer is harmless: the writer's next change of
    /// size or time changes the fingerprint again.
    fn next(&mut self) -> BoxFuture<'_, anyhow::Result<Snapshot>> {
        Box::pin(async move {
            loop {
                let fp = match self.fingerprint() {
                    Ok(fp) => Some(fp),
                    Err(e) if self.seen.is_none() => {
                        return Err(anyhow::anyhow!("{}: {e}", self.dir().display()))
                    }
                    // A file vanished between listing and stat: look again.
                    Err(_) => None,
                };
                if let Some(fp) = fp {
                    if self.seen != Some(fp) {
                        let snap = self.load()?;
                        self.seen = Some(fp);
                        return Ok(snap);
                    }
                }
                tokio::time::sleep(self.poll).await;
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

    #[test]
    fn the_fingerprint_follows_changes() {
        let d = Dir::new("fingerprint");
        let src = FilesSource::new(&d.0);
        let f0 = src.fingerprint().expect("fp");
        assert_eq!(f0, src.fingerprint().expect("fp"), "stable without changes");
        fs::write(d.0.join("a.yaml"), "namespaces: []\n").expect("write");
        let f1 = src.fingerprint().expect("fp");
        assert_ne!(f0, f1, "a new file");
        fs::write(d.0.join("a.yaml"), "namespaces: [{name: x}]\n").expect("write");
        assert_ne!(f1, src.fingerprint().expect("fp"), "a changed file");
        fs::remove_file(d.0.join("a.yaml")).expect("rm");
        assert_eq!(f0, src.fingerprint().expect("fp"), "back to the start");
    }

    #[tokio::test]
    async fn next_returns_at_once_then_on_change() {
        let d = Dir::new("next");
        fs::write(d.0.join("c.yaml"), "namespaces: [{name: a}]\n").expect("write");
        let mut src = FilesSource::new(&d.0).with_poll(std::time::Duration::from_millis(5));
        let first = src.next().await.expect("first");
        assert_eq!(first.cluster.namespaces.len(), 1);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(100), src.next()).await;
        assert!(pending.is_err(), "no change, no snapshot");
        fs::write(d.0.join("c.yaml"), "namespaces: [{name: a}, {name: b}]\n").expect("write");
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), src.next())
            .await
            .expect("a change is seen")
            .expect("load");
        assert_eq!(second.cluster.namespaces.len(), 2);
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
