//! The admin endpoint's client (`ward status`, `ward observe`): hyper's HTTP/1.1
//! connection, the responses read into the types of [`super::api`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::api;
use super::auth::{Token, TokenError};

/// The token a client sends: the file of `--admin-token-file`, else of the environment
/// variable `WARD_ADMIN_TOKEN_FILE` (clap reads both into `file`); None: no token.
pub fn token_from(file: Option<&Path>) -> Result<Option<Token>, TokenError> {
    file.map(Token::read).transpose()
}

/// How long connecting and the answer's head may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no agent answers on {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("{addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the agent at {addr} wants a token: --admin-token-file (or WARD_ADMIN_TOKEN_FILE)")]
    TokenWanted { addr: SocketAddr },
    #[error(
        "the agent at {addr} refused the token of --admin-token-file (or WARD_ADMIN_TOKEN_FILE)"
    )]
    TokenRefused { addr: SocketAddr },
    #[error("{addr}{path}: HTTP {code}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        code: StatusCode,
        body: String,
    },
    #[error("cannot connect to {addr} inside network namespace {netns}: {source}")]
    Netns {
        addr: SocketAddr,
        netns: String,
        source: std::io::Error,
    },
    #[error("{addr}{path}: not the expected JSON: {source}")]
    Json {
        addr: SocketAddr,
        path: String,
        source: serde_json::Error,
    },
}

/// A client of one agent's admin endpoint.
#[derive(Clone, Debug)]
pub struct Client {
    addr: SocketAddr,
    /// The network namespace the agent listens in (a path), when not this process's.
    netns: Option<PathBuf>,
    /// Sent as `Authorization: Bearer` (the agent's `--admin-token-file`).
    token: Option<Token>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            netns: None,
            token: None,
        }
    }

    /// The same client, sending `token` with every request.
    pub fn with_token(mut self, token: Option<Token>) -> Client {
        self.token = token;
        self
    }

    /// A client of the agent listening on `addr` inside the network namespace at
    /// `netns` (each connection is made there; this process stays where it is).
    pub fn in_netns(addr: SocketAddr, netns: PathBuf) -> Client {
        Client {
            addr,
            netns: Some(netns),
            token: None,
        }
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<api::Status, Error> {
        self.get_json("/v1/status").await
    }

    /// `GET /v1/events`: the recent events, then (with `follow`) a
    /// [`api::Event::CaughtUp`] mark and new ones as they come.
    pub async fn events(&self, follow: bool) -> Result<Events, Error> {
        let path = if follow {
            "/v1/events"
        } else {
            "/v1/events?follow=false"
        };
        let body = self.get(path).await?;
        Ok(Events {
            addr: self.addr,
            body,
            buf: BytesMut::new(),
            done: false,
        })
    }

    /// A GET whose body is one JSON value of type `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let body = self.get(path).await?;
        let bytes = self.collect(body).await?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            addr: self.addr,
            path: path.into(),
            source,
        })
    }

    async fn collect(&self, body: Incoming) -> Result<Bytes, Error> {
        body.collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|source| Error::Http {
                addr: self.addr,
                source,
            })
    }

    /// Sends a GET on a new connection; a 2xx answer's body, or the error.
    async fn get(&self, path: &str) -> Result<Incoming, Error> {
        let addr = self.addr;
        let head = async {
            let stream = match &self.netns {
                None => tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|source| Error::Connect { addr, source })?,
                Some(ns) => connect_in(ns.clone(), addr)
                    .await
                    .map_err(|source| Error::Netns {
                        addr,
                        netns: ns.display().to_string(),
                        source,
                    })?,
            };
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| Error::Http { addr, source })?;
            tokio::spawn(conn);
            let mut req = Request::get(path).header(http::header::HOST, addr.to_string());
            if let Some(t) = &self.token {
                req = req.header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", t.as_str()),
                );
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| Error::Connect {
                    addr,
                    source: std::io::Error::other(e),
                })?;
            send.send_request(req)
                .await
                .map_err(|source| Error::Http { addr, source })
        };
        let resp = tokio::time::timeout(TIMEOUT, head)
            .await
            .map_err(|_| Error::Timeout { addr })??;
        let code = resp.status();
        if code == StatusCode::UNAUTHORIZED {
            return Err(match self.token {
                None => Error::TokenWanted { addr },
                Some(_) => Error::TokenRefused { addr },
            });
        }
        if !code.is_success() {
            let body = self.collect(resp.into_body()).await.unwrap_or_default();
            return Err(Error::Status {
                addr,
                path: path.into(),
                code,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(resp.into_body())
    }
}

/// Connects to `addr` from inside the network namespace at `netns`: a thread of its own
/// enters the namespace, connects and ends; the socket stays in that namespace.
async fn connect_in(netns: PathBuf, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(connect_from(&netns, addr));
    });
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread ended"))??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

fn connect_from(netns: &Path, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let f = std::fs::File::open(netns)?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    std::net::TcpStream::connect_timeout(&addr, TIMEOUT)
}

/// The event stream of `/v1/events`, one event at a time.
pub struct Events {
    addr: SocketAddr,
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl Events {
    /// The next event; None when the agent ended the stream. A line that is not an
    /// event (a newer agent's kind) is skipped.
    pub async fn next(&mut self) -> Result<Option<api::Event>, Error> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(i + 1);
                match serde_json::from_slice(&line[..i]) {
                    Ok(e) => return Ok(Some(e)),
                    Err(_) => continue,
                }
            }
            if self.done {
                return Ok(None);
            }
            match self.body.frame().await {
                None => {
                    self.done = true;
                    if !self.buf.is_empty() && !self.buf.ends_with(b"\n") {
                        self.buf.extend_from_slice(b"\n");
                    }
                }
                Some(Err(source)) => {
                    return Err(Error::Http {
                        addr: self.addr,
                        source,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}
