//! Planned restart without loss: a new agent takes over the listening sockets of the one
//! running on the node, so that no connection or query meets a closed port.
//!
//! The running agent offers its sockets on a Unix socket in the state directory
//! ([`SOCKET_NAME`], mode 0600). A starting agent connects there; when nobody answers it
//! binds its own sockets, as after a crash. Otherwise:
//!
//! 1. `sockets`: the running agent sends its listening sockets (HTTP proxy, DNS proxy UDP
//!    and TCP, IPv4 and IPv6, the admin endpoint) with `SCM_RIGHTS`. Both processes now
//!    hold the same sockets. The new agent compiles its first policy and starts serving
//!    the proxies' sockets beside the running one: each connection or datagram goes to
//!    one of the two, so none waits in a queue that nobody reads (the new agent's DNS
//!    answers wait for its first push, below).
//! 2. `release`: the running agent stops accepting and reading, lets the DNS queries it
//!    holds finish (their answers still go through its datapath writes), stops its
//!    reconcile tasks (from then on it writes no map: one writer at a time), saves its
//!    DNS cache, starts draining its HTTP connections, and answers `released`. The pinned
//!    maps enforce throughout.
//! 3. The new agent reads the maps and the saved state back, pushes its policy and
//!    serves the admin endpoint. The old one finishes its connections (up to the drain
//!    window), then waits for its SIGTERM and leaves the redirect routing in place.
//!
//! The sockets keep their options (transparent, v6-only, backlog) because they are the
//! same sockets, not new ones bound with `SO_REUSEPORT`, whose accept queue would be
//! lost with the old process.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// The hand-off socket's file name in the state directory.
pub const SOCKET_NAME: &str = "agent.sock";

/// At most this many sockets change hands.
const MAX_SOCKETS: usize = 16;

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Http4,
    Http6,
    DnsUdp4,
    DnsTcp4,
    DnsUdp6,
    DnsTcp6,
    Admin,
}

/// Listening sockets by role.
#[derive(Debug, Default)]
pub struct Sockets(pub BTreeMap<Role, OwnedFd>);

impl Sockets {
    /// Takes the socket of a role out.
    pub fn take(&mut self, role: Role) -> Option<OwnedFd> {
        self.0.remove(&role)
    }
}

/// Why the hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{path}: the running agent answered {answer:?} to {asked}")]
    Answer {
        path: PathBuf,
        asked: &'static str,
        answer: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    Sockets,
    Release,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
enum Reply {
    /// The roles of the sockets that come with this message, in order.
    Sockets {
        roles: Vec<Role>,
    },
    Released,
}

/// The hand-off socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// The running agent, as the starting one sees it.
#[derive(Debug)]
pub struct Predecessor {
    stream: StdUnixStream,
    path: PathBuf,
}

/// Asks the agent running on `state_dir` for its listening sockets. None when no agent
/// answers there (none runs, or it crashed): the caller binds its own.
pub fn take_over(
    state_dir: &Path,
    timeout: Duration,
) -> Result<Option<(Predecessor, Sockets)>, Error> {
    let path = socket_path(state_dir);
    let stream = match StdUnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io_error(&path, "connecting", e)),
    };
    let timeouts = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)));
    if let Err(e) = timeouts {
        return Err(io_error(&path, "setting a timeout", e));
    }
    let mut p = Predecessor { stream, path };
    p.send(&Request::Sockets)?;
    let (line, fds) =
        recv_with_fds(&p.stream).map_err(|e| io_error(&p.path, "receiving the sockets", e))?;
    let roles = match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Sockets { roles }) if roles.len() == fds.len() => roles,
        _ => {
            return Err(Error::Answer {
                path: p.path,
                asked: "sockets",
                answer: format!("{line} with {} sockets", fds.len()),
            })
        }
    };
    let sockets = Sockets(roles.into_iter().zip(fds).collect());
    Ok(Some((p, sockets)))
}

impl Predecessor {
    fn send(&mut self, r: &Request) -> Result<(), Error> {
        let mut line = serde_json::to_vec(r).unwrap_or_default();
        line.push(b'\n');
        io::Write::write_all(&mut self.stream, &line)
            .map_err(|e| io_error(&self.path, "writing a request", e))
    }

    /// Asks the running agent to stop serving and writing the maps; returns once it has.
    pub fn release(mut self) -> Result<(), Error> {
        self.send(&Request::Release)?;
        let (line, _) = recv_with_fds(&self.stream)
            .map_err(|e| io_error(&self.path, "waiting for the release", e))?;
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Released) => Ok(()),
            _ => Err(Error::Answer {
                path: self.path,
                asked: "release",
                answer: line,
            }),
        }
    }
}

/// The running agent's side: offers `sockets` on the state directory's hand-off socket
/// until a successor asks for a release, then runs `release` and answers.
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
}

impl Offer {
    /// Binds the hand-off socket (a stale one of a crashed agent is replaced), mode 0600.
    pub fn bind(state_dir: &Path) -> Result<Offer, Error> {
        let path = socket_path(state_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error(&path, "removing a stale hand-off socket", e))
            }
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(|e| io_error(&path, "binding", e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_error(&path, "restricting to its owner", e))?;
        Ok(Offer { listener, path })
    }

    /// Serves successors one at a time: `sockets` as often as asked; on `release`, runs
    /// `release`, answers, and returns (the sockets are no longer this agent's).
    pub async fn serve<F, Fut>(self, sockets: Sockets, release: F)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut release = Some(release);
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "hand-off socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match successor(&stream, &sockets).await {
                Ok(Some(Request::Release)) => {
                    if let Some(r) = release.take() {
                        tracing::info!("a new agent takes over: releasing the sockets");
                        r().await;
                    }
                    if let Err(e) = send_line(&stream, &Reply::Released, &[]).await {
                        tracing::warn!(error = %e, "hand-off: cannot confirm the release");
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "hand-off: a successor went away"),
            }
        }
    }
}

/// Answers one successor's requests; returns at its `release` or when it goes away.
async fn successor(stream: &UnixStream, sockets: &Sockets) -> io::Result<Option<Request>> {
    let mut buf = Vec::new();
    loop {
        let Some(line) = read_line(stream, &mut buf).await? else {
            return Ok(None);
        };
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Sockets) => {
                let roles: Vec<Role> = sockets.0.keys().copied().collect();
                let fds: Vec<BorrowedFd<'_>> = sockets.0.values().map(AsFd::as_fd).collect();
                send_line(stream, &Reply::Sockets { roles }, &fds).await?;
            }
            Ok(Request::Release) => return Ok(Some(Request::Release)),
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{line:?}: {e}"),
                ))
            }
        }
    }
}

/// Reads up to a newline; None at the end of the stream.
async fn read_line(stream: &UnixStream, buf: &mut Vec<u8>) -> io::Result<Option<String>> {
    loop {
        if let Some(at) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=at).collect();
            return Ok(Some(String::from_utf8_lossy(&line).trim().to_string()));
        }
        stream.readable().await?;
        let mut chunk = [0u8; 512];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if buf.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request too long",
            ));
        }
    }
}

/// Sends `reply` as one line, with `fds` attached to its first byte.
async fn send_line(stream: &UnixStream, reply: &Reply, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut sent = 0;
    while sent < line.len() {
        let rest = &line[sent..];
        let with: &[BorrowedFd<'_>] = if sent == 0 { fds } else { &[] };
        sent += stream
            .async_io(Interest::WRITABLE, || {
                let mut space =
                    [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !with.is_empty() && !control.push(SendAncillaryMessage::ScmRights(with)) {
                    return Err(io::Error::other("too many sockets for one message"));
                }
                sendmsg(
                    stream,
                    &[IoSlice::new(rest)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?;
    }
    Ok(())
}

/// Receives one line and the descriptors that came with it (blocking, with the stream's
/// timeout).
fn recv_with_fds(stream: &StdUnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    while !line.contains(&b'\n') {
        let mut chunk = [0u8; 1024];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut chunk)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(got) = m {
                fds.extend(got);
            }
        }
        if msg.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&chunk[..msg.bytes]);
    }
    Ok((String::from_utf8_lossy(&line).trim().to_string(), fds))
}

fn io_error(path: &Path, what: &'static str, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_gets_the_same_listening_socket_and_its_release_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut offered = Sockets::default();
        offered
            .0
            .insert(Role::Http4, OwnedFd::from(listener.try_clone().unwrap()));
        let released = Arc::new(AtomicBool::new(false));
        let r = released.clone();
        let offer = Offer::bind(dir.path()).unwrap();
        let served = tokio::spawn(offer.serve(offered, move || async move {
            r.store(true, Ordering::SeqCst);
        }));
        let path = dir.path().to_path_buf();
        let (pred, mut sockets) = tokio::task::spawn_blocking(move || {
            take_over(&path, Duration::from_secs(5))
                .unwrap()
                .expect("an agent answers")
        })
        .await
        .unwrap();
        let taken = TcpListener::from(sockets.take(Role::Http4).expect("the HTTP socket"));
        // the same socket: a connection queued before the release is accepted by the
        // successor
        assert_eq!(taken.local_addr().unwrap(), addr);
        let mut client = TcpStream::connect(addr).unwrap();
        drop(listener);
        assert!(!released.load(Ordering::SeqCst));
        tokio::task::spawn_blocking(move || pred.release().unwrap())
            .await
            .unwrap();
        assert!(released.load(Ordering::SeqCst));
        served.await.unwrap();
        let (mut accepted, _) = taken.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn nobody_answering_means_binding_anew() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take_over(dir.path(), Duration::from_secs(1))
            .unwrap()
            .is_none());
        // a stale socket file of a crashed agent: refused, also none
        let stale = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        drop(stale);
        assert!(take_over(dir.path(), Duration::from_secs(1))
            .unwrap()
            .is_none());
        // and the next offer replaces it
        Offer::bind(dir.path()).expect("bound over the stale file");
    }
}
