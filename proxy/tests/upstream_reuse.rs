//! HTTP/1.1 upstream connections: bound to their downstream connection while it lasts,
//! replaced when the upstream closes them, pooled for the next downstream connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The upstream address (the proxy's side) of the n-th request the upstream saw.
fn upstream_peer(up: &Upstream, n: usize) -> SocketAddr {
    up.seen()[n].peer
}

#[tokio::test]
async fn each_downstream_connection_keeps_its_own_upstream_connection() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut clients = [h1(p.addr).await, h1(p.addr).await];
    // interleaved: a, b, a, b, each answered before the next is sent
    for (i, path) in [
        (0, "/public/a1"),
        (1, "/public/b1"),
        (0, "/public/a2"),
        (1, "/public/b2"),
    ] {
        let r = clients[i].send_request(get(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        body_string(r).await;
    }
    let seen: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        seen,
        ["/public/a1", "/public/b1", "/public/a2", "/public/b2"]
    );
    assert_eq!(upstream_peer(&up, 0), upstream_peer(&up, 2), "a moved");
    assert_eq!(upstream_peer(&up, 1), upstream_peer(&up, 3), "b moved");
    assert_ne!(
        upstream_peer(&up, 0),
        upstream_peer(&up, 1),
        "a and b shared"
    );
}

#[tokio::test]
async fn a_closed_downstream_connection_leaves_its_upstream_connection_to_the_next() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    {
        let mut a = h1(p.addr).await;
        let r = a.send_request(get("/public/1")).await.unwrap();
        body_string(r).await;
    }
    // the proxy notices a close in its own time: open new connections, one at a time,
    // until one's request goes over an upstream connection used before, within a deadline
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut b = h1(p.addr).await;
        let r = b.send_request(get("/public/2")).await.unwrap();
        assert_eq!(r.status(), 200);
        body_string(r).await;
        let seen = up.seen();
        let (last, earlier) = seen.split_last().unwrap();
        if earlier.iter().any(|s| s.peer == last.peer) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream connection of a closed downstream one was never reused"
        );
        tokio::task::yield_now().await;
    }
}

/// An upstream that answers every request with `Connection: close` and closes.
async fn closing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_upstream_closing_its_connection_gets_a_new_one_for_the_next_request() {
    let (addr, accepted) = closing_upstream().await;
    let p = start_proxy(addr, POLICY).await;
    let mut c = h1(p.addr).await;
    for path in ["/public/1", "/public/2", "/public/3"] {
        let r = c.send_request(get(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(body_string(r).await, "ok\n");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}
