//! Answers known ahead. Most answers repeat one an upstream gave before for the same
//! question: the same bytes but for the id and the TTLs, which a cache counts down. Such
//! an answer carries the same records, so it needs no reading on its way back: when the
//! earlier answer was read and handed to the datapath, and the datapath still holds its
//! IPs, the new one leaves as soon as its bytes are compared ([`Known::matches`]). It is
//! read after the reply (the cache's refresh), as any known name's answer is.
//!
//! Comparing bytes is all it takes: the layout of a message (names, types, lengths) is in
//! the bytes compared, so records start at the same places and differ only in their TTLs.
//! The TTL-like field of an EDNS record holds the extended rcode and flags: it is compared.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::wire::{skip_name, HEADER_LEN, TYPE_OPT};

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;

/// An answer read before, as a pattern for the next answers to the same question.
#[derive(Debug)]
pub struct Known {
    /// The answer's bytes, id and TTLs included (they are not compared).
    bytes: Box<[u8]>,
    /// Where each record's TTL is (all sections, not the EDNS record).
    ttls: Vec<usize>,
    /// Where the TTLs of the answer section's A, AAAA and CNAME records are: the ones
    /// the learned TTL is the minimum of.
    learned_ttls: Vec<usize>,
    /// The IPs read from it (every A/AAAA of the answer section).
    pub ips: Vec<IpAddr>,
}

impl Known {
    /// `answer`, read and found to carry `ips`, as a pattern; None for bytes that do not
    /// walk as a DNS message.
    pub fn of(answer: &[u8], ips: Vec<IpAddr>) -> Option<Known> {
        let (ttls, learned_ttls) = ttl_offsets(answer)?;
        Some(Known {
            bytes: answer.into(),
            ttls,
            learned_ttls,
            ips,
        })
    }

    /// Whether `answer` is this one but for its id and TTLs.
    pub fn matches(&self, answer: &[u8]) -> bool {
        if answer.len() != self.bytes.len() || answer.len() < HEADER_LEN {
            return false;
        }
        // Between the id and the first TTL, between TTLs, and after the last one.
        let mut from = 2;
        for &at in &self.ttls {
            if answer.get(from..at) != self.bytes.get(from..at) {
                return false;
            }
            from = at + 4;
        }
        answer.get(from..) == self.bytes.get(from..)
    }

    /// The minimum TTL of the answer section's A, AAAA and CNAME records in `answer` (one
    /// that [`Known::matches`]): what reading it would find.
    pub fn ttl(&self, answer: &[u8]) -> u32 {
        self.learned_ttls
            .iter()
            .filter_map(|&at| answer.get(at..at + 4))
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .min()
            .unwrap_or(0)
    }
}

/// Where the TTLs of `msg`'s records are: of all but EDNS, and of the answer section's
/// A/AAAA/CNAME. None when the bytes do not walk as a DNS message to their end.
fn ttl_offsets(msg: &[u8]) -> Option<(Vec<usize>, Vec<usize>)> {
    let count = |at: usize| Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]));
    let (qd, an, ns, ar) = (count(4)?, count(6)?, count(8)?, count(10)?);
    let mut p = HEADER_LEN;
    for _ in 0..qd {
        p = skip_name(msg, p)? + 4;
    }
    let mut ttls = Vec::new();
    let mut learned = Vec::new();
    for i in 0..usize::from(an) + usize::from(ns) + usize::from(ar) {
        p = skip_name(msg, p)?;
        let rtype = count(p)?;
        let rdlen = usize::from(count(p + 8)?);
        if rtype != TYPE_OPT {
            ttls.push(p + 4);
            if i < usize::from(an) && matches!(rtype, TYPE_A | TYPE_AAAA | TYPE_CNAME) {
                learned.push(p + 4);
            }
        }
        p += 10 + rdlen;
    }
    (p == msg.len()).then_some((ttls, learned))
}

/// Known answers per server and question (the question's bytes as the query wrote
/// them), bounded: past [`LIMIT`] the store starts over, which costs answers a read on
/// their way, never a wrong one.
#[derive(Debug, Default)]
pub struct KnownAnswers {
    map: Mutex<HashMap<SocketAddr, ByQuestion>>,
}

/// The known answers of one server, by question bytes.
type ByQuestion = HashMap<Box<[u8]>, Arc<Known>>;

/// Questions remembered at most.
const LIMIT: usize = 4096;

impl KnownAnswers {
    pub fn get(&self, server: SocketAddr, question: &[u8]) -> Option<Arc<Known>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&server)?.get(question).cloned()
    }

    /// The question is known no more.
    pub fn forget(&self, server: SocketAddr, question: &[u8]) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get_mut(&server) {
            m.remove(question);
        }
    }

    pub fn put(&self, server: SocketAddr, question: &[u8], known: Known) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.values().map(HashMap::len).sum::<usize>() >= LIMIT {
            map.clear();
        }
        map.entry(server)
            .or_default()
            .insert(question.into(), Arc::new(known));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, Query};
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn answer(id: u16, ttls: [u32; 2], ip: [u8; 4]) -> Vec<u8> {
        let name = Name::from_ascii("www.app.test.").unwrap();
        let target = Name::from_ascii("web.app.test.").unwrap();
        let mut m = Message::new();
        m.set_id(id).set_message_type(MessageType::Response);
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name,
            ttls[0],
            RData::CNAME(CNAME(target.clone())),
        ));
        m.add_answer(Record::from_rdata(
            target,
            ttls[1],
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        ));
        m.set_edns(Edns::new());
        m.to_vec().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn matches_the_same_answer_whatever_its_id_and_ttls() {
        let first = answer(1, [300, 60], [192, 0, 2, 1]);
        let k = Known::of(&first, vec![ip("192.0.2.1")]).unwrap();
        assert!(k.matches(&first));
        let later = answer(2, [299, 59], [192, 0, 2, 1]);
        assert!(k.matches(&later));
        // What reading it would find: the minimum over the CNAME and the A.
        assert_eq!(k.ttl(&later), 59);
        assert_eq!(k.ttl(&answer(3, [7, 59], [192, 0, 2, 1])), 7);
    }

    #[test]
    fn does_not_match_another_record_or_extended_rcode() {
        let first = answer(1, [300, 60], [192, 0, 2, 1]);
        let k = Known::of(&first, vec![ip("192.0.2.1")]).unwrap();
        assert!(
            !k.matches(&answer(1, [300, 60], [192, 0, 2, 2])),
            "another IP"
        );
        // The EDNS record ends the message: its TTL field (extended rcode, version,
        // flags) is compared.
        let n = first.len();
        assert_eq!(first[n - 11..n - 8], [0, 0, 41]);
        let mut ext = first.clone();
        ext[n - 6] = 1;
        assert!(!k.matches(&ext), "extended rcode");
        let mut dnssec_ok = first.clone();
        dnssec_ok[n - 4] |= 0x80;
        assert!(!k.matches(&dnssec_ok), "EDNS flags");
        assert!(!k.matches(&first[..first.len() - 1]), "shorter");
        let mut flags = first.clone();
        flags[3] ^= 0x0f; // the rcode
        assert!(!k.matches(&flags));
        let mut case = first.clone();
        case[13] = b'W'; // the question's name, in another case
        assert!(!k.matches(&case));
    }

    #[test]
    fn bytes_that_do_not_walk_make_no_pattern() {
        let first = answer(1, [300, 60], [192, 0, 2, 1]);
        assert!(Known::of(&first[..first.len() - 3], Vec::new()).is_none());
        let mut long = first.clone();
        long.push(0);
        assert!(Known::of(&long, Vec::new()).is_none());
        let mut bad_label = first.clone();
        bad_label[12] = 0x80; // reserved label type
        assert!(Known::of(&bad_label, Vec::new()).is_none());
        assert!(Known::of(&[0u8; 5], Vec::new()).is_none());
    }

    #[test]
    fn the_store_is_per_server_and_question_and_bounded() {
        let store = KnownAnswers::default();
        let a: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let b: SocketAddr = "198.51.100.53:53".parse().unwrap();
        let first = answer(1, [300, 60], [192, 0, 2, 1]);
        store.put(a, b"q1", Known::of(&first, vec![ip("192.0.2.1")]).unwrap());
        assert!(store.get(a, b"q1").is_some());
        assert!(store.get(a, b"q2").is_none());
        assert!(store.get(b, b"q1").is_none());
        for i in 0..LIMIT {
            let q = i.to_be_bytes();
            store.put(b, &q, Known::of(&first, Vec::new()).unwrap());
        }
        assert!(store.get(a, b"q1").is_none(), "started over past the limit");
        let total: usize = store.map.lock().unwrap().values().map(HashMap::len).sum();
        assert!(total <= LIMIT);
    }
}
