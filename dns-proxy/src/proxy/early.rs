//! The known answers' fast path: what the datapath holds of a name, read while the
//! query is upstream, so that a repeat of an answer read before leaves without a look
//! at the cache, from the upstream exchange itself when it can ([`ReplyNow`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::forward::WatchAnswer;
use crate::known::Known;

use std::time::Duration;

use hickory_proto::op::ResponseCode;

use crate::audit::{AuditRecord, Verdict};

use super::learn::LateHandOff;
use super::record::{About, KnownReply};
use super::{Asked, Handled, Proxy};

/// What the datapath held of a query's name when the query went upstream: the live IPs
/// with their expiry, at cache generation `generation`. Taken while the upstream works,
/// so that an answer with only these IPs leaves without looking at the cache and the
/// update chains again ([`Proxy::datapath_holds`]) on its way.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) generation: u64,
    pub(super) ips: Vec<(IpAddr, u64)>,
}

/// Sends a reply to the client at once, without waiting: how a known answer's repeat
/// leaves from the upstream exchange itself ([`Proxy::serve_with`]).
pub trait ReplyNow: Sync {
    /// `WouldBlock` when the socket does not take it at once.
    fn reply_now(&self, reply: &[u8]) -> std::io::Result<()>;

    /// Says that the reply could not be sent (not `WouldBlock`): it is lost.
    fn failed(&self, e: &std::io::Error) {
        tracing::debug!("udp reply failed: {e}");
    }
}

/// Releases a known answer's repeat the moment the upstream exchange reads it, before the
/// exchange winds down and the query's handling goes on: on a virtual machine every
/// microsecond before the reply's `sendto` lets the client's idle vCPU halt deeper.
pub(super) struct Early<'a> {
    pub(super) query: &'a [u8],
    pub(super) reply: &'a dyn ReplyNow,
    pub(super) generation: &'a AtomicU64,
    /// The known answer, and the generation the datapath's hold of its IPs was seen at;
    /// set once the query is out.
    pub(super) ahead: OnceLock<(Arc<Known>, u64)>,
    /// Whether the reply left from here (or failed to for good).
    pub(super) sent: AtomicBool,
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
                    self.reply.failed(&e);
                }
                self.sent.store(true, Ordering::Release);
            }
        }
    }
}

/// How much longer than the moment of the check an IP must stay held for an answer to be
/// released before its hand-off ([`Proxy::datapath_holds`]): the refresh runs right after
/// the reply, so a second is far more than it needs, and no expiry falls in between.
pub(super) const HELD_MARGIN_MS: u64 = 1_000;

impl Proxy {
    /// What the datapath holds of `qname` for `endpoint` now, when it holds some IPs
    /// and no update of the name is in flight.
    pub(super) fn held(&self, endpoint: &str, qname: &str) -> Option<Held> {
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
    pub(super) fn unmoved(&self, held: &Held) -> bool {
        self.inner.generation.load(Ordering::Acquire) == held.generation
    }

    /// The known answer to `question` from `server` when the datapath holds all of its
    /// IPs (per `held`) until `until_ms`: an answer that repeats it may leave unread.
    pub(super) fn known_ahead(
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
    pub(super) fn still_holds(&self, held: &Held, ips: &[IpAddr], until_ms: u64) -> bool {
        ips.iter().all(|ip| {
            held.ips
                .iter()
                .any(|&(x, expires_ms)| x == *ip && expires_ms >= until_ms)
        }) && self.unmoved(held)
    }

    /// Whether `answer` repeats `known`, the known answer to `query`, with nothing moved
    /// since `held` was taken: it may then leave unread.
    pub(super) fn repeats(&self, answer: &[u8], query: &[u8], known: &Known, held: &Held) -> bool {
        answer.get(..2) == query.get(..2) && known.matches(answer) && self.unmoved(held)
    }

    /// The reply of a known answer's repeat whose IPs the datapath still holds: it leaves
    /// now (or left from the exchange already: `replied`) and is read after the reply
    /// ([`Proxy::record`]), where the late hand-off refreshes the cache's expiry.
    pub(super) fn reply_repeat(
        &self,
        mut rec: AuditRecord,
        asked: Asked,
        answer: Vec<u8>,
        known: Arc<Known>,
        upstream: Duration,
        replied: bool,
    ) -> Handled {
        let ttl = known.ttl(&answer).max(self.inner.config.min_ttl);
        rec.ttl = Some(ttl);
        rec.datapath_confirmed = Some(true);
        let Asked {
            ctx,
            start,
            now_ms,
            resolved,
            qname,
            hit,
        } = asked;
        let late = LateHandOff {
            proxy: self.clone(),
            resolved: resolved.clone(),
            qname,
            cname_targets: Vec::new(),
            ips: Vec::new(),
            known: Some(known),
            ttl,
            now_ms,
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
                qname: String::new(),
                resolved: Some(resolved),
                hit,
                ips: Vec::new(),
            });
        handled.late = Some(late);
        handled.known = KnownReply::Repeat { server: ctx.server };
        handled.replied = replied;
        handled
    }
}
