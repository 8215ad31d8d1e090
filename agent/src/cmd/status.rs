//! `ward status`: a client of a running agent's admin endpoint (`agent::admin::client`),
//! printing its typed answers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use agent::admin::api;
use agent::admin::auth::Token;
use agent::admin::client::{token_from, Client};
use anyhow::{Context, Result};
use clap::ValueEnum;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:9890")]
    admin: SocketAddr,
    /// Network namespace of the agent (name under /var/run/netns, or a path).
    #[arg(long)]
    netns: Option<String>,
    /// File holding the agent's admin token (its --admin-token-file), sent as
    /// `Authorization: Bearer`.
    #[arg(long, value_name = "FILE", env = "WARD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

fn enter(netns: Option<&str>) -> Result<()> {
    if let Some(ns) = netns {
        let path = if ns.contains('/') {
            ns.to_string()
        } else {
            format!("/var/run/netns/{ns}")
        };
        let f = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("cannot enter {path}"))?;
    }
    Ok(())
}

/// Runs `f` with a client of the agent on a runtime of its own.
fn with_client<T>(
    admin: SocketAddr,
    token: Option<Token>,
    f: impl AsyncFnOnce(Client) -> Result<T>,
) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(f(Client::new(admin).with_token(token)))
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    let token = token_from(a.admin_token_file.as_deref())?;
    enter(a.netns.as_deref())?;
    let s = with_client(a.admin, token, async |c| Ok(c.status().await?))?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(if s.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_status(s: &api::Status) {
    println!(
        "node {}: {}",
        s.node,
        if s.ready { "READY" } else { "NOT READY" }
    );
    println!(
        "endpoints:  {} ({} attached)",
        s.endpoints, s.endpoints_attached
    );
    println!(
        "policies:   {} in force, {} errors",
        s.policies,
        s.errors.len()
    );
    for e in &s.errors {
        println!("  error: {e}");
    }
    println!(
        "push:       generation {}, last {:.1} ms",
        s.policy_generation, s.last_push_ms
    );
    if let Some(e) = &s.last_error {
        println!("  last datapath error: {e}");
    }
    println!("fqdn cache: {} names, {} IPs", s.fqdn_names, s.fqdn_ips);
    let drops: Vec<String> = s
        .drops
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(k, c)| format!("{k}={c}"))
        .collect();
    println!(
        "drops:      {}",
        if drops.is_empty() {
            "none".to_string()
        } else {
            drops.join(" ")
        }
    );
    let m = &s.map_entries;
    println!(
        "maps:       ipcache {}, endpoints {}, policy {}, peer classes {} ({} identities)",
        m.ipcache, m.endpoints, m.policy, m.classes, m.peer_classes
    );
    println!(
        "tls:        {} rules with unusable material",
        s.tls_broken_rules.len()
    );
    for b in &s.tls_broken_rules {
        println!(
            "  {} {} (secret {}): {}; its connections are reset",
            b.policy,
            b.rule,
            b.secret.as_deref().unwrap_or("-"),
            b.reason
        );
    }
}
