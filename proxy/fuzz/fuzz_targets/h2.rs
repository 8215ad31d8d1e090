//! HTTP/2 frame sequences into the proxy's server side: after the client preface, the
//! input is read as a list of frames, some built to be well-formed requests (HEADERS
//! with HPACK literals of fuzzed pseudo-headers and headers, DATA), some raw (any type,
//! flags, stream and payload), with PRIORITY, WINDOW_UPDATE, RST_STREAM, SETTINGS and
//! PING in between. Allowed requests go to a real h2 upstream on loopback. No input may
//! panic the handler or leave it hanging.

#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
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
        - {method: "GET|POST|HEAD", path: "/public/.*"}
        - {path: "/h", headers: ["X-A: 1"], host: "web(:[0-9]+)?"}
        - path: /r
          headerMatches: [{name: X-T, value: v, mismatch: REPLACE}]
"#;

struct Setup {
    rt: tokio::runtime::Runtime,
    proxy: Proxy,
    upstream: SocketAddr,
}

/// An upstream that answers every request (h2 or HTTP/1.1) with 200 and its body.
async fn upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await.map(|c| c.to_bytes());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(body.unwrap_or_default())))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let upstream = rt.block_on(upstream());
        let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let (policies, _, _) = policy_model::api::load(POLICY, None);
        let model = Model::compile(&cluster, policies, CompileOptions::default());
        let metrics = Metrics::new();
        let config = Config {
            header_read_timeout_ms: 50,
            idle_timeout_ms: 200,
            upstream_connect_timeout_ms: 50,
            h2_max_inbound_priority_frames_per_stream: 4,
            h2_max_inbound_window_update_frames_per_data_frame_sent: 2,
            h2_max_inbound_control_frames: 4,
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
        Setup {
            rt,
            proxy,
            upstream,
        }
    })
}

/// Reads the fuzz input front to back; past its end every read is 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.byte()).min(max).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn pick<'b>(&mut self, from: &[&'b [u8]]) -> &'b [u8] {
        from[usize::from(self.byte()) % from.len()]
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK literal without indexing, new name, no Huffman coding (lengths under 127).
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    out.push(name.len().min(126) as u8);
    out.extend_from_slice(&name[..name.len().min(126)]);
    out.push(value.len().min(126) as u8);
    out.extend_from_slice(&value[..value.len().min(126)]);
}

fn request_headers(inp: &mut Input<'_>) -> Vec<u8> {
    let mut block = Vec::new();
    let method = inp.pick(&[b"GET", b"POST", b"HEAD", b"DELETE", b"CONNECT", b"OPTIONS"]);
    literal(&mut block, b":method", method);
    literal(&mut block, b":scheme", inp.pick(&[b"http", b"https", b""]));
    let path = inp
        .pick(&[b"/public/", b"/h", b"/r", b"/admin", b"", b"*"])
        .to_vec();
    let mut path = path;
    path.extend(inp.bytes(40));
    literal(&mut block, b":path", &path);
    match inp.byte() % 4 {
        0 => {}
        1 => literal(&mut block, b":authority", b"web"),
        _ => {
            let a = inp.bytes(20);
            literal(&mut block, b":authority", &a);
        }
    }
    for _ in 0..inp.byte() % 5 {
        let name = inp
            .pick(&[
                b"host",
                b"x-a",
                b"x-t",
                b"content-length",
                b"te",
                b"connection",
                b"x_a",
                b"cookie",
            ])
            .to_vec();
        let name = if inp.byte() % 4 == 0 {
            inp.bytes(10)
        } else {
            name
        };
        let value = inp.bytes(20);
        literal(&mut block, &name, &value);
    }
    block
}

fn frames(inp: &mut Input<'_>) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut stream = 1u32;
    while !inp.0.is_empty() {
        match inp.byte() % 9 {
            0 | 1 => {
                let block = request_headers(inp);
                let end = inp.byte() % 2;
                frame(&mut out, 0x1, 0x4 | end, stream, &block);
                stream += 2;
            }
            2 => {
                let s = stream.saturating_sub(2 * u32::from(inp.byte() % 3));
                let flags = inp.byte() % 2;
                let data = inp.bytes(200);
                frame(&mut out, 0x0, flags, s, &data);
            }
            3 => {
                let (kind, flags, s) = (inp.byte() % 12, inp.byte(), inp.u32());
                let payload = inp.bytes(64);
                frame(&mut out, kind, flags, s, &payload);
            }
            4 => {
                let s = inp.u32() % 16;
                frame(&mut out, 0x2, 0, s, &[0, 0, 0, 0, 16]);
            }
            5 => {
                let (s, inc) = (inp.u32() % 16, inp.u32());
                frame(&mut out, 0x8, 0, s, &inc.to_be_bytes());
            }
            6 => {
                let s = inp.u32() % 16;
                let code = inp.u32() % 16;
                frame(&mut out, 0x3, 0, s, &code.to_be_bytes());
            }
            7 => {
                let payload = inp.bytes(24);
                let flags = inp.byte() % 2;
                frame(&mut out, 0x4, flags, 0, &payload);
            }
            _ => {
                let flags = inp.byte() % 2;
                frame(&mut out, 0x6, flags, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let bytes = frames(&mut Input(data));
    s.rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let p = s.proxy.clone();
        let upstream = s.upstream;
        let conn = tokio::spawn(async move {
            p.serve_connection(server, "127.0.0.1:40000".parse().unwrap(), upstream)
                .await
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), rd.read_to_end(&mut out)).await;
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.write_all(&bytes)).await;
        let _ = wr.shutdown().await;
        let _ = reader.await;
        drop(wr);
        let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the connection handler hung or panicked"
        );
    });
});
