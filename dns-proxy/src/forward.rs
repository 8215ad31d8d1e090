//! Forwarding a query to the server the client asked, over the client's transport.
//!
//! The upstream never sees the client's query id: each query goes out with a fresh id
//! from a CSPRNG ([`Sent`]), over UDP from a port of its own that the kernel picks at
//! random when the query leaves and that is given up when it ends, on a socket connected
//! to the server ([`crate::udp_pool`]), or over TCP through the server's pipelined
//! connection ([`crate::pipeline`]). An answer counts only when it comes from that
//! server, carries the id sent and repeats the question (with `randomize_case`, DNS 0x20,
//! in the very case sent); anything else on the socket is dropped and counted. The answer
//! then gets the client's id (and case) back and is otherwise passed on unchanged (EDNS
//! and all).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use rand::RngCore;
use tokio::io::Interest;

use crate::busy_poll::{self, BusyPoll};
use crate::pipeline::Pipelines;
use crate::proxy::Transport;
use crate::sink::BoxFuture;
use crate::socket;
use crate::udp_pool::UdpPool;
use crate::wire::{self, HEADER_LEN};

/// Where allowed queries go. The real one is [`Forwarder`]; tests and the fuzz target
/// plug in their own.
pub trait Upstream: Send + Sync + 'static {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>>;

    /// [`Upstream::forward`], showing `watch` the answer as soon as it is read, before
    /// the exchange winds down (socket, timer) and returns it. By default it is not
    /// shown.
    fn forward_watching<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
        watch: &'a dyn WatchAnswer,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        let _ = watch;
        self.forward(query, server, transport)
    }
}

/// Sees an upstream answer (the answer to the query, with the client's id back) the
/// moment it is read: the proxy releases a known answer's repeat from there
/// ([`crate::proxy::Proxy::serve_with`]).
pub trait WatchAnswer: Sync {
    fn answer(&self, answer: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("upstream {0} timed out")]
    Timeout(SocketAddr),
    #[error("query without one question written as labels: not forwarded")]
    BadQuery,
}

impl ForwardError {
    pub fn reason(&self) -> &'static str {
        match self {
            ForwardError::Io { .. } => "io",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::BadQuery => "query",
        }
    }
}

/// One query as it goes upstream, and what an answer must show to be its answer.
///
/// The upstream sees a fresh id (and with case randomisation its name in a random
/// case), never the client's: an attacker who knows the client's query, or sent it,
/// still has to guess the id and the port of a socket that exists only while the query
/// is out (and the case).
#[derive(Debug)]
pub struct Sent<'q> {
    /// The client's query.
    query: &'q [u8],
    /// The bytes that go upstream.
    wire: Vec<u8>,
    /// Where the question's name ends (it starts after the header).
    name_end: usize,
    question_end: usize,
    /// The name's case was randomised: the answer must repeat it exactly.
    exact_case: bool,
    /// The largest UDP answer the query lets the server send.
    max_udp: usize,
}

impl<'q> Sent<'q> {
    /// `query` with an id from `rng` and, when `randomize_case`, each letter of its name
    /// in a case from `rng`. `BadQuery` for a query without one question written as
    /// labels (the proxy only forwards queries it read as having one).
    pub fn new(
        query: &'q [u8],
        rng: &mut dyn RngCore,
        randomize_case: bool,
    ) -> Result<Sent<'q>, ForwardError> {
        let (name_end, question_end) =
            wire::question_bounds(query).ok_or(ForwardError::BadQuery)?;
        let mut sent = Sent {
            query,
            wire: query.to_vec(),
            name_end,
            question_end,
            exact_case: randomize_case,
            max_udp: wire::udp_payload(query, question_end),
        };
        sent.set_id(rng.next_u32() as u16);
        if randomize_case {
            let (mut bits, mut left) = (0u64, 0);
            // Length bytes (below 64) are never letters.
            for b in sent.wire[HEADER_LEN..name_end]
                .iter_mut()
                .filter(|b| b.is_ascii_alphabetic())
            {
                if left == 0 {
                    (bits, left) = (rng.next_u64(), 64);
                }
                if bits & 1 == 1 {
                    *b ^= 0x20;
                }
                (bits, left) = (bits >> 1, left - 1);
            }
        }
        Ok(sent)
    }

    /// The bytes that go upstream.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The id sent.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.wire[0], self.wire[1]])
    }

    /// Sends the query with `id` instead (a pipelined connection's ids must differ).
    pub fn set_id(&mut self, id: u16) {
        self.wire[..2].copy_from_slice(&id.to_be_bytes());
    }

    /// The largest UDP answer the query allows: its EDNS payload size, or 512.
    pub fn max_udp(&self) -> usize {
        self.max_udp
    }

    /// Whether `answer` is the answer to the query as sent: a response with the id sent
    /// and the query's opcode that repeats the question (its name in any case, or exactly
    /// as sent when the case was randomised; type and class exactly). An answer without
    /// a question counts only when it has no answer records (some servers' errors).
    pub fn answers(&self, answer: &[u8]) -> bool {
        let (Some(head), Some(sent)) = (answer.get(..HEADER_LEN), self.wire.get(..HEADER_LEN))
        else {
            return false;
        };
        // Same id, QR set, same opcode.
        if head[..2] != sent[..2] || head[2] & 0x80 == 0 || (head[2] ^ sent[2]) & 0x78 != 0 {
            return false;
        }
        match wire::u16_at(answer, 4) {
            Some(1) => {
                let (Some(a), Some(q)) = (
                    answer.get(HEADER_LEN..self.question_end),
                    self.wire.get(HEADER_LEN..self.question_end),
                ) else {
                    return false;
                };
                let n = self.name_end - HEADER_LEN;
                let name = if self.exact_case {
                    a[..n] == q[..n]
                } else {
                    a[..n].eq_ignore_ascii_case(&q[..n])
                };
                name && a[n..] == q[n..]
            }
            Some(0) => wire::u16_at(answer, 6) == Some(0),
            _ => false,
        }
    }

    /// Makes `answer` (one that [`Sent::answers`]) the client's: the client's id, and
    /// the client's case in its question when the case was randomised.
    pub fn restore(&self, answer: &mut [u8]) {
        if let (Some(id), Some(client)) = (answer.get_mut(..2), self.query.get(..2)) {
            id.copy_from_slice(client);
        }
        if self.exact_case && wire::u16_at(answer, 4) == Some(1) {
            if let (Some(name), Some(client)) = (
                answer.get_mut(HEADER_LEN..self.name_end),
                self.query.get(HEADER_LEN..self.name_end),
            ) {
                name.copy_from_slice(client);
            }
        }
    }

    /// [`Sent::answers`], and then the answer as the client's ([`Sent::restore`]).
    pub fn accept(&self, answer: &[u8]) -> Option<Vec<u8>> {
        if !self.answers(answer) {
            return None;
        }
        let mut a = answer.to_vec();
        self.restore(&mut a);
        Some(a)
    }
}

thread_local! {
    /// Where UDP answers are read into before their size is known; each answer then gets
    /// a buffer of its own size.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65_536]);
}

/// The real upstream: UDP from a port of its own per query (on sockets the pool keeps
/// without a port between queries), TCP over one pipelined connection per server.
#[derive(Debug)]
pub struct Forwarder {
    pub timeout: Duration,
    /// `SO_MARK` of upstream sockets.
    pub mark: Option<u32>,
    /// DNS 0x20: the name goes out in a random case that the answer must repeat.
    randomize_case: bool,
    /// Busy polling: answers are read directly while the window is open.
    busy: Option<Arc<BusyPoll>>,
    /// UDP: a socket and a port of its own per query in flight ([`UdpPool`]).
    udp: UdpPool,
    tcp: Pipelines,
    /// Datagrams on an upstream socket that were not its answer.
    unexpected: IntCounter,
}

impl Upstream for Forwarder {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        Box::pin(self.exchange(query, server, transport, None))
    }

    fn forward_watching<'a>(
        &'a self,
        query: &'a [u8],
        server: SocketAddr,
        transport: Transport,
        watch: &'a dyn WatchAnswer,
    ) -> BoxFuture<'a, Result<Vec<u8>, ForwardError>> {
        Box::pin(self.exchange(query, server, transport, Some(watch)))
    }
}

impl Forwarder {
    pub fn new(
        timeout: Duration,
        mark: Option<u32>,
        busy: Option<Arc<BusyPoll>>,
        randomize_case: bool,
        unexpected: IntCounter,
    ) -> Forwarder {
        Forwarder {
            timeout,
            mark,
            randomize_case,
            busy,
            udp: UdpPool::new(mark, unexpected.clone()),
            tcp: Pipelines::new(mark),
            unexpected,
        }
    }

    /// Sends `query` to `server` and returns the answer to it with the client's id,
    /// shown to `watch` first.
    pub async fn exchange(
        &self,
        query: &[u8],
        server: SocketAddr,
        transport: Transport,
        watch: Option<&dyn WatchAnswer>,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut sent = Sent::new(query, &mut rand::rng(), self.randomize_case)?;
        let io = |source| ForwardError::Io { server, source };
        let fut = async {
            match transport {
                Transport::Udp => self.udp(&sent, server, watch).await,
                Transport::Tcp => {
                    let answer = self.tcp.exchange(&mut sent, server).await?;
                    if let Some(w) = watch {
                        w.answer(&answer);
                    }
                    Ok(answer)
                }
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(io),
            Err(_) => Err(ForwardError::Timeout(server)),
        }
    }

    async fn udp(
        &self,
        sent: &Sent<'_>,
        server: SocketAddr,
        watch: Option<&dyn WatchAnswer>,
    ) -> io::Result<Vec<u8>> {
        let lease = self.udp.take(server)?;
        let sock = lease.socket()?;
        let fd = sock.as_raw_fd();
        if let Err(e) = socket::send_fd_now(fd, sent.wire()) {
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            sock.send(sent.wire()).await?;
        }
        loop {
            let got = busy_poll::recv(self.busy.as_deref(), || self.take_answer(fd, sent)).await;
            let answer = match got {
                Ok(got) => got?,
                Err(wait) => {
                    // An error (the server's port unreachable) wakes the receive too.
                    let got = sock
                        .async_io(Interest::READABLE | Interest::ERROR, || {
                            self.take_answer(fd, sent)
                        })
                        .await;
                    drop(wait);
                    got?
                }
            };
            // Anything but its answer was dropped and counted: keep waiting.
            if let Some(answer) = answer {
                if let Some(w) = watch {
                    w.answer(&answer);
                }
                return Ok(answer);
            }
        }
    }

    /// Reads the datagram waiting on `fd`, if any (`WouldBlock` if none): the answer
    /// with the client's id when it is the answer to `sent`, else None (dropped and
    /// counted: another id or question, or longer than the query allowed).
    fn take_answer(&self, fd: RawFd, sent: &Sent<'_>) -> io::Result<Option<Vec<u8>>> {
        SCRATCH.with_borrow_mut(|buf| {
            let limit = sent.max_udp().min(buf.len() - 1);
            let n = socket::recv_fd_now(fd, &mut buf[..=limit])?;
            let answer = buf
                .get(..n)
                .filter(|_| n <= limit)
                .and_then(|a| sent.accept(a));
            if answer.is_none() {
                self.unexpected.inc();
            }
            Ok(answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    /// A deterministic stand-in for the CSPRNG.
    struct Counter(u64);

    impl RngCore for Counter {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            for b in dst {
                *b = self.next_u32() as u8;
            }
        }
    }

    fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// The server's answer to the bytes it got.
    fn answer(to: &[u8]) -> Vec<u8> {
        let q = Message::from_vec(to).unwrap();
        let mut m = Message::new();
        m.set_id(q.id()).set_message_type(MessageType::Response);
        m.add_queries(q.queries().iter().cloned());
        m.add_answer(Record::from_rdata(
            q.queries()[0].name().clone(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn the_id_sent_is_random_and_the_clients_comes_back() {
        let q = query(0x4242, "www.example.com.", Some(1232));
        let mut rng = Counter(1);
        let sent = Sent::new(&q, &mut rng, false).unwrap();
        assert_ne!(sent.id(), 0x4242);
        assert_eq!(sent.wire()[2..], q[2..], "only the id differs");
        assert_eq!(sent.max_udp(), 1232);
        let ids: std::collections::HashSet<u16> = (0..100)
            .map(|_| Sent::new(&q, &mut rng, false).unwrap().id())
            .collect();
        assert!(ids.len() > 90, "{ids:?}");
        let a = answer(sent.wire());
        let got = sent.accept(&a).expect("the answer to what was sent");
        assert_eq!(got[..2], [0x42, 0x42]);
        assert_eq!(got[2..], a[2..]);
        // The client's id is not the one sent: an answer with it is not the answer.
        let mut with_client_id = a.clone();
        with_client_id[..2].copy_from_slice(&[0x42, 0x42]);
        assert!(!sent.answers(&with_client_id));
        // Nor one with another id, or a query, or another opcode.
        let mut other = a.clone();
        other[1] ^= 1;
        assert!(!sent.answers(&other));
        let mut not_response = a.clone();
        not_response[2] &= 0x7f;
        assert!(!sent.answers(&not_response));
        let mut opcode = a.clone();
        opcode[2] |= 0x10;
        assert!(!sent.answers(&opcode));
        assert!(!sent.answers(&a[..11]));
    }

    #[test]
    fn the_question_must_be_repeated() {
        let q = query(7, "www.example.com.", None);
        let sent = Sent::new(&q, &mut Counter(2), false).unwrap();
        assert_eq!(sent.max_udp(), 512);
        let mut a = answer(sent.wire());
        // Another case is the same name (no case randomisation).
        a[13] = b'W';
        assert!(sent.answers(&a));
        // Another name, type or class is not.
        for at in [14, sent.question_end - 3, sent.question_end - 1] {
            let mut b = answer(sent.wire());
            b[at] ^= 0x01;
            assert!(!sent.answers(&b), "byte {at}");
        }
        // Another question entirely, with the right id.
        let other = query(sent.id(), "evil.example.com.", None);
        assert!(!sent.answers(&answer(&other)));
        // No question: only without answer records.
        let mut bare = answer(sent.wire());
        bare.truncate(HEADER_LEN);
        bare[4..12].fill(0);
        assert!(sent.answers(&bare));
        bare[7] = 1;
        assert!(!sent.answers(&bare));
        // Two questions: no.
        let mut two = answer(sent.wire());
        two[5] = 2;
        assert!(!sent.answers(&two));
    }

    #[test]
    fn randomised_case_must_come_back_exactly_and_the_clients_is_restored() {
        let q = query(9, "www.example.com.", None);
        let mut rng = Counter(3);
        let sent = Sent::new(&q, &mut rng, true).unwrap();
        let (name, client) = (
            &sent.wire()[HEADER_LEN..sent.name_end],
            &q[HEADER_LEN..sent.name_end],
        );
        assert!(name.eq_ignore_ascii_case(client));
        assert_ne!(name, client, "some letters changed case");
        let a = answer(sent.wire());
        let got = sent.accept(&a).expect("the case sent");
        assert_eq!(
            got[HEADER_LEN..sent.name_end],
            *client,
            "the client's case back"
        );
        // The same name in the client's case (or lower case) is not the answer.
        let mut lower = a.clone();
        lower[HEADER_LEN..sent.name_end].make_ascii_lowercase();
        assert!(!sent.answers(&lower));
        let mut clients = a.clone();
        clients[HEADER_LEN..sent.name_end].copy_from_slice(client);
        assert!(!sent.answers(&clients));
        // Over many queries each letter's case varies.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let s = Sent::new(&q, &mut rng, true).unwrap();
            seen.insert(s.wire()[HEADER_LEN..s.name_end].to_vec());
        }
        assert!(seen.len() > 32, "{}", seen.len());
    }

    #[test]
    fn a_query_without_a_plain_question_is_not_sent() {
        let mut q = query(9, "www.example.com.", None);
        q[5] = 0;
        assert!(matches!(
            Sent::new(&q, &mut Counter(4), false),
            Err(ForwardError::BadQuery)
        ));
        let mut pointer = query(9, "www.example.com.", None);
        pointer[HEADER_LEN] = 0xc0;
        assert!(Sent::new(&pointer, &mut Counter(4), false).is_err());
    }
}
