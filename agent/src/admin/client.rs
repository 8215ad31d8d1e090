//! The admin endpoint's client (`ward status`, `ward observe`): hyper's HTTP/1.1
//! connection, the responses read into the types of [`super::api`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::api;

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
    #[error("{addr}{path}: HTTP {code}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        code: StatusCode,
        body: String,
    },
    #[error("{addr}{path}: not the expected JSON: {source}")]
    Json {
        addr: SocketAddr,
        path: String,
        source: serde_json::Error,
    },
}

/// A client of one agent's admin endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    addr: SocketAddr,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr }
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<api::Status, Error> {
        self.get_json("/v1/status").await
    }

    /// `GET /v1/events`: the recent events, then (with `follow`) new ones as they come.
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
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| Error::Connect { addr, source })?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| Error::Http { addr, source })?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, addr.to_string())
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
