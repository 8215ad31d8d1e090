//! The per-query path, top to bottom: parse -> policy -> forward -> learn -> hand off to
//! the datapath (bounded wait, per-name order) -> release. Plus the cache's upkeep:
//! expiry, persistence and restore.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use policy_model::flow::DnsHit;
use policy_model::fqdn::normalize;
use policy_model::identity::fqdn_key;
use policy_model::Model;
use tokio::sync::watch;

use crate::audit::{Audit, AuditRecord, Source, Verdict};
use crate::busy_poll::BusyPoll;
use crate::cache::FqdnCache;
use crate::config::{Config, RefuseCode};
use crate::forward::{Forwarder, Upstream, WatchAnswer};
use crate::known::{Known, KnownAnswers};
use crate::limits::{InHand, Over};
use crate::message::name_text;
use crate::metrics::{rcode_label, Metrics};
use crate::persist::{self, PersistError};
use crate::policy::{PolicyStore, Resolved, Scope};
use crate::read::{read_answer, read_query, read_repeat, AnswerRead, QueryRead, HEADER_LEN};
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
}

/// What the datapath held of a query's name when the query went upstream: the live IPs
/// with their expiry, at cache generation `generation`. Taken while the upstream works,
/// so that an answer with only these IPs leaves without looking at the cache and the
/// update chains again ([`Proxy::datapath_holds`]) on its way.
#[derive(Debug)]
struct Held {
    generation: u64,
    ips: Vec<(IpAddr, u64)>,
}

/// Sends a reply to the client at once, without waiting: how a known answer's repeat
/// leaves from the upstream exchange itself ([`Proxy::serve_with`]).
pub trait ReplyNow: Sync {
    /// `WouldBlock` when the socket does not take it at once.
    fn reply_now(&self, reply: &[u8]) -> std::io::Result<()>;
}

/// Releases a known answer's repeat the moment the upstream exchange reads it, before the
/// exchange winds down and the query's handling goes on: on a virtual machine every
/// microsecond before the reply's `sendto` lets the client's idle vCPU halt deeper.
struct Early<'a> {
    query: &'a [u8],
    reply: &'a dyn ReplyNow,
    generation: &'a AtomicU64,
    /// The known answer, and the generation the datapath's hold of its IPs was seen at;
    /// set once the query is out.
    ahead: OnceLock<(Arc<Known>, u64)>,
    /// Whether the reply left from here (or failed to for good).
    sent: AtomicBool,
}

impl WatchAnswer for Early<'_> {
    fn answer(&self, answer: &[u8]) {
        let Some((known, generation)) = self.ahead.get() else {
            return;
        };
        // As `serve` checks a repeat: the query's id, the known bytes, nothing moved.
        if answer.get(..2) != self.query.get(..2)
            || !known.matches(answer)
            || self.generation.load(Ordering::Acquire) != *generation
        {
            return;
        }
        match self.reply.reply_now(answer) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            sent => {
                if let Err(e) = sent {
                    tracing::debug!("udp reply failed: {e}");
                }
                self.sent.store(true, Ordering::Release);
            }
        }
    }
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
    /// The connection's policy, whose endpoint learned the answer (shared, not copied:
    /// this is built on the answer's way out).
    resolved: Arc<Resolved>,
    /// The question name and the answer's IPs, moved here; the audit record takes them
    /// back once the hand-off ran ([`Proxy::record`]).
    qname: String,
    cname_targets: Vec<String>,
    ips: Vec<IpAddr>,
    /// The known answer the reply repeated, whose IPs these are (then `ips` is empty).
    known: Option<Arc<Known>>,
    ttl: u32,
    now_ms: u64,
    done: bool,
}

impl LateHandOff {
    fn run(&mut self) -> Option<HandOff> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        let endpoint = self.resolved.endpoint.as_deref()?;
        let ips = match &self.known {
            Some(k) => &k.ips,
            None => &self.ips,
        };
        let h = self.proxy.hand_off(
            endpoint,
            &self.qname,
            &self.cname_targets,
            ips,
            self.ttl,
            self.now_ms,
        );
        if h.waits.is_some() {
            tracing::debug!(
                endpoint,
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
            .field("endpoint", &self.resolved.endpoint)
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
    /// The reply left already, from the upstream exchange ([`ReplyNow`]); `reply` holds
    /// it for the record.
    pub replied: bool,
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
    /// What the audit record names, written into it after the reply.
    about: About,
    /// The transport an upstream answer came over, for its latency histogram.
    answered: Option<Transport>,
    /// What the reply is to the known answers ([`Proxy::record`] reads or keeps it).
    known: KnownReply,
}

/// What a reply is to the known answers.
#[derive(Debug, Default)]
enum KnownReply {
    /// Nothing to them.
    #[default]
    None,
    /// A known answer's repeat, released before it was read: read after the reply.
    Repeat { server: SocketAddr },
    /// Read, handed to the datapath and confirmed: known from now on for the question
    /// that ends at `question_end` in the query's bytes.
    Learn {
        server: SocketAddr,
        question_end: usize,
    },
}

/// What a query was about, kept as it was found for its audit record, which
/// [`Proxy::record`] fills in after the reply: the strings are built (and copied) off
/// the query's way.
#[derive(Debug, Default)]
struct About {
    /// The question name; empty when the query could not be read, or when a late
    /// hand-off holds it.
    qname: String,
    /// The connection's policy, whose endpoint is the record's source.
    resolved: Option<Arc<Resolved>>,
    /// The rule that allowed the query, in the model it was decided with.
    hit: Option<(Arc<Model>, DnsHit)>,
    /// The answer's IPs (in the late hand-off when there is one).
    ips: Vec<IpAddr>,
}

impl Handled {
    /// The same, having waited `upstream` for the upstream.
    fn waited(mut self, upstream: Duration) -> Handled {
        self.upstream = upstream;
        self
    }

    /// The same, answered by the upstream over `transport` (its latency is observed
    /// after the reply).
    fn answered_over(mut self, transport: Transport) -> Handled {
        self.answered = Some(transport);
        self
    }

    /// The same, about `about`.
    fn about(mut self, about: About) -> Handled {
        self.about = about;
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
            config.randomize_case,
            metrics.upstream_unexpected.clone(),
        );
        let in_hand = InHand::new(config.concurrency_limit, config.client_concurrency_limit);
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
                in_hand,
                generation: AtomicU64::new(0),
                known: KnownAnswers::default(),
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
        self.inner.policy.swap(model.clone());
        let dropped = cache.retain_selected(|name| model.fqdn_selectors_matching(name));
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

    /// Moves the cache's generation: a [`Held`] taken before no longer stands. Called
    /// under the lock of what changed.
    fn moved(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// What the datapath holds of `qname` for `endpoint` now, when it holds some IPs
    /// and no update of the name is in flight.
    fn held(&self, endpoint: &str, qname: &str) -> Option<Held> {
        // Read before the looks: a change in between moves it again, and the `Held` does
        // not stand.
        let generation = self.inner.generation.load(Ordering::Acquire);
        // Lock order as in `hand_off`: chains, then cache.
        let chains = self.chains();
        if chains.contains_key(qname) {
            return None;
        }
        let ips = self.cache().held(endpoint, qname)?;
        Some(Held { generation, ips })
    }

    /// Whether nothing moved since `held` was taken.
    fn unmoved(&self, held: &Held) -> bool {
        self.inner.generation.load(Ordering::Acquire) == held.generation
    }

    /// The known answer to `question` from `server` when the datapath holds all of its
    /// IPs (per `held`) until `until_ms`: an answer that repeats it may leave unread.
    fn known_ahead(
        &self,
        held: &Held,
        server: SocketAddr,
        question: &[u8],
        until_ms: u64,
    ) -> Option<Arc<Known>> {
        if self.inner.config.attribute_cname_targets {
            // Its IPs would also go to the CNAME targets, which `held` does not cover.
            return None;
        }
        let k = self.inner.known.get(server, question)?;
        let covered = !k.ips.is_empty()
            && k.ips.iter().all(|ip| {
                held.ips
                    .iter()
                    .any(|&(x, expires_ms)| x == *ip && expires_ms >= until_ms)
            });
        covered.then_some(k)
    }

    /// Whether `held` still stands and covers every IP in `ips` until `until_ms`: what
    /// [`Proxy::datapath_holds`] would say, from what was taken ahead.
    fn still_holds(&self, held: &Held, ips: &[IpAddr], until_ms: u64) -> bool {
        ips.iter().all(|ip| {
            held.ips
                .iter()
                .any(|&(x, expires_ms)| x == *ip && expires_ms >= until_ms)
        }) && self.unmoved(held)
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

    /// Counts a served query, sends its audit record and, given when it was received,
    /// observes the proxy's own time: the time since, minus the wait for the upstream.
    ///
    /// A hand-off left for after the reply runs here, after the times are taken, and the
    /// reply becomes a known answer, or, when it was one's repeat, is read. `query` is the
    /// query served.
    pub fn record(&self, handled: Handled, query: &[u8], received: Option<Instant>) {
        let Handled {
            reply,
            replied: _,
            upstream,
            start,
            mut rec,
            verdict,
            rcode,
            late,
            mut about,
            answered,
            known,
        } = handled;
        let m = &self.inner.metrics;
        m.count_query(verdict, rcode);
        if let Some(t) = answered {
            match t {
                Transport::Udp => &m.series.upstream_udp,
                Transport::Tcp => &m.series.upstream_tcp,
            }
            .observe(upstream.as_secs_f64());
        }
        if let Some(rec) = &mut rec {
            rec.latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
        if let Some(received) = received {
            self.inner
                .metrics
                .processing_seconds
                .observe(received.elapsed().saturating_sub(upstream).as_secs_f64());
        }
        if let Some(mut l) = late {
            if let Some(h) = l.run() {
                if let Some(rec) = &mut rec {
                    rec.selectors = h.selectors;
                }
            }
            about.qname = std::mem::take(&mut l.qname);
            about.ips = match &l.known {
                Some(k) => k.ips.clone(),
                None => std::mem::take(&mut l.ips),
            };
        }
        match known {
            KnownReply::None => {}
            KnownReply::Repeat { server } => {
                m.known_answers.inc();
                self.check_repeat(reply.as_deref(), query, server, &about.ips);
            }
            KnownReply::Learn {
                server,
                question_end,
            } => {
                let question = query.get(HEADER_LEN..question_end);
                if let (Some(answer), Some(question)) = (reply.as_deref(), question) {
                    // Kept as it is when it already is this answer's pattern.
                    let same = self
                        .inner
                        .known
                        .get(server, question)
                        .is_some_and(|k| k.matches(answer) && k.ips == about.ips);
                    if !same {
                        if let Some(k) = Known::of(answer, about.ips.clone()) {
                            self.inner.known.put(server, question, k);
                        }
                    }
                }
            }
        }
        if let Some(mut rec) = rec {
            rec.qname = about.qname;
            rec.ips = about.ips;
            if let Some(r) = &about.resolved {
                if let Some(ep) = &r.endpoint {
                    rec.source = Source::Endpoint(ep.clone());
                }
                if let Some((model, hit)) = &about.hit {
                    let matched = model.dns_matched(&r.conn, *hit);
                    rec.policy = Some(matched.policy);
                    rec.rule = Some(matched.rule);
                }
            }
            rec.verdict = verdict;
            rec.rcode = rcode.map(|r| rcode_label(Some(r)));
            self.inner.audit.record(rec);
        }
    }

    /// Reads a known answer's repeat after it left: it must read as the known one did
    /// (it differs in its id and TTLs only, so it always does unless a name in it points
    /// into a TTL). If not, it is counted as malformed and its question is known no more.
    fn check_repeat(
        &self,
        answer: Option<&[u8]>,
        query: &[u8],
        server: SocketAddr,
        ips: &[IpAddr],
    ) {
        let read = answer.and_then(read_repeat);
        if read.is_some_and(|a| a.rcode == ResponseCode::NoError && a.learned.ips == ips) {
            return;
        }
        self.inner.metrics.series.malformed_answer.inc();
        tracing::warn!(%server, "an answer that repeated a known one does not read as it did");
        let q = read_query(query).ok();
        if let Some(question) = q.as_ref().and_then(|q| q.question_bytes(query)) {
            self.inner.known.forget(server, question);
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
        self.serve_with(query, ctx, None).await
    }

    /// [`Proxy::serve`], with a way to reply at once: a known answer's repeat then leaves
    /// as soon as the upstream exchange reads it ([`Handled::replied`]).
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
        // Without an audit output the record's strings are not built (the record is
        // only sent when there is an output).
        let audit = self.inner.audit.enabled();

        let mut rec = AuditRecord {
            time: now,
            source: Source::Address(ctx.client.ip()),
            client: ctx.client,
            server: ctx.server,
            transport: ctx.transport.as_str().into(),
            qname: String::new(),
            qtype: "".into(),
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
        let mut qname = name_text(q.question.name());
        if audit {
            rec.qtype = <&'static str>::from(q.question.query_type()).into();
        }
        // Held until the query is answered (or its handling is dropped).
        let _place = match self.inner.in_hand.take(ctx.client.ip()) {
            Ok(place) => place,
            Err(over) => {
                let limit = self.inner.in_hand.limit(over);
                rec.reason = match over {
                    Over::Global => {
                        m.series.over_global_limit.inc();
                        format!("concurrency limit reached: {limit} queries in hand")
                    }
                    Over::Client => {
                        m.series.over_client_limit.inc();
                        format!("client concurrency limit reached: {limit} queries of this client in hand")
                    }
                };
                let rcode = ResponseCode::ServFail;
                return self
                    .finish(rec, start, Verdict::Error, q.error_reply(rcode), rcode)
                    .about(About {
                        qname,
                        ..About::default()
                    });
            }
        };

        let model = self.inner.policy.current();
        let resolved =
            self.inner
                .policy
                .resolve(&model, ctx.client.ip(), ctx.server, ctx.transport);
        // Only positions: the rule's strings are built for the audit record after the
        // reply (`record`).
        let hit = match model.dns_allows(&resolved.conn, &qname) {
            Ok(hit) => hit,
            Err(reason) => {
                let rcode = match self.inner.config.refuse_code {
                    RefuseCode::Refused => ResponseCode::Refused,
                    RefuseCode::Nxdomain => ResponseCode::NXDomain,
                };
                rec.reason = reason.to_string();
                return self
                    .finish(rec, start, Verdict::Denied, q.error_reply(rcode), rcode)
                    .about(About {
                        qname,
                        resolved: Some(resolved),
                        ..About::default()
                    });
            }
        };
        let hit = hit.map(|h| (model, h));

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
        let mut ahead = resolved.endpoint.as_deref();
        let mut held = None;
        let mut known = None;
        let until_ms = now_ms(now).saturating_add(HELD_MARGIN_MS);
        let got = std::future::poll_fn(|cx| {
            let p = forward.as_mut().poll(cx);
            // After the first poll, which sent the query (on the answer's way only when
            // the answer was there at once).
            if let Some(ep) = ahead.take() {
                held = self.held(ep, &qname);
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
                let about = About {
                    qname,
                    resolved: Some(resolved),
                    hit,
                    ips: Vec::new(),
                };
                return self.servfail(rec, start, &q, upstream, about);
            }
        };
        let upstream = up_start.elapsed();

        // A known answer's repeat whose IPs the datapath still holds: it leaves now, and
        // is read after the reply (`record`).
        if let (Some(k), Some(h)) = (known, &held) {
            // Released already when the exchange read it (`Early`), with the same checks.
            if replied
                || (answer.get(..2) == query.get(..2) && k.matches(&answer) && self.unmoved(h))
            {
                let ttl = k.ttl(&answer).max(self.inner.config.min_ttl);
                rec.ttl = Some(ttl);
                rec.datapath_confirmed = Some(true);
                let late = LateHandOff {
                    proxy: self.clone(),
                    resolved: resolved.clone(),
                    qname: std::mem::take(&mut qname),
                    cname_targets: Vec::new(),
                    ips: Vec::new(),
                    known: Some(k),
                    ttl,
                    now_ms: now_ms(now),
                    done: false,
                };
                let mut handled = self
                    .finish(
                        rec,
                        start,
                        Verdict::Forwarded,
                        Some(answer),
                        ResponseCode::NoError,
                    )
                    .waited(upstream)
                    .answered_over(ctx.transport)
                    .about(About {
                        qname,
                        resolved: Some(resolved),
                        hit,
                        ips: Vec::new(),
                    });
                handled.late = Some(late);
                handled.known = KnownReply::Repeat { server: ctx.server };
                handled.replied = replied;
                return handled;
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
            let about = About {
                qname,
                resolved: Some(resolved),
                hit,
                ips: Vec::new(),
            };
            return self.servfail(rec, start, &q, upstream, about);
        };
        let mut late = None;
        if !l.ips.is_empty() {
            let ttl = l.ttl.max(self.inner.config.min_ttl);
            rec.ttl = Some(ttl);
            if let Some(ep) = resolved.endpoint.as_deref() {
                let targets: &[String] = if self.inner.config.attribute_cname_targets {
                    &l.cname_targets
                } else {
                    &[]
                };
                let now_ms = now_ms(now);
                let holds = targets.is_empty()
                    && held
                        .as_ref()
                        .is_some_and(|h| self.still_holds(h, &l.ips, until_ms));
                if holds || self.datapath_holds(ep, &qname, targets, &l.ips, now_ms) {
                    // Nothing for the datapath to learn: the answer leaves first, and
                    // the cache's refresh follows it (`record`). What the refresh needs
                    // is moved into it, not copied.
                    rec.datapath_confirmed = Some(true);
                    let cname_targets = if targets.is_empty() {
                        Vec::new()
                    } else {
                        std::mem::take(&mut l.cname_targets)
                    };
                    late = Some(LateHandOff {
                        proxy: self.clone(),
                        resolved: resolved.clone(),
                        qname: std::mem::take(&mut qname),
                        cname_targets,
                        ips: std::mem::take(&mut l.ips),
                        known: None,
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
        }
        // Confirmed (or held already) for every selector of the name, and attributed to
        // the question name only: known for the question from now on. Not when its IPs
        // live no longer than the margin a repeat needs (a TTL of 0, say): no repeat could
        // ever leave early.
        let learn = rec.datapath_confirmed == Some(true)
            && !self.inner.config.attribute_cname_targets
            && rec
                .ttl
                .is_some_and(|t| u64::from(t) * 1000 > HELD_MARGIN_MS);
        let mut handled = self
            .finish(rec, start, Verdict::Forwarded, Some(answer), rcode)
            .waited(upstream)
            .answered_over(ctx.transport)
            .about(About {
                qname,
                resolved: Some(resolved),
                hit,
                ips: l.ips,
            });
        handled.late = late;
        if learn {
            if let Some(question_end) = q.question_end() {
                handled.known = KnownReply::Learn {
                    server: ctx.server,
                    question_end,
                };
            }
        }
        handled
    }

    /// `SERVFAIL` for a query forwarded without a usable answer (`rec` says why).
    fn servfail(
        &self,
        rec: AuditRecord,
        start: Instant,
        q: &QueryRead,
        upstream: Duration,
        about: About,
    ) -> Handled {
        let rcode = ResponseCode::ServFail;
        self.finish(rec, start, Verdict::Error, q.error_reply(rcode), rcode)
            .waited(upstream)
            .about(about)
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
            replied: false,
            about: About::default(),
            answered: None,
            known: KnownReply::None,
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
            if learned.sooner || !learned.evicted.is_empty() {
                // IPs others may have counted on leave sooner.
                self.moved();
            }
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
        // An answer for this name now waits for the update.
        self.moved();
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
            // The entry goes before the answers waiting for it are released: the next
            // query for the name then finds nothing in flight.
            {
                let mut chains = match inner.chains.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if ok && chains.get(&name).is_some_and(|r| r.same_channel(&mine)) {
                    chains.remove(&name);
                }
            }
            let _ = tx.send(true);
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
        let removed = {
            let mut cache = self.cache();
            let removed = cache.collect(now, |ip| in_use.in_use(ip));
            if !removed.is_empty() {
                self.moved();
            }
            removed
        };
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
        {
            let mut cache = self.cache();
            cache.restore(entries);
            self.moved();
        }
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
