//! `ward policy check`, `ward policy lint` and `ward policy trace`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use policy_model::http::SimpleRequest;
use policy_model::lint as policy_lint;
use policy_model::verdict::TlsProbe;
use policy_model::{CompileOptions, EndpointRef, Protocol, Query};

use crate::inputs::{compile_model, load_cluster, load_policies, yaml_files};

#[derive(Subcommand)]
pub enum Command {
    /// Validate policy manifests: every error with file, object, field path and reason.
    Check {
        /// Manifest files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Find what silently opens or breaks a cluster: OR'd peers, default deny without DNS,
    /// CIDRs over pod addresses, selectors that match nothing, ... (each finding with file,
    /// line, object, field path, severity and fix). Exits 1 on an error-level finding.
    Lint {
        /// Manifest files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Cluster state (the `cluster:` shape or a case file): enables the checks that
        /// need pods and judges overlaps by the pods selected.
        #[arg(long)]
        cluster: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Explain the verdict for one flow.
    Trace(TraceArgs),
    /// What the policies say about pods (np-viewer's view): per direction whether a pod
    /// is isolated and by which policies, then every policy selecting it in evaluation
    /// order with the peers, ports and L7/DNS rules it allows or denies.
    Show(Box<super::show::ShowArgs>),
}

#[derive(clap::Args)]
pub struct TraceArgs {
    /// Cluster state: the `cluster:` shape of a conformance case, or a whole case file.
    #[arg(long)]
    cluster: PathBuf,
    /// Policy manifests (files or folders; case files contribute their policies).
    #[arg(long, required = true, num_args = 1..)]
    policies: Vec<PathBuf>,
    /// Source: NAMESPACE/POD, node:NAME, external:NAME or an IP.
    #[arg(long)]
    from: String,
    /// Destination: NAMESPACE/POD, node:NAME, external:NAME or an IP.
    #[arg(long)]
    to: String,
    /// Destination port.
    #[arg(long)]
    port: u16,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    protocol: String,
    /// HTTP method of a request carried by the flow.
    #[arg(long)]
    http_method: Option<String>,
    /// HTTP path (with query) of the request.
    #[arg(long)]
    http_path: Option<String>,
    /// HTTP header `Name:value` (repeatable); `Host:` sets the authority.
    #[arg(long)]
    http_header: Vec<String>,
    /// A DNS query name sent over the flow.
    #[arg(long)]
    dns_query: Option<String>,
    /// The flow is a TLS session whose ClientHello carries this SNI (with --http-*: HTTPS).
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// The flow is a TLS session without SNI.
    #[arg(long, conflicts_with = "sni")]
    tls: bool,
    /// Let CIDR rules match pod and node IPs (Kubernetes' expectation; Cilium's default is not to).
    #[arg(long)]
    cidr_matches_cluster: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

pub fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Check { paths } => check(&paths),
        Command::Lint {
            paths,
            cluster,
            output,
        } => lint(&paths, cluster.as_deref(), output),
        Command::Trace(args) => trace(args),
        Command::Show(args) => super::show::run(*args),
    }
}

fn check(paths: &[PathBuf]) -> Result<ExitCode> {
    let loaded = load_policies(paths)?;
    let mut errors = loaded.errors;
    let mut valid = 0;
    for o in &loaded.objects {
        match o.translate() {
            Ok(_) => valid += 1,
            Err(e) => errors.extend(e),
        }
    }
    for e in &errors {
        println!("{e}");
    }
    let invalid = loaded.objects.len() - valid;
    if errors.is_empty() {
        println!("{valid} objects valid in {} files", loaded.files);
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{} errors: {invalid} of {} objects invalid in {} files",
            errors.len(),
            loaded.objects.len(),
            loaded.files
        );
        Ok(ExitCode::from(1))
    }
}

fn lint(paths: &[PathBuf], cluster: Option<&Path>, output: Output) -> Result<ExitCode> {
    let mut sources = Vec::new();
    for f in yaml_files(paths)? {
        sources.push(policy_lint::Source {
            text: std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?,
            file: Some(f.display().to_string()),
        });
    }
    let cluster = cluster.map(load_cluster).transpose()?;
    let findings = policy_lint::lint(&sources, cluster.as_ref());
    let errors = findings
        .iter()
        .filter(|f| f.severity == policy_lint::Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "findings": findings,
                "errors": errors,
                "warnings": warnings,
                "files": sources.len(),
            }))?
        ),
        Output::Text => {
            for f in &findings {
                println!("{f}");
            }
            println!(
                "{errors} errors, {warnings} warnings in {} files",
                sources.len()
            );
        }
    }
    Ok(if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn trace(a: TraceArgs) -> Result<ExitCode> {
    let protocol = match Protocol::parse(&a.protocol) {
        Some(p @ (Protocol::Tcp | Protocol::Udp | Protocol::Sctp)) => p,
        _ => bail!("--protocol {}: expected TCP, UDP or SCTP", a.protocol),
    };
    let http = if a.http_method.is_some() || a.http_path.is_some() || !a.http_header.is_empty() {
        let mut headers = Vec::new();
        for h in &a.http_header {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--http-header {h:?}: expected Name:value"))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        Some(SimpleRequest {
            method: a.http_method.clone().unwrap_or_else(|| "GET".into()),
            path: a.http_path.clone().unwrap_or_else(|| "/".into()),
            host: None,
            headers,
        })
    } else {
        None
    };
    let query = Query {
        from: EndpointRef::parse(&a.from).map_err(anyhow::Error::msg)?,
        to: EndpointRef::parse(&a.to).map_err(anyhow::Error::msg)?,
        port: a.port,
        protocol,
        http,
        dns: a.dns_query.clone(),
    };
    let model = compile_model(
        &a.cluster,
        &a.policies,
        CompileOptions {
            cidr_matches_cluster: a.cidr_matches_cluster,
        },
    )?;
    let verdict = match (&a.sni, a.tls) {
        (None, false) => model.query(&query)?,
        (sni, _) => model.query_tls(&query, &TlsProbe { sni: sni.clone() })?,
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&verdict)?),
        Output::Text => print!("{verdict}"),
    }
    Ok(if verdict.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
