//! Arbitrary bytes to the proxy's connection handler, as a client would send them: no
//! input may panic the handler, and every connection ends (timeouts are short).

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use policy_model::{CompileOptions, Direction, Model};
use proxy::{AuditLog, Config, Metrics, Mode, PolicyStore, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = r#"
namespaces:
  - {name: default}
pods:
  - {namespace: default, name: client, labels: {app: client}, ip: 127.0.0.1}
  - {namespace: default, name: web, labels: {app: web}, ip: 10.0.0.2}
"#;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
        - {path: "/h", headers: ["X-A: 1"]}
        - path: /r
          headerMatches: [{name: X-T, value: v, mismatch: REPLACE}]
"#;

fn setup() -> &'static (tokio::runtime::Runtime, Proxy) {
    static S: OnceLock<(tokio::runtime::Runtime, Proxy)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, _, _) = policy_model::api::load(POLICY, None);
        let model = Model::compile(&cluster, policies, CompileOptions::default());
        let metrics = Metrics::new();
        let config = Config {
            header_read_timeout_ms: 50,
            idle_timeout_ms: 100,
            upstream_connect_timeout_ms: 50,
            ..Config::default()
        };
        let proxy = Proxy::new(
            config,
            Arc::new(PolicyStore::new(model)),
            Mode::Standalone {
                endpoint: "default/web".into(),
                direction: Direction::Ingress,
                port: Some(80),
            },
            AuditLog::disabled(),
            metrics,
        );
        (rt, proxy)
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, proxy) = setup();
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let p = proxy.clone();
        // nothing listens on port 1: allowed requests get 503
        let conn = tokio::spawn(async move {
            p.serve_connection(
                server,
                "127.0.0.1:40000".parse().unwrap(),
                "127.0.0.1:1".parse().unwrap(),
            )
            .await
        });
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out)).await;
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(2), conn).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the connection handler hung or panicked"
        );
    });
});
