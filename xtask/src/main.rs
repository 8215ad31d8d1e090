//! Project automation: `cargo xtask <task>`.
//!
//! Every task installs what it needs when it is missing, so that a newcomer on a fresh
//! machine (and CI) runs the same two commands the README shows.

mod cases;
mod image;
mod loadtest;
mod soak;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  lab [ARGS...]   the main job: a whole cluster's datapath on this machine (root): installs
                  what it needs, builds the eBPF object, ward and ward-lab, runs
                  `target/release/ward-lab ARGS`
                  (default: the deploy/lab scenario: up, check, down)
  lab-cases       `ward-lab run-case` over conformance/cases, cases-calico and cases-tls
                  (root)
  test [--no-lab] [--no-image]
                  build the eBPF object, format check, clippy (-D warnings), all tests,
                  the conformance suite on the policy model (cases, cases-calico,
                  cases-tls), then `lab` (deploy/lab and deploy/lab-calico), `lab-cases`
                  (every conformance case on the real datapath), `soak --minutes 5`,
                  `image check` (the node image built, loaded and run as the DaemonSet
                  runs it) and `lab --agent-image` with its archive (the default scenario,
                  every agent a container of the image; needs both lab and image)
  soak [--minutes N] [--report PATH]
                  the deploy/lab scenario for N minutes (default 5) under policy and pod
                  churn (root): every probe checked throughout, the agents' RSS, open
                  descriptors and CPU sampled each second; fails on a wrong verdict, a
                  panic or growth beyond noise; report in target/soak/REPORT-soak.md
  image [build|check|rootfs DIR]
                  the node image FROM scratch with buildah (root): static musl ward (dist
                  profile), CA bundle; target/image/ward-VERSION.oci.tar. `check` loads the
                  archive and runs it as the DaemonSet does (part of test)
  build-ebpf      install the eBPF toolchain when missing (nightly, rust-src, bpf-linker)
                  and build the datapath's eBPF object into target/bpf
  demo            a quick look without root: the conformance cases on the policy model and
                  a `ward policy trace` example
  fuzz [TARGET [SECONDS]]
                  run a fuzz target (policy, http1, h2, tls_client_hello, handle, ...;
                  default policy, 60 s)
                  with cargo-fuzz on nightly
  bench           run the criterion benchmarks
  crds            regenerate deploy/crds/ from policy-model's types
  sync-cases      refresh conformance/ (the cases the tests use) from ../shared/conformance
  deploy-check    render deploy/ (kubectl kustomize), validate every object
                  (kubernetes-validate) and the alert rules (promtool); part of test
  loadtest [proxy|datapath|dns|tls|all] [--quick] [--ward PATH] [--ward-base PATH]
                  Ward's proxies and datapath against their peers (HAProxy, nginx,
                  dnsmasq, no program) in network namespaces, tls (HTTPS interception and
                  SNI splice) only when named; writes loadtests/REPORT.md
                  (--quick: short runs, report in target/loadtest/REPORT-quick.md;
                  --ward-base: another ward binary beside the DNS proxy's and the HTTP
                  proxy's, same rounds); the proxy part sweeps rules, connections,
                  body size and protocol: --rules 1,2,10,50,1000 --conns 1,16,64,256
                  --size small,16k --proto h1,h2 pick a subset, --full every combination;
                  --ward: a ward built beforehand instead of the dist build
  loadtest scale [--pods 1000,5000,20000,50000] [--ward PATH] [--ward-base PATH]
                  ward agent's memory and compile time against cluster size on
                  generated clusters (the dist build, or --ward PATH), beside the
                  ward binary --ward-base (a build of main); writes
                  loadtests/REPORT-scale.md
  loadtest fqdn [--secs S] [--quick] [--ward PATH] [--ward-base PATH]
                  the real ward agent on a generated node (500 endpoints, 10,000
                  toFQDNs names, 200,000 conntrack flows) under 2,000 DNS queries/s of
                  rotating answers for S seconds (default 180): added DNS latency, answer
                  to datapath, expiry sweeps, RSS and CPU, map sizes; beside --ward-base;
                  writes loadtests/REPORT-fqdn.md
  loadtest e2e [--rules 10,50,100,1000] [--conns 1,16,64,256] [--quick] [--ward PATH]
                  HTTP/1.1 and DNS between a client pod on node 1 and a server pod on
                  node 2 of a two-node ward-lab lab per configuration: no agents, Ward
                  L3/L4, Ward's HTTP proxy (N rules) and HAProxy transparent in the node
                  taking the same redirect; req/s, p50/p99/p99.9, node 1 CPU per request,
                  agent RSS, DNS direct and through the DNS proxy; three rounds in rotating
                  order; writes loadtests/REPORT-e2e.md and loadtests/e2e-h1.png
                  (--ward: a ward built beforehand, its ward-lab beside it)
  udp-relay LISTEN UPSTREAM [--busy-poll-us US]
                  the DNS load test's floors: a one-at-a-time UDP relay, blocking or
                  busy-polling for US microseconds after each datagram
  fqdn-upstream LISTEN | fqdn-probe SERVER NAMES QPS SECS OUT
                  the FQDN load test's authoritative server (rotating answers) and its
                  paced latency probe
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("lab") => lab(&args[1..]),
        Some("lab-cases") => lab_cases(),
        Some("soak") => soak::run(&args[1..]),
        Some("build-ebpf") => build_ebpf(),
        Some("image") => image::image(&args[1..]),
        Some("demo") => demo(),
        Some("fuzz") => fuzz(
            args.get(1).map(String::as_str),
            args.get(2).map(String::as_str),
        ),
        Some("bench") => bench(),
        Some("crds") => crds(),
        Some("sync-cases") => cases::sync(),
        Some("deploy-check") => deploy_check(),
        Some("loadtest") => loadtest::loadtest(&args[1..]),
        Some("udp-relay") => loadtest::relay::run(&args[1..]),
        Some("fqdn-upstream") => loadtest::fqdn_dns::upstream(&args[1..]),
        Some("fqdn-probe") => loadtest::fqdn_dns::probe(&args[1..]),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn root() -> PathBuf {
    // xtask lives one level below the workspace root. `cargo run` sets the variable at
    // run time too, and that one wins: an xtask binary built in another checkout (a
    // target/ copied between worktrees) must act on the checkout it is run from.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// rustfmt and clippy are rustup components; a minimal toolchain may lack them.
fn ensure_components() -> Result {
    for (probe, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if !succeeds(cargo().args([probe, "--version"])) {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// Debian packages the tests drive as real peers (clients, servers, tools).
const TEST_PACKAGES: &[&str] = &[
    "curl",
    "nghttp2-client",
    "dnsutils",
    "dnsmasq-base",
    // the lab tests (lab/tests/lab.rs): ip, sysctl in namespaces
    "iproute2",
    "procps",
    // `ward policy show --graph svg` runs graphviz's dot (agent/tests/cli.rs)
    "graphviz",
    // the agent's web view in a real browser (agent/tests/agent_netns.rs)
    "chromium",
];

/// Installs missing Debian packages non-interactively.
fn ensure_debs(packages: &[&str]) -> Result {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing))
}

fn installed(p: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", p])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// What `ward-lab` drives inside its namespaces: ip, nsenter, curl, dig, timeout.
const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "procps",
    "coreutils",
    "curl",
    "dnsutils",
];

fn require_root(task: &str) -> Result {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    if uid != 0 {
        return Err(format!(
            "`cargo xtask {task}` needs root: it makes network namespaces and veths, loads \
             eBPF programs, and uses podman's system store (try `sudo -E cargo xtask {task}`)"
        ));
    }
    Ok(())
}

/// `cargo build --release` of `bins`, with cargo's progress shown: a first build takes
/// minutes, and a silent one looks hung.
fn release_build(bins: &[&str]) -> Command {
    let mut c = cargo();
    c.args(["build", "--release"]);
    for b in bins {
        c.args(["--bin", b]);
    }
    c
}

/// The release `ward-lab` and the `ward` (with the eBPF object it embeds) whose agents
/// it runs, side by side in target/release.
fn build_lab(task: &str) -> Result<PathBuf> {
    require_root(task)?;
    ensure_debs(LAB_PACKAGES)?;
    build_ebpf()?;
    run(&mut release_build(&["ward", "ward-lab"]))?;
    Ok(root().join("target/release/ward-lab"))
}

fn lab(args: &[String]) -> Result {
    let lab = build_lab("lab")?;
    run(Command::new(lab).args(args))
}

fn lab_cases() -> Result {
    let lab = build_lab("lab-cases")?;
    run(Command::new(lab)
        .arg("run-case")
        .args(cases::case_folders()))
}

fn test(flags: &[String]) -> Result {
    let mut with_lab = true;
    let mut with_image = true;
    for f in flags {
        match f.as_str() {
            "--no-lab" => with_lab = false,
            "--no-image" => with_image = false,
            _ => return Err(format!("test: unknown flag {f} (--no-lab, --no-image)")),
        }
    }
    ensure_components()?;
    ensure_debs(TEST_PACKAGES)?;
    // First, so that the user-space crate embeds the object the kernel tests load.
    build_ebpf()?;
    let status = nightly_cargo()
        .args(["clippy", "--release", "--target-dir"])
        .arg(root().join("target/bpf"))
        .args(["--", "-D", "warnings"])
        .current_dir(ebpf_dir())
        .status()
        .map_err(|e| format!("cannot start cargo +nightly clippy: {e}"))?;
    if !status.success() {
        return Err(format!("clippy of the eBPF crate failed: {status}"));
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(ebpf_dir().join("Cargo.toml")))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace", "--all-targets"]))?;
    deploy_check()?;
    // Benchmarks must at least run once, so that a broken bench fails here and not later.
    run(cargo().args(["bench", "--workspace", "--", "--test"]))?;
    run(&mut release_build(&["ward"]))?;
    run(Command::new(root().join("target/release/ward"))
        .args(["conformance", "run"])
        .args(cases::case_folders()))?;
    if with_lab {
        lab(&[])?;
        lab(&["deploy/lab-calico".to_string()])?;
        lab_cases()?;
        soak::run(&["--minutes".to_string(), "5".to_string()])?;
    }
    if with_image {
        let image = image::check()?;
        if with_lab {
            // The default scenario once more, every node's agent a container of the image
            // just checked, run as the DaemonSet runs it: every probe as with the binary.
            let started = std::time::Instant::now();
            lab(&["--agent-image".into(), image.archive.display().to_string()])?;
            eprintln!(
                "lab with the agents in containers of {}: passed in {:.0} s",
                image.reference,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn demo() -> Result {
    let cases = cases::cases();
    run(&mut release_build(&["ward"]))?;
    let ward = root().join("target/release/ward");
    run(Command::new(&ward).args(["conformance", "run"]).arg(&cases))?;
    let case = cases.join("069-cnp-l7-http-get-root.yaml");
    for (path, method) in [("/", "GET"), ("/private", "GET")] {
        run(Command::new(&ward)
            .args(["policy", "trace", "--cluster"])
            .arg(&case)
            .arg("--policies")
            .arg(&case)
            .args([
                "--from",
                "cilium-test/client2",
                "--to",
                "cilium-test/echo-same-node",
            ])
            .args([
                "--port",
                "8080",
                "--http-method",
                method,
                "--http-path",
                path,
            ]))?;
    }
    Ok(())
}

/// The nightly toolchain (cargo-fuzz and the eBPF build use it).
fn ensure_nightly() -> Result {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result {
    ensure_nightly()?;
    if !succeeds(cargo().args(["fuzz", "--version"])) {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// The fuzz targets: (name, folder of its cargo-fuzz crate).
const FUZZ_TARGETS: &[(&str, &str)] = &[
    ("policy", "fuzz"),
    ("http1", "proxy/fuzz"),
    ("h2", "proxy/fuzz"),
    ("tls_client_hello", "proxy/fuzz"),
    ("handle", "dns-proxy/fuzz"),
    ("answer", "dns-proxy/fuzz"),
];

fn fuzz(target: Option<&str>, seconds: Option<&str>) -> Result {
    let target = target.unwrap_or("policy");
    let (name, dir) = FUZZ_TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .ok_or_else(|| {
            let names: Vec<&str> = FUZZ_TARGETS.iter().map(|(n, _)| *n).collect();
            format!("no fuzz target {target:?} (targets: {})", names.join(", "))
        })?;
    let seconds: u64 = seconds
        .unwrap_or("60")
        .parse()
        .map_err(|e| format!("SECONDS: {e}"))?;
    ensure_cargo_fuzz()?;
    let dir = root().join(dir);
    let corpus = dir.join("corpus").join(name);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    // the policy target starts from the conformance cases
    if *name == "policy" {
        for e in std::fs::read_dir(cases::cases())
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let _ = std::fs::copy(e.path(), corpus.join(e.file_name()));
        }
    }
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "run", name])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("cannot start cargo fuzz: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("fuzz target {name} failed: {status}"))
    }
}

fn bench() -> Result {
    run(cargo().args(["bench", "--workspace"]))
}

fn ebpf_dir() -> PathBuf {
    root().join("redirect-bpf/ebpf")
}

/// bpf-linker from crates.io, built against the nightly toolchain's own LLVM (see the
/// datapath recipe): the version is pinned, the LLVM feature follows the toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// `cargo +nightly`, with nothing of the outer (stable) cargo leaking into it.
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly");
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "LD_LIBRARY_PATH",
    ] {
        c.env_remove(var);
    }
    c
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map_err(|e| format!("rustc +nightly: {e}"))?;
    if !out.status.success() {
        return Err("rustc +nightly --print sysroot failed".into());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// nightly + rust-src + bpf-linker linked to the nightly's `libLLVM-<major>-rust-*.so`.
fn ensure_ebpf_toolchain() -> Result {
    ensure_nightly()?;
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // A bpf-linker that starts is linked to the LLVM of the installed nightly (its
    // library's file name carries the toolchain version, so an updated nightly breaks it).
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .map_err(|e| format!("{}: {e}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM-") && n.contains("-rust-") && n.ends_with(".so"))
        .ok_or_else(|| format!("no libLLVM-*-rust-*.so in {}", lib.display()))?;
    let name = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    let major = name
        .split('-')
        .nth(1)
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| format!("cannot read the LLVM version of {llvm}"))?;
    let lib = lib.display();
    run(nightly_cargo()
        .env(
            "RUSTFLAGS",
            format!("-L {lib} -l dylib={name} -C link-arg=-Wl,-rpath,{lib}"),
        )
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major},no-llvm-linking")))
}

/// Where `build_ebpf` writes the eBPF object and redirect-bpf's build.rs embeds it from.
const BPF_OBJECT: &str = "target/bpf/bpfel-unknown-none/release/ward-redirect";

/// Builds the eBPF object into [`BPF_OBJECT`].
pub(crate) fn build_ebpf() -> Result {
    ensure_ebpf_toolchain()?;
    let status = nightly_cargo()
        .args(["build", "--release", "--target-dir"])
        .arg(root().join("target/bpf"))
        // The crate's .cargo/config.toml (target, build-std) applies from its directory.
        .current_dir(ebpf_dir())
        .status()
        .map_err(|e| format!("cannot start cargo +nightly: {e}"))?;
    if !status.success() {
        return Err(format!("building the eBPF object failed: {status}"));
    }
    Ok(())
}

/// Writes the CRDs generated from policy-model's types into deploy/crds.
fn crds() -> Result {
    run(cargo()
        .args(["run", "-p", "agent", "--bin", "ward", "--"])
        .arg("kube-crds")
        .arg(root().join("deploy/crds")))
}

/// The Kubernetes release whose schemas the rendered manifests are checked against.
const KUBERNETES_VERSION: &str = "1.37.0";
/// kubernetes-validate from PyPI, pinned so that CI is reproducible.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// `kubectl kustomize deploy/` renders; every object passes kubernetes-validate; the
/// alert rules pass `promtool check rules`. (The example policies are checked against
/// the CRD schema by agent's tests.)
fn deploy_check() -> Result {
    // kubectl: the one on PATH, else Debian 12's kubernetes-client (kubectl 1.20 with
    // kustomize v2, enough for the plain base in deploy/).
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        ensure_debs(&["kubernetes-client"])?;
    }
    // promtool; `python3 -m venv` for kubernetes-validate (Debian splits venv off python3)
    ensure_debs(&["prometheus", "python3-venv"])?;
    let out = root().join("target/deploy");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("+ kubectl kustomize deploy/");
    let rendered = Command::new("kubectl")
        .args(["kustomize", "deploy/"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot start kubectl: {e}"))?;
    if !rendered.status.success() {
        return Err(format!(
            "kubectl kustomize deploy/ failed: {}",
            String::from_utf8_lossy(&rendered.stderr)
        ));
    }
    let file = out.join("rendered.yaml");
    std::fs::write(&file, &rendered.stdout).map_err(|e| format!("{}: {e}", file.display()))?;

    // a venv under target/, made once
    let venv = root().join("target/deploy-venv");
    let validate = venv.join("bin/kubernetes-validate");
    let pin = venv.join("ward-pin");
    if std::fs::read_to_string(&pin).ok().as_deref() != Some(KUBERNETES_VALIDATE) {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE))?;
        std::fs::write(&pin, KUBERNETES_VALIDATE).map_err(|e| format!("{}: {e}", pin.display()))?;
    }
    run(Command::new(&validate)
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .arg(&file))?;
    // the examples' built-in kinds (NetworkPolicy) against Kubernetes' schemas; the CNPs
    // are checked against the generated CRD schema by agent's tests
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/examples"))
        .map_err(|e| format!("deploy/examples: {e}"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    examples.sort();
    run(Command::new(&validate)
        .args([
            "--strict",
            "--quiet",
            "--no-warn",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .args(&examples))?;
    run(Command::new("promtool").args(["check", "rules", "deploy/prometheus/ward.rules.yaml"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab's first release build takes minutes: cargo's progress must show.
    #[test]
    fn release_builds_show_cargo_progress() {
        let c = release_build(&["ward", "ward-lab"]);
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            ["build", "--release", "--bin", "ward", "--bin", "ward-lab"]
        );
    }

    /// `cargo xtask` without a task shows the usage: the lab is the main job, nothing else.
    #[test]
    fn the_usage_names_the_lab_the_main_job() {
        let main_job: Vec<&str> = USAGE.lines().filter(|l| l.contains("main job")).collect();
        assert_eq!(main_job.len(), 1, "{main_job:?}");
        assert!(main_job[0].trim_start().starts_with("lab "), "{main_job:?}");
    }
}
