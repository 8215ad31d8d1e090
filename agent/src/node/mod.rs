//! `ward agent`: the node daemon. One process (tokio) that takes cluster state and
//! policies from a [`Source`], compiles them, and pushes the result from one place (the
//! [`reconcile`] task) to the datapath, the HTTP proxy and the DNS proxy it hosts; plus
//! endpoint discovery, the redirect routing, and the admin endpoint.

pub mod admin;
pub mod datapath;
pub mod endpoints;
pub mod events;
pub mod fqdn;
pub mod identities;
pub mod metrics;
pub mod reconcile;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use dns_proxy::listener::{serve_tcp, serve_udp, LocalAddr, TransparentUdp};
use dns_proxy::Scope;
use policy_model::{CompileOptions, Model};
use redirect_bpf::common::MARK_FROM_EGRESS_PROXY;
use redirect_bpf::{routing, Datapath, ProxyPorts};
use tokio::sync::mpsc;

use crate::source::Source;
use reconcile::{Msg, Reconciler, Status};

/// Everything `ward agent` needs, after the config file and the flags are merged.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    /// Where cluster state comes from.
    pub source: crate::cmd::agent::SourceKind,
    /// The files source's directory.
    pub source_dir: Option<PathBuf>,
    pub poll: Duration,
    pub bpf_root: PathBuf,
    pub state_dir: PathBuf,
    pub admin: SocketAddr,
    pub proxy_port: u16,
    pub dns_proxy_port: u16,
    pub uplinks: Vec<String>,
    /// `-` stdout, `none`, or a file.
    pub audit_log: String,
    pub transparent_source: bool,
    pub proxy: proxy::Config,
    pub dns: dns_proxy::Config,
    /// How policies are compiled.
    pub compile: CompileOptions,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(s: Settings, mut source: Box<dyn Source>) -> Result<()> {
    // The datapath: loaded on the pinned maps, which keep enforcing while no agent runs.
    let dp = Datapath::load(&s.bpf_root)
        .with_context(|| format!("loading the datapath at {}", s.bpf_root.display()))?;
    let applied = datapath::MapState::read(&dp).context("reading the pinned maps")?;
    let dp = Arc::new(Mutex::new(dp));
    if routing::ensure().context("installing the redirect routing")? {
        eprintln!(
            "ward agent: redirect routing installed (ip rule fwmark 0x200/0xf00 lookup {})",
            routing::TABLE
        );
    }
    for up in &s.uplinks {
        let mut g = dp
            .lock()
            .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
        g.attach_uplink(up)
            .with_context(|| format!("attaching to uplink {up}"))?;
    }

    let agent_metrics = metrics::AgentMetrics::new().context("agent metrics")?;
    let events = events::Events::new();
    let status = Arc::new(RwLock::new(Status {
        node: s.node.clone(),
        source: source.name(),
        ..Status::default()
    }));

    // Audit: both proxies' records to the audit log and the event stream.
    let http_metrics = proxy::Metrics::new();
    let dns_metrics = dns_proxy::metrics::Metrics::new().context("DNS proxy metrics")?;
    let (http_audit, http_rx) = proxy::AuditLog::channel(s.proxy.audit_queue, http_metrics.clone());
    let (dns_audit, dns_rx) =
        dns_proxy::audit::Audit::channel(s.dns.audit_capacity, dns_metrics.clone());
    let sink = events::AuditSink::open(&s.audit_log)
        .with_context(|| format!("cannot open audit log {}", s.audit_log))?;
    events::pump_audit(http_rx, dns_rx, sink, events.clone());

    // The first snapshot, so the proxies start with real policy.
    let first = source.next().await.context("reading the first snapshot")?;
    let obs = fqdn::Observations::load(&s.state_dir, &s.state_dir.join("dns"));
    let initial = {
        let mut store = crate::store::PolicyStore::default();
        store.replace_all(&first.objects, first.errors.clone());
        let mut cluster = first.cluster.clone();
        cluster.dns.extend(obs.to_cluster());
        let mut m = Model::compile(&cluster, store.policies(), s.compile);
        identities::StableIds::load(&s.state_dir).apply(&mut m);
        m
    };

    let (tx, rx) = mpsc::channel::<Msg>(1024);

    // The HTTP proxy.
    let http_store = Arc::new(proxy::PolicyStore::new(initial.clone()));
    let mut pcfg = s.proxy.clone();
    pcfg.node = Some(s.node.clone());
    pcfg.upstream_mark = Some(pcfg.upstream_mark.unwrap_or(MARK_FROM_EGRESS_PROXY));
    pcfg.transparent_source = s.transparent_source;
    let http_proxy = proxy::Proxy::new(
        pcfg,
        http_store.clone(),
        proxy::Mode::Transparent {
            node: Some(s.node.clone()),
        },
        http_audit,
        http_metrics.clone(),
    );
    let listen = SocketAddr::from(([0, 0, 0, 0], s.proxy_port));
    let listener = proxy::TransparentListener::bind(listen, true)
        .with_context(|| format!("HTTP proxy: cannot listen on {listen}"))?;
    tokio::spawn(async move {
        if let Err(e) = http_proxy.serve(listener).await {
            eprintln!("ward agent: HTTP proxy stopped: {e}");
        }
    });

    // The DNS proxy.
    let mut dcfg = s.dns.clone();
    dcfg.state_dir = Some(s.state_dir.join("dns"));
    dcfg.upstream_mark = Some(dcfg.upstream_mark.unwrap_or(MARK_FROM_EGRESS_PROXY));
    let dns = dns_proxy::Proxy::new(
        dcfg,
        Arc::new(initial),
        Scope::Node {
            node: Some(s.node.clone()),
        },
        Arc::new(fqdn::Sink { tx: tx.clone() }),
        Arc::new(fqdn::Conntrack(dp.clone())),
        dns_audit,
        dns_metrics.clone(),
    );
    let dns_listen = SocketAddr::from(([0, 0, 0, 0], s.dns_proxy_port));
    let udp = TransparentUdp::bind(dns_listen)
        .with_context(|| format!("DNS proxy: cannot bind udp {dns_listen}"))?;
    let tcp = dns_proxy::socket::transparent_tcp(dns_listen)
        .with_context(|| format!("DNS proxy: cannot bind tcp {dns_listen}"))?;
    tokio::spawn(serve_udp(dns.clone(), Arc::new(udp)));
    tokio::spawn(serve_tcp(dns.clone(), tcp, Arc::new(LocalAddr)));

    // The reconciler: the one writer of the datapath.
    let mut reconciler = Reconciler::new(
        s.node.clone(),
        dp.clone(),
        applied,
        obs,
        ProxyPorts {
            http: s.proxy_port,
            dns: s.dns_proxy_port,
        },
        (http_store, http_metrics.clone()),
        dns.clone(),
        status.clone(),
        agent_metrics.clone(),
        events.clone(),
    );
    reconciler.uplinks = s.uplinks.clone();
    reconciler.compile = s.compile;
    reconciler.identities = identities::StableIds::load(&s.state_dir);
    tx.send(Msg::Snapshot(first))
        .await
        .map_err(|_| anyhow::anyhow!("reconciler gone"))?;
    tokio::spawn(reconciler.run(rx));

    // The source feeds snapshots from now on.
    let stx = tx.clone();
    tokio::spawn(async move {
        loop {
            match source.next().await {
                Ok(snap) => {
                    if stx.send(Msg::Snapshot(snap)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("ward agent: source {}: {e:#}", source.name());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });

    // The DNS cache: restored (its IPs handed to the datapath again), then kept.
    let d = dns.clone();
    tokio::spawn(async move {
        match d.restore().await {
            Ok(n) => eprintln!("ward agent: DNS cache restored: {n} names"),
            Err(e) => eprintln!("ward agent: DNS cache not restored: {e}"),
        }
        let _maintenance = d.spawn_maintenance();
        std::future::pending::<()>().await;
    });

    let admin = admin::Admin {
        status,
        registries: vec![
            agent_metrics.registry.clone(),
            http_metrics.registry.clone(),
            dns_metrics.registry.clone(),
        ],
        events,
    };
    let l = tokio::net::TcpListener::bind(s.admin)
        .await
        .with_context(|| format!("admin: cannot listen on {}", s.admin))?;
    tokio::spawn(admin.serve(l));
    eprintln!(
        "ward agent: node {} serving: HTTP proxy :{}, DNS proxy :{}, admin {}",
        s.node, s.proxy_port, s.dns_proxy_port, s.admin
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("ward agent: shutting down; the pinned maps keep enforcing");
    if let Err(e) = dns.persist() {
        eprintln!("ward agent: persisting the DNS cache: {e}");
    }
    routing::remove().context("removing the redirect routing")?;
    Ok(())
}
