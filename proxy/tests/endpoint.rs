//! The bounded HTTP endpoint server of the metrics and admin endpoints
//! (`proxy::metrics::serve_endpoint`), with real TCP clients on loopback: the connection
//! cap, the header timeout (a slow head, an idle kept-alive connection), and serving on
//! after all of them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proxy::metrics::{metrics_response, serve_endpoint, EndpointLimits, EndpointMetrics};

async fn start(limits: EndpointLimits) -> (SocketAddr, EndpointMetrics) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let registry = prometheus::Registry::new();
    let m = EndpointMetrics::register(&registry, "test").unwrap();
    tokio::spawn(serve_endpoint(l, limits, m.clone(), |req| {
        metrics_response(req.uri().path(), || "up 1\n".to_string())
    }));
    (addr, m)
}

/// One `GET /metrics` on `s` (kept alive); the response's head and body.
fn get(s: &mut TcpStream) -> String {
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.ends_with(b"up 1\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).unwrap()
}

/// Whether the server closed `s` within `within` (reads nothing more).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_)) && {
        // A timeout is an error too: tell them apart.
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        !matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_and_the_cap_holds() {
    let limits = EndpointLimits {
        max_connections: 2,
        header_timeout: Duration::from_millis(500),
    };
    let (addr, m) = start(limits).await;
    tokio::task::spawn_blocking(move || {
        // A kept-alive connection is served, then closed once idle for the timeout.
        let mut a = connect(addr);
        assert!(get(&mut a).starts_with("HTTP/1.1 200"));
        let idle = Instant::now();
        assert!(
            closed_within(&mut a, Duration::from_secs(10)),
            "idle connection kept"
        );
        assert!(
            idle.elapsed() >= Duration::from_millis(400),
            "{:?}",
            idle.elapsed()
        );
        // A head that never ends is cut off too.
        let mut slow = connect(addr);
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        assert!(
            closed_within(&mut slow, Duration::from_secs(10)),
            "slow head kept"
        );

        // Two connections take both places: a third is accepted by the kernel but not
        // served until one of them closes.
        let mut b = connect(addr);
        let mut c = connect(addr);
        assert!(get(&mut b).starts_with("HTTP/1.1 200"));
        assert!(get(&mut c).starts_with("HTTP/1.1 200"));
        let mut d = connect(addr);
        d.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        d.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(d.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "served past the cap"
        );
        drop(b);
        d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = d.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        drop((c, d));
        // Everything closed: nothing is held.
        let end = Instant::now() + Duration::from_secs(10);
        while m.connections() != 0 {
            assert!(Instant::now() < end, "{} connections left", m.connections());
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut e = connect(addr);
        assert!(get(&mut e).starts_with("HTTP/1.1 200"));
        assert_eq!(m.accept_errors(), 0);
    })
    .await
    .unwrap();
}
