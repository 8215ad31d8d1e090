//! HTTP/2 control-frame floods (issue 18, finding 9): a connection that sends PRIORITY,
//! WINDOW_UPDATE, PING or SETTINGS frames beyond its budget gets GOAWAY
//! `ENHANCE_YOUR_CALM` and is closed; a normal client on another connection, and a
//! normal client's own busy connection, are unaffected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::h2raw::{self, ENHANCE_YOUR_CALM};
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;

/// Sends `frames` (after the preface) in one go, then reads until GOAWAY; returns its
/// error code, or None when none came within the deadline.
async fn flood(addr: std::net::SocketAddr, frames: Vec<u8>) -> Option<u32> {
    let s = h2raw::connect(addr).await;
    let (mut rd, mut wr) = s.into_split();
    // write in the background while reading: the server answers PINGs and SETTINGS,
    // and it may close before it read everything
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&frames).await;
        wr
    });
    let f = h2raw::read_until(&mut rd, Duration::from_secs(10), |f| {
        f.kind == h2raw::GOAWAY
    })
    .await;
    writer.abort();
    f?.goaway_code()
}

fn repeat(n: usize, f: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    (0..n).flat_map(f).collect()
}

async fn a_normal_request_succeeds(addr: std::net::SocketAddr) {
    let mut c = h2::<Full<Bytes>>(addr).await;
    let r = c
        .send_request(
            Request::get("http://web/public/ok")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn priority_flood_gets_enhance_your_calm() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let frames = repeat(20_000, |i| h2raw::priority(1 + 2 * (i as u32 % 50), 0));
    assert_eq!(flood(p.addr, frames).await, Some(ENHANCE_YOUR_CALM));
    a_normal_request_succeeds(p.addr).await;
}

#[tokio::test]
async fn window_update_flood_gets_enhance_your_calm() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let frames = repeat(20_000, |_| h2raw::window_update(0, 1));
    assert_eq!(flood(p.addr, frames).await, Some(ENHANCE_YOUR_CALM));
    a_normal_request_succeeds(p.addr).await;
}

#[tokio::test]
async fn ping_flood_gets_enhance_your_calm() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let frames = repeat(20_000, |i| h2raw::ping(i as u64));
    assert_eq!(flood(p.addr, frames).await, Some(ENHANCE_YOUR_CALM));
    a_normal_request_succeeds(p.addr).await;
}

#[tokio::test]
async fn settings_flood_gets_enhance_your_calm() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let frames = repeat(20_000, |_| h2raw::frame(h2raw::SETTINGS, 0, 0, &[]));
    assert_eq!(flood(p.addr, frames).await, Some(ENHANCE_YOUR_CALM));
    a_normal_request_succeeds(p.addr).await;
}

#[tokio::test]
async fn a_busy_normal_client_is_never_calmed() {
    // many streams with bodies both ways: the client sends WINDOW_UPDATEs as it reads,
    // and PINGs nothing; its connection must stay up throughout
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let body = Bytes::from(vec![b'x'; 200_000]);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let r = c
                .send_request(
                    Request::post("http://web.example/submit")
                        .body(Full::new(body))
                        .unwrap(),
                )
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(r.status(), 200);
            let got = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), 200_000);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = c
        .send_request(
            Request::get("http://web/public/after")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
