//! TLS on ports whose rules carry `serverNames` or a TLS context: the ClientHello is read
//! with rustls without losing a byte ([`hello`]), the policy decides the session by its
//! SNI (`policy_model::Model::tls_session`), and the session is reset, spliced to the
//! original destination untouched, or intercepted: terminated with the rule's
//! certificate (or a leaf minted from its CA, [`material`]), its requests checked like
//! plaintext HTTP, and TLS originated to the server, verified against the rule's CA.

pub mod hello;
pub mod material;
pub mod secrets;
mod serve;

use policy_model::flow::Matched;
use policy_model::tls::TlsContext;

pub use material::{LeafName, MaterialError, MaterialSettings, Materials, Origin};
pub use secrets::{Secret, SecretData, SecretSet, SecretStore};
pub(crate) use serve::{plaintext_refused, refuse_plaintext, serve};

use crate::audit::{self, Rule};
use crate::upstream::UpstreamTls;

/// What an intercepted session was set up with: its SNI and the rule's contexts. A
/// policy change that decides the session otherwise denies its further requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionKey {
    pub sni: Option<String>,
    pub terminating: TlsContext,
    pub originating: Option<TlsContext>,
}

/// An intercepted session, as the requests of its connection need it.
#[derive(Debug)]
pub struct TlsConn {
    pub session: SessionKey,
    /// The rule whose contexts terminate and originate the session.
    pub rule: Matched,
    /// How its requests go upstream.
    pub upstream: UpstreamTls,
}

impl TlsConn {
    /// The `TLS` part of the audit records of the session's requests.
    pub fn record(&self) -> audit::Tls {
        audit::Tls {
            sni: self.session.sni.clone(),
            mode: "intercept".into(),
            rule: Some(Rule::from(&self.rule)),
            secret: Some(self.session.terminating.secret.to_string()),
        }
    }
}

/// A rule whose TLS material cannot be used, for the agent's status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BrokenRule {
    /// `Kind namespace/name`.
    pub policy: String,
    /// The `toPorts` entry, e.g. `spec.egress[0].toPorts[0]`.
    pub rule: String,
    /// `namespace/name` of the secret at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub reason: String,
}

impl Materials {
    /// Every rule of `model` whose TLS material is missing or unusable now (built as
    /// the proxy would build it). Sets `ward_proxy_tls_broken_rules`.
    pub fn broken_rules(&self, model: &policy_model::Model) -> Vec<BrokenRule> {
        let mut out = Vec::new();
        for p in &model.policies {
            for r in &p.rules {
                for g in &r.ports {
                    let Some(tls) = &g.tls else { continue };
                    let Some(term) = &tls.terminating else {
                        continue;
                    };
                    let checked = self
                        .check(term)
                        .and_then(|()| self.origin(tls.originating.as_ref()).map(|_| ()));
                    if let Err(e) = checked {
                        out.push(BrokenRule {
                            policy: p.object.to_string(),
                            rule: g.path.clone(),
                            secret: e.secret.as_ref().map(ToString::to_string),
                            reason: e.reason,
                        });
                    }
                }
            }
        }
        self.metrics()
            .tls_broken_rules
            .set(i64::try_from(out.len()).unwrap_or(i64::MAX));
        out
    }
}
