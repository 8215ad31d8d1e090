//! The per-query path, top to bottom, one step per module: read and authorize
//! (`authorize`) -> forward (`serve_with`, with the known answers' fast path of `early`)
//! -> learn and hand off to the datapath, a bounded wait in per-name order (`learn`) ->
//! reply and record (`record`). Plus the cache's upkeep (`upkeep`): expiry, persistence
//! and restore. Busy polling is in `crate::busy_poll`, the exchange in `crate::forward`.

mod authorize;
mod early;
mod learn;
mod record;
mod upkeep;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use policy_model::flow::DnsHit;
use policy_model::fqdn::normalize;
use policy_model::Model;
use tokio::sync::watch;

use crate::audit::Audit;
use crate::busy_poll::BusyPoll;
use crate::cache::FqdnCache;
use crate::config::Config;
use crate::forward::{Forwarder, Upstream};
use crate::known::KnownAnswers;
use crate::limits::InHand;
use crate::metrics::Metrics;
use crate::policy::{PolicyStore, Resolved, Scope};
use crate::read::{read_answer, AnswerRead};
use crate::sink::{DatapathSink, InUse};

use authorize::{Admission, Admitted};
use early::{Early, HELD_MARGIN_MS};
use learn::Learning;
use record::{new_record, About};

pub use early::ReplyNow;
pub use record::Handled;

/// Transport of a query: the upstream gets the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Where a query came from and which server it was meant for.
#[derive(Clone, Copy, Debug)]
pub struct QueryContext {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

/// One allowed query, as the steps after the policy decision need it.
struct Asked {
    ctx: QueryContext,
    start: Instant,
    /// When it was received, in the cache's clock.
    now_ms: u64,
    /// The connection's policy, whose endpoint learns the answer.
    resolved: Arc<Resolved>,
    /// The question name (moved into a late hand-off when there is one).
    qname: String,
    /// The rule that allowed it, in the model it was decided with.
    hit: Option<(Arc<Model>, DnsHit)>,
}

impl Asked {
    /// What its audit record names, with the answer's `ips`.
    fn about(self, ips: Vec<IpAddr>) -> About {
        About {
            qname: self.qname,
            resolved: Some(self.resolved),
            hit: self.hit,
            ips,
        }
    }
}

/// The proxy; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    policy: PolicyStore,
    sink: Arc<dyn DatapathSink>,
    in_use: Arc<dyn InUse>,
    /// Shared with the cache's size gauges (`Metrics::register_cache_gauges`).
    cache: Arc<Mutex<FqdnCache>>,
    dirty: AtomicBool,
    /// Per name: completion of the last datapath update queued for it. A new update
    /// starts after the previous one finished, so answers leave in update order.
    chains: Mutex<HashMap<String, watch::Receiver<bool>>>,
    audit: Audit,
    metrics: Metrics,
    upstream: Arc<dyn Upstream>,
    busy_poll: Option<Arc<BusyPoll>>,
    /// Queries in hand, for `concurrency_limit` and `client_concurrency_limit`.
    in_hand: InHand,
    /// Moves on whatever may take an IP away from the datapath, or hold an answer back
    /// behind an update: every update queued, every model swap, an IP evicted or made to
    /// expire sooner. A [`Held`] taken while the query was upstream stands while it has
    /// not moved.
    generation: AtomicU64,
    /// Answers read before, per server and question: a repeat of one whose IPs the
    /// datapath holds leaves as soon as it is compared.
    known: KnownAnswers,
    /// Set by [`Proxy::stop_serving`]: the listeners stop reading.
    stop: watch::Sender<bool>,
    /// Queries read from a listener and not yet answered.
    in_flight: AtomicUsize,
}

/// A query in flight ([`Proxy::in_flight`]).
pub(crate) struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Proxy {
    pub fn new(
        config: Config,
        model: Arc<Model>,
        scope: Scope,
        sink: Arc<dyn DatapathSink>,
        in_use: Arc<dyn InUse>,
        audit: Audit,
        metrics: Metrics,
    ) -> Proxy {
        let busy_poll = BusyPoll::new(Duration::from_micros(config.busy_poll_us));
        let forwarder = Forwarder::new(
            config.upstream_timeout,
            config.upstream_mark,
            busy_poll.clone(),
            config.randomize_case,
            metrics.upstream_unexpected.clone(),
        );
        let in_hand = InHand::new(config.concurrency_limit, config.client_concurrency_limit);
        let proxy = Proxy {
            inner: Arc::new(Inner {
                cache: Arc::new(Mutex::new(FqdnCache::with_limits(
                    config.max_ips_per_name,
                    config.max_ips_per_node,
                ))),
                busy_poll,
                config,
                policy: PolicyStore::new(model, scope),
                sink,
                in_use,
                dirty: AtomicBool::new(false),
                chains: Mutex::new(HashMap::new()),
                audit,
                metrics,
                upstream: Arc::new(forwarder),
                in_hand,
                generation: AtomicU64::new(0),
                known: KnownAnswers::default(),
                stop: watch::channel(false).0,
                in_flight: AtomicUsize::new(0),
            }),
        };
        let cache = Arc::downgrade(&proxy.inner.cache);
        let registered = proxy.inner.metrics.register_cache_gauges(move || {
            let cache = cache.upgrade()?;
            let stats = match cache.lock() {
                Ok(g) => g.stats(),
                Err(p) => p.into_inner().stats(),
            };
            Some(stats)
        });
        if let Err(e) = registered {
            tracing::warn!("the DNS cache's size gauges are not exported: {e}");
        }
        proxy
    }

    /// Stops the listeners serving this proxy (`serve_udp`, `serve_tcp`): they read no
    /// more queries and accept no more connections, and return once the queries they
    /// hold are answered; queries read meanwhile are answered as before. For handing
    /// the sockets to another process, which reads them from then on.
    pub fn stop_serving(&self) {
        self.inner.stop.send_replace(true);
    }

    /// Resolves once [`Proxy::stop_serving`] was called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.inner.stop.subscribe();
        // the sender lives as long as the proxy: an error cannot happen here
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Queries read from a listener and not answered yet.
    pub fn queries_in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Counts a query in flight until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.inner.clone())
    }

    /// The busy-polling window when the configuration turns it on: spawn
    /// [`BusyPoll::run`] on the runtime that serves the proxy's sockets (a current-thread
    /// one).
    pub fn busy_poll(&self) -> Option<Arc<BusyPoll>> {
        self.inner.busy_poll.clone()
    }

    /// Replaces the forwarder (tests, fuzzing). Has no effect once the proxy is shared.
    pub fn with_upstream(mut self, upstream: Arc<dyn Upstream>) -> Proxy {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.upstream = upstream;
        }
        self
    }

    /// In endpoint scope, checks DNS rules against `port`, the port the policy names for
    /// the server, instead of the port the server listens on. Has no effect once the
    /// proxy is shared.
    pub fn with_policy_port(mut self, port: Option<u16>) -> Proxy {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.policy.set_policy_port(port);
        }
        self
    }

    /// Swaps in a new policy snapshot; it applies from the next query on. The cache's
    /// names follow the new selectors: a name no toFQDNs selector matches any more
    /// leaves the cache (the datapath drops its IPs with the selector), the others keep
    /// the selectors that still match.
    pub fn set_model(&self, model: Arc<Model>) {
        let mut cache = self.cache();
        // Swapped under the cache lock: answers learn under it with the current model's
        // selectors (`hand_off`), so none learns with the old ones after the prune.
        let previous = self.inner.policy.current();
        self.inner.policy.swap(model.clone());
        // A copy of the same compile (a DNS batch, pod churn) has the same patterns: the
        // cached names keep their selectors.
        let (before, after) = (previous.fqdn_pattern_index(), model.fqdn_pattern_index());
        let dropped = if Arc::ptr_eq(before, after) || before == after {
            0
        } else {
            cache.retain_selected(|name| model.fqdn_selectors_matching(name))
        };
        self.moved();
        drop(cache);
        self.pruned(dropped);
    }

    /// Drops the names no selector of `model` matches and records the current
    /// selectors of the others.
    fn follow_selectors(&self, model: &Model) {
        let mut cache = self.cache();
        let dropped = cache.retain_selected(|name| model.fqdn_selectors_matching(name));
        self.moved();
        drop(cache);
        self.pruned(dropped);
    }

    fn pruned(&self, dropped: usize) {
        if dropped > 0 {
            self.inner.dirty.store(true, Ordering::Relaxed);
            tracing::debug!(dropped, "names no toFQDNs selector matches left the cache");
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The live IPs learned for `name` by `endpoint`.
    pub fn cached_ips(&self, endpoint: &str, name: &str) -> Vec<IpAddr> {
        self.cache().ips(endpoint, &normalize(name))
    }

    /// The live IPs learned for `name` by `endpoint`, with when each expires (ms since the
    /// Unix epoch).
    pub fn cached_expiries(&self, endpoint: &str, name: &str) -> Vec<(IpAddr, u64)> {
        self.cache().expiries(endpoint, &normalize(name))
    }

    /// Live IPs and zombies of `name` for `endpoint`.
    pub fn held_ips(&self, endpoint: &str, name: &str) -> Vec<IpAddr> {
        self.cache().held_ips(endpoint, &normalize(name))
    }

    /// Moves the cache's generation: a [`Held`] taken before no longer stands. Called
    /// under the lock of what changed.
    fn moved(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn cache(&self) -> MutexGuard<'_, FqdnCache> {
        match self.inner.cache.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Handles one query and records it; returns the reply to send, if any.
    pub async fn handle(&self, query: &[u8], ctx: QueryContext) -> Option<Vec<u8>> {
        let handled = self.serve(query, ctx).await;
        let reply = handled.reply.clone();
        self.record(handled, query, None);
        reply
    }

    /// Handles one query without recording it yet: send [`Handled::reply`], then pass
    /// the rest to [`Proxy::record`], so the query's count and audit record are not on
    /// the client's way.
    ///
    /// One async fn, and only the upstream exchange and a datapath wait are futures of
    /// their own (boxed): the state kept across awaits stays small, and each query's
    /// future is moved (copied) less on its way (`memcpy` was ~8% of a query's
    /// instructions with the hand-off inline).
    pub async fn serve(&self, query: &[u8], ctx: QueryContext) -> Handled {
        self.serve_with(query, ctx, None).await
    }

    /// [`Proxy::serve`], with a way to reply at once: a known answer's repeat then leaves
    /// as soon as the upstream exchange reads it ([`Handled::replied`]).
    ///
    /// The steps: read and authorize ([`Proxy::admit`], `authorize.rs`); forward (here,
    /// with the known answers' look-ahead of `early.rs` while the query is upstream);
    /// then either a known answer's repeat released unread ([`Proxy::reply_repeat`]), or
    /// the answer read and learned ([`Proxy::learn`], `learn.rs`, the datapath's
    /// confirmation awaited here) and replied ([`Proxy::answered`], `record.rs`).
    pub async fn serve_with(
        &self,
        query: &[u8],
        ctx: QueryContext,
        reply_now: Option<&dyn ReplyNow>,
    ) -> Handled {
        if let Some(b) = &self.inner.busy_poll {
            b.touch();
        }
        let start = Instant::now();
        let now = SystemTime::now();
        let m = &self.inner.metrics;
        let rec = new_record(now, &ctx);
        let Admitted {
            q,
            place: _place,
            mut asked,
            mut rec,
        } = match self.admit(query, ctx, rec, start, now_ms(now)) {
            Admission::Allowed(a) => a,
            Admission::Refused(refused) => return refused,
        };

        let up_start = Instant::now();
        let early = reply_now.map(|reply| Early {
            query,
            reply,
            generation: &self.inner.generation,
            ahead: OnceLock::new(),
            sent: AtomicBool::new(false),
        });
        let upstream = &self.inner.upstream;
        let mut forward = match &early {
            Some(e) => upstream.forward_watching(query, ctx.server, ctx.transport, e),
            None => upstream.forward(query, ctx.server, ctx.transport),
        };
        // Once the query is out (the first poll sends it) and while the upstream works:
        // what the datapath holds of the name, so that the answer's way back need not
        // look at the cache (`still_holds`).
        let mut ahead = asked.resolved.endpoint.as_deref();
        let mut held = None;
        let mut known = None;
        let until_ms = asked.now_ms.saturating_add(HELD_MARGIN_MS);
        let got = std::future::poll_fn(|cx| {
            let p = forward.as_mut().poll(cx);
            // After the first poll, which sent the query (on the answer's way only when
            // the answer was there at once).
            if let Some(ep) = ahead.take() {
                held = self.held(ep, &asked.qname);
                known = held.as_ref().and_then(|h| {
                    self.known_ahead(h, ctx.server, q.question_bytes(query)?, until_ms)
                });
                if let (Some(e), Some(k), Some(h)) = (&early, &known, &held) {
                    let _ = e.ahead.set((k.clone(), h.generation));
                }
            }
            p
        })
        .await;
        drop(forward);
        let replied = early.is_some_and(|e| e.sent.load(Ordering::Acquire));
        let answer = match got {
            Ok(a) => a,
            Err(e) => {
                let upstream = up_start.elapsed();
                m.upstream_failures.with_label_values(&[e.reason()]).inc();
                rec.reason = e.to_string();
                let start = asked.start;
                return self.servfail(rec, start, &q, upstream, asked.about(Vec::new()));
            }
        };
        let upstream = up_start.elapsed();

        if let (Some(k), Some(h)) = (known, &held) {
            // Released already when the exchange read it (`Early`), with the same checks.
            if replied || self.repeats(&answer, query, &k, h) {
                return self.reply_repeat(rec, asked, answer, k, upstream, replied);
            }
        }

        // An answer we cannot read, or that is not about this query (id, question),
        // teaches nothing and is not passed on: SERVFAIL, as for any upstream failure.
        let Some(AnswerRead {
            rcode,
            learned: mut l,
        }) = read_answer(&answer, query, &q)
        else {
            m.series.malformed_answer.inc();
            rec.reason = "malformed answer from upstream".into();
            let start = asked.start;
            return self.servfail(rec, start, &q, upstream, asked.about(Vec::new()));
        };
        let late = match self.learn(&mut rec, &mut asked, &mut l, held.as_ref(), until_ms) {
            Learning::Done => None,
            Learning::Late(late) => Some(late),
            Learning::Wait(waits) => {
                let endpoint = asked.resolved.endpoint.as_deref().unwrap_or_default();
                // Boxed: its state (timer, receivers) is not part of every query's.
                let waited = Box::pin(self.await_datapath(waits, endpoint, &asked.qname)).await;
                rec.datapath_confirmed = Some(waited);
                None
            }
        };
        let mut handled = self
            .answered(rec, asked, &q, answer, rcode, l.ips)
            .waited(upstream);
        handled.late = late;
        handled
    }
}

/// Milliseconds since the Unix epoch (the cache's clock).
fn now_ms(t: SystemTime) -> u64 {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}
