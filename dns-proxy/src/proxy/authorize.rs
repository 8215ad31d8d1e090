//! A query's first step: read it, take its place under the concurrency limits, and
//! decide it by the DNS rules of the connection it came on.

use std::time::Instant;

use hickory_proto::op::ResponseCode;

use crate::audit::{AuditRecord, Verdict};
use crate::config::RefuseCode;
use crate::limits::{Over, Place};
use crate::message::name_text;
use crate::read::{read_query, QueryRead};

use super::record::About;
use super::{Asked, Handled, Proxy, QueryContext};

/// What the first step made of a query.
pub(super) enum Admission<'a> {
    /// Read, in hand and allowed.
    Allowed(Admitted<'a>),
    /// Unreadable, over a limit or denied: the reply that says so, to send as it is.
    Refused(Handled),
}

/// A query read, in hand and allowed: what the steps after the policy decision take.
pub(super) struct Admitted<'a> {
    pub(super) q: QueryRead,
    /// Its place under the concurrency limits: held until the query is answered (or its
    /// handling is dropped).
    pub(super) place: Place<'a>,
    pub(super) asked: Asked,
    pub(super) rec: AuditRecord,
}

impl Proxy {
    /// Reads `query`, takes its place in hand and checks it against the DNS rules: the
    /// query allowed, or the reply that refuses it (its record says why).
    pub(super) fn admit(
        &self,
        query: &[u8],
        ctx: QueryContext,
        mut rec: AuditRecord,
        start: Instant,
        now_ms: u64,
    ) -> Admission<'_> {
        let m = &self.inner.metrics;
        let q = match read_query(query) {
            Ok(q) => q,
            Err(u) => {
                m.series.malformed_query.inc();
                rec.reason = u.reason;
                return Admission::Refused(self.finish(
                    rec,
                    start,
                    Verdict::Error,
                    u.reply,
                    u.rcode,
                ));
            }
        };
        let qname = name_text(q.question.name());
        // Without an audit output the record's strings are not built (the record is
        // only sent when there is an output).
        if self.inner.audit.enabled() {
            rec.qtype = <&'static str>::from(q.question.query_type()).into();
        }
        let place = match self.inner.in_hand.take(ctx.client.ip()) {
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
                return Admission::Refused(
                    self.finish(rec, start, Verdict::Error, q.error_reply(rcode), rcode)
                        .about(About {
                            qname,
                            ..About::default()
                        }),
                );
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
                return Admission::Refused(
                    self.finish(rec, start, Verdict::Denied, q.error_reply(rcode), rcode)
                        .about(About {
                            qname,
                            resolved: Some(resolved),
                            ..About::default()
                        }),
                );
            }
        };
        Admission::Allowed(Admitted {
            q,
            place,
            asked: Asked {
                ctx,
                start,
                now_ms,
                resolved,
                qname,
                hit: hit.map(|h| (model, h)),
            },
            rec,
        })
    }
}
