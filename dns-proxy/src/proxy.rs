//! The per-query path, top to bottom: parse -> policy -> forward -> learn -> hand off to
//! the datapath (bounded wait, per-name order) -> release. Plus the cache's upkeep:
//! expiry, persistence and restore.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use policy_model::fqdn::normalize;
use policy_model::identity::fqdn_key;
use policy_model::Model;
use tokio::sync::watch;

use crate::audit::{Audit, AuditRecord, Source, Verdict};
use crate::busy_poll::BusyPoll;
use crate::cache::FqdnCache;
use crate::config::{Config, RefuseCode};
use crate::forward::{Forwarder, Upstream};
use crate::message::name_text;
use crate::metrics::{rcode_label, Metrics};
use crate::persist::{self, PersistError};
use crate::policy::{PolicyStore, Scope};
use crate::read::{read_answer, read_query, AnswerRead};
use crate::sink::{DatapathSink, InUse, SelectorIps, Update};

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
    cache: Mutex<FqdnCache>,
    dirty: AtomicBool,
    /// Per name: completion of the last datapath update queued for it. A new update
    /// starts after the previous one finished, so answers leave in update order.
    chains: Mutex<HashMap<String, watch::Receiver<bool>>>,
    audit: Audit,
    metrics: Metrics,
    upstream: Arc<dyn Upstream>,
    busy_poll: Option<Arc<BusyPoll>>,
    /// Queries in hand, for `concurrency_limit`.
    in_hand: AtomicUsize,
}

/// What the datapath hand-off of one answer came to.
struct HandOff {
    selectors: Vec<String>,
    /// Known without waiting: `Some(true)` when the datapath already had everything,
    /// `None` when no selector matched.
    confirmed: Option<bool>,
    /// The updates to wait for ([`Proxy::await_datapath`]), when any was queued.
    waits: Option<Vec<watch::Receiver<bool>>>,
}

/// One of the `concurrency_limit` places for a query in hand; given back on drop, also
/// when the query's handling is dropped half-way.
struct Slot<'a>(Option<&'a AtomicUsize>);

impl<'a> Slot<'a> {
    /// A place, or none when `limit` queries are in hand (a zero limit: always a place).
    fn take(count: &'a AtomicUsize, limit: usize) -> Option<Slot<'a>> {
        if limit == 0 {
            return Some(Slot(None));
        }
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Some(count)))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How much longer than the moment of the check an IP must stay held for an answer to be
/// released before its hand-off ([`Proxy::datapath_holds`]): the refresh runs right after
/// the reply, so a second is far more than it needs, and no expiry falls in between.
const HELD_MARGIN_MS: u64 = 1_000;

/// The hand-off of an answer whose IPs the datapath already held: run after the reply
/// ([`Proxy::record`]), or when dropped, so that a query dropped on its way still
/// refreshes the cache. It only moves the expiry: nothing is queued for the datapath
/// unless the cache changed since the check.
struct LateHandOff {
    proxy: Proxy,
    endpoint: String,
    qname: String,
    cname_targets: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: u32,
    now_ms: u64,
    done: bool,
}

impl LateHandOff {
    fn run(&mut self) -> Option<HandOff> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        let h = self.proxy.hand_off(
            &self.endpoint,
            &self.qname,
            &self.cname_targets,
            &self.ips,
            self.ttl,
            self.now_ms,
        );
        if h.waits.is_some() {
            tracing::debug!(
                endpoint = self.endpoint,
                name = self.qname,
                "the cache changed between the check and the refresh; datapath update queued"
            );
        }
        Some(h)
    }
}

impl Drop for LateHandOff {
    fn drop(&mut self) {
        self.run();
    }
}

impl std::fmt::Debug for LateHandOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateHandOff")
            .field("endpoint", &self.endpoint)
            .field("qname", &self.qname)
            .field("ips", &self.ips)
            .field("done", &self.done)
            .finish()
    }
}

/// A served query: the reply to send (none for a datagram that gets none), and what
/// [`Proxy::record`] records once it left.
#[derive(Debug)]
pub struct Handled {
    pub reply: Option<Vec<u8>>,
    /// How long the query waited for the upstream; zero when it was not forwarded.
    pub upstream: Duration,
    start: Instant,
    /// The audit record, when there is an audit output.
    rec: Option<AuditRecord>,
    verdict: Verdict,
    /// The rcode sent, when a reply was.
    rcode: Option<ResponseCode>,
    /// A hand-off left for after the reply.
    late: Option<LateHandOff>,
}

impl Handled {
    /// The same, having waited `upstream` for the upstream.
    fn waited(mut self, upstream: Duration) -> Handled {
        self.upstream = upstream;
        self
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
        );
        Proxy {
            inner: Arc::new(Inner {
                cache: Mutex::new(FqdnCache::new(config.max_ips_per_name)),
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
                in_hand: AtomicUsize::new(0),
            }),
        }
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

    /// Swaps in a new policy snapshot; it applies from the next query on. The cache's
    /// names follow the new selectors: a name no toFQDNs selector matches any more
    /// leaves the cache (the datapath drops its IPs with the selector), the others keep
    /// the selectors that still match.
    pub fn set_model(&self, model: Arc<Model>) {
        let mut cache = self.cache();
        // Swapped under the cache lock: answers learn under it with the current model's
        // selectors (`hand_off`), so none learns with the old ones after the prune.
        self.inner.policy.swap(model.clone());
        let dropped = cache.retain_selected(|name| model.fqdn_selectors_matching(name));
        drop(cache);
        self.pruned(dropped);
    }

    /// Drops the names no selector of `model` matches and records the current
    /// selectors of the others.
    fn follow_selectors(&self, model: &Model) {
        let dropped = self
            .cache()
            .retain_selected(|name| model.fqdn_selectors_matching(name));
        self.pruned(dropped);
    }

    fn pruned(&self, dropped: usize) {
        if dropped > 0 {
            self.inner.dirty.store(true, Ordering::Relaxed);
            self.update_gauges();
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

    fn cache(&self) -> MutexGuard<'_, FqdnCache> {
        match self.inner.cache.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Handles one query and records it; returns the reply to send, if any.
    pub async fn handle(&self, query: &[u8], ctx: QueryContext) -> Option<Vec<u8>> {
        let mut handled = self.serve(query, ctx).await;
        let reply = handled.reply.take();
        self.record(handled, None);
        reply
    }

    /// Counts a served query, sends its audit record and, given when it was received,
    /// observes the proxy's own time: the time since, minus the wait for the upstream.
    ///
    /// A hand-off left for after the reply runs here, after the times are taken.
    pub fn record(&self, handled: Handled, received: Option<Instant>) {
        let Handled {
            reply: _,
            upstream,
            start,
            mut rec,
            verdict,
            rcode,
            late,
        } = handled;
        self.inner.metrics.count_query(verdict, rcode);
        if let Some(rec) = &mut rec {
            rec.latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
        if let Some(received) = received {
            self.inner
                .metrics
                .processing_seconds
                .observe(received.elapsed().saturating_sub(upstream).as_secs_f64());
        }
        if let Some(h) = late.and_then(|mut l| l.run()) {
            if let Some(rec) = &mut rec {
                rec.selectors = h.selectors;
            }
        }
        if let Some(mut rec) = rec {
            rec.verdict = verdict;
            rec.rcode = rcode.map(|r| rcode_label(Some(r)));
            self.inner.audit.record(rec);
        }
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
        if let Some(b) = &self.inner.busy_poll {
            b.touch();
        }
        let start = Instant::now();
        let now = SystemTime::now();
        let m = &self.inner.metrics;
        // Without an audit output the record's strings are not built (the record is
        // only sent when there is an output).
        let audit = self.inner.audit.enabled();

        let mut rec = AuditRecord {
            time: now,
            source: Source::Address(ctx.client.ip()),
            client: ctx.client,
            server: ctx.server,
            transport: ctx.transport.as_str(),
            qname: String::new(),
            qtype: "",
            verdict: Verdict::Error,
            rcode: None,
            ips: Vec::new(),
            ttl: None,
            selectors: Vec::new(),
            policy: None,
            rule: None,
            reason: String::new(),
            datapath_confirmed: None,
            latency_us: 0,
        };

        let q = match read_query(query) {
            Ok(q) => q,
            Err(u) => {
                m.series.malformed_query.inc();
                rec.reason = u.reason;
                return self.finish(rec, start, Verdict::Error, u.reply, u.rcode);
            }
        };
        let qname = name_text(q.question.name());
        if audit {
            rec.qname = qname.clone();
            rec.qtype = q.question.query_type().into();
        }
        // Held until the query is answered (or its handling is dropped).
        let Some(_slot) = Slot::take(&self.inner.in_hand, self.inner.config.concurrency_limit)
        else {
            m.over_limit.inc();
            rec.reason = format!(
                "concurrency limit reached: {} queries in hand",
                self.inner.config.concurrency_limit
            );
            let rcode = ResponseCode::ServFail;
            return self.finish(rec, start, Verdict::Error, q.error_reply(rcode), rcode);
        };

        let model = self.inner.policy.current();
        let resolved =
            self.inner
                .policy
                .resolve(&model, ctx.client.ip(), ctx.server, ctx.transport);
        let mut decision = model.check_dns(&resolved.conn, &qname);
        if audit {
            if let Some(ep) = &resolved.endpoint {
                rec.source = Source::Endpoint(ep.clone());
            }
            if let Some(first) = std::mem::take(&mut decision.matched).into_iter().next() {
                rec.policy = Some(first.policy);
                rec.rule = Some(first.rule);
            }
        }
        if !decision.allowed {
            let rcode = match self.inner.config.refuse_code {
                RefuseCode::Refused => ResponseCode::Refused,
                RefuseCode::Nxdomain => ResponseCode::NXDomain,
            };
            rec.reason = decision.reason.to_string();
            return self.finish(rec, start, Verdict::Denied, q.error_reply(rcode), rcode);
        }

        let up_start = Instant::now();
        let answer = match self
            .inner
            .upstream
            .forward(query, ctx.server, ctx.transport)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                let upstream = up_start.elapsed();
                m.upstream_failures.with_label_values(&[e.reason()]).inc();
                rec.reason = e.to_string();
                let rcode = ResponseCode::ServFail;
                return self
                    .finish(rec, start, Verdict::Error, q.error_reply(rcode), rcode)
                    .waited(upstream);
            }
        };
        let upstream = up_start.elapsed();
        match ctx.transport {
            Transport::Udp => &m.series.upstream_udp,
            Transport::Tcp => &m.series.upstream_tcp,
        }
        .observe(upstream.as_secs_f64());

        // An answer we cannot read, or that is not about this query (id, question),
        // teaches nothing and is not passed on: SERVFAIL, as for any upstream failure.
        let Some(AnswerRead {
            rcode,
            learned: mut l,
        }) = read_answer(&answer, query, &q)
        else {
            m.series.malformed_answer.inc();
            rec.reason = "malformed answer from upstream".into();
            let rcode = ResponseCode::ServFail;
            return self
                .finish(rec, start, Verdict::Error, q.error_reply(rcode), rcode)
                .waited(upstream);
        };
        let mut late = None;
        if !l.ips.is_empty() {
            let ttl = l.ttl.max(self.inner.config.min_ttl);
            rec.ttl = Some(ttl);
            if let Some(ep) = &resolved.endpoint {
                let targets: &[String] = if self.inner.config.attribute_cname_targets {
                    &l.cname_targets
                } else {
                    &[]
                };
                let now_ms = now_ms(now);
                if self.datapath_holds(ep, &qname, targets, &l.ips, now_ms) {
                    // Nothing for the datapath to learn: the answer leaves first, and
                    // the cache's refresh follows it (`record`).
                    rec.datapath_confirmed = Some(true);
                    late = Some(LateHandOff {
                        proxy: self.clone(),
                        endpoint: ep.to_string(),
                        qname: qname.clone(),
                        cname_targets: targets.to_vec(),
                        ips: if audit {
                            l.ips.clone()
                        } else {
                            std::mem::take(&mut l.ips)
                        },
                        ttl,
                        now_ms,
                        done: false,
                    });
                } else {
                    let h = self.hand_off(ep, &qname, targets, &l.ips, ttl, now_ms);
                    rec.datapath_confirmed = match h.waits {
                        // Boxed: its state (timer, receivers) is not part of every query's.
                        Some(waits) => Some(Box::pin(self.await_datapath(waits, ep, &qname)).await),
                        None => h.confirmed,
                    };
                    rec.selectors = h.selectors;
                }
            }
            if audit {
                rec.ips = l.ips;
            }
        }
        let mut handled = self
            .finish(rec, start, Verdict::Forwarded, Some(answer), rcode)
            .waited(upstream);
        handled.late = late;
        handled
    }

    /// What a query came to; recorded by [`Proxy::record`].
    fn finish(
        &self,
        rec: AuditRecord,
        start: Instant,
        verdict: Verdict,
        reply: Option<Vec<u8>>,
        rcode: ResponseCode,
    ) -> Handled {
        Handled {
            rcode: reply.as_ref().map(|_| rcode),
            reply,
            upstream: Duration::ZERO,
            late: None,
            start,
            rec: self.inner.audit.enabled().then_some(rec),
            verdict,
        }
    }

    /// Whether the datapath holds every IP of an answer already, for the question name
    /// and each of `cname_targets`, for [`HELD_MARGIN_MS`] more at least, with no update
    /// of these names in flight: then the answer can leave before the hand-off, which
    /// only refreshes the expiry. What [`FqdnCache::learn_under`] calls covered, checked
    /// without computing the names' selectors (see [`FqdnCache::holds`]).
    fn datapath_holds(
        &self,
        endpoint: &str,
        qname: &str,
        cname_targets: &[String],
        ips: &[IpAddr],
        now_ms: u64,
    ) -> bool {
        // Lock order as in `hand_off`: chains, then cache.
        let chains = self.chains();
        let cache = self.cache();
        let until_ms = now_ms.saturating_add(HELD_MARGIN_MS);
        std::iter::once(qname)
            .chain(cname_targets.iter().map(String::as_str))
            .all(|name| !chains.contains_key(name) && cache.holds(endpoint, name, ips, until_ms))
    }

    /// Records the IPs and queues the datapath updates for every selector matching the
    /// question name and each of `cname_targets`; the caller then waits for them
    /// ([`Proxy::await_datapath`]) when any was queued.
    fn hand_off(
        &self,
        endpoint: &str,
        qname: &str,
        cname_targets: &[String],
        ips: &[IpAddr],
        ttl: u32,
        now_ms: u64,
    ) -> HandOff {
        let mut waits = Vec::new();
        let mut all_selectors: Vec<String> = Vec::new();
        let mut any_selector = false;
        // The selectors only go to the audit record: not built without an audit output.
        let audit = self.inner.audit.enabled();
        let names = std::iter::once(qname).chain(cname_targets.iter().map(String::as_str));
        for name in names {
            // Lock order: chains, then cache. The selectors come from the current model,
            // read under the cache lock: `set_model` swaps and prunes under it too, so an
            // answer matched against selectors that just left is not learned after the
            // prune.
            let mut chains = self.chains();
            let mut cache = self.cache();
            let model = self.inner.policy.current();
            let selectors = model.fqdn_selectors_matching(name);
            if selectors.is_empty() {
                // Selected by no toFQDNs rule: nothing for the datapath (Cilium #30110).
                continue;
            }
            any_selector = true;
            if audit {
                for s in &selectors {
                    if !all_selectors.iter().any(|a| a == s) {
                        all_selectors.push(s.to_string());
                    }
                }
            }
            let learned = cache.learn_under(endpoint, name, ips, &selectors, ttl, now_ms);
            drop(cache);
            let (known, evicted) = (learned.covered, learned.evicted);
            self.inner.dirty.store(true, Ordering::Relaxed);
            if !evicted.is_empty() {
                self.inner.metrics.evictions.inc_by(evicted.len() as u64);
                tracing::debug!(endpoint, name, ?evicted, "per-name IP limit reached");
            }
            // The datapath already holds these IPs under these selectors, and no update
            // of this name is in flight (or failed): only the expiry moved, which is ours.
            if known && !chains.contains_key(name) {
                continue;
            }
            let update = Update {
                endpoint: endpoint.to_string(),
                name: name.to_string(),
                add: selectors
                    .iter()
                    .map(|s| SelectorIps {
                        selector: s.to_string(),
                        label: fqdn_key(s, endpoint).to_string(),
                        ips: ips.to_vec(),
                    })
                    .collect(),
                remove: Vec::new(),
            };
            waits.push(self.queue_update_locked(&mut chains, name, update));
        }
        if waits.is_empty() {
            // Either no selector matched, or the datapath already had everything.
            let confirmed = any_selector.then_some(true);
            return HandOff {
                selectors: all_selectors,
                confirmed,
                waits: None,
            };
        }
        // Only when something changed for the datapath: the gauges walk the whole cache.
        self.update_gauges();
        HandOff {
            selectors: all_selectors,
            confirmed: None,
            waits: Some(waits),
        }
    }

    /// Waits (bounded by `datapath_wait`) until the datapath confirmed every update in
    /// `waits`; whether it did in time. A timeout is counted and logged.
    async fn await_datapath(
        &self,
        waits: Vec<watch::Receiver<bool>>,
        endpoint: &str,
        qname: &str,
    ) -> bool {
        let start = Instant::now();
        let all = async {
            for mut w in waits {
                // An error means the update task is gone: nothing more to wait for.
                let _ = w.wait_for(|done| *done).await;
            }
        };
        let confirmed = tokio::time::timeout(self.inner.config.datapath_wait, all)
            .await
            .is_ok();
        if confirmed {
            self.inner
                .metrics
                .datapath_seconds
                .observe(start.elapsed().as_secs_f64());
        } else {
            self.inner.metrics.datapath_timeouts.inc();
            tracing::warn!(
                endpoint,
                name = qname,
                wait_ms = self.inner.config.datapath_wait.as_millis() as u64,
                "datapath did not confirm in time; answer released anyway"
            );
        }
        confirmed
    }

    fn chains(&self) -> MutexGuard<'_, HashMap<String, watch::Receiver<bool>>> {
        match self.inner.chains.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn queue_update(&self, name: &str, update: Update) -> watch::Receiver<bool> {
        let mut chains = self.chains();
        self.queue_update_locked(&mut chains, name, update)
    }

    /// Queues `update` behind the previous update of the same name; the receiver turns
    /// true once the datapath confirmed (or failed) it. The update runs to completion
    /// even when the query stops waiting. A failed update leaves its entry, so the next
    /// answer for the name is handed over again.
    fn queue_update_locked(
        &self,
        chains: &mut HashMap<String, watch::Receiver<bool>>,
        name: &str,
        update: Update,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let prev = chains.insert(name.to_string(), rx.clone());
        let inner = self.inner.clone();
        let name = name.to_string();
        let mine = rx.clone();
        tokio::spawn(async move {
            if let Some(mut prev) = prev {
                let _ = prev.wait_for(|done| *done).await;
            }
            let ok = match inner.sink.apply(update).await {
                Ok(()) => true,
                Err(e) => {
                    inner.metrics.datapath_errors.inc();
                    tracing::warn!(name, "{e}");
                    false
                }
            };
            let _ = tx.send(true);
            let mut chains = match inner.chains.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if ok && chains.get(&name).is_some_and(|r| r.same_channel(&mine)) {
                chains.remove(&name);
            }
        });
        rx
    }

    fn update_gauges(&self) {
        let s = self.cache().stats();
        let m = &self.inner.metrics;
        m.cache_names
            .set(i64::try_from(s.names).unwrap_or(i64::MAX));
        m.cache_ips.set(i64::try_from(s.ips).unwrap_or(i64::MAX));
        m.cache_zombies
            .set(i64::try_from(s.zombies).unwrap_or(i64::MAX));
    }

    /// Expires IPs whose TTL ran out and that no live connection uses, and tells the
    /// datapath. Returns how many IPs left.
    pub async fn collect(&self) -> usize {
        let now = now_ms(SystemTime::now());
        let in_use = self.inner.in_use.clone();
        let removed = self.cache().collect(now, |ip| in_use.in_use(ip));
        self.update_gauges();
        if removed.is_empty() {
            return 0;
        }
        self.inner.dirty.store(true, Ordering::Relaxed);
        self.inner.metrics.expirations.inc_by(removed.len() as u64);
        let mut grouped: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
        for r in &removed {
            grouped
                .entry((r.endpoint.clone(), r.name.clone()))
                .or_default()
                .push(r.ip);
        }
        let model = self.inner.policy.current();
        for ((endpoint, name), ips) in grouped {
            let update = Update {
                remove: model
                    .fqdn_selectors_matching(&name)
                    .into_iter()
                    .map(|s| SelectorIps {
                        selector: s.to_string(),
                        label: fqdn_key(s, &endpoint).to_string(),
                        ips: ips.clone(),
                    })
                    .collect(),
                endpoint,
                name: name.clone(),
                add: Vec::new(),
            };
            let mut done = self.queue_update(&name, update);
            let _ = done.wait_for(|d| *d).await;
        }
        removed.len()
    }

    /// Writes the cache to the state directory when it changed since the last write.
    pub fn persist(&self) -> Result<bool, PersistError> {
        let Some(dir) = &self.inner.config.state_dir else {
            return Ok(false);
        };
        if !self.inner.dirty.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        let entries = self.cache().snapshot();
        persist::save(dir, &entries).inspect_err(|_| {
            self.inner.dirty.store(true, Ordering::Relaxed);
            self.inner.metrics.persist_errors.inc();
        })?;
        Ok(true)
    }

    /// Loads the cache from the state directory and hands every restored IP to the
    /// datapath again (it may have been rebuilt). Returns the number of names restored.
    pub async fn restore(&self) -> Result<usize, PersistError> {
        let Some(dir) = &self.inner.config.state_dir else {
            return Ok(0);
        };
        let entries = persist::load(dir)?;
        let model = self.inner.policy.current();
        let mut updates = Vec::new();
        for (endpoint, names) in &entries {
            for (name, e) in names {
                let ips: Vec<IpAddr> = e.ips.iter().chain(&e.zombies).map(|e| e.ip).collect();
                let add: Vec<SelectorIps> = model
                    .fqdn_selectors_matching(name)
                    .into_iter()
                    .map(|s| SelectorIps {
                        selector: s.to_string(),
                        label: fqdn_key(s, endpoint).to_string(),
                        ips: ips.clone(),
                    })
                    .collect();
                if !add.is_empty() {
                    updates.push(Update {
                        endpoint: endpoint.clone(),
                        name: name.clone(),
                        add,
                        remove: Vec::new(),
                    });
                }
            }
        }
        self.cache().restore(entries);
        // What the policy no longer selects is not restored.
        self.follow_selectors(&model);
        let count = self.cache().names();
        self.update_gauges();
        for u in updates {
            let name = u.name.clone();
            let mut done = self.queue_update(&name, u);
            let _ = done.wait_for(|d| *d).await;
        }
        Ok(count)
    }

    /// Runs expiry and persistence every `maintenance_interval` until the proxy is
    /// dropped by everyone else.
    pub fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let every = self
            .inner
            .config
            .maintenance_interval
            .max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let proxy = Proxy { inner };
                proxy.collect().await;
                let p = proxy.clone();
                match tokio::task::spawn_blocking(move || p.persist()).await {
                    Ok(Err(e)) => tracing::warn!("persisting the FQDN cache: {e}"),
                    Ok(Ok(_)) => {}
                    Err(e) => tracing::warn!("persist task: {e}"),
                }
            }
        })
    }
}

/// Whether an answer is about the question asked. One with records must repeat the
/// question (any case); one without (errors, truncation) may leave it out.
/// Milliseconds since the Unix epoch (the cache's clock).
fn now_ms(t: SystemTime) -> u64 {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}
