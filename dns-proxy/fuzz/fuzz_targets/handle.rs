//! Arbitrary bytes as a query and as the upstream's answer, through the whole per-query
//! path (`Proxy::handle`): parse, policy, forward (canned), answer checks, learning,
//! datapath hand-off. Run: `cargo +nightly fuzz run handle` in `dns-proxy/`.
//!
//! Input: byte 0 selects the shape; bit 0 set: a valid allowed query and the rest as the
//! answer; clear: bytes 1..3 (big endian) split the rest into query and answer.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use dns_proxy::audit::Audit;
use dns_proxy::forward::{ForwardError, Upstream};
use dns_proxy::metrics::Metrics;
use dns_proxy::sink::BoxFuture;
use dns_proxy::{Config, NeverInUse, NullSink, Proxy, QueryContext, Scope, Transport};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
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
        dns: [{matchPattern: "*.app.test"}, {matchName: example.com}]
  - toFQDNs: [{matchPattern: "**.test"}]
"#;

#[derive(Default)]
struct Canned(Mutex<Vec<u8>>);

impl Upstream for Canned {
    fn forward<'a>(
        &'a self,
        _query: &'a [u8],
        _server: SocketAddr,
        _transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let a = self.0.lock().map(|g| g.clone()).unwrap_or_default();
        Box::pin(async move { Ok(a) })
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    proxy: Proxy,
    canned: Arc<Canned>,
    good_query: Vec<u8>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, errors, _) = policy_model::api::load(POLICY, None);
        assert!(errors.is_empty(), "{errors:?}");
        let model = Model::compile(&cluster, policies, CompileOptions::default());
        let metrics = Metrics::new().unwrap();
        let canned = Arc::new(Canned::default());
        let proxy = Proxy::new(
            Config::default(),
            Arc::new(model),
            Scope::Endpoint("app/client".into()),
            Arc::new(NullSink),
            Arc::new(NeverInUse),
            Audit::disabled(),
            metrics,
        )
        .with_upstream(canned.clone());
        let mut q = Message::new();
        q.set_id(0x4242)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query);
        q.add_query(Query::query(
            Name::from_ascii("web.app.test.").unwrap(),
            RecordType::A,
        ));
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            proxy,
            canned,
            good_query: q.to_vec().unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (query, answer) = if mode & 1 == 1 {
        (w.good_query.clone(), rest.to_vec())
    } else if rest.len() >= 2 {
        let split = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (q, a) = rest[2..].split_at(split);
        (q.to_vec(), a.to_vec())
    } else {
        (rest.to_vec(), Vec::new())
    };
    *w.canned.0.lock().unwrap() = answer;
    let ctx = QueryContext {
        client: ([127, 0, 0, 1], 40000).into(),
        server: ([127, 0, 0, 1], 53).into(),
        transport: if mode & 2 == 2 { Transport::Tcp } else { Transport::Udp },
    };
    if let Some(reply) = w.rt.block_on(w.proxy.handle(&query, ctx)) {
        assert!(reply.len() >= 12);
        assert_eq!(reply[..2], query[..2]);
    }
});
