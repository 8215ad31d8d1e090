//! `ward agent`: the node daemon. One process (tokio) that takes cluster state and
//! policies from a [`Source`], compiles them, and pushes the result from one place (the
//! [`reconcile`](crate::reconcile) tasks) to the datapath, the HTTP proxy and the DNS
//! proxy it hosts; plus endpoint discovery, the redirect routing, and the admin endpoint.

pub mod config;
pub mod handoff;
pub mod open_files;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dns_proxy::listener::{serve_tcp, serve_udp, LocalAddr, TransparentUdp};
use dns_proxy::Scope;
use handoff::Role;
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
    /// How long HTTP connections may finish after a new agent took over (`handoff`).
    pub drain: Duration,
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
    #[error("taking over from the running agent: {0}")]
    Handoff(#[from] handoff::Error),
}

type Result<T> = std::result::Result<T, Error>;

/// Default of [`Settings::drain`].
pub const DRAIN: Duration = Duration::from_secs(30);
/// How long a hand-off step (the sockets, the release) may take.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a released agent waits for the DNS queries it holds.
const DNS_GRACE: Duration = Duration::from_secs(5);

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

/// The DNS proxy's sockets: UDP and TCP, IPv4 and (where the node has it) IPv6. Kept as
/// std sockets until [`DnsSockets::serve`], so that they register with the runtime that
/// serves them (the busy-polling thread's own, when it has one).
struct DnsSockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    udp6: Option<std::net::UdpSocket>,
    tcp6: Option<std::net::TcpListener>,
}

/// The DNS proxy's sockets, the predecessor's (`inherited`) where it had them on this
/// port, else bound here.
fn dns_sockets(inherited: &mut Inherited, port: u16, ipv6: bool) -> Result<DnsSockets> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let bind_udp = |addr| -> std::io::Result<std::net::UdpSocket> {
        TransparentUdp::bind(addr)?.socket.into_std()
    };
    let bind_tcp = |addr| -> std::io::Result<std::net::TcpListener> {
        dns_proxy::socket::transparent_tcp(addr)?.into_std()
    };
    let udp = match inherited.std_udp(Role::DnsUdp4, port) {
        Some(u) => u,
        None => bind_udp(v4).map_err(listen_error("DNS proxy (udp)", v4))?,
    };
    let tcp = match inherited.std_tcp(Role::DnsTcp4, port) {
        Some(t) => t,
        None => bind_tcp(v4).map_err(listen_error("DNS proxy (tcp)", v4))?,
    };
    let udp6 = match inherited.std_udp(Role::DnsUdp6, port) {
        Some(u) => Some(u),
        None => bind_ipv6(ipv6, "DNS proxy (udp)", v6, || bind_udp(v6))?,
    };
    let tcp6 = match inherited.std_tcp(Role::DnsTcp6, port) {
        Some(t) => Some(t),
        None => bind_ipv6(ipv6, "DNS proxy (tcp)", v6, || bind_tcp(v6))?,
    };
    Ok(DnsSockets {
        udp,
        tcp,
        udp6,
        tcp6,
    })
}

impl DnsSockets {
    /// Copies of the sockets, to offer to a successor.
    fn offer(&self, out: &mut handoff::Sockets) -> Result<()> {
        offer_fd(out, Role::DnsUdp4, self.udp.as_fd())?;
        offer_fd(out, Role::DnsTcp4, self.tcp.as_fd())?;
        if let Some(u) = &self.udp6 {
            offer_fd(out, Role::DnsUdp6, u.as_fd())?;
        }
        if let Some(t) = &self.tcp6 {
            offer_fd(out, Role::DnsTcp6, t.as_fd())?;
        }
        Ok(())
    }

    /// Serves the sockets on the current runtime until the proxy stops serving.
    fn serve(self, dns: &dns_proxy::Proxy) -> Result<()> {
        let udp = |s| TransparentUdp::from_std(s).map_err(io_error("serving a DNS socket"));
        let tcp = |s: std::net::TcpListener| {
            s.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(s))
                .map_err(io_error("serving a DNS socket"))
        };
        tokio::spawn(serve_udp(dns.clone(), Arc::new(udp(self.udp)?)));
        tokio::spawn(serve_tcp(dns.clone(), tcp(self.tcp)?, Arc::new(LocalAddr)));
        if let Some(udp6) = self.udp6 {
            tokio::spawn(serve_udp(dns.clone(), Arc::new(udp(udp6)?)));
        }
        if let Some(tcp6) = self.tcp6 {
            tokio::spawn(serve_tcp(dns.clone(), tcp(tcp6)?, Arc::new(LocalAddr)));
        }
        Ok(())
    }
}

/// The sockets a predecessor handed over (none without one). A socket is taken only for
/// the port it is asked for: a successor configured with another port binds its own.
#[derive(Default)]
struct Inherited(handoff::Sockets);

impl Inherited {
    fn std_tcp(&mut self, role: Role, port: u16) -> Option<std::net::TcpListener> {
        let l = std::net::TcpListener::from(self.0.take(role)?);
        match l.local_addr() {
            Ok(a) if a.port() == port => Some(l),
            _ => None,
        }
    }

    fn std_udp(&mut self, role: Role, port: u16) -> Option<std::net::UdpSocket> {
        let u = std::net::UdpSocket::from(self.0.take(role)?);
        match u.local_addr() {
            Ok(a) if a.port() == port => Some(u),
            _ => None,
        }
    }

    fn http(&mut self, role: Role, port: u16) -> Option<proxy::TransparentListener> {
        proxy::TransparentListener::from_std(self.std_tcp(role, port)?).ok()
    }

    /// The admin listener, when the predecessor's listened on `addr`.
    fn admin(&mut self, addr: SocketAddr) -> Option<tokio::net::TcpListener> {
        let l = std::net::TcpListener::from(self.0.take(Role::Admin)?);
        if l.local_addr().ok()? != addr {
            return None;
        }
        l.set_nonblocking(true).ok()?;
        tokio::net::TcpListener::from_std(l).ok()
    }
}

/// A copy of a listening socket for the offer.
fn offer_fd(out: &mut handoff::Sockets, role: Role, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let owned = fd
        .try_clone_to_owned()
        .map_err(io_error("duplicating a listening socket"))?;
    out.0.insert(role, owned);
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
    let initial = {
        // what is saved now; a predecessor may still learn until its release, and the
        // publisher starts from what it saved then
        let obs = fqdn::Observations::load(&s.state_dir, &s.state_dir.join("dns"));
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
    // The sockets: a planned restart takes the running agent's (`handoff`), else they
    // are bound here.
    let state_dir = s.state_dir.clone();
    let taken =
        tokio::task::spawn_blocking(move || handoff::take_over(&state_dir, HANDOFF_TIMEOUT))
            .await
            .map_err(|e| io_error("the hand-off thread")(std::io::Error::other(e)))??;
    let (predecessor, mut inherited) = match taken {
        Some((p, sockets)) => (Some(p), Inherited(sockets)),
        None => (None, Inherited::default()),
    };
    // One listener per family on the port: the datapath hands IPv4 flows to the socket
    // of 127.0.0.1:port and IPv6 flows to the one of [::1]:port. IPv4 is required; IPv6
    // only where the node has it (see bind_ipv6).
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, s.proxy_port));
    let listener = match inherited.http(Role::Http4, s.proxy_port) {
        Some(l) => l,
        None => proxy::TransparentListener::bind(listen, true)
            .map_err(listen_error("HTTP proxy", listen))?,
    };
    let listen6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, s.proxy_port));
    let listener6 = match inherited.http(Role::Http6, s.proxy_port) {
        Some(l) => Some(l),
        None => bind_ipv6(ipv6, "HTTP proxy", listen6, || {
            proxy::TransparentListener::bind(listen6, true)
        })?,
    };
    let dns_sockets = dns_sockets(&mut inherited, s.dns_proxy_port, ipv6)?;
    let inherited_admin = inherited.admin(s.admin);
    // What this agent will offer its own successor.
    let mut offered = handoff::Sockets::default();
    offer_fd(&mut offered, Role::Http4, listener.as_fd())?;
    if let Some(l6) = &listener6 {
        offer_fd(&mut offered, Role::Http6, l6.as_fd())?;
    }
    dns_sockets.offer(&mut offered)?;
    let mut accepting = Vec::new();
    let p = http_proxy.clone();
    accepting.push(tokio::spawn(async move {
        if let Err(e) = p.serve(listener).await {
            tracing::error!(error = %e, "HTTP proxy stopped");
        }
    }));
    if let Some(listener6) = listener6 {
        let p = http_proxy.clone();
        accepting.push(tokio::spawn(async move {
            if let Err(e) = p.serve(listener6).await {
                tracing::error!(error = %e, "HTTP proxy (IPv6) stopped");
            }
        }));
    }
    match dns.busy_poll() {
        None => dns_sockets.serve(&dns)?,
        // Busy polling works only where the polling thread is the one that reads the
        // sockets: the DNS proxy gets its own current-thread runtime on its own thread.
        Some(busy) => {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let d = dns.clone();
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
                        let started = dns_sockets.serve(&d);
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
    // From the release on this agent is the one that writes the maps (it serves the
    // sockets already, beside the predecessor: each connection and datagram goes to one
    // of the two, and answers wait for this agent's first push); what the predecessor
    // learned until then is in the maps and its saved state, read next.
    if let Some(p) = predecessor {
        let released = tokio::task::spawn_blocking(move || p.release())
            .await
            .map_err(|e| io_error("the hand-off thread")(std::io::Error::other(e)))?;
        match released {
            Ok(()) => tracing::info!("took over from the running agent"),
            // It stops serving before it answers: waiting longer or binding anew would
            // leave the sockets unread.
            Err(e) => {
                tracing::warn!(error = %e, "the running agent did not confirm the release; serving anyway")
            }
        }
    }
    let applied = maps::MapState::read(&*dp.lock()).map_err(dp_error("reading the pinned maps"))?;
    let obs = fqdn::Observations::load(&s.state_dir, &s.state_dir.join("dns"));

    // The reconcile tasks; the publisher is the one writer of the policy maps.
    let mut handles = reconcile::spawn(
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
            conntrack: Box::new(
                dp.lock()
                    .conntrack_view()
                    .map_err(dp_error("opening the conntrack maps"))?,
            ),
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
    let feeder = tokio::spawn(async move {
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
    let maintenance = tokio::spawn(async move {
        match d.restore().await {
            Ok(n) => tracing::info!(names = n, "DNS cache restored"),
            Err(e) => tracing::warn!(error = %e, "DNS cache not restored"),
        }
        // stopped with this task (a release aborts it)
        let _upkeep = AbortOnDrop(d.spawn_maintenance());
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
    let l = match inherited_admin {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(s.admin)
            .await
            .map_err(listen_error("admin endpoint", s.admin))?,
    };
    offer_fd(&mut offered, Role::Admin, l.as_fd())?;
    accepting.push(tokio::spawn(admin.serve(l, admin_metrics)));
    tracing::info!(
        node = %s.node,
        http_proxy_port = s.proxy_port,
        dns_proxy_port = s.dns_proxy_port,
        admin = %s.admin,
        admin_token = s.admin_token.is_some(),
        "serving"
    );

    // A successor may take the sockets over (`handoff`).
    let (handed, handed_rx) = tokio::sync::watch::channel(Handed::No);
    let mut writing = std::mem::take(&mut handles.tasks);
    writing.push(feeder);
    writing.push(maintenance);
    let release = Release {
        accepting,
        writing,
        dns: dns.clone(),
        http: http_proxy.clone(),
        handed,
    };
    let offer = handoff::Offer::bind(&s.state_dir)?;
    tokio::spawn(offer.serve(offered, move || release.run()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_error("cannot watch SIGTERM"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if let Some(since) = handed_over(handed_rx).await {
        drain(&http_proxy, since + s.drain).await;
        tracing::info!("stopping after a hand-off: the new agent serves; the routing stays");
        return Ok(());
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

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether this agent handed its sockets to a successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handed {
    No,
    /// A release runs.
    Releasing,
    /// Released at this instant.
    Released(Instant),
}

/// When the sockets went to a successor, waiting for a release under way to end; None
/// when they did not.
async fn handed_over(mut rx: tokio::sync::watch::Receiver<Handed>) -> Option<Instant> {
    match rx.wait_for(|h| *h != Handed::Releasing).await.map(|h| *h) {
        Ok(Handed::Released(at)) => Some(at),
        _ => None,
    }
}

/// Waits until the HTTP proxy's connections are closed, or `until`.
async fn drain(http: &proxy::Proxy, until: Instant) {
    loop {
        let open = http.open_connections();
        if open <= 0 {
            tracing::info!("drained: no HTTP connection left");
            return;
        }
        if Instant::now() >= until {
            tracing::info!(open, "drain window over: the connections left are closed");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a running agent stops when a successor takes its sockets over.
struct Release {
    /// The accept loops: HTTP proxy, admin endpoint.
    accepting: Vec<tokio::task::JoinHandle<()>>,
    /// The tasks that write the maps or the saved state: reconcile, the source feeder,
    /// the DNS cache's maintenance.
    writing: Vec<tokio::task::JoinHandle<()>>,
    dns: dns_proxy::Proxy,
    http: proxy::Proxy,
    handed: tokio::sync::watch::Sender<Handed>,
}

impl Release {
    /// Stops serving and writing (see `handoff`): accept loops and DNS reads first; the
    /// DNS queries in hand are answered (their IPs still written by this agent); then no
    /// more map writes, the DNS cache saved for the successor, and the HTTP connections
    /// draining.
    async fn run(self) {
        self.handed.send_replace(Handed::Releasing);
        for t in &self.accepting {
            t.abort();
        }
        self.dns.stop_serving();
        let deadline = Instant::now() + DNS_GRACE;
        while self.dns.queries_in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for t in &self.writing {
            t.abort();
        }
        // an aborted task ends at its next await: a map write under way finishes first
        for t in self.writing {
            let _ = t.await;
        }
        if let Err(e) = self.dns.persist() {
            tracing::warn!(error = %e, "cannot persist the DNS cache for the new agent");
        }
        self.http.drain();
        self.handed.send_replace(Handed::Released(Instant::now()));
    }
}
