//! The DNS proxy end to end on loopback: a real upstream (scripted hickory-proto server
//! in process, and dnsmasq), real clients (hickory-proto messages over UDP/TCP, and dig).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use dns_proxy::audit::Verdict;
use dns_proxy::{Config, QueryContext, RefuseCode, Transport};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// Every row of reference 3.1 that the policy covers: (name, allowed).
const TABLE: &[(&str, bool)] = &[
    ("example.com", true),
    ("EXAMPLE.com", true),
    ("a.example.com", false),
    ("a.star.test", true),
    ("star.test", false),
    ("a.b.star.test", false),
    ("example.org", true),
    ("subexample.org", true),
    ("sub-example.org", true),
    ("www.example.org", false),
    ("sub.example.net", true),
    ("subdomain.example.net", true),
    ("www.example.net", false),
    ("partial.com", true),
    ("part-extra-ial.com", true),
    ("a.deep.test", true),
    ("a.b.deep.test", true),
    ("deep.test", false),
];

fn zone_with_table() -> Zone {
    let mut z = Zone::default();
    for (i, (name, _)) in TABLE.iter().enumerate() {
        z.a(name, 300, &[&format!("192.0.2.{}", i + 1)]);
    }
    z
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_table_allowed_and_refused() {
    let up = Upstream::start(zone_with_table()).await;
    let h = Harness::start(Config::default(), up.addr).await;
    for (name, allowed) in TABLE {
        let m = query(h.addr, name, RecordType::A, false).await;
        let rec = h.audit_for(name).await;
        if *allowed {
            assert_eq!(m.response_code(), ResponseCode::NoError, "{name}");
            assert_eq!(ips(&m).len(), 1, "{name}");
            assert_eq!(rec.verdict, Verdict::Forwarded, "{name}");
            assert_eq!(
                rec.policy.as_deref(),
                Some("CiliumNetworkPolicy app/dns-client")
            );
            assert!(
                rec.rule
                    .as_deref()
                    .unwrap()
                    .starts_with("spec.egress[0].toPorts[0].rules.dns["),
                "{rec:?}"
            );
        } else {
            assert_eq!(m.response_code(), ResponseCode::Refused, "{name}");
            assert!(m.answers().is_empty());
            assert_eq!(rec.verdict, Verdict::Denied, "{name}");
            assert!(rec.reason.contains("no DNS rule"), "{}", rec.reason);
        }
    }
    // Denied names never reach the upstream.
    let seen = up.seen();
    for (name, allowed) in TABLE {
        let n = policy_model::fqdn::normalize(name);
        assert_eq!(seen.iter().any(|s| s.name == n), *allowed, "{name}");
    }
    // The name is checked lower-cased: the question keeps the client's case.
    let m = query(h.addr, "ExAmPlE.CoM", RecordType::A, false).await;
    assert_eq!(m.queries()[0].name().to_ascii(), "ExAmPlE.CoM.");
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains(r#"ward_dns_queries_total{rcode="Refused",verdict="denied"} 6"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_without_dns_rules_is_not_filtered() {
    let up = Upstream::start(zone_with_table()).await;
    let h = Harness::start_for(
        Config::default(),
        up.addr,
        "app/free",
        TestSink::default(),
        TestInUse::default(),
    )
    .await;
    let m = query(h.addr, "a.example.com", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    // No toFQDNs selector matches: nothing for the datapath.
    assert!(h.sink.applied().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_instead_of_refused_when_configured() {
    let up = Upstream::start(zone_with_table()).await;
    let config = Config {
        refuse_code: RefuseCode::Nxdomain,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let m = query(h.addr, "www.example.org", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    let m = query(h.addr, "www.example.org", RecordType::A, true).await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_go_upstream_over_tcp_and_learn() {
    let mut z = Zone::default();
    z.a("web.app.test", 300, &["192.0.2.10", "192.0.2.11"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let m = query(h.addr, "web.app.test", RecordType::A, true).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.10"), ip("192.0.2.11")]);
    assert!(up.seen().iter().all(|s| s.tcp));
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "web.app.test"),
        vec![ip("192.0.2.10"), ip("192.0.2.11")]
    );
    let applied = h.sink.applied();
    assert_eq!(applied.len(), 1);
    let add = &applied[0].update.add;
    assert_eq!(add.len(), 1);
    assert_eq!(add[0].selector, "*.app.test.");
    assert_eq!(add[0].label, "fqdn:*.app.test.@app/client");
    // The same IPs again: the datapath has them already, no second update.
    query(h.addr, "web.app.test", RecordType::A, false).await;
    assert_eq!(h.sink.applied().len(), 1);
    h.audit_for("web.app.test").await;
    assert_eq!(
        h.audit_for("web.app.test").await.datapath_confirmed,
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_answers_are_learned() {
    let mut z = Zone::default();
    z.a("v6.app.test", 300, &["2001:db8::1", "2001:db8::2"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let m = query(h.addr, "v6.app.test", RecordType::AAAA, false).await;
    assert_eq!(ips(&m), vec![ip("2001:db8::1"), ip("2001:db8::2")]);
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "v6.app.test"),
        vec![ip("2001:db8::1"), ip("2001:db8::2")]
    );
    let rec = h.audit_for("v6.app.test").await;
    assert_eq!(rec.qtype, "AAAA");
    assert_eq!(rec.ips.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_chain_ips_go_to_the_question_name_only() {
    let mut z = Zone::default();
    z.cname("www.app.test", 300, "edge.cdn.test");
    z.cname("edge.cdn.test", 30, "host.cdn.test");
    z.a("host.cdn.test", 120, &["192.0.2.50"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let m = query(h.addr, "www.app.test", RecordType::A, false).await;
    assert_eq!(m.answers().len(), 3);
    assert_eq!(ips(&m), vec![ip("192.0.2.50")]);
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "www.app.test"),
        vec![ip("192.0.2.50")]
    );
    assert!(h.proxy.cached_ips(ENDPOINT, "host.cdn.test").is_empty());
    assert!(h.proxy.cached_ips(ENDPOINT, "edge.cdn.test").is_empty());
    let rec = h.audit_for("www.app.test").await;
    // the lowest TTL of the chain
    assert_eq!(rec.ttl, Some(30));
    assert_eq!(rec.selectors, vec!["*.app.test.".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_targets_learn_when_enabled() {
    let mut z = Zone::default();
    z.cname("www.app.test", 300, "edge.cdn.test");
    z.a("edge.cdn.test", 120, &["192.0.2.51"]);
    let up = Upstream::start(z).await;
    let config = Config {
        attribute_cname_targets: true,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    query(h.addr, "www.app.test", RecordType::A, false).await;
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "www.app.test"),
        vec![ip("192.0.2.51")]
    );
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "edge.cdn.test"),
        vec![ip("192.0.2.51")]
    );
    let selectors: Vec<String> = h
        .sink
        .applied()
        .iter()
        .flat_map(|a| a.update.add.iter().map(|s| s.selector.clone()))
        .collect();
    assert!(
        selectors.contains(&"*.cdn.test.".to_string()),
        "{selectors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_udp_answer_is_passed_as_is() {
    let mut z = Zone::default();
    z.a("big.app.test", 300, &["192.0.2.60"]);
    z.truncate.insert("big.app.test.".into());
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let m = query(h.addr, "big.app.test", RecordType::A, false).await;
    assert!(m.truncated());
    assert!(m.answers().is_empty());
    // nothing learned from a truncated answer without records
    assert!(h.proxy.cached_ips(ENDPOINT, "big.app.test").is_empty());
    let m = query(h.addr, "big.app.test", RecordType::A, true).await;
    assert!(!m.truncated());
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "big.app.test"),
        vec![ip("192.0.2.60")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_on_dead_or_silent_upstream() {
    // A port nobody listens on (bound, noted, released).
    let dead = {
        let (u, t) = bind_pair().await;
        let a = u.local_addr().unwrap();
        drop((u, t));
        a
    };
    let h = Harness::start(Config::default(), dead).await;
    for tcp in [false, true] {
        let m = query(h.addr, "example.com", RecordType::A, tcp).await;
        assert_eq!(m.response_code(), ResponseCode::ServFail, "tcp={tcp}");
        let rec = h.audit_for("example.com").await;
        assert_eq!(rec.verdict, Verdict::Error);
    }

    let mut z = Zone::default();
    z.silent.insert("example.com.".into());
    let up = Upstream::start(z).await;
    let config = Config {
        upstream_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let start = Instant::now();
    let m = query(h.addr, "example.com", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(start.elapsed() >= Duration::from_millis(300));
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains(r#"ward_dns_upstream_failures_total{reason="timeout"} 1"#),
        "{metrics}"
    );
}

/// Past `concurrency_limit` queries in hand a query gets SERVFAIL at once, without being
/// forwarded (Cilium's `dnsproxy-concurrency-limit`); the place comes back when the held
/// query ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_past_the_concurrency_limit_get_servfail() {
    let mut z = Zone::default();
    z.silent.insert("held.app.test.".into());
    z.a("www.app.test", 60, &["192.0.2.84"]);
    let up = Upstream::start(z).await;
    let timeout = Duration::from_secs(3);
    let config = Config {
        concurrency_limit: 1,
        upstream_timeout: timeout,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let addr = h.addr;
    let held =
        tokio::spawn(async move { query(addr, "held.app.test", RecordType::A, false).await });
    assert!(
        wait_until(Duration::from_secs(10), || up
            .seen()
            .iter()
            .any(|s| s.name == "held.app.test."))
        .await,
        "the held query did not reach the upstream"
    );
    let start = Instant::now();
    let m = query(h.addr, "www.app.test", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(start.elapsed() < timeout, "waited for the held query");
    let rec = h.audit_for("www.app.test").await;
    assert_eq!(rec.verdict, Verdict::Error);
    assert!(rec.reason.contains("concurrency limit"), "{}", rec.reason);
    assert!(
        !up.seen().iter().any(|s| s.name == "www.app.test."),
        "forwarded past the limit"
    );
    // The held query times out; its place is free again.
    let m = held.await.expect("held query task");
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    let m = query(h.addr, "www.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.84")]);
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains(r#"ward_dns_concurrency_limited_total{limit="global"} 1"#),
        "{metrics}"
    );
}

/// One client IP may hold `client_concurrency_limit` queries at once: past it its query
/// gets SERVFAIL at once, while another client's is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_past_the_client_limit_get_servfail_and_others_pass() {
    let mut z = Zone::default();
    z.silent.insert("held.app.test.".into());
    z.a("www.app.test", 60, &["192.0.2.85"]);
    let up = Upstream::start(z).await;
    let timeout = Duration::from_secs(3);
    let config = Config {
        concurrency_limit: 0,
        client_concurrency_limit: 1,
        upstream_timeout: timeout,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let addr = h.addr;
    let held =
        tokio::spawn(async move { query(addr, "held.app.test", RecordType::A, false).await });
    assert!(
        wait_until(Duration::from_secs(10), || up
            .seen()
            .iter()
            .any(|s| s.name == "held.app.test."))
        .await
    );
    // The same client (127.0.0.1): SERVFAIL at once, not forwarded.
    let start = Instant::now();
    let m = query(h.addr, "www.app.test", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(start.elapsed() < timeout);
    let rec = h.audit_for("www.app.test").await;
    assert!(
        rec.reason.contains("client concurrency limit"),
        "{}",
        rec.reason
    );
    assert!(!up.seen().iter().any(|s| s.name == "www.app.test."));
    // Another client (127.0.0.2) is served meanwhile.
    let other = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other
        .send_to(&query_bytes("www.app.test", RecordType::A, 0x77), h.addr)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), other.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(ips(&m), vec![ip("192.0.2.85")]);
    held.await.unwrap();
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains(r#"ward_dns_concurrency_limited_total{limit="client"} 1"#),
        "{metrics}"
    );
}

/// Over TCP every query to a server shares one upstream connection (RFC 7766
/// pipelining), each with an id of its own; a connection the server closed is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_share_one_pipelined_upstream_connection() {
    let mut z = Zone::default();
    for i in 0..20 {
        z.a(
            &format!("p{i}.app.test"),
            60,
            &[&format!("192.0.2.{}", 100 + i)],
        );
    }
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    // Twenty clients at once, each on its own connection to the proxy.
    let queries = (0..20).map(|i| {
        let addr = h.addr;
        tokio::spawn(async move {
            let m = query(addr, &format!("p{i}.app.test"), RecordType::A, true).await;
            assert_eq!(ips(&m), vec![ip(&format!("192.0.2.{}", 100 + i))]);
        })
    });
    for q in queries.collect::<Vec<_>>() {
        q.await.unwrap();
    }
    assert_eq!(up.tcp_connections.load(Ordering::SeqCst), 1);
    let ids: std::collections::HashSet<u16> = up.seen().iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 20, "an id per query in flight");
    // The server closes each connection after one answer: every query still gets its
    // answer, over a new connection.
    up.zone.lock().unwrap().tcp_close_after = Some(1);
    let before = up.tcp_connections.load(Ordering::SeqCst);
    for i in 0..3 {
        let m = query(h.addr, &format!("p{i}.app.test"), RecordType::A, true).await;
        assert_eq!(ips(&m), vec![ip(&format!("192.0.2.{}", 100 + i))]);
    }
    assert!(up.tcp_connections.load(Ordering::SeqCst) > before);
}

/// With `randomize_case` (DNS 0x20) the upstream sees the name in a random case, dnsmasq
/// repeats it, and the client gets its own case back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_case_through_dnsmasq() {
    let Some(dm) = Dnsmasq::start(&["--host-record=www.app.test,192.0.2.23"]).await else {
        eprintln!("dnsmasq not installed: skipped");
        return;
    };
    let config = Config {
        randomize_case: true,
        ..Config::default()
    };
    let h = Harness::start(config, dm.addr).await;
    for (i, tcp) in [(0x11, false), (0x12, true)] {
        let q = query_bytes("www.app.test", RecordType::A, i);
        let r = if tcp {
            tcp_exchange(h.addr, &q).await
        } else {
            udp_exchange(h.addr, &q).await
        }
        .expect("a reply");
        let m = hickory_proto::op::Message::from_vec(&r).unwrap();
        assert_eq!(m.id(), i);
        assert_eq!(ips(&m), vec![ip("192.0.2.23")], "tcp={tcp}");
        // The question in the client's case, byte for byte.
        assert_eq!(r[12..12 + 14], q[12..12 + 14]);
    }
}

/// What the upstream got with case randomisation: the names seen vary in case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_case_is_what_the_upstream_sees() {
    let mut z = Zone::default();
    z.a("www.app.test", 60, &["192.0.2.24"]);
    let up = Upstream::start(z).await;
    let config = Config {
        randomize_case: true,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    for _ in 0..8 {
        let m = query(h.addr, "www.app.test", RecordType::A, false).await;
        assert_eq!(ips(&m), vec![ip("192.0.2.24")]);
    }
    let names: std::collections::HashSet<String> =
        up.seen().iter().map(|s| s.raw_name.clone()).collect();
    assert!(names.len() > 1, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_and_answers_are_contained() {
    let mut z = Zone::default();
    // The answer's header and question, then a record cut short.
    let mut cut = query_bytes("a.app.test", RecordType::A, 0);
    cut[2] = 0x81;
    cut[3] = 0x80;
    cut[7] = 1;
    cut.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    z.raw.insert("a.app.test.".into(), cut);
    // Not even a header: not the answer to anything.
    z.raw
        .insert("short.app.test.".into(), vec![0, 0, 0x81, 0x80, 0xff]);
    z.a("b.app.test", 60, &["192.0.2.70"]);
    let up = Upstream::start(z).await;
    let config = Config {
        upstream_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    // a header and garbage: FORMERR with the query's id
    let r = udp_exchange(h.addr, &[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0])
        .await
        .unwrap();
    let m = hickory_proto::op::Message::from_vec(&r).unwrap();
    assert_eq!(m.id(), 0x1234);
    assert_eq!(m.response_code(), ResponseCode::FormErr);
    // too short for a header: dropped; the proxy keeps serving
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&[1, 2, 3], h.addr).await.unwrap();
    // two questions: FORMERR
    let mut two =
        hickory_proto::op::Message::from_vec(&query_bytes("b.app.test", RecordType::A, 7)).unwrap();
    two.add_query(two.queries()[0].clone());
    let r = udp_exchange(h.addr, &two.to_vec().unwrap()).await.unwrap();
    assert_eq!(
        hickory_proto::op::Message::from_vec(&r)
            .unwrap()
            .response_code(),
        ResponseCode::FormErr
    );
    // garbage from upstream: SERVFAIL, nothing learned
    let m = query(h.addr, "a.app.test", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(h.proxy.held_ips(ENDPOINT, "a.app.test").is_empty());
    // bytes that are no answer are dropped: SERVFAIL once the upstream timed out
    let m = query(h.addr, "short.app.test", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    // still serving
    let m = query(h.addr, "b.app.test", RecordType::A, true).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.70")]);
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains(r#"ward_dns_malformed_total{kind="query"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ward_dns_malformed_total{kind="answer"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("ward_dns_upstream_unexpected_total 1"),
        "{metrics}"
    );
}

/// Bytes after the question (a smuggled second message, say) make the query a FORMERR:
/// it is not forwarded, so the upstream never reads what policy did not check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_bytes_after_the_question_are_a_formerr_and_not_forwarded() {
    let mut z = Zone::default();
    z.a("t.app.test", 60, &["192.0.2.71"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let mut q = query_bytes("t.app.test", RecordType::A, 0x5151);
    q.extend_from_slice(&query_bytes("evil.example.org", RecordType::A, 0x5252)[2..]);
    for tcp in [false, true] {
        let r = if tcp {
            tcp_exchange(h.addr, &q).await
        } else {
            udp_exchange(h.addr, &q).await
        };
        let m = hickory_proto::op::Message::from_vec(&r.expect("a reply")).unwrap();
        assert_eq!(m.id(), 0x5151);
        assert_eq!(m.response_code(), ResponseCode::FormErr, "tcp={tcp}");
    }
    assert!(up.seen().is_empty(), "forwarded: {:?}", up.seen());
    // Without them, the same query is answered.
    let m = query(h.addr, "t.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.71")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_minimum_and_per_name_limit() {
    let mut z = Zone::default();
    z.a("lim.app.test", 5, &["192.0.2.1", "192.0.2.2"]);
    let up = Upstream::start(z).await;
    let config = Config {
        min_ttl: 60,
        max_ips_per_name: 3,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    query(h.addr, "lim.app.test", RecordType::A, false).await;
    let rec = h.audit_for("lim.app.test").await;
    assert_eq!(rec.ttl, Some(60), "raised to the minimum");
    up.zone
        .lock()
        .unwrap()
        .a("lim.app.test", 120, &["192.0.2.3", "192.0.2.4"]);
    query(h.addr, "lim.app.test", RecordType::A, false).await;
    let rec = h.audit_for("lim.app.test").await;
    assert_eq!(rec.ttl, Some(120), "above the minimum: kept");
    // limit 3: the oldest (.1) was evicted
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "lim.app.test"),
        vec![ip("192.0.2.2"), ip("192.0.2.3"), ip("192.0.2.4")]
    );
    // the evicted IP leaves the datapath at the next collection (not in use)
    assert_eq!(h.proxy.collect().await, 1);
    let last = h.sink.applied().last().unwrap().update.clone();
    assert_eq!(last.remove[0].ips, vec![ip("192.0.2.1")]);
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains("ward_dns_cache_evictions_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ward_dns_cache_ips 3"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_is_released_only_after_the_datapath_update() {
    let mut z = Zone::default();
    z.a("slow.app.test", 60, &["192.0.2.80"]);
    let up = Upstream::start(z).await;
    let config = Config {
        datapath_wait: Duration::from_secs(3),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    h.sink.delay_next(Duration::from_millis(300));
    let m = query(h.addr, "slow.app.test", RecordType::A, false).await;
    let received = Instant::now();
    assert_eq!(ips(&m), vec![ip("192.0.2.80")]);
    let applied = h.sink.applied();
    let finished = applied[0]
        .finished
        .expect("update finished before the answer");
    assert!(finished <= received);
    assert!(finished - applied[0].started >= Duration::from_millis(300));
    assert_eq!(
        h.audit_for("slow.app.test").await.datapath_confirmed,
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_is_released_after_the_bound_when_the_datapath_hangs() {
    let mut z = Zone::default();
    z.a("hang.app.test", 60, &["192.0.2.81"]);
    let up = Upstream::start(z).await;
    let config = Config {
        datapath_wait: Duration::from_millis(200),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    h.sink.delay_next(Duration::from_secs(3600));
    let start = Instant::now();
    let m = query(h.addr, "hang.app.test", RecordType::A, false).await;
    let took = start.elapsed();
    assert_eq!(ips(&m), vec![ip("192.0.2.81")]);
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(h.sink.applied()[0].finished.is_none());
    let rec = h.audit_for("hang.app.test").await;
    assert_eq!(rec.datapath_confirmed, Some(false));
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains("ward_dns_datapath_update_timeouts_total 1"),
        "{metrics}"
    );
}

/// Milliseconds since the Unix epoch.
fn epoch_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_ips_leave_before_the_refresh_and_new_ones_after_the_update() {
    let mut z = Zone::default();
    z.a("known.app.test", 60, &["192.0.2.85"]);
    let up = Upstream::start(z).await;
    let config = Config {
        datapath_wait: Duration::from_secs(3),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    query(h.addr, "known.app.test", RecordType::A, false).await;
    assert_eq!(h.sink.applied().len(), 1);
    let first = h.proxy.cached_expiries(ENDPOINT, "known.app.test");
    assert_eq!(first.len(), 1);
    assert!(h.audit_for("known.app.test").await.datapath_confirmed == Some(true));

    // The same IP again: nothing for the datapath, and the cache's refresh (after the
    // reply) still moves the expiry and fills the audit record's selectors.
    let later = epoch_ms() + 5;
    assert!(wait_until(Duration::from_secs(5), || epoch_ms() > later).await);
    let m = query(h.addr, "known.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.85")]);
    let rec = h.audit_for("known.app.test").await;
    assert_eq!(rec.datapath_confirmed, Some(true));
    assert_eq!(rec.selectors, vec!["*.app.test.".to_string()]);
    // The record is completed after the reply, from what the refresh was handed.
    assert_eq!(rec.ips, vec![ip("192.0.2.85")]);
    assert_eq!(rec.source.to_string(), ENDPOINT);
    assert_eq!(
        rec.policy.as_deref(),
        Some("CiliumNetworkPolicy app/dns-client")
    );
    assert_eq!(
        rec.rule.as_deref(),
        Some("spec.egress[0].toPorts[0].rules.dns[6]")
    );
    assert_eq!(
        h.sink.applied().len(),
        1,
        "no update for IPs the datapath holds"
    );
    let refreshed = h.proxy.cached_expiries(ENDPOINT, "known.app.test");
    assert_eq!(refreshed.len(), 1);
    assert!(refreshed[0].1 > first[0].1, "{first:?} -> {refreshed:?}");

    // A new IP for the known name: the answer waits for the update, as for a new name.
    up.zone
        .lock()
        .unwrap()
        .a("known.app.test", 60, &["192.0.2.85", "192.0.2.86"]);
    h.sink.delay_next(Duration::from_millis(300));
    let m = query(h.addr, "known.app.test", RecordType::A, false).await;
    let received = Instant::now();
    assert_eq!(ips(&m), vec![ip("192.0.2.85"), ip("192.0.2.86")]);
    let applied = h.sink.applied();
    assert_eq!(applied.len(), 2);
    let finished = applied[1]
        .finished
        .expect("update finished before the answer");
    assert!(finished <= received);
    assert!(finished - applied[1].started >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_query_dropped_before_its_record_still_refreshes_the_cache() {
    let mut z = Zone::default();
    z.a("drop.app.test", 60, &["192.0.2.87"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    query(h.addr, "drop.app.test", RecordType::A, false).await;
    let first = h.proxy.cached_expiries(ENDPOINT, "drop.app.test");
    assert_eq!(first.len(), 1);
    let later = epoch_ms() + 5;
    assert!(wait_until(Duration::from_secs(5), || epoch_ms() > later).await);
    // Served straight through the proxy (as the listeners do) and dropped unrecorded.
    let ctx = QueryContext {
        client: "10.0.9.10:5353".parse().unwrap(),
        server: up.addr,
        transport: Transport::Udp,
    };
    let handled = h
        .proxy
        .serve(&query_bytes("drop.app.test", RecordType::A, 7), ctx)
        .await;
    assert!(handled.reply.is_some());
    drop(handled);
    let refreshed = h.proxy.cached_expiries(ENDPOINT, "drop.app.test");
    assert!(refreshed[0].1 > first[0].1, "{first:?} -> {refreshed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_for_one_name_release_in_update_order() {
    let mut z = Zone::default();
    z.a("race.app.test", 60, &["192.0.2.90"]);
    let up = Upstream::start(z).await;
    let config = Config {
        datapath_wait: Duration::from_secs(5),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    // The first update is slow, the second instant.
    h.sink.delay_next(Duration::from_millis(400));
    h.sink.delay_next(Duration::ZERO);
    let addr = h.addr;
    let first = tokio::spawn(async move {
        let m = query(addr, "race.app.test", RecordType::A, false).await;
        (m, Instant::now())
    });
    // The second query is answered once the first update is under way.
    assert!(wait_until(Duration::from_secs(5), || !h.sink.applied().is_empty()).await);
    let m2 = query(h.addr, "race.app.test", RecordType::A, false).await;
    let second_at = Instant::now();
    let (m1, _) = first.await.unwrap();
    assert_eq!(ips(&m1), ips(&m2));
    let applied = h.sink.applied();
    assert_eq!(applied.len(), 2);
    let first_done = applied[0].finished.unwrap();
    assert!(
        second_at >= first_done,
        "second answer released before the first update completed"
    );
    assert!(
        applied[1].started >= first_done,
        "updates of one name run in order"
    );
}

/// Past `max_ips_per_node` live IPs over every name, the oldest learned becomes a zombie
/// (it leaves at the next sweep when unused), and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_limit_evicts_the_oldest_and_counts() {
    let mut z = Zone::default();
    z.a("one.app.test", 300, &["192.0.2.31"]);
    z.a("two.app.test", 300, &["192.0.2.32"]);
    z.a("three.app.test", 300, &["192.0.2.33"]);
    let up = Upstream::start(z).await;
    let config = Config {
        max_ips_per_node: 2,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    for name in ["one.app.test", "two.app.test", "three.app.test"] {
        query(h.addr, name, RecordType::A, false).await;
        // learned in order (each its own millisecond at least)
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(h.proxy.cached_ips(ENDPOINT, "one.app.test").is_empty());
    assert_eq!(
        h.proxy.held_ips(ENDPOINT, "one.app.test"),
        vec![ip("192.0.2.31")],
        "a zombie until the sweep"
    );
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "three.app.test"),
        vec![ip("192.0.2.33")]
    );
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains("ward_dns_cache_node_evictions_total 1"),
        "{metrics}"
    );
    assert_eq!(h.proxy.collect().await, 1);
    let last = h.sink.applied().last().unwrap().update.clone();
    assert_eq!(last.remove[0].ips, vec![ip("192.0.2.31")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ips_leave_unless_in_use() {
    let mut z = Zone::default();
    z.a("exp.app.test", 1, &["192.0.2.100", "192.0.2.101"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    query(h.addr, "exp.app.test", RecordType::A, false).await;
    h.in_use.ips.lock().unwrap().insert(ip("192.0.2.100"));
    let mut removed = 0;
    let end = Instant::now() + Duration::from_secs(5);
    while removed == 0 && Instant::now() < end {
        removed = h.proxy.collect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(removed, 1);
    assert!(h.in_use.asked.load(Ordering::Relaxed));
    assert!(h.proxy.cached_ips(ENDPOINT, "exp.app.test").is_empty());
    assert_eq!(
        h.proxy.held_ips(ENDPOINT, "exp.app.test"),
        vec![ip("192.0.2.100")]
    );
    let last = h.sink.applied().last().unwrap().update.clone();
    assert_eq!(last.remove[0].ips, vec![ip("192.0.2.101")]);
    // the connection ends: the IP leaves
    h.in_use.ips.lock().unwrap().clear();
    assert_eq!(h.proxy.collect().await, 1);
    assert!(h.proxy.held_ips(ENDPOINT, "exp.app.test").is_empty());
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains("ward_dns_cache_expirations_total 2"),
        "{metrics}"
    );
    // two sweeps found something to do (the calls before the TTL ran out returned at once)
    assert!(
        metrics.contains("ward_dns_cache_sweep_seconds_count 2"),
        "{metrics}"
    );
}

/// The cache's size gauges are counted when scraped: right after an answer, with no
/// sweep in between, they show what it taught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_gauges_show_an_answer_at_the_next_scrape() {
    let mut z = Zone::default();
    z.a("g.app.test", 300, &["192.0.2.51", "192.0.2.52"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let before = h.proxy.metrics().render();
    assert!(before.contains("ward_dns_cache_ips 0"), "{before}");
    query(h.addr, "g.app.test", RecordType::A, false).await;
    let after = h.proxy.metrics().render();
    assert!(after.contains("ward_dns_cache_names 1"), "{after}");
    assert!(after.contains("ward_dns_cache_ips 2"), "{after}");
    assert!(after.contains("ward_dns_cache_zombies 0"), "{after}");
}

/// A sweep that removes IPs of several names hands the removals to the datapath
/// together: each is queued before the sweep waits for any, so a slow datapath costs a
/// sweep one round, not one round a name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_hands_its_removals_over_together() {
    let mut z = Zone::default();
    z.a("one.app.test", 1, &["192.0.2.41"]);
    z.a("two.app.test", 1, &["192.0.2.42"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    // both in use: they stay as zombies once expired, then leave in the same sweep
    h.in_use
        .ips
        .lock()
        .unwrap()
        .extend([ip("192.0.2.41"), ip("192.0.2.42")]);
    for name in ["one.app.test", "two.app.test"] {
        query(h.addr, name, RecordType::A, false).await;
    }
    let end = Instant::now() + Duration::from_secs(5);
    while !(h.proxy.cached_ips(ENDPOINT, "one.app.test").is_empty()
        && h.proxy.cached_ips(ENDPOINT, "two.app.test").is_empty())
    {
        assert_eq!(h.proxy.collect().await, 0, "in use: nothing leaves");
        assert!(Instant::now() < end, "the IPs never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = h.sink.applied().len();
    h.sink.delay_next(Duration::from_millis(300));
    h.sink.delay_next(Duration::from_millis(300));
    h.in_use.ips.lock().unwrap().clear();
    assert_eq!(h.proxy.collect().await, 2);
    let removals = &h.sink.applied()[before..];
    assert_eq!(removals.len(), 2, "one removal a name");
    let first_done = removals[0].finished.expect("confirmed");
    assert!(
        removals[1].started < first_done,
        "the second removal waited for the first to be confirmed"
    );
}

/// A sweep larger than `sweep_slice` names hands its removals over a slice at a time: a
/// slice's removals go together, the next slice only once they are confirmed, so answers
/// queued meanwhile wait behind one slice, not the whole sweep.
#[tokio::test]
async fn a_large_sweep_hands_its_removals_over_a_slice_at_a_time() {
    let names: Vec<String> = (0..5).map(|k| format!("n{k}.app.test")).collect();
    let mut z = Zone::default();
    for (k, name) in names.iter().enumerate() {
        z.a(name, 1, &[&format!("192.0.2.{}", 50 + k)]);
    }
    let up = Upstream::start(z).await;
    let config = Config {
        sweep_slice: 2,
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    // in use until all five have expired: then they leave in one sweep
    h.in_use
        .ips
        .lock()
        .unwrap()
        .extend((0..5).map(|k| ip(&format!("192.0.2.{}", 50 + k))));
    for name in &names {
        query(h.addr, name, RecordType::A, false).await;
    }
    let end = Instant::now() + Duration::from_secs(5);
    while names
        .iter()
        .any(|n| !h.proxy.cached_ips(ENDPOINT, n).is_empty())
    {
        assert_eq!(h.proxy.collect().await, 0, "in use: nothing leaves");
        assert!(Instant::now() < end, "the IPs never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.in_use.ips.lock().unwrap().clear();
    let before = h.sink.applied().len();
    for _ in &names {
        h.sink.delay_next(Duration::from_millis(100));
    }
    assert_eq!(h.proxy.collect().await, 5);
    let mut removals = h.sink.applied()[before..].to_vec();
    assert_eq!(removals.len(), 5, "one removal a name");
    removals.sort_by_key(|r| r.started);
    let done = |r: &common::Applied| r.finished.expect("confirmed");
    for (slice, next) in [(0..2, 2), (2..4, 4)] {
        let first = &removals[slice.start];
        assert!(
            removals[slice.start + 1].started < done(first),
            "a slice's removals go together"
        );
        let slice_done = removals[slice].iter().map(done).max().expect("two");
        assert!(
            removals[next].started >= slice_done,
            "removal {next} started before its slice's predecessors were confirmed"
        );
    }
}

/// An expiry sweep reads the live connections with no lock held: while that read takes
/// long (a large conntrack map), queries are answered and their IPs learned; the sweep
/// then removes what no connection uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_answered_while_a_sweep_reads_the_connections() {
    let mut z = Zone::default();
    z.a("exp.app.test", 1, &["192.0.2.100"]);
    z.a("other.app.test", 300, &["192.0.2.110"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    query(h.addr, "exp.app.test", RecordType::A, false).await;
    let (release, gate) = std::sync::mpsc::channel();
    *h.in_use.gate.lock().unwrap() = Some(gate);
    // the TTL of 1 s runs out
    let end = Instant::now() + Duration::from_secs(5);
    let (sweep, asked_at) = loop {
        let p = h.proxy.clone();
        let sweep = tokio::spawn(async move { p.collect().await });
        let asked = Instant::now() + Duration::from_millis(300);
        while !h.in_use.asked.load(Ordering::Relaxed) && Instant::now() < asked {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if h.in_use.asked.load(Ordering::Relaxed) {
            break (sweep, Instant::now());
        }
        assert_eq!(sweep.await.unwrap(), 0, "nothing expired, nothing read");
        assert!(Instant::now() < end, "the IP never expired");
    };
    // the sweep waits in its read of the connections: a query goes through meanwhile
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        query(h.addr, "other.app.test", RecordType::A, false),
    )
    .await
    .expect("answered while the sweep reads the connections");
    assert_eq!(answer.answers().len(), 1);
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "other.app.test"),
        vec![ip("192.0.2.110")]
    );
    assert!(!sweep.is_finished());
    let held = asked_at.elapsed();
    release.send(()).unwrap();
    assert_eq!(sweep.await.unwrap(), 1, "the expired IP left");
    // the sweep's time includes its read of the connections
    let metrics = h.proxy.metrics().render();
    let sum: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ward_dns_cache_sweep_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sweep time: {metrics}"));
    assert!(sum >= held.as_secs_f64(), "{sum} < {held:?}");
    assert!(h.proxy.held_ips(ENDPOINT, "exp.app.test").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut z = Zone::default();
    z.a("keep.app.test", 300, &["192.0.2.110"]);
    let up = Upstream::start(z).await;
    let config = Config {
        state_dir: Some(dir.path().to_path_buf()),
        ..Config::default()
    };
    {
        let h = Harness::start(config.clone(), up.addr).await;
        query(h.addr, "keep.app.test", RecordType::A, false).await;
        assert!(h.proxy.persist().unwrap());
        assert!(!h.proxy.persist().unwrap(), "unchanged: not written again");
    }
    let h = Harness::start(config, up.addr).await;
    assert!(h.proxy.cached_ips(ENDPOINT, "keep.app.test").is_empty());
    assert_eq!(h.proxy.restore().await.unwrap(), 1);
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "keep.app.test"),
        vec![ip("192.0.2.110")]
    );
    // the datapath gets the restored IPs again
    let applied = h.sink.applied();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].update.add[0].ips, vec![ip("192.0.2.110")]);
    assert_eq!(
        applied[0].update.add[0].label,
        "fqdn:*.app.test.@app/client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_task_persists_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut z = Zone::default();
    z.a("bg.app.test", 1, &["192.0.2.120"]);
    let up = Upstream::start(z).await;
    let config = Config {
        state_dir: Some(dir.path().to_path_buf()),
        maintenance_interval: Duration::from_millis(50),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let _task = h.proxy.spawn_maintenance();
    query(h.addr, "bg.app.test", RecordType::A, false).await;
    let file = dns_proxy::persist::path(dir.path());
    assert!(wait_until(Duration::from_secs(5), || file.exists()).await);
    assert!(
        wait_until(Duration::from_secs(5), || h
            .proxy
            .held_ips(ENDPOINT, "bg.app.test")
            .is_empty())
        .await
    );
}

/// An answer with the id sent but about another question is not the answer: it is
/// dropped (and counted), and the query waits for its answer (here in vain: SERVFAIL once
/// the upstream timed out), so a forger who guessed the id still teaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_for_another_question_is_not_taken() {
    let mut z = Zone::default();
    // A well-formed answer about another name, with an IP an attacker wants opened.
    let mut other =
        hickory_proto::op::Message::from_vec(&query_bytes("evil.app.test", RecordType::A, 0))
            .unwrap();
    other.set_message_type(hickory_proto::op::MessageType::Response);
    let mut evil = Zone::default();
    evil.a("evil.app.test", 60, &["203.0.113.66"]);
    for r in evil.records.values() {
        other.add_answers(r.iter().cloned());
    }
    z.raw.insert("c.app.test.".into(), other.to_vec().unwrap());
    let up = Upstream::start(z).await;
    let config = Config {
        upstream_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let m = query(h.addr, "c.app.test", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(h.proxy.held_ips(ENDPOINT, "c.app.test").is_empty());
    assert!(h.proxy.held_ips(ENDPOINT, "evil.app.test").is_empty());
    assert!(h.sink.applied().is_empty());
    let metrics = h.proxy.metrics().render();
    assert!(
        metrics.contains("ward_dns_upstream_unexpected_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ward_dns_upstream_failures_total{reason="timeout"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_policy_applies_to_the_next_query_on_a_kept_alive_connection() {
    let mut z = Zone::default();
    z.a("a.example.com", 60, &["192.0.2.130"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    async fn ask(conn: &mut tokio::net::TcpStream, id: u16) -> hickory_proto::op::Message {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let q = query_bytes("a.example.com", RecordType::A, id);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend(q);
        conn.write_all(&out).await.unwrap();
        let n = conn.read_u16().await.unwrap();
        let mut buf = vec![0u8; n as usize];
        conn.read_exact(&mut buf).await.unwrap();
        hickory_proto::op::Message::from_vec(&buf).unwrap()
    }
    assert_eq!(
        ask(&mut conn, 1).await.response_code(),
        ResponseCode::Refused
    );
    let wider = POLICY.replace(
        "        - matchName: example.com\n",
        "        - matchName: example.com\n        - matchPattern: \"*.example.com\"\n",
    );
    assert_ne!(wider, POLICY);
    h.proxy.set_model(model_with(&wider, up.addr.port()));
    let m = ask(&mut conn, 2).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(ips(&m), vec![ip("192.0.2.130")]);
}

/// Transparent sockets need CAP_NET_ADMIN; skipped without it. (A redirected datagram
/// needs the datapath; here the original destination is the listener itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_udp_reports_the_original_destination_and_replies_from_it() {
    transparent_udp_round_trip("127.0.0.1", "192.0.2.53").await;
}

/// The same over IPv6 (`IPV6_RECVORIGDSTADDR`, a reply from a non-local IPv6 address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_udp_over_ipv6_reports_the_original_destination_and_replies_from_it() {
    transparent_udp_round_trip("::1", "2001:db8::53").await;
}

/// An IPv6 transparent socket takes IPv6 only, so that the node can bind one socket per
/// family on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_ipv6_sockets_share_the_port_with_ipv4_ones() {
    use dns_proxy::listener::TransparentUdp;
    let v6 = match TransparentUdp::bind(("::".parse::<std::net::IpAddr>().unwrap(), 0).into()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("no CAP_NET_ADMIN: skipped");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let port = v6.socket.local_addr().unwrap().port();
    // Without IPV6_V6ONLY the IPv6 wildcard owns the IPv4 port too: EADDRINUSE here.
    let v4 = TransparentUdp::bind(([0, 0, 0, 0], port).into()).unwrap();
    assert_eq!(v4.socket.local_addr().unwrap().port(), port);
    let tcp6 =
        dns_proxy::socket::transparent_tcp(("::".parse::<std::net::IpAddr>().unwrap(), 0).into())
            .unwrap();
    let port = tcp6.local_addr().unwrap().port();
    dns_proxy::socket::transparent_tcp(([0, 0, 0, 0], port).into()).unwrap();
}

#[allow(clippy::unwrap_used)]
async fn transparent_udp_round_trip(local: &str, server: &str) {
    use dns_proxy::listener::{is_self, TransparentUdp, UdpTransport};
    let local: std::net::IpAddr = local.parse().unwrap();
    let t = match TransparentUdp::bind((local, 0).into()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("no CAP_NET_ADMIN: skipped");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let listen = t.socket.local_addr().unwrap();
    let client = tokio::net::UdpSocket::bind((local, 0)).await.unwrap();
    let mut buf = [0u8; 64];
    // IP_RECVORIGDSTADDR reports the destination the client used.
    client.send_to(b"query", listen).await.unwrap();
    let (n, from, orig) = tokio::time::timeout(
        Duration::from_secs(5),
        dns_proxy::socket::recv_orig_dst(&t.socket, &mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&buf[..n], b"query");
    assert_eq!(from, client.local_addr().unwrap());
    assert_eq!(orig, Some(listen));
    // Not redirected (sent to the listener itself): the transport drops it, since
    // forwarding it would loop into the proxy.
    assert!(is_self(orig.unwrap(), listen));
    client.send_to(b"query", listen).await.unwrap();
    let got = tokio::time::timeout(Duration::from_millis(300), t.recv(&mut buf)).await;
    assert!(
        got.is_err(),
        "a datagram to the listener itself is not handed over"
    );
    // The same from the busy-polling read, which also drops it and finds nothing else.
    client.send_to(b"query", listen).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || has_datagram(&t.socket)).await);
    let got = t.recv_now(&mut buf);
    assert_eq!(
        got.map(|d| d.len).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "a datagram to the listener itself is not handed over"
    );
    assert!(
        !has_datagram(&t.socket),
        "the datagram was dropped, not left"
    );
    // The reply comes from the server the client asked, an address that is not local to
    // this machine, not from the listener.
    let server = std::net::SocketAddr::new(server.parse().unwrap(), 53);
    t.send(b"answer", from, server).await.unwrap();
    let (n, replied_from) =
        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(replied_from, server);
    // The same without a future (the one-thread listener's way), from another server.
    let other = std::net::SocketAddr::new(server.ip(), 5353);
    t.send_now(b"answer 2", from, other).unwrap();
    let (n, replied_from) =
        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(&buf[..n], b"answer 2");
    assert_eq!(replied_from, other);
}

/// Whether a datagram waits on `sock` (peeked, left in place).
fn has_datagram(sock: &tokio::net::UdpSocket) -> bool {
    socket2::SockRef::from(sock).peek_sender().is_ok()
}

/// The busy-polling reads make the system call whatever the runtime last saw of the
/// socket: they find a datagram that arrived while this task never gave the runtime a
/// turn, so its driver has not polled (tokio's own `try_recv` answers "would block" from
/// its readiness cache until then).
#[tokio::test(flavor = "current_thread")]
#[allow(clippy::unwrap_used)]
async fn busy_polling_reads_see_datagrams_the_runtime_has_not() {
    use dns_proxy::listener::{ForwarderUdp, UdpTransport};
    use dns_proxy::socket::recv_now;
    let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream: std::net::SocketAddr = "127.0.0.1:53".parse().unwrap();
    let listen = listener.local_addr().unwrap();
    let t = ForwarderUdp {
        socket: listener,
        upstream,
    };
    let connected = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    connected.connect(peer.local_addr().unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    // Nothing yet: "would block", and tokio's readiness for both is cleared.
    assert_eq!(
        t.recv_now(&mut buf).map(|d| d.len).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
    assert_eq!(
        t.socket.try_recv_from(&mut buf).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
    assert_eq!(
        connected.try_recv(&mut buf).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
    // Sent by plain blocking sockets, read without an await in between.
    peer.send_to(b"query", listen).unwrap();
    peer.send_to(b"answer", connected.local_addr().unwrap())
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let d = loop {
        match t.recv_now(&mut buf) {
            Ok(d) => break d,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(&buf[..d.len], b"query");
    assert_eq!(d.client, peer.local_addr().unwrap());
    assert_eq!(d.server, upstream);
    let n = loop {
        match recv_now(&connected, &mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(&buf[..n], b"answer");
}

/// With busy polling the one-thread listener reads the listening socket and the upstream
/// sockets itself while the window is open: queries back to back are each read that way,
/// as are the upstream's answers, while the other tasks of the thread (here the client
/// and the upstream) keep running. Once the window has closed it waits on the runtime
/// again: the next query is still answered, and nothing polls in between.
#[tokio::test(flavor = "current_thread")]
async fn busy_polling_listener_reads_its_sockets_while_the_window_is_open() {
    let mut z = Zone::default();
    z.a("busy.app.test", 60, &["192.0.2.86"]);
    let up = Upstream::start(z).await;
    let window = Duration::from_secs(1);
    let config = Config {
        busy_poll_us: u64::try_from(window.as_micros()).unwrap(),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let busy = h.proxy.busy_poll().expect("busy polling is on");
    let check = |m: &hickory_proto::op::Message| assert_eq!(ips(m), vec![ip("192.0.2.86")]);
    // The first query opens the window; it was read through the runtime.
    check(&query(h.addr, "busy.app.test", RecordType::A, false).await);
    let (caught, polls) = (busy.caught(), busy.polls());
    assert!(polls > 0, "the upstream's answer was polled for");
    let n = 20;
    for _ in 0..n {
        check(&query(h.addr, "busy.app.test", RecordType::A, false).await);
    }
    assert!(busy.open(), "the window closed within {n} queries");
    assert_eq!(
        busy.caught() - caught,
        2 * n,
        "each query and its upstream answer read by polling"
    );
    // Closed: the next query is read through the runtime (only its upstream answer is
    // polled for, the window being open again by then).
    assert!(wait_until(window * 10, || !busy.open()).await);
    let idle = busy.polls();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(busy.polls(), idle, "polled with the window closed");
    let caught = busy.caught();
    check(&query(h.addr, "busy.app.test", RecordType::A, false).await);
    assert_eq!(busy.caught() - caught, 1);
}

// ---------------------------------------------------------------- dig and dnsmasq

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_udp_tcp_edns_and_truncation_retry() {
    let mut z = Zone::default();
    z.a("web.app.test", 300, &["192.0.2.10"]);
    z.a("big.app.test", 300, &["192.0.2.60"]);
    z.truncate.insert("big.app.test.".into());
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let Some(out) = dig(h.addr, &["web.app.test", "A", "+bufsize=3000"]).await else {
        eprintln!("dig not installed: skipped");
        return;
    };
    assert_eq!(dig_status(&out), "NOERROR", "{out}");
    assert!(out.contains("192.0.2.10"), "{out}");
    assert!(out.contains("OPT PSEUDOSECTION"), "EDNS passed back: {out}");
    assert!(
        up.seen().iter().any(|s| s.edns_payload == Some(3000)),
        "EDNS passed through: {:?}",
        up.seen()
    );
    let out = dig(h.addr, &["web.app.test", "A", "+tcp"]).await.unwrap();
    assert_eq!(dig_status(&out), "NOERROR", "{out}");
    assert!(up.seen().iter().any(|s| s.tcp));
    let out = dig(h.addr, &["www.example.org", "A"]).await.unwrap();
    assert_eq!(dig_status(&out), "REFUSED", "{out}");
    // dig retries a truncated answer over TCP, through the proxy
    let out = dig(h.addr, &["big.app.test", "A"]).await.unwrap();
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("192.0.2.60"), "{out}");
    let big: Vec<bool> = up
        .seen()
        .iter()
        .filter(|s| s.name == "big.app.test.")
        .map(|s| s.tcp)
        .collect();
    assert_eq!(big, vec![false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_upstream_with_dig_and_hickory_clients() {
    let Some(dm) = Dnsmasq::start(&[
        "--host-record=example.com,192.0.2.20",
        "--host-record=api.deep.test,192.0.2.21,2001:db8::21",
        "--host-record=a.example.com,192.0.2.22",
        "--cname=alias.app.test,api.deep.test",
    ])
    .await
    else {
        eprintln!("dnsmasq not installed: skipped");
        return;
    };
    let h = Harness::start(Config::default(), dm.addr).await;
    let m = query(h.addr, "example.com", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.20")]);
    let m = query(h.addr, "api.deep.test", RecordType::AAAA, true).await;
    assert_eq!(ips(&m), vec![ip("2001:db8::21")]);
    let m = query(h.addr, "a.example.com", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::Refused);
    let m = query(h.addr, "alias.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.21")]);
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "alias.app.test"),
        vec![ip("192.0.2.21")]
    );
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "example.com"),
        vec![ip("192.0.2.20")]
    );
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "api.deep.test"),
        vec![ip("2001:db8::21")]
    );
    if let Some(out) = dig(h.addr, &["example.com", "A"]).await {
        assert_eq!(dig_status(&out), "NOERROR", "{out}");
        assert!(out.contains("192.0.2.20"), "{out}");
        let out = dig(h.addr, &["a.example.com", "A", "+tcp"]).await.unwrap();
        assert_eq!(dig_status(&out), "REFUSED", "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_are_json() {
    let mut z = Zone::default();
    z.a("web.app.test", 300, &["192.0.2.10"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    query(h.addr, "web.app.test", RecordType::A, false).await;
    query(h.addr, "www.example.org", RecordType::A, false).await;
    let a = h.audit().await;
    let b = h.audit().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(a.into()).await.unwrap();
    tx.send(b.into()).await.unwrap();
    drop(tx);
    let file = std::fs::File::create(&path).unwrap();
    tokio::task::spawn_blocking(move || dns_proxy::audit::write_lines(rx, file, |_| {}))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "dns");
    assert_eq!(lines[0]["verdict"], "forwarded");
    assert_eq!(lines[0]["source"], "app/client");
    assert_eq!(lines[0]["qname"], "web.app.test.");
    assert_eq!(lines[0]["qtype"], "A");
    assert_eq!(lines[0]["rcode"], "NoError");
    assert_eq!(lines[0]["ips"][0], "192.0.2.10");
    assert_eq!(lines[0]["ttl"], 300);
    assert_eq!(lines[0]["policy"], "CiliumNetworkPolicy app/dns-client");
    assert_eq!(lines[0]["server"], up.addr.to_string());
    assert!(lines[0]["latency_us"].is_u64());
    assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["verdict"], "denied");
    assert_eq!(lines[1]["rcode"], "Refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_names_follow_the_current_selectors() {
    let mut z = Zone::default();
    z.a("web.app.test", 300, &["192.0.2.140"]);
    z.a("x.deep.test", 300, &["192.0.2.141"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    query(h.addr, "web.app.test", RecordType::A, false).await;
    query(h.addr, "x.deep.test", RecordType::A, false).await;
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "web.app.test"),
        vec![ip("192.0.2.140")]
    );
    // The toFQDNs selector `*.app.test` leaves the policy; its DNS rule stays.
    let without = POLICY.replace(
        "    - matchPattern: \"**.deep.test\"\n    - matchPattern: \"*.app.test\"\n",
        "    - matchPattern: \"**.deep.test\"\n",
    );
    assert_ne!(without, POLICY);
    h.proxy.set_model(model_with(&without, up.addr.port()));
    assert!(h.proxy.held_ips(ENDPOINT, "web.app.test").is_empty());
    // The name another selector still matches stays.
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "x.deep.test"),
        vec![ip("192.0.2.141")]
    );
    // Still answered (the DNS rule allows it), but nothing is learned for it.
    let m = query(h.addr, "web.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.140")]);
    assert!(h.proxy.cached_ips(ENDPOINT, "web.app.test").is_empty());
    // The selector back: the next answer is learned and handed to the datapath again.
    let applied = h.sink.applied().len();
    h.proxy.set_model(model(up.addr.port()));
    query(h.addr, "web.app.test", RecordType::A, false).await;
    assert_eq!(
        h.proxy.cached_ips(ENDPOINT, "web.app.test"),
        vec![ip("192.0.2.140")]
    );
    assert_eq!(h.sink.applied().len(), applied + 1);
}

/// On a current-thread runtime (`ward dns-proxy --threads 1`, the agent's `ward-dns`
/// thread) the UDP listener keeps its queries in flight inside its own task instead of a
/// task each: a query waiting for the datapath must not hold up the next one, and still
/// gets its answer once the update is done.
#[tokio::test(flavor = "current_thread")]
async fn one_thread_answers_queries_while_another_waits() {
    let mut z = Zone::default();
    z.a("slow.app.test", 60, &["192.0.2.82"]);
    z.a("fast.app.test", 60, &["192.0.2.83"]);
    let up = Upstream::start(z).await;
    let config = Config {
        datapath_wait: Duration::from_secs(20),
        ..Config::default()
    };
    let h = Harness::start(config, up.addr).await;
    let hold = Duration::from_secs(3);
    h.sink.delay_next(hold);
    let addr = h.addr;
    let slow =
        tokio::spawn(async move { query(addr, "slow.app.test", RecordType::A, false).await });
    // The slow query is in flight: its update has started and is held.
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            !h.sink.applied().is_empty()
        })
        .await,
        "the slow query's update did not start"
    );
    let held_since = h.sink.applied()[0].started;
    let m = query(h.addr, "fast.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.83")]);
    assert!(
        held_since.elapsed() < hold,
        "the second answer waited for the first query's update"
    );
    assert!(
        !slow.is_finished(),
        "the first answer left before its update"
    );
    let m = slow.await.expect("slow query task");
    assert_eq!(ips(&m), vec![ip("192.0.2.82")]);
    let applied = h.sink.applied();
    let slow_update = applied
        .iter()
        .find(|a| a.update.name == "slow.app.test.")
        .expect("an update for the slow name");
    assert!(slow_update.started.elapsed() >= hold);
    assert!(slow_update.finished.is_some());
}

/// A standalone listener whose second read fails for good (as a closed descriptor would).
struct FailsAfterOneQuery {
    inner: dns_proxy::listener::ForwarderUdp,
    reads: std::sync::atomic::AtomicUsize,
}

impl dns_proxy::listener::UdpTransport for FailsAfterOneQuery {
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> dns_proxy::sink::BoxFuture<'a, std::io::Result<dns_proxy::listener::Datagram>> {
        if self.reads.fetch_add(1, Ordering::SeqCst) > 0 {
            return Box::pin(async { Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)) });
        }
        self.inner.recv(buf)
    }

    fn recv_now(&self, buf: &mut [u8]) -> std::io::Result<dns_proxy::listener::Datagram> {
        // Busy polling is off in the test that uses this transport.
        self.inner.recv_now(buf)
    }

    fn send_now(
        &self,
        data: &[u8],
        client: std::net::SocketAddr,
        server: std::net::SocketAddr,
    ) -> std::io::Result<()> {
        self.inner.send_now(data, client, server)
    }

    fn send<'a>(
        &'a self,
        data: &'a [u8],
        client: std::net::SocketAddr,
        server: std::net::SocketAddr,
    ) -> dns_proxy::sink::BoxFuture<'a, std::io::Result<()>> {
        self.inner.send(data, client, server)
    }
}

/// A proxy for [`ENDPOINT`] with its datapath updates going to `sink`, and its audit
/// records.
fn endpoint_proxy(
    upstream: std::net::SocketAddr,
    sink: &TestSink,
) -> (
    dns_proxy::Proxy,
    tokio::sync::mpsc::Receiver<dns_proxy::audit::AuditEvent>,
) {
    let metrics = dns_proxy::metrics::Metrics::new().unwrap_or_else(|e| panic!("metrics: {e}"));
    let (audit, rx) = dns_proxy::audit::Audit::channel(16, dns_proxy::audit::DroppedCounter::new());
    let proxy = dns_proxy::Proxy::new(
        Config::default(),
        model(upstream.port()),
        dns_proxy::Scope::Endpoint(ENDPOINT.into()),
        std::sync::Arc::new(sink.clone()),
        std::sync::Arc::new(TestInUse::default()),
        audit,
        metrics,
    );
    (proxy, rx)
}

/// When the listening socket fails, the one-thread listener still answers and records the
/// queries it has in flight before it returns the error (as tasks of their own would).
#[tokio::test(flavor = "current_thread")]
async fn one_thread_listener_finishes_its_queries_when_the_socket_fails() {
    let mut z = Zone::default();
    z.a("last.app.test", 60, &["192.0.2.85"]);
    let up = Upstream::start(z).await;
    let sink = TestSink::default();
    // The query is still in flight (its update held) when the socket's next read fails.
    sink.delay_next(Duration::from_millis(300));
    let (proxy, mut rx) = endpoint_proxy(up.addr, &sink);
    let (udp, _tcp) = bind_pair().await;
    let addr = udp.local_addr().unwrap();
    let io = std::sync::Arc::new(FailsAfterOneQuery {
        inner: dns_proxy::listener::ForwarderUdp {
            socket: udp,
            upstream: up.addr,
        },
        reads: Default::default(),
    });
    let listener = tokio::spawn(dns_proxy::listener::serve_udp(proxy, io));
    let m = query(addr, "last.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.85")]);
    let ended = tokio::time::timeout(Duration::from_secs(10), listener)
        .await
        .expect("the listener ends")
        .expect("listener task");
    assert_eq!(
        ended.expect_err("the socket's error").kind(),
        std::io::ErrorKind::BrokenPipe
    );
    let dns_proxy::audit::AuditEvent::Dns(rec) = rx.try_recv().expect("the query's audit record")
    else {
        panic!("not a DNS record")
    };
    assert_eq!(rec.qname, "last.app.test.");
    assert_eq!(rec.verdict, Verdict::Forwarded);
}

/// An answer that repeats a known one (the same bytes but for the id and the TTLs) leaves
/// before it is read while the datapath holds its IPs, and is read after the reply: the
/// cache's refresh and the audit record take its own TTL, as for any answer. One with
/// other records, or after the policy changed, is read first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_answers_leave_as_known_ones_and_are_read_after_the_reply() {
    let mut z = Zone::default();
    z.a("rep.app.test", 60, &["192.0.2.95"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let known = || h.proxy.metrics().known_answers.get();
    query(h.addr, "rep.app.test", RecordType::A, false).await;
    assert_eq!(h.audit_for("rep.app.test").await.ttl, Some(60));
    assert_eq!((known(), h.sink.applied().len()), (0, 1));

    // Again, with a lower TTL (a cache counting down): a repeat.
    up.zone
        .lock()
        .unwrap()
        .a("rep.app.test", 30, &["192.0.2.95"]);
    let before = h.proxy.cached_expiries(ENDPOINT, "rep.app.test");
    let m = query(h.addr, "rep.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.95")]);
    assert_eq!(m.answers()[0].ttl(), 30);
    // Counted after the reply left, before the audit record is sent: read after it.
    let rec = h.audit_for("rep.app.test").await;
    assert_eq!(known(), 1);
    assert_eq!(rec.ttl, Some(30));
    assert_eq!(rec.ips, vec![ip("192.0.2.95")]);
    assert_eq!(rec.datapath_confirmed, Some(true));
    assert_eq!(rec.selectors, vec!["*.app.test.".to_string()]);
    assert_eq!(
        rec.rule.as_deref(),
        Some("spec.egress[0].toPorts[0].rules.dns[6]")
    );
    let after = h.proxy.cached_expiries(ENDPOINT, "rep.app.test");
    assert!(
        after[0].1 < before[0].1,
        "refreshed with the answer's own TTL: {before:?} -> {after:?}"
    );
    assert_eq!(h.sink.applied().len(), 1, "nothing new for the datapath");
    query(h.addr, "rep.app.test", RecordType::A, false).await;
    h.audit_for("rep.app.test").await;
    assert_eq!(known(), 2);

    // Another IP: read first, and released after the datapath took it.
    up.zone
        .lock()
        .unwrap()
        .a("rep.app.test", 30, &["192.0.2.95", "192.0.2.96"]);
    let m = query(h.addr, "rep.app.test", RecordType::A, false).await;
    assert_eq!(ips(&m).len(), 2);
    assert_eq!((known(), h.sink.applied().len()), (2, 2));
    h.audit_for("rep.app.test").await;
    // ... and that answer is the known one from now on.
    query(h.addr, "rep.app.test", RecordType::A, false).await;
    h.audit_for("rep.app.test").await;
    assert_eq!(known(), 3);

    // The toFQDNs selector leaves the policy: the datapath holds nothing for the name any
    // more, so the same answer is read first and hands nothing over.
    let without = POLICY.replace(
        "    - matchPattern: \"**.deep.test\"\n    - matchPattern: \"*.app.test\"\n",
        "    - matchPattern: \"**.deep.test\"\n",
    );
    assert_ne!(without, POLICY);
    h.proxy.set_model(model_with(&without, up.addr.port()));
    query(h.addr, "rep.app.test", RecordType::A, false).await;
    let rec = h.audit_for("rep.app.test").await;
    assert_eq!(known(), 3);
    assert_eq!(rec.datapath_confirmed, None);
    assert!(rec.selectors.is_empty());
}

/// Records what it is given to send, or takes nothing (`WouldBlock`).
struct Replies {
    take: bool,
    sent: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl dns_proxy::proxy::ReplyNow for Replies {
    fn reply_now(&self, reply: &[u8]) -> std::io::Result<()> {
        if !self.take {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reply.to_vec());
        Ok(())
    }
}

/// Given a way to reply at once, a known answer's repeat leaves from the upstream
/// exchange, the moment it is read; the caller does not send it again. A first answer
/// does not (it is read and handed over first), nor does a repeat the socket does not
/// take at once (the caller sends it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_answers_repeat_leaves_from_the_exchange_itself() {
    let mut z = Zone::default();
    z.a("early.app.test", 60, &["192.0.2.97"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let ctx = QueryContext {
        client: "10.0.9.10:5353".parse().unwrap(),
        server: up.addr,
        transport: Transport::Udp,
    };
    let replies = Replies {
        take: true,
        sent: std::sync::Mutex::new(Vec::new()),
    };
    let q = query_bytes("early.app.test", RecordType::A, 41);
    let first = h.proxy.serve_with(&q, ctx, Some(&replies)).await;
    assert!(!first.replied);
    assert!(replies.sent.lock().unwrap().is_empty());
    h.proxy.record(first, &q, None);

    // A repeat whose answer is there at once, before the exchange was first left, is
    // released by `serve` instead (the caller sends it): asked until one comes later.
    let mut id = 42u16;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (reply, id) = loop {
        let q = query_bytes("early.app.test", RecordType::A, id);
        let repeat = h.proxy.serve_with(&q, ctx, Some(&replies)).await;
        let (replied, reply) = (repeat.replied, repeat.reply.clone());
        h.proxy.record(repeat, &q, None);
        if replied {
            break (reply, id);
        }
        assert!(
            Instant::now() < deadline,
            "no repeat left from the exchange"
        );
        replies.sent.lock().unwrap().clear();
        id += 1;
    };
    let sent = replies.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "sent once");
    assert_eq!(Some(&sent[0]), reply.as_ref());
    assert_eq!(sent[0][..2], id.to_be_bytes());
    assert_eq!(
        h.proxy.metrics().known_answers.get(),
        u64::from(id - 41),
        "every repeat left as a known answer"
    );

    let busy = Replies {
        take: false,
        sent: std::sync::Mutex::new(Vec::new()),
    };
    let q = query_bytes("early.app.test", RecordType::A, 43);
    let repeat = h.proxy.serve_with(&q, ctx, Some(&busy)).await;
    assert!(!repeat.replied, "not taken at once: the caller sends it");
    assert_eq!(
        ips(&hickory_proto::op::Message::from_vec(repeat.reply.as_ref().unwrap()).unwrap()).len(),
        1
    );
    h.proxy.record(repeat, &q, None);
    assert_eq!(h.proxy.metrics().known_answers.get(), u64::from(id - 40));
}

/// Through the listener, a repeat released from the exchange reaches the client once:
/// the next datagram the client gets is the answer to its next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_released_early_is_sent_once() {
    let mut z = Zone::default();
    z.a("once.app.test", 60, &["192.0.2.98"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    for id in 1..=5u16 {
        client
            .send_to(&query_bytes("once.app.test", RecordType::A, id), h.addr)
            .await
            .unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(buf[..2], id.to_be_bytes(), "the answer to query {id}, once");
        assert!(n > 12);
    }
    assert!(h.proxy.metrics().known_answers.get() >= 3);
}

/// Answers whose IPs live no longer than a repeat's margin (TTL 0: each IP expires as it
/// is learned) never leave as known ones: each is handed over (the cache refreshed)
/// before it leaves, and still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_ttl_0_are_handed_over_before_they_leave() {
    let mut z = Zone::default();
    z.a("zero.app.test", 0, &["192.0.2.99"]);
    let up = Upstream::start(z).await;
    let h = Harness::start(Config::default(), up.addr).await;
    for _ in 0..3 {
        let m = query(h.addr, "zero.app.test", RecordType::A, false).await;
        assert_eq!(ips(&m), vec![ip("192.0.2.99")]);
        let rec = h.audit_for("zero.app.test").await;
        assert_eq!(rec.datapath_confirmed, Some(true));
        assert_eq!(rec.ttl, Some(0));
    }
    assert_eq!(h.proxy.metrics().known_answers.get(), 0);
}

/// Handing the sockets to another process: once the proxy stops serving, the listeners
/// read nothing more and return, and a query they had read is still answered first (its
/// datapath update held here), so none is lost between two processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_listeners_answer_what_they_hold_and_read_no_more() {
    let mut z = Zone::default();
    z.a("held.app.test", 60, &["192.0.2.86"]);
    let up = Upstream::start(z).await;
    let sink = TestSink::default();
    sink.delay_next(Duration::from_millis(300));
    let (proxy, _rx) = endpoint_proxy(up.addr, &sink);
    let (udp, tcp) = bind_pair().await;
    let addr = udp.local_addr().unwrap();
    let io = std::sync::Arc::new(dns_proxy::listener::ForwarderUdp {
        socket: udp,
        upstream: up.addr,
    });
    let udp_listener = tokio::spawn(dns_proxy::listener::serve_udp(proxy.clone(), io));
    let tcp_listener = tokio::spawn(dns_proxy::listener::serve_tcp(
        proxy.clone(),
        tcp,
        std::sync::Arc::new(dns_proxy::listener::FixedUpstream(up.addr)),
    ));
    let held = tokio::spawn(query(addr, "held.app.test", RecordType::A, false));
    let wait = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.queries_in_flight() == 0 {
        assert!(
            tokio::time::Instant::now() < wait,
            "the query never arrived"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.stop_serving();
    for l in [udp_listener, tcp_listener] {
        tokio::time::timeout(Duration::from_secs(5), l)
            .await
            .expect("the listener returns")
            .expect("listener task")
            .expect("no error");
    }
    let m = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held query is answered")
        .unwrap();
    assert_eq!(ips(&m), vec![ip("192.0.2.86")]);
    assert_eq!(proxy.queries_in_flight(), 0);
    // nothing reads the socket any more: a new query goes unanswered
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[0u8; 12], addr).await.unwrap();
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf))
            .await
            .is_err(),
        "a stopped listener answered"
    );
}
