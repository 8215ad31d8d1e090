//! The FQDN load test's two small DNS programs, run as `xtask` subcommands inside the
//! test's namespaces:
//!
//! - `xtask fqdn-upstream LISTEN`: an authoritative server for the generated names
//!   ([`name_index`]). Name `N` (0..10,000) owns ten addresses ([`address`]: 100,000 in
//!   all, from 10.128.0.0/15, data only: nothing routes there); each answer carries two
//!   of them, the pair moving on by one at every query of the name (round-robin DNS), with
//!   the TTL `1 + N % 30` seconds. Other names get NXDOMAIN.
//! - `xtask fqdn-probe SERVER NAMES QPS SECS OUT`: one query at a time, paced at QPS for
//!   SECS, each name of the file in turn; writes `UNIX_MS LATENCY_US` per query to OUT
//!   (`-1` for a query without an answer within a second), so that latency can be read
//!   against time (during the DNS proxy's expiry sweeps).

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Result;

/// Names in the generated set: [`NAMESPACES`] namespaces of [`NAMES_PER_NS`] names.
pub const NAMESPACES: usize = 10;
pub const NAMES_PER_NS: usize = 1_000;
/// Of each namespace's names, the first are `matchName`s, the rest `matchPattern`s.
pub const MATCH_NAMES_PER_NS: usize = 900;
/// Addresses per name (the round-robin ring).
pub const RING: usize = 10;

/// The query name of name `k` of namespace `g`: `n{k}.g{g}.fqdn.test` for a matchName,
/// `h.p{k}.g{g}.fqdn.test` (under the pattern `*.p{k}.g{g}.fqdn.test`) for the others.
pub fn query_name(g: usize, k: usize) -> String {
    if k < MATCH_NAMES_PER_NS {
        format!("n{k}.g{g}.fqdn.test")
    } else {
        format!("h.p{k}.g{g}.fqdn.test")
    }
}

/// The index (`g * NAMES_PER_NS + k`) of a query name from [`query_name`] (any case,
/// trailing dot or not).
pub fn name_index(name: &str) -> Option<usize> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = name.strip_suffix(".fqdn.test")?;
    let mut labels = rest.split('.');
    let first = labels.next()?;
    let (k, g) = match (first, labels.next(), labels.next(), labels.next()) {
        (n, Some(g), None, None) if n.starts_with('n') => (&n[1..], g),
        ("h", Some(p), Some(g), None) if p.starts_with('p') => (&p[1..], g),
        _ => return None,
    };
    let k: usize = k.parse().ok()?;
    let g: usize = g.strip_prefix('g')?.parse().ok()?;
    let matches_kind = (k < MATCH_NAMES_PER_NS) == first.starts_with('n');
    (g < NAMESPACES && k < NAMES_PER_NS && matches_kind).then_some(g * NAMES_PER_NS + k)
}

/// Address `slot` of name `n`: 10.128.0.0 plus `n * RING + slot`.
pub fn address(n: usize, slot: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    Ipv4Addr::from(base + (n * RING + slot % RING) as u32)
}

/// The TTL of name `n`, seconds.
pub fn ttl(n: usize) -> u32 {
    1 + (n % 30) as u32
}

/// The answer to `query` when the name's ring stands at `turn`: the question repeated,
/// two A records (or NXDOMAIN for an unknown name, or an AAAA question: no records).
/// None for a message that is not a plain one-question query.
pub fn answer(query: &[u8], turn: &mut HashMap<usize, usize>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    // the question: labels up to the root, then type and class
    let mut at = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = query.get(at..at + len)?;
        name.push_str(std::str::from_utf8(label).ok()?);
        name.push('.');
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    if query.len() < question_end {
        return None;
    }
    let index = name_index(&name);
    let mut out = Vec::with_capacity(question_end + 32);
    out.extend_from_slice(&query[0..2]);
    // QR, AA, the query's RD; NXDOMAIN when unknown
    let rcode = if index.is_some() { 0 } else { 3 };
    out.push(0x84 | (query[2] & 0x01));
    out.push(rcode);
    let answers: u16 = if index.is_some() && qtype == 1 { 2 } else { 0 };
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..question_end]);
    if let (Some(n), 2) = (index, answers) {
        let t = turn.entry(n).or_insert(0);
        let first = *t;
        *t = (first + 1) % RING;
        for slot in [first, first + 1] {
            out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            out.extend_from_slice(&ttl(n).to_be_bytes());
            out.extend_from_slice(&[0, 4]);
            out.extend_from_slice(&address(n, slot).octets());
        }
    }
    Some(out)
}

/// A query for `name` (type A, recursion desired) with `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// `xtask fqdn-upstream LISTEN`: answers until its socket fails.
pub fn upstream(args: &[String]) -> Result {
    let listen: SocketAddr = args
        .first()
        .ok_or("usage: xtask fqdn-upstream LISTEN")?
        .parse()
        .map_err(|e| format!("fqdn-upstream: LISTEN: {e}"))?;
    let sock = UdpSocket::bind(listen).map_err(|e| format!("fqdn-upstream: bind: {e}"))?;
    let mut turn = HashMap::new();
    let mut buf = [0u8; 1500];
    loop {
        let (n, peer) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("fqdn-upstream: recv: {e}"))?;
        if let Some(reply) = answer(&buf[..n], &mut turn) {
            // a full socket buffer of the client loses that answer only
            let _ = sock.send_to(&reply, peer);
        }
    }
}

/// `xtask fqdn-probe SERVER NAMES QPS SECS OUT`.
pub fn probe(args: &[String]) -> Result {
    const USAGE: &str = "usage: xtask fqdn-probe SERVER NAMES QPS SECS OUT";
    let [server, names, qps, secs, out] = args else {
        return Err(USAGE.into());
    };
    let server: SocketAddr = server.parse().map_err(|e| format!("SERVER: {e}"))?;
    let names: Vec<String> = std::fs::read_to_string(names)
        .map_err(|e| format!("{names}: {e}"))?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if names.is_empty() {
        return Err("fqdn-probe: no names".into());
    }
    let qps: f64 = qps.parse().map_err(|e| format!("QPS: {e}"))?;
    let secs: f64 = secs.parse().map_err(|e| format!("SECS: {e}"))?;
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    sock.connect(server).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?);
    let start = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / qps.max(0.001));
    let mut buf = [0u8; 1500];
    let mut i: usize = 0;
    while start.elapsed().as_secs_f64() < secs {
        let due = start + gap * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = (i % 65_536) as u16;
        let sent_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let t0 = Instant::now();
        sock.send(&query(id, &names[i % names.len()]))
            .map_err(|e| format!("send: {e}"))?;
        let mut latency: Option<Duration> = None;
        while t0.elapsed() < Duration::from_secs(1) {
            match sock.recv(&mut buf) {
                // a late answer of an earlier query is skipped
                Ok(n) if n >= 2 && buf[0..2] == id.to_be_bytes() => {
                    latency = Some(t0.elapsed());
                    break;
                }
                _ => {}
            }
        }
        let us = latency.map_or(-1, |d| d.as_micros() as i64);
        writeln!(file, "{sent_at} {us}").map_err(|e| format!("{out}: {e}"))?;
        i += 1;
    }
    file.flush().map_err(|e| format!("{out}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_index_and_back() {
        assert_eq!(name_index(&query_name(0, 0)), Some(0));
        assert_eq!(name_index("N5.G3.FQDN.TEST."), Some(3005));
        assert_eq!(name_index(&query_name(9, 999)), Some(9999));
        assert_eq!(query_name(2, 950), "h.p950.g2.fqdn.test");
        assert_eq!(name_index("h.p950.g2.fqdn.test"), Some(2950));
        // a matchName index under the pattern form, and the reverse, are not generated
        assert_eq!(name_index("h.p5.g2.fqdn.test"), None);
        assert_eq!(name_index("n950.g2.fqdn.test"), None);
        assert_eq!(name_index("n1.g10.fqdn.test"), None);
        assert_eq!(name_index("n1.g1.other.test"), None);
        assert_eq!(name_index("x.n1.g1.fqdn.test"), None);
    }

    #[test]
    fn addresses_are_distinct_and_in_the_data_range() {
        let mut all = std::collections::HashSet::new();
        for n in 0..NAMESPACES * NAMES_PER_NS {
            for s in 0..RING {
                assert!(all.insert(address(n, s)));
            }
        }
        assert_eq!(all.len(), 100_000);
        let last = address(9_999, 9);
        assert_eq!(last, Ipv4Addr::new(10, 129, 134, 159));
        assert!(all
            .iter()
            .all(|a| a.octets()[0] == 10 && a.octets()[1] & 0xfe == 128));
        assert_eq!((ttl(0), ttl(29), ttl(30)), (1, 30, 1));
    }

    #[test]
    fn answers_rotate_through_the_ring() {
        let mut turn = HashMap::new();
        let q = query(0x1234, "n7.g0.fqdn.test");
        let ips = |a: &[u8]| -> Vec<Ipv4Addr> {
            // header 12 + question (17 + 4), then 16 bytes per record
            let at = 12 + q.len() - 12;
            (0..2)
                .map(|r| {
                    let o = at + r * 16 + 12;
                    Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3])
                })
                .collect()
        };
        let a = answer(&q, &mut turn).expect("answer");
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&a[6..8], &[0, 2], "two answers");
        assert_eq!(ips(&a), vec![address(7, 0), address(7, 1)]);
        let ttl_at = 12 + q.len() - 12 + 6;
        assert_eq!(a[ttl_at..ttl_at + 4], 8u32.to_be_bytes());
        let b = answer(&q, &mut turn).expect("answer");
        assert_eq!(ips(&b), vec![address(7, 1), address(7, 2)]);
        for _ in 0..8 {
            answer(&q, &mut turn);
        }
        assert_eq!(
            ips(&answer(&q, &mut turn).unwrap()),
            vec![address(7, 0), address(7, 1)]
        );
        let nx = answer(&query(1, "nope.test"), &mut turn).expect("answer");
        assert_eq!((nx[3] & 0x0f, &nx[6..8]), (3, &[0u8, 0][..]));
        assert_eq!(answer(&a, &mut turn), None, "an answer is not answered");
        assert_eq!(answer(&q[..14], &mut turn), None, "a cut question");
    }
}
