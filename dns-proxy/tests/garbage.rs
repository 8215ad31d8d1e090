//! Arbitrary bytes as queries and as upstream answers never panic the proxy, never get a
//! reply with another id, and an answer is passed on byte for byte or not at all. A
//! deterministic stand-in for the fuzz target (`fuzz/`), run on stable in CI. Also the
//! node scope, whose client addresses (pod IPs) cannot send on loopback: with the same
//! canned upstream, calling `Proxy::handle` directly.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use dns_proxy::audit::Audit;
use dns_proxy::forward::{ForwardError, Upstream};
use dns_proxy::metrics::Metrics;
use dns_proxy::sink::BoxFuture;
use dns_proxy::{Config, NeverInUse, NullSink, Proxy, QueryContext, Scope, Transport};
use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::RecordType;

/// Answers every query with the bytes it holds (with the query's id patched in), after
/// one turn of the runtime: as a real upstream, it is not ready when first polled (the
/// proxy looks for a known answer meanwhile).
#[derive(Default)]
struct Canned(Mutex<Vec<u8>>);

impl Upstream for Canned {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        _server: SocketAddr,
        _transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let mut a = self.0.lock().unwrap().clone();
        if a.len() >= 2 && query.len() >= 2 {
            a[..2].copy_from_slice(&query[..2]);
        }
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(a)
        })
    }
}

/// A proxy for `scope` with `upstream` and `sink` (no audit output), and its metrics.
fn proxy_with(
    scope: Scope,
    upstream: Arc<dyn Upstream>,
    sink: Arc<dyn dns_proxy::DatapathSink>,
) -> (Proxy, Metrics) {
    let metrics = Metrics::new().unwrap();
    let proxy = Proxy::new(
        Config::default(),
        model(53),
        scope,
        sink,
        Arc::new(NeverInUse),
        Audit::disabled(),
        metrics.clone(),
    )
    .with_upstream(upstream);
    (proxy, metrics)
}

/// A query from 127.0.0.1 to the upstream of `model(53)`, over UDP.
fn local_query() -> QueryContext {
    QueryContext {
        client: ([127, 0, 0, 1], 40000).into(),
        server: ([127, 0, 0, 1], 53).into(),
        transport: Transport::Udp,
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn mutate(&mut self, v: &[u8]) -> Vec<u8> {
        let mut v = v.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(3) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = self.next() as u8;
                }
                1 if !v.is_empty() => v.truncate(self.below(v.len())),
                _ => v.push(self.next() as u8),
            }
        }
        v
    }
}

fn valid_answer(id: u16) -> Vec<u8> {
    answer_for("web.app.test", id)
}

/// `name` CNAME edge.cdn.test, which has two A records.
fn answer_for(name: &str, id: u16) -> Vec<u8> {
    let q = Message::from_vec(&query_bytes(name, RecordType::A, id)).unwrap();
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query);
    m.add_query(q.queries()[0].clone());
    let mut z = Zone::default();
    z.cname(name, 60, "edge.cdn.test");
    z.a("edge.cdn.test", 30, &["192.0.2.1", "192.0.2.2"]);
    for recs in z.records.values() {
        m.add_answers(recs.iter().cloned());
    }
    m.to_vec().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_queries_and_answers_are_contained() {
    let canned = Arc::new(Canned::default());
    let (proxy, _) = proxy_with(
        Scope::Endpoint(ENDPOINT.into()),
        canned.clone(),
        Arc::new(NullSink),
    );
    let ctx = local_query();
    let good_query = query_bytes("web.app.test", RecordType::A, 0x4242);
    let good_answer = valid_answer(0x4242);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20_000 {
        let (query, answer) = match round % 4 {
            0 => (rng.bytes(600), good_answer.clone()),
            1 => (rng.mutate(&good_query), good_answer.clone()),
            2 => (good_query.clone(), rng.bytes(600)),
            _ => (good_query.clone(), rng.mutate(&good_answer)),
        };
        *canned.0.lock().unwrap() = answer.clone();
        if let Some(reply) = proxy.handle(&query, ctx).await {
            assert!(reply.len() >= 12, "round {round}: short reply");
            assert_eq!(
                reply[..2],
                query[..2],
                "round {round}: reply with another id"
            );
            // Whatever was forwarded is exactly what the upstream sent.
            if Message::from_vec(&reply).is_ok_and(|m| m.answer_count() > 0) {
                let mut sent = answer.clone();
                sent[..2].copy_from_slice(&query[..2]);
                assert_eq!(reply, sent, "round {round}");
            }
        }
    }
    // Still learning from a good answer afterwards.
    *canned.0.lock().unwrap() = good_answer;
    let reply = proxy.handle(&good_query, ctx).await.unwrap();
    assert!(!ips(&Message::from_vec(&reply).unwrap()).is_empty());
    // (mutated answers that still parse are valid DNS and taught IPs too)
    let cached = proxy.cached_ips(ENDPOINT, "web.app.test");
    assert!(
        cached.ends_with(&[ip("192.0.2.1"), ip("192.0.2.2")]),
        "{cached:?}"
    );
}

/// Node scope (transparent mode): the client is the endpoint that owns the source IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scope_finds_the_client_endpoint_by_source_ip() {
    let canned = Arc::new(Canned::default());
    let sink = TestSink::default();
    let (proxy, _) = proxy_with(
        Scope::Node { node: None },
        canned.clone(),
        Arc::new(sink.clone()),
    );
    *canned.0.lock().unwrap() = valid_answer(0x4242);
    let from = |ip: [u8; 4]| QueryContext {
        client: (ip, 40000).into(),
        server: ([127, 0, 0, 1], 53).into(),
        transport: Transport::Udp,
    };
    let denied = query_bytes("www.example.org", RecordType::A, 0x4242);
    let allowed = query_bytes("web.app.test", RecordType::A, 0x4242);
    // app/client (10.0.1.10) has DNS rules towards 127.0.0.1:53
    let r = proxy.handle(&denied, from([10, 0, 1, 10])).await.unwrap();
    assert_eq!(
        Message::from_vec(&r).unwrap().response_code(),
        hickory_proto::op::ResponseCode::Refused
    );
    let r = proxy.handle(&allowed, from([10, 0, 1, 10])).await.unwrap();
    assert_eq!(ips(&Message::from_vec(&r).unwrap()).len(), 2);
    assert_eq!(proxy.cached_ips(ENDPOINT, "web.app.test").len(), 2);
    assert_eq!(sink.applied()[0].update.endpoint, ENDPOINT);
    // app/free (10.0.1.11) has no DNS rules: everything passes
    *canned.0.lock().unwrap() = answer_for("www.example.org", 0x4242);
    let r = proxy.handle(&denied, from([10, 0, 1, 11])).await.unwrap();
    assert_eq!(
        Message::from_vec(&r).unwrap().response_code(),
        hickory_proto::op::ResponseCode::NoError
    );
    // an address of no endpoint: forwarded, nothing learned
    *canned.0.lock().unwrap() = valid_answer(0x4242);
    let before = sink.applied().len();
    proxy.handle(&allowed, from([10, 9, 9, 9])).await.unwrap();
    assert_eq!(sink.applied().len(), before);
}

/// An answer of two A records for `query`'s question, the second owned by a name that
/// points at the first record's TTL, whose first byte is `ttl_byte` (0: the root name).
fn pointer_answer(query: &[u8], ttl_byte: u8) -> Vec<u8> {
    let mut a = query[..2].to_vec();
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0]);
    a.extend_from_slice(&query[12..]);
    let ttl_at = u8::try_from(a.len() + 6).unwrap();
    a.extend_from_slice(&[
        0xc0, 12, 0, 1, 0, 1, ttl_byte, 0, 0, 60, 0, 4, 192, 0, 2, 97,
    ]);
    a.extend_from_slice(&[0xc0, ttl_at, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 98]);
    a
}

/// An answer that repeats a known one but for its id and TTLs leaves before it is read,
/// and is read after the reply. One that then does not read as the known one did (a name
/// in it points into a TTL, which the comparison skips) is counted as malformed and its
/// question is known no more: the next such answer is read first, and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_answers_repeat_that_does_not_read_is_caught_after_the_reply() {
    let canned = Arc::new(Canned::default());
    let (proxy, metrics) = proxy_with(
        Scope::Endpoint(ENDPOINT.into()),
        canned.clone(),
        Arc::new(NullSink),
    );
    let ctx = local_query();
    let query = query_bytes("ptr.app.test", RecordType::A, 0x4242);
    let malformed = || metrics.series.malformed_answer.get();
    // Read, learned and confirmed: known from now on.
    *canned.0.lock().unwrap() = pointer_answer(&query, 0);
    let r = proxy.handle(&query, ctx).await.unwrap();
    assert_eq!(ips(&Message::from_vec(&r).unwrap()).len(), 2);
    assert_eq!(proxy.cached_ips(ENDPOINT, "ptr.app.test").len(), 2);
    // The same known answer again: released unread, and reads as before.
    let r = proxy.handle(&query, ctx).await.unwrap();
    assert_eq!(r, pointer_answer(&query, 0));
    assert_eq!((metrics.known_answers.get(), malformed()), (1, 0));
    // Another first byte of that TTL: still a repeat by its bytes, so it leaves unread;
    // read after the reply, the name at 0x40 is no label.
    let bad = pointer_answer(&query, 0x40);
    *canned.0.lock().unwrap() = bad.clone();
    let r = proxy.handle(&query, ctx).await.unwrap();
    assert_eq!(r, bad);
    assert_eq!((metrics.known_answers.get(), malformed()), (2, 1));
    // Known no more: read first, and SERVFAIL.
    let r = proxy.handle(&query, ctx).await.unwrap();
    assert_eq!(
        Message::from_vec(&r).unwrap().response_code(),
        hickory_proto::op::ResponseCode::ServFail
    );
    assert_eq!((metrics.known_answers.get(), malformed()), (2, 2));
}

/// Answers as [`Canned`] does, running `meanwhile` (once) while the query is upstream.
#[derive(Default)]
struct Meanwhile {
    canned: Canned,
    meanwhile: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Upstream for Meanwhile {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let answer = self.canned.forward(query, server, transport);
        Box::pin(async move {
            tokio::task::yield_now().await;
            let meanwhile = self.meanwhile.lock().unwrap().take();
            if let Some(f) = meanwhile {
                f();
            }
            answer.await
        })
    }
}

/// A policy change while a query is upstream: its answer, a known one's repeat, is read
/// and handed over under the new policy before it leaves, not released as known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_while_upstream_stops_a_known_answers_early_release() {
    let upstream = Arc::new(Meanwhile::default());
    let (proxy, metrics) = proxy_with(
        Scope::Endpoint(ENDPOINT.into()),
        upstream.clone(),
        Arc::new(TestSink::default()),
    );
    let ctx = local_query();
    let query = query_bytes("web.app.test", RecordType::A, 0x4242);
    *upstream.canned.0.lock().unwrap() = valid_answer(0x4242);
    proxy.handle(&query, ctx).await.unwrap();
    proxy.handle(&query, ctx).await.unwrap();
    assert_eq!(metrics.known_answers.get(), 1, "a repeat leaves as known");
    // The toFQDNs selector of the name leaves the policy while the next query is out.
    let without = POLICY.replace(
        "    - matchPattern: \"**.deep.test\"\n    - matchPattern: \"*.app.test\"\n",
        "    - matchPattern: \"**.deep.test\"\n",
    );
    assert_ne!(without, POLICY);
    let p = proxy.clone();
    *upstream.meanwhile.lock().unwrap() =
        Some(Box::new(move || p.set_model(model_with(&without, 53))));
    let r = proxy.handle(&query, ctx).await.unwrap();
    assert_eq!(ips(&Message::from_vec(&r).unwrap()).len(), 2);
    assert!(
        upstream.meanwhile.lock().unwrap().is_none(),
        "the change ran"
    );
    assert_eq!(metrics.known_answers.get(), 1, "read before it left");
    assert!(proxy.cached_ips(ENDPOINT, "web.app.test").is_empty());
}
