//! Every rule kind through the proxy over HTTP/1.1 and h2c, with a real upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test]
async fn method_and_path_rules_over_http1() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;

    let r = c.send_request(get("/public/a")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-echo-path"], "/public/a");
    body_string(r).await;

    // wrong method
    let req = Request::delete("/public/a")
        .header("host", "web")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.send_request(req).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(body_string(r).await, "Access denied\r\n");

    // the path regex sees the query: `/query\?x=1` only
    let r = c.send_request(get("/query?x=1")).await.unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;
    let r = c.send_request(get("/query?x=2")).await.unwrap();
    assert_eq!(r.status(), 403);
    body_string(r).await;
    let r = c.send_request(get("/query")).await.unwrap();
    assert_eq!(r.status(), 403);
    body_string(r).await;

    let seen: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        seen,
        ["/public/a", "/query?x=1"],
        "denied requests never reach the upstream"
    );
}

#[tokio::test]
async fn host_rule_matches_authority() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;
    for (host, status) in [
        ("web.example", 200),
        ("web.example:8080", 200),
        ("webXexample", 403),
        ("other", 403),
    ] {
        let req = Request::post("/submit")
            .header("host", host)
            .body(Full::new(Bytes::from_static(b"data")))
            .unwrap();
        let r = c.send_request(req).await.unwrap();
        assert_eq!(r.status(), status, "host {host}");
        body_string(r).await;
    }
    assert_eq!(up.seen().len(), 2);
    assert_eq!(up.seen()[0].body, "data");
}

#[tokio::test]
async fn header_presence_and_value_rules() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16);
    let cases: [Case; 6] = [
        ("/hdr", &[("x-my-header", "true")], 200),
        ("/hdr", &[("x-my-header", "false")], 403),
        ("/hdr", &[], 403),
        ("/presence", &[("x-presence", "")], 200),
        ("/presence", &[("x-presence", "anything")], 200),
        ("/presence", &[], 403),
    ];
    for (path, headers, status) in cases {
        let mut req = Request::get(path).header("host", "web");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = c
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{path} {headers:?}");
        body_string(r).await;
    }
}

#[tokio::test]
async fn header_match_actions_change_what_goes_upstream() {
    let up = upstream().await;
    let mut p = start_proxy(up.addr, POLICY).await;
    let mut c = h1(p.addr).await;
    let send = |path: &str, headers: &[(&str, &str)]| {
        let mut req = Request::get(path).header("host", "web");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(Full::new(Bytes::new())).unwrap()
    };
    for req in [
        send("/replace", &[("x-token", "wrong")]),
        send("/add", &[]),
        send("/delete", &[("x-gone", "secret")]),
        send("/log", &[]),
    ] {
        let r = c.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        body_string(r).await;
    }
    let seen = up.seen();
    assert_eq!(
        seen[0].headers["x-token"], "s3cret",
        "REPLACE sets the value"
    );
    assert_eq!(seen[0].headers.get_all("x-token").iter().count(), 1);
    assert_eq!(seen[1].headers["x-added"], "yes", "ADD appends");
    assert!(seen[2].headers.get("x-gone").is_none(), "DELETE removes");

    // and the audit log says what was missing or rejected
    let r = next_record(&mut p.audit).await;
    assert_eq!(r.http.as_ref().unwrap().rejected_headers, ["X-Token"]);
    assert_eq!(r.http.as_ref().unwrap().missing_headers, ["X-Token"]);
    let r = next_record(&mut p.audit).await;
    assert_eq!(r.http.as_ref().unwrap().missing_headers, ["X-Added"]);
    let r = next_record(&mut p.audit).await;
    assert_eq!(r.http.as_ref().unwrap().rejected_headers, ["X-Gone"]);
    let r = next_record(&mut p.audit).await;
    assert_eq!(r.http.as_ref().unwrap().missing_headers, ["X-Logged"]);
}

#[tokio::test]
async fn rules_over_h2c() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let req = |method: &str, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = c
        .send_request(req("GET", "http://web/public/x"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    body_string(r).await;
    let r = c
        .send_request(req("GET", "http://web/private"))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(body_string(r).await, "Access denied\r\n");
    // host rule against :authority
    let r = c
        .send_request(req("POST", "http://web.example/submit"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    body_string(r).await;
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].version, http::Version::HTTP_2, "h2 in, h2 out");
    assert_eq!(seen[1].uri, "http://web.example/submit", ":authority kept");
}

#[tokio::test]
async fn a_peer_without_an_allow_is_denied() {
    // 127.0.0.3 is default/stranger: no rule names it, so the port is default-deny.
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let stream = sock.connect(p.addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = c.send_request(get("/public/a")).await.unwrap();
    assert_eq!(r.status(), 403);
    body_string(r).await;
    assert!(up.seen().is_empty());
}
