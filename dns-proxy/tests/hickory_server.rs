//! The proxy in front of an in-process hickory-server authoritative zone (`app.test.`),
//! UDP and TCP on one loopback port.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dns_proxy::Config;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::authority::{Catalog, ZoneType};
use hickory_server::store::in_memory::InMemoryAuthority;
use hickory_server::ServerFuture;

async fn authoritative() -> (std::net::SocketAddr, ServerFuture<Catalog>) {
    let origin = Name::from_ascii("app.test.").unwrap();
    let mut auth = InMemoryAuthority::empty(origin.clone(), ZoneType::Primary, false);
    let soa = SOA::new(
        Name::from_ascii("ns.app.test.").unwrap(),
        Name::from_ascii("admin.app.test.").unwrap(),
        1,
        3600,
        600,
        86400,
        30,
    );
    auth.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
    for (name, ip) in [
        ("www.app.test.", "192.0.2.140"),
        ("www.app.test.", "192.0.2.141"),
    ] {
        let rec = Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            45,
            RData::A(A(ip.parse().unwrap())),
        );
        auth.upsert_mut(rec, 1);
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(auth)]);
    let (udp, tcp) = bind_pair().await;
    let addr = udp.local_addr().unwrap();
    let mut server = ServerFuture::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5));
    (addr, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hickory_authoritative_upstream() {
    let (addr, _server) = authoritative().await;
    let h = Harness::start(Config::default(), addr).await;
    for tcp in [false, true] {
        let m = query(h.addr, "WWW.app.test", RecordType::A, tcp).await;
        assert_eq!(m.response_code(), ResponseCode::NoError, "tcp={tcp}");
        let mut got = ips(&m);
        got.sort();
        assert_eq!(got, vec![ip("192.0.2.140"), ip("192.0.2.141")]);
    }
    let mut cached = h.proxy.cached_ips(ENDPOINT, "www.app.test");
    cached.sort();
    assert_eq!(cached, vec![ip("192.0.2.140"), ip("192.0.2.141")]);
    let rec = h.audit_for("www.app.test").await;
    assert_eq!(rec.ttl, Some(45));
    // A name the zone does not have: NXDOMAIN passed through, nothing learned.
    let m = query(h.addr, "nope.app.test", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    assert!(h.proxy.held_ips(ENDPOINT, "nope.app.test").is_empty());
    // Refused by policy before the zone is asked.
    let m = query(h.addr, "www.example.org", RecordType::A, false).await;
    assert_eq!(m.response_code(), ResponseCode::Refused);
}
