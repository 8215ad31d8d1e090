//! `ward-lab probe`: the small clients the lab runs inside a source namespace for what
//! curl and dig do not cover: TCP echo, UDP echo, a unary gRPC call, a raw SCTP
//! packet, and a TLS session with the exact SNI asked (or none), optionally carrying one
//! HTTP/1.1 request. Each prints one line, `allow DETAIL` or `deny DETAIL`, and exits 0; only a
//! broken invocation exits non-zero.

use std::fs;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio_rustls::TlsConnector;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    Tcp,
    Udp,
    Grpc,
    Sctp,
    Tls,
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
    /// TLS: the ClientHello's server name, sent as written (none: no SNI; the
    /// certificate's chain is still checked, its name is not).
    #[arg(long)]
    pub sni: Option<String>,
    /// TLS: the CA certificates (PEM) to trust.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// TLS: send one HTTP/1.1 request with this method (and `--path`, `--header`).
    #[arg(long)]
    pub method: Option<String>,
    /// TLS: make a unary gRPC call of `--path` over h2 (ALPN `h2`) instead.
    #[arg(long, conflicts_with = "method")]
    pub grpc: bool,
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
        Kind::Tls => tls(args).await,
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
    grpc_call(stream, &format!("http://{}", args.to), args).await
}

/// A unary gRPC call of `args.path` with an empty message on `stream` (h2): allowed when
/// the answer's `grpc-status` is 0.
async fn grpc_call<S>(stream: S, base: &str, args: &ProbeArgs) -> Result<(bool, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
        {
            Ok(x) => x,
            Err(e) => return Ok((false, format!("h2 handshake: {e}"))),
        };
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("{base}{}", args.path))
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

/// A TLS session: allowed when the handshake completes and, with `--method`, the answer
/// is the server's (200); a reset, a failed handshake or a 403 is a denial.
async fn tls(args: &ProbeArgs) -> Result<(bool, String)> {
    let Some(ca) = &args.ca else {
        bail!("--ca is required for TLS");
    };
    let mut config = tls_client(ca, args.sni.is_none())?;
    if args.grpc {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    let name = match &args.sni {
        Some(sni) => ServerName::try_from(sni.clone())
            .with_context(|| format!("--sni {sni:?} is not a DNS name"))?,
        None => ServerName::IpAddress(args.to.ip().into()),
    };
    let stream = match connect(args).await {
        Ok(s) => s,
        Err(e) => return Ok((false, format!("connect: {e}"))),
    };
    let tls = match TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
    {
        Ok(s) => s,
        Err(e) => return Ok((false, format!("TLS handshake: {e}"))),
    };
    let host = args.sni.clone().unwrap_or_else(|| args.to.ip().to_string());
    if args.grpc {
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok((false, "the server did not choose h2 by ALPN".into()));
        }
        return grpc_call(tls, &format!("https://{host}"), args).await;
    }
    let Some(method) = &args.method else {
        return Ok((true, "TLS handshake completed".into()));
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(x) => x,
        Err(e) => return Ok((false, format!("HTTP over TLS: {e}"))),
    };
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method.as_str())
        .uri(&args.path)
        .header("host", host);
    for h in &args.header {
        let (k, v) = h.split_once(':').unwrap_or((h.as_str(), ""));
        req = req.header(k.trim(), v.trim());
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return Ok((false, format!("HTTPS request: {e}"))),
    };
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok((
        status == http::StatusCode::OK,
        format!("HTTPS {}", status.as_u16()),
    ))
}

/// A rustls client trusting the CAs of `ca`; `any_name`: the chain is checked, the
/// certificate's name is not (a ClientHello without SNI names no server).
fn tls_client(ca: &std::path::Path, any_name: bool) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("{}: cannot read", ca.display()))?
    {
        roots
            .add(c.with_context(|| format!("{}: bad PEM", ca.display()))?)
            .with_context(|| format!("{}: not a CA certificate", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if any_name {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_sni = !any_name;
    Ok(config)
}

/// Checks the chain against the roots and accepts any name (the probes without SNI).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
