//! Restarts under load: the client pod queries DNS at about 1,000 a second and keeps 50
//! HTTP/1.1 keep-alive connections and 10 h2c connections busy through the agent's proxy
//! (hyper clients, as a Rust service would use) while the agent is replaced three times
//! by a new process that takes its sockets over (`app::handoff`): no query unanswered, no
//! request failed, no connection reset, and policy enforced after each. Then the agent is
//! killed (SIGKILL) under the same load and started again: what that loses is printed.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::*;

/// The keep-alive upstream in the server pod (HTTP/1.1 and h2c).
const PORT: u16 = 8082;
/// How often each client connection sends a request.
const PACE: Duration = Duration::from_millis(100);

/// The server's ingress on [`PORT`]: `GET /v1/.*` from the client.
const KEEPALIVE_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-keepalive, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8082", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/v1/.*"}]
"#;

/// An HTTP/1.1 and h2c server (hyper) in `ns` on `addr`, answering 200 with a small body,
/// keeping connections open.
fn keepalive_upstream(ns: &str, addr: SocketAddr) {
    let l = in_ns(ns, || TcpListener::bind(addr).expect("bind"));
    l.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"items\n"),
                        )))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
}

/// What the HTTP clients saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    /// A request that got no 200, or an error on a fresh connection.
    failed: u64,
    /// A connection reset by the peer.
    resets: u64,
    /// Connections opened (the first ones and after `Connection: close` or GOAWAY).
    connections: u64,
    /// A reused connection closed before it took a request: sent again on a new one, as
    /// HTTP clients do.
    retried: u64,
    errors: Vec<String>,
}

fn is_reset(e: &hyper::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionReset;
        }
        source = s.source();
    }
    false
}

fn request(path: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(path)
        .header(hyper::header::HOST, "server")
        .body(Empty::new())
        .unwrap()
}

/// A new client connection (TCP, then `handshake`), its driver spawned; a failure is
/// counted and, after [`PACE`], None.
async fn connect<S, C, F>(
    addr: SocketAddr,
    tally: &Mutex<Tally>,
    what: &str,
    handshake: impl FnOnce(tokio::net::TcpStream) -> F,
) -> Option<S>
where
    F: std::future::Future<Output = hyper::Result<(S, C)>>,
    C: std::future::Future + Send + 'static,
    C::Output: Send,
{
    let connected = async {
        let io = tokio::net::TcpStream::connect(addr).await?;
        handshake(io).await.map_err(std::io::Error::other)
    };
    match connected.await {
        Ok((s, conn)) => {
            tokio::spawn(conn);
            tally.lock().unwrap().connections += 1;
            Some(s)
        }
        Err(e) => {
            {
                let mut t = tally.lock().unwrap();
                t.failed += 1;
                t.errors.push(format!("{what} connect: {e}"));
            }
            tokio::time::sleep(PACE).await;
            None
        }
    }
}

/// Reads an answer's body and counts it: ok for a 200 read in full, else failed.
async fn count_answer(
    resp: hyper::Response<hyper::body::Incoming>,
    tally: &Mutex<Tally>,
    what: &str,
) {
    let status = resp.status();
    let body = resp.into_body().collect().await;
    let mut t = tally.lock().unwrap();
    if status == hyper::StatusCode::OK && body.is_ok() {
        t.ok += 1;
    } else {
        t.failed += 1;
        t.errors.push(format!("{what}: {status}"));
    }
}

/// One HTTP/1.1 keep-alive client: a request every [`PACE`] until `stop`.
async fn h1_client(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    let mut fresh = false;
    while !stop.load(Ordering::Relaxed) {
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let handshake = |io| hyper::client::conn::http1::handshake(TokioIo::new(io));
                let Some(s) = connect(addr, &tally, "h1", handshake).await else {
                    continue;
                };
                fresh = true;
                s
            }
        };
        if s.ready().await.is_err() {
            // closed while idle: a new connection, as any client opens
            continue;
        }
        match s.send_request(request("/v1/items")).await {
            Ok(resp) => {
                let close = resp
                    .headers()
                    .get(hyper::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                count_answer(resp, &tally, "h1").await;
                if !close {
                    sender = Some(s);
                }
                fresh = false;
            }
            Err(e) => {
                let mut t = tally.lock().unwrap();
                if is_reset(&e) {
                    t.resets += 1;
                } else if !fresh && (e.is_canceled() || e.is_incomplete_message()) {
                    t.retried += 1;
                } else {
                    t.failed += 1;
                }
                t.errors.push(format!("h1: {e}"));
            }
        }
        tokio::time::sleep(PACE).await;
    }
}

/// One h2c client (prior knowledge): a request every [`PACE`] until `stop`; a new
/// connection once the server said GOAWAY.
async fn h2_client(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut sender: Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let handshake = |io| {
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                };
                let Some(s) = connect(addr, &tally, "h2", handshake).await else {
                    continue;
                };
                s
            }
        };
        if s.ready().await.is_err() {
            // GOAWAY: no new stream on this connection
            continue;
        }
        match s.send_request(request("/v1/h2")).await {
            Ok(resp) => {
                count_answer(resp, &tally, "h2").await;
                sender = Some(s);
            }
            Err(e) => {
                let mut t = tally.lock().unwrap();
                if is_reset(&e) {
                    t.resets += 1;
                } else if e.is_canceled() {
                    // never sent: the connection closed under it (after its GOAWAY)
                    t.retried += 1;
                } else {
                    t.failed += 1;
                }
                t.errors.push(format!("h2: {e}"));
            }
        }
        tokio::time::sleep(PACE).await;
    }
}

/// The HTTP load: 50 HTTP/1.1 and 10 h2c clients on one runtime whose thread is in the
/// client pod's namespace (its sockets are the pod's).
fn http_load(
    ns: &str,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Tally>>, Arc<Mutex<Tally>>, thread::JoinHandle<()>) {
    let (h1, h2) = (Arc::default(), Arc::default());
    let (t1, t2): (Arc<Mutex<Tally>>, Arc<Mutex<Tally>>) = (Arc::clone(&h1), Arc::clone(&h2));
    let ns = ns.to_string();
    let addr = sockaddr(SERVER, PORT);
    let handle = thread::spawn(move || {
        in_ns(&ns, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut clients = Vec::new();
                for _ in 0..50 {
                    clients.push(tokio::spawn(h1_client(addr, stop.clone(), t1.clone())));
                }
                for _ in 0..10 {
                    clients.push(tokio::spawn(h2_client(addr, stop.clone(), t2.clone())));
                }
                for c in clients {
                    let _ = c.await;
                }
            });
        });
    });
    (h1, h2, handle)
}

/// Moves the pacing's start so that the next query is due one interval from now when the
/// sender fell behind.
fn start_if_late(start: &mut Instant, every: Duration, sent: u16) {
    let due = *start + every * u32::from(sent);
    let now = Instant::now();
    if due < now {
        *start += now - due;
    }
}

/// DNS queries for ext.example.com at about `per_second`, each with an id of its own, from
/// the client pod until `stop`; then the answers that come within five seconds. Returns
/// the ids sent and the ids answered (NOERROR with an answer).
fn dns_load(
    ns: &str,
    per_second: u32,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(Vec<u16>, HashSet<u16>)> {
    let ns = ns.to_string();
    thread::spawn(move || {
        let sock = in_ns(&ns, || UdpSocket::bind("0.0.0.0:0").unwrap());
        sock.connect(sockaddr(DNS, 53)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let answered = Arc::new(Mutex::new(HashSet::new()));
        let reading = Arc::new(AtomicBool::new(true));
        let reader = {
            let (sock, answered, reading) =
                (sock.try_clone().unwrap(), answered.clone(), reading.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                while reading.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let r = &buf[..n];
                        if n >= 12 && r[3] & 0x0f == 0 && r[7] > 0 {
                            answered
                                .lock()
                                .unwrap()
                                .insert(u16::from_be_bytes([r[0], r[1]]));
                        }
                    }
                }
            })
        };
        let mut sent = Vec::new();
        let every = Duration::from_secs(1) / per_second;
        let mut start = Instant::now();
        let mut id: u16 = 0;
        while !stop.load(Ordering::Relaxed) && id < u16::MAX {
            let mut q = id.to_be_bytes().to_vec();
            q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
            for label in ["ext", "example", "com"] {
                q.push(label.len() as u8);
                q.extend_from_slice(label.as_bytes());
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            if sock.send(&q).is_ok() {
                sent.push(id);
            }
            id += 1;
            // paced without catching up: a thread the loaded machine woke late sends on,
            // not a burst (as a client's resolver does)
            let next = start + every * u32::from(id);
            thread::sleep(next.checked_duration_since(Instant::now()).unwrap_or(every));
            start_if_late(&mut start, every, id);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && answered.lock().unwrap().len() < sent.len() {
            thread::sleep(Duration::from_millis(20));
        }
        reading.store(false, Ordering::Relaxed);
        reader.join().unwrap();
        let answered = answered.lock().unwrap().clone();
        (sent, answered)
    })
}

impl Lab {
    /// A planned restart: a new agent process takes the running one's sockets, becomes
    /// ready, and the old one gets SIGTERM and must end cleanly on its own drain.
    fn planned_restart(&mut self, n: usize) {
        let old = self.agent.take().expect("a running agent");
        let log = format!("agent-{n}.log");
        let mut new = self.spawn_agent(false, &log);
        let read_log = || fs::read_to_string(self.dir.join(&log)).unwrap_or_default();
        wait_for("the new agent took over", Duration::from_secs(60), || {
            if let Ok(Some(status)) = new.try_wait() {
                panic!("the new agent exited ({status}):\n{}", read_log());
            }
            read_log().contains("took over from the running agent")
        });
        wait_for("the new agent ready", Duration::from_secs(60), || {
            admin_get(&self.node, "/readyz").0 == 200
        });
        self.agent = Some(new);
        let mut old = old;
        sh(&["kill", "-TERM", &old.id().to_string()]);
        let t = Instant::now();
        let status = loop {
            if let Some(status) = old.try_wait().unwrap() {
                break status;
            }
            assert!(
                t.elapsed() < Duration::from_secs(40),
                "the old agent still runs 40 s after SIGTERM"
            );
            thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "the old agent ended with {status}");
        println!(
            "restart {n}: the old agent ended {:.0} ms after SIGTERM",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// The one-shot checks that policy is in force: a denied request, a denied flow.
    fn assert_enforced(&self, when: &str) {
        let curl = |path: &str| {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    self.client(),
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                ])
                .args(["--max-time", "5", "-w", "%{http_code}"])
                .arg(format!("http://{SERVER}:{PORT}{path}"))
                .output()
                .unwrap();
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (code, err) = curl("/admin");
        assert_eq!(code, "403", "{when}: GET /admin is denied ({err})");
        let (code, err) = curl("/v1/once");
        assert_eq!(code, "200", "{when}: GET /v1/once is allowed ({err})");
        assert!(
            !self.connects(SERVER, 8081, DENIED),
            "{when}: the flow to 8081 is denied"
        );
    }
}

#[test]
fn planned_restarts_under_load_lose_nothing() {
    let mut lab = Lab::new("handoff");
    lab.write("keepalive.yaml", KEEPALIVE_POLICY);
    let server_ns = lab.pods[1].clone();
    keepalive_upstream(&server_ns, sockaddr(SERVER, PORT));
    lab.start_agent();
    lab.assert_enforced("at the start");

    let stop = Arc::new(AtomicBool::new(false));
    let dns = dns_load(lab.client(), 1000, stop.clone());
    let (h1, h2, http) = http_load(lab.client(), stop.clone());
    wait_for("the load running", Duration::from_secs(60), || {
        h1.lock().unwrap().ok > 200 && h2.lock().unwrap().ok > 40
    });
    for n in 1..=3 {
        lab.planned_restart(n);
        lab.assert_enforced(&format!("after restart {n}"));
    }
    // Every connection the restarts closed is open again on the last agent (each restart
    // closed every client's connection cleanly: Connection: close, GOAWAY), and it
    // serves them.
    wait_for(
        "the clients on the last agent",
        Duration::from_secs(30),
        || h1.lock().unwrap().connections >= 50 * 4 && h2.lock().unwrap().connections >= 10 * 4,
    );
    let ok = h1.lock().unwrap().ok;
    wait_for(
        "requests after the restarts",
        Duration::from_secs(30),
        || h1.lock().unwrap().ok > ok + 100,
    );
    stop.store(true, Ordering::Relaxed);
    http.join().unwrap();
    let (sent, answered) = dns.join().unwrap();
    let (h1, h2) = (h1.lock().unwrap().clone(), h2.lock().unwrap().clone());
    let unanswered = sent.iter().filter(|id| !answered.contains(id)).count();
    println!(
        "3 planned restarts under load: DNS {} sent, {unanswered} unanswered; HTTP/1.1 {} ok, \
         {} failed, {} reset, {} connections, {} retried; h2c {} ok, {} failed, {} reset, {} \
         connections, {} retried",
        sent.len(),
        h1.ok,
        h1.failed,
        h1.resets,
        h1.connections,
        h1.retried,
        h2.ok,
        h2.failed,
        h2.resets,
        h2.connections,
        h2.retried,
    );
    assert!(
        sent.len() > 3000,
        "the DNS load ran: {} queries",
        sent.len()
    );
    assert_eq!(unanswered, 0, "DNS queries unanswered");
    assert_eq!((h1.failed, h1.resets), (0, 0), "HTTP/1.1: {:?}", h1.errors);
    assert_eq!((h2.failed, h2.resets), (0, 0), "h2c: {:?}", h2.errors);

    // A crash under the same load: what is lost between the kill and the new agent.
    let stop = Arc::new(AtomicBool::new(false));
    let dns = dns_load(lab.client(), 1000, stop.clone());
    let (h1, h2, http) = http_load(lab.client(), stop.clone());
    wait_for("the load running", Duration::from_secs(60), || {
        h1.lock().unwrap().ok > 200
    });
    let t0 = Instant::now();
    lab.kill_agent();
    lab.start_agent();
    let ready = t0.elapsed();
    lab.assert_enforced("after the crash");
    stop.store(true, Ordering::Relaxed);
    http.join().unwrap();
    let (sent, answered) = dns.join().unwrap();
    let (h1, h2) = (h1.lock().unwrap().clone(), h2.lock().unwrap().clone());
    let unanswered = sent.iter().filter(|id| !answered.contains(id)).count();
    println!(
        "SIGKILL under load: ready {:.0} ms after the kill; DNS {} sent, {unanswered} \
         unanswered; HTTP/1.1 {} ok, {} failed, {} reset; h2c {} ok, {} failed, {} reset",
        ready.as_secs_f64() * 1000.0,
        sent.len(),
        h1.ok,
        h1.failed,
        h1.resets,
        h2.ok,
        h2.failed,
        h2.resets,
    );
}
