//! Prometheus metrics of the DNS proxy, in their own registry (the agent merges it).

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::audit::Verdict;
use crate::cache::Stats;

/// The cache's size gauges (names, IPs, zombies), set when gathered.
struct CacheGauges {
    gauges: [IntGauge; 3],
    stats: Box<dyn Fn() -> Option<Stats> + Send + Sync>,
}

impl Collector for CacheGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges.iter().flat_map(Collector::desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(s) = (self.stats)() {
            for (g, n) in self.gauges.iter().zip([s.names, s.ips, s.zombies]) {
                g.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        self.gauges.iter().flat_map(Collector::collect).collect()
    }
}

/// Handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `verdict` = forwarded|denied|error, `rcode` as sent (or `none`).
    pub queries: IntCounterVec,
    /// `kind` = query|answer.
    pub malformed: IntCounterVec,
    /// `transport` = udp|tcp.
    pub upstream_seconds: HistogramVec,
    pub upstream_failures: IntCounterVec,
    pub datapath_seconds: Histogram,
    pub datapath_timeouts: IntCounter,
    pub datapath_errors: IntCounter,
    pub cache_names: IntGauge,
    pub cache_ips: IntGauge,
    pub cache_zombies: IntGauge,
    pub expirations: IntCounter,
    pub evictions: IntCounter,
    /// Live IPs made zombies by the per-node limit (`max_ips_per_node`).
    pub node_evictions: IntCounter,
    pub persist_errors: IntCounter,
    /// Queries answered `SERVFAIL` at once because `concurrency_limit` queries were in
    /// hand (`limit="global"`), or `client_concurrency_limit` of the client's
    /// (`limit="client"`).
    pub over_limit: IntCounterVec,
    /// Datagrams on an upstream socket that were not the answer to its query (another
    /// id or question, longer than the query allowed): stale, broken or forged.
    pub upstream_unexpected: IntCounter,
    /// Answers released as a known answer's repeat, read after the reply.
    pub known_answers: IntCounter,
    /// The proxy's own time per query: from the query's receipt to the reply's send,
    /// minus the wait for the upstream. A known answer's repeat leaves from within the
    /// upstream exchange: its reply's send is part of that wait.
    pub processing_seconds: Histogram,
    /// One expiry sweep that found something expired: the read of the live connections,
    /// the cache's collection and the hand-off of the removals to the datapath.
    pub sweep_seconds: Histogram,
    /// Series of the per-query path, resolved once (no label hashing per query).
    pub series: Arc<Series>,
}

/// Rcodes with a pre-resolved `queries_total` series; others are resolved per query.
const RCODES: [ResponseCode; 6] = [
    ResponseCode::NoError,
    ResponseCode::FormErr,
    ResponseCode::ServFail,
    ResponseCode::NXDomain,
    ResponseCode::NotImp,
    ResponseCode::Refused,
];
const VERDICTS: [Verdict; 3] = [Verdict::Forwarded, Verdict::Denied, Verdict::Error];

/// The label series every query touches, looked up once at start.
pub struct Series {
    /// `[verdict][rcode index in RCODES, or RCODES.len() for none]`.
    queries: Vec<Vec<IntCounter>>,
    pub malformed_query: IntCounter,
    pub malformed_answer: IntCounter,
    pub upstream_udp: Histogram,
    pub upstream_tcp: Histogram,
    pub over_global_limit: IntCounter,
    pub over_client_limit: IntCounter,
}

impl Metrics {
    /// Counts one query by verdict and the rcode sent (None: no reply was sent).
    pub fn count_query(&self, verdict: Verdict, rcode: Option<ResponseCode>) {
        let v = VERDICTS.iter().position(|x| *x == verdict).unwrap_or(0);
        let r = match rcode {
            None => Some(RCODES.len()),
            Some(rc) => RCODES.iter().position(|x| *x == rc),
        };
        match r.and_then(|r| self.series.queries.get(v)?.get(r)) {
            Some(c) => c.inc(),
            None => self
                .queries
                .with_label_values(&[verdict_label(verdict), &rcode_label(rcode)])
                .inc(),
        }
    }
}

/// The `verdict` label of a verdict.
pub fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Forwarded => "forwarded",
        Verdict::Denied => "denied",
        Verdict::Error => "error",
    }
}

/// The `rcode` label (and audit field) of the rcode sent: `NoError`, `Refused`, ...
pub fn rcode_label(rcode: Option<ResponseCode>) -> String {
    rcode.map_or_else(|| "none".to_string(), |r| format!("{r:?}"))
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("ward").subsystem("dns")
}

/// Buckets of the processing time: microseconds matter there.
fn fine_hopts(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("ward")
        .subsystem("dns")
        .buckets(vec![
            0.000_002, 0.000_004, 0.000_006, 0.000_008, 0.000_01, 0.000_012, 0.000_015, 0.000_02,
            0.000_025, 0.000_03, 0.000_04, 0.000_05, 0.000_075, 0.000_1, 0.000_15, 0.000_2,
            0.000_3, 0.000_5, 0.001, 0.002_5, 0.01, 0.1,
        ])
}

fn hopts(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("ward")
        .subsystem("dns")
        .buckets(vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5, 10.0,
        ])
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let queries = IntCounterVec::new(
            opts("queries_total", "DNS queries by verdict and rcode sent"),
            &["verdict", "rcode"],
        )?;
        let malformed = IntCounterVec::new(
            opts("malformed_total", "Malformed DNS messages by kind"),
            &["kind"],
        )?;
        let upstream_seconds = HistogramVec::new(
            hopts(
                "upstream_seconds",
                "Upstream round trip of forwarded queries",
            ),
            &["transport"],
        )?;
        let over_limit = IntCounterVec::new(
            opts(
                "concurrency_limited_total",
                "Queries answered SERVFAIL at once because a concurrency limit was reached",
            ),
            &["limit"],
        )?;
        let mut by_verdict = Vec::new();
        for v in VERDICTS {
            let mut row = Vec::new();
            for r in RCODES.iter().map(|r| Some(*r)).chain([None]) {
                row.push(
                    queries.get_metric_with_label_values(&[verdict_label(v), &rcode_label(r)])?,
                );
            }
            by_verdict.push(row);
        }
        let series = Arc::new(Series {
            queries: by_verdict,
            malformed_query: malformed.get_metric_with_label_values(&["query"])?,
            malformed_answer: malformed.get_metric_with_label_values(&["answer"])?,
            upstream_udp: upstream_seconds.get_metric_with_label_values(&["udp"])?,
            upstream_tcp: upstream_seconds.get_metric_with_label_values(&["tcp"])?,
            over_global_limit: over_limit.get_metric_with_label_values(&["global"])?,
            over_client_limit: over_limit.get_metric_with_label_values(&["client"])?,
        });
        let m = Metrics {
            registry: Registry::new(),
            queries,
            malformed,
            upstream_seconds,
            upstream_failures: IntCounterVec::new(
                opts("upstream_failures_total", "Upstream errors and timeouts"),
                &["reason"],
            )?,
            datapath_seconds: Histogram::with_opts(hopts(
                "datapath_update_seconds",
                "Time from answer to datapath confirmation",
            ))?,
            datapath_timeouts: IntCounter::with_opts(opts(
                "datapath_update_timeouts_total",
                "Answers released before the datapath confirmed (bounded wait exceeded)",
            ))?,
            datapath_errors: IntCounter::with_opts(opts(
                "datapath_update_errors_total",
                "Datapath updates that failed",
            ))?,
            cache_names: IntGauge::with_opts(opts("cache_names", "Names with live IPs"))?,
            cache_ips: IntGauge::with_opts(opts("cache_ips", "Live IPs in the FQDN cache"))?,
            cache_zombies: IntGauge::with_opts(opts(
                "cache_zombies",
                "Expired or evicted IPs kept because a connection may use them",
            ))?,
            expirations: IntCounter::with_opts(opts(
                "cache_expirations_total",
                "IPs removed from the FQDN cache",
            ))?,
            evictions: IntCounter::with_opts(opts(
                "cache_evictions_total",
                "IPs evicted by the per-name limit",
            ))?,
            node_evictions: IntCounter::with_opts(opts(
                "cache_node_evictions_total",
                "IPs evicted by the per-node limit",
            ))?,
            persist_errors: IntCounter::with_opts(opts(
                "persist_errors_total",
                "Failed writes of the FQDN cache",
            ))?,
            over_limit,
            upstream_unexpected: IntCounter::with_opts(opts(
                "upstream_unexpected_total",
                "Datagrams on an upstream socket that were not the answer to its query",
            ))?,
            known_answers: IntCounter::with_opts(opts(
                "known_answers_total",
                "Answers that repeated a known one and left before they were read",
            ))?,
            processing_seconds: Histogram::with_opts(fine_hopts(
                "processing_seconds",
                "The proxy's own time per query: receipt to reply, minus the upstream wait",
            ))?,
            sweep_seconds: Histogram::with_opts(hopts(
                "cache_sweep_seconds",
                "Expiry sweeps: live connections read, cache collected, removals handed over",
            ))?,
            series,
        };
        let r = &m.registry;
        r.register(Box::new(m.queries.clone()))?;
        r.register(Box::new(m.malformed.clone()))?;
        r.register(Box::new(m.upstream_seconds.clone()))?;
        r.register(Box::new(m.upstream_failures.clone()))?;
        r.register(Box::new(m.datapath_seconds.clone()))?;
        r.register(Box::new(m.datapath_timeouts.clone()))?;
        r.register(Box::new(m.datapath_errors.clone()))?;
        r.register(Box::new(m.expirations.clone()))?;
        r.register(Box::new(m.evictions.clone()))?;
        r.register(Box::new(m.node_evictions.clone()))?;
        r.register(Box::new(m.persist_errors.clone()))?;
        r.register(Box::new(m.over_limit.clone()))?;
        r.register(Box::new(m.upstream_unexpected.clone()))?;
        r.register(Box::new(m.known_answers.clone()))?;
        r.register(Box::new(m.processing_seconds.clone()))?;
        r.register(Box::new(m.sweep_seconds.clone()))?;
        Ok(m)
    }

    /// The text exposition of every metric.
    /// Registers the cache's size gauges (`cache_names`, `cache_ips`, `cache_zombies`),
    /// set from `stats` when the registry is gathered: counting walks the whole cache,
    /// which at every answer that changed it cost a tenth of the proxy's time under
    /// SaaS churn, and a scrape is rare. `stats` gives None once the cache is gone.
    pub fn register_cache_gauges(
        &self,
        stats: impl Fn() -> Option<Stats> + Send + Sync + 'static,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(CacheGauges {
            gauges: [
                self.cache_names.clone(),
                self.cache_ips.clone(),
                self.cache_zombies.clone(),
            ],
            stats: Box::new(stats),
        }))
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = prometheus::Encoder::encode(&enc, &self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
