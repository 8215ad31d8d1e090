//! `ward proxy`: the L7 proxy in standalone mode, a policy-enforcing reverse proxy in
//! front of one workload. The source identity comes from the client's IP through the
//! cluster file; the rules are those of `--endpoint` in `--direction`. SIGHUP reloads the
//! cluster file and the policies; the new rules apply to the next request.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use agent::secrets::dir::DirWatch;
use agent::secrets::{broken, Feed, SecretSource};
use agent::telemetry::events::Events;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use policy_model::{CompileOptions, Direction, Model};
use proxy::{
    AuditLog, Config, DroppedCounter, FixedListener, Metrics, Mode, PolicyStore, Proxy, SecretStore,
};

use crate::inputs::compile_model;

#[derive(Args)]
pub struct ProxyArgs {
    /// Address to accept clients on.
    #[arg(long)]
    listen: SocketAddr,
    /// The workload behind the proxy.
    #[arg(long)]
    upstream: SocketAddr,
    /// Cluster state: the `cluster:` shape of a conformance case, or a whole case file.
    #[arg(long)]
    cluster: PathBuf,
    /// Policy manifests (files or folders).
    #[arg(long, required = true, num_args = 1..)]
    policies: Vec<PathBuf>,
    /// The endpoint whose rules apply, NAMESPACE/POD.
    #[arg(long)]
    endpoint: String,
    /// Ingress: the clients are the peers (default). Egress: the endpoint is the client
    /// and the upstream the peer.
    #[arg(long, value_enum, default_value_t = Dir::Ingress)]
    direction: Dir,
    /// The port the policies name (default: the upstream's port).
    #[arg(long)]
    port: Option<u16>,
    /// Audit log: a file to append JSON lines to, or `-` for stdout.
    #[arg(long)]
    audit_log: Option<String>,
    /// Address of the Prometheus metrics endpoint (GET /metrics).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Proxy settings (timeouts, limits) as a JSON object; keys as in the proxy README.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Worker threads (default: one per CPU the process may use, from its affinity and
    /// CPU quota); 1 runs everything on the main thread (a current-thread runtime).
    #[arg(long)]
    threads: Option<usize>,
    /// TLS secrets of the policies (terminatingTLS, originatingTLS, headerMatches
    /// secrets) as files DIR/NAMESPACE/NAME/KEY, watched; without it, rules that need
    /// material fail closed.
    #[arg(long)]
    certificates_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dir {
    Ingress,
    Egress,
}

pub fn run(a: ProxyArgs) -> Result<ExitCode> {
    let workers = super::workers(a.threads);
    super::runtime(workers)
        .context("cannot start the runtime")?
        .block_on(serve(a))
}

fn compile(a: &ProxyArgs) -> Result<Model> {
    let model = compile_model(&a.cluster, &a.policies, CompileOptions::default())?;
    if model.pod_endpoint(&a.endpoint).is_none() {
        bail!(
            "--endpoint {}: no such pod in {}",
            a.endpoint,
            a.cluster.display()
        );
    }
    Ok(model)
}

async fn serve(a: ProxyArgs) -> Result<ExitCode> {
    let config: Config = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?
        }
        None => Config::default(),
    };
    let store = Arc::new(PolicyStore::new(compile(&a)?));
    let metrics = Metrics::new();
    let audit = match a.audit_log.as_deref() {
        None => AuditLog::disabled(),
        Some(spec) => start_audit(spec, config.audit_queue, &metrics)?,
    };
    let mode = Mode::Standalone {
        endpoint: a.endpoint.clone(),
        direction: match a.direction {
            Dir::Ingress => Direction::Ingress,
            Dir::Egress => Direction::Egress,
        },
        port: a.port,
    };
    // before the listener accepts, so a SIGHUP never meets the default action (exit)
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    let secrets = Arc::new(SecretStore::new());
    let proxy = Proxy::with_secrets(
        config,
        store.clone(),
        mode,
        audit,
        metrics.clone(),
        secrets.clone(),
    );
    if let Some(dir) = &a.certificates_dir {
        // read before serving; rules whose material is unusable are logged
        let changed = Feed::Dir(DirWatch::new(dir)).start(secrets).await;
        tokio::spawn(broken::report(
            proxy.clone(),
            SecretSource::Dir(dir.clone()),
            Events::new(),
            changed,
            tokio::sync::watch::channel(Vec::new()).0,
        ));
    }
    if let Some(addr) = a.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tokio::spawn(proxy::metrics::serve(l, metrics.clone()));
    }
    let listener = FixedListener::bind(a.listen, a.upstream)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(
        listen = %a.listen,
        upstream = %a.upstream,
        endpoint = %a.endpoint,
        direction = match a.direction {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        },
        "proxy serving"
    );
    let serving = proxy.serve(listener);
    tokio::pin!(serving);
    loop {
        tokio::select! {
            r = &mut serving => {
                r?;
                return Ok(ExitCode::SUCCESS);
            }
            _ = hup.recv() => match compile(&a) {
                Ok(m) => {
                    let g = store.publish(m);
                    metrics.policy_generation.set(i64::try_from(g).unwrap_or(i64::MAX));
                    tracing::info!(generation = g, "policies reloaded");
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "reload failed; the last good policies stay in force"
                ),
            },
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// The audit queue and its writer (on a blocking thread) for `--audit-log SPEC`: `-` is
/// stdout, anything else a file appended to. `ward_audit_dropped_total` joins the
/// proxy's metrics.
fn start_audit(spec: &str, capacity: usize, metrics: &Metrics) -> Result<AuditLog> {
    let out: Box<dyn Write + Send> = if spec == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec)
            .with_context(|| format!("cannot open audit log {spec}"))?;
        Box::new(std::io::BufWriter::new(f))
    };
    let dropped = DroppedCounter::new();
    dropped
        .register(&metrics.registry)
        .context("registering ward_audit_dropped_total")?;
    let (log, rx) = AuditLog::channel(capacity, dropped);
    tokio::task::spawn_blocking(move || audit::write_lines(rx, out, |_| {}));
    Ok(log)
}
