//! Policy swaps on kept-alive connections, audit records, metrics exposition.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use proxy::Verdict;

#[tokio::test]
async fn policy_swap_applies_to_the_next_request_on_a_kept_alive_http1_connection() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;
    let r = c.send_request(get("/query?x=1")).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;

    let generation = p.proxy.store().publish(model(POLICY_PUBLIC_ONLY));
    assert_eq!(generation, 2);
    // same connection (one SendRequest on one TCP stream)
    let r = c.send_request(get("/query?x=1")).await.unwrap();
    assert_eq!(r.status(), 403);
    body_string(r).await;
    let r = c.send_request(get("/public/ok")).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;

    p.proxy.store().publish(model(POLICY));
    let r = c.send_request(get("/query?x=1")).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;
    assert!(p
        .proxy
        .metrics()
        .encode()
        .contains("ward_proxy_policy_generation 3"));
}

#[tokio::test]
async fn policy_swap_applies_to_the_next_stream_on_an_h2_connection() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let req = || {
        http::Request::get("http://web/query?x=1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = c.send_request(req()).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;
    p.proxy.store().publish(model(POLICY_PUBLIC_ONLY));
    let r = c.send_request(req()).await.unwrap();
    assert_eq!(r.status(), 403);
    body_string(r).await;
}

#[tokio::test]
async fn audit_records_name_verdict_endpoints_and_rule() {
    let up = upstream().await;
    let mut p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;
    let r = c.send_request(get("/public/a?b=c")).await.unwrap();
    body_string(r).await;
    let r = c.send_request(get("/secret")).await.unwrap();
    body_string(r).await;

    let ok = next_record(&mut p.audit).await;
    assert_eq!(ok.verdict, Verdict::Forwarded);
    assert_eq!(ok.observation_point, "Ingress");
    assert_eq!(ok.http.as_ref().unwrap().code, 200);
    assert_eq!(ok.http.as_ref().unwrap().method, "GET");
    assert_eq!(ok.http.as_ref().unwrap().host, "web");
    assert_eq!(ok.http.as_ref().unwrap().path, "/public/a?b=c");
    assert_eq!(ok.http.as_ref().unwrap().protocol, "HTTP/1.1");
    assert_eq!(ok.source_endpoint.ip, "127.0.0.1");
    assert_eq!(ok.source_endpoint.pod.as_deref(), Some("default/client"));
    assert!(ok.source_endpoint.identity > 0);
    assert_eq!(ok.destination_endpoint.port, up.addr.port());
    assert_eq!(ok.allowed_by.len(), 1);
    assert_eq!(ok.allowed_by[0].direction, "ingress");
    assert!(
        ok.allowed_by[0].policy.contains("default/web-l7"),
        "{:?}",
        ok.allowed_by
    );
    assert!(
        ok.allowed_by[0].rule.ends_with("rules.http[0]"),
        "{:?}",
        ok.allowed_by
    );
    assert_eq!(ok.policy_generation, 1);
    assert!(ok.latency_ns > 0);

    let denied = next_record(&mut p.audit).await;
    assert_eq!(denied.verdict, Verdict::Denied);
    assert_eq!(denied.http.as_ref().unwrap().code, 403);
    assert!(denied.allowed_by.is_empty());
    assert!(denied.info.contains("no HTTP rule"), "{}", denied.info);

    // the JSON line form
    let line = serde_json::to_value(&denied).unwrap();
    assert_eq!(line["Verdict"], "Denied");
    assert_eq!(line["HTTP"]["Path"], "/secret");
}

#[tokio::test]
async fn metrics_are_exposed_over_http() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;
    for path in ["/public/a", "/nope", "/nope"] {
        let r = c.send_request(get(path)).await.unwrap();
        body_string(r).await;
    }
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    tokio::spawn(proxy::metrics::serve(admin, p.proxy.metrics().clone()));
    let mut m = h1(admin_addr).await;
    let r = m.send_request(get("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = body_string(r).await;
    for want in [
        "ward_proxy_requests_total{direction=\"ingress\",protocol=\"HTTP/1.1\",verdict=\"forwarded\"} 1",
        "ward_proxy_requests_total{direction=\"ingress\",protocol=\"HTTP/1.1\",verdict=\"denied\"} 2",
        "ward_proxy_request_duration_seconds_count{direction=\"ingress\",verdict=\"denied\"} 2",
        "ward_proxy_open_connections 1",
        "ward_proxy_policy_generation 1",
        "ward_audit_dropped_total{type=\"http\"} 0",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    assert!(!text.contains("/public"), "no paths in labels");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    use std::time::Duration;
    let up = upstream().await;
    let cfg = proxy::Config {
        max_connections: 1,
        ..proxy::Config::default()
    };
    let p = start_proxy_with(up.addr, POLICY, cfg).await;
    let mut first = h1(p.addr).await;
    let r = first.send_request(get("/public/1")).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;

    let mut second = h1(p.addr).await;
    let pending = tokio::spawn(async move {
        let r = second.send_request(get("/public/2")).await.unwrap();
        r.status()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "a second connection was served beyond the limit"
    );
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    assert_eq!(status, 200);
}

/// Draining (a planned restart): a kept-alive HTTP/1.1 connection gets its next answer
/// with `Connection: close` and then ends; an h2 connection gets GOAWAY, and the open
/// streams are still served, not cut.
#[tokio::test]
async fn a_draining_proxy_closes_connections_after_their_next_answer() {
    use std::time::Duration;

    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c1 = h1(p.addr).await;
    let r = c1.send_request(get("/query?x=1")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("connection").is_none());
    body_string(r).await;
    let mut c2 = h2::<Full<Bytes>>(p.addr).await;
    let req = || {
        http::Request::get("http://web/query?x=1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = c2.send_request(req()).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;

    p.proxy.drain();
    // idle HTTP/1.1 is not closed under the client: its next request is answered
    let r = c1.send_request(get("/query?x=1")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    body_string(r).await;
    // and then the connection is gone
    let wait = tokio::time::Instant::now() + Duration::from_secs(5);
    while !c1.is_closed() {
        assert!(tokio::time::Instant::now() < wait, "HTTP/1.1 still open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // h2: GOAWAY, no new stream
    while !c2.is_closed() && c2.ready().await.is_ok() {
        assert!(tokio::time::Instant::now() < wait, "h2 took new streams");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let open = tokio::time::Instant::now() + Duration::from_secs(5);
    while p.proxy.open_connections() > 0 {
        assert!(tokio::time::Instant::now() < open, "connections left open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
