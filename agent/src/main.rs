//! `ward`: Ward's node agent and its command-line tools.

mod cmd;
mod inputs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ward: per-node network-policy enforcement for Kubernetes (CiliumNetworkPolicy,
/// NetworkPolicy, AdminNetworkPolicy), with verdicts that explain themselves.
#[derive(Parser)]
#[command(name = "ward", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run netpol-oracle conformance cases against Ward's policy model.
    Conformance {
        #[command(subcommand)]
        command: cmd::conformance::Command,
    },
    /// Validate policies and explain verdicts.
    Policy {
        #[command(subcommand)]
        command: cmd::policy::Command,
    },
    /// Run the L7 HTTP proxy in front of one workload (standalone mode).
    Proxy(Box<cmd::proxy::ProxyArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Conformance { command } => cmd::conformance::run(command),
        Command::Policy { command } => cmd::policy::run(command),
        Command::Proxy(args) => cmd::proxy::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ward: {e:#}");
            ExitCode::from(2)
        }
    }
}
