//! `cargo xtask image check`: the image from its archive, as a cluster gets it. Loaded into
//! a podman store of its own (nothing of the machine's store is used or changed):
//!
//! 1. the archive: its index names the image in full (what `podman load` and `ctr images
//!    import` tag it with), one layer holding exactly the image's files, root-owned and
//!    readable by everyone, no shell;
//! 2. the loaded image: the id of the built one, the OCI labels (version, revision), the
//!    entrypoint, a user other than root;
//! 3. `ward --version` and `ward agent --help`, run as the image's user;
//! 4. `ward agent` as the DaemonSet runs it (podman from `deploy/daemonset.yaml`: user,
//!    capabilities, no_new_privs, seccomp, read-only root, bpffs with its propagation,
//!    the config volume holding `deploy/configmap.yaml`'s file, the state volume, the
//!    admin token's volume holding a token of the check's own) in the
//!    host network of a node namespace made here, with two pod namespaces on veths and a
//!    files source of one policy: the DaemonSet's readiness and liveness probes answer,
//!    `/v1/status` without the token is refused (401), `ward status` in the container
//!    (the token from the DaemonSet's `WARD_ADMIN_TOKEN_FILE`, as `kubectl exec` gets it)
//!    reports both pods attached and the policy in force,
//!    the HTTP proxy answers through the redirect (an allowed request reaches the pod's
//!    server, another gets 403), the DNS proxy answers a UDP query it allows from the
//!    server's address and port 53 and refuses another, the datapath lets the allowed
//!    port through and drops
//!    another, nothing is logged as a warning or an error, and the agent stops cleanly
//!    on SIGTERM within the grace period;
//! 5. no `ward lab` in the image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{output, read, write, Image};
use crate::{ensure_debs, root, Result};
use container::{store_args, AgentRun, AgentSpec};

/// The image's files: (mode as `tar -tv` shows it, path).
const FILES: &[(&str, &str)] = &[
    ("drwxr-xr-x", "etc"),
    ("drwxr-xr-x", "etc/ssl"),
    ("drwxr-xr-x", "etc/ssl/certs"),
    ("-rw-r--r--", "etc/ssl/certs/ca-certificates.crt"),
    ("drwxr-xr-x", "usr"),
    ("drwxr-xr-x", "usr/bin"),
    ("-rwxr-xr-x", "usr/bin/ward"),
];

/// The user the image runs as unless told otherwise.
const IMAGE_USER: &str = "65532:65532";

/// The web pod's address (the cluster file below gives it).
const WEB: &str = "10.89.2.2";

/// Builds the image and checks it; returns the image (its archive is what
/// `ward-lab --agent-image` runs next in `cargo xtask test`).
pub fn check() -> Result<Image> {
    let image = super::build()?;
    image.report();
    ensure_debs(&["iproute2", "curl", "dnsutils", "tar", "gzip", "python3"])?;
    let started = Instant::now();
    let mut env = Env::new()?;
    archive(&image, &env.dir)?;
    env.podman(&["load", "--quiet", "--input"])
        .arg(&image.archive)
        .status_ok()?;
    inspect(&image, &env)?;
    commands(&image, &env)?;
    agent(&image, &mut env)?;
    no_lab(&image, &env)?;
    eprintln!(
        "image check: passed in {:.1} s (after the build)",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// What the check made, removed on drop (containers by name, the web pod's servers,
/// namespaces, bpffs directories, the private store).
struct Env {
    /// target/image/check-PID: the store, the agent's volumes, the unpacked archive.
    dir: PathBuf,
    /// podman's global options for the private store.
    store: Vec<String>,
    /// `wimg-PID`: the prefix of the namespaces', containers' and bpffs directories' names.
    name: String,
    namespaces: Vec<String>,
    containers: Vec<String>,
    bpf_roots: Vec<PathBuf>,
    servers: Vec<std::process::Child>,
}

impl Env {
    fn new() -> Result<Env> {
        let pid = std::process::id();
        remove_stale_checks(&root().join("target/image"));
        let dir = root().join(format!("target/image/check-{pid}"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Env {
            store: store_args(&dir.join("store"), &runroot(pid))?,
            dir,
            name: format!("wimg-{pid}"),
            namespaces: Vec::new(),
            containers: Vec::new(),
            bpf_roots: Vec::new(),
            servers: Vec::new(),
        })
    }

    fn podman(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.args(&self.store).args(args);
        c
    }

    /// `podman run --rm` of the image with `args`, as its own user, no network.
    fn run_image(&self, image: &Image, args: &[&str]) -> Result<std::process::Output> {
        let mut c = self.podman(&["run", "--rm", "--pull", "never", "--network", "none"]);
        c.args(container::podman_runtime_args()?)
            .arg("--read-only")
            .arg(&image.reference)
            .args(args);
        c.output().map_err(|e| format!("cannot start {c:?}: {e}"))
    }

    fn netns(&mut self, name: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.name);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }

    fn logs(&self, container: &str) -> String {
        self.podman(&["logs", container])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    fn running(&self, container: &str) -> bool {
        output(&mut self.podman(&["inspect", "--format", "{{.State.Running}}", container]))
            .is_ok_and(|s| s == "true")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for mut server in self.servers.drain(..) {
            let _ = server.kill();
            let _ = server.wait();
        }
        for c in &self.containers {
            let _ = self.podman(&["rm", "--force", "--time", "0", c]).output();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
        for r in &self.bpf_roots {
            let _ = fs::remove_dir_all(r);
        }
        remove_store(&self.dir);
        remove_store(&runroot(std::process::id()));
    }
}

/// The run-time state of the podman store of the check of process `pid`: podman takes
/// at most 50 characters there, which a checkout's own path can exceed.
fn runroot(pid: impl std::fmt::Display) -> PathBuf {
    PathBuf::from(format!("/run/ward-image-check-{pid}"))
}

/// Removes a check's directory. podman's cleanup of a container that it ran with `--rm`
/// can still be writing into the store when `podman run` returns: try again for a while.
fn remove_store(dir: &Path) {
    for _ in 0..20 {
        if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// What earlier checks left when they were killed before their cleanup (their process
/// is gone): their containers, namespaces, bpffs directories and directory.
fn remove_stale_checks(image_dir: &Path) {
    let Ok(entries) = fs::read_dir(image_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("check-") else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = Command::new("podman")
            .args(store_args(&e.path().join("store"), &runroot(pid)).unwrap_or_default())
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
        let prefix = format!("wimg-{pid}-");
        for (dir, prefix) in [
            ("/run/netns", prefix.clone()),
            ("/sys/fs/bpf", format!("ward-{prefix}")),
        ] {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with(&prefix) {
                    continue;
                }
                if dir == "/run/netns" {
                    // what that check started in it (the web pod's servers)
                    let pids = Command::new("ip").args(["netns", "pids", &name]).output();
                    for pid in pids.iter().flat_map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    }) {
                        let _ = Command::new("kill").args(["-KILL", &pid]).output();
                    }
                    let _ = Command::new("ip").args(["netns", "delete", &name]).output();
                } else {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        remove_store(&e.path());
        remove_store(&runroot(pid));
    }
}

trait StatusOk {
    fn status_ok(&mut self) -> Result;
}

impl StatusOk for Command {
    fn status_ok(&mut self) -> Result {
        output(self).map(|_| ())
    }
}

fn ip(args: &[&str]) -> Result {
    Command::new("ip").args(args).status_ok()
}

fn json(p: &Path) -> Result<Value> {
    serde_json::from_str(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest:?}: not sha256"))?;
    Ok(dir.join("blobs/sha256").join(hex))
}

/// The archive as the runtimes read it: index, manifest, the one layer's files.
fn archive(image: &Image, dir: &Path) -> Result {
    let unpacked = dir.join("archive");
    fs::create_dir_all(&unpacked).map_err(|e| format!("{}: {e}", unpacked.display()))?;
    Command::new("tar")
        .arg("-xf")
        .arg(&image.archive)
        .arg("-C")
        .arg(&unpacked)
        .status_ok()?;
    let index = json(&unpacked.join("index.json"))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let [manifest] = manifests.as_slice() else {
        return Err(format!(
            "archive index: {} manifests, not one",
            manifests.len()
        ));
    };
    let name = manifest["annotations"]["org.opencontainers.image.ref.name"].as_str();
    if name != Some(image.reference.as_str()) {
        return Err(format!(
            "archive index: the image is named {name:?}, not {:?}",
            image.reference
        ));
    }
    let digest = manifest["digest"]
        .as_str()
        .ok_or("archive index: no digest")?;
    let manifest = json(&blob(&unpacked, digest)?)?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let [layer] = layers.as_slice() else {
        return Err(format!("archive: {} layers, not one", layers.len()));
    };
    let media = layer["mediaType"].as_str().unwrap_or("");
    if media != "application/vnd.oci.image.layer.v1.tar+gzip" {
        return Err(format!("archive: the layer is {media:?}, not a gzip tar"));
    }
    let layer = blob(
        &unpacked,
        layer["digest"].as_str().ok_or("layer: no digest")?,
    )?;
    let listing = output(
        Command::new("tar")
            .args(["-tvz", "--numeric-owner", "-f"])
            .arg(&layer),
    )?;
    let mut files = Vec::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(mode), Some(owner), Some(path)) = (f.first(), f.get(1), f.last()) else {
            return Err(format!("tar -tv: cannot read {line:?}"));
        };
        let path = path.trim_start_matches("./").trim_end_matches('/');
        if path.is_empty() {
            continue;
        }
        if *owner != "0/0" {
            return Err(format!("image file {path}: owned by {owner}, not root"));
        }
        let base = path.rsplit('/').next().unwrap_or(path);
        if ["sh", "bash", "dash", "ash", "busybox"].contains(&base) {
            return Err(format!("the image has a shell: {path}"));
        }
        files.push((mode.to_string(), path.to_string()));
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    let want: Vec<(String, String)> = FILES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    if files != want {
        return Err(format!("the image's files are\n{files:#?}\nnot\n{want:#?}"));
    }
    eprintln!(
        "image check: archive names {}, one gzip layer of {} files, no shell",
        image.reference,
        files.len()
    );
    Ok(())
}

/// The loaded image: the built one, with its labels, entrypoint and user.
fn inspect(image: &Image, env: &Env) -> Result {
    let text = output(&mut env.podman(&["image", "inspect", &image.reference]))?;
    let all: Value =
        serde_json::from_str(&text).map_err(|e| format!("podman image inspect: {e}"))?;
    let i = &all[0];
    let id = i["Id"].as_str().unwrap_or("");
    if id != image.id {
        return Err(format!(
            "the loaded image is {id}, the built one {}",
            image.id
        ));
    }
    let labels = &i["Config"]["Labels"];
    for (label, want) in [
        ("org.opencontainers.image.version", image.version.as_str()),
        ("org.opencontainers.image.revision", image.revision.as_str()),
        ("org.opencontainers.image.title", "ward"),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
    ] {
        if labels[label].as_str() != Some(want) {
            return Err(format!("label {label}: {:?}, not {want:?}", labels[label]));
        }
    }
    let config = &i["Config"];
    if config["Entrypoint"] != serde_json::json!(["/usr/bin/ward"]) {
        return Err(format!("entrypoint {}", config["Entrypoint"]));
    }
    if config["User"].as_str() != Some(IMAGE_USER) {
        return Err(format!("user {}, not {IMAGE_USER}", config["User"]));
    }
    eprintln!(
        "image check: loaded {} with version {} and revision {}, user {IMAGE_USER}",
        &id[..12.min(id.len())],
        image.version,
        image.revision
    );
    Ok(())
}

/// The binary runs in the image as the image's user.
fn commands(image: &Image, env: &Env) -> Result {
    let out = env.run_image(image, &["--version"])?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version != format!("ward {}", image.version) {
        return Err(format!(
            "`ward --version` in the image: {} {version:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = env.run_image(image, &["agent", "--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !help.contains("--source-dir") || !help.contains("--bpf-root") {
        return Err(format!(
            "`ward agent --help` in the image: {} {help}",
            out.status
        ));
    }
    eprintln!("image check: `ward --version` says {version}; `ward agent --help` runs");
    Ok(())
}

/// The node image has no lab: the lab drives ip, curl and namespaces from the host, and
/// belongs to ward-lab.
fn no_lab(image: &Image, env: &Env) -> Result {
    let out = env.run_image(image, &["lab", "--help"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("unrecognized subcommand") {
        return Err(format!(
            "the image's ward has a `lab` subcommand (`ward lab --help`: {}); the lab \
             belongs in ward-lab, not in the node image",
            out.status
        ));
    }
    eprintln!("image check: no `ward lab` in the image");
    Ok(())
}

const CLUSTER: &str = "\
namespaces: [{name: shop}]
nodes: [{name: node1, ip: 203.0.113.1}]
pods:
- {namespace: shop, name: client, ip: 10.89.1.2, node: node1, labels: {app: client}}
- {namespace: shop, name: web, ip: 10.89.2.2, node: node1, labels: {app: web}}
";

/// The web pod: TCP 8080 and UDP 53 from the client (L4), and port 80 through the HTTP
/// proxy, `GET /ok` only. The client: to the web pod on those ports and 9090, DNS
/// through the DNS proxy, names under `example.` only.
const POLICY: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: \"8080\", protocol: TCP}, {port: \"53\", protocol: UDP}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: \"80\", protocol: TCP}]
      rules: {http: [{method: GET, path: /ok}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: \"80\", protocol: TCP}, {port: \"8080\", protocol: TCP}, {port: \"9090\", protocol: TCP}]
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: \"53\", protocol: UDP}]
      rules: {dns: [{matchPattern: \"*.example\"}]}
";

/// A pod namespace on a veth `lxc{i}` of the node, with `10.89.{i}.2/32`.
fn pod(env: &mut Env, node: &str, name: &str, i: u8) -> Result<String> {
    let ns = env.netns(name)?;
    let (veth, gw, addr) = (
        format!("lxc{i}"),
        format!("10.89.{i}.1"),
        format!("10.89.{i}.2"),
    );
    ip(&[
        "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    ip(&["-n", node, "addr", "add", &format!("{gw}/32"), "dev", &veth])?;
    ip(&["-n", node, "link", "set", &veth, "up"])?;
    ip(&[
        "-n",
        node,
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        &veth,
    ])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "route", "add", &gw, "dev", "eth0"])?;
    ip(&["-n", &ns, "route", "add", "default", "via", &gw])?;
    Ok(ns)
}

/// An HTTP server on the web pod's port 80 with one file, `/ok` (Python's, from the
/// test machine), listening before this returns.
fn serve(env: &mut Env, ns: &str) -> Result {
    let root = env.dir.join("www");
    fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    write(&root.join("ok"), "ok\n")?;
    let server = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-m", "http.server", "80"])
        .args(["--bind", WEB, "--directory"])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start python3 -m http.server: {e}"))?;
    env.servers.push(server);
    let dns = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", DNS_SERVER, WEB])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start python3 (the web pod's DNS server): {e}"))?;
    env.servers.push(dns);
    // From inside the pod: local delivery, no policy on the way.
    let start = Instant::now();
    while http_code(ns, &format!("http://{WEB}/ok")) != "200"
        || dig(ns, "ok.example").as_deref() != Ok(DNS_ANSWER)
    {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(
                "the web pod's servers (python3's http.server, its DNS server): not answering \
                 within 10 s"
                    .into(),
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The web pod's DNS server (UDP 53 of the address in argv[1]): every A query of any
/// name gets one answer, [`DNS_ANSWER`].
const DNS_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, client = s.recvfrom(512)
    end = 12
    while end < len(q) and q[end]:
        end += q[end] + 1
    end += 5
    answer = bytes([0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1])
    s.sendto(q[:2] + bytes([0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]) + q[12:end] + answer, client)
"#;

/// What the web pod's DNS server answers.
const DNS_ANSWER: &str = "192.0.2.1";

/// `dig` from namespace `ns` for `name`'s A record at the web pod over UDP: the
/// answer's addresses, or the status when there are none (`REFUSED`), or the failure.
fn dig(ns: &str, name: &str) -> std::result::Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "dig", &format!("@{WEB}")])
        .args([
            "+time=2",
            "+tries=1",
            "+noall",
            "+answer",
            "+comments",
            name,
            "A",
        ])
        .output()
        .map_err(|e| format!("cannot start dig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let addresses: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    if !addresses.is_empty() {
        return Ok(addresses.join(" "));
    }
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next());
    match status {
        Some(s) => Ok(s.to_string()),
        None => Err(format!(
            "no answer ({}{})",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// `curl` from namespace `ns`: its exit code (0 answered, 7 refused, 28 timed out).
fn curl(ns: &str, url: &str, seconds: &str) -> Result<i32> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
        .args(["--max-time", seconds, url])
        .output()
        .map_err(|e| format!("cannot start curl: {e}"))?;
    Ok(out.status.code().unwrap_or(-1))
}

/// Waits for `cond` with a deadline, failing with `what` and the agent's log when the
/// deadline passes or the agent stops.
fn wait(
    env: &Env,
    agent: &str,
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        let stopped = !env.running(agent);
        if stopped || start.elapsed() > deadline {
            return Err(format!(
                "{what}: {}\n--- agent log ---\n{}",
                if stopped {
                    "the agent stopped".to_string()
                } else {
                    format!("not within {deadline:?}")
                },
                env.logs(agent)
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `ward status --output json`, run in the agent's container as an operator runs it
/// (`kubectl exec`): the token comes from the DaemonSet's `WARD_ADMIN_TOKEN_FILE`, so a
/// DaemonSet that lost it fails here (it exits 1 while the agent is not healthy, and
/// prints the status all the same).
fn status(env: &Env, agent: &str) -> Result<Value> {
    let args = ["exec", agent, "/usr/bin/ward", "status", "--output", "json"];
    let mut c = env.podman(&args);
    let out = c.output().map_err(|e| format!("cannot start {c:?}: {e}"))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "ward status in the container: {}: {e}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The lines of a JSON log at level WARN or ERROR.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
        .collect()
}

/// The HTTP status code of `GET url` from namespace `ns` (`000`: no answer).
fn http_code(ns: &str, url: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--max-time", "1", url])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The node the agent runs on: its namespace (the host network), its pods, and the
/// agent's volumes.
struct Node {
    ns: String,
    client: String,
    config: PathBuf,
    state: PathBuf,
    /// The admin token's volume (name, host directory), when the config names a token
    /// file, and that file's path in the container.
    admin_token: Option<(String, PathBuf, String)>,
}

/// A node namespace with the client and web pods, the web pod's server, and the config
/// volume: the ConfigMap's file, and the files source beside it.
fn node(env: &mut Env, spec: &AgentSpec) -> Result<Node> {
    let ns = env.netns("node")?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ])
        .status_ok()?;
    let client = pod(env, &ns, "client", 1)?;
    let web = pod(env, &ns, "web", 2)?;
    serve(env, &web)?;
    let config = env.dir.join("config");
    let files = container::configmap_files(container::CONFIGMAP, container::CONFIGMAP_NAME)?;
    fs::create_dir_all(config.join("source")).map_err(|e| format!("{}: {e}", config.display()))?;
    let admin_token = match container::admin_token_file(&files)? {
        None => None,
        Some(file) => {
            let (mount, name) = container::mount_of(spec, &file)
                .ok_or_else(|| format!("the DaemonSet mounts nothing holding {file}"))?;
            let dir = env.dir.join(&mount.name);
            fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            // a token of this check's own: the Secret's content on a node
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            write(
                &dir.join(name),
                &format!("check-{}-{nanos}\n", std::process::id()),
            )?;
            Some((mount.name.clone(), dir, file))
        }
    };
    for (name, text) in files {
        write(&config.join(name), &text)?;
    }
    write(&config.join("source/cluster.yaml"), CLUSTER)?;
    write(&config.join("source/policy.yaml"), POLICY)?;
    let state = env.dir.join("state");
    fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    Ok(Node {
        ns,
        client,
        config,
        state,
        admin_token,
    })
}

/// Starts the agent container of `spec` on `node`, named `NAME-label`, with a bpffs
/// directory of its own; returns the container's name.
fn start_agent(
    env: &mut Env,
    image: &Image,
    spec: &AgentSpec,
    node: &Node,
    label: &str,
) -> Result<String> {
    let name = format!("{}-{label}", env.name);
    let bpf_root = PathBuf::from(format!("/sys/fs/bpf/ward-{name}"));
    env.bpf_roots.push(bpf_root.clone());
    let run = AgentRun {
        name: name.clone(),
        podman: env.store.clone(),
        image: Some(image.reference.clone()),
        netns: PathBuf::from("/run/netns").join(&node.ns),
        volumes: [
            ("config".into(), node.config.clone()),
            ("state".into(), node.state.clone()),
        ]
        .into_iter()
        .chain(
            node.admin_token
                .iter()
                .map(|(name, dir, _)| (name.clone(), dir.clone())),
        )
        .collect(),
        env: vec![
            ("NODE_NAME".into(), "node1".into()),
            ("POD_NAME".into(), "ward-agent-check".into()),
            ("POD_NAMESPACE".into(), "ward-system".into()),
        ],
        // What differs from a node: the files source instead of the API server, and a
        // bpffs directory of this check's own.
        extra_args: vec![
            "--source".into(),
            "files".into(),
            "--source-dir".into(),
            "/etc/ward/source".into(),
            "--bpf-root".into(),
            bpf_root.display().to_string(),
        ],
        log_file: None,
    };
    let mut cmd = run.command(spec)?;
    eprintln!("+ {cmd:?}");
    env.containers.push(name.clone());
    cmd.status_ok()?;
    Ok(name)
}

fn agent(image: &Image, env: &mut Env) -> Result {
    let spec = AgentSpec::from_daemonset(container::DAEMONSET)?;
    let node = node(env, &spec)?;
    let agent = start_agent(env, image, &spec, &node, "agent")?;
    let started = Instant::now();
    let (ready_path, ready_port) = spec
        .readiness
        .clone()
        .ok_or("the DaemonSet has no readinessProbe")?;
    let ready = format!("http://127.0.0.1:{ready_port}{ready_path}");
    wait(
        env,
        &agent,
        "the readiness probe",
        Duration::from_secs(60),
        || Ok(http_code(&node.ns, &ready) == "200"),
    )?;
    let ready_after = started.elapsed();
    let (live_path, live_port) = spec
        .liveness
        .clone()
        .ok_or("the DaemonSet has no livenessProbe")?;
    let live = http_code(
        &node.ns,
        &format!("http://127.0.0.1:{live_port}{live_path}"),
    );
    if live != "200" {
        return Err(format!("the liveness probe {live_path}: HTTP {live}"));
    }
    if node.admin_token.is_some() {
        let open = http_code(
            &node.ns,
            &format!("http://127.0.0.1:{ready_port}/v1/status"),
        );
        if open != "401" {
            return Err(format!(
                "/v1/status without the admin token: HTTP {open}, not 401"
            ));
        }
    }

    let s = status(env, &agent)?;
    if s["ready"] != Value::Bool(true)
        || s["endpoints_attached"].as_u64() != Some(2)
        || s["policies"].as_u64() != Some(2)
        || s["errors"].as_array().is_none_or(|e| !e.is_empty())
        || !s["last_error"].is_null()
    {
        return Err(format!("ward status in the container: {s:#}"));
    }

    // Through the HTTP proxy in the container: the redirect, the transparent listener,
    // the upstream connection from the client's address with the proxy's mark.
    let ok = http_code(&node.client, &format!("http://{WEB}/ok"));
    let forbidden = http_code(&node.client, &format!("http://{WEB}/forbidden"));
    if (ok.as_str(), forbidden.as_str()) != ("200", "403") {
        return Err(format!(
            "client -> web:80 through the HTTP proxy: GET /ok {ok}, GET /forbidden \
             {forbidden}, not 200 and 403\n--- agent log ---\n{}",
            env.logs(&agent)
        ));
    }
    // Through the DNS proxy: the answer to an allowed UDP query leaves from the server's
    // address and port 53 (a socket bound to it), a denied name is refused.
    let allowed = dig(&node.client, "ok.example");
    let refused = dig(&node.client, "ok.test");
    if (allowed.as_deref(), refused.as_deref()) != (Ok(DNS_ANSWER), Ok("REFUSED")) {
        return Err(format!(
            "client -> web:53 through the DNS proxy: ok.example {allowed:?}, ok.test \
             {refused:?}, not {DNS_ANSWER} and REFUSED\n--- agent log ---\n{}",
            env.logs(&agent)
        ));
    }
    // The datapath in force: the allowed port reaches the pod's kernel (refused, no
    // listener), another port is dropped and counted.
    let allowed = curl(&node.client, &format!("http://{WEB}:8080/"), "3")?;
    if allowed != 7 {
        return Err(format!(
            "client -> web:8080 (allowed): curl exit {allowed}, not 7 (refused)"
        ));
    }
    let denied = curl(&node.client, &format!("http://{WEB}:9090/"), "1")?;
    if denied != 28 {
        return Err(format!(
            "client -> web:9090 (denied): curl exit {denied}, not 28 (timed out)"
        ));
    }
    wait(
        env,
        &agent,
        "the drop in ward status",
        Duration::from_secs(10),
        || {
            let s = status(env, &agent)?;
            Ok(s["drops"]
                .as_object()
                .is_some_and(|d| d.values().filter_map(Value::as_u64).sum::<u64>() > 0))
        },
    )?;

    // Nothing went wrong while it ran: a missing capability or mount can show as an
    // error the agent survives (a listener, a route, a pin), not only as a failed start.
    // (Read before the stop: the agent's shutdown can end its netlink watch first and
    // say so as a warning.)
    let log = env.logs(&agent);
    let bad = warnings(&log);
    if !bad.is_empty() {
        return Err(format!(
            "the agent logged errors or warnings:\n{}\n--- agent log ---\n{log}",
            bad.join("\n")
        ));
    }

    // SIGTERM, as the kubelet stops it: the agent is PID 1 and must handle it itself.
    output(&mut env.podman(&["stop", "--time", "30", &agent]))?;
    let code = output(&mut env.podman(&["inspect", "--format", "{{.State.ExitCode}}", &agent]))?;
    if code != "0" {
        return Err(format!(
            "the agent exited with {code} on SIGTERM\n--- agent log ---\n{}",
            env.logs(&agent)
        ));
    }
    eprintln!(
        "image check: the agent ran as the DaemonSet runs it: ready after {:.1} s, 2 pods \
         attached, 2 policies; GET /ok 200 and /forbidden 403 through the HTTP proxy, \
         ok.example answered and ok.test refused by the DNS proxy, port 8080 allowed, 9090 \
         dropped; clean exit on SIGTERM",
        ready_after.as_secs_f64()
    );
    each_capability_needed(image, env, &spec, &node, &ready)
}

/// The DaemonSet grants no capability the agent can do without: without any one of
/// them, the agent stops or, ready or not, logs an error or a warning.
fn each_capability_needed(
    image: &Image,
    env: &mut Env,
    spec: &AgentSpec,
    node: &Node,
    ready: &str,
) -> Result {
    for cap in &spec.cap_add {
        let mut less = spec.clone();
        less.cap_add.retain(|c| c != cap);
        let agent = start_agent(
            env,
            image,
            &less,
            node,
            &format!("no-{}", cap.to_lowercase()),
        )?;
        let start = Instant::now();
        let mut stopped = false;
        while start.elapsed() < Duration::from_secs(30) {
            stopped = !env.running(&agent);
            if stopped || http_code(&node.ns, ready) == "200" {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if !stopped {
            // What a capability can fail at without a word until it is used: a DNS
            // answer (sent from port 53) and a proxied request. A warning may come a
            // moment after the client gave up.
            let _ = dig(&node.client, "ok.example");
            let _ = http_code(&node.client, &format!("http://{WEB}/ok"));
            let deadline = Instant::now() + Duration::from_secs(3);
            while warnings(&env.logs(&agent)).is_empty() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
        }
        let log = env.logs(&agent);
        let _ = env
            .podman(&["rm", "--force", "--time", "0", &agent])
            .output();
        if !stopped && warnings(&log).is_empty() {
            return Err(format!(
                "the agent runs without {cap} (ready, nothing logged as a warning or an \
                 error): the DaemonSet need not grant it\n--- agent log ---\n{log}"
            ));
        }
        let why = log
            .lines()
            .find(|l| l.starts_with("ward: ") || l.contains("\"level\":\"ERROR\""))
            .or_else(|| warnings(&log).first().copied())
            .unwrap_or("a warning");
        eprintln!(
            "image check: without {cap}: {}",
            why.chars().take(140).collect::<String>()
        );
    }
    Ok(())
}
