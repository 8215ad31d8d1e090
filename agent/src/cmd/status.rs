//! `ward status` and `ward observe`: clients of a running agent's admin endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::Value;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:9890")]
    admin: SocketAddr,
    /// Network namespace of the agent (name under /var/run/netns, or a path).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(clap::Args)]
pub struct ObserveArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:9890")]
    admin: SocketAddr,
    /// Network namespace of the agent (name under /var/run/netns, or a path).
    #[arg(long)]
    netns: Option<String>,
    /// Only events where NAMESPACE/POD is the source or the destination.
    #[arg(long)]
    pod: Option<String>,
    /// Only events with this verdict (`denied`, `forwarded`, ...).
    #[arg(long)]
    verdict: Option<String>,
    /// Keep streaming new events (otherwise: the recent ones, then exit).
    #[arg(long)]
    follow: bool,
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

/// Sends a GET and returns the status code and a reader positioned at the body.
fn get(admin: SocketAddr, path: &str) -> Result<(u16, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .with_context(|| format!("no agent answers on {admin}"))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer from {admin}: {line:?}"))?;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    Ok((code, r))
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    enter(a.netns.as_deref())?;
    let (code, mut r) = get(a.admin, "/v1/status")?;
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    if code != 200 {
        bail!("{}: HTTP {code}: {}", a.admin, body.trim());
    }
    let v: Value = serde_json::from_str(&body).context("status is not JSON")?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let ready = v["ready"].as_bool().unwrap_or(false);
        println!(
            "node {}: {}",
            v["node"].as_str().unwrap_or("?"),
            if ready { "READY" } else { "NOT READY" }
        );
        println!(
            "endpoints:  {} ({} attached)",
            v["endpoints"], v["endpoints_attached"]
        );
        println!(
            "policies:   {} in force, {} errors",
            v["policies"],
            v["errors"].as_array().map_or(0, Vec::len)
        );
        for e in v["errors"].as_array().into_iter().flatten() {
            println!("  error: {}", e.as_str().unwrap_or_default());
        }
        println!(
            "push:       generation {}, last {:.1} ms",
            v["policy_generation"],
            v["last_push_ms"].as_f64().unwrap_or(0.0)
        );
        if let Some(e) = v["last_error"].as_str() {
            println!("  last datapath error: {e}");
        }
        println!(
            "fqdn cache: {} names, {} IPs",
            v["fqdn_names"], v["fqdn_ips"]
        );
        let drops: Vec<String> = v["drops"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, c)| c.as_u64().is_some_and(|c| c > 0))
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
        let m = &v["map_entries"];
        println!(
            "maps:       ipcache {}, endpoints {}, policy {}",
            m["ipcache"], m["endpoints"], m["policy"]
        );
    }
    Ok(
        if v["ready"].as_bool().unwrap_or(false) && v["errors"].as_array().is_none_or(Vec::is_empty)
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// Pods an event names (source and destination), whatever its type.
fn pods(v: &Value) -> Vec<&str> {
    [
        &v["source"]["pod"],
        &v["destination"]["pod"],
        &v["SourceEndpoint"]["Pod"],
        &v["DestinationEndpoint"]["Pod"],
        &v["source"],
    ]
    .into_iter()
    .filter_map(Value::as_str)
    .collect()
}

fn verdict(v: &Value) -> String {
    v["verdict"]
        .as_str()
        .or(v["Verdict"].as_str())
        .unwrap_or("")
        .to_lowercase()
}

/// One readable line per event.
fn line(v: &Value) -> String {
    match v["type"].as_str() {
        Some("drop") => format!(
            "{} DROP  {} {}:{} -> {}:{} proto {} ({}, {})",
            v["time"].as_str().unwrap_or(""),
            v["direction"].as_str().unwrap_or(""),
            v["source"]["pod"]
                .as_str()
                .or(v["source"]["ip"].as_str())
                .unwrap_or("?"),
            v["source"]["port"],
            v["destination"]["pod"]
                .as_str()
                .or(v["destination"]["ip"].as_str())
                .unwrap_or("?"),
            v["destination"]["port"],
            v["protocol"],
            v["reason"].as_str().unwrap_or(""),
            v["verdict"].as_str().unwrap_or(""),
        ),
        Some("http") => format!(
            "{} HTTP  {} -> {} {} {} {} -> {} {}",
            v["Timestamp"].as_str().unwrap_or(""),
            v["SourceEndpoint"]["Pod"]
                .as_str()
                .unwrap_or(v["SourceEndpoint"]["IP"].as_str().unwrap_or("?")),
            v["DestinationEndpoint"]["Pod"]
                .as_str()
                .unwrap_or(v["DestinationEndpoint"]["IP"].as_str().unwrap_or("?")),
            v["Http"]["Method"].as_str().unwrap_or(""),
            v["Http"]["Host"].as_str().unwrap_or(""),
            v["Http"]["Path"].as_str().unwrap_or(""),
            v["Http"]["Code"],
            verdict(v),
        ),
        Some("dns") => format!(
            "{} DNS   {} -> {} {} {} {} {}",
            v["time"].as_str().unwrap_or(""),
            v["source"].as_str().unwrap_or(""),
            v["server"].as_str().unwrap_or(""),
            v["qname"].as_str().unwrap_or(""),
            v["qtype"].as_str().unwrap_or(""),
            v["verdict"].as_str().unwrap_or(""),
            v["reason"].as_str().unwrap_or(""),
        ),
        _ => v.to_string(),
    }
}

pub fn observe(a: ObserveArgs) -> Result<ExitCode> {
    enter(a.netns.as_deref())?;
    let path = if a.follow {
        "/v1/events"
    } else {
        "/v1/events?follow=false"
    };
    let (code, r) = get(a.admin, path)?;
    if code != 200 {
        bail!("{}: HTTP {code}", a.admin);
    }
    let want_verdict = a.verdict.as_deref().map(str::to_lowercase);
    for l in r.lines() {
        let l = l?;
        let Ok(v) = serde_json::from_str::<Value>(&l) else {
            continue;
        };
        if let Some(p) = &a.pod {
            if !pods(&v).contains(&p.as_str()) {
                continue;
            }
        }
        if let Some(want) = &want_verdict {
            if verdict(&v) != *want {
                continue;
            }
        }
        match a.output {
            Output::Json => println!("{l}"),
            Output::Text => println!("{}", line(&v)),
        }
    }
    Ok(ExitCode::SUCCESS)
}
