//! Arbitrary bytes as the upstream's answers to one allowed query, through the code that
//! takes an answer: the forwarder's checks (`forward::Sent`: the id sent, the question
//! repeated, the case with DNS 0x20, the client's id and case given back), then the
//! proxy's reading, learning, datapath hand-off and known answers (a repeat released from
//! within the exchange, `Proxy::serve_with`, and read after the reply). Run: `cargo xtask
//! fuzz answer SECONDS`, or `cargo +nightly fuzz run answer` in `dns-proxy/`.
//!
//! Input: byte 0 is a set of flags (bit 0: case randomisation; bit 1: the query carries
//! EDNS; bit 2: the answers get the id sent; bit 3: they get the question as sent; bit 4:
//! over TCP), byte 1 seeds the ids and cases; the rest is up to four answers, each after
//! its big-endian u16 length. Each answer is offered to the same question in turn, so a
//! later one may be a known answer's repeat.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use dns_proxy::audit::Audit;
use dns_proxy::forward::{ForwardError, Sent, Upstream, WatchAnswer};
use dns_proxy::metrics::Metrics;
use dns_proxy::proxy::ReplyNow;
use dns_proxy::sink::BoxFuture;
use dns_proxy::{Config, NeverInUse, NullSink, Proxy, QueryContext, Scope, Transport};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use libfuzzer_sys::fuzz_target;
use policy_model::{CompileOptions, Model};

const CLUSTER: &str = "
namespaces: [{name: app}]
pods: [{namespace: app, name: client, labels: {app: client}, ip: 10.0.1.10}]
";

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.1/32]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.app.test"}]
  - toFQDNs: [{matchPattern: "**.test"}]
"#;

/// The answer the forwarder took (or nothing: the query then times out), shown to the
/// watcher first as the forwarder does.
#[derive(Default)]
struct Taken(Mutex<Option<Vec<u8>>>);

impl Upstream for Taken {
    fn forward<'a>(
        &'a self,
        _query: &'a [u8],
        server: SocketAddr,
        _transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let a = self.0.lock().unwrap().clone();
        Box::pin(async move { a.ok_or(ForwardError::Timeout(server)) })
    }

    fn forward_watching<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
        watch: &'a dyn WatchAnswer,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let fut = self.forward(query, server, transport);
        Box::pin(async move {
            // Not ready on the first poll, as a real upstream: the proxy looks for a
            // known answer meanwhile.
            tokio::task::yield_now().await;
            let a = fut.await?;
            watch.answer(&a);
            Ok(a)
        })
    }
}

/// Replies sent from within the exchange.
#[derive(Default)]
struct Replies(Mutex<Vec<Vec<u8>>>);

impl ReplyNow for Replies {
    fn reply_now(&self, reply: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push(reply.to_vec());
        Ok(())
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    proxy: Proxy,
    taken: Arc<Taken>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, errors, _) = policy_model::api::load(POLICY, None);
        assert!(errors.is_empty(), "{errors:?}");
        let model = Model::compile(&cluster, policies, CompileOptions::default());
        let metrics = Metrics::new().unwrap();
        let taken = Arc::new(Taken::default());
        let proxy = Proxy::new(
            Config::default(),
            Arc::new(model),
            Scope::Endpoint("app/client".into()),
            Arc::new(NullSink),
            Arc::new(NeverInUse),
            Audit::disabled(),
            metrics,
        )
        .with_upstream(taken.clone());
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            proxy,
            taken,
        }
    })
}

/// A deterministic stand-in for the CSPRNG, seeded by the input.
struct Seeded(u64);

impl rand::RngCore for Seeded {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for b in dst {
            *b = self.next_u32() as u8;
        }
    }
}

fn query(edns: bool) -> Vec<u8> {
    let mut q = Message::new();
    q.set_id(0x4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("Web.App.test.").unwrap(),
        RecordType::A,
    ));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        q.set_edns(e);
    }
    q.to_vec().unwrap()
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let (Some(&flags), Some(&seed)) = (data.first(), data.get(1)) else {
        return;
    };
    let query = query(flags & 2 != 0);
    let mut rng = Seeded(u64::from(seed) + 1);
    let mut rest = &data[2..];
    for _ in 0..4 {
        let Some(len) = rest.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            break;
        };
        let len = len.min(rest.len() - 2);
        let mut answer = rest[2..2 + len].to_vec();
        rest = &rest[2 + len..];

        let sent = Sent::new(&query, &mut rng, flags & 1 != 0).unwrap();
        if flags & 4 != 0 && answer.len() >= 2 {
            answer[..2].copy_from_slice(&sent.wire()[..2]);
        }
        if flags & 8 != 0 {
            let q = &sent.wire()[12..query.len().min(sent.wire().len())];
            if answer.len() >= 12 + q.len() {
                answer[12..12 + q.len()].copy_from_slice(q);
            }
        }
        let taken = sent.accept(&answer);
        if let Some(t) = &taken {
            assert!(sent.answers(&answer));
            assert_eq!(t.len(), answer.len());
            assert_eq!(t[..2], query[..2], "the client's id comes back");
            assert_eq!(answer[..2], sent.wire()[..2], "only with the id sent");
        }
        *w.taken.0.lock().unwrap() = taken.clone();
        let ctx = QueryContext {
            client: ([127, 0, 0, 1], 40000).into(),
            server: ([127, 0, 0, 1], 53).into(),
            transport: if flags & 16 != 0 {
                Transport::Tcp
            } else {
                Transport::Udp
            },
        };
        let replies = Replies::default();
        let handled = w.rt.block_on(w.proxy.serve_with(&query, ctx, Some(&replies)));
        let early = replies.0.lock().unwrap().clone();
        if let Some(reply) = &handled.reply {
            assert!(reply.len() >= 12);
            assert_eq!(reply[..2], query[..2], "a reply carries the client's id");
            // What the client gets is the answer taken, or an error the proxy made.
            if taken.as_deref() != Some(reply.as_slice()) {
                let m = Message::from_vec(reply).unwrap();
                assert!(m.answers().is_empty(), "a made reply carries no records");
            }
        }
        // A reply sent from within the exchange is the answer taken, once.
        assert!(early.len() <= 1);
        if let Some(e) = early.first() {
            assert!(handled.replied);
            assert_eq!(Some(e), taken.as_ref());
        }
        w.proxy.record(handled, &query, None);
    }
});
