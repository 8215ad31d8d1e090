//! `--agent-image ARCHIVE`: every node's agent as a container of the node image, run as
//! `deploy/daemonset.yaml` runs it (the `container` crate reads the spec: user,
//! capabilities, no_new_privs, seccomp, read-only root, the bpffs mount with its
//! propagation, the config, state and admin-token volumes, memory limit) with podman, in
//! the node's namespace as its host network.
//!
//! The archive is loaded into a podman store of the lab's own (`RUN_DIR/podman`, vfs), so
//! the machine's store is neither read nor changed and concurrent labs do not meet. The
//! volumes, on this machine:
//!
//! ```text
//! config       RUN_DIR/etc: deploy/configmap.yaml's files; source/ (the files source,
//!              RUN_DIR/source is a link to it) and certs/ (the TLS secrets, RUN_DIR/certs)
//! state        RUN_DIR/agent/NODE, as for a host agent
//! bpffs        /sys/fs/bpf (the manifest's hostPath); each agent pins under its node's
//!              bpf root, given as a flag
//! admin-token  RUN_DIR/admin-token/token: a token of the lab's own, which `check`,
//!              `observe` and `ui` send
//! ```
//!
//! What differs from a node is given as flags, which win over the config file: the files
//! source instead of the API server, the lab's bpf root, the uplink and the certificates
//! directory. Containers are named `NODE_NETNS-agent` and recorded in the lab state before
//! they are started, so `down` removes them also after a crash.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use container::{AgentRun, AgentSpec};
use serde::{Deserialize, Serialize};

use crate::topology::{LabState, NodeState};

/// The lab's image and store, recorded in its state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageState {
    /// The oci-archive the agents run (`cargo xtask image` writes
    /// `target/image/ward-VERSION.oci.tar`).
    pub archive: PathBuf,
    /// The lab's podman store (`RUN_DIR/podman`).
    pub store: PathBuf,
    /// The loaded image's id in that store.
    #[serde(default)]
    pub image_id: Option<String>,
    /// The admin token's file on this machine, when the agents' config names one.
    #[serde(default)]
    pub admin_token: Option<PathBuf>,
}

/// The volumes' names in the DaemonSet that the lab fills (the others are hostPath).
const CONFIG_VOLUME: &str = "config";
const STATE_VOLUME: &str = "state";

/// The config volume's directory on this machine.
fn config_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("etc")
}

/// Where the admin token's header for curl is kept (`curl -H @FILE`: the token stays off
/// command lines).
pub fn token_header(run_dir: &Path) -> PathBuf {
    run_dir.join("admin-token.header")
}

/// Records the image in `state` and lays the run directory out for the containers: the
/// config volume's directory holds the files source and the certificates, which the lab
/// writes through `RUN_DIR/source` and `RUN_DIR/certs` (links), so that the agents see
/// them under the config volume's mount. Called before anything is written there.
pub fn prepare(state: &mut LabState, archive: &Path) -> Result<()> {
    if !archive.is_file() {
        bail!(
            "--agent-image {}: no such file (an oci-archive: `cargo xtask image` writes \
             target/image/ward-VERSION.oci.tar)",
            archive.display()
        );
    }
    let archive = archive
        .canonicalize()
        .with_context(|| format!("--agent-image {}", archive.display()))?;
    let etc = config_dir(&state.run_dir);
    for dir in ["source", "certs"] {
        fs::create_dir_all(etc.join(dir))
            .with_context(|| format!("cannot create {}", etc.join(dir).display()))?;
        let link = state.run_dir.join(dir);
        symlink(Path::new("etc").join(dir), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    state.image = Some(ImageState {
        archive,
        store: state.run_dir.join("podman"),
        image_id: None,
        admin_token: None,
    });
    state.save()
}

/// podman's options for the lab's store: `STORE/store` and `STORE/run` (the run
/// directory's path is short, as podman wants its runroot).
fn store_args(image: &ImageState) -> Result<Vec<String>> {
    Ok(container::store_args(
        &image.store.join("store"),
        &image.store.join("run"),
    )?)
}

/// podman with the lab's store.
fn podman(image: &ImageState) -> Result<Command> {
    let mut c = Command::new("podman");
    c.args(store_args(image)?);
    Ok(c)
}

/// The stdout of a podman command that must succeed.
fn podman_out(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?} (Debian package podman)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Loads the archive into the lab's store and writes the config and admin-token volumes.
fn load(state: &mut LabState, spec: &AgentSpec) -> Result<()> {
    let Some(image) = state.image.clone() else {
        bail!("lab {}: no agent image prepared", state.id);
    };
    podman_out(
        podman(&image)?
            .args(["load", "--quiet", "--input"])
            .arg(&image.archive),
    )?;
    let ids = podman_out(podman(&image)?.args(["images", "--quiet", "--no-trunc"]))?;
    let ids: Vec<&str> = ids.lines().collect();
    let [id] = ids.as_slice() else {
        bail!(
            "--agent-image {}: the archive holds {} images, not one",
            image.archive.display(),
            ids.len()
        );
    };
    let files = container::configmap_files(container::CONFIGMAP, container::CONFIGMAP_NAME)?;
    let etc = config_dir(&state.run_dir);
    for (name, text) in &files {
        fs::write(etc.join(name), text)
            .with_context(|| format!("cannot write {}", etc.join(name).display()))?;
    }
    let admin_token = match container::admin_token_file(&files)? {
        None => None,
        Some(file) => {
            let (mount, name) = container::mount_of(spec, &file).ok_or_else(|| {
                anyhow!("the DaemonSet mounts nothing holding the admin token file {file}")
            })?;
            let dir = state.run_dir.join(&mount.name);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let token = new_token()?;
            let path = dir.join(name);
            fs::write(&path, format!("{token}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            // the Secret volume's defaultMode
            fs::set_permissions(&path, fs::Permissions::from_mode(0o400))?;
            // root's only, as the token itself
            let header = token_header(&state.run_dir);
            fs::write(&header, format!("Authorization: Bearer {token}\n"))
                .with_context(|| format!("cannot write {}", header.display()))?;
            fs::set_permissions(&header, fs::Permissions::from_mode(0o600))?;
            Some(path)
        }
    };
    state.image = Some(ImageState {
        image_id: Some(id.to_string()),
        admin_token,
        ..image
    });
    state.save()
}

/// 32 hex digits from the kernel's random source.
fn new_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The container of `node`'s agent: its name, and the run of the DaemonSet's spec on
/// this machine.
pub fn agent_run(
    state: &LabState,
    image: &ImageState,
    spec: &AgentSpec,
    node: &NodeState,
    cidr_matches_cluster: bool,
) -> Result<AgentRun> {
    let mount_of = |volume: &str| {
        spec.mounts
            .iter()
            .find(|m| m.name == volume)
            .map(|m| PathBuf::from(&m.path))
            .ok_or_else(|| anyhow!("the DaemonSet's agent mounts no volume {volume}"))
    };
    let etc = mount_of(CONFIG_VOLUME)?;
    let image_id = image
        .image_id
        .clone()
        .ok_or_else(|| anyhow!("lab {}: the agent image is not loaded", state.id))?;
    let mut volumes = vec![
        (CONFIG_VOLUME.to_string(), config_dir(&state.run_dir)),
        (
            STATE_VOLUME.to_string(),
            state.run_dir.join("agent").join(&node.name),
        ),
    ];
    if let Some(token) = &image.admin_token {
        let dir = token
            .parent()
            .ok_or_else(|| anyhow!("{}: no directory", token.display()))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow!("{}: no volume name", dir.display()))?;
        volumes.push((name, dir.to_path_buf()));
    }
    let mut extra_args: Vec<String> = vec![
        "--source".into(),
        "files".into(),
        "--source-dir".into(),
        etc.join("source").display().to_string(),
        "--certificates-dir".into(),
        etc.join("certs").display().to_string(),
        "--bpf-root".into(),
        node.bpf_root.display().to_string(),
        "--uplink".into(),
        "up0".into(),
    ];
    if cidr_matches_cluster {
        extra_args.push("--cidr-matches-cluster".into());
    }
    Ok(AgentRun {
        name: container_name(node),
        podman: store_args(image)?,
        image: Some(image_id),
        netns: Path::new("/run/netns").join(&node.netns),
        volumes,
        env: vec![
            ("NODE_NAME".into(), node.name.clone()),
            ("POD_NAME".into(), format!("ward-agent-{}", node.name)),
            ("POD_NAMESPACE".into(), "ward-system".into()),
        ],
        extra_args,
        log_file: Some(state.run_dir.join(format!("agent-{}.log", node.name))),
    })
}

/// The name of `node`'s agent container (unique on the machine: the namespace carries
/// the lab id).
fn container_name(node: &NodeState) -> String {
    format!("{}-agent", node.netns)
}

/// Loads the image and starts every node's agent container; records each container
/// before it is started and the agent's PID (on this machine) once it runs.
pub fn start_agents(state: &mut LabState, cidr_matches_cluster: bool) -> Result<()> {
    let spec = AgentSpec::from_daemonset(container::DAEMONSET)?;
    load(state, &spec)?;
    let Some(image) = state.image.clone() else {
        bail!("lab {}: no agent image prepared", state.id);
    };
    for i in 0..state.nodes.len() {
        let node = state.nodes[i].clone();
        fs::create_dir_all(state.run_dir.join("agent").join(&node.name))?;
        let run = agent_run(state, &image, &spec, &node, cidr_matches_cluster)?;
        state.nodes[i].container = Some(run.name.clone());
        state.save()?;
        podman_out(&mut run.command(&spec)?)
            .with_context(|| format!("cannot start the agent container of {}", node.name))?;
        let pid =
            podman_out(podman(&image)?.args(["inspect", "--format", "{{.State.Pid}}", &run.name]))?;
        // 0 once the container stopped: the readiness wait then reports the exit
        state.nodes[i].agent_pid = pid.parse().ok().filter(|p| *p != 0);
        state.save()?;
    }
    Ok(())
}

/// Stops and removes the lab's agent containers (SIGTERM, SIGKILL after 2 s, as `down`
/// treats host agents). Only the containers the state records, in the lab's own store.
pub fn remove_agents(state: &LabState) -> Vec<String> {
    let Some(image) = &state.image else {
        return Vec::new();
    };
    let names: Vec<&str> = state
        .nodes
        .iter()
        .filter_map(|n| n.container.as_deref())
        .collect();
    if names.is_empty() || !image.store.exists() {
        return Vec::new();
    }
    // --ignore: a container recorded but never started (a crash in between) is no error
    let removed = podman(image).and_then(|mut c| {
        podman_out(
            c.args(["rm", "--force", "--ignore", "--time", "2"])
                .args(&names),
        )
    });
    match removed {
        Ok(_) => Vec::new(),
        Err(e) => vec![format!("{e:#}")],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lab() -> (LabState, ImageState, NodeState) {
        let node = NodeState {
            name: "node-2".into(),
            netns: "wl0000abcd-node-2".into(),
            ip: "172.31.255.2".parse().unwrap(),
            ip6: None,
            bpf_root: "/sys/fs/bpf/ward-lab-wl0000abcd-1".into(),
            agent_pid: None,
            container: None,
        };
        let state = LabState {
            id: "wl0000abcd".into(),
            run_dir: "/run/ward-lab/wl0000abcd".into(),
            nodes: vec![node.clone()],
            ..LabState::default()
        };
        let image = ImageState {
            archive: "/tmp/ward.oci.tar".into(),
            store: "/run/ward-lab/wl0000abcd/podman".into(),
            image_id: Some("sha256:feed".into()),
            admin_token: Some("/run/ward-lab/wl0000abcd/admin-token/token".into()),
        };
        (state, image, node)
    }

    fn args(run: &AgentRun, spec: &AgentSpec) -> Vec<String> {
        run.command(spec)
            .unwrap()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The lab's container is the DaemonSet's: the manifest's security context and
    /// mounts reach podman; only the volumes' sources and the lab's flags are the lab's.
    #[test]
    fn a_node_agent_runs_the_daemonsets_container_spec() {
        let spec = AgentSpec::from_daemonset(container::DAEMONSET).unwrap();
        let (state, image, node) = lab();
        let run = agent_run(&state, &image, &spec, &node, true).unwrap();
        let a = args(&run, &spec);
        let has = |pair: &[&str]| a.windows(pair.len()).any(|w| w == pair);
        assert!(has(&["--root", "/run/ward-lab/wl0000abcd/podman/store"]));
        assert!(has(&["--name", "wl0000abcd-node-2-agent"]));
        assert!(has(&["--network", "ns:/run/netns/wl0000abcd-node-2"]));
        assert!(has(&["--read-only", "--read-only-tmpfs=false"]));
        assert!(has(&["--security-opt", "no-new-privileges"]));
        assert!(has(&["--cap-drop", "all"]));
        for cap in &spec.cap_add {
            assert!(has(&["--cap-add", &format!("CAP_{cap}")]), "{cap}: {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--privileged"));
        assert!(has(&[
            "--volume",
            "/run/ward-lab/wl0000abcd/etc:/etc/ward:ro"
        ]));
        assert!(has(&[
            "--volume",
            "/run/ward-lab/wl0000abcd/agent/node-2:/var/lib/ward:rw"
        ]));
        assert!(has(&[
            "--volume",
            "/run/ward-lab/wl0000abcd/admin-token:/etc/ward-admin:ro"
        ]));
        assert!(has(&["--volume", "/sys/fs/bpf:/sys/fs/bpf:rw,rslave"]));
        assert!(has(&["--env", "NODE_NAME=node-2"]));
        assert!(has(&[
            "--log-opt",
            "path=/run/ward-lab/wl0000abcd/agent-node-2.log"
        ]));
        // the manifest's args, then the lab's flags
        let at = a.iter().position(|x| x == "sha256:feed").unwrap();
        assert_eq!(a[at + 1..at + 1 + spec.args.len()], spec.args[..]);
        let flags = a[at + 1 + spec.args.len()..].join(" ");
        assert_eq!(
            flags,
            "--source files --source-dir /etc/ward/source --certificates-dir /etc/ward/certs \
             --bpf-root /sys/fs/bpf/ward-lab-wl0000abcd-1 --uplink up0 --cidr-matches-cluster"
        );
    }

    #[test]
    fn without_a_loaded_image_or_a_token_the_run_says_so() {
        let spec = AgentSpec::from_daemonset(container::DAEMONSET).unwrap();
        let (state, mut image, node) = lab();
        image.admin_token = None;
        let run = agent_run(&state, &image, &spec, &node, false).unwrap();
        // the manifest mounts the token's Secret: without the lab's token, no volume
        assert_eq!(
            run.command(&spec).unwrap_err().to_string(),
            "volume admin-token: no host directory given"
        );
        image.image_id = None;
        let e = agent_run(&state, &image, &spec, &node, false).unwrap_err();
        assert!(e.to_string().contains("not loaded"), "{e}");
    }
}
