//! Writes established TCP flows into a running node's pinned IPv4 conntrack map, so that a
//! load test's conntrack sweeps and the DNS proxy's in-use checks have real work:
//! `ct_fill PIN_ROOT COUNT < pairs`, where each line of the input is `SRC DST` (a local
//! pod and an address it learned). COUNT flows are written, the pairs taken in turn and
//! the source port counting up from 1024, to port 443; each flow was last seen now
//! (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`), so that the agent's idle sweep
//! keeps it. Prints how many entries the map holds afterwards.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::maps::{HashMap, Map, MapData};
use nix::time::{clock_gettime, ClockId};
use redirect_bpf::common::{map_names, CtKeyV4, CtValue};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ct_fill PIN_ROOT COUNT < pairs (lines `SRC DST`)";
    let root = PathBuf::from(args.next().ok_or(usage)?);
    let count: usize = args
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("COUNT: {e}"))?;
    let mut pairs = Vec::new();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| format!("reading the pairs: {e}"))?;
        let mut it = line.split_whitespace();
        let (Some(src), Some(dst)) = (it.next(), it.next()) else {
            continue;
        };
        let parse = |s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|e| format!("line {}: {s:?}: {e}", n + 1))
        };
        pairs.push((parse(src)?, parse(dst)?));
    }
    if pairs.is_empty() && count > 0 {
        return Err("no pairs on the input".into());
    }
    let path = root.join(map_names::CONNTRACK_V4);
    let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut map: HashMap<MapData, CtKeyV4, CtValue> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(|e| format!("{}: {e}", path.display()))?;
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(|e| format!("clock: {e}"))?;
    let now_ns = u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0);
    for i in 0..count {
        let (src, dst) = pairs[i % pairs.len()];
        let sport = 1024u16.wrapping_add((i / pairs.len()) as u16);
        let key = CtKeyV4 {
            saddr: src.octets(),
            daddr: dst.octets(),
            sport: sport.to_be_bytes(),
            dport: 443u16.to_be_bytes(),
            protocol: 6,
            _pad: [0; 3],
        };
        let value = CtValue {
            created_ns: now_ns,
            last_seen_ns: now_ns,
            flags: 0,
            packets: 1,
        };
        map.insert(key, value, 0)
            .map_err(|e| format!("{}: insert: {e}", path.display()))?;
    }
    println!("{}", map.keys().count());
    Ok(())
}
