//! Prometheus metrics of the DNS proxy, in their own registry (the agent merges it).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

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
    pub audit_dropped: IntCounter,
    pub cache_names: IntGauge,
    pub cache_ips: IntGauge,
    pub cache_zombies: IntGauge,
    pub expirations: IntCounter,
    pub evictions: IntCounter,
    pub persist_errors: IntCounter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("ward").subsystem("dns")
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
        let m = Metrics {
            registry: Registry::new(),
            queries: IntCounterVec::new(
                opts("queries_total", "DNS queries by verdict and rcode sent"),
                &["verdict", "rcode"],
            )?,
            malformed: IntCounterVec::new(
                opts("malformed_total", "Malformed DNS messages by kind"),
                &["kind"],
            )?,
            upstream_seconds: HistogramVec::new(
                hopts(
                    "upstream_seconds",
                    "Upstream round trip of forwarded queries",
                ),
                &["transport"],
            )?,
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
            audit_dropped: IntCounter::with_opts(opts(
                "audit_dropped_total",
                "Audit records dropped because the channel was full",
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
            persist_errors: IntCounter::with_opts(opts(
                "persist_errors_total",
                "Failed writes of the FQDN cache",
            ))?,
        };
        let r = &m.registry;
        r.register(Box::new(m.queries.clone()))?;
        r.register(Box::new(m.malformed.clone()))?;
        r.register(Box::new(m.upstream_seconds.clone()))?;
        r.register(Box::new(m.upstream_failures.clone()))?;
        r.register(Box::new(m.datapath_seconds.clone()))?;
        r.register(Box::new(m.datapath_timeouts.clone()))?;
        r.register(Box::new(m.datapath_errors.clone()))?;
        r.register(Box::new(m.audit_dropped.clone()))?;
        r.register(Box::new(m.cache_names.clone()))?;
        r.register(Box::new(m.cache_ips.clone()))?;
        r.register(Box::new(m.cache_zombies.clone()))?;
        r.register(Box::new(m.expirations.clone()))?;
        r.register(Box::new(m.evictions.clone()))?;
        r.register(Box::new(m.persist_errors.clone()))?;
        Ok(m)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = prometheus::Encoder::encode(&enc, &self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
