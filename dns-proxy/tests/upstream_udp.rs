//! The forwarder's UDP exchanges against a server socket on loopback that sees what
//! leaves the proxy and answers as the test says: queries in flight at once leave from
//! ports of their own with ids of their own, only the answer from the queried server with
//! the id sent and the question repeated is taken, and answers to exchanges that ended
//! are never read by later ones. With and without busy polling (the two ways an answer is
//! read).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dns_proxy::busy_poll::BusyPoll;
use dns_proxy::forward::Forwarder;
use dns_proxy::Transport;
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use prometheus::IntCounter;

/// Queries in flight at once.
const QUERIES: usize = 20;
/// The client's id of every query: what the upstream must never see.
const CLIENT_ID: u16 = 0x4242;

fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(CLIENT_ID);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// An answer to `q` with `id`, about `name`, carrying `ip`.
fn answer(q: &Message, id: u16, name: &str, ip: Ipv4Addr) -> Vec<u8> {
    let name = Name::from_ascii(name).unwrap();
    let mut m = Message::new();
    m.set_id(id).set_message_type(MessageType::Response);
    m.add_query(Query::query(name.clone(), q.queries()[0].query_type()));
    m.add_answer(Record::from_rdata(name, 60, RData::A(A(ip))));
    m.to_vec().unwrap()
}

fn name(i: usize) -> String {
    format!("q{i}.example.")
}

/// The queries a server socket received: where each came from and what it was.
fn receive_all(srv: &UdpSocket, n: usize) -> Vec<(SocketAddr, Message)> {
    let mut buf = [0u8; 512];
    (0..n)
        .map(|_| {
            let (len, from) = srv.recv_from(&mut buf).expect("a query within 5 s");
            (from, Message::from_vec(&buf[..len]).unwrap())
        })
        .collect()
}

fn ip_of(answer: &[u8]) -> Ipv4Addr {
    let m = Message::from_vec(answer).unwrap();
    match m.answers()[0].data() {
        RData::A(a) => a.0,
        other => panic!("not an A record: {other:?}"),
    }
}

/// `QUERIES` queries at once through `fwd`; the server answers each (after all arrived)
/// with `ip(i)` behind three forgeries: another id, another question, and the right id
/// and question from another port of the server's address. Returns the exchanges as
/// the server saw them.
async fn round(
    fwd: &Arc<Forwarder>,
    srv: &Arc<UdpSocket>,
    ip: fn(usize) -> Ipv4Addr,
) -> Vec<(SocketAddr, Message)> {
    let to = srv.local_addr().unwrap();
    let server = {
        let srv = srv.clone();
        thread::spawn(move || {
            let seen = receive_all(&srv, QUERIES);
            let elsewhere = UdpSocket::bind("127.0.0.1:0").unwrap();
            for (from, q) in &seen {
                let asked = q.queries()[0].name().to_ascii();
                let i: usize = asked[1..asked.find('.').unwrap()].parse().unwrap();
                let forged = Ipv4Addr::new(203, 0, 113, 66);
                srv.send_to(&answer(q, q.id() ^ 1, &asked, forged), from)
                    .unwrap();
                srv.send_to(&answer(q, q.id(), "evil.example.", forged), from)
                    .unwrap();
                elsewhere
                    .send_to(&answer(q, q.id(), &asked, forged), from)
                    .unwrap();
                srv.send_to(&answer(q, q.id(), &asked, ip(i)), from)
                    .unwrap();
            }
            seen
        })
    };
    let tasks: Vec<_> = (0..QUERIES)
        .map(|i| {
            let fwd = fwd.clone();
            tokio::spawn(async move {
                let q = query(&name(i));
                let a = fwd.exchange(&q, to, Transport::Udp, None).await.unwrap();
                assert_eq!(a[..2], CLIENT_ID.to_be_bytes(), "the client's id back");
                (i, ip_of(&a))
            })
        })
        .collect();
    for t in tasks {
        let (i, got) = t.await.unwrap();
        assert_eq!(got, ip(i), "query {i} got its own answer");
    }
    server.join().unwrap()
}

async fn exchanges(busy: Option<Arc<BusyPoll>>) {
    let srv = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    srv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let unexpected = IntCounter::new("unexpected", "test").unwrap();
    let fwd = Arc::new(Forwarder::new(
        Duration::from_secs(5),
        None,
        busy,
        false,
        unexpected.clone(),
    ));
    let first = round(&fwd, &srv, |i| Ipv4Addr::new(192, 0, 2, i as u8)).await;
    let ports: HashSet<u16> = first.iter().map(|(from, _)| from.port()).collect();
    assert_eq!(ports.len(), QUERIES, "a port per query in flight");
    let pairs: HashSet<(u16, u16)> = first.iter().map(|(f, q)| (f.port(), q.id())).collect();
    assert_eq!(pairs.len(), QUERIES);
    let clients = first.iter().filter(|(_, q)| q.id() == CLIENT_ID).count();
    assert!(
        clients <= 1,
        "{clients} queries went out with the client's id"
    );
    // The forgeries with another id or question reached the query's socket and were
    // dropped; those from another port never reached it (connected sockets).
    assert_eq!(unexpected.get(), 2 * QUERIES as u64);

    // The first round's answers once more, to the ports they went to: whatever of it
    // reaches a socket is dropped, and the next round's queries read only their own.
    for (from, q) in &first {
        let asked = q.queries()[0].name().to_ascii();
        srv.send_to(
            &answer(q, q.id(), &asked, Ipv4Addr::new(192, 0, 2, 250)),
            from,
        )
        .unwrap();
    }
    let second = round(&fwd, &srv, |i| Ipv4Addr::new(198, 51, 100, i as u8)).await;
    let ports: HashSet<u16> = second.iter().map(|(from, _)| from.port()).collect();
    assert_eq!(ports.len(), QUERIES);
    let late_read = unexpected.get() - 4 * QUERIES as u64;
    assert!(
        late_read <= QUERIES as u64,
        "{late_read} more unexpected datagrams than the late answers"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn queries_in_flight_hold_distinct_ports_and_ids_and_take_only_their_answers() {
    exchanges(None).await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_same_with_busy_polling() {
    let busy = BusyPoll::new(Duration::from_millis(2)).unwrap();
    busy.touch();
    tokio::spawn(busy.clone().run());
    exchanges(Some(busy)).await;
}
