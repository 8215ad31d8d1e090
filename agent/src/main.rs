//! `ward`: Ward's node agent and its command-line tools. The command line is parsed
//! here; the agent itself is the `agent` library.

mod cmd;
#[cfg(test)]
mod docs_tests;

// `crate::inputs` for the modules of this binary (the command-line tools).
use agent::inputs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the proxies allocate and free small buffers and
/// header maps per request from one thread, where mimalloc's thread-local free lists cost
/// fewer instructions (measured with callgrind, loadtests/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ward: per-node network-policy enforcement for Kubernetes (CiliumNetworkPolicy,
/// NetworkPolicy, AdminNetworkPolicy), with verdicts that explain themselves.
#[derive(Parser)]
#[command(name = "ward", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: agent::telemetry::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: datapath, HTTP proxy, DNS proxy and admin endpoint.
    Agent(Box<agent::app::config::Args>),
    /// Run netpol-oracle conformance cases against Ward's policy model.
    Conformance {
        #[command(subcommand)]
        command: cmd::conformance::Command,
    },
    /// Run the DNS proxy as a standalone filtering forwarder for one endpoint.
    DnsProxy(cmd::dns_proxy::Args),
    /// Validate policies and explain verdicts.
    Policy {
        #[command(subcommand)]
        command: cmd::policy::Command,
    },
    /// Run the L7 HTTP proxy in front of one workload (standalone mode).
    Proxy(Box<cmd::proxy::ProxyArgs>),
    /// Write the CNP/CCNP CRDs generated from the policy types (`cargo xtask crds`).
    #[command(hide = true)]
    KubeCrds {
        /// Directory to write them into (deploy/crds).
        dir: std::path::PathBuf,
    },
    /// Summarise a running agent: readiness, endpoints, policy errors, FQDN cache, drops.
    Status(cmd::status::StatusArgs),
    /// Show the drops and proxy records of running agents as one timeline, filtered as
    /// `hubble observe` filters flows.
    Observe(Box<cmd::observe::ObserveArgs>),
}

/// The allocator's options `ward agent` runs with, each unless set already (set one to
/// keep another value). mimalloc gives freed pages back to the system only when the
/// thread that freed them allocates again after the purge delay, so an agent that goes
/// idle after a compile would keep its peak: a delay of 0 returns them at once. With
/// transparent huge pages (the kernel's `madvise` mode) mimalloc backs its arenas with
/// 2 MiB pages, which a few live objects keep resident: off, memory returns in its own
/// pages. Figures in loadtests/HISTORY.md.
const ALLOCATOR_OPTIONS: [(&str, &str); 2] =
    [("MIMALLOC_PURGE_DELAY", "0"), ("MIMALLOC_ALLOW_THP", "0")];

/// mimalloc reads its options from the environment when the process starts, so the
/// agent runs itself again, once, with those of [`ALLOCATOR_OPTIONS`] not set. Returns
/// only when that fails; `None` when every option is set.
fn with_allocator_options() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    let unset: Vec<_> = ALLOCATOR_OPTIONS
        .iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if unset.is_empty() {
        return None;
    }
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args(std::env::args_os().skip(1));
    for (k, v) in unset {
        cmd.env(k, v);
    }
    Some(cmd.exec())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = agent::telemetry::init(&cli.log) {
        eprintln!("ward: {e}");
        return ExitCode::from(2);
    }
    if matches!(cli.command, Command::Agent(_)) {
        if let Some(error) = with_allocator_options() {
            tracing::warn!(%error, "cannot run again with the allocator's options: freed memory returns late");
        }
    }
    let result = match cli.command {
        Command::Agent(args) => cmd::agent::run(*args),
        Command::Conformance { command } => cmd::conformance::run(command),
        Command::DnsProxy(args) => cmd::dns_proxy::run(args),
        Command::Policy { command } => cmd::policy::run(command),
        Command::Proxy(args) => cmd::proxy::run(*args),
        Command::KubeCrds { dir } => agent::source::kube::crd::write(&dir)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("cannot write the CRDs into {}: {e}", dir.display())),
        Command::Status(args) => cmd::status::status(args),
        Command::Observe(args) => cmd::observe::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ward: {e:#}");
            ExitCode::from(2)
        }
    }
}
