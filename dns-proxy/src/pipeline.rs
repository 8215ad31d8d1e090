//! DNS over TCP to the upstream servers: one connection per server, used by every query
//! to it at once (pipelining, RFC 7766 6.2.1). Each query goes out with an id that no
//! other query in flight on the connection has ([`Sent::set_id`]); answers come back in
//! any order and are matched by id, then checked as every answer is ([`Sent::accept`]).
//!
//! At most [`IN_FLIGHT`] queries are out on a connection at once; more wait for a place.
//! A connection without a query for [`IDLE`] is closed; one the server closed (or that
//! failed) is replaced by a new one on the next query, and a query whose connection
//! closed before its answer came is sent once more over a new one. Frames are written by
//! a task of the connection, so a query dropped half-way (its timeout) never leaves half
//! a frame on the stream; an answer is read into a buffer of its own length.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rand::RngCore;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, OnceCell, Semaphore};

use crate::forward::Sent;

/// Queries out on one connection at once.
pub const IN_FLIGHT: usize = 100;
/// A connection without a query this long is closed.
pub const IDLE: Duration = Duration::from_secs(10);
/// A frame that cannot be written in this time ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

type Cell = Arc<OnceCell<Arc<Conn>>>;
type Pool = Mutex<HashMap<SocketAddr, Cell>>;

/// The connections to the upstream servers, at most one per server.
#[derive(Debug)]
pub struct Pipelines {
    mark: Option<u32>,
    /// How long a connection without a query stays open ([`IDLE`]).
    idle: Duration,
    pool: Arc<Pool>,
}

/// One connection to a server.
#[derive(Debug)]
struct Conn {
    /// Frames for the writer task.
    frames: mpsc::Sender<Vec<u8>>,
    state: Mutex<State>,
    places: Semaphore,
    pool: Weak<Pool>,
    server: SocketAddr,
    /// The pool's cell for this connection (its address), to leave the pool by.
    cell: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The queries in flight, by the id they went out with.
    pending: HashMap<u16, oneshot::Sender<Vec<u8>>>,
    closed: bool,
}

/// Why a query on a connection got no answer.
enum Failure {
    /// The connection closed first (a query on a new one may still get one).
    Closed,
    Io(io::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipelines {
    pub fn new(mark: Option<u32>) -> Pipelines {
        Pipelines::with_idle(mark, IDLE)
    }

    /// The same, closing a connection without a query for `idle`.
    pub fn with_idle(mark: Option<u32>, idle: Duration) -> Pipelines {
        Pipelines {
            mark,
            idle,
            pool: Arc::default(),
        }
    }

    /// How many servers have a connection (or one being made).
    pub fn connections(&self) -> usize {
        lock(&self.pool).len()
    }

    /// Sends `sent` to `server` over its connection and returns the answer as the
    /// client's.
    pub async fn exchange(&self, sent: &mut Sent<'_>, server: SocketAddr) -> io::Result<Vec<u8>> {
        let mut retried = false;
        loop {
            let (conn, fresh) = self.conn(server).await?;
            match conn.exchange(sent).await {
                Ok(answer) => return Ok(answer),
                // The server closed a connection that had served before (idle, say):
                // once more on a new one.
                Err(Failure::Closed) if !fresh && !retried => retried = true,
                Err(Failure::Closed) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the upstream closed the connection before answering",
                    ))
                }
                Err(Failure::Io(e)) => return Err(e),
            }
        }
    }

    /// The server's open connection, or a new one (and whether it is new).
    async fn conn(&self, server: SocketAddr) -> io::Result<(Arc<Conn>, bool)> {
        let cell = lock(&self.pool).entry(server).or_default().clone();
        let mut fresh = false;
        let made = cell
            .get_or_try_init(|| {
                fresh = true;
                Conn::connect(
                    server,
                    self.mark,
                    self.idle,
                    Arc::downgrade(&self.pool),
                    Arc::as_ptr(&cell) as usize,
                )
            })
            .await;
        match made {
            Ok(conn) => Ok((conn.clone(), fresh)),
            Err(e) => {
                leave(&self.pool, server, Arc::as_ptr(&cell) as usize);
                Err(e)
            }
        }
    }
}

/// Removes the pool's entry for `server` if it is still the cell at `cell`.
fn leave(pool: &Pool, server: SocketAddr, cell: usize) {
    let mut pool = lock(pool);
    if pool
        .get(&server)
        .is_some_and(|c| Arc::as_ptr(c) as usize == cell)
    {
        pool.remove(&server);
    }
}

/// Removes a query's entry when it ends, answered or not.
struct Pending<'a> {
    conn: &'a Conn,
    id: u16,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(&self.conn.state).pending.remove(&self.id);
    }
}

impl Conn {
    async fn connect(
        server: SocketAddr,
        mark: Option<u32>,
        idle: Duration,
        pool: Weak<Pool>,
        cell: usize,
    ) -> io::Result<Arc<Conn>> {
        let sock = if server.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(m) = mark {
            SockRef::from(&sock).set_mark(m)?;
        }
        let stream = sock.connect(server).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let (frames, rx) = mpsc::channel(IN_FLIGHT);
        let conn = Arc::new(Conn {
            frames,
            state: Mutex::default(),
            places: Semaphore::new(IN_FLIGHT),
            pool,
            server,
            cell,
        });
        tokio::spawn(write_frames(Arc::downgrade(&conn), w, rx));
        tokio::spawn(read_answers(conn.clone(), r, idle));
        Ok(conn)
    }

    async fn exchange(&self, sent: &mut Sent<'_>) -> Result<Vec<u8>, Failure> {
        let _place = self.places.acquire().await.map_err(|_| Failure::Closed)?;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(Failure::Closed);
            }
            // At most IN_FLIGHT of the 65,536 ids are taken.
            let mut rng = rand::rng();
            let id = loop {
                let id = rng.next_u32() as u16;
                if !st.pending.contains_key(&id) {
                    break id;
                }
            };
            st.pending.insert(id, tx);
            id
        };
        let _pending = Pending { conn: self, id };
        sent.set_id(id);
        let wire = sent.wire();
        let len = u16::try_from(wire.len()).map_err(|_| {
            Failure::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "query over 65535 bytes",
            ))
        })?;
        let mut frame = Vec::with_capacity(wire.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(wire);
        self.frames.send(frame).await.map_err(|_| Failure::Closed)?;
        let answer = rx.await.map_err(|_| Failure::Closed)?;
        sent.accept(&answer).ok_or_else(|| {
            Failure::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "the answer with the id sent does not repeat the question",
            ))
        })
    }

    /// Hands an answer to the query that went out with its id (none: a query that gave
    /// up, and the answer is dropped).
    fn deliver(&self, frame: Vec<u8>) {
        let Some(id) = frame.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return;
        };
        if let Some(tx) = lock(&self.state).pending.remove(&id) {
            let _ = tx.send(frame);
        }
    }

    /// Closed when no query is in flight or waiting for a place; whether it was.
    fn close_if_idle(&self) -> bool {
        let mut st = lock(&self.state);
        if st.pending.is_empty() && self.places.available_permits() == IN_FLIGHT {
            st.closed = true;
            drop(st);
            self.leave_pool();
            return true;
        }
        false
    }

    /// No more queries; those in flight fail (`Failure::Closed`).
    fn close(&self) {
        let pending = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.pending)
        };
        drop(pending);
        self.places.close();
        self.leave_pool();
    }

    fn leave_pool(&self) {
        if let Some(pool) = self.pool.upgrade() {
            leave(&pool, self.server, self.cell);
        }
    }
}

/// Writes the connection's frames in order, each whole.
async fn write_frames(conn: Weak<Conn>, mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = rx.recv().await {
        let written = tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&frame)).await;
        if !matches!(written, Ok(Ok(()))) {
            if let Some(c) = conn.upgrade() {
                c.close();
            }
            return;
        }
    }
}

/// Reads answers and hands each to its query until the server closes the connection, it
/// fails, or it has been without a query for `idle`.
async fn read_answers(conn: Arc<Conn>, mut r: OwnedReadHalf, idle: Duration) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Every whole frame in the buffer; the rest waits for more bytes.
        while let Some(len) = buf
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        {
            if buf.len() < 2 + len {
                break;
            }
            let frame = buf[2..2 + len].to_vec();
            buf.drain(..2 + len);
            conn.deliver(frame);
        }
        buf.reserve(4096);
        // `read_buf` is cancel safe: a timeout loses no byte.
        match tokio::time::timeout(idle, r.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => {
                if conn.close_if_idle() {
                    return;
                }
            }
        }
        if buf.is_empty() && buf.capacity() > 65_536 {
            buf = Vec::new();
        }
    }
    conn.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc as std_mpsc;
    use std::thread;
    use std::time::Instant;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(i: usize) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7);
        let name = Name::from_ascii(format!("q{i}.example.")).unwrap();
        m.add_query(Query::query(name, RecordType::A));
        m.to_vec().unwrap()
    }

    /// Reads one frame, or None at the end of the stream.
    fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut frame = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut frame).ok()?;
        Some(frame)
    }

    /// The answer to a query frame: the same bytes as a response (id and question kept).
    fn answer(s: &mut TcpStream, mut frame: Vec<u8>) {
        frame[2] |= 0x80;
        let mut out = u16::try_from(frame.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(&frame);
        s.write_all(&out).unwrap();
    }

    /// Waits (bounded) until `cond` holds, letting the runtime's other tasks run.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The connection to `server`, once made.
    fn conn(p: &Pipelines, server: SocketAddr) -> Option<Arc<Conn>> {
        lock(&p.pool).get(&server)?.get().cloned()
    }

    async fn ask(p: &Pipelines, server: SocketAddr, i: usize) -> io::Result<Vec<u8>> {
        let q = query(i);
        let mut sent = Sent::new(&q, &mut rand::rng(), false).unwrap();
        p.exchange(&mut sent, server).await
    }

    /// Half again as many queries as a connection takes at once: the server gets
    /// [`IN_FLIGHT`] of them, the others wait for a place, held by the proxy and not sent;
    /// once the server answers, the rest go over the same connection.
    #[tokio::test(flavor = "current_thread")]
    async fn at_most_in_flight_queries_are_out_on_a_connection_and_the_rest_wait() {
        const QUERIES: usize = IN_FLIGHT * 3 / 2;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let (go, answer_now) = std_mpsc::channel::<()>();
        let srv = {
            let received = received.clone();
            thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut held = Vec::new();
                while held.len() < IN_FLIGHT {
                    held.push(read_frame(&mut s).unwrap());
                    received.fetch_add(1, Ordering::SeqCst);
                }
                answer_now.recv().unwrap();
                for frame in held {
                    answer(&mut s, frame);
                }
                for _ in IN_FLIGHT..QUERIES {
                    let frame = read_frame(&mut s).unwrap();
                    answer(&mut s, frame);
                    received.fetch_add(1, Ordering::SeqCst);
                }
                listener.set_nonblocking(true).unwrap();
                // Every query went over the one connection.
                listener.accept().is_err()
            })
        };
        let p = Arc::new(Pipelines::new(None));
        let started = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..QUERIES)
            .map(|i| {
                let (p, started) = (p.clone(), started.clone());
                tokio::spawn(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    ask(&p, server, i).await
                })
            })
            .collect();
        until("the server holding a connection's worth", || {
            received.load(Ordering::SeqCst) == IN_FLIGHT
                && started.load(Ordering::SeqCst) == QUERIES
        })
        .await;
        // Every task ran up to its query's send or its wait for a place.
        tokio::task::yield_now().await;
        let c = conn(&p, server).expect("a connection");
        assert_eq!(lock(&c.state).pending.len(), IN_FLIGHT, "queries out");
        assert_eq!(c.places.available_permits(), 0);
        assert_eq!(
            received.load(Ordering::SeqCst),
            IN_FLIGHT,
            "none sent past the cap"
        );
        go.send(()).unwrap();
        for t in tasks {
            let answer = t.await.unwrap().unwrap();
            assert_eq!(answer[..2], [0, 7], "the client's id back");
        }
        assert_eq!(received.load(Ordering::SeqCst), QUERIES);
        assert!(srv.join().unwrap(), "a second connection was made");
    }

    /// A connection without a query for the idle time is closed by the proxy (the server
    /// reads its end), and the next query opens another; a query in flight for longer
    /// than the idle time keeps its connection.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_idle_for_the_idle_time_is_closed_and_the_next_query_opens_another() {
        let idle = Duration::from_millis(300);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        {
            let (accepted, closed) = (accepted.clone(), closed.clone());
            thread::spawn(move || {
                for s in listener.incoming() {
                    let Ok(mut s) = s else { return };
                    let first = accepted.fetch_add(1, Ordering::SeqCst) == 0;
                    let closed = closed.clone();
                    thread::spawn(move || {
                        while let Some(frame) = read_frame(&mut s) {
                            // The first connection's answer takes more than the idle time.
                            if first {
                                thread::sleep(idle * 2);
                            }
                            answer(&mut s, frame);
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
        }
        let p = Pipelines::with_idle(None, idle);
        let start = Instant::now();
        ask(&p, server, 1).await.unwrap();
        assert!(start.elapsed() >= idle * 2, "the slow answer");
        assert_eq!(
            closed.load(Ordering::SeqCst),
            0,
            "not closed while a query was out"
        );
        until("the idle connection closed", || {
            closed.load(Ordering::SeqCst) == 1 && p.connections() == 0
        })
        .await;
        ask(&p, server, 2).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
        assert_eq!(p.connections(), 1);
    }
}
