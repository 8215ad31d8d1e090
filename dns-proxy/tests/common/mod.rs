//! Test support: a scripted in-process upstream (hickory-proto messages, UDP and TCP on
//! one port), a hickory-proto client, a datapath sink that records and can delay, a
//! dnsmasq upstream, and the proxy started on loopback in standalone mode.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dns_proxy::audit::{Audit, AuditEvent, AuditRecord, DroppedCounter};
use dns_proxy::listener::{serve_tcp, serve_udp, FixedUpstream, ForwarderUdp};
use dns_proxy::metrics::Metrics;
use dns_proxy::sink::{BoxFuture, SinkError};
use dns_proxy::{Config, DatapathSink, InUse, Proxy, Scope, Update};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use policy_model::{CompileOptions, Model};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const ENDPOINT: &str = "app/client";

pub const CLUSTER: &str = r#"
namespaces:
- {name: app}
pods:
- {namespace: app, name: client, labels: {app: client}, ip: 10.0.1.10}
- {namespace: app, name: free, labels: {app: free}, ip: 10.0.1.11}
"#;

/// DNS rules of reference section 3.1 (one row each) plus names for the other tests;
/// toFQDNs selectors for learning. The upstream listens on an ephemeral loopback port,
/// which replaces `PORT` (DNS rules take no port ranges).
pub const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-client, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.0/8]
    toPorts:
    - ports: [{port: "PORT", protocol: ANY}]
      rules:
        dns:
        - matchName: example.com
        - matchPattern: "*.star.test"
        - matchPattern: "*example.org"
        - matchPattern: "sub*.example.net"
        - matchPattern: "part*ial.com"
        - matchPattern: "**.deep.test"
        - matchPattern: "*.app.test"
  - toFQDNs:
    - matchName: example.com
    - matchPattern: "**.deep.test"
    - matchPattern: "*.app.test"
    - matchPattern: "*.cdn.test"
"#;

pub fn model(dns_port: u16) -> Arc<Model> {
    model_with(POLICY, dns_port)
}

pub fn model_with(policy: &str, dns_port: u16) -> Arc<Model> {
    let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
    let policy = policy.replace("PORT", &dns_port.to_string());
    let (policies, errors, _) = policy_model::api::load(&policy, None);
    assert!(errors.is_empty(), "{errors:?}");
    Arc::new(Model::compile(
        &cluster,
        policies,
        CompileOptions::default(),
    ))
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Polls `cond` until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------- upstream

/// A query the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The query's id as the upstream got it.
    pub id: u16,
    /// The question's name as the upstream got it (case kept).
    pub raw_name: String,
    pub name: String,
    pub qtype: RecordType,
    pub tcp: bool,
    pub edns_payload: Option<u16>,
}

#[derive(Default)]
pub struct Zone {
    pub records: HashMap<(String, RecordType), Vec<Record>>,
    /// Names answered with TC and no records over UDP.
    pub truncate: HashSet<String>,
    /// Names answered with these bytes instead of a message.
    pub raw: HashMap<String, Vec<u8>>,
    /// Names never answered.
    pub silent: HashSet<String>,
    /// Over TCP, close each connection after answering this many queries on it.
    pub tcp_close_after: Option<usize>,
}

impl Zone {
    pub fn a(&mut self, name: &str, ttl: u32, ips: &[&str]) {
        let n = Name::from_ascii(name).unwrap();
        let recs = ips
            .iter()
            .map(|i| match ip(i) {
                IpAddr::V4(v4) => Record::from_rdata(n.clone(), ttl, RData::A(A(v4))),
                IpAddr::V6(v6) => Record::from_rdata(n.clone(), ttl, RData::AAAA(AAAA(v6))),
            })
            .collect::<Vec<_>>();
        let qtype = recs
            .first()
            .map(|r| r.record_type())
            .unwrap_or(RecordType::A);
        self.records.insert((key(name), qtype), recs);
    }

    pub fn cname(&mut self, name: &str, ttl: u32, target: &str) {
        let rec = Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::CNAME(CNAME(Name::from_ascii(target).unwrap())),
        );
        self.records
            .insert((key(name), RecordType::CNAME), vec![rec]);
    }
}

fn key(name: &str) -> String {
    policy_model::fqdn::normalize(name)
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub zone: Arc<Mutex<Zone>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted.
    pub tcp_connections: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no free port pair");
}

impl Upstream {
    pub async fn start(zone: Zone) -> Upstream {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(zone));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let udp = Arc::new(udp);
        let (z, s) = (zone.clone(), seen.clone());
        let t1 = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(r) = answer(&buf[..n], false, &z, &s) {
                    let _ = udp.send_to(&r, peer).await;
                }
            }
        });
        let (z, s) = (zone.clone(), seen.clone());
        let tcp_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = tcp_connections.clone();
        let t2 = tokio::spawn(async move {
            loop {
                let Ok((mut st, _)) = tcp.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (z, s) = (z.clone(), s.clone());
                tokio::spawn(async move {
                    let mut answered = 0;
                    while let Ok(n) = st.read_u16().await {
                        let close_after = z.lock().unwrap().tcp_close_after;
                        if close_after.is_some_and(|n| answered >= n) {
                            return;
                        }
                        answered += 1;
                        let mut q = vec![0u8; n as usize];
                        if st.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        if let Some(r) = answer(&q, true, &z, &s) {
                            let mut out = (r.len() as u16).to_be_bytes().to_vec();
                            out.extend(r);
                            if st.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            zone,
            seen,
            tcp_connections,
            tasks: vec![t1, t2],
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(q: &[u8], tcp: bool, zone: &Mutex<Zone>, seen: &Mutex<Vec<Seen>>) -> Option<Vec<u8>> {
    let q = Message::from_vec(q).ok()?;
    let question = q.queries().first()?.clone();
    let name = key(&question.name().to_ascii());
    seen.lock().unwrap().push(Seen {
        id: q.id(),
        raw_name: question.name().to_ascii(),
        name: name.clone(),
        qtype: question.query_type(),
        tcp,
        edns_payload: q.extensions().as_ref().map(|e| e.max_payload()),
    });
    let zone = zone.lock().unwrap();
    if zone.silent.contains(&name) {
        return None;
    }
    if let Some(raw) = zone.raw.get(&name) {
        let mut r = raw.clone();
        if r.len() >= 2 {
            r[..2].copy_from_slice(&q.id().to_be_bytes());
        }
        return Some(r);
    }
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true);
    m.add_query(question.clone());
    if q.extensions().is_some() {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    if !tcp && zone.truncate.contains(&name) {
        m.set_truncated(true);
        return m.to_vec().ok();
    }
    let mut current = name.clone();
    let mut found = false;
    for _ in 0..8 {
        if let Some(recs) = zone.records.get(&(current.clone(), question.query_type())) {
            m.add_answers(recs.iter().cloned());
            found = true;
            break;
        }
        match zone.records.get(&(current.clone(), RecordType::CNAME)) {
            Some(c) => {
                m.add_answers(c.iter().cloned());
                found = true;
                let RData::CNAME(t) = c[0].data() else { break };
                current = key(&t.0.to_ascii());
            }
            None => break,
        }
    }
    let exists = zone.records.keys().any(|(n, _)| *n == name);
    if !found && !exists {
        m.set_response_code(ResponseCode::NXDomain);
    }
    m.to_vec().ok()
}

// ---------------------------------------------------------------- client

pub async fn query(server: SocketAddr, name: &str, qtype: RecordType, tcp: bool) -> Message {
    try_query(server, name, qtype, tcp, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no answer for {name}"))
}

pub fn query_bytes(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

pub async fn try_query(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    tcp: bool,
    within: Duration,
) -> Option<Message> {
    let id = rand_id();
    let bytes = query_bytes(name, qtype, id);
    let raw = if tcp {
        tokio::time::timeout(within, tcp_exchange(server, &bytes))
            .await
            .ok()?
    } else {
        tokio::time::timeout(within, udp_exchange(server, &bytes))
            .await
            .ok()?
    }?;
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.id(), id);
    Some(m)
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u16
}

pub async fn udp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    s.send_to(bytes, server).await.ok()?;
    let mut buf = vec![0u8; 65_535];
    let (n, _) = s.recv_from(&mut buf).await.ok()?;
    buf.truncate(n);
    Some(buf)
}

pub async fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(server).await.ok()?;
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    s.write_all(&out).await.ok()?;
    let n = s.read_u16().await.ok()?;
    let mut buf = vec![0u8; n as usize];
    s.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

pub fn ips(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------- sink

#[derive(Clone, Debug)]
pub struct Applied {
    pub update: Update,
    pub started: Instant,
    pub finished: Option<Instant>,
}

/// Records updates; each one takes the next delay of `delays` (zero when empty).
#[derive(Clone, Default)]
pub struct TestSink(Arc<SinkState>);

#[derive(Default)]
pub struct SinkState {
    pub log: Mutex<Vec<Applied>>,
    pub delays: Mutex<VecDeque<Duration>>,
}

impl std::ops::Deref for TestSink {
    type Target = SinkState;
    fn deref(&self) -> &SinkState {
        &self.0
    }
}

impl TestSink {
    pub fn applied(&self) -> Vec<Applied> {
        self.log.lock().unwrap().clone()
    }

    pub fn delay_next(&self, d: Duration) {
        self.delays.lock().unwrap().push_back(d);
    }
}

impl DatapathSink for TestSink {
    fn apply(&self, update: Update) -> BoxFuture<'static, Result<(), SinkError>> {
        let me = self.clone();
        Box::pin(async move {
            let delay = me.delays.lock().unwrap().pop_front().unwrap_or_default();
            let idx = {
                let mut log = me.log.lock().unwrap();
                log.push(Applied {
                    update,
                    started: Instant::now(),
                    finished: None,
                });
                log.len() - 1
            };
            // A deliberate delay: the datapath being slow is what is under test.
            tokio::time::sleep(delay).await;
            me.log.lock().unwrap()[idx].finished = Some(Instant::now());
            Ok(())
        })
    }
}

#[derive(Clone, Default)]
pub struct TestInUse(Arc<InUseState>);

#[derive(Default)]
pub struct InUseState {
    pub ips: Mutex<HashSet<IpAddr>>,
    pub asked: AtomicBool,
    /// When set, a read of the live connections waits for a message here (at most 10 s),
    /// standing for a long walk of a large conntrack map.
    pub gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl std::ops::Deref for TestInUse {
    type Target = InUseState;
    fn deref(&self) -> &InUseState {
        &self.0
    }
}

impl InUse for TestInUse {
    fn live_ips(&self) -> Result<HashSet<IpAddr>, String> {
        self.asked.store(true, Ordering::Relaxed);
        if let Some(gate) = self.gate.lock().unwrap().as_ref() {
            let _ = gate.recv_timeout(Duration::from_secs(10));
        }
        Ok(self.ips.lock().unwrap().clone())
    }
}

// ---------------------------------------------------------------- proxy

pub struct Harness {
    pub proxy: Proxy,
    pub addr: SocketAddr,
    pub sink: TestSink,
    pub in_use: TestInUse,
    pub audit: tokio::sync::Mutex<mpsc::Receiver<AuditEvent>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Harness {
    pub async fn start(config: Config, upstream: SocketAddr) -> Harness {
        Harness::start_for(
            config,
            upstream,
            ENDPOINT,
            TestSink::default(),
            TestInUse::default(),
        )
        .await
    }

    pub async fn start_for(
        config: Config,
        upstream: SocketAddr,
        endpoint: &str,
        sink: TestSink,
        in_use: TestInUse,
    ) -> Harness {
        let metrics = Metrics::new().unwrap();
        let (audit, rx) = Audit::channel(1024, DroppedCounter::new());
        let proxy = Proxy::new(
            config,
            model(upstream.port()),
            Scope::Endpoint(endpoint.into()),
            Arc::new(sink.clone()),
            Arc::new(in_use.clone()),
            audit,
            metrics,
        );
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().unwrap();
        let p = proxy.clone();
        let t1 = tokio::spawn(async move {
            let _ = serve_udp(
                p,
                Arc::new(ForwarderUdp {
                    socket: udp,
                    upstream,
                }),
            )
            .await;
        });
        let p = proxy.clone();
        let t2 = tokio::spawn(async move {
            let _ = serve_tcp(p, tcp, Arc::new(FixedUpstream(upstream))).await;
        });
        Harness {
            proxy,
            addr,
            sink,
            in_use,
            audit: tokio::sync::Mutex::new(rx),
            tasks: vec![t1, t2],
        }
    }

    /// The next audit record (within 5 s).
    pub async fn audit(&self) -> AuditRecord {
        let mut rx = self.audit.lock().await;
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("audit record in time")
            .expect("audit channel open");
        match e {
            AuditEvent::Dns(r) => r,
            other => panic!("the DNS proxy queued a {} event", other.kind()),
        }
    }

    /// Audit records until one for `qname` (normalised) arrives.
    pub async fn audit_for(&self, qname: &str) -> AuditRecord {
        let want = policy_model::fqdn::normalize(qname);
        loop {
            let r = self.audit().await;
            if r.qname == want {
                return r;
            }
        }
    }
}

// ---------------------------------------------------------------- dnsmasq and dig

/// dnsmasq on an ephemeral loopback port, killed (by its PID) on drop.
pub struct Dnsmasq {
    pub addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// None when dnsmasq is not installed.
    pub async fn start(args: &[&str]) -> Option<Dnsmasq> {
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            let port = {
                let (udp, tcp) = bind_pair().await;
                let p = udp.local_addr().unwrap().port();
                drop((udp, tcp));
                p
            };
            let mut child = std::process::Command::new(bin)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--except-interface=none",
                    &format!("--port={port}"),
                    &format!("--pid-file={}/pid", dir.path().display()),
                    "--user=root",
                    "--log-facility=-",
                ])
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            // Ready when it answers; gone when the port was taken after all.
            let ready = wait_until_async(Duration::from_secs(5), || async {
                try_query(
                    addr,
                    "ready.invalid",
                    RecordType::A,
                    false,
                    Duration::from_millis(200),
                )
                .await
                .is_some()
            })
            .await;
            if ready {
                return Some(Dnsmasq {
                    addr,
                    child,
                    _dir: dir,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_until_async<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs dig against `server`; None when dig is not installed.
pub async fn dig(server: SocketAddr, args: &[&str]) -> Option<String> {
    let mut cmd = tokio::process::Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+tries=1", "+time=3"])
        .args(args);
    let out = cmd.output().await.ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn dig_status(out: &str) -> String {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("<no reply>")
        .to_string()
}
