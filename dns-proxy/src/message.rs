//! DNS message helpers: error replies, names as policy reads them.

use hickory_proto::op::{Edns, Header, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::Name;
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

/// A reply with `rcode` and no records to a query with this header and these questions
/// (an EDNS record of our own when the query had one).
pub fn error_reply(
    query: &Header,
    questions: &[Query],
    edns: bool,
    rcode: ResponseCode,
) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(query.id(), query.op_code(), rcode);
    m.set_message_type(MessageType::Response)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled());
    m.add_queries(questions.iter().cloned());
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(OUR_PAYLOAD);
        m.set_edns(e);
    }
    m.to_vec().ok()
}

/// A name as policy matches it: its text as `Name::to_ascii` writes it (escapes and all),
/// lower-cased, with its trailing dot. Names made only of letters, digits, `_`, `-` (not
/// first in a label) and `*` (first) are written straight from their labels; any other
/// goes the long way, through hickory's escaping.
pub fn name_text(name: &Name) -> String {
    if name.num_labels() == 0 {
        return normalize(&name.to_ascii());
    }
    let mut s = String::with_capacity(name.len() + 1);
    for label in name.iter() {
        let plain = !label.is_empty()
            && label.iter().enumerate().all(|(i, &b)| {
                b.is_ascii_alphanumeric()
                    || b == b'_'
                    || (b == b'-' && i > 0)
                    || (b == b'*' && i == 0)
            });
        // A plain label is ASCII, so it is text as it stands.
        let Some(text) = plain.then(|| std::str::from_utf8(label).ok()).flatten() else {
            return normalize(&name.to_ascii());
        };
        s.push_str(text);
        s.push('.');
    }
    // Lower-cased once, in place, rather than char by char.
    s.make_ascii_lowercase();
    s
}

/// Whether two names are the same name: hickory's `Name` equality (labels compared
/// without regard to ASCII case, same number of labels, both fully qualified or neither)
/// without copying each label as that does.
pub fn same_name(a: &Name, b: &Name) -> bool {
    a.is_fqdn() == b.is_fqdn()
        && a.num_labels() == b.num_labels()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.eq_ignore_ascii_case(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names built from wire bytes (labels as given), covering the plain and the escaped
    /// paths.
    fn wire_names() -> Vec<Name> {
        let labels: &[&[&[u8]]] = &[
            &[b"www", b"Example", b"COM"],
            &[b"_sip", b"_tcp", b"x-y", b"z"],
            &[b"*", b"cdn", b"test"],
            &[b"a*b", b"test"],
            &[b"-lead", b"test"],
            &[b"tail-", b"test"],
            &[b"do.t", b"test"],
            &[b"sp ace", b"test"],
            &[b"caf\xc3\xa9", b"test"],
            &[b"xn--caf-dma", b"test"],
            &[b"ctl\x01", b"test"],
            &[b"back\\slash", b"test"],
            &[],
        ];
        labels
            .iter()
            .map(|ls| {
                let mut n = Name::from_labels(ls.iter().copied()).expect("labels");
                n.set_fqdn(true);
                n
            })
            .collect()
    }

    #[test]
    fn name_text_is_normalized_to_ascii() {
        for n in wire_names() {
            assert_eq!(name_text(&n), normalize(&n.to_ascii()), "{n:?}");
        }
        assert_eq!(
            name_text(&Name::from_ascii("WWW.Example.com.").unwrap()),
            "www.example.com."
        );
    }

    #[test]
    fn same_name_is_hickory_equality() {
        let mut names = wire_names();
        let mut relative = Name::from_ascii("www.example.com").unwrap();
        relative.set_fqdn(false);
        names.push(relative);
        names.push(Name::from_ascii("WWW.EXAMPLE.COM.").unwrap());
        names.push(Name::from_ascii("www.example.co.").unwrap());
        names.push(Name::from_ascii("example.com.").unwrap());
        for a in &names {
            for b in &names {
                assert_eq!(same_name(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

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
