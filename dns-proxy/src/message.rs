//! DNS message helpers: error replies and what an answer teaches.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use policy_model::fqdn::normalize;

/// EDNS payload size we advertise in replies we make ourselves.
const OUR_PAYLOAD: u16 = 1232;

/// A FORMERR reply to bytes that do not parse, built from the header alone; None when
/// there is no header or the bytes claim to be a response (never answer those).
pub fn formerr_from_bytes(bytes: &[u8]) -> Option<Vec<u8>> {
    let header = bytes.get(..12)?;
    let (id0, id1, flags0) = (header[0], header[1], header[2]);
    if flags0 & 0x80 != 0 {
        return None;
    }
    // QR=1, opcode kept, RD kept; RA=0, rcode=FORMERR (1); all counts zero.
    let flags0 = 0x80 | (flags0 & 0x79);
    Some(vec![id0, id1, flags0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0])
}

/// A reply to a parsed query with `rcode` and no records.
pub fn error_reply(query: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(query.id(), query.op_code(), rcode);
    m.set_message_type(MessageType::Response)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled());
    m.add_queries(query.queries().iter().cloned());
    if query.extensions().is_some() {
        let mut e = Edns::new();
        e.set_max_payload(OUR_PAYLOAD);
        m.set_edns(e);
    }
    m.to_vec().ok()
}

/// What an answer carries for the FQDN cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub ips: Vec<IpAddr>,
    /// Minimum TTL over the A, AAAA and CNAME records of the answer section.
    pub ttl: u32,
    /// Normalised CNAME targets, in answer order.
    pub cname_targets: Vec<String>,
}

/// The IPs of a NOERROR answer (every A/AAAA of the answer section, whatever its owner
/// name, as Cilium does), the minimum TTL, and the CNAME targets.
pub fn learned(answer: &Message) -> Learned {
    let mut l = Learned::default();
    if answer.response_code() != ResponseCode::NoError {
        return l;
    }
    let mut ttl: Option<u32> = None;
    for r in answer.answers() {
        let ip = match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            RData::CNAME(c) => {
                let t = normalize(&c.0.to_ascii());
                if !l.cname_targets.contains(&t) {
                    l.cname_targets.push(t);
                }
                None
            }
            _ => None,
        };
        if matches!(
            r.record_type(),
            RecordType::A | RecordType::AAAA | RecordType::CNAME
        ) {
            ttl = Some(ttl.map_or(r.ttl(), |t| t.min(r.ttl())));
        }
        if let Some(ip) = ip {
            if !l.ips.contains(&ip) {
                l.ips.push(ip);
            }
        }
    }
    l.ttl = ttl.unwrap_or(0);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formerr_from_garbage() {
        assert_eq!(formerr_from_bytes(&[1, 2, 3]), None);
        let r = formerr_from_bytes(&[0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff]).unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.id(), 0xabcd);
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        assert!(m.recursion_desired());
        // responses are never answered
        assert_eq!(
            formerr_from_bytes(&[0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
    }
}
