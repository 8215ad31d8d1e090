//! Requests that are ambiguous to frame, and path tricks: refused or normalised, and
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! nothing ambiguous reaches the upstream.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn refused(raw_request: &[u8]) {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = raw(p.addr, raw_request).await;
    assert!(
        resp.starts_with("HTTP/1.1 400"),
        "{:?} got {resp:?}",
        String::from_utf8_lossy(raw_request)
    );
    assert!(up.seen().is_empty(), "the upstream received a request");
}

// hyper alone would drop Content-Length, read the body as chunked and close the
// connection after; the proxy's framing tracker makes it a 400 that is never forwarded,
// also when the request follows others (with bodies) on a kept-alive connection.
#[tokio::test]
async fn content_length_and_transfer_encoding() {
    refused(b"POST /public/x HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /public/smuggled HTTP/1.1\r\nHost: web\r\n\r\n").await;
}

#[tokio::test]
async fn transfer_encoding_and_content_length() {
    refused(b"GET /public/x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n0\r\n\r\nGET /public/smuggled HTTP/1.1\r\nHost: web\r\n\r\n").await;
}

#[tokio::test]
async fn content_length_and_transfer_encoding_after_kept_alive_requests() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = raw(
        p.addr,
        b"POST /submit HTTP/1.1\r\nHost: web.example\r\nContent-Length: 4\r\n\r\nbody\
POST /submit HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n\
GET /public/x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    assert!(resp.contains("HTTP/1.1 400"), "{resp}");
    let seen: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        seen,
        ["/submit", "/submit"],
        "the ambiguous request was forwarded"
    );
}

#[tokio::test]
async fn transfer_encoding_not_ending_in_chunked() {
    refused(b"POST /public/x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n").await;
}

#[tokio::test]
async fn two_different_content_lengths() {
    refused(
        b"POST /public/x HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )
    .await;
}

#[tokio::test]
async fn invalid_header_name() {
    refused(b"GET /public/x HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n").await;
}

#[tokio::test]
async fn whitespace_before_colon() {
    refused(b"GET /public/x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\n\r\n").await;
}

#[tokio::test]
async fn invalid_header_value() {
    refused(b"GET /public/x HTTP/1.1\r\nHost: web\r\nX-A: a\x01b\r\n\r\n").await;
}

#[tokio::test]
async fn obs_fold() {
    refused(b"GET /public/x HTTP/1.1\r\nHost: web\r\nX-A: a\r\n b\r\n\r\n").await;
}

#[tokio::test]
async fn two_hosts() {
    refused(b"GET /public/x HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n").await;
}

#[tokio::test]
async fn encoded_slash() {
    refused(b"GET /public/..%2fadmin HTTP/1.1\r\nHost: web\r\n\r\n").await;
}

#[tokio::test]
async fn dot_segments_cannot_escape_an_allowed_prefix() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY_PUBLIC_ONLY).await;
    let mut c = h1(p.addr).await;
    for path in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/./../admin",
    ] {
        let r = c.send_request(get(path)).await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        body_string(r).await;
    }
    // allowed after normalisation, and the upstream sees the normalised path
    let r = c.send_request(get("/public//a/./b/../c")).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/public/a/c");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /public/1 HTTP/1.1\r\nHost: web\r\n\r\nGET /private HTTP/1.1\r\nHost: web\r\n\r\nGET /public/3 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let first = out.find("x-echo-path: /public/1").unwrap();
    let denied = out.find("HTTP/1.1 403").unwrap();
    let third = out.find("x-echo-path: /public/3").unwrap();
    assert!(first < denied && denied < third, "{out}");
    let seen: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(seen, ["/public/1", "/public/3"]);
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn expect_100_continue() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    // allowed: 100 Continue first, then the upstream's answer to the body
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /submit HTTP/1.1\r\nHost: web.example\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    s.write_all(b"body").await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(up.seen()[0].body, "body");

    // denied: 403 without 100 Continue, and the body is never asked for
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /private HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn slow_header_is_cut_off() {
    let up = upstream().await;
    let cfg = proxy::Config {
        header_read_timeout_ms: 300,
        ..proxy::Config::default()
    };
    let p = start_proxy_with(up.addr, POLICY, cfg).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /public/x HTTP/1.1\r\nHost: w")
        .await
        .unwrap();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "connection still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let up = upstream().await;
    let cfg = proxy::Config {
        max_header_size: 8192,
        ..proxy::Config::default()
    };
    let p = start_proxy_with(up.addr, POLICY, cfg).await;
    let big = "a".repeat(10_000);
    let req = format!("GET /public/x HTTP/1.1\r\nHost: web\r\nX-Big: {big}\r\n\r\n");
    let resp = raw(p.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(up.seen().is_empty());
    // within the limit it passes
    let req = format!(
        "GET /public/x HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        &big[..4000]
    );
    let resp = raw(p.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}
