//! `ward`: Ward's node agent and its command-line tools. The command line is parsed
//! here; the agent itself is the `agent` library.

mod cmd;

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
    /// Show a running agent's drop events and proxy audit records as one timeline.
    Observe(cmd::status::ObserveArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = agent::telemetry::init(&cli.log) {
        eprintln!("ward: {e}");
        return ExitCode::from(2);
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
        Command::Observe(args) => cmd::status::observe(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ward: {e:#}");
            ExitCode::from(2)
        }
    }
}
