//! The DaemonSet's agent container as podman runs it on one machine.
//!
//! [`AgentSpec::from_daemonset`] reads the container spec of `deploy/daemonset.yaml` (image,
//! args, env, security context, capabilities, mounts and their volumes, memory limit,
//! probes) so that nothing of it is written down twice; [`AgentRun::command`] turns it into
//! one `podman run` for a given host: which network namespace stands for the node's host
//! network, where each volume comes from, the downward-API values, extra agent flags.
//!
//! Two users: `cargo xtask image check` (one agent in a node namespace it makes) and
//! `ward-lab --agent-image` (every node's agent of a lab). Both keep the image in a podman
//! store of their own ([`store_args`]), so nothing of the machine's store is used.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

/// `deploy/daemonset.yaml` as this build was made with it.
pub const DAEMONSET: &str = include_str!("../../../deploy/daemonset.yaml");
/// `deploy/configmap.yaml` as this build was made with it.
pub const CONFIGMAP: &str = include_str!("../../../deploy/configmap.yaml");
/// The ConfigMap that holds the agent's config file.
pub const CONFIGMAP_NAME: &str = "ward-config";

/// Why the manifests cannot be read or run as asked: the field or the value, and what
/// is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl From<String> for Error {
    fn from(s: String) -> Error {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Error {
        Error(s.to_string())
    }
}

/// For callers whose errors are strings (xtask).
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.0
    }
}

type Result<T> = std::result::Result<T, Error>;

/// The parts of the DaemonSet's agent container that decide how it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// `image:` as the manifest names it.
    pub image: String,
    /// `args:` (the image's entrypoint is `ward`).
    pub args: Vec<String>,
    /// `env:` entries: name and, for plain values, the value (`None`: from the downward
    /// API, given by the run).
    pub env: Vec<(String, Option<String>)>,
    /// `spec.template.spec.hostNetwork`.
    pub host_network: bool,
    /// `securityContext.runAsUser`.
    pub run_as_user: Option<u32>,
    /// `securityContext.readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `securityContext.allowPrivilegeEscalation` (false: no_new_privs).
    pub allow_privilege_escalation: bool,
    /// `securityContext.privileged`.
    pub privileged: bool,
    /// `securityContext.capabilities.drop`, as written (`ALL` or names without `CAP_`).
    pub cap_drop: Vec<String>,
    /// `securityContext.capabilities.add`, as written.
    pub cap_add: Vec<String>,
    /// `securityContext.seccompProfile.type` (of the container, else of the pod).
    pub seccomp: Option<String>,
    /// `resources.limits.memory`, as written (`512Mi`).
    pub memory_limit: Option<String>,
    /// `volumeMounts` joined with their `volumes`.
    pub mounts: Vec<Mount>,
    /// `readinessProbe.httpGet`: path and port number.
    pub readiness: Option<(String, u16)>,
    /// `livenessProbe.httpGet`: path and port number.
    pub liveness: Option<(String, u16)>,
}

/// One `volumeMount` and the volume behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The volume's name.
    pub name: String,
    /// `mountPath`.
    pub path: String,
    /// `readOnly`.
    pub read_only: bool,
    /// `mountPropagation` (`HostToContainer`, `Bidirectional`), when set.
    pub propagation: Option<String>,
    /// `hostPath.path` of a hostPath volume; `None` for other kinds (a ConfigMap).
    pub host_path: Option<String>,
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let seq = v
        .as_sequence()
        .ok_or_else(|| Error(format!("{what}: not a list")))?;
    seq.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error(format!("{what}[{i}]: not a string")))
        })
        .collect()
}

fn flag(v: Option<&Value>, what: &str) -> Result<Option<bool>> {
    v.map(|b| {
        b.as_bool()
            .ok_or_else(|| Error(format!("{what}: not a boolean")))
    })
    .transpose()
}

/// `probe.httpGet` as (path, port), the port a number or the name of a container port.
fn http_probe(c: &Value, probe: &str, at: &str) -> Result<Option<(String, u16)>> {
    let Some(get) = field(c, &[probe, "httpGet"]) else {
        return Ok(None);
    };
    let at = format!("{at}.{probe}.httpGet");
    let path = get
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| Error(format!("{at}.path: missing")))?;
    let port = match get.get("port") {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(name)) => c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
    .ok_or_else(|| {
        Error(format!(
            "{at}.port: not a port number or the name of a container port"
        ))
    })?;
    Ok(Some((path.to_string(), port)))
}

impl AgentSpec {
    /// Reads the container named `agent` of the DaemonSet in `yaml`.
    pub fn from_daemonset(yaml: &str) -> Result<AgentSpec> {
        let doc: Value = serde_yaml::from_str(yaml).map_err(|e| format!("daemonset.yaml: {e}"))?;
        if doc.get("kind").and_then(Value::as_str) != Some("DaemonSet") {
            return Err("daemonset.yaml: kind is not DaemonSet".into());
        }
        let pod = field(&doc, &["spec", "template", "spec"])
            .ok_or(Error::from("daemonset.yaml: no spec.template.spec"))?;
        let containers = pod
            .get("containers")
            .and_then(Value::as_sequence)
            .ok_or(Error::from(
                "daemonset.yaml: spec.template.spec.containers: not a list",
            ))?;
        let (i, c) = containers
            .iter()
            .enumerate()
            .find(|(_, c)| c.get("name").and_then(Value::as_str) == Some("agent"))
            .ok_or(Error::from("daemonset.yaml: no container named agent"))?;
        let at = format!("spec.template.spec.containers[{i}]");
        let image = c
            .get("image")
            .and_then(Value::as_str)
            .ok_or_else(|| Error(format!("{at}.image: missing")))?
            .to_string();
        let args = strings(c.get("args"), &format!("{at}.args"))?;
        let mut env = Vec::new();
        for (j, e) in c
            .get("env")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let name = e
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| Error(format!("{at}.env[{j}].name: missing")))?;
            let value = e.get("value").and_then(Value::as_str).map(str::to_string);
            env.push((name.to_string(), value));
        }
        let sc = c.get("securityContext");
        let sc_field = |k: &[&str]| sc.and_then(|s| field(s, k));
        let run_as_user = sc_field(&["runAsUser"])
            .map(|u| {
                u.as_u64()
                    .and_then(|u| u32::try_from(u).ok())
                    .ok_or_else(|| Error(format!("{at}.securityContext.runAsUser: not a user id")))
            })
            .transpose()?;
        let volumes = pod
            .get("volumes")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        let mut mounts = Vec::new();
        for (j, m) in c
            .get("volumeMounts")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mat = format!("{at}.volumeMounts[{j}]");
            let name = m
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| Error(format!("{mat}.name: missing")))?;
            let path = m
                .get("mountPath")
                .and_then(Value::as_str)
                .ok_or_else(|| Error(format!("{mat}.mountPath: missing")))?;
            let volume = volumes
                .iter()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
                .ok_or_else(|| Error(format!("{mat}: no volume named {name}")))?;
            mounts.push(Mount {
                name: name.to_string(),
                path: path.to_string(),
                read_only: flag(m.get("readOnly"), &format!("{mat}.readOnly"))?.unwrap_or(false),
                propagation: m
                    .get("mountPropagation")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                host_path: field(volume, &["hostPath", "path"])
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
        Ok(AgentSpec {
            image,
            args,
            env,
            host_network: flag(pod.get("hostNetwork"), "spec.template.spec.hostNetwork")?
                .unwrap_or(false),
            run_as_user,
            read_only_root: flag(
                sc_field(&["readOnlyRootFilesystem"]),
                &format!("{at}.securityContext.readOnlyRootFilesystem"),
            )?
            .unwrap_or(false),
            allow_privilege_escalation: flag(
                sc_field(&["allowPrivilegeEscalation"]),
                &format!("{at}.securityContext.allowPrivilegeEscalation"),
            )?
            .unwrap_or(true),
            privileged: flag(
                sc_field(&["privileged"]),
                &format!("{at}.securityContext.privileged"),
            )?
            .unwrap_or(false),
            cap_drop: strings(
                sc_field(&["capabilities", "drop"]),
                &format!("{at}.securityContext.capabilities.drop"),
            )?,
            cap_add: strings(
                sc_field(&["capabilities", "add"]),
                &format!("{at}.securityContext.capabilities.add"),
            )?,
            seccomp: sc_field(&["seccompProfile", "type"])
                .or_else(|| field(pod, &["securityContext", "seccompProfile", "type"]))
                .and_then(Value::as_str)
                .map(str::to_string),
            memory_limit: field(c, &["resources", "limits", "memory"])
                .and_then(Value::as_str)
                .map(str::to_string),
            mounts,
            readiness: http_probe(c, "readinessProbe", &at)?,
            liveness: http_probe(c, "livenessProbe", &at)?,
        })
    }
}

/// The files of the ConfigMap `name` in `yaml` (`data:` keys and values).
pub fn configmap_files(yaml: &str, name: &str) -> Result<Vec<(String, String)>> {
    let doc: Value = serde_yaml::from_str(yaml).map_err(|e| format!("configmap.yaml: {e}"))?;
    if doc.get("kind").and_then(Value::as_str) != Some("ConfigMap")
        || field(&doc, &["metadata", "name"]).and_then(Value::as_str) != Some(name)
    {
        return Err(Error(format!("configmap.yaml: not the ConfigMap {name}")));
    }
    let data = doc
        .get("data")
        .and_then(Value::as_mapping)
        .ok_or(Error::from("configmap.yaml: data: not a map"))?;
    data.iter()
        .map(|(k, v)| match (k.as_str(), v.as_str()) {
            (Some(k), Some(v)) => Ok((k.to_string(), v.to_string())),
            _ => Err(Error(format!("configmap.yaml: data.{k:?}: not a string"))),
        })
        .collect()
}

/// The admin token file the agent's config names (`admin_token_file:` of the file
/// `config.yaml` in the ConfigMap's files), if any.
pub fn admin_token_file(files: &[(String, String)]) -> Result<Option<String>> {
    let Some((_, text)) = files.iter().find(|(n, _)| n == "config.yaml") else {
        return Ok(None);
    };
    let doc: Value =
        serde_yaml::from_str(text).map_err(|e| format!("configmap.yaml: config.yaml: {e}"))?;
    Ok(doc
        .get("admin_token_file")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// The mount of `spec` holding the file `path` directly (a Secret's directory), and the
/// file's name in it.
pub fn mount_of<'a>(spec: &'a AgentSpec, path: &str) -> Option<(&'a Mount, String)> {
    let p = std::path::Path::new(path);
    let (dir, name) = (p.parent()?, p.file_name()?);
    let m = spec
        .mounts
        .iter()
        .find(|m| std::path::Path::new(&m.path) == dir)?;
    Some((m, name.to_string_lossy().into_owned()))
}

/// One run of the agent container on this machine.
#[derive(Debug, Clone)]
pub struct AgentRun {
    /// The container's name (`podman logs NAME`, `podman rm -f NAME`).
    pub name: String,
    /// podman's global options (`--root DIR` for a private store).
    pub podman: Vec<String>,
    /// The image to run; the manifest's own reference when `None`.
    pub image: Option<String>,
    /// The network namespace that stands for the node's host network (`/run/netns/NAME`).
    pub netns: PathBuf,
    /// Host directories for volumes by name: required for volumes that are not hostPath
    /// (the ConfigMap), optional for hostPath ones (their own path otherwise).
    pub volumes: Vec<(String, PathBuf)>,
    /// Values of the downward-API variables (`NODE_NAME`, ...); each one the manifest
    /// takes from the downward API must be given.
    pub env: Vec<(String, String)>,
    /// Agent flags after the manifest's args (flags win over the config file).
    pub extra_args: Vec<String>,
    /// Where the container's output goes (podman's `k8s-file` log driver, the kubelet's
    /// format: time, stream, tag, line); podman's own log store when `None`.
    pub log_file: Option<PathBuf>,
}

/// podman's global options for a store of its own: images and containers under `root`,
/// run-time state under `runroot` (vfs: plain directories, nothing mounted that could
/// outlive the run; the machine's store is neither read nor changed). podman refuses a
/// runroot longer than [`RUNROOT_MAX`] characters: keep it short (under /run), wherever
/// the checkout is.
pub fn store_args(root: &Path, runroot: &Path) -> Result<Vec<String>> {
    let run = runroot.display().to_string();
    if run.len() > RUNROOT_MAX {
        return Err(Error(format!(
            "podman runroot {run}: longer than podman's {RUNROOT_MAX} characters"
        )));
    }
    Ok(vec![
        "--root".into(),
        root.display().to_string(),
        "--runroot".into(),
        run,
        "--tmpdir".into(),
        runroot.join("libpod").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ])
}

/// The longest runroot podman takes.
pub const RUNROOT_MAX: usize = 50;

/// What every container here runs with: Debian's podman with runc, and ulimits that
/// the runtime can set. Without `--ulimit`, podman asks for more than the machine's hard
/// limits, and runc, which sets them from outside the container, cannot raise a limit
/// without CAP_SYS_RESOURCE (which root lacks on some machines, this one included).
/// Open files: the machine's hard limit, as a node gives the agent. Processes: 4,096,
/// under what podman's conmon keeps (32,768 here); root in the container is exempt
/// from the limit anyway, and the image's other user runs one process.
pub fn podman_runtime_args() -> Result<Vec<String>> {
    let limits = std::fs::read_to_string("/proc/self/limits")
        .map_err(|e| format!("/proc/self/limits: {e}"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or(Error::from("/proc/self/limits: no \"Max open files\""))?;
    // "Max open files  SOFT  HARD  files" (open files are never unlimited)
    let nofile: u64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error(format!("/proc/self/limits: cannot read {line:?}")))?;
    Ok([
        "--runtime".to_string(),
        "runc".into(),
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        format!("nproc={NPROC}:{NPROC}"),
    ]
    .to_vec())
}

/// The process limit of containers run here (see [`podman_runtime_args`]).
const NPROC: u64 = 4096;

/// `512Mi` -> `512m`, `1Gi` -> `1g`, plain bytes as they are.
fn podman_memory(q: &str) -> Result<String> {
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = q.strip_suffix(suffix) {
            if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) {
                return Ok(format!("{n}{unit}"));
            }
        }
    }
    if !q.is_empty() && q.chars().all(|c| c.is_ascii_digit()) {
        return Ok(q.to_string());
    }
    Err(Error(format!(
        "resources.limits.memory {q:?}: only Ki, Mi, Gi or bytes"
    )))
}

/// Kubernetes capability names (`NET_ADMIN`) as podman takes them (`CAP_NET_ADMIN`).
fn cap(name: &str) -> String {
    if name.eq_ignore_ascii_case("all") {
        "all".into()
    } else {
        format!("CAP_{}", name.trim_start_matches("CAP_"))
    }
}

impl AgentRun {
    /// The `podman run --detach` that runs `spec` as the kubelet would: the same user,
    /// capabilities, no_new_privs, seccomp profile, read-only root (without podman's own
    /// tmpfs mounts, which Kubernetes does not add), mounts with their propagation,
    /// memory limit.
    pub fn command(&self, spec: &AgentSpec) -> Result<Command> {
        if !spec.host_network {
            return Err("the DaemonSet's pod does not use hostNetwork".into());
        }
        let mut c = Command::new("podman");
        c.args(&self.podman);
        c.args(["run", "--detach", "--pull", "never", "--name", &self.name]);
        c.args(podman_runtime_args()?);
        if let Some(log) = &self.log_file {
            c.args(["--log-driver", "k8s-file", "--log-opt"])
                .arg(format!("path={}", log.display()));
        }
        c.arg("--network")
            .arg(format!("ns:{}", self.netns.display()));
        if spec.privileged {
            c.arg("--privileged");
        }
        if let Some(u) = spec.run_as_user {
            c.arg("--user").arg(u.to_string());
        }
        if spec.read_only_root {
            c.args(["--read-only", "--read-only-tmpfs=false"]);
        }
        if !spec.allow_privilege_escalation {
            c.args(["--security-opt", "no-new-privileges"]);
        }
        // Without a profile, the kubelet runs the container unconfined (unless its
        // seccompDefault is on); RuntimeDefault is the runtime's profile, podman's here.
        match spec.seccomp.as_deref() {
            Some("RuntimeDefault") => {}
            None | Some("Unconfined") => {
                c.args(["--security-opt", "seccomp=unconfined"]);
            }
            Some(other) => {
                return Err(Error(format!(
                    "seccompProfile type {other}: not supported here"
                )))
            }
        }
        for d in &spec.cap_drop {
            c.arg("--cap-drop").arg(cap(d));
        }
        for a in &spec.cap_add {
            c.arg("--cap-add").arg(cap(a));
        }
        if let Some(m) = &spec.memory_limit {
            c.arg("--memory").arg(podman_memory(m)?);
        }
        for m in &spec.mounts {
            let given = self.volumes.iter().find(|(n, _)| *n == m.name);
            let host = match (given, &m.host_path) {
                (Some((_, p)), _) => p.clone(),
                (None, Some(h)) => PathBuf::from(h),
                (None, None) => {
                    return Err(Error(format!("volume {}: no host directory given", m.name)));
                }
            };
            let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
            match m.propagation.as_deref() {
                None | Some("None") => {}
                Some("HostToContainer") => opts.push("rslave"),
                Some("Bidirectional") => opts.push("rshared"),
                Some(p) => return Err(Error(format!("volume {}: mountPropagation {p}", m.name))),
            }
            c.arg("--volume")
                .arg(format!("{}:{}:{}", host.display(), m.path, opts.join(",")));
        }
        for (name, _) in &self.volumes {
            if !spec.mounts.iter().any(|m| m.name == *name) {
                return Err(Error(format!(
                    "volume {name}: the DaemonSet mounts no such volume"
                )));
            }
        }
        for (name, value) in &spec.env {
            let v = match value {
                Some(v) => v,
                None => self
                    .env
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v)
                    .ok_or_else(|| Error(format!("env {name}: no value given")))?,
            };
            c.arg("--env").arg(format!("{name}={v}"));
        }
        c.arg(self.image.as_deref().unwrap_or(&spec.image));
        c.args(&spec.args).args(&self.extra_args);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> AgentSpec {
        AgentSpec::from_daemonset(DAEMONSET).unwrap()
    }

    #[test]
    fn the_daemonset_reads_as_the_agent_container() {
        let s = spec();
        assert_eq!(s.args[..3], ["agent", "--config", "/etc/ward/config.yaml"]);
        assert!(s.host_network);
        assert_eq!(s.cap_drop, ["ALL"]);
        assert!(s.cap_add.iter().any(|c| c == "BPF"), "{:?}", s.cap_add);
        assert!(s.read_only_root && !s.allow_privilege_escalation && !s.privileged);
        assert_eq!(s.run_as_user, Some(0));
        // explicit: podman's and CRI-O's default profiles refuse bpf() without SYS_ADMIN
        assert_eq!(s.seccomp.as_deref(), Some("Unconfined"));
        // NET_BIND_SERVICE: the DNS proxy's UDP answers leave from the server's port 53
        assert_eq!(
            s.cap_add,
            ["BPF", "NET_ADMIN", "NET_BIND_SERVICE", "PERFMON"]
        );
        let bpffs = s.mounts.iter().find(|m| m.path == "/sys/fs/bpf").unwrap();
        assert_eq!(bpffs.host_path.as_deref(), Some("/sys/fs/bpf"));
        assert_eq!(bpffs.propagation.as_deref(), Some("HostToContainer"));
        let config = s.mounts.iter().find(|m| m.path == "/etc/ward").unwrap();
        assert!(config.read_only && config.host_path.is_none());
        assert!(s.env.iter().any(|(n, v)| n == "NODE_NAME" && v.is_none()));
        assert_eq!(s.readiness, Some(("/readyz".to_string(), 9890)));
        assert_eq!(s.liveness, Some(("/healthz".to_string(), 9890)));
    }

    /// A rolling update runs the new agent beside the old one on each node: a surge pod,
    /// which the scheduler refuses for a hostNetwork pod that declares ports (host
    /// ports); both share the state directory, where the hand-off socket is, and the
    /// old one has time to drain.
    #[test]
    fn the_daemonset_rolls_with_a_surge_pod_that_takes_the_sockets_over() {
        let ds: Value = serde_yaml::from_str(DAEMONSET).unwrap();
        let rolling = field(&ds, &["spec", "updateStrategy", "rollingUpdate"]).unwrap();
        assert_eq!(rolling["maxSurge"], 1);
        assert_eq!(rolling["maxUnavailable"], 0);
        let pod = field(&ds, &["spec", "template", "spec"]).unwrap();
        for c in pod["containers"].as_sequence().unwrap() {
            assert!(c.get("ports").is_none(), "{:?} declares ports", c["name"]);
        }
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > 30, "grace {grace} s, the drain window is 30 s");
        let state = spec()
            .mounts
            .into_iter()
            .find(|m| m.path == "/var/lib/ward")
            .unwrap();
        assert_eq!(state.host_path.as_deref(), Some("/var/lib/ward"));
    }

    #[test]
    fn the_configmap_holds_the_agents_config_file() {
        let files = configmap_files(CONFIGMAP, CONFIGMAP_NAME).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, "config.yaml");
        assert!(files[0].1.contains("admin: 0.0.0.0:9890"), "{}", files[0].1);
        assert!(configmap_files(CONFIGMAP, "other").is_err());
    }

    /// The admin listener is bound beyond loopback: the config names a token file, and
    /// the DaemonSet mounts the Secret ward-admin-token where that file is.
    #[test]
    fn the_admin_token_file_is_the_mounted_secret() {
        let file = admin_token_file(&configmap_files(CONFIGMAP, CONFIGMAP_NAME).unwrap())
            .unwrap()
            .expect("admin_token_file in the config");
        let s = spec();
        let (m, name) = mount_of(&s, &file).expect("a mount holding the token file");
        assert_eq!((m.name.as_str(), name.as_str()), ("admin-token", "token"));
        assert!(m.read_only && m.host_path.is_none());
        let ds: Value = serde_yaml::from_str(DAEMONSET).unwrap();
        let volume = field(&ds, &["spec", "template", "spec", "volumes"])
            .and_then(Value::as_sequence)
            .unwrap()
            .iter()
            .find(|v| v["name"] == "admin-token")
            .unwrap();
        assert_eq!(volume["secret"]["secretName"], "ward-admin-token");
        assert_eq!(volume["secret"]["optional"], false);
        // `kubectl exec ... -- ward status` in the container finds the token by itself
        assert!(
            s.env
                .iter()
                .any(|(n, v)| n == "WARD_ADMIN_TOKEN_FILE" && v.as_deref() == Some(file.as_str())),
            "{:?}",
            s.env
        );
    }

    fn run() -> AgentRun {
        AgentRun {
            name: "w".into(),
            podman: vec!["--root".into(), "/tmp/store".into()],
            image: Some("img".into()),
            netns: "/run/netns/n".into(),
            volumes: vec![
                ("config".into(), "/tmp/cfg".into()),
                ("admin-token".into(), "/tmp/tok".into()),
            ],
            env: ["NODE_NAME", "POD_NAME", "POD_NAMESPACE"]
                .map(|n| (n.to_string(), "v".to_string()))
                .to_vec(),
            extra_args: vec!["--node".into(), "n1".into()],
            log_file: None,
        }
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_podman_command_carries_the_security_context_and_mounts() {
        let s = spec();
        let args = args(&run().command(&s).unwrap());
        let has = |pair: &[&str]| args.windows(pair.len()).any(|w| w == pair);
        assert_eq!(args[..3], ["--root", "/tmp/store", "run"]);
        assert!(has(&["--runtime", "runc"]));
        assert!(has(&["--network", "ns:/run/netns/n"]));
        assert!(has(&["--user", "0"]));
        assert!(has(&["--read-only", "--read-only-tmpfs=false"]));
        assert!(has(&["--security-opt", "no-new-privileges"]));
        assert!(has(&["--cap-drop", "all"]));
        assert!(has(&["--cap-add", "CAP_BPF"]));
        assert!(has(&["--memory", "768m"]));
        assert!(has(&["--volume", "/tmp/cfg:/etc/ward:ro"]));
        assert!(has(&["--volume", "/tmp/tok:/etc/ward-admin:ro"]));
        assert!(has(&["--volume", "/sys/fs/bpf:/sys/fs/bpf:rw,rslave"]));
        assert!(has(&["--env", "NODE_NAME=v"]));
        let tail = &args[args.len() - s.args.len() - 3..];
        assert_eq!(tail[0], "img");
        assert_eq!(tail[1..=s.args.len()], s.args[..]);
        assert_eq!(tail[tail.len() - 2..], ["--node", "n1"]);
    }

    /// The output goes to the file given, in the kubelet's format; podman keeps it
    /// otherwise.
    #[test]
    fn the_log_file_is_podmans_k8s_file_log() {
        let mut r = run();
        let a = args(&r.command(&spec()).unwrap());
        assert!(!a.iter().any(|x| x == "--log-driver"), "{a:?}");
        r.log_file = Some("/tmp/lab/agent-n1.log".into());
        let a = args(&r.command(&spec()).unwrap());
        assert!(a.windows(4).any(|w| w
            == [
                "--log-driver",
                "k8s-file",
                "--log-opt",
                "path=/tmp/lab/agent-n1.log"
            ]));
        // podman's options, before the image
        let image = a.iter().position(|x| x == "img").unwrap();
        assert!(a.iter().position(|x| x == "--log-driver").unwrap() < image);
    }

    #[test]
    fn the_seccomp_profile_follows_the_kubelet() {
        let mut s = spec();
        s.seccomp = None;
        let a = args(&run().command(&s).unwrap());
        assert!(a
            .windows(2)
            .any(|w| w == ["--security-opt", "seccomp=unconfined"]));
        s.seccomp = Some("RuntimeDefault".into());
        let a = args(&run().command(&s).unwrap());
        assert!(!a.iter().any(|x| x.starts_with("seccomp=")));
        s.seccomp = Some("Localhost".into());
        assert!(run().command(&s).is_err());
    }

    #[test]
    fn a_missing_volume_or_variable_is_an_error_not_a_silent_default() {
        let mut r = run();
        r.volumes.clear();
        assert_eq!(
            r.command(&spec()).unwrap_err().to_string(),
            "volume config: no host directory given"
        );
        let mut r = run();
        r.env.retain(|(n, _)| n != "POD_NAME");
        assert_eq!(
            r.command(&spec()).unwrap_err().to_string(),
            "env POD_NAME: no value given"
        );
        let mut r = run();
        r.volumes.push(("cache".into(), "/tmp".into()));
        assert!(r
            .command(&spec())
            .unwrap_err()
            .to_string()
            .contains("no such volume"));
        let mut s = spec();
        s.host_network = false;
        assert!(run()
            .command(&s)
            .unwrap_err()
            .to_string()
            .contains("hostNetwork"));
    }

    #[test]
    fn a_runroot_podman_would_refuse_is_an_error_before_podman_runs() {
        let a = store_args(
            Path::new("/work/a/long/checkout/target/x/store"),
            Path::new("/run/w-1"),
        )
        .unwrap();
        assert_eq!(
            a,
            [
                "--root",
                "/work/a/long/checkout/target/x/store",
                "--runroot",
                "/run/w-1",
                "--tmpdir",
                "/run/w-1/libpod",
                "--storage-driver",
                "vfs"
            ]
        );
        let long = format!("/run/{}", "x".repeat(RUNROOT_MAX - 4));
        assert!(store_args(Path::new("/s"), Path::new(&long))
            .unwrap_err()
            .to_string()
            .contains("longer than"));
    }

    #[test]
    fn memory_quantities_convert_or_fail() {
        assert_eq!(podman_memory("512Mi").unwrap(), "512m");
        assert_eq!(podman_memory("1Gi").unwrap(), "1g");
        assert!(podman_memory("0.5Gi").is_err());
    }

    #[test]
    fn ulimits_are_the_hard_limits_of_this_machine() {
        let a = podman_runtime_args().unwrap();
        let nofile = a.iter().find(|x| x.starts_with("nofile=")).unwrap();
        let (soft, hard) = nofile["nofile=".len()..].split_once(':').unwrap();
        assert_eq!(soft, hard);
        assert!(hard.parse::<u64>().unwrap() > 0, "{nofile}");
        assert!(a.iter().any(|x| x == "nproc=4096:4096"), "{a:?}");
    }
}
