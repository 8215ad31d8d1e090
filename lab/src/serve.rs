//! `ward-lab serve`: the server in every lab pod (and in the world and node namespaces
//! when probes target them). On each TCP port it answers HTTP/1.1 and h2c (hyper-util's
//! auto server: method, path and the client address seen are echoed; a gRPC call gets an
//! empty message and `grpc-status: 0`), and echoes anything that is not HTTP. On each UDP
//! port it echoes. On port 53 it is the scenario's DNS server (UDP and TCP). With an SCTP
//! log it records every SCTP-headed packet it sees on a raw socket (the kernel has no SCTP
//! stack), so that the prober can tell whether its packet arrived.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// What one `ward-lab serve` process serves.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TCP ports (HTTP/h2c/gRPC with echo fallback; DNS on 53).
    #[arg(long, value_delimiter = ',')]
    pub tcp: Vec<u16>,
    /// UDP ports (echo; DNS on 53).
    #[arg(long, value_delimiter = ',')]
    pub udp: Vec<u16>,
    /// JSON object `{"name.": ["ip", ...]}`: the DNS answers this server gives.
    #[arg(long)]
    pub dns_zone: Option<PathBuf>,
    /// Append a line `DPORT VTAG` per SCTP packet received to this file.
    #[arg(long)]
    pub sctp_log: Option<PathBuf>,
    /// Created once every port is bound.
    #[arg(long)]
    pub ready: Option<PathBuf>,
}

/// How the lab's echo probes start; on port 53 they are echoed instead of parsed as DNS.
pub const ECHO_PREFIX: &[u8] = b"ward-lab";

/// The DNS answers of the scenario: lower-case names with a trailing dot -> IPs.
pub type Zone = BTreeMap<String, Vec<IpAddr>>;

pub fn run(args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let zone: Arc<Zone> = Arc::new(match &args.dns_zone {
        Some(p) => serde_json::from_str(
            &fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{}: invalid zone", p.display()))?,
        None => Zone::new(),
    });
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    for &port in &args.tcp {
        let l = TcpListener::bind(SocketAddr::new(any, port))
            .await
            .with_context(|| format!("cannot listen on TCP port {port}"))?;
        tokio::spawn(accept_tcp(l, port, zone.clone()));
        // IPv6 pods are served on the same port; a namespace without IPv6 is served on
        // IPv4 only.
        if let Ok(l6) = listen_v6only(port) {
            tokio::spawn(accept_tcp(l6, port, zone.clone()));
        }
    }
    for &port in &args.udp {
        let s = UdpSocket::bind(SocketAddr::new(any, port))
            .await
            .with_context(|| format!("cannot bind UDP port {port}"))?;
        tokio::spawn(answer_udp(s, port, zone.clone()));
        if let Ok(s6) = bind_udp_v6only(port) {
            tokio::spawn(answer_udp(s6, port, zone.clone()));
        }
    }
    if let Some(log) = args.sctp_log.clone() {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(132)),
        )
        .context("cannot open a raw SCTP socket")?;
        std::thread::spawn(move || sctp_logger(sock, log));
    }
    if let Some(r) = &args.ready {
        fs::write(r, b"ready\n").with_context(|| format!("cannot write {}", r.display()))?;
    }
    std::future::pending::<()>().await;
    Ok(())
}

fn sctp_logger(sock: socket2::Socket, log: PathBuf) {
    let sock = std::net::UdpSocket::from(sock); // only for its safe recv API
    let mut buf = [0u8; 2048];
    while let Ok(n) = sock.recv(&mut buf) {
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 8 {
            continue;
        }
        let dport = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
        let vtag = u32::from_be_bytes([buf[ihl + 4], buf[ihl + 5], buf[ihl + 6], buf[ihl + 7]]);
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&log) {
            let _ = writeln!(f, "{dport} {vtag:08x}");
        }
    }
}

/// HTTP (h1 or h2c) when the first bytes look like a request, TCP echo otherwise.
/// A TCP listener on `[::]:port` that takes IPv6 only, beside the IPv4 one.
fn listen_v6only(port: u16) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_only_v6(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// A UDP socket on `[::]:port` that takes IPv6 only, beside the IPv4 one.
fn bind_udp_v6only(port: u16) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_only_v6(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(s.into())
}

/// Answers the datagrams of one socket: DNS on port 53, else an echo.
async fn answer_udp(s: UdpSocket, port: u16, zone: Arc<Zone>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = s.recv_from(&mut buf).await else {
            continue;
        };
        let reply = if port == 53 && !buf[..n].starts_with(ECHO_PREFIX) {
            dns_answer(&buf[..n], &zone)
        } else {
            Some(buf[..n].to_vec())
        };
        if let Some(r) = reply {
            let _ = s.send_to(&r, peer).await;
        }
    }
}

/// Serves the connections of one listener: DNS over TCP on port 53, else HTTP or echo.
async fn accept_tcp(l: TcpListener, port: u16, zone: Arc<Zone>) {
    loop {
        let Ok((stream, peer)) = l.accept().await else {
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 8];
            let probe = matches!(
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.peek(&mut head)).await,
                Ok(Ok(n)) if head[..n].starts_with(ECHO_PREFIX)
            );
            if port == 53 && !probe {
                let _ = dns_tcp(stream, &zone).await;
            } else {
                tcp_conn(stream, peer).await;
            }
        });
    }
}

async fn tcp_conn(stream: TcpStream, peer: SocketAddr) {
    let mut first = [0u8; 4];
    let looks_http = match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.peek(&mut first),
    )
    .await
    {
        Ok(Ok(n)) if n > 0 => first[..n.min(3)].iter().all(|b| b.is_ascii_uppercase()),
        _ => return,
    };
    if looks_http {
        let svc = service_fn(move |req| respond(req, peer));
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    } else {
        echo(stream).await;
    }
}

async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn respond(
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let grpc = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let line = format!("{} {} from {}\n", req.method(), req.uri().path(), peer.ip());
    let peer_header = peer.ip().to_string();
    // drain the request so that h2 streams finish cleanly
    let _ = req.into_body().collect().await;
    let builder = Response::builder().header("x-ward-peer", peer_header);
    let resp = if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        builder.header("content-type", "application/grpc").body(
            Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
                .with_trailers(std::future::ready(Some(Ok(trailers))))
                .boxed(),
        )
    } else {
        builder
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(line)).boxed())
    };
    Ok(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}

async fn dns_tcp(mut stream: TcpStream, zone: &Zone) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut q).await?;
        let Some(a) = dns_answer(&q, zone) else {
            return Ok(());
        };
        let n = u16::try_from(a.len()).unwrap_or(u16::MAX);
        stream.write_all(&n.to_be_bytes()).await?;
        stream.write_all(&a).await?;
    }
}

/// The authoritative answer to a query: A records from the zone, NXDOMAIN for unknown
/// names, NOERROR without records for other types of known names.
pub fn dns_answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.message_type() != MessageType::Query {
        return None;
    }
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    m.add_queries(q.queries().iter().cloned());
    let mut code = ResponseCode::NoError;
    for question in q.queries() {
        let name = question.name().to_ascii().to_ascii_lowercase();
        let name = if name.ends_with('.') {
            name
        } else {
            format!("{name}.")
        };
        match zone.get(&name) {
            None => code = ResponseCode::NXDomain,
            Some(ips) => {
                for ip in ips {
                    if let (IpAddr::V4(v4), RecordType::A) = (ip, question.query_type()) {
                        let owner: Name = question.name().clone();
                        m.add_answer(Record::from_rdata(owner, 30, RData::A(A(*v4))));
                    }
                }
            }
        }
    }
    m.set_response_code(code);
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use hickory_proto::op::Query;

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[test]
    fn the_zone_answers_known_names_case_insensitively_and_nxdomain_otherwise() {
        let mut zone = Zone::new();
        zone.insert(
            "api.payments.example.".into(),
            vec!["203.0.113.10".parse().unwrap()],
        );
        let a = Message::from_vec(&dns_answer(&query("API.Payments.Example."), &zone).unwrap())
            .unwrap();
        assert_eq!(a.id(), 7);
        assert_eq!(a.response_code(), ResponseCode::NoError);
        assert_eq!(a.answers().len(), 1);
        let n = Message::from_vec(&dns_answer(&query("evil.example."), &zone).unwrap()).unwrap();
        assert_eq!(n.response_code(), ResponseCode::NXDomain);
        assert!(
            dns_answer(b"ward-lab 1 2\n", &zone).is_none(),
            "not DNS: no answer"
        );
    }
}
