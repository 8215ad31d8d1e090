//! A TLS connection's path: handshake permit -> ClientHello (within the handshake
//! timeout) -> the session's decision -> reset, splice, or interception (material, the
//! client's handshake, then the requests as plaintext HTTP with TLS upstream). Each
//! session that is not intercepted gets one audit record; an intercepted one gets one
//! per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use policy_model::flow::{Matched, SideDecision};
use policy_model::tls::{Interception, TlsSession};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout_at;
use tokio_rustls::StartHandshake;

use super::hello::{read_hello, Hello};
use super::{LeafName, MaterialError, SessionKey, TlsConn};
use crate::audit::{self, Endpoint, Record, Rule, Verdict};
use crate::detect::{detect, HttpVersion, Prefixed};
use crate::idle::IdleTimeout;
use crate::policy::ConnPolicy;
use crate::server::{Downstream, Proxy};
use crate::upstream::UpstreamTls;

type Io<S> = Prefixed<IdleTimeout<S>>;

/// Serves a connection whose first byte opened a TLS handshake record.
pub(crate) async fn serve<S: Downstream>(
    proxy: &Proxy,
    mut io: Io<S>,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) {
    let sh = &proxy.shared;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + sh.config.tls_handshake_timeout();
    let errors = &sh.metrics.tls_handshake_errors;
    let Ok(Ok(permit)) = timeout_at(deadline, sh.handshakes.clone().acquire_owned()).await else {
        errors.with_label_values(&["limit"]).inc();
        tracing::debug!("{peer}: no handshake slot within the handshake timeout");
        reset(&io);
        return;
    };
    let hello = match timeout_at(deadline, read_hello(&mut io)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            errors.with_label_values(&["client_hello"]).inc();
            tracing::debug!("{peer} -> {orig_dst}: {e}");
            let snap = sh.store.load();
            let cp = sh.mode.resolve(&snap, peer, orig_dst);
            let tls = session_tls(None, "reset", None, None);
            record(
                proxy,
                &cp,
                peer,
                orig_dst,
                start,
                Verdict::Error,
                tls,
                Vec::new(),
                || e.to_string(),
            );
            reset(&io);
            return;
        }
        Err(_) => {
            errors.with_label_values(&["timeout"]).inc();
            tracing::debug!("{peer}: no ClientHello within the handshake timeout");
            reset(&io);
            return;
        }
    };
    let snap = sh.store.load();
    let cp = sh.mode.resolve(&snap, peer, orig_dst);
    let session = snap.model.tls_session(&cp.policy, hello.sni.as_deref());
    let sessions = &sh.metrics.tls_sessions;
    let direction = cp.direction.to_string();
    match session {
        TlsSession::Reset { reason, rule } => {
            sessions.with_label_values(&[&direction, "reset"]).inc();
            let tls = session_tls(hello.sni.clone(), "reset", rule.as_ref(), None);
            record(
                proxy,
                &cp,
                peer,
                orig_dst,
                start,
                Verdict::Denied,
                tls,
                Vec::new(),
                || reason.to_string(),
            );
            reset(&io);
        }
        TlsSession::Splice { allowed_by } => {
            drop(permit);
            sessions.with_label_values(&[&direction, "spliced"]).inc();
            splice(proxy, io, hello, peer, orig_dst, cp, allowed_by, start).await;
        }
        TlsSession::Intercept(i) => {
            let requests = cp.clone().with_policy(&snap.model, i.policy.clone());
            drop(snap);
            let at = Deadline { deadline, start };
            intercept(proxy, io, hello, (peer, orig_dst), cp, *i, requests, at).await;
            drop(permit);
        }
    }
}

/// Why plaintext may not pass on this connection: a side whose rules carry TLS refuses
/// plaintext (a listed SNI is required, or every rule for the peer needs TLS).
pub(crate) fn plaintext_refused(p: &ConnPolicy) -> Option<String> {
    p.policy
        .sides
        .iter()
        .find_map(|s| match (&s.tls, &s.decision) {
            (Some(_), SideDecision::Deny { reason }) => {
                Some(format!("{} of {}: {reason}", s.direction, s.endpoint))
            }
            _ => None,
        })
}

/// The record of a plaintext connection refused by [`plaintext_refused`] (reset).
pub(crate) fn refuse_plaintext(
    proxy: &Proxy,
    p: &ConnPolicy,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    why: String,
) {
    proxy
        .shared
        .metrics
        .tls_sessions
        .with_label_values(&[&p.direction.to_string(), "reset"])
        .inc();
    let tls = session_tls(None, "reset", None, None);
    record(
        proxy,
        p,
        peer,
        orig_dst,
        Instant::now(),
        Verdict::Denied,
        tls,
        Vec::new(),
        || why,
    );
}

fn reset<S: Downstream>(io: &Io<S>) {
    io.get_ref().get_ref().reset_on_close();
}

fn session_tls(
    sni: Option<String>,
    mode: &'static str,
    rule: Option<&Matched>,
    secret: Option<String>,
) -> audit::Tls {
    audit::Tls {
        sni,
        mode: mode.into(),
        rule: rule.map(Rule::from),
        secret,
    }
}

/// The audit record of a session decided as a whole (no request in it).
#[allow(clippy::too_many_arguments)]
fn record(
    proxy: &Proxy,
    p: &ConnPolicy,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    start: Instant,
    verdict: Verdict,
    tls: audit::Tls,
    allowed_by: Vec<Rule>,
    info: impl FnOnce() -> String,
) {
    let sh = &proxy.shared;
    if !sh.audit.enabled() {
        return;
    }
    sh.audit.record(Record {
        timestamp: audit::timestamp(SystemTime::now()),
        observation_point: match p.direction {
            policy_model::Direction::Ingress => "Ingress",
            policy_model::Direction::Egress => "Egress",
        }
        .into(),
        verdict,
        source_endpoint: Endpoint {
            ip: peer.ip().to_string(),
            port: peer.port(),
            identity: p.source.identity,
            pod: p.source.endpoint.clone(),
        },
        destination_endpoint: Endpoint {
            ip: orig_dst.ip().to_string(),
            port: orig_dst.port(),
            identity: p.destination.identity,
            pod: p.destination.endpoint.clone(),
        },
        http: None,
        tls: Some(tls),
        latency_ns: u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        policy_generation: p.generation,
        allowed_by,
        info: info(),
    });
}

/// Passes the session's bytes (the ClientHello as read, then both ways) between the
/// client and the original destination. A policy change that no longer splices the
/// session (same SNI) closes it.
#[allow(clippy::too_many_arguments)]
async fn splice<S: Downstream>(
    proxy: &Proxy,
    mut io: Io<S>,
    hello: Hello,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    cp: ConnPolicy,
    allowed_by: Vec<Matched>,
    start: Instant,
) {
    let sh = &proxy.shared;
    let src = sh.config.transparent_source.then_some(peer.ip());
    let tls = || session_tls(hello.sni.clone(), "splice", allowed_by.first(), None);
    let mut up = match sh.upstream.connect(src, orig_dst).await {
        Ok(s) => s,
        Err(e) => {
            sh.metrics
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
            record(
                proxy,
                &cp,
                peer,
                orig_dst,
                start,
                Verdict::Error,
                tls(),
                Vec::new(),
                || e.to_string(),
            );
            reset(&io);
            return;
        }
    };
    let rules = allowed_by.iter().map(Rule::from).collect();
    record(
        proxy,
        &cp,
        peer,
        orig_dst,
        start,
        Verdict::Forwarded,
        tls(),
        rules,
        String::new,
    );
    if let Err(e) = up.write_all(&hello.bytes).await {
        tracing::debug!("{peer} -> {orig_dst}: splice: {e}");
        reset(&io);
        return;
    }
    let mut changes = sh.store.subscribe();
    let copy = tokio::io::copy_bidirectional(&mut io, &mut up);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!("{peer} -> {orig_dst}: spliced session ended: {e}");
                }
                return;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    let _ = (&mut copy).await;
                    return;
                }
                let snap = sh.store.load();
                let now = sh.mode.resolve(&snap, peer, orig_dst);
                let still = matches!(
                    snap.model.tls_session(&now.policy, hello.sni.as_deref()),
                    TlsSession::Splice { .. }
                );
                if !still {
                    tracing::info!(
                        "{peer} -> {orig_dst}: closing spliced TLS session (SNI {:?}): the policy no longer admits it",
                        hello.sni
                    );
                    sh.metrics.tunnels_closed.inc();
                    return;
                }
            }
        }
    }
}

/// When the handshake must be done, and when the connection's first byte came.
struct Deadline {
    deadline: tokio::time::Instant,
    start: Instant,
}

/// Terminates the session with the rule's material and serves its requests (`requests`:
/// their policy); material that is missing or unusable resets the connection (fail
/// closed, for this rule only).
#[allow(clippy::too_many_arguments)]
async fn intercept<S: Downstream>(
    proxy: &Proxy,
    io: Io<S>,
    hello: Hello,
    (peer, orig_dst): (SocketAddr, SocketAddr),
    cp: ConnPolicy,
    i: Interception,
    requests: ConnPolicy,
    Deadline { deadline, start }: Deadline,
) {
    let sh = &proxy.shared;
    let direction = cp.direction.to_string();
    let leaf = match &hello.sni {
        Some(n) => LeafName::Dns(n.clone()),
        None => LeafName::Ip(orig_dst.ip()),
    };
    let material = sh
        .materials
        .server_config(&i.terminating, &leaf)
        .and_then(|server| {
            let origin = sh.materials.origin(i.originating.as_ref())?;
            Ok((server, origin))
        });
    let (server, origin) = match material {
        Ok(m) => m,
        Err(e) => {
            fail_closed(proxy, &cp, &i.rule, &hello, e, peer, orig_dst, start);
            sh.metrics
                .tls_sessions
                .with_label_values(&[&direction, "reset"])
                .inc();
            reset(&io);
            return;
        }
    };
    let name = match &hello.sni {
        Some(n) => ServerName::try_from(n.clone()).ok(),
        None => Some(ServerName::IpAddress(orig_dst.ip().into())),
    };
    let Some(name) = name else {
        // rustls gave it as a DNS name, so this cannot happen; refuse rather than guess
        reset(&io);
        return;
    };
    let (_, inner) = io.into_parts();
    let rest = hello.bytes.len().saturating_sub(hello.rest);
    let transport = Prefixed::new(Bytes::copy_from_slice(&hello.bytes[rest..]), inner);
    let sni = hello.sni.clone();
    let accept = StartHandshake::from_parts(hello.accepted, transport).into_stream(server);
    let tls = match timeout_at(deadline, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            sh.metrics
                .tls_handshake_errors
                .with_label_values(&["handshake"])
                .inc();
            let t = session_tls(sni, "intercept", Some(&i.rule), None);
            record(
                proxy,
                &cp,
                peer,
                orig_dst,
                start,
                Verdict::Error,
                t,
                Vec::new(),
                || format!("TLS handshake with the client failed: {e}"),
            );
            return;
        }
        Err(_) => {
            sh.metrics
                .tls_handshake_errors
                .with_label_values(&["timeout"])
                .inc();
            return;
        }
    };
    sh.metrics
        .tls_sessions
        .with_label_values(&[&direction, "intercepted"])
        .inc();
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let session = SessionKey {
        sni,
        terminating: i.terminating,
        originating: i.originating,
    };
    let conn = |version: HttpVersion| {
        Arc::new(TlsConn {
            session: session.clone(),
            rule: i.rule.clone(),
            upstream: UpstreamTls {
                config: match version {
                    HttpVersion::Http1 => origin.h1.clone(),
                    HttpVersion::H2c => origin.h2.clone(),
                },
                name: name.clone(),
                trust: origin.id,
            },
        })
    };
    let policy = requests;
    match negotiated.as_deref() {
        Some(b"h2") => {
            let c = conn(HttpVersion::H2c);
            proxy
                .serve_http(tls, HttpVersion::H2c, peer, orig_dst, policy, Some(c))
                .await;
        }
        Some(b"http/1.1") => {
            let c = conn(HttpVersion::Http1);
            proxy
                .serve_http(tls, HttpVersion::Http1, peer, orig_dst, policy, Some(c))
                .await;
        }
        _ => {
            // no ALPN: the first bytes tell (HTTP/2 with prior knowledge, or HTTP/1)
            let t = sh.config.header_read_timeout();
            let Ok(Ok((version, tls))) = tokio::time::timeout(t, detect(tls)).await else {
                return;
            };
            let c = conn(version);
            proxy
                .serve_http(tls, version, peer, orig_dst, policy, Some(c))
                .await;
        }
    }
}

/// A session whose rule's material cannot be used: counted, recorded (policy, rule and
/// secret), and reset by the caller.
#[allow(clippy::too_many_arguments)]
fn fail_closed(
    proxy: &Proxy,
    cp: &ConnPolicy,
    rule: &Matched,
    hello: &Hello,
    e: MaterialError,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    start: Instant,
) {
    let secret = e.secret.as_ref().map(ToString::to_string);
    proxy
        .shared
        .metrics
        .tls_material_resets
        .with_label_values(&[&rule.policy, &rule.rule, secret.as_deref().unwrap_or("")])
        .inc();
    tracing::debug!(
        "{peer} -> {orig_dst}: {} {}: TLS material unusable, reset: {e}",
        rule.policy,
        rule.rule
    );
    let tls = session_tls(hello.sni.clone(), "reset", Some(rule), secret);
    record(
        proxy,
        cp,
        peer,
        orig_dst,
        start,
        Verdict::Error,
        tls,
        Vec::new(),
        || {
            format!(
                "fail closed: {} {}: TLS material unusable: {e}",
                rule.policy, rule.rule
            )
        },
    );
}
