//! `ward dns-proxy`: the DNS proxy as a standalone filtering forwarder for one endpoint
//! (no transparency): queries from anyone are checked against that endpoint's DNS rules
//! towards the upstream, forwarded, and their answers' IPs learned and audited.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agent::app::open_files;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use dns_proxy::audit::{write_lines, Audit, DroppedCounter};
use dns_proxy::listener::{serve_tcp, serve_udp, FixedUpstream, ForwarderUdp};
use dns_proxy::metrics::Metrics;
use dns_proxy::{Config, NeverInUse, NullSink, Proxy, RefuseCode, Scope};
use policy_model::CompileOptions;
use proxy::metrics::{metrics_response, serve_endpoint, EndpointLimits, EndpointMetrics};

use crate::inputs::compile_model;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, UDP and TCP (e.g. 127.0.0.1:5353).
    #[arg(long)]
    listen: SocketAddr,
    /// The DNS server every query goes to.
    #[arg(long)]
    upstream: SocketAddr,
    /// The port the policies name for the upstream (default: the upstream's port): DNS
    /// rules are checked against it, as `ward proxy --port` does.
    #[arg(long)]
    port: Option<u16>,
    /// Cluster state: the `cluster:` shape of a conformance case, or a whole case file.
    #[arg(long)]
    cluster: PathBuf,
    /// Policy manifests (files or folders).
    #[arg(long, required = true, num_args = 1..)]
    policies: Vec<PathBuf>,
    /// The endpoint (NAMESPACE/POD) whose DNS rules apply.
    #[arg(long)]
    endpoint: String,
    /// Audit log: a file, or `-` for stdout.
    #[arg(long, default_value = "-")]
    audit_log: String,
    /// Response code of a denied query.
    #[arg(long, value_enum, default_value_t = Refuse::Refused)]
    refuse_code: Refuse,
    /// Learned IPs live at least this many seconds.
    #[arg(long, default_value_t = 0)]
    min_ttl: u32,
    /// State directory for the FQDN cache (restored at start).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Upstream timeout in milliseconds (then SERVFAIL).
    #[arg(long, default_value_t = 10_000)]
    upstream_timeout_ms: u64,
    /// Worker threads (default: one per CPU the process may use, from its affinity and
    /// CPU quota); 1 runs everything on the main thread (a current-thread runtime).
    #[arg(long)]
    threads: Option<usize>,
    /// Busy polling: after each query, poll the sockets instead of sleeping for this
    /// many microseconds (0: off). Cuts the wake-up latency of an idle CPU (large on
    /// virtual machines) at the price of the CPU time spent polling. Needs `--threads 1`.
    #[arg(long, default_value_t = 0)]
    busy_poll_us: u64,
    /// Queries handled at once; past it a query gets SERVFAIL at once (0: no limit).
    #[arg(long, default_value_t = dns_proxy::config::DEFAULT_CONCURRENCY_LIMIT)]
    concurrency_limit: usize,
    /// Queries of one client IP handled at once; past it that client's query gets
    /// SERVFAIL at once (0: no limit).
    #[arg(long, default_value_t = dns_proxy::config::DEFAULT_CLIENT_CONCURRENCY_LIMIT)]
    client_concurrency_limit: usize,
    /// DNS 0x20: send each query's name upstream in a random case that the answer must
    /// repeat exactly.
    #[arg(long)]
    randomize_case: bool,
    /// Address of the Prometheus metrics endpoint (GET /metrics).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Refuse {
    Refused,
    Nxdomain,
}

pub fn run(a: Args) -> Result<ExitCode> {
    // A socket per upstream query in flight.
    open_files::raise(open_files::wanted(a.concurrency_limit));
    let workers = super::workers(a.threads);
    if a.busy_poll_us > 0 && workers != 1 {
        // With several workers the one that polls may not hold the I/O driver, and the
        // wake-ups busy polling is meant to save happen anyway.
        bail!(
            "--busy-poll-us needs one worker thread (--threads 1, or a process that may use \
             one CPU): one thread that both serves and polls"
        );
    }
    let rt = super::runtime(workers).context("cannot start the runtime")?;
    let r = rt.block_on(serve(a));
    // Lets the audit writer drain what is queued.
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

async fn serve(a: Args) -> Result<ExitCode> {
    let model = compile_model(&a.cluster, &a.policies, CompileOptions::default())?;
    if model.pod_endpoint(&a.endpoint).is_none() {
        bail!("no pod {} in {}", a.endpoint, a.cluster.display());
    }
    let config = Config {
        refuse_code: match a.refuse_code {
            Refuse::Refused => RefuseCode::Refused,
            Refuse::Nxdomain => RefuseCode::Nxdomain,
        },
        min_ttl: a.min_ttl,
        state_dir: a.state_dir,
        upstream_timeout: Duration::from_millis(a.upstream_timeout_ms),
        busy_poll_us: a.busy_poll_us,
        concurrency_limit: a.concurrency_limit,
        client_concurrency_limit: a.client_concurrency_limit,
        randomize_case: a.randomize_case,
        ..Config::default()
    };
    let metrics = Metrics::new().context("metrics")?;
    let dropped = DroppedCounter::new();
    dropped
        .register(&metrics.registry)
        .context("registering ward_audit_dropped_total")?;
    let (audit, rx) = Audit::channel(config.audit_capacity, dropped);
    let out: Box<dyn Write + Send> = if a.audit_log == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.audit_log)
            .with_context(|| format!("cannot open {}", a.audit_log))?;
        Box::new(std::io::BufWriter::new(f))
    };
    tokio::task::spawn_blocking(move || write_lines(rx, out, |_| {}));
    let proxy = Proxy::new(
        config,
        Arc::new(model),
        Scope::Endpoint(a.endpoint.clone()),
        Arc::new(NullSink),
        Arc::new(NeverInUse),
        audit,
        metrics,
    )
    .with_policy_port(a.port);
    if let Some(busy) = proxy.busy_poll() {
        tokio::spawn(busy.run());
    }
    let restored = proxy.restore().await.context("restoring the FQDN cache")?;
    if let Some(addr) = a.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind the metrics endpoint {addr}"))?;
        let metrics = proxy.metrics().clone();
        let counted = EndpointMetrics::register(&metrics.registry, "metrics")
            .context("metrics endpoint metrics")?;
        tokio::spawn(serve_endpoint(
            l,
            EndpointLimits::default(),
            counted,
            move |req| metrics_response(req.uri().path(), || metrics.render()),
        ));
    }
    let _maintenance = proxy.spawn_maintenance();
    let udp = tokio::net::UdpSocket::bind(a.listen)
        .await
        .with_context(|| format!("cannot bind udp {}", a.listen))?;
    let tcp = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot bind tcp {}", a.listen))?;
    tracing::info!(
        listen = %a.listen,
        upstream = %a.upstream,
        endpoint = %a.endpoint,
        restored,
        "DNS proxy serving"
    );
    let udp_task = tokio::spawn(serve_udp(
        proxy.clone(),
        Arc::new(ForwarderUdp {
            socket: udp,
            upstream: a.upstream,
        }),
    ));
    let tcp_task = tokio::spawn(serve_tcp(
        proxy.clone(),
        tcp,
        Arc::new(FixedUpstream(a.upstream)),
    ));
    tokio::select! {
        r = udp_task => r.context("udp listener")?.context("udp listener")?,
        r = tcp_task => r.context("tcp listener")?.context("tcp listener")?,
        r = tokio::signal::ctrl_c() => r.context("signal")?,
    }
    if let Err(e) = proxy.persist() {
        tracing::warn!(error = %e, "cannot persist the FQDN cache");
    }
    Ok(ExitCode::SUCCESS)
}
