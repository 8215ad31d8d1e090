//! `ward agent`: the node daemon. One process (tokio) that takes cluster state and
//! policies from a [`Source`], compiles them, and pushes the result from one place (the
//! [`reconcile`](crate::reconcile) tasks) to the datapath, the HTTP proxy and the DNS
//! proxy it hosts; plus endpoint discovery, the redirect routing, and the admin endpoint.

pub mod config;
pub mod open_files;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dns_proxy::listener::{serve_tcp, serve_udp, LocalAddr, TransparentUdp};
use dns_proxy::Scope;
use policy_model::{CompileOptions, Model};
use redirect_bpf::common::MARK_FROM_EGRESS_PROXY;
use redirect_bpf::netlink::{NetChanges, Netlink, NetlinkError};
use redirect_bpf::{routing, Datapath, ProxyPorts};

use crate::admin;
use crate::datapath::Shared;
use crate::reconcile::publisher::{NodeProxies, Start};
use crate::reconcile::{self, attacher, dns, fqdn, identities, maps, Timing, Wiring};
use crate::source::Source;
use crate::telemetry::{audit, events, metrics};

/// Everything `ward agent` needs, after the config file and the flags are merged.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    /// Where cluster state comes from.
    pub source: config::SourceKind,
    /// The files source's directory.
    pub source_dir: Option<PathBuf>,
    /// How often the files source re-reads its directory behind the notifications.
    pub rescan: Duration,
    /// How often endpoints are looked for when no route or link change woke discovery.
    pub endpoint_recheck: Duration,
    pub bpf_root: PathBuf,
    /// Capacity of the policy map (`--policy-map-max`).
    pub policy_map_max: u32,
    pub state_dir: PathBuf,
    pub admin: SocketAddr,
    /// The token `/v1/*` and `/ui/*` of the admin endpoint need; None: open.
    pub admin_token: Option<admin::auth::Token>,
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
    /// Where the HTTP proxy's TLS secrets come from.
    pub secrets: crate::secrets::SecretSource,
}

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Datapath {
        what: String,
        source: redirect_bpf::Error,
    },
    #[error("{what}: cannot listen on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: &'static str,
        source: NetlinkError,
    },
    #[error("the datapath's drop event ring buffer was already handed out")]
    DropEventsTaken,
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("reading the first snapshot: {0}")]
    FirstSnapshot(#[source] crate::source::Error),
    #[error("the policy publisher stopped")]
    PublisherStopped,
    #[error("the DNS proxy's thread ended before it started")]
    DnsThread,
}

type Result<T> = std::result::Result<T, Error>;

fn dp_error(what: impl Into<String>) -> impl FnOnce(redirect_bpf::Error) -> Error {
    let what = what.into();
    move |source| Error::Datapath { what, source }
}

fn netlink_error(what: &'static str) -> impl FnOnce(NetlinkError) -> Error {
    move |source| Error::Netlink { what, source }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn listen_error(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Listen { what, addr, source }
}

/// Binds the DNS proxy's UDP and TCP listeners (IPv4, and IPv6 when the node has it) and
/// serves them on the current runtime.
fn serve_dns(dns: &dns_proxy::Proxy, port: u16, ipv6: bool) -> Result<()> {
    let dns_listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let udp =
        TransparentUdp::bind(dns_listen).map_err(listen_error("DNS proxy (udp)", dns_listen))?;
    let tcp = dns_proxy::socket::transparent_tcp(dns_listen)
        .map_err(listen_error("DNS proxy (tcp)", dns_listen))?;
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
    what: &'static str,
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
            tracing::warn!(
                listener = what,
                %addr,
                error = %e,
                "no IPv6 listener; IPv6 flows that need it are dropped (proxy_unavailable)"
            );
            Ok(None)
        }
        Err(e) => Err(listen_error(what, addr)(e)),
    }
}

/// Runs the agent until SIGTERM or SIGINT, with cluster state and policies from
/// `source` and the HTTP proxy's TLS secrets from `secrets`.
pub async fn run(
    s: Settings,
    mut source: Box<dyn Source>,
    secrets: crate::secrets::Feed,
) -> Result<()> {
    // The datapath: loaded on the pinned maps, which keep enforcing while no agent runs.
    let sizes = redirect_bpf::MapSizes {
        policy: s.policy_map_max,
    };
    let mut dp = Datapath::load_sized(&s.bpf_root, sizes).map_err(dp_error(format!(
        "loading the datapath at {}",
        s.bpf_root.display()
    )))?;
    for r in dp.replaced_maps() {
        tracing::info!(
            map = %r.name,
            pinned = %r.pinned,
            now = %r.loaded,
            carried = ?r.carried,
            "a pinned map of another definition (an earlier release's) was replaced; \
             the attached programs move to the new one as the pods are attached"
        );
    }
    let drop_events = dp
        .take_drop_events()
        .ok_or(Error::DropEventsTaken)?
        .into_async()
        .map_err(io_error("watching the drop event ring buffer"))?;
    let applied = maps::MapState::read(&dp).map_err(dp_error("reading the pinned maps"))?;
    let dp = Shared::new(dp);
    // The node's namespace (entered before the runtime started): route lookups, the
    // redirect routing, and the route and link changes that wake endpoint discovery,
    // watched from before the first discovery so that no change falls in between.
    let netlink = Netlink::connect().map_err(netlink_error("netlink"))?;
    let net_changes = NetChanges::watch().map_err(netlink_error("watching routes and links"))?;
    let ipv6 = routing::ipv6_enabled();
    if !ipv6 {
        tracing::warn!(
            "IPv6 is disabled in this network namespace: no IPv6 redirect routing or proxy \
             listeners; IPv6 flows that need a proxy are dropped (proxy_unavailable)"
        );
    }
    if routing::ensure(&netlink)
        .await
        .map_err(netlink_error("installing the redirect routing"))?
    {
        tracing::info!(
            rule = "fwmark 0x200/0xf00",
            table = routing::TABLE,
            "redirect routing installed"
        );
    }
    for up in &s.uplinks {
        dp.lock()
            .attach_uplink(up)
            .map_err(dp_error(format!("attaching to uplink {up}")))?;
    }

    let agent_metrics = metrics::AgentMetrics::new()?;
    let events = events::Events::new();

    // Audit: one queue for both proxies' records and the datapath's drops, one writer
    // to the audit log and the event stream. The queue holds what the two proxies' own
    // settings would hold (`audit_queue` + `audit_capacity`).
    let http_metrics = proxy::Metrics::new();
    let dns_metrics = dns_proxy::metrics::Metrics::new()?;
    let dropped = ::audit::DroppedCounter::new();
    dropped.register(&agent_metrics.registry)?;
    let sink = audit::AuditSink::open(&s.audit_log).map_err(io_error(format!(
        "cannot open the audit log {}",
        s.audit_log
    )))?;
    let audit_log = audit::start(
        s.proxy.audit_queue + s.dns.audit_capacity,
        sink,
        events.clone(),
        dropped,
    );

    // The first snapshot, so the proxies start with real policy.
    let first = source.next().await.map_err(Error::FirstSnapshot)?;
    let obs = fqdn::Observations::load(&s.state_dir, &s.state_dir.join("dns"));
    let initial = {
        let mut store = crate::store::PolicyStore::default();
        store.replace_all(&first.objects, first.errors.clone());
        let mut dns = first.cluster.dns.clone();
        dns.extend(obs.to_cluster());
        // this node's endpoints, as the publisher compiles them
        let mut m = Model::build(
            Arc::new(first.cluster.clone()),
            dns,
            store.policies(),
            s.compile,
            policy_model::compile::Scope::Node(s.node.clone()),
        );
        identities::StableIds::load(&s.state_dir).apply(&mut m);
        m
    };

    let (lane, lane_rx) = dns::lane();

    // The HTTP proxy.
    let http_store = Arc::new(proxy::PolicyStore::new(initial.clone()));
    let mut pcfg = s.proxy.clone();
    pcfg.node = Some(s.node.clone());
    pcfg.upstream_mark = Some(pcfg.upstream_mark.unwrap_or(MARK_FROM_EGRESS_PROXY));
    pcfg.transparent_source = s.transparent_source;
    let secret_store = Arc::new(proxy::SecretStore::new());
    let http_proxy = proxy::Proxy::with_secrets(
        pcfg,
        http_store.clone(),
        proxy::Mode::Transparent {
            node: Some(s.node.clone()),
        },
        audit_log.clone(),
        http_metrics.clone(),
        secret_store.clone(),
    );
    // Its secrets, read before it serves; the rules whose material is unusable, kept
    // for the status and said as events.
    let secrets_changed = secrets.start(secret_store).await;
    let (tls_tx, tls_broken) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(crate::secrets::broken::report(
        http_proxy.clone(),
        s.secrets.clone(),
        events.clone(),
        secrets_changed,
        tls_tx,
    ));
    // One listener per family on the port: the datapath hands IPv4 flows to the socket
    // of 127.0.0.1:port and IPv6 flows to the one of [::1]:port. IPv4 is required; IPv6
    // only where the node has it (see bind_ipv6).
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, s.proxy_port));
    let listener = proxy::TransparentListener::bind(listen, true)
        .map_err(listen_error("HTTP proxy", listen))?;
    let listen6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, s.proxy_port));
    let listener6 = bind_ipv6(ipv6, "HTTP proxy", listen6, || {
        proxy::TransparentListener::bind(listen6, true)
    })?;
    let p = http_proxy.clone();
    tokio::spawn(async move {
        if let Err(e) = p.serve(listener).await {
            tracing::error!(error = %e, "HTTP proxy stopped");
        }
    });
    if let Some(listener6) = listener6 {
        tokio::spawn(async move {
            if let Err(e) = http_proxy.serve(listener6).await {
                tracing::error!(error = %e, "HTTP proxy (IPv6) stopped");
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
        Arc::new(lane),
        Arc::new(dns::Conntrack(
            dp.lock()
                .conntrack_view()
                .map_err(dp_error("opening the conntrack maps"))?,
        )),
        audit_log.clone(),
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
                            let _ = ready_tx.send(Err(io_error("DNS proxy runtime")(e)));
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
                .map_err(io_error("DNS proxy: cannot start its thread"))?;
            ready_rx.recv().map_err(|_| Error::DnsThread)??;
        }
    }

    // The reconcile tasks; the publisher is the one writer of the policy maps.
    let handles = reconcile::spawn(
        Start {
            node: s.node.clone(),
            dp: dp.clone(),
            applied,
            fqdn: obs,
            identities: identities::StableIds::load(&s.state_dir),
            ports: ProxyPorts {
                http: s.proxy_port,
                dns: s.dns_proxy_port,
            },
            compile: s.compile,
            proxies: NodeProxies {
                http: http_store,
                http_metrics: http_metrics.clone(),
                dns: dns.clone(),
            },
            metrics: agent_metrics.clone(),
        },
        Wiring {
            discovery: attacher::Routes::new(netlink.clone()),
            wakeups: Some(attacher::net_wakeups(net_changes)),
            uplinks: s.uplinks.clone(),
            drop_events: Box::new(drop_events),
            audit: audit_log.clone(),
            timing: Timing {
                endpoint_recheck: s.endpoint_recheck,
                ..Timing::default()
            },
            dns: lane_rx,
        },
    );
    let snapshots = handles.snapshots.clone();
    snapshots
        .send(first)
        .await
        .map_err(|_| Error::PublisherStopped)?;

    // The source feeds snapshots from now on.
    let source_name = source.name();
    tokio::spawn(async move {
        loop {
            match source.next().await {
                Ok(snap) => {
                    if snapshots.send(snap).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        source = source.name(),
                        error = %e,
                        "source failed; retrying"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });

    // The DNS cache: restored (its IPs handed to the datapath again), then kept.
    let d = dns.clone();
    tokio::spawn(async move {
        match d.restore().await {
            Ok(n) => tracing::info!(names = n, "DNS cache restored"),
            Err(e) => tracing::warn!(error = %e, "DNS cache not restored"),
        }
        let _maintenance = d.spawn_maintenance();
        std::future::pending::<()>().await;
    });

    let admin_metrics =
        proxy::metrics::EndpointMetrics::register(&agent_metrics.registry, "admin")?;
    let admin = admin::Admin {
        node: s.node.clone(),
        source: source_name,
        policy: handles.status.clone(),
        drops: handles.drops.clone(),
        tls: tls_broken,
        registries: vec![
            agent_metrics.registry.clone(),
            http_metrics.registry.clone(),
            dns_metrics.registry.clone(),
        ],
        events,
        token: s.admin_token.clone(),
    };
    config::warn_exposed_admin(s.admin, s.admin_token.as_ref());
    let l = tokio::net::TcpListener::bind(s.admin)
        .await
        .map_err(listen_error("admin endpoint", s.admin))?;
    tokio::spawn(admin.serve(l, admin_metrics));
    tracing::info!(
        node = %s.node,
        http_proxy_port = s.proxy_port,
        dns_proxy_port = s.dns_proxy_port,
        admin = %s.admin,
        admin_token = s.admin_token.is_some(),
        "serving"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_error("cannot watch SIGTERM"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down; the pinned maps keep enforcing");
    if let Err(e) = dns.persist() {
        tracing::warn!(error = %e, "cannot persist the DNS cache");
    }
    routing::remove(&netlink)
        .await
        .map_err(netlink_error("removing the redirect routing"))?;
    Ok(())
}
