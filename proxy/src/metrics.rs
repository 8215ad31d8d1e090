//! Prometheus metrics of the proxy. Labels have low cardinality: direction, verdict,
//! protocol and error kind; never paths, hosts or pod names.

use std::sync::{Arc, OnceLock};

use http::Version;
use policy_model::Direction;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::audit::Verdict;

mod endpoint;

pub use endpoint::{serve_endpoint, EndpointLimits, EndpointMetrics};

/// The `protocol` label of a request (and the audit record's protocol).
pub fn protocol_name(v: Version) -> &'static str {
    PROTOCOLS[protocol_index(v)]
}

const PROTOCOLS: [&str; 5] = ["HTTP/0.9", "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/?"];
const VERDICTS: usize = 3;

fn protocol_index(v: Version) -> usize {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_11 => 2,
        Version::HTTP_2 => 3,
        _ => 4,
    }
}

fn direction_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Forwarded => 0,
        Verdict::Denied => 1,
        Verdict::Error => 2,
    }
}

/// The per-request series, each resolved from its labels once, on first use: the data
/// path then does no label hashing or map lookup. A series appears in the exposition
/// only once a request used it, as with `with_label_values`.
#[derive(Debug, Default)]
struct Series {
    /// `[direction][verdict][protocol]`
    requests: [[[OnceLock<IntCounter>; PROTOCOLS.len()]; VERDICTS]; 2],
    /// `[direction][verdict]`
    duration: [[OnceLock<Histogram>; VERDICTS]; 2],
}

/// The proxy's metrics, registered in their own registry. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// `ward_proxy_requests_total{direction, verdict, protocol}`
    pub requests: IntCounterVec,
    /// `ward_proxy_request_duration_seconds{direction, verdict}`
    pub duration: HistogramVec,
    /// `ward_proxy_policy_decision_seconds`: time of the per-request policy check.
    pub decision: Histogram,
    /// `ward_proxy_upstream_errors_total{kind}`: connect, timeout, protocol.
    pub upstream_errors: IntCounterVec,
    /// `ward_proxy_bad_requests_total`: requests refused with 400 before any policy check.
    pub bad_requests: IntCounter,
    /// `ward_proxy_open_connections`: downstream connections being served.
    pub open_connections: IntGauge,
    /// `ward_proxy_policy_generation`: generation of the snapshot in force.
    pub policy_generation: IntGauge,
    /// `ward_proxy_tunnels_closed_total`: upgraded connections closed because a policy
    /// change denied them.
    pub tunnels_closed: IntCounter,
    series: Arc<Series>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("ward_proxy_requests_total", "HTTP requests by outcome."),
            &["direction", "verdict", "protocol"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "ward_proxy_request_duration_seconds",
                "From request head to response head.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ]),
            &["direction", "verdict"],
        );
        let decision = Histogram::with_opts(
            HistogramOpts::new(
                "ward_proxy_policy_decision_seconds",
                "Per-request policy check.",
            )
            .buckets(vec![1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 1e-5, 1e-4, 1e-3]),
        );
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "ward_proxy_upstream_errors_total",
                "Upstream failures by kind.",
            ),
            &["kind"],
        );
        let bad_requests = IntCounter::new(
            "ward_proxy_bad_requests_total",
            "Requests refused as malformed or ambiguous.",
        );
        let open_connections = IntGauge::new(
            "ward_proxy_open_connections",
            "Downstream connections being served.",
        );
        let policy_generation = IntGauge::new(
            "ward_proxy_policy_generation",
            "Generation of the policy snapshot in force.",
        );
        let tunnels_closed = IntCounter::new(
            "ward_proxy_tunnels_closed_total",
            "Upgraded connections closed because a policy change denied them.",
        );
        // The names and label sets above are constant and valid: registration can only
        // fail on a programming error, which the unit test below catches.
        let m = Metrics {
            registry,
            requests: requests.unwrap_or_else(|_| unreachable!()),
            duration: duration.unwrap_or_else(|_| unreachable!()),
            decision: decision.unwrap_or_else(|_| unreachable!()),
            upstream_errors: upstream_errors.unwrap_or_else(|_| unreachable!()),
            bad_requests: bad_requests.unwrap_or_else(|_| unreachable!()),
            open_connections: open_connections.unwrap_or_else(|_| unreachable!()),
            policy_generation: policy_generation.unwrap_or_else(|_| unreachable!()),
            tunnels_closed: tunnels_closed.unwrap_or_else(|_| unreachable!()),
            series: Arc::default(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.decision.clone()),
            Box::new(m.upstream_errors.clone()),
            Box::new(m.bad_requests.clone()),
            Box::new(m.open_connections.clone()),
            Box::new(m.policy_generation.clone()),
            Box::new(m.tunnels_closed.clone()),
        ];
        for c in collectors {
            if let Err(e) = m.registry.register(c) {
                tracing::error!("metric registration failed: {e}");
            }
        }
        m
    }

    /// Counts one finished request in `ward_proxy_requests_total` and observes its
    /// duration in `ward_proxy_request_duration_seconds`.
    pub fn observe_request(
        &self,
        direction: Direction,
        verdict: Verdict,
        version: Version,
        seconds: f64,
    ) {
        let (d, v, p) = (
            direction_index(direction),
            verdict_index(verdict),
            protocol_index(version),
        );
        self.series.requests[d][v][p]
            .get_or_init(|| {
                self.requests.with_label_values(&[
                    direction_name(direction),
                    verdict.as_str(),
                    PROTOCOLS[p],
                ])
            })
            .inc();
        self.series.duration[d][v]
            .get_or_init(|| {
                self.duration
                    .with_label_values(&[direction_name(direction), verdict.as_str()])
            })
            .observe(seconds);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `GET /metrics` (text exposition) on `listener` until the task is dropped,
/// within the default [`EndpointLimits`].
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) -> std::io::Result<()> {
    let counted = EndpointMetrics::register(&metrics.registry, "metrics")
        .unwrap_or_else(|_| EndpointMetrics::unregistered());
    serve_endpoint(listener, EndpointLimits::default(), counted, move |req| {
        metrics_response(req.uri().path(), || metrics.encode())
    })
    .await;
    Ok(())
}

/// The answer of a metrics endpoint to `path`: the text exposition `render` makes at
/// `/metrics`, 404 elsewhere.
pub fn metrics_response(
    path: &str,
    render: impl FnOnce() -> String,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::Full;
    if path == "/metrics" {
        let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(render())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    } else {
        let mut r = hyper::Response::new(Full::new(bytes::Bytes::from_static(b"not found\n")));
        *r.status_mut() = http::StatusCode::NOT_FOUND;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_requests_land_in_their_labelled_series() {
        let m = Metrics::new();
        m.observe_request(
            Direction::Egress,
            Verdict::Forwarded,
            Version::HTTP_2,
            0.001,
        );
        m.observe_request(
            Direction::Egress,
            Verdict::Forwarded,
            Version::HTTP_2,
            0.001,
        );
        m.observe_request(Direction::Ingress, Verdict::Error, Version::HTTP_10, 0.001);
        let text = m.encode();
        for line in [
            "ward_proxy_requests_total{direction=\"egress\",protocol=\"HTTP/2\",verdict=\"forwarded\"} 2",
            "ward_proxy_requests_total{direction=\"ingress\",protocol=\"HTTP/1.0\",verdict=\"error\"} 1",
            "ward_proxy_request_duration_seconds_count{direction=\"egress\",verdict=\"forwarded\"} 2",
            "ward_proxy_request_duration_seconds_count{direction=\"ingress\",verdict=\"error\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // series no request used stay out of the exposition
        assert!(!text.contains("verdict=\"denied\""), "{text}");
    }

    #[test]
    fn every_metric_is_exposed() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["ingress", "denied", "HTTP/1.1"])
            .inc();
        m.duration
            .with_label_values(&["ingress", "denied"])
            .observe(0.001);
        m.upstream_errors.with_label_values(&["connect"]).inc();
        m.decision.observe(1e-6);
        let text = m.encode();
        for name in [
            "ward_proxy_requests_total{direction=\"ingress\",protocol=\"HTTP/1.1\",verdict=\"denied\"} 1",
            "ward_proxy_request_duration_seconds_bucket",
            "ward_proxy_policy_decision_seconds_count 1",
            "ward_proxy_upstream_errors_total{kind=\"connect\"} 1",
            "ward_proxy_bad_requests_total 0",
            "ward_proxy_open_connections 0",
            "ward_proxy_policy_generation 0",
            "ward_proxy_tunnels_closed_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
