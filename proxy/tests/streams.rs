//! gRPC-like HTTP/2 calls with trailers, the gRPC denial, WebSocket pass-through, the
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! upstream being down.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn grpc_call(path: &str) -> Request<TestBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-client-trailer", "t1".parse().unwrap());
    Request::post(format!("http://web{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(TestBody::new(
            Bytes::from_static(b"\x00\x00\x00\x00\x02hi"),
            Some(trailers),
        ))
        .unwrap()
}

#[tokio::test]
async fn grpc_over_h2_keeps_trailers_both_ways() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<TestBody>(p.addr).await;
    let r = c.send_request(grpc_call("/echo.Echo/Say")).await.unwrap();
    assert_eq!(r.status(), 200);
    let collected = r.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-echoed-trailer"], "t1",
        "request trailers reached upstream"
    );
    assert_eq!(
        collected.to_bytes(),
        Bytes::from_static(b"\x00\x00\x00\x00\x02hi")
    );
    let seen = up.seen();
    assert_eq!(seen[0].headers["te"], "trailers");
    assert_eq!(seen[0].trailers.as_ref().unwrap()["x-client-trailer"], "t1");
}

#[tokio::test]
async fn denied_grpc_call_gets_permission_denied() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<TestBody>(p.addr).await;
    let r = c
        .send_request(grpc_call("/admin.Admin/Drop"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/grpc");
    assert_eq!(
        r.headers()["grpc-status"],
        "7",
        "trailers-only PERMISSION_DENIED"
    );
    assert!(r.headers().contains_key("grpc-message"));
    let collected = r.into_body().collect().await.unwrap();
    assert!(collected.to_bytes().is_empty());
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn websocket_upgrade_is_passed_through_when_allowed() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // bytes flow both ways through the tunnel
    s.write_all(b"ping through the proxy").await.unwrap();
    let mut buf = [0u8; 22];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through the proxy");
    let seen = up.seen();
    assert_eq!(seen[0].headers["upgrade"], "websocket");
    assert_eq!(
        seen[0].headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
}

#[tokio::test]
async fn an_upgraded_connection_is_closed_when_a_policy_change_denies_it() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // a change that keeps /ws allowed keeps the tunnel
    p.proxy.store().publish(model(POLICY));
    s.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"still");
    // a change that denies it closes the tunnel
    p.proxy.store().publish(model(POLICY_PUBLIC_ONLY));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "tunnel still open after the policy denied it"
    );
    assert!(p
        .proxy
        .metrics()
        .encode()
        .contains("ward_proxy_tunnels_closed_total 1"));
}

#[tokio::test]
async fn websocket_upgrade_is_refused_when_denied() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY_PUBLIC_ONLY).await;
    let resp = raw_until(
        p.addr,
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "Access denied\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.ends_with("Access denied\r\n"), "{resp}");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn upstream_down_is_503_and_logged_as_error() {
    // a port nothing listens on
    let unused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut p = start_proxy(unused, POLICY).await;
    let mut c = h1(p.addr).await;
    let r = c.send_request(get("/public/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    body_string(r).await;
    let rec = next_record(&mut p.audit).await;
    assert_eq!(rec.verdict, proxy::Verdict::Error);
    assert_eq!(rec.http.as_ref().unwrap().code, 503);
    assert!(rec.info.contains("cannot connect"), "{}", rec.info);
    assert!(p
        .proxy
        .metrics()
        .encode()
        .contains("ward_proxy_upstream_errors_total{kind=\"connect\"} 1"));
}

#[tokio::test]
async fn transparent_source_keeps_the_client_address() {
    // IP_TRANSPARENT needs CAP_NET_ADMIN; without it there is nothing to test here.
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if probe.set_ip_transparent_v4(true).is_err() {
        eprintln!("skipped: no CAP_NET_ADMIN");
        return;
    }
    for (transparent, want) in [(false, "127.0.0.1"), (true, "127.0.0.5")] {
        let up = upstream().await;
        let cfg = proxy::Config {
            transparent_source: transparent,
            ..proxy::Config::default()
        };
        let p = start_proxy_with(up.addr, POLICY, cfg).await;
        let mut c = h1_from("127.0.0.5", p.addr).await;
        let r = c.send_request(get("/public/x")).await.unwrap();
        assert_eq!(r.status(), 200);
        body_string(r).await;
        assert_eq!(
            up.seen()[0].peer.ip().to_string(),
            want,
            "transparent={transparent}"
        );
    }
}
