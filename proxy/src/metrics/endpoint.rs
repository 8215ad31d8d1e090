//! A small HTTP/1.1 endpoint server (metrics, the agent's admin endpoint) that stays up
//! whatever its clients do: at most [`EndpointLimits::max_connections`] connections are
//! served at once (more wait in the listen queue), a connection that takes longer than
//! [`EndpointLimits::header_timeout`] to send a request's head, or that sits idle that
//! long between requests, is closed, and an accept error (no file descriptor left, say)
//! is counted, logged and followed by a growing pause (10 ms up to 1 s), never by the
//! end of the loop.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Bounds of an endpoint's connections.
#[derive(Clone, Copy, Debug)]
pub struct EndpointLimits {
    /// Connections served at once; more wait in the listen queue until one closes.
    pub max_connections: usize,
    /// How long a request's head may take to arrive, counted from when the connection
    /// opened or its previous response was sent: also how long a kept-alive connection
    /// may sit idle.
    pub header_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> EndpointLimits {
        EndpointLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// `ward_endpoint_accept_errors_total{endpoint}` and `ward_endpoint_connections{endpoint}`.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    accept_errors: IntCounter,
    connections: IntGauge,
}

impl EndpointMetrics {
    /// The endpoint's metrics, named `endpoint` in their label, registered in `registry`.
    pub fn register(registry: &Registry, endpoint: &str) -> prometheus::Result<EndpointMetrics> {
        let accept_errors = IntCounter::with_opts(
            Opts::new(
                "ward_endpoint_accept_errors_total",
                "Failed accepts of an HTTP endpoint (each followed by a pause).",
            )
            .const_label("endpoint", endpoint),
        )?;
        let connections = IntGauge::with_opts(
            Opts::new(
                "ward_endpoint_connections",
                "Connections an HTTP endpoint serves now.",
            )
            .const_label("endpoint", endpoint),
        )?;
        registry.register(Box::new(accept_errors.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        Ok(EndpointMetrics {
            accept_errors,
            connections,
        })
    }

    /// Not registered anywhere.
    pub fn unregistered() -> EndpointMetrics {
        EndpointMetrics {
            accept_errors: IntCounter::new("unregistered_accept_errors", "-")
                .unwrap_or_else(|_| unreachable!()),
            connections: IntGauge::new("unregistered_connections", "-")
                .unwrap_or_else(|_| unreachable!()),
        }
    }

    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.get()
    }

    pub fn connections(&self) -> i64 {
        self.connections.get()
    }
}

/// Whether an accept error concerns only the connection being accepted (the next accept
/// may well succeed at once).
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Serves HTTP/1.1 on `listener` with `handle` answering each request, within `limits`,
/// until the task is dropped.
pub async fn serve_endpoint<F, B>(
    listener: TcpListener,
    limits: EndpointLimits,
    metrics: EndpointMetrics,
    handle: F,
) where
    F: Fn(Request<Incoming>) -> Response<B> + Clone + Send + Sync + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut pause = Duration::ZERO;
    let name = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    loop {
        // A place first: at the cap, connections wait in the listen queue.
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                pause = Duration::ZERO;
                stream
            }
            Err(e) => {
                metrics.accept_errors.inc();
                if per_connection(&e) {
                    continue;
                }
                // Out of file descriptors or memory: wait for some to come back.
                pause = (pause * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tracing::warn!(
                    endpoint = name,
                    error = %e,
                    pause_ms = pause.as_millis() as u64,
                    "HTTP endpoint: accept failed; pausing"
                );
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let handle = handle.clone();
        let connections = metrics.connections.clone();
        tokio::spawn(async move {
            let _place = place;
            connections.inc();
            let svc = service_fn(move |req| {
                let resp = handle(req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            connections.dec();
        });
    }
}
