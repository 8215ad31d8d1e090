//! Walking a DNS message's bytes where reading it whole is not needed: where a name ends,
//! where the question ends, what EDNS payload size a query advertises.

/// The length of a DNS header.
pub const HEADER_LEN: usize = 12;

/// The record type of EDNS's OPT record.
pub const TYPE_OPT: u16 = 41;

/// The UDP payload every DNS message may have (RFC 1035), and the least an EDNS
/// advertisement means (RFC 6891 6.2.5).
pub const MIN_UDP: usize = 512;

/// The big-endian u16 at `at`.
pub fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// The position after the name at `p`: labels up to the root, or up to a pointer.
pub fn skip_name(msg: &[u8], mut p: usize) -> Option<usize> {
    loop {
        let len = *msg.get(p)?;
        match len >> 6 {
            0 if len == 0 => return Some(p + 1),
            0 => p += 1 + usize::from(len),
            // A compression pointer ends the name.
            3 => return Some(p + 2),
            _ => return None,
        }
    }
}

/// Where the name of the (single) question ends and where the question ends, for a
/// message with one question written as labels (no compression pointer: nothing comes
/// before it that a pointer could name).
pub fn question_bounds(msg: &[u8]) -> Option<(usize, usize)> {
    if u16_at(msg, 4)? != 1 {
        return None;
    }
    let mut p = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(p)?);
        if len == 0 {
            break;
        }
        if len >= 64 {
            return None;
        }
        p += 1 + len;
    }
    let name_end = p + 1;
    let end = name_end + 4;
    (end <= msg.len()).then_some((name_end, end))
}

/// The UDP payload size a query lets its answer have: its EDNS record's (at least 512),
/// or 512 without one (or when the records do not walk).
pub fn udp_payload(msg: &[u8], question_end: usize) -> usize {
    let count = |at| u16_at(msg, at).map_or(0, usize::from);
    let records = count(6) + count(8) + count(10);
    let mut p = question_end;
    for _ in 0..records {
        let Some(after_name) = skip_name(msg, p) else {
            return MIN_UDP;
        };
        let (Some(rtype), Some(class), Some(rdlen)) = (
            u16_at(msg, after_name),
            u16_at(msg, after_name + 2),
            u16_at(msg, after_name + 8),
        ) else {
            return MIN_UDP;
        };
        if rtype == TYPE_OPT {
            return usize::from(class).max(MIN_UDP);
        }
        p = after_name + 10 + usize::from(rdlen);
    }
    MIN_UDP
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn question_bounds_and_payload() {
        let q = query("www.example.com.", Some(1232));
        let (name_end, end) = question_bounds(&q).unwrap();
        assert_eq!(name_end, HEADER_LEN + 17);
        assert_eq!(end, name_end + 4);
        assert_eq!(udp_payload(&q, end), 1232);
        let q = query("www.example.com.", None);
        assert_eq!(udp_payload(&q, question_bounds(&q).unwrap().1), 512);
        // Below 512 means 512.
        let q = query("a.", Some(100));
        assert_eq!(udp_payload(&q, question_bounds(&q).unwrap().1), 512);
        let q = query(".", None);
        assert_eq!(question_bounds(&q), Some((13, 17)));
        // Cut short, or no question.
        assert_eq!(question_bounds(&q[..16]), None);
        let mut none = q.clone();
        none[5] = 0;
        assert_eq!(question_bounds(&none), None);
    }
}
