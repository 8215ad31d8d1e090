//! The proxy's knobs. Defaults follow Cilium's (`tofqdns-*` options) where one exists.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The response code of a query that policy denies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefuseCode {
    /// `REFUSED` (Cilium's default).
    #[default]
    Refused,
    /// `NXDOMAIN` (Cilium's `nameError`): musl resolvers keep walking the search list.
    Nxdomain,
}

/// Queries in hand at once by default: several times what a busy node has forwarded at
/// once (queries a second times the upstream's latency), and within a process's usual
/// limit of open files once raised from 1,024 (`ward dns-proxy` raises it). dnsmasq
/// forwards at most 150 at once (`dns-forward-max`), Cilium sets no limit by default.
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 1024;

/// Queries in hand at once from one client IP by default: a quarter of the whole, so that
/// one pod flooding a slow zone leaves the others room.
pub const DEFAULT_CLIENT_CONCURRENCY_LIMIT: usize = 256;

/// Live learned IPs per node by default: the datapath's ipcache holds 262,144 addresses
/// (pods and CIDRs share it), and this leaves it room.
pub const DEFAULT_MAX_IPS_PER_NODE: usize = 100_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Rcode of a denied query.
    pub refuse_code: RefuseCode,
    /// Learned IPs live at least this long (seconds), whatever the answer's TTL.
    pub min_ttl: u32,
    /// IPs kept per name per endpoint; the oldest leave first.
    pub max_ips_per_name: usize,
    /// Live IPs kept over the whole node (every endpoint and name); past it the oldest
    /// learned become zombies (removed once no connection uses them) and are counted
    /// (`ward_dns_cache_node_evictions_total`). A `matchPattern` admits unbounded names,
    /// so without it the cache grows with every new name looked up. 0: no limit.
    pub max_ips_per_node: usize,
    /// Also attribute an answer's IPs to every CNAME target in it (see README: trust).
    pub attribute_cname_targets: bool,
    /// How long an answer waits for the datapath to confirm its update.
    #[serde(with = "millis")]
    pub datapath_wait: Duration,
    /// How long an upstream has to answer before the client gets SERVFAIL.
    #[serde(with = "millis")]
    pub upstream_timeout: Duration,
    /// Where the FQDN cache is persisted; None: not persisted.
    pub state_dir: Option<PathBuf>,
    /// How often the cache is written (when it changed) and expired IPs collected.
    #[serde(with = "millis")]
    pub maintenance_interval: Duration,
    /// Names an expiry sweep hands to the datapath at a time: the next slice goes once
    /// the datapath confirmed this one, so an answer waiting for its own update waits
    /// behind at most one slice of removals, never the whole sweep. 0: all at once.
    pub sweep_slice: usize,
    /// Capacity of the audit channel; records beyond it are dropped and counted.
    pub audit_capacity: usize,
    /// `SO_MARK` of upstream sockets, so the datapath does not redirect them again.
    pub upstream_mark: Option<u32>,
    /// Busy polling (see `busy_poll.rs`): after each query the proxy's thread polls its
    /// sockets instead of sleeping for this many microseconds; 0: off. Needs the
    /// proxy's sockets on a current-thread runtime (`ward agent` gives the DNS proxy
    /// its own thread then; `ward dns-proxy` needs `--threads 1`).
    pub busy_poll_us: u64,
    /// How many queries the proxy handles at once (from the parsed query to the reply);
    /// past it a query gets `SERVFAIL` at once (Cilium's `dnsproxy-concurrency-limit`).
    /// Each forwarded UDP query holds a socket: this bounds the proxy's open files. 0: no
    /// limit.
    pub concurrency_limit: usize,
    /// How many of them may come from one client IP at once; past it that client's query
    /// gets `SERVFAIL` at once. 0: no limit.
    pub client_concurrency_limit: usize,
    /// DNS 0x20 (draft-vixie-dnsext-dns0x20): the question's name goes upstream in a random
    /// case that the answer must repeat exactly, more bits for a forger to guess than the
    /// id and port. Off by default: a server that does not echo the case exactly (rare)
    /// would get every query `SERVFAIL`.
    pub randomize_case: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            refuse_code: RefuseCode::Refused,
            min_ttl: 0,
            max_ips_per_name: 1000,
            max_ips_per_node: DEFAULT_MAX_IPS_PER_NODE,
            attribute_cname_targets: false,
            datapath_wait: Duration::from_millis(100),
            upstream_timeout: Duration::from_secs(10),
            state_dir: None,
            maintenance_interval: Duration::from_secs(5),
            sweep_slice: 256,
            audit_capacity: 4096,
            upstream_mark: None,
            busy_poll_us: 0,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
            client_concurrency_limit: DEFAULT_CLIENT_CONCURRENCY_LIMIT,
            randomize_case: false,
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
