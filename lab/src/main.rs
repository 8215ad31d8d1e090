//! `ward-lab`: up, check, exec, down, run-case (and the hidden pod server and probe
//! client the lab starts inside its namespaces).

mod client;
mod image;
mod lifecycle;
mod pki;
mod probes;
mod serve;
mod topology;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use scenario::{yaml_files, Scenario};

use crate::lifecycle::{self as lab, UpOptions};
use crate::probes::Outcome;
use crate::topology::LabState;

/// A whole cluster's datapath on this machine: namespaces as nodes and pods, real
/// agents, real traffic (`ward-lab` = up, check, down).
#[derive(Parser)]
#[command(name = "ward-lab", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    lab: LabArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.lab) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ward-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Plain `ward-lab [SCENARIO]` is up, check, down.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LabArgs {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    whole: WholeArgs,
}

#[derive(Args)]
struct WholeArgs {
    /// Scenario folder or case file (default: deploy/lab).
    scenario: Option<PathBuf>,
    /// Leave the lab running after the check (remove it with `ward-lab down`).
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    up: UpArgs,
}

#[derive(Args, Clone)]
struct UpArgs {
    /// Apply a case's `variants.PROFILE` (e.g. cilium-default).
    #[arg(long)]
    profile: Option<String>,
    /// Start no agents (topology and servers only; nothing is enforced).
    #[arg(long)]
    no_agent: bool,
    /// The `ward` binary the agents run (default: `ward` beside ward-lab, else on PATH).
    #[arg(long, value_name = "PATH")]
    ward: Option<PathBuf>,
    /// Run every node's agent as a container of this node image (an oci-archive, as
    /// `cargo xtask image` writes it) the way deploy/daemonset.yaml runs it (podman,
    /// runc), instead of the `ward` binary.
    #[arg(long, value_name = "ARCHIVE", conflicts_with_all = ["ward", "no_agent"])]
    agent_image: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab: namespaces, veths, pod servers, one agent per node; then the DNS
    /// lookups of the scenario. Prints the lab id.
    Up {
        /// Scenario folder or case file (default: deploy/lab).
        scenario: Option<PathBuf>,
        #[command(flatten)]
        up: UpArgs,
    },
    /// Run the scenario's probes with real clients and print probe, expected, observed and
    /// why; exit 1 on any mismatch.
    Check {
        /// Lab id (default: the newest lab).
        #[arg(long)]
        id: Option<String>,
    },
    /// Run a command inside a pod's namespace (NS/POD, node:NAME or external:NAME).
    Exec {
        #[arg(long)]
        id: Option<String>,
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// `ward observe` against every agent of a running lab at once (their records merged
    /// by time); ARGS are ward observe's (`-f`, `--verdict DROPPED`, `--pod NS/POD`, ...).
    Observe {
        /// Lab id (default: the newest lab).
        #[arg(long)]
        id: Option<String>,
        /// The `ward` binary to run (default: `ward` beside ward-lab, else on PATH).
        #[arg(long, value_name = "PATH")]
        ward: Option<PathBuf>,
        /// Arguments for `ward observe`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Open every node's web view (`/ui/` of its agent, on loopback inside the node's
    /// namespace) on this machine: one local port per node, forwarded into the node's
    /// namespace; prints each node's URL and serves until interrupted.
    Ui {
        /// Lab id (default: the newest lab).
        #[arg(long)]
        id: Option<String>,
        /// The first node's port on 127.0.0.1 (the next nodes take the next ones; 0: any
        /// free ports).
        #[arg(long, default_value_t = 9891)]
        port: u16,
    },
    /// Remove a lab (default: the newest), or with --all every lab's leftovers.
    Down {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Run conformance cases on the real datapath: each case becomes a lab.
    RunCase {
        /// Case files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Keep a lab whose case failed, for inspection.
        #[arg(long)]
        keep_failed: bool,
        /// Cases run at once (each in its own lab).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        #[command(flatten)]
        up: UpArgs,
    },
    /// (internal) The server in every lab namespace.
    #[command(hide = true)]
    Serve(serve::ServeArgs),
    /// (internal) A probe client run inside a lab namespace.
    #[command(hide = true)]
    Probe(client::ProbeArgs),
}

fn run(args: LabArgs) -> Result<ExitCode> {
    if matches!(
        args.command,
        None | Some(Command::Up { .. }) | Some(Command::RunCase { .. })
    ) {
        lab::down_on_interrupt();
    }
    let result = dispatch(args);
    lab::park_if_stopping();
    result
}

fn dispatch(args: LabArgs) -> Result<ExitCode> {
    match args.command {
        None => whole(args.whole),
        Some(Command::Up { scenario, up }) => {
            let path = scenario_path(scenario)?;
            let scenario = Scenario::load(&path, up.profile.as_deref())?;
            let state = lab::up(
                &path.display().to_string(),
                &scenario,
                &options(&up, true, true),
            )?;
            lab::disown(&state);
            println!("{}", state.id);
            eprintln!(
                "lab {} is up ({}); `ward-lab check`, `ward-lab exec NS/POD -- CMD`, `ward-lab down`",
                state.id,
                state.run_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Check { id }) => {
            let state = lab::find_lab(id.as_deref())?;
            let outcomes = check(&state, true)?;
            print!("{}", probes::table(&outcomes));
            Ok(verdict_line(&outcomes))
        }
        Some(Command::Exec {
            id,
            target,
            command,
        }) => {
            let state = lab::find_lab(id.as_deref())?;
            let ns = state
                .endpoint(&target)
                .map(|e| e.netns.clone())
                .or_else(|| {
                    state
                        .nodes
                        .iter()
                        .find(|n| n.name == target)
                        .map(|n| n.netns.clone())
                })
                .with_context(|| format!("lab {}: no pod, node or external {target}", state.id))?;
            let (program, args) = command.split_first().context("no command to run")?;
            let status = testkit::ip_netns_exec(&ns, program)
                .args(args)
                .status()
                .context("cannot run ip netns exec")?;
            Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ))
        }
        Some(Command::Observe { id, ward, args }) => {
            let state = lab::find_lab(id.as_deref())?;
            let status = observe_command(&state, &lab::ward_binary(ward.as_deref())?, &args)?
                .status()
                .context("cannot run ward observe")?;
            Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ))
        }
        Some(Command::Ui { id, port }) => {
            let state = lab::find_lab(id.as_deref())?;
            ui(&state, port)
        }
        Some(Command::Down { id, all }) => {
            lab::require_root()?;
            if all {
                let n = lab::down_all()?;
                eprintln!("removed {n} lab(s) and every leftover");
            } else {
                let state = lab::find_lab(id.as_deref())?;
                lab::down(&state)?;
                eprintln!("lab {} removed", state.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::RunCase {
            paths,
            keep_failed,
            jobs,
            up,
        }) => run_cases(&paths, keep_failed, jobs, &up),
        Some(Command::Serve(a)) => serve::run(a).map(|()| ExitCode::SUCCESS),
        Some(Command::Probe(a)) => client::run(a).map(|()| ExitCode::SUCCESS),
    }
}

/// `ward observe` on every agent of the lab: one `--netns` per node (every agent listens
/// on the same admin address inside its node's namespace), then the user's arguments.
fn observe_command(
    state: &LabState,
    ward: &Path,
    args: &[String],
) -> Result<std::process::Command> {
    if !state.agents || state.nodes.is_empty() {
        bail!(
            "lab {} runs no agents (it was started with --no-agent)",
            state.id
        );
    }
    let mut cmd = std::process::Command::new(ward);
    cmd.arg("observe");
    for n in &state.nodes {
        cmd.args(["--netns", &n.netns]);
    }
    if let Some(token) = state.image.as_ref().and_then(|i| i.admin_token.as_ref()) {
        cmd.arg("--admin-token-file").arg(token);
    }
    cmd.args(args);
    Ok(cmd)
}

/// `ward-lab ui`: a listener on 127.0.0.1 per node whose connections are forwarded to
/// the node's agent (its admin address inside the node's namespace).
fn ui(state: &LabState, base: u16) -> Result<ExitCode> {
    if !state.agents || state.nodes.is_empty() {
        bail!(
            "lab {} runs no agents (it was started with --no-agent)",
            state.id
        );
    }
    let mut serving = Vec::new();
    for (i, n) in state.nodes.iter().enumerate() {
        let port = if base == 0 {
            0
        } else {
            base.checked_add(i as u16)
                .context("--port: no port left for every node")?
        };
        let l = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        // agents of the node image want the admin token: the first visit hands it over
        // (the agent keeps it in a cookie and redirects to the bare address)
        let token = match state.image.as_ref().and_then(|i| i.admin_token.as_ref()) {
            Some(f) => format!(
                "?token={}",
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .trim()
            ),
            None => String::new(),
        };
        println!("{}: http://{}/ui/{token}", n.name, l.local_addr()?);
        let netns = n.netns.clone();
        serving.push(std::thread::spawn(move || forward(&l, &netns)));
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    for s in serving {
        let _ = s.join();
    }
    Ok(ExitCode::SUCCESS)
}

/// Forwards every connection of `l` to the agent's admin address inside `netns`.
fn forward(l: &std::net::TcpListener, netns: &str) {
    for client in l.incoming().flatten() {
        let netns = netns.to_string();
        std::thread::spawn(move || {
            let addr: std::net::SocketAddr = match lab::ADMIN.parse() {
                Ok(a) => a,
                Err(_) => return,
            };
            let Ok(agent) = testkit::run_in(&netns, || {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
            }) else {
                return;
            };
            let (Ok(mut c2), Ok(mut a2)) = (client.try_clone(), agent.try_clone()) else {
                return;
            };
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut a2);
                let _ = a2.shutdown(std::net::Shutdown::Write);
            });
            let (mut a, mut c) = (agent, client);
            let _ = std::io::copy(&mut a, &mut c);
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        });
    }
}

/// `verbose` for a lab a person watches; `lookups` when no `check` follows right away.
fn options(up: &UpArgs, verbose: bool, lookups: bool) -> UpOptions {
    UpOptions {
        profile: up.profile.clone(),
        no_agent: up.no_agent,
        ward: up.ward.clone(),
        verbose,
        lookups,
        agent_image: up.agent_image.clone(),
    }
}

/// The scenario given, else `deploy/lab` here or in the source tree ward-lab was built from.
fn scenario_path(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let here = Path::new("deploy/lab");
    if here.is_dir() {
        return Ok(here.to_path_buf());
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab");
    if built.is_dir() {
        return Ok(built);
    }
    bail!("no scenario given and no deploy/lab folder here")
}

fn whole(args: WholeArgs) -> Result<ExitCode> {
    let path = scenario_path(args.scenario)?;
    let scenario = Scenario::load(&path, args.up.profile.as_deref())?;
    let started = Instant::now();
    let state = lab::up(
        &path.display().to_string(),
        &scenario,
        &options(&args.up, true, false),
    )?;
    let result = check(&state, true);
    if let Ok(outcomes) = &result {
        print!("{}", probes::table(outcomes));
    }
    if args.keep {
        eprintln!("lab {} kept; remove it with `ward-lab down`", state.id);
    } else {
        lab::down(&state)?;
    }
    lab::disown(&state);
    let outcomes = result?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(verdict_line(&outcomes))
}

fn verdict_line(outcomes: &[Outcome]) -> ExitCode {
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let failed = outcomes.len() - passed;
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs a lab's probes; the explanations come from the policy model of its scenario.
fn check(state: &LabState, verbose: bool) -> Result<Vec<Outcome>> {
    let scenario = Scenario::load(
        &state.run_dir.join("scenario.yaml"),
        state.profile.as_deref(),
    )?;
    let model = scenario
        .case
        .compile(state.profile.as_deref(), Some(&state.source))
        .map_err(|e| eprintln!("warning: no explanations: {e}"))
        .ok();
    lab::lookups(state, &scenario, verbose)?;
    Ok(probes::run_all(state, &scenario.probes, model.as_ref()))
}

fn run_cases(paths: &[PathBuf], keep_failed: bool, jobs: usize, up: &UpArgs) -> Result<ExitCode> {
    lab::require_root()?;
    let files = yaml_files(paths)?;
    let next = Mutex::new(0usize);
    let done: Mutex<Vec<Option<CaseRun>>> = Mutex::new(vec![None; files.len()]);
    let printed = Mutex::new(0usize);
    // Cases run `jobs` at a time (each is its own lab); reports print in file order.
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, 8).min(files.len().max(1)) {
            s.spawn(|| loop {
                let i = {
                    let Ok(mut n) = next.lock() else { return };
                    *n += 1;
                    *n - 1
                };
                let Some(f) = files.get(i) else { return };
                if lab::stopping() {
                    return;
                }
                let r = run_case(f, keep_failed, up);
                let Ok(mut d) = done.lock() else { return };
                d[i] = Some(r);
                let Ok(mut p) = printed.lock() else { return };
                while let Some(Some(r)) = d.get(*p) {
                    print!("{}", r.report);
                    *p += 1;
                }
            });
        }
    });
    let runs: Vec<CaseRun> = done
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    let passed: usize = runs.iter().map(|r| r.passed).sum();
    let failed: usize = runs.iter().map(|r| r.failed).sum::<usize>() + files.len() - runs.len();
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One case's result and its report lines.
#[derive(Clone, Default)]
struct CaseRun {
    passed: usize,
    failed: usize,
    report: String,
}

fn run_case(f: &Path, keep_failed: bool, up: &UpArgs) -> CaseRun {
    let file = f.display().to_string();
    let started = Instant::now();
    let broken = |e: anyhow::Error| CaseRun {
        passed: 0,
        failed: 1,
        report: format!("FAIL {file}: {e:#}\n"),
    };
    let scenario = match Scenario::load(f, up.profile.as_deref()) {
        Ok(s) => s,
        Err(e) => return broken(e.into()),
    };
    let state = match lab::up(&file, &scenario, &options(up, false, false)) {
        Ok(s) => s,
        Err(e) => return broken(e),
    };
    let outcomes = match check(&state, false) {
        Ok(o) => o,
        Err(e) => {
            let _ = lab::down(&state);
            lab::disown(&state);
            return broken(e);
        }
    };
    let mut run = CaseRun::default();
    for (i, o) in outcomes.iter().enumerate() {
        if o.passed {
            run.passed += 1;
            continue;
        }
        run.failed += 1;
        let expect = format!("{:?}", o.probe.probe.expect).to_lowercase();
        run.report.push_str(&format!(
            "FAIL {file} probe {i}: {}: expected {expect}, observed {} ({}); model: {}{}\n",
            o.probe.probe.describe(),
            if o.observed.allowed { "allow" } else { "deny" },
            o.observed.detail,
            o.why,
            o.record
                .as_ref()
                .map(|r| format!("; agent: {r}"))
                .unwrap_or_default()
        ));
    }
    run.report.push_str(&format!(
        "{} {file} ({} probes, {} failed, {:.1} s)\n",
        if run.failed == 0 { "ok  " } else { "FAIL" },
        outcomes.len(),
        run.failed,
        started.elapsed().as_secs_f64()
    ));
    if keep_failed && run.failed > 0 {
        run.report
            .push_str(&format!("     lab {} kept for inspection\n", state.id));
    } else if let Err(e) = lab::down(&state) {
        run.report.push_str(&format!("warning: {e:#}\n"));
    }
    lab::disown(&state);
    run
}
