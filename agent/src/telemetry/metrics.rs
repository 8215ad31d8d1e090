//! The agent's own metrics, and the one `/metrics` page that joins them with the HTTP
//! proxy's and the DNS proxy's registries.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
/// Name of a datapath drop reason, for labels and events: the datapath's own table.
pub use redirect_bpf::common::drop_reason::name as reason_name;

/// Handles to the agent's metrics; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    /// `ward_policy_drops_total{reason}`: datapath drops by reason (kernel counters).
    pub drops: IntCounterVec,
    /// `ward_datapath_update_errors_total`: map writes or attachments that failed.
    pub update_errors: IntCounter,
    /// `ward_policies_invalid`: policy objects whose newest version is rejected.
    pub policies_invalid: IntGauge,
    /// `ward_policies`: policy objects in force.
    pub policies: IntGauge,
    /// `ward_agent_ready`: 1 once the first full policy is in the datapath.
    pub ready: IntGauge,
    /// `ward_endpoints`: local endpoints in the endpoints map.
    pub endpoints: IntGauge,
    /// `ward_endpoints_attached`: local endpoints whose veth carries the programs.
    pub endpoints_attached: IntGauge,
    /// `ward_policy_pushes_total`: compiled policies pushed to datapath and proxies.
    pub pushes: IntCounter,
    /// `ward_policy_compiles_total{kind}`: models built for pushes, `full` (policy
    /// changes, first push) or `incremental` (pod and namespace churn).
    pub compiles: IntCounterVec,
    /// `ward_policy_push_seconds`: compile + datapath diff + proxy publish.
    pub push_seconds: Histogram,
    /// `ward_datapath_map_writes_total`: map entries written or removed by pushes.
    pub map_writes: IntCounter,
    /// `ward_fqdn_names`: (endpoint, name) pairs with learned IPs.
    pub fqdn_names: IntGauge,
    /// `ward_events_suppressed`: drop events the datapath's rate limit held back.
    pub events_suppressed: IntGauge,
    /// `ward_conntrack_revoked_total`: established flows a policy change denied, whose
    /// conntrack entries were removed so that their next packet is dropped.
    pub conntrack_revoked: IntCounter,
}

impl AgentMetrics {
    pub fn new() -> Result<AgentMetrics, prometheus::Error> {
        let m = AgentMetrics {
            registry: Registry::new(),
            drops: IntCounterVec::new(
                Opts::new("ward_policy_drops_total", "Datapath drops by reason."),
                &["reason"],
            )?,
            update_errors: IntCounter::new(
                "ward_datapath_update_errors_total",
                "Datapath map writes or attachments that failed.",
            )?,
            policies_invalid: IntGauge::new(
                "ward_policies_invalid",
                "Policy objects whose newest version failed validation.",
            )?,
            policies: IntGauge::new("ward_policies", "Policy objects in force.")?,
            ready: IntGauge::new(
                "ward_agent_ready",
                "1 once the first full policy is in the datapath.",
            )?,
            endpoints: IntGauge::new("ward_endpoints", "Local endpoints in the datapath.")?,
            endpoints_attached: IntGauge::new(
                "ward_endpoints_attached",
                "Local endpoints whose host-side veth carries the programs.",
            )?,
            pushes: IntCounter::new(
                "ward_policy_pushes_total",
                "Compiled policies pushed to the datapath and the proxies.",
            )?,
            compiles: IntCounterVec::new(
                Opts::new(
                    "ward_policy_compiles_total",
                    "Models built for pushes: full compiles and incremental updates.",
                ),
                &["kind"],
            )?,
            push_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ward_policy_push_seconds",
                    "Compile, datapath diff and proxy publish of one push.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
            map_writes: IntCounter::new(
                "ward_datapath_map_writes_total",
                "Map entries written or removed by policy pushes.",
            )?,
            fqdn_names: IntGauge::new(
                "ward_fqdn_names",
                "(endpoint, name) pairs with IPs learned from DNS.",
            )?,
            events_suppressed: IntGauge::new(
                "ward_events_suppressed",
                "Drop events held back by the datapath's rate limit.",
            )?,
            conntrack_revoked: IntCounter::new(
                "ward_conntrack_revoked_total",
                "Established flows a policy change denied (conntrack entries removed).",
            )?,
        };
        let r = &m.registry;
        r.register(Box::new(m.drops.clone()))?;
        r.register(Box::new(m.update_errors.clone()))?;
        r.register(Box::new(m.policies_invalid.clone()))?;
        r.register(Box::new(m.policies.clone()))?;
        r.register(Box::new(m.ready.clone()))?;
        r.register(Box::new(m.endpoints.clone()))?;
        r.register(Box::new(m.endpoints_attached.clone()))?;
        r.register(Box::new(m.pushes.clone()))?;
        r.register(Box::new(m.compiles.clone()))?;
        r.register(Box::new(m.push_seconds.clone()))?;
        r.register(Box::new(m.map_writes.clone()))?;
        r.register(Box::new(m.fqdn_names.clone()))?;
        r.register(Box::new(m.events_suppressed.clone()))?;
        r.register(Box::new(m.conntrack_revoked.clone()))?;
        Ok(m)
    }
}

impl AgentMetrics {
    /// Sets the endpoint gauges from the endpoints the maps hold.
    pub fn set_endpoints(&self, endpoints: &[crate::reconcile::endpoints::EndpointStatus]) {
        let attached = endpoints.iter().filter(|e| e.attached).count();
        self.endpoints
            .set(i64::try_from(endpoints.len()).unwrap_or(i64::MAX));
        self.endpoints_attached
            .set(i64::try_from(attached).unwrap_or(i64::MAX));
    }
}

/// The text exposition of several registries as one page.
pub fn render(registries: &[&Registry]) -> String {
    let mut families = Vec::new();
    for r in registries {
        families.extend(r.gather());
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
        return format!("# encoding failed: {e}\n");
    }
    String::from_utf8_lossy(&buf).into_owned()
}
