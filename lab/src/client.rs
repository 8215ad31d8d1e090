//! `ward-lab probe`: the small clients the lab runs inside a source namespace for what
//! curl and dig do not cover: TCP echo, UDP echo, a unary gRPC call, and a raw SCTP
//! packet. Each prints one line, `allow DETAIL` or `deny DETAIL`, and exits 0; only a
//! broken invocation exits non-zero.

use std::fs;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    Tcp,
    Udp,
    Grpc,
    Sctp,
}

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    pub kind: Kind,
    /// Destination IP:PORT.
    pub to: SocketAddr,
    /// Source address to bind (for probes from an external's address).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// gRPC method path.
    #[arg(long, default_value = "/ward.lab.Echo/Say")]
    pub path: String,
    /// Extra request headers for gRPC, `Name: value`.
    #[arg(long)]
    pub header: Vec<String>,
    /// SCTP: the destination's packet log to watch.
    #[arg(long)]
    pub sctp_log: Option<PathBuf>,
    /// Overall deadline.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

pub fn run(args: ProbeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Duration::from_millis(args.timeout_ms);
    let outcome = rt.block_on(async {
        match tokio::time::timeout(deadline, probe(&args)).await {
            Ok(r) => r,
            Err(_) => Ok((
                false,
                format!("timed out after {:.1} s", deadline.as_secs_f64()),
            )),
        }
    })?;
    println!("{} {}", if outcome.0 { "allow" } else { "deny" }, outcome.1);
    Ok(())
}

async fn probe(args: &ProbeArgs) -> Result<(bool, String)> {
    let nonce = format!("ward-lab {} {:?}\n", std::process::id(), Instant::now());
    match args.kind {
        Kind::Tcp => {
            let mut s = match connect(args).await {
                Ok(s) => s,
                Err(e) => return Ok((false, format!("connect: {e}"))),
            };
            s.write_all(nonce.as_bytes()).await?;
            let mut buf = vec![0u8; nonce.len()];
            match s.read_exact(&mut buf).await {
                Ok(_) if buf == nonce.as_bytes() => Ok((true, "echoed".into())),
                Ok(_) => Ok((false, "wrong echo".into())),
                Err(e) => Ok((false, format!("no echo: {e}"))),
            }
        }
        Kind::Udp => {
            let local = SocketAddr::new(
                args.bind
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                0,
            );
            let s = UdpSocket::bind(local).await?;
            s.connect(args.to).await?;
            let mut buf = vec![0u8; 512];
            // a lost datagram (neighbour resolution) is retried until the deadline
            loop {
                s.send(nonce.as_bytes()).await?;
                match tokio::time::timeout(Duration::from_millis(400), s.recv(&mut buf)).await {
                    Ok(Ok(n)) if &buf[..n] == nonce.as_bytes() => {
                        return Ok((true, "echoed".into()))
                    }
                    Ok(Ok(_)) => return Ok((false, "wrong echo".into())),
                    Ok(Err(e)) => return Ok((false, format!("recv: {e}"))),
                    Err(_) => continue,
                }
            }
        }
        Kind::Grpc => grpc(args).await,
        Kind::Sctp => sctp(args).await,
    }
}

async fn connect(args: &ProbeArgs) -> std::io::Result<tokio::net::TcpStream> {
    let sock = match args.to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(b) = args.bind {
        sock.bind(SocketAddr::new(b, 0))?;
    }
    sock.connect(args.to).await
}

async fn grpc(args: &ProbeArgs) -> Result<(bool, String)> {
    let stream = match connect(args).await {
        Ok(s) => s,
        Err(e) => return Ok((false, format!("connect: {e}"))),
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("h2 handshake")?;
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://{}{}", args.to, args.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for h in &args.header {
        let (k, v) = h.split_once(':').unwrap_or((h.as_str(), ""));
        req = req.header(k.trim(), v.trim());
    }
    let req = req.body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return Ok((false, format!("request: {e}"))),
    };
    let status = resp.status();
    let head_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let collected = match resp.into_body().collect().await {
        Ok(c) => c,
        Err(e) => return Ok((false, format!("body: {e}"))),
    };
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(head_status);
    match grpc_status.as_deref() {
        Some("0") => Ok((true, format!("{status} grpc-status 0"))),
        Some(s) => Ok((false, format!("{status} grpc-status {s}"))),
        None => Ok((false, format!("{status} without grpc-status"))),
    }
}

async fn sctp(args: &ProbeArgs) -> Result<(bool, String)> {
    let Some(log) = &args.sctp_log else {
        bail!("--sctp-log is required for SCTP");
    };
    let SocketAddr::V4(to) = args.to else {
        bail!("SCTP probes are IPv4 only");
    };
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(132)),
    )
    .context("raw SCTP socket")?;
    if let Some(b) = args.bind {
        sock.bind(&SocketAddr::new(b, 0).into())?;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let vtag: u32 = std::process::id().rotate_left(16) ^ nanos ^ 0x5741_5244;
    // common header (sport, dport, verification tag, checksum) and an empty DATA chunk
    let mut pkt = vec![0u8; 16];
    pkt[0..2].copy_from_slice(&40000u16.to_be_bytes());
    pkt[2..4].copy_from_slice(&to.port().to_be_bytes());
    pkt[4..8].copy_from_slice(&vtag.to_be_bytes());
    pkt[15] = 4;
    let want = format!("{} {vtag:08x}", to.port());
    let dest = SocketAddr::V4(SocketAddrV4::new(*to.ip(), 0));
    loop {
        sock.send_to(&pkt, &dest.into())?;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let seen = fs::read_to_string(log).unwrap_or_default();
            if seen.lines().any(|l| l == want) {
                return Ok((true, "delivered".into()));
            }
        }
    }
}
