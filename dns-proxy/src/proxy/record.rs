//! What a served query came to ([`Handled`]), and its recording after the reply: the
//! counters, the audit record's strings, the late hand-off and the known answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::ResponseCode;
use policy_model::flow::DnsHit;
use policy_model::Model;

use crate::audit::{AuditRecord, Source, Verdict};
use crate::known::Known;
use crate::metrics::rcode_label;
use crate::policy::Resolved;
use crate::read::{read_query, read_repeat, QueryRead, HEADER_LEN};

use super::early::HELD_MARGIN_MS;
use super::learn::LateHandOff;
use super::{Asked, Proxy, QueryContext, Transport};

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
    pub(super) start: Instant,
    /// The audit record, when there is an audit output.
    pub(super) rec: Option<AuditRecord>,
    pub(super) verdict: Verdict,
    /// The rcode sent, when a reply was.
    pub(super) rcode: Option<ResponseCode>,
    /// A hand-off left for after the reply.
    pub(super) late: Option<LateHandOff>,
    /// What the audit record names, written into it after the reply.
    pub(super) about: About,
    /// The transport an upstream answer came over, for its latency histogram.
    pub(super) answered: Option<Transport>,
    /// What the reply is to the known answers ([`Proxy::record`] reads or keeps it).
    pub(super) known: KnownReply,
}

/// What a reply is to the known answers.
#[derive(Debug, Default)]
pub(super) enum KnownReply {
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
pub(super) struct About {
    /// The question name; empty when the query could not be read, or when a late
    /// hand-off holds it.
    pub(super) qname: String,
    /// The connection's policy, whose endpoint is the record's source.
    pub(super) resolved: Option<Arc<Resolved>>,
    /// The rule that allowed the query, in the model it was decided with.
    pub(super) hit: Option<(Arc<Model>, DnsHit)>,
    /// The answer's IPs (in the late hand-off when there is one).
    pub(super) ips: Vec<IpAddr>,
}

impl Handled {
    /// The same, having waited `upstream` for the upstream.
    pub(super) fn waited(mut self, upstream: Duration) -> Handled {
        self.upstream = upstream;
        self
    }

    /// The same, answered by the upstream over `transport` (its latency is observed
    /// after the reply).
    pub(super) fn answered_over(mut self, transport: Transport) -> Handled {
        self.answered = Some(transport);
        self
    }

    /// The same, about `about`.
    pub(super) fn about(mut self, about: About) -> Handled {
        self.about = about;
        self
    }
}

/// A query's audit record before anything is known of it but where it came from.
pub(super) fn new_record(now: SystemTime, ctx: &QueryContext) -> AuditRecord {
    AuditRecord {
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
    }
}

impl Proxy {
    /// The reply of an answer read and learned. Confirmed (or held already) for every
    /// selector of the name, and attributed to the question name only, it is known for
    /// the question from now on; not when its IPs live no longer than the margin a
    /// repeat needs (a TTL of 0, say): no repeat could ever leave early.
    pub(super) fn answered(
        &self,
        rec: AuditRecord,
        asked: Asked,
        q: &QueryRead,
        answer: Vec<u8>,
        rcode: ResponseCode,
        ips: Vec<IpAddr>,
    ) -> Handled {
        let learn = rec.datapath_confirmed == Some(true)
            && !self.inner.config.attribute_cname_targets
            && rec
                .ttl
                .is_some_and(|t| u64::from(t) * 1000 > HELD_MARGIN_MS);
        let ctx = asked.ctx;
        let mut handled = self
            .finish(rec, asked.start, Verdict::Forwarded, Some(answer), rcode)
            .answered_over(ctx.transport)
            .about(asked.about(ips));
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
    pub(super) fn check_repeat(
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

    /// `SERVFAIL` for a query forwarded without a usable answer (`rec` says why).
    pub(super) fn servfail(
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
    pub(super) fn finish(
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
}
