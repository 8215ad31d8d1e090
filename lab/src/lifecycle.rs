//! The labs themselves: a whole cluster's datapath on one machine. Every node of a scenario is a
//! network namespace running its own `ward agent` (files source), every pod a namespace
//! with a veth into its node and a small built-in server, outside hosts live in a `world`
//! namespace; probes run real clients inside the source namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use policy_model::Protocol;
use serde_yaml::{Mapping, Value};

use scenario::Scenario;

use testkit::{nsenter, run, Poll};

use crate::serve;
use crate::topology::{LabState, BPF_PREFIX, RUN_ROOT};

/// The port every agent's admin endpoint listens on, inside its node namespace.
pub const ADMIN: &str = "127.0.0.1:9890";

/// How `up` runs.
#[derive(Clone, Debug, Default)]
pub struct UpOptions {
    pub profile: Option<String>,
    /// Start no agents: the topology and servers only (no enforcement).
    pub no_agent: bool,
    /// The `ward` binary the agents run (default: see `ward_binary`).
    pub ward: Option<PathBuf>,
    /// Print progress lines.
    pub verbose: bool,
    /// Make the scenario's DNS lookups at the end (`check` makes them anyway).
    pub lookups: bool,
    /// Run every node's agent as a container of this node image (an oci-archive) as the
    /// DaemonSet runs it, instead of the host binary (see `image`).
    pub agent_image: Option<PathBuf>,
}

/// The lab needs root (namespaces, raw sockets, bpffs).
pub fn require_root() -> Result<()> {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if uid != 0 {
        bail!(
            "ward-lab needs root (network namespaces, veths, raw sockets, bpffs); run it with sudo"
        );
    }
    Ok(())
}

/// The programs the lab drives (Debian: iproute2, util-linux, procps, coreutils, curl,
/// dnsutils).
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    ("timeout", "coreutils"),
    ("curl", "curl"),
    ("dig", "dnsutils"),
];

/// What `--agent-image` needs besides (Debian: podman, runc).
const CONTAINER_TOOLS: &[(&str, &str)] = &[("podman", "podman"), ("runc", "runc")];

fn require_tools(containers: bool) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = if containers { CONTAINER_TOOLS } else { &[] };
    let missing: Vec<String> = TOOLS
        .iter()
        .chain(extra)
        .filter(|(t, _)| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .map(|(t, pkg)| format!("{t} (Debian package {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "ward-lab needs {}; `cargo xtask lab` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Builds a lab for `scenario` and returns its state, owned by this process (see `own`;
/// `disown` it to leave it running). On failure, whatever was made is removed again.
pub fn up(source: &str, scenario: &Scenario, opts: &UpOptions) -> Result<LabState> {
    require_root()?;
    require_tools(opts.agent_image.is_some() && !opts.no_agent)?;
    let id = LabState::new_id();
    let run_dir = Path::new(RUN_ROOT).join(&id);
    fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let mut state = LabState {
        id,
        run_dir: run_dir.clone(),
        source: source.to_string(),
        profile: opts.profile.clone(),
        agents: !opts.no_agent,
        ..LabState::default()
    };
    state.save()?;
    own(&state);
    match build(&mut state, scenario, opts) {
        Ok(()) => Ok(state),
        Err(e) => {
            let logs = agent_log_tail(&state);
            let _ = down(&state);
            disown(&state);
            Err(e.context(format!("lab {} failed to come up{logs}", state.id)))
        }
    }
}

fn build(state: &mut LabState, scenario: &Scenario, opts: &UpOptions) -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    let id = state.id.clone();
    let started = Instant::now();
    let say = |m: &str| {
        if opts.verbose {
            eprintln!("lab {id}: {m} ({:.1} s)", started.elapsed().as_secs_f64());
        }
    };
    if let (Some(archive), false) = (&opts.agent_image, opts.no_agent) {
        crate::image::prepare(state, archive)?;
    }
    fs::write(
        state.run_dir.join("scenario.yaml"),
        serde_yaml::to_string(&scenario.document)?,
    )?;
    let cluster = &scenario.case.cluster;
    state.build(cluster)?;
    say(&format!(
        "{} namespaces: {} nodes, {} endpoints",
        state.namespaces.len(),
        state.nodes.len(),
        state.endpoints.len()
    ));

    // What the agents read: the cluster (its nodes as the lab made them, without the
    // `dns` observations, which the lab produces for real) and the policies.
    let source = state.run_dir.join("source");
    fs::create_dir_all(&source)?;
    fs::write(source.join("cluster.yaml"), agent_cluster(state, scenario)?)?;
    let mut policies = String::new();
    for p in &scenario.case.policies {
        policies.push_str("---\n");
        policies.push_str(&serde_yaml::to_string(p)?);
    }
    fs::write(source.join("policies.yaml"), policies)?;

    let certs = crate::pki::build(&state.run_dir, cluster, &tls_servers(state, scenario))?;
    start_servers(state, scenario, &certs)?;
    say("servers ready");

    if !opts.no_agent {
        mount_bpffs()?;
        // Kubernetes-semantics cases expect ipBlock to match pod IPs; Cilium's default
        // (and the cilium-default profile) does not.
        let options = policy_model::conformance::options_for(
            scenario.case.semantics,
            opts.profile.as_deref(),
        );
        if state.image.is_some() {
            crate::image::start_agents(state, options.cidr_matches_cluster)?;
        } else {
            let ward = ward_binary(opts.ward.as_deref())?;
            start_agents(state, &ward, options)?;
        }
        wait_for_agents(state)?;
        say(if state.image.is_some() {
            "agent containers ready"
        } else {
            "agents ready"
        });
    }
    if opts.lookups {
        lookups(state, scenario, opts.verbose)?;
    }
    state.save()
}

/// The cluster file for the agents.
fn agent_cluster(state: &LabState, scenario: &Scenario) -> Result<String> {
    let mut cluster = scenario
        .document
        .get("cluster")
        .cloned()
        .unwrap_or(Value::Mapping(Mapping::new()));
    if let Value::Mapping(m) = &mut cluster {
        m.remove("dns");
        let nodes: Vec<Value> = state
            .nodes
            .iter()
            .map(|n| {
                let mut v = Mapping::new();
                v.insert("name".into(), n.name.clone().into());
                v.insert("ip".into(), n.ip.to_string().into());
                Value::Mapping(v)
            })
            .collect();
        m.insert("nodes".into(), Value::Sequence(nodes));
        if let (Some(Value::Sequence(pods)), Some(first)) = (m.get_mut("pods"), state.nodes.first())
        {
            for p in pods.iter_mut().filter_map(Value::as_mapping_mut) {
                if !p.contains_key("node") {
                    p.insert("node".into(), first.name.clone().into());
                }
            }
        }
    }
    let mut doc = Mapping::new();
    doc.insert("cluster".into(), cluster);
    Ok(serde_yaml::to_string(&Value::Mapping(doc))?)
}

/// The ports each namespace serves: a pod's declared ports and every port a probe
/// targets, per protocol.
#[derive(Default)]
struct Ports {
    tcp: BTreeSet<u16>,
    udp: BTreeSet<u16>,
    sctp: bool,
}

/// The namespaces whose servers serve TLS, with the names their certificate covers: the
/// externals and pods of the case with `tls:`.
fn tls_servers(state: &LabState, scenario: &Scenario) -> BTreeMap<String, BTreeSet<String>> {
    let cluster = &scenario.case.cluster;
    let externals = cluster
        .externals
        .iter()
        .filter_map(|e| Some((format!("external:{}", e.name), e.tls.as_ref()?)));
    let pods = cluster
        .pods
        .iter()
        .filter_map(|p| Some((p.id(), p.tls.as_ref()?)));
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, tls) in externals.chain(pods) {
        if let Some(ep) = state.endpoint(&key) {
            out.entry(ep.netns.clone())
                .or_default()
                .extend(tls.names.iter().cloned());
        }
    }
    out
}

fn start_servers(
    state: &mut LabState,
    scenario: &Scenario,
    certs: &BTreeMap<String, crate::pki::ServerCert>,
) -> Result<()> {
    let mut by_ns: BTreeMap<String, Ports> = BTreeMap::new();
    for p in &scenario.case.cluster.pods {
        let key = format!("{}/{}", p.namespace, p.name);
        let Some(ep) = state.endpoint(&key) else {
            continue;
        };
        let ports = by_ns.entry(ep.netns.clone()).or_default();
        for cp in &p.ports {
            add_port(ports, cp.protocol, cp.port);
        }
    }
    for lp in &scenario.probes {
        let Some(ep) = state.endpoint(&lp.probe.to) else {
            continue;
        };
        add_port(
            by_ns.entry(ep.netns.clone()).or_default(),
            lp.probe.protocol,
            lp.probe.port,
        );
    }
    let zone = state.run_dir.join("zone.json");
    fs::write(
        &zone,
        serde_json::to_string_pretty(&zone_of(state, scenario))?,
    )?;
    let serve_dir = state.run_dir.join("serve");
    fs::create_dir_all(&serve_dir)?;
    let lab = std::env::current_exe()?;
    let mut ready = Vec::new();
    for (ns, ports) in by_ns.iter().filter(|(_, p)| !p.is_empty()) {
        let join = |s: &BTreeSet<u16>| s.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let ready_file = serve_dir.join(format!("{ns}.ready"));
        let log = fs::File::create(serve_dir.join(format!("{ns}.log")))?;
        let mut cmd = nsenter(ns, &lab.to_string_lossy());
        cmd.args(["serve", "--dns-zone"])
            .arg(&zone)
            .arg("--ready")
            .arg(&ready_file);
        if !ports.tcp.is_empty() {
            cmd.arg("--tcp").arg(join(&ports.tcp));
        }
        if !ports.udp.is_empty() {
            cmd.arg("--udp").arg(join(&ports.udp));
        }
        if ports.sctp {
            cmd.arg("--sctp-log").arg(sctp_log(state, ns));
        }
        if let Some(c) = certs.get(ns) {
            cmd.arg("--tls-cert")
                .arg(&c.cert)
                .arg("--tls-key")
                .arg(&c.key);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start the server in {ns}"))?;
        state.pids.push(child.id());
        adopt(child);
        state.save()?;
        ready.push(ready_file);
    }
    wait_for("the pod servers", Duration::from_secs(15), || {
        Ok(ready.iter().all(|r| r.exists()))
    })
}

use std::os::unix::process::CommandExt;

impl Ports {
    fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty() && !self.sctp
    }
}

fn add_port(p: &mut Ports, proto: Protocol, port: u16) {
    match proto {
        Protocol::Tcp => {
            p.tcp.insert(port);
        }
        Protocol::Udp => {
            p.udp.insert(port);
        }
        Protocol::Sctp => p.sctp = true,
        Protocol::Any => {
            p.tcp.insert(port);
            p.udp.insert(port);
        }
        _ => {}
    }
}

/// The SCTP packet log of the server in `ns`.
pub fn sctp_log(state: &LabState, ns: &str) -> PathBuf {
    state.run_dir.join("serve").join(format!("{ns}.sctp"))
}

/// The scenario's DNS names: the `cluster.dns` answers, and `POD.NS.svc.cluster.local`.
fn zone_of(state: &LabState, scenario: &Scenario) -> serve::Zone {
    let mut zone = serve::Zone::new();
    let fqdn = |n: &str| {
        let n = n.to_ascii_lowercase();
        if n.ends_with('.') {
            n
        } else {
            format!("{n}.")
        }
    };
    for d in &scenario.case.cluster.dns {
        let ips = zone.entry(fqdn(&d.name)).or_default();
        for ip in &d.ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
    }
    for p in &scenario.case.cluster.pods {
        if let Some(ep) = state.endpoint(&format!("{}/{}", p.namespace, p.name)) {
            zone.insert(
                fqdn(&format!("{}.{}.svc.cluster.local", p.name, p.namespace)),
                vec![IpAddr::V4(ep.ip)],
            );
        }
    }
    zone
}

fn mount_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")) {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// The `ward` whose agents the lab runs: the one given, else `ward` beside this
/// `ward-lab` (cargo builds both into target/release), else `ward` on PATH.
pub fn ward_binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(w) = given {
        if !w.is_file() {
            bail!("--ward {}: no such file", w.display());
        }
        return Ok(w.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|lab| Some(lab.parent()?.join("ward")))
        .filter(|w| w.is_file());
    let on_path = || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join("ward"))
            .find(|w| w.is_file())
    };
    beside.or_else(on_path).ok_or_else(|| {
        anyhow!(
            "no ward binary beside ward-lab or on PATH: build it (`cargo build --release --bin ward`; \
             `cargo xtask lab` does) or name it with --ward"
        )
    })
}

fn start_agents(
    state: &mut LabState,
    ward: &Path,
    options: policy_model::CompileOptions,
) -> Result<()> {
    let source = state.run_dir.join("source");
    for i in 0..state.nodes.len() {
        let node = state.nodes[i].clone();
        let state_dir = state.run_dir.join("agent").join(&node.name);
        fs::create_dir_all(&state_dir)?;
        let log = fs::File::create(state.run_dir.join(format!("agent-{}.log", node.name)))?;
        let mut cmd = nsenter(&node.netns, &ward.to_string_lossy());
        cmd.arg("agent");
        if options.cidr_matches_cluster {
            cmd.arg("--cidr-matches-cluster");
        }
        let child = cmd
            .args(["--node", &node.name, "--source-dir"])
            .arg(&source)
            .arg("--bpf-root")
            .arg(&node.bpf_root)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--admin", ADMIN, "--uplink", "up0"])
            .arg("--certificates-dir")
            .arg(crate::pki::Layout::of(&state.run_dir).certificates_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start the agent of {}", node.name))?;
        state.nodes[i].agent_pid = Some(child.id());
        state.pids.push(child.id());
        adopt(child);
        state.save()?;
    }
    Ok(())
}

/// Waits until every node's agent (a host process or a container's) is ready.
fn wait_for_agents(state: &LabState) -> Result<()> {
    for node in &state.nodes {
        let pid = node.agent_pid.unwrap_or(0);
        wait_for(
            &format!("the agent of {} to be ready", node.name),
            Duration::from_secs(60),
            || {
                if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                    bail!("the agent of {} exited", node.name);
                }
                Ok(admin_get(state, &node.netns, "/readyz").is_ok_and(|(code, _)| code == 200))
            },
        )?;
    }
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// GET on an agent's admin endpoint (curl inside the node namespace): status and body.
/// Agents of the node image listen beyond loopback and want the lab's admin token.
pub fn admin_get(state: &LabState, netns: &str, path: &str) -> Result<(u16, String)> {
    let mut cmd = nsenter(netns, "curl");
    cmd.args(["-sS", "-m", "2", "-w", "\n%{http_code}"]);
    if state
        .image
        .as_ref()
        .is_some_and(|i| i.admin_token.is_some())
    {
        cmd.arg("-H").arg(format!(
            "@{}",
            crate::image::token_header(&state.run_dir).display()
        ));
    }
    let out = cmd.arg(format!("http://{ADMIN}{path}")).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code: u16 = code.trim().parse().unwrap_or(0);
    if code == 0 {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok((code, body.to_string()))
}

/// The DNS lookups of `cluster.dns`, made by the named clients through the lab DNS server
/// (and the agents' DNS proxies on the way), so that toFQDNs learns the answers. `up`
/// makes them, and `check` again before its probes (learned IPs expire with their TTL).
pub fn lookups(state: &LabState, scenario: &Scenario, verbose: bool) -> Result<()> {
    let dns = &scenario.case.cluster.dns;
    if dns.is_empty() {
        return Ok(());
    }
    let Some(server) = dns_server(state, scenario) else {
        eprintln!("warning: the scenario has DNS answers but no pod serving DNS on UDP/53");
        return Ok(());
    };
    let mut clients = Vec::new();
    for d in dns {
        let Some(client) = state.endpoint(&d.client) else {
            bail!("cluster.dns: client {} is not a pod of the lab", d.client);
        };
        clients.push((d, client));
    }
    // concurrently: a lookup that is dropped waits out its whole deadline
    let answers: Vec<String> = std::thread::scope(|s| {
        let running: Vec<_> = clients
            .iter()
            .map(|(d, client)| {
                s.spawn(move || {
                    nsenter(&client.netns, "dig")
                        .arg(format!("@{server}"))
                        .args(["+time=2", "+tries=1", "+short"])
                        .arg(&d.name)
                        .arg("A")
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).trim().replace('\n', " "))
                        .unwrap_or_default()
                })
            })
            .collect();
        running
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    if verbose {
        for ((d, _), answer) in clients.iter().zip(&answers) {
            let answer = if answer.is_empty() {
                "no address (refused or unanswered)"
            } else {
                answer
            };
            eprintln!(
                "lab {}: {} looked up {}: {answer}",
                state.id, d.client, d.name
            );
        }
    }
    Ok(())
}

/// The pod that serves DNS: kube-dns by label, else any pod declaring UDP/53.
pub fn dns_server(state: &LabState, scenario: &Scenario) -> Option<IpAddr> {
    let pods = &scenario.case.cluster.pods;
    let serves = |p: &&policy_model::cluster::Pod| {
        p.ports
            .iter()
            .any(|c| c.port == 53 && c.protocol == Protocol::Udp)
    };
    let pick = pods
        .iter()
        .filter(serves)
        .find(|p| {
            p.labels
                .get("k8s-app")
                .is_some_and(|v| v == "kube-dns" || v == "coredns")
        })
        .or_else(|| pods.iter().find(serves))?;
    state
        .endpoint(&format!("{}/{}", pick.namespace, pick.name))
        .map(|e| IpAddr::V4(e.ip))
}

/// Polls `cond` until it holds or the deadline passes (from 10 ms between looks,
/// doubling up to 200 ms); an interrupt ends the wait.
pub fn wait_for(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    Poll::within(deadline)
        .backoff(Duration::from_millis(10), Duration::from_millis(200))
        .try_until(what, || {
            if stopping() {
                bail!("interrupted while waiting for {what}");
            }
            cond()
        })
        .map(drop)
}

fn agent_log_tail(state: &LabState) -> String {
    let mut out = String::new();
    for n in &state.nodes {
        let p = state.run_dir.join(format!("agent-{}.log", n.name));
        if let Ok(text) = fs::read_to_string(&p) {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(8)..];
            if !tail.is_empty() {
                out.push_str(&format!(
                    "\nlast lines of {}:\n  {}",
                    p.display(),
                    tail.join("\n  ")
                ));
            }
        }
    }
    out
}

/// Labs this process brings down itself (`ward-lab`, `run-case`): on SIGINT or SIGTERM
/// they are removed before the process exits, so an interrupted run leaves nothing.
static OWNED: std::sync::Mutex<Vec<LabState>> = std::sync::Mutex::new(Vec::new());
/// Set on SIGINT/SIGTERM: labs being built stop at their next step and remove themselves.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the process was interrupted (builders check it between steps).
pub fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::SeqCst)
}

/// When interrupted, leaves the exit to the clean-up (which exits 130 when done): the
/// main thread must not end the process while labs are being removed.
pub fn park_if_stopping() {
    while stopping() {
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

/// Removes `state` when the process is interrupted, until `disown`.
pub fn own(state: &LabState) {
    if let Ok(mut o) = OWNED.lock() {
        o.push(state.clone());
    }
}

pub fn disown(state: &LabState) {
    if let Ok(mut o) = OWNED.lock() {
        o.retain(|s| s.id != state.id);
    }
}

/// Starts the watcher that brings owned labs down on SIGINT/SIGTERM and exits 130.
pub fn down_on_interrupt() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            let ctrl_c = tokio::signal::ctrl_c();
            let _ = tx.send(());
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        });
        STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
        // Builders notice within one step and clean up after themselves; whatever is
        // still owned after that is removed here.
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && !OWNED.lock().map(|o| o.is_empty()).unwrap_or(true) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let labs = OWNED.lock().map(|o| o.clone()).unwrap_or_default();
        for l in &labs {
            let latest = LabState::load(&l.run_dir).unwrap_or_else(|_| l.clone());
            let _ = down(&latest);
        }
        eprintln!("interrupted: {} lab(s) removed", labs.len());
        std::process::exit(130);
    });
    // the handlers are in place before any lab is made
    let _ = rx.recv_timeout(Duration::from_secs(2));
}

/// Removes everything a lab made: its processes (by PID, after checking that the PID
/// still runs a command of this lab), its namespaces, bpffs roots and run directory.
pub fn down(state: &LabState) -> Result<()> {
    let mut errors = crate::image::remove_agents(state);
    let ours: Vec<u32> = state
        .pids
        .iter()
        .copied()
        .filter(|p| cmdline(*p).is_some_and(|c| c.contains(&state.id)))
        .collect();
    kill_all(&ours);
    for ns in state.namespaces.iter().rev() {
        if Path::new("/run/netns").join(ns).exists() {
            if let Err(e) = testkit::delete(ns) {
                errors.push(e.to_string());
            }
        }
    }
    for n in &state.nodes {
        if n.bpf_root.exists() {
            if let Err(e) = fs::remove_dir_all(&n.bpf_root) {
                errors.push(format!("{}: {e}", n.bpf_root.display()));
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(&state.run_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errors.push(format!("{}: {e}", state.run_dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("lab {}: {}", state.id, errors.join("; ")))
    }
}

/// `down --all`: every lab's leftovers, also after a crash that lost a state file:
/// recorded labs first, then processes whose command line names a lab run directory,
/// namespaces named `wlXXXXXXXX-*`, and bpffs roots `ward-lab-*`.
pub fn down_all() -> Result<usize> {
    let mut removed = 0;
    if let Ok(dirs) = fs::read_dir(RUN_ROOT) {
        for d in dirs.flatten() {
            let dir = d.path();
            match LabState::load(&dir) {
                Ok(s) => {
                    if let Err(e) = down(&s) {
                        eprintln!("warning: {e}");
                    }
                }
                Err(_) => {
                    let _ = fs::remove_dir_all(&dir);
                }
            }
            removed += 1;
        }
    }
    let mut strays = Vec::new();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && cmdline(pid).is_some_and(|c| is_lab_command(&c)) {
                strays.push(pid);
            }
        }
    }
    kill_all(&strays);
    if let Ok(list) = fs::read_dir("/run/netns") {
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_lab_name(&name) {
                testkit::delete(&name)?;
            }
        }
    }
    let bpf_parent = Path::new(BPF_PREFIX)
        .parent()
        .unwrap_or(Path::new("/sys/fs/bpf"));
    let prefix = Path::new(BPF_PREFIX)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Ok(list) = fs::read_dir(bpf_parent) {
        for e in list.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(removed)
}

/// A command line of a lab's process: it names a lab's run directory (servers, host
/// agents, conmon of an agent container) or a lab's bpf root (the agent in a container,
/// whose paths are the container's).
fn is_lab_command(cmdline: &str) -> bool {
    cmdline.contains(&format!("{RUN_ROOT}/wl")) || cmdline.contains(&format!("{BPF_PREFIX}wl"))
}

/// `wl` + 8 hex digits + `-`: the names labs give their namespaces.
pub fn is_lab_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 11
        && name.starts_with("wl")
        && b[2..10].iter().all(u8::is_ascii_hexdigit)
        && b[10] == b'-'
}

fn cmdline(pid: u32) -> Option<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
}

/// The processes this `ward-lab` started and has not reaped yet (a long `run-case` would
/// otherwise collect zombies).
static CHILDREN: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());

fn adopt(child: std::process::Child) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(child);
    }
}

/// Reaps the children that have exited.
fn reap() {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain_mut(|ch| !matches!(ch.try_wait(), Ok(Some(_))));
    }
}

/// Polls `cond` until it holds (true) or the deadline passes (false); unlike `wait_for`
/// it keeps going during an interrupt, for the clean-up itself.
fn settle(deadline: Duration, cond: impl FnMut() -> bool) -> bool {
    Poll::within(deadline)
        .every(Duration::from_millis(20))
        .until("the lab's processes to end", cond)
        .is_ok()
}

/// SIGTERM, then SIGKILL for what is still there after two seconds.
fn kill_all(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let _ = Command::new("kill")
        .arg("-TERM")
        .args(&list)
        .stderr(Stdio::null())
        .status();
    let alive = || {
        reap();
        pids.iter().any(|p| !is_zombie(*p))
    };
    if !settle(Duration::from_secs(2), || !alive()) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&list)
            .stderr(Stdio::null())
            .status();
        settle(Duration::from_secs(2), || !alive());
    }
}

/// The run directories of the labs that are up, newest first.
pub fn running_labs() -> Vec<PathBuf> {
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(RUN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| LabState::state_file(&e.path()).exists())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    dirs.into_iter().rev().map(|(_, p)| p).collect()
}

/// The lab named by `id`, or the only (newest) running lab.
pub fn find_lab(id: Option<&str>) -> Result<LabState> {
    match id {
        Some(id) => LabState::load(&Path::new(RUN_ROOT).join(id)),
        None => {
            let labs = running_labs();
            match labs.first() {
                None => bail!("no lab is up (ward-lab up first)"),
                Some(d) => {
                    if labs.len() > 1 {
                        eprintln!(
                            "note: {} labs are up; using the newest, {} (choose with --id)",
                            labs.len(),
                            d.display()
                        );
                    }
                    LabState::load(d)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn lab_names_are_recognised_and_nothing_else() {
        let id = LabState::new_id();
        assert!(is_lab_name(&format!("{id}-node-1")), "{id}");
        assert!(!is_lab_name("wlan0"));
        assert!(!is_lab_name("wlzzzzzzzz-x"));
        assert!(!is_lab_name("ward-test-1234"));
    }

    /// `down --all` after a lost state finds a container's agent by its bpf root, and
    /// nothing of another program.
    #[test]
    fn lab_processes_are_recognised_by_run_dir_or_bpf_root() {
        assert!(is_lab_command(
            "/usr/bin/ward agent --config /etc/ward/config.yaml --bpf-root \
             /sys/fs/bpf/ward-lab-wl0123abcd-0"
        ));
        assert!(is_lab_command(
            "target/release/ward agent --source-dir /run/ward-lab/wl0123abcd/source"
        ));
        assert!(!is_lab_command(
            "/usr/bin/ward agent --config /etc/ward/config.yaml"
        ));
    }
}
