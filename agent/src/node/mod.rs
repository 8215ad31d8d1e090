//! `ward agent`: the node daemon. One process (tokio) that takes cluster state and
//! policies from a [`Source`], compiles them, and pushes the result from one place (the
//! [`reconcile`] task) to the datapath, the HTTP proxy and the DNS proxy it hosts; plus
//! endpoint discovery, the redirect routing, and the admin endpoint.

pub mod admin;
pub mod datapath;
pub mod drops;
pub mod endpoints;
pub mod events;
pub mod fqdn;
pub mod identities;
pub mod metrics;
pub mod reconcile;
pub mod revoke;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use dns_proxy::listener::{serve_tcp, serve_udp, LocalAddr, TransparentUdp};
use dns_proxy::Scope;
use policy_model::{CompileOptions, Model};
use redirect_bpf::common::MARK_FROM_EGRESS_PROXY;
use redirect_bpf::netlink::{NetChanges, Netlink};
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
    /// How often endpoints are looked for when no route or link change woke discovery.
    pub endpoint_recheck: Duration,
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

/// Binds the DNS proxy's UDP and TCP listeners (IPv4, and IPv6 when the node has it) and
/// serves them on the current runtime.
fn serve_dns(dns: &dns_proxy::Proxy, port: u16, ipv6: bool) -> Result<()> {
    let dns_listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let udp = TransparentUdp::bind(dns_listen)
        .with_context(|| format!("DNS proxy: cannot bind udp {dns_listen}"))?;
    let tcp = dns_proxy::socket::transparent_tcp(dns_listen)
        .with_context(|| format!("DNS proxy: cannot bind tcp {dns_listen}"))?;
    tokio::spawn(serve_udp(dns.clone(), Arc::new(udp)));
    tokio::spawn(serve_tcp(dns.clone(), tcp, Arc::new(LocalAddr)));
    let dns_listen6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    if let Some(udp6) = bind_ipv6(ipv6, "DNS proxy (udp)", dns_listen6, || {
        TransparentUdp::bind(dns_listen6)
    })? {
        tokio::spawn(serve_udp(dns.clone(), Arc::new(udp6)));
    }
    if let Some(tcp6) = bind_ipv6(ipv6, "DNS proxy (tcp)", dns_listen6, || {
        dns_proxy::socket::transparent_tcp(dns_listen6)
    })? {
        tokio::spawn(serve_tcp(dns.clone(), tcp6, Arc::new(LocalAddr)));
    }
    Ok(())
}

/// Binds an IPv6 listener of a proxy when the node has IPv6 (`ipv6`). A node without it
/// (disabled in the namespace, or a kernel without the family) gets None: the agent
/// serves IPv4, and IPv6 flows that need the proxy stay dropped by the datapath (fail
/// closed, counted as PROXY_UNAVAILABLE). Any other bind error is the agent's error, as
/// for IPv4.
fn bind_ipv6<T>(
    ipv6: bool,
    what: &str,
    addr: SocketAddr,
    bind: impl FnOnce() -> std::io::Result<T>,
) -> Result<Option<T>> {
    if !ipv6 {
        return Ok(None);
    }
    match bind() {
        Ok(l) => Ok(Some(l)),
        Err(e)
            if matches!(
                e.raw_os_error().map(nix::errno::Errno::from_raw),
                Some(nix::errno::Errno::EAFNOSUPPORT | nix::errno::Errno::EADDRNOTAVAIL)
            ) =>
        {
            eprintln!(
                "ward agent: {what}: no IPv6 listener on {addr} ({e}); IPv6 flows that need \
                 it are dropped (proxy_unavailable)"
            );
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("{what}: cannot listen on {addr}")),
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(s: Settings, mut source: Box<dyn Source>) -> Result<()> {
    // The datapath: loaded on the pinned maps, which keep enforcing while no agent runs.
    let mut dp = Datapath::load(&s.bpf_root)
        .with_context(|| format!("loading the datapath at {}", s.bpf_root.display()))?;
    let drop_events = dp
        .take_drop_events()
        .context("the datapath's drop events")?
        .into_async()
        .context("watching the drop event ring buffer")?;
    let applied = datapath::MapState::read(&dp).context("reading the pinned maps")?;
    let dp = Arc::new(Mutex::new(dp));
    // The node's namespace (entered before the runtime started): route lookups, the
    // redirect routing, and the route and link changes that wake endpoint discovery,
    // watched from before the first discovery so that no change falls in between.
    let netlink = Netlink::connect().context("netlink")?;
    let net_changes = NetChanges::watch().context("netlink")?;
    let ipv6 = routing::ipv6_enabled();
    if !ipv6 {
        eprintln!(
            "ward agent: IPv6 is disabled in this network namespace: no IPv6 redirect routing \
             or proxy listeners; IPv6 flows that need a proxy are dropped (proxy_unavailable)"
        );
    }
    if routing::ensure(&netlink)
        .await
        .context("installing the redirect routing")?
    {
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
    tokio::spawn(drops::read(drop_events, events.clone(), http_store.clone()));
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
    // One listener per family on the port: the datapath hands IPv4 flows to the socket
    // of 127.0.0.1:port and IPv6 flows to the one of [::1]:port. IPv4 is required; IPv6
    // only where the node has it (see bind_ipv6).
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, s.proxy_port));
    let listener = proxy::TransparentListener::bind(listen, true)
        .with_context(|| format!("HTTP proxy: cannot listen on {listen}"))?;
    let listen6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, s.proxy_port));
    let listener6 = bind_ipv6(ipv6, "HTTP proxy", listen6, || {
        proxy::TransparentListener::bind(listen6, true)
    })?;
    let p = http_proxy.clone();
    tokio::spawn(async move {
        if let Err(e) = p.serve(listener).await {
            eprintln!("ward agent: HTTP proxy stopped: {e}");
        }
    });
    if let Some(listener6) = listener6 {
        tokio::spawn(async move {
            if let Err(e) = http_proxy.serve(listener6).await {
                eprintln!("ward agent: HTTP proxy (IPv6) stopped: {e}");
            }
        });
    }

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
    match dns.busy_poll() {
        None => serve_dns(&dns, s.dns_proxy_port, ipv6)?,
        // Busy polling works only where the polling thread is the one that reads the
        // sockets: the DNS proxy gets its own current-thread runtime on its own thread.
        Some(busy) => {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (d, port) = (dns.clone(), s.dns_proxy_port);
            std::thread::Builder::new()
                .name("ward-dns".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let started = serve_dns(&d, port, ipv6);
                        let ok = started.is_ok();
                        let _ = ready_tx.send(started);
                        if ok {
                            busy.run().await;
                        }
                    });
                })
                .context("DNS proxy: cannot start its thread")?;
            ready_rx
                .recv()
                .context("DNS proxy: its thread ended before it started")??;
        }
    }

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
        netlink.clone(),
    );
    reconciler.endpoint_recheck = s.endpoint_recheck;
    reconciler.uplinks = s.uplinks.clone();
    reconciler.compile = s.compile;
    reconciler.identities = identities::StableIds::load(&s.state_dir);
    tx.send(Msg::Snapshot(first))
        .await
        .map_err(|_| anyhow::anyhow!("reconciler gone"))?;
    tokio::spawn(reconciler.run(rx, net_changes));

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

    let admin_metrics = proxy::metrics::EndpointMetrics::register(&agent_metrics.registry, "admin")
        .context("admin endpoint metrics")?;
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
    tokio::spawn(admin.serve(l, admin_metrics));
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
    routing::remove(&netlink)
        .await
        .context("removing the redirect routing")?;
    Ok(())
}
