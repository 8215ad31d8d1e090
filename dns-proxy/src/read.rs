//! Reading a query and its answer in one pass each: every record is read and checked as
//! hickory's `Message::from_vec` checks it, but only what the proxy decides on is kept
//! (the header, the question, whether there is EDNS, and an answer's A/AAAA/CNAME data).
//!
//! Why not `Message`: building it costs each message four vectors, a copy of its EDNS
//! options and a second walk to pick the answers out (about 4k instructions a query for
//! the two messages); on a cold cache every line of that is paid for in latency.

use std::net::IpAddr;

use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_proto::ProtoError;

use crate::message::{error_reply, formerr_from_bytes, name_text, same_name};

/// A query of the usual shape: a query (not a response), opcode QUERY, one question.
#[derive(Clone, Debug)]
pub struct QueryRead {
    pub header: Header,
    pub question: Query,
    /// Whether it carries an EDNS (OPT) record; a reply made for it then carries one too.
    pub edns: bool,
    /// Where the question ends in the query's bytes (it starts after the header); 0 when
    /// not known.
    question_end: usize,
}

impl QueryRead {
    /// The question's bytes in `query_bytes` (the bytes this was read from), as the
    /// query wrote them; None when not known.
    pub fn question_bytes<'a>(&self, query_bytes: &'a [u8]) -> Option<&'a [u8]> {
        query_bytes.get(HEADER_LEN..self.question_end()?)
    }

    /// Where the question ends in the query's bytes, when known.
    pub fn question_end(&self) -> Option<usize> {
        (self.question_end > HEADER_LEN).then_some(self.question_end)
    }

    /// A reply to this query with `rcode` and no records.
    pub fn error_reply(&self, rcode: ResponseCode) -> Option<Vec<u8>> {
        error_reply(
            &self.header,
            std::slice::from_ref(&self.question),
            self.edns,
            rcode,
        )
    }
}

/// Why a query is not of the usual shape, and what to reply.
#[derive(Debug)]
pub struct Unusual {
    pub reason: String,
    /// None: not answered at all (bytes without a header, or a response).
    pub reply: Option<Vec<u8>>,
    pub rcode: ResponseCode,
}

/// Reads a query. Of the usual shape it is read in one pass; anything else (rare) is
/// parsed whole, which says why it is refused: FORMERR for bytes that do not parse, bytes
/// after the message (they would go upstream unchecked) or a query without exactly one
/// question, NOTIMP for another opcode, no answer at all to a
/// response (that is how reflection loops start).
pub fn read_query(bytes: &[u8]) -> Result<QueryRead, Unusual> {
    if let Some(q) = read_usual_query(bytes) {
        return Ok(q);
    }
    let mut d = BinDecoder::new(bytes);
    let msg = match Message::read(&mut d) {
        // Bytes after the message would reach the upstream unchecked.
        Ok(_) if !d.is_empty() => {
            return Err(Unusual {
                reason: format!("malformed query: {} bytes after the message", d.len()),
                reply: formerr_from_bytes(bytes),
                rcode: ResponseCode::FormErr,
            })
        }
        Ok(msg) => msg,
        Err(e) => {
            return Err(Unusual {
                reason: format!("malformed query: {e}"),
                reply: formerr_from_bytes(bytes),
                rcode: ResponseCode::FormErr,
            })
        }
    };
    if msg.message_type() != MessageType::Query {
        return Err(Unusual {
            reason: "a response, not a query".into(),
            reply: None,
            rcode: ResponseCode::NoError,
        });
    }
    let edns = msg.extensions().is_some();
    match msg.queries() {
        [question] if msg.op_code() == OpCode::Query => Ok(QueryRead {
            // Not reached while the one-pass reader agrees with `Message` (tested); if
            // they ever disagree, the whole parse decides.
            header: *msg.header(),
            question: question.clone(),
            edns,
            question_end: 0,
        }),
        queries => {
            let rcode = if msg.op_code() == OpCode::Query {
                ResponseCode::FormErr
            } else {
                ResponseCode::NotImp
            };
            Err(Unusual {
                reason: "not a query with exactly one question".into(),
                reply: error_reply(msg.header(), queries, edns, rcode),
                rcode,
            })
        }
    }
}

/// The one-pass read of a query of the usual shape; None for anything else.
fn read_usual_query(bytes: &[u8]) -> Option<QueryRead> {
    let mut d = BinDecoder::new(bytes);
    let mut header = Header::read(&mut d).ok()?;
    if header.message_type() != MessageType::Query
        || header.op_code() != OpCode::Query
        || header.query_count() != 1
    {
        return None;
    }
    let question = Query::read(&mut d).ok()?;
    let question_end = d.index();
    let opt = read_records(&mut d, &header, |_| {}).ok()?;
    if !d.is_empty() {
        return None;
    }
    if let Some(opt_ttl) = opt {
        merge_rcode_high(&mut header, opt_ttl);
    }
    Some(QueryRead {
        header,
        question,
        edns: opt.is_some(),
        question_end,
    })
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

/// An upstream answer as the proxy uses it.
#[derive(Clone, Debug)]
pub struct AnswerRead {
    /// The response code, with EDNS's high bits.
    pub rcode: ResponseCode,
    /// Of a NOERROR answer: every A/AAAA of the answer section, whatever its owner name
    /// (as Cilium does), the minimum TTL and the CNAME targets; otherwise empty.
    pub learned: Learned,
}

/// Reads the upstream's answer to `query` (read from `query_bytes`) in one pass. None when
/// it does not parse or is not the answer to this query: not a response, another id, or
/// another question (an answer without a question must have no answers).
pub fn read_answer(bytes: &[u8], query_bytes: &[u8], query: &QueryRead) -> Option<AnswerRead> {
    let mut d = BinDecoder::new(bytes);
    let header = Header::read(&mut d).ok()?;
    if header.id() != query.header.id() || header.message_type() != MessageType::Response {
        return None;
    }
    match header.query_count() {
        0 if header.answer_count() == 0 => {}
        1 if same_question_bytes(bytes, query_bytes, query.question_end) => {
            d.read_slice(query.question_end - HEADER_LEN).ok()?;
        }
        1 => {
            let q = Query::read(&mut d).ok()?;
            let asked = &query.question;
            // Name equality is case-insensitive.
            if q.query_type() != asked.query_type()
                || q.query_class() != asked.query_class()
                || !same_name(q.name(), asked.name())
            {
                return None;
            }
        }
        _ => return None,
    }
    read_learned(&mut d, header)
}

/// Reads an answer whose question is known to be the query's (a known answer's repeat,
/// [`crate::known`]): as [`read_answer`] does, without a query to compare with.
pub fn read_repeat(bytes: &[u8]) -> Option<AnswerRead> {
    let mut d = BinDecoder::new(bytes);
    let header = Header::read(&mut d).ok()?;
    if header.message_type() != MessageType::Response || header.query_count() != 1 {
        return None;
    }
    Query::read(&mut d).ok()?;
    read_learned(&mut d, header)
}

/// Reads an answer's records after its question: what it teaches.
fn read_learned(d: &mut BinDecoder<'_>, mut header: Header) -> Option<AnswerRead> {
    let mut l = Learned::default();
    let mut ttl: Option<u32> = None;
    let opt = read_records(d, &header, |r| {
        let ip = match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            RData::CNAME(c) => {
                let t = name_text(&c.0);
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
    })
    .ok()?;
    if let Some(opt_ttl) = opt {
        merge_rcode_high(&mut header, opt_ttl);
    }
    let rcode = header.response_code();
    if rcode != ResponseCode::NoError {
        l = Learned::default();
    } else {
        l.ttl = ttl.unwrap_or(0);
    }
    Some(AnswerRead { rcode, learned: l })
}

/// The length of a DNS header; the question follows it.
pub const HEADER_LEN: usize = 12;

/// Whether the answer's question is written as the query's (a server echoes it): the same
/// bytes but for the name's ASCII case, the type and class exactly. Then it is the same
/// question without reading it; otherwise (a compressed name, say) it is read and
/// compared as names. A length byte (below 64) is never changed by ASCII case.
fn same_question_bytes(answer: &[u8], query: &[u8], question_end: usize) -> bool {
    let (Some(a), Some(q)) = (
        answer.get(HEADER_LEN..question_end),
        query.get(HEADER_LEN..question_end),
    ) else {
        return false;
    };
    let name_len = a.len().saturating_sub(4);
    !a.is_empty()
        && a[..name_len].eq_ignore_ascii_case(&q[..name_len])
        && a[name_len..] == q[name_len..]
}

/// Gives `header` the response code's high bits, which EDNS carries in the top byte of
/// the OPT record's TTL.
fn merge_rcode_high(header: &mut Header, opt_ttl: u32) {
    header.merge_response_code(opt_ttl.to_be_bytes()[0]);
}

/// Reads the answer, authority and additional records after the question as
/// `Message::read` does: each through `Record::read`, and at most one OPT record in the
/// additional section (an OPT elsewhere is an ordinary record). Each answer-section
/// record goes to `answer`; the OPT record's TTL (EDNS version, flags and the response
/// code's high bits) is returned when there is one.
///
/// hickory's DNSSEC features, which would add rules for SIG and TSIG records, are not
/// built; the test against `Message::from_vec` would notice if they were.
fn read_records(
    d: &mut BinDecoder<'_>,
    header: &Header,
    mut answer: impl FnMut(&Record),
) -> Result<Option<u32>, ProtoError> {
    for _ in 0..header.answer_count() {
        answer(&Record::read(d)?);
    }
    for _ in 0..header.name_server_count() {
        Record::read(d)?;
    }
    let mut opt = None;
    for _ in 0..header.additional_count() {
        let r = Record::read(d)?;
        if r.record_type() == RecordType::OPT {
            if opt.is_some() {
                return Err("more than one edns record present".into());
            }
            opt = Some(r.ttl());
        }
    }
    Ok(opt)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    use hickory_proto::op::Edns;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, OPT, TXT};
    use hickory_proto::rr::{DNSClass, Name};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).expect("name")
    }

    fn query_msg(qname: &str, qtype: RecordType, edns: bool) -> Message {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name(qname), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m
    }

    fn record(owner: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(name(owner), ttl, data)
    }

    /// The answer to `q` with these answer records and response code.
    fn answer_msg(q: &Message, answers: Vec<Record>, rcode: ResponseCode) -> Message {
        let mut m = Message::new();
        m.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_response_code(rcode)
            .add_queries(q.queries().iter().cloned())
            .add_answers(answers);
        m
    }

    /// Queries and answers of every shape the proxy meets, as bytes.
    fn corpus() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut queries = Vec::new();
        for (qname, qtype, edns) in [
            ("www.example.com.", RecordType::A, false),
            ("WWW.Example.COM.", RecordType::AAAA, true),
            ("_sip._tcp.example.com.", RecordType::SRV, true),
            (".", RecordType::NS, false),
            ("txt.example.", RecordType::TXT, false),
        ] {
            queries.push(query_msg(qname, qtype, edns));
        }
        let base = query_msg("www.example.com.", RecordType::A, true);
        let mut two = base.clone();
        two.add_query(Query::query(name("b.example."), RecordType::A));
        queries.push(two);
        let mut none = base.clone();
        none.take_queries();
        queries.push(none);
        for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
            let mut m = base.clone();
            m.set_op_code(op);
            queries.push(m);
        }
        let mut response = base.clone();
        response.set_message_type(MessageType::Response);
        queries.push(response);
        let mut with_answer = base.clone();
        with_answer.add_answer(record(
            "www.example.com.",
            5,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        queries.push(with_answer);

        let mut answers = Vec::new();
        let a = |o: &str, ip: [u8; 4]| record(o, 300, RData::A(A::new(ip[0], ip[1], ip[2], ip[3])));
        answers.push(answer_msg(
            &base,
            vec![
                record(
                    "www.example.com.",
                    60,
                    RData::CNAME(CNAME(name("Edge.CDN.test."))),
                ),
                record(
                    "edge.cdn.test.",
                    30,
                    RData::CNAME(CNAME(name("x.cdn.test."))),
                ),
                a("x.cdn.test.", [192, 0, 2, 1]),
                a("x.cdn.test.", [192, 0, 2, 1]),
                record("x.cdn.test.", 20, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))),
                record("x.cdn.test.", 1, RData::TXT(TXT::new(vec!["t".into()]))),
            ],
            ResponseCode::NoError,
        ));
        answers.push(answer_msg(&base, vec![], ResponseCode::NXDomain));
        answers.push(answer_msg(
            &base,
            vec![a("www.example.com.", [198, 51, 100, 7])],
            ResponseCode::ServFail,
        ));
        let mut extended = answer_msg(
            &base,
            vec![a("www.example.com.", [203, 0, 113, 9])],
            ResponseCode::NoError,
        );
        // BADVERS (16, which hickory also calls BADSIG): its high bits ride in the OPT
        // record.
        extended.set_response_code(ResponseCode::BADVERS);
        let mut e = Edns::new();
        e.set_rcode_high(ResponseCode::BADVERS.high());
        extended.set_edns(e);
        answers.push(extended);
        let mut with_edns = answer_msg(
            &base,
            vec![a("www.example.com.", [203, 0, 113, 10])],
            ResponseCode::NoError,
        );
        with_edns.set_edns(Edns::new());
        answers.push(with_edns);
        let mut other_id = answers[0].clone();
        other_id.set_id(7);
        answers.push(other_id);
        let mut other_name = answer_msg(
            &query_msg("www.example.org.", RecordType::A, false),
            vec![],
            ResponseCode::NoError,
        );
        other_name.set_id(base.id());
        answers.push(other_name);
        let mut other_type = answer_msg(
            &query_msg("www.example.com.", RecordType::AAAA, false),
            vec![],
            ResponseCode::NoError,
        );
        other_type.set_id(base.id());
        answers.push(other_type);
        let mut no_question = answers[0].clone();
        no_question.take_queries();
        answers.push(no_question);
        let mut empty = answer_msg(&base, vec![], ResponseCode::Refused);
        empty.take_queries();
        answers.push(empty);
        let mut auth = answer_msg(
            &base,
            vec![a("www.example.com.", [192, 0, 2, 3])],
            ResponseCode::NoError,
        );
        auth.add_name_server(a("ns.example.com.", [192, 0, 2, 53]));
        auth.add_additional(a("ns.example.com.", [192, 0, 2, 54]));
        answers.push(auth);
        let mut opt_in_answers = answer_msg(&base, vec![], ResponseCode::NoError);
        let mut opt = Record::from_rdata(Name::root(), 0, RData::OPT(OPT::default()));
        opt.set_dns_class(DNSClass::for_opt(1232));
        opt_in_answers.add_answer(opt);
        answers.push(opt_in_answers);
        let mut a_query = base.clone();
        a_query.set_message_type(MessageType::Query);
        answers.push(a_query);
        // The question echoed in another case (0x20 randomisation): the same question.
        let mut other_case = answer_msg(
            &query_msg("WwW.ExAmPlE.CoM.", RecordType::A, false),
            vec![a("www.example.com.", [192, 0, 2, 77])],
            ResponseCode::NoError,
        );
        other_case.set_id(base.id());
        answers.push(other_case);

        let bytes = |ms: Vec<Message>| ms.iter().map(|m| m.to_vec().expect("emit")).collect();
        (bytes(queries), bytes(answers))
    }

    /// Every truncation of `bytes`, and every byte of it replaced by a few values.
    fn mutations(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![bytes.to_vec()];
        for len in 0..bytes.len() {
            out.push(bytes[..len].to_vec());
        }
        for i in 0..bytes.len() {
            for v in [0x00, 0x01, 0x29, 0x3f, 0xc0, 0xff, bytes[i] ^ 0x80] {
                let mut b = bytes.to_vec();
                b[i] = v;
                out.push(b);
            }
        }
        out
    }

    /// The query as the proxy took it from a whole `Message`.
    fn query_by_message(bytes: &[u8]) -> Option<(Header, Query, bool)> {
        // The whole message, and nothing after it.
        let mut d = BinDecoder::new(bytes);
        let m = Message::read(&mut d).ok().filter(|_| d.is_empty())?;
        (m.message_type() == MessageType::Query
            && m.op_code() == OpCode::Query
            && m.queries().len() == 1)
            .then(|| {
                (
                    *m.header(),
                    m.queries()[0].clone(),
                    m.extensions().is_some(),
                )
            })
    }

    /// The answer as the proxy took it from a whole `Message`.
    fn answer_by_message(bytes: &[u8], q: &QueryRead) -> Option<(ResponseCode, Learned)> {
        let a = Message::from_vec(bytes).ok()?;
        let answers_question = match a.queries() {
            [] => a.answers().is_empty(),
            [x] => {
                x.query_type() == q.question.query_type()
                    && x.query_class() == q.question.query_class()
                    && x.name() == q.question.name()
            }
            _ => false,
        };
        if a.id() != q.header.id() || a.message_type() != MessageType::Response || !answers_question
        {
            return None;
        }
        let mut l = Learned::default();
        if a.response_code() == ResponseCode::NoError {
            let mut ttl = None;
            for r in a.answers() {
                match r.data() {
                    RData::A(x) => l.ips.push(IpAddr::V4(x.0)),
                    RData::AAAA(x) => l.ips.push(IpAddr::V6(x.0)),
                    RData::CNAME(c) => l.cname_targets.push(name_text(&c.0)),
                    _ => {}
                }
                if matches!(
                    r.record_type(),
                    RecordType::A | RecordType::AAAA | RecordType::CNAME
                ) {
                    ttl = Some(ttl.map_or(r.ttl(), |t: u32| t.min(r.ttl())));
                }
            }
            let mut seen = Vec::new();
            l.ips.retain(|ip| {
                !seen.contains(ip) && {
                    seen.push(*ip);
                    true
                }
            });
            let mut seen = Vec::new();
            l.cname_targets.retain(|t| {
                !seen.contains(t) && {
                    seen.push(t.clone());
                    true
                }
            });
            l.ttl = ttl.unwrap_or(0);
        }
        Some((a.response_code(), l))
    }

    #[test]
    fn one_pass_query_read_agrees_with_message() {
        let (queries, answers) = corpus();
        let mut usual = 0;
        for original in queries.iter().chain(&answers) {
            for b in mutations(original) {
                let ours = read_usual_query(&b).map(|q| (q.header, q.question, q.edns));
                assert_eq!(ours, query_by_message(&b), "{b:02x?}");
                usual += usize::from(ours.is_some());
                // The whole read agrees as well, and always says why it refuses.
                match read_query(&b) {
                    Ok(q) => assert_eq!(Some((q.header, q.question, q.edns)), query_by_message(&b)),
                    Err(u) => {
                        assert!(query_by_message(&b).is_none());
                        assert!(!u.reason.is_empty());
                    }
                }
            }
        }
        // Many of the mutations are still usual queries: the comparison is not vacuous.
        assert!(usual > 1000, "{usual}");
    }

    #[test]
    fn one_pass_answer_read_agrees_with_message() {
        let (queries, answers) = corpus();
        let q = read_usual_query(&queries[0]).expect("usual query");
        let (mut read, mut learned) = (0, 0);
        for original in &answers {
            for b in mutations(original) {
                let ours = read_answer(&b, &queries[0], &q).map(|a| (a.rcode, a.learned));
                assert_eq!(ours, answer_by_message(&b, &q), "{b:02x?}");
                read += usize::from(ours.is_some());
                learned += usize::from(ours.is_some_and(|(_, l)| !l.ips.is_empty()));
            }
        }
        assert!(read > 1000 && learned > 500, "{read} {learned}");
    }

    #[test]
    fn answer_teaches_ips_min_ttl_and_cname_targets() {
        let (queries, answers) = corpus();
        let q = read_usual_query(&queries[0]).expect("usual query");
        let a = read_answer(&answers[0], &queries[0], &q).expect("answer");
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(
            a.learned.ips,
            [
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
        assert_eq!(a.learned.ttl, 20, "the TXT record's TTL does not count");
        assert_eq!(a.learned.cname_targets, ["edge.cdn.test.", "x.cdn.test."]);
        // NXDOMAIN and SERVFAIL teach nothing, whatever they carry.
        for i in [1, 2] {
            let a = read_answer(&answers[i], &queries[0], &q).expect("answer");
            assert_ne!(a.rcode, ResponseCode::NoError);
            assert_eq!(a.learned, Learned::default());
        }
        // The response code's high bits come from EDNS: BADVERS is not NOERROR.
        let a = read_answer(&answers[3], &queries[0], &q).expect("answer");
        assert_eq!(u16::from(a.rcode), 16, "{:?}", a.rcode);
        assert!(a.learned.ips.is_empty());
        // Another id, name or type, or answers without the question: not this answer.
        for i in [5, 6, 7, 8] {
            assert!(
                read_answer(&answers[i], &queries[0], &q).is_none(),
                "answer {i}"
            );
        }
        // No question and no answers (some servers' REFUSED) is an answer.
        assert_eq!(
            read_answer(&answers[9], &queries[0], &q).map(|a| a.rcode),
            Some(ResponseCode::Refused)
        );
        // The question in another case is the same question, and read as bytes.
        let last = answers.last().expect("answers");
        assert!(same_question_bytes(last, &queries[0], q.question_end));
        let a = read_answer(last, &queries[0], &q).expect("same question, other case");
        assert_eq!(a.learned.ips, [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77))]);
    }

    #[test]
    fn unusual_queries_say_why_and_what_to_reply() {
        let (queries, _) = corpus();
        // Two questions, none: FORMERR with the questions given back.
        for i in [5, 6] {
            let u = read_query(&queries[i]).expect_err("unusual");
            assert_eq!(u.rcode, ResponseCode::FormErr);
            let reply = Message::from_vec(&u.reply.expect("reply")).expect("reply parses");
            assert_eq!(reply.queries().len(), if i == 5 { 2 } else { 0 });
            assert!(reply.extensions().is_some(), "EDNS answered with EDNS");
        }
        for i in [7, 8, 9] {
            let u = read_query(&queries[i]).expect_err("unusual");
            assert_eq!(u.rcode, ResponseCode::NotImp, "opcode {i}");
        }
        let u = read_query(&queries[10]).expect_err("a response");
        assert!(u.reply.is_none(), "a response is never answered");
        let u = read_query(&queries[0][..20]).expect_err("cut short");
        assert_eq!(u.rcode, ResponseCode::FormErr);
        assert!(u.reason.starts_with("malformed query"), "{}", u.reason);
        // A query carrying an answer record is still a query.
        assert!(read_query(&queries[11]).is_ok());
        // Bytes after the message (after the question, here): FORMERR, whatever they are.
        for tail in [&[0u8][..], &[0xc0, 0x0c], b"GET / HTTP/1.1\r\n"] {
            let mut b = queries[0].clone();
            b.extend_from_slice(tail);
            let u = read_query(&b).expect_err("trailing bytes");
            assert_eq!(u.rcode, ResponseCode::FormErr);
            assert!(u.reason.contains("after the message"), "{}", u.reason);
            let reply = Message::from_vec(&u.reply.expect("a reply")).expect("parses");
            assert_eq!(reply.id(), 0x1234);
        }
    }
}
