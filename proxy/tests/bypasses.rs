//! Regressions for the bypasses of issue 18: what the policy checks is exactly what the
//! upstream receives (Host vs absolute-form, HTTP/2 `host` vs `:authority`, upgrades,
//! hop-by-hop stripping, backslashes and `;` dot segments, underscores, Content-Length),
//! and the smaller findings (bad chunked bodies, denied HEAD over h2, authority syntax).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Sends `raw_request` on a new connection; returns the response head (the upstream
/// has recorded a forwarded request by then: it answers after recording).
async fn send(p: &Running, raw_request: &[u8]) -> String {
    raw_until(p.addr, raw_request, "\r\n\r\n").await
}

fn status_of(resp: &str) -> &str {
    resp.get(9..12).unwrap_or("")
}

// ---- finding 1: absolute-form target vs Host ----

#[tokio::test]
async fn absolute_form_target_replaces_the_host_header() {
    let up = upstream().await;
    let mut p = start_proxy(up.addr, POLICY).await;
    // allowed by `host: web\.example`; the Host header names another service
    let resp = send(
        &p,
        b"POST http://web.example/submit HTTP/1.1\r\nHost: admin.example\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndata",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let hosts: Vec<_> = seen[0].headers.get_all("host").iter().collect();
    assert_eq!(
        hosts,
        ["web.example"],
        "Host must be the target's authority"
    );
    assert_eq!(seen[0].uri, "/submit", "origin-form upstream");
    let rec = next_record(&mut p.audit).await;
    assert_eq!(
        rec.http.as_ref().unwrap().host,
        "web.example",
        "the audit shows what was forwarded"
    );
}

#[tokio::test]
async fn absolute_form_cannot_borrow_an_allowed_host() {
    // the reverse: the target names a host the rule refuses, the Host header one it allows
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = send(
        &p,
        b"POST http://admin.example/submit HTTP/1.1\r\nHost: web.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "403", "{resp}");
    assert!(up.seen().is_empty());
}

// ---- finding 2: upgrades ----

#[tokio::test]
async fn h2c_upgrade_is_stripped_and_the_request_served_as_http1() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = send(
        &p,
        b"GET /public/x HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "no 101 may be relayed: {resp}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    for h in ["upgrade", "connection", "http2-settings"] {
        assert!(seen[0].headers.get(h).is_none(), "{h} reached the upstream");
    }
}

#[tokio::test]
async fn unknown_upgrade_tokens_never_reach_the_upstream() {
    for upgrade in ["foo/1", "h2c, foo", "TLS/1.2"] {
        let up = upstream().await;
        let p = start_proxy(up.addr, POLICY).await;
        let req = format!(
            "GET /public/x HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
        );
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "200", "{upgrade}: {resp}");
        let seen = up.seen();
        assert!(seen[0].headers.get("upgrade").is_none(), "{upgrade}");
    }
}

#[tokio::test]
async fn websocket_offered_with_other_protocols_goes_up_as_websocket_only() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = raw_until(
        p.addr,
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
        "\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "101", "{resp}");
    let seen = up.seen();
    let upgrades: Vec<_> = seen[0].headers.get_all("upgrade").iter().collect();
    assert_eq!(upgrades, ["websocket"]);
}

/// An upstream that answers every request with `101 Switching Protocols` to h2c.
async fn always_101_upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    .await;
                // then speak "HTTP/2" to whoever listens
                let _ = s.write_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_switching_protocols_unasked_is_a_bad_gateway() {
    let addr = always_101_upstream().await;
    let p = start_proxy(addr, POLICY).await;
    for req in [
        &b"GET /public/x HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"[..],
        b"GET /public/x HTTP/1.1\r\nHost: web\r\n\r\n",
        // a WebSocket request answered with a switch to another protocol
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let resp = raw_until(p.addr, req, "\r\n\r\n").await;
        assert_eq!(
            status_of(&resp),
            "502",
            "{:?}: {resp}",
            String::from_utf8_lossy(req)
        );
    }
}

// ---- finding 3: HTTP/2 host vs :authority ----

fn h2_req(uri: &str, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut r = Request::post(uri);
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn h2_host_header_that_differs_from_authority_is_malformed() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let r = c
        .send_request(h2_req(
            "http://web.example/submit",
            &[("host", "admin.example")],
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(up.seen().is_empty(), "forwarded with a second authority");
}

#[tokio::test]
async fn h2_two_host_headers_are_malformed_and_one_equal_host_is_folded_into_authority() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut s = h2raw::connect(p.addr).await;
    let pseudo: [(&[u8], &[u8]); 4] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"web.example"),
        (b":path", b"/submit"),
    ];
    let mut two = pseudo.to_vec();
    two.push((b"host", b"web.example"));
    two.push((b"host", b"admin.example"));
    s.write_all(&h2raw::headers(1, &two, true)).await.unwrap();
    let f = h2raw::read_until(&mut s, Duration::from_secs(5), |f| {
        f.stream == 1 && (f.kind == h2raw::HEADERS || f.kind == h2raw::RST_STREAM)
    })
    .await
    .expect("no answer on stream 1");
    assert!(
        f.kind == h2raw::RST_STREAM || f.status() == Some(400),
        "two host headers: {f:?}"
    );
    assert!(up.seen().is_empty(), "forwarded with two host headers");

    // a host equal to :authority (case aside) is the same authority: forwarded once
    let mut same = pseudo.to_vec();
    same.push((b"host", b"WEB.example"));
    s.write_all(&h2raw::headers(3, &same, true)).await.unwrap();
    let f = h2raw::read_until(&mut s, Duration::from_secs(5), |f| {
        f.stream == 3 && (f.kind == h2raw::HEADERS || f.kind == h2raw::RST_STREAM)
    })
    .await
    .expect("no answer on stream 3");
    assert_eq!(f.status(), Some(200), "{f:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].headers.get("host").is_none(),
        "host went up beside :authority"
    );
    assert_eq!(seen[0].uri, "http://web.example/submit");
}

// ---- finding 4: hop-by-hop stripping before the decision ----

#[tokio::test]
async fn connection_cannot_remove_a_header_a_rule_requires() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    // `/hdr` needs `X-My-Header: true`: the rule would see it, the upstream would not
    let resp = send(
        &p,
        b"GET /hdr HTTP/1.1\r\nHost: web\r\nX-My-Header: true\r\nConnection: X-My-Header\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "400", "{resp}");
    // end-to-end headers with a fixed meaning, whatever the rules
    let resp = send(
        &p,
        b"POST /submit HTTP/1.1\r\nHost: web.example\r\nContent-Type: application/json\r\nConnection: keep-alive, Content-Type\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(status_of(&resp), "400", "{resp}");
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

#[tokio::test]
async fn headers_named_by_connection_are_removed_before_forwarding() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = send(
        &p,
        b"GET /public/x HTTP/1.1\r\nHost: web\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive, X-Hop\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let seen = up.seen();
    for h in ["x-hop", "keep-alive", "connection"] {
        assert!(seen[0].headers.get(h).is_none(), "{h} reached the upstream");
    }
}

// ---- finding 6: backslashes and `;` dot segments ----

#[tokio::test]
async fn raw_backslash_in_the_path_is_refused() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    for path in ["/public/..\\admin", "/public\\x", "\\public/x"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "{path}: {resp}");
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

#[tokio::test]
async fn dot_segments_behind_path_parameters_are_refused() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let paths = [
        "/public/..;/admin",
        "/public/..;jsessionid=1/admin",
        "/public/.;/x",
        "/public/%2e%2e;/admin",
        "/public/..%3b/admin",
    ];
    for path in paths {
        let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "{path}: {resp}");
    }
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    for path in paths {
        let r = c
            .send_request(
                Request::get(format!("http://web{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "h2 {path}");
    }
    // a path parameter on an ordinary segment is fine
    let resp = send(
        &p,
        b"GET /public/a;v=1/b HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    assert_eq!(up.seen().len(), 1);
}

// ---- finding 7: underscores, Content-Length ----

#[tokio::test]
async fn header_names_with_underscores_are_refused() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let resp = send(
        &p,
        b"POST /submit HTTP/1.1\r\nHost: web.example\r\nContent-Length: 35\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: web\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "400", "{resp}");
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let r = c
        .send_request(h2_req(
            "http://web.example/submit",
            &[("x_forwarded_for", "1")],
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

#[tokio::test]
async fn content_length_goes_up_canonical() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let body = "x".repeat(45);
    let req = format!(
        "POST /submit HTTP/1.1\r\nHost: web.example\r\nContent-Length: 045\r\nConnection: close\r\n\r\n{body}"
    );
    let resp = send(&p, req.as_bytes()).await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let seen = up.seen();
    assert_eq!(seen[0].headers["content-length"], "45");
    assert_eq!(seen[0].body.len(), 45);
}

#[tokio::test]
async fn repeated_content_length_is_refused() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    for cl in [
        "Content-Length: 4\r\nContent-Length: 4",
        "Content-Length: 4, 4",
    ] {
        let req = format!("POST /submit HTTP/1.1\r\nHost: web.example\r\n{cl}\r\n\r\ndata");
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "{cl}: {resp}");
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

// ---- smaller findings ----

#[tokio::test]
async fn a_malformed_chunked_body_is_400_and_never_forwarded() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    for body in ["zz\r\nabc\r\n0\r\n\r\n", "3\r\nabcXX0\r\n\r\n"] {
        let req = format!(
            "POST /submit HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "{body:?}: {resp}");
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

#[tokio::test]
async fn a_denied_head_request_over_h2_has_no_body() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let r = c
        .send_request(
            Request::head("http://web/private")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "HEAD answered with a body: {body:?}");
}

#[tokio::test]
async fn authority_syntax_is_validated() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    for host in [
        "127.0.0.1/admin",
        "a@web",
        "",
        "web example",
        "web:80:80",
        "web:http",
        "[::1",
        "web?x",
        "web#x",
    ] {
        let req = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "Host {host:?}: {resp}");
    }
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let r = c
        .send_request(
            Request::get("http://a@web/public/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 400, ":authority with userinfo");
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // what is valid passes
    for host in ["web", "web:8080", "10.0.0.2", "[::1]:80", "web.example."] {
        let req = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let resp = send(&p, req.as_bytes()).await;
        assert_eq!(status_of(&resp), "200", "Host {host:?}: {resp}");
    }
}

#[tokio::test]
async fn listeners_use_the_system_backlog() {
    let want: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let fixed = proxy::FixedListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        backlog(proxy::Listener::local_addr(&fixed).unwrap().port()),
        want
    );
    // the node's listener needs CAP_NET_ADMIN (IP_TRANSPARENT)
    match proxy::TransparentListener::bind("127.0.0.1:0".parse().unwrap(), false) {
        Ok(l) => assert_eq!(
            backlog(proxy::Listener::local_addr(&l).unwrap().port()),
            want
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}"),
    }
}

/// A listener's backlog as `ss` shows it (its Send-Q).
fn backlog(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no listener in {text:?}"))
}

// ---- the suite-wide check itself ----

#[tokio::test]
async fn the_upstream_check_catches_what_the_decision_did_not_see() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let r = send(
        &p,
        b"GET /hdr HTTP/1.1\r\nHost: web\r\nX-My-Header: true\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&r), "200", "{r}");
    let decided = p.decided.lock().unwrap().clone();
    let seen = up.seen();
    assert_eq!(decided.len(), 1);
    check_upstream_saw_decisions(&decided, &seen).unwrap();
    // the same request received with another Host, without the header the rule
    // needed, or with a header added: each is caught
    let mut other_host = seen[0].clone();
    other_host
        .headers
        .insert("host", "admin.example".parse().unwrap());
    let mut stripped = seen[0].clone();
    stripped.headers.remove("x-my-header");
    let mut added = seen[0].clone();
    added
        .headers
        .insert("transfer_encoding", "chunked".parse().unwrap());
    let mut other_path = seen[0].clone();
    other_path.uri = "/admin".into();
    for bad in [other_host, stripped, added, other_path] {
        assert!(
            check_upstream_saw_decisions(&decided, std::slice::from_ref(&bad)).is_err(),
            "{bad:?}"
        );
    }
    // and one decision accounts for one request only
    assert!(check_upstream_saw_decisions(&decided, &[seen[0].clone(), seen[0].clone()]).is_err());
}

// ---- the knobs, and the HTTP/2 side of findings 6 and 7 ----

#[tokio::test]
async fn backslash_reads_as_slash_when_configured() {
    let up = upstream().await;
    let cfg = proxy::Config {
        path_backslash: proxy::normalize::Backslash::Slash,
        ..proxy::Config::default()
    };
    let p = start_proxy_with(up.addr, POLICY_PUBLIC_ONLY, cfg).await;
    let resp = send(
        &p,
        b"GET /public/..\\admin HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_of(&resp),
        "403",
        "read as /public/../admin = /admin: {resp}"
    );
    let resp = send(
        &p,
        b"GET /public\\a\\b HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/public/a/b", "what goes up has slashes");
}

#[tokio::test]
async fn header_names_with_underscores_are_dropped_when_configured() {
    let up = upstream().await;
    let cfg = proxy::Config {
        headers_with_underscores: proxy::request::Underscores::Drop,
        ..proxy::Config::default()
    };
    let p = start_proxy_with(up.addr, POLICY, cfg).await;
    let resp = send(
        &p,
        b"GET /public/x HTTP/1.1\r\nHost: web\r\nX_User: admin\r\nX-Kept: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let mut c = h2::<Full<Bytes>>(p.addr).await;
    let r = c
        .send_request(
            Request::get("http://web/public/y")
                .header("x_user", "admin")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert!(s.headers.get("x_user").is_none(), "{:?}", s.headers);
    }
    assert_eq!(seen[0].headers["x-kept"], "1");
}

#[tokio::test]
async fn h2_backslash_and_content_length() {
    let up = upstream().await;
    let p = start_proxy(up.addr, POLICY).await;
    let mut s = h2raw::connect(p.addr).await;
    let req = |path: &'static [u8], extra: &[(&'static [u8], &'static [u8])]| {
        let mut h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"web.example"),
            (b":path", path),
        ];
        h.extend_from_slice(extra);
        h
    };
    // a raw backslash: 400
    s.write_all(&h2raw::headers(1, &req(b"/public/..\\admin", &[]), true))
        .await
        .unwrap();
    let f = h2raw::read_until(&mut s, Duration::from_secs(5), |f| {
        f.stream == 1 && (f.kind == h2raw::HEADERS || f.kind == h2raw::RST_STREAM)
    })
    .await
    .expect("no answer on stream 1");
    assert_eq!(f.status(), Some(400), "{f:?}");
    // content-length 045 goes up as 45
    let mut frames = h2raw::headers(3, &req(b"/submit", &[(b"content-length", b"045")]), false);
    frames.extend(h2raw::frame(h2raw::DATA, h2raw::END_STREAM, 3, &[b'x'; 45]));
    s.write_all(&frames).await.unwrap();
    let f = h2raw::read_until(&mut s, Duration::from_secs(5), |f| {
        f.stream == 3 && (f.kind == h2raw::HEADERS || f.kind == h2raw::RST_STREAM)
    })
    .await
    .expect("no answer on stream 3");
    assert_eq!(f.status(), Some(200), "{f:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].headers["content-length"], "45");
    assert_eq!(seen[0].body.len(), 45);
}
