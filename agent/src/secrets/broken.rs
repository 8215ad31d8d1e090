//! The rules whose TLS material is missing or unusable (no secret, a key absent, bad
//! PEM, a key that does not belong to its certificate, no CA to originate with). The
//! proxy resets their connections (fail closed, per rule); this task says which ones
//! and why: the agent's status, a `tls` event and a log line when a rule breaks, a log
//! line when it is usable again. Checked after every policy change and every change of
//! the secrets.

use tokio::sync::watch;

use super::SecretSource;
use crate::admin::api::{self, BrokenTlsRule, Event};
use crate::telemetry::events::Events;

/// The broken rules of the proxy's current policy, as the status shows them.
pub fn broken_rules(proxy: &proxy::Proxy, source: &SecretSource) -> Vec<BrokenTlsRule> {
    let model = proxy.store().load().model.clone();
    proxy
        .materials()
        .broken_rules(&model)
        .into_iter()
        .map(|b| {
            let hint = b
                .secret
                .as_deref()
                .and_then(|s| s.split_once('/'))
                .filter(|_| b.reason.ends_with("not found"))
                .and_then(|(ns, _)| source.hint(ns));
            BrokenTlsRule {
                policy: b.policy,
                rule: b.rule,
                secret: b.secret,
                reason: match hint {
                    Some(h) => format!("{}: {h}", b.reason),
                    None => b.reason,
                },
            }
        })
        .collect()
}

/// Keeps `out` equal to the broken rules until the proxy's policy store or the secrets
/// stop; publishes a `tls` event for each rule that breaks.
pub async fn report(
    proxy: proxy::Proxy,
    source: SecretSource,
    events: Events,
    mut secrets: watch::Receiver<u64>,
    out: watch::Sender<Vec<BrokenTlsRule>>,
) {
    let mut policies = proxy.store().subscribe();
    let mut before: Vec<BrokenTlsRule> = Vec::new();
    loop {
        // marked seen before the check: a change while checking wakes the next round
        policies.borrow_and_update();
        secrets.borrow_and_update();
        let now = broken_rules(&proxy, &source);
        for b in now.iter().filter(|b| !before.contains(b)) {
            tracing::warn!(
                policy = %b.policy,
                rule = %b.rule,
                secret = b.secret.as_deref().unwrap_or("-"),
                reason = %b.reason,
                "TLS material unusable: the rule's connections are reset"
            );
            events.publish(&Event::Tls(api::TlsMaterial {
                time: proxy::audit::timestamp(std::time::SystemTime::now()),
                rule: b.clone(),
            }));
        }
        for b in before
            .iter()
            .filter(|b| !now.iter().any(|n| n.rule == b.rule && n.policy == b.policy))
        {
            tracing::info!(policy = %b.policy, rule = %b.rule, "TLS material usable again");
        }
        out.send_replace(now.clone());
        before = now;
        tokio::select! {
            r = policies.changed() => if r.is_err() { return },
            r = secrets.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;
    use std::time::Duration;

    use policy_model::tls::SecretRef;
    use policy_model::Model;
    use proxy::tls::SecretStore;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

    use super::*;

    const CLUSTER: &str = "namespaces: [{name: app}]
pods: [{namespace: app, name: client, labels: {app: client}, ip: 10.0.0.1}]
";

    /// Two intercepting rules on one port (different names, different secrets) and a
    /// splicing one.
    const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: saas, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [203.0.113.0/24]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.payments.example]
      terminatingTLS: {secret: {name: intercept-ca}}
      originatingTLS: {secret: {name: public-ca}}
      rules:
        http: [{method: GET, path: /v1/charges}]
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [other.example]
      terminatingTLS: {secret: {name: other-ca}}
      originatingTLS: {secret: {name: public-ca}}
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [cdn.example]
";

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    fn secret(name: &str, keys: &[(&str, String)]) -> (SecretRef, BTreeMap<String, Vec<u8>>) {
        (
            SecretRef {
                namespace: "app".into(),
                name: name.into(),
            },
            keys.iter()
                .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
                .collect(),
        )
    }

    fn proxy_with(store: Arc<SecretStore>) -> proxy::Proxy {
        let cluster: policy_model::Cluster = serde_yaml::from_str(CLUSTER).unwrap();
        let parsed = policy_model::api::parse(POLICY, Some("saas.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let policies = parsed
            .objects
            .iter()
            .flat_map(|o| o.translate().unwrap())
            .collect();
        let model = Model::compile(&cluster, policies, Default::default());
        let metrics = proxy::Metrics::new();
        let (audit, _rx) = proxy::AuditLog::channel(16, proxy::DroppedCounter::new());
        proxy::Proxy::with_secrets(
            proxy::Config::default(),
            Arc::new(proxy::PolicyStore::new(model)),
            proxy::Mode::Transparent { node: None },
            audit,
            metrics,
            store,
        )
    }

    async fn next(rx: &mut watch::Receiver<Vec<BrokenTlsRule>>) -> Vec<BrokenTlsRule> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a report within 5 s")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    /// Each kind of unusable material is reported per rule, with the secret and the
    /// reason; the other rules stay usable; a fixed secret clears the report without a
    /// restart; a rule that breaks is one `tls` event.
    #[tokio::test]
    async fn broken_material_is_reported_per_rule_and_clears_when_fixed() {
        let store = Arc::new(SecretStore::new());
        let proxy = proxy_with(store.clone());
        let events = Events::new();
        let (secrets_tx, secrets_rx) = watch::channel(0);
        let (tx, mut rx) = watch::channel(Vec::new());
        let task = tokio::spawn(report(
            proxy,
            SecretSource::Dir("/certs".into()),
            events.clone(),
            secrets_rx,
            tx,
        ));
        let publish = |secrets: Vec<(SecretRef, BTreeMap<String, Vec<u8>>)>| {
            store.publish(secrets.into_iter().collect::<HashMap<_, _>>());
            secrets_tx.send_replace(store.generation());
        };

        // nothing yet: both intercepting rules, each naming its terminating secret
        let b = next(&mut rx).await;
        let rules: Vec<(&str, Option<&str>)> = b
            .iter()
            .map(|b| (b.rule.as_str(), b.secret.as_deref()))
            .collect();
        assert_eq!(
            rules,
            [
                ("spec.egress[0].toPorts[0]", Some("app/intercept-ca")),
                ("spec.egress[0].toPorts[1]", Some("app/other-ca"))
            ],
            "{b:?}"
        );
        assert!(
            b[0].reason.ends_with("secret app/intercept-ca not found"),
            "{b:?}"
        );
        assert_eq!(b[0].policy, "CiliumNetworkPolicy app/saas");
        assert_eq!(events.recent().len(), 2, "one event per rule that broke");

        let intercept = ca();
        let other = ca();
        let public = ca();
        let good = |c: &CertifiedIssuer<'static, KeyPair>| {
            vec![("tls.crt", c.pem()), ("tls.key", c.key().serialize_pem())]
        };
        let mut fine = vec![
            secret("other-ca", &good(&other)),
            secret("public-ca", &[("ca.crt", public.pem())]),
        ];
        let cases: [(Vec<(&str, String)>, &str); 4] = [
            (vec![("tls.crt", intercept.pem())], "tls.key"),
            (
                vec![
                    ("tls.crt", "not PEM".into()),
                    ("tls.key", intercept.key().serialize_pem()),
                ],
                "tls.crt",
            ),
            (
                vec![
                    ("tls.crt", intercept.pem()),
                    ("tls.key", other.key().serialize_pem()),
                ],
                "does not belong to the certificate",
            ),
            (
                vec![
                    ("tls.crt", intercept.pem()),
                    (
                        "tls.key",
                        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
                    ),
                ],
                "tls.key",
            ),
        ];
        for (keys, reason) in cases {
            let mut s = fine.clone();
            s.push(secret("intercept-ca", &keys));
            publish(s);
            let b = next(&mut rx).await;
            assert_eq!(b.len(), 1, "only the broken rule: {b:?}");
            assert_eq!(b[0].rule, "spec.egress[0].toPorts[0]");
            assert_eq!(b[0].secret.as_deref(), Some("app/intercept-ca"));
            assert!(b[0].reason.contains(reason), "{reason}: {b:?}");
        }

        // the originating side: its CA missing breaks both rules that originate with it
        fine.pop();
        fine.push(secret("intercept-ca", &good(&intercept)));
        publish(fine.clone());
        let b = next(&mut rx).await;
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(
            b.iter()
                .all(|b| b.secret.as_deref() == Some("app/public-ca")
                    && b.reason.ends_with("secret app/public-ca not found")),
            "{b:?}"
        );

        fine.push(secret("public-ca", &[("ca.crt", public.pem())]));
        let before = events.recent().len();
        publish(fine);
        assert!(next(&mut rx).await.is_empty(), "fixed without a restart");
        assert_eq!(events.recent().len(), before, "no event for a recovery");
        task.abort();
    }

    /// With the Kubernetes source, a secret outside the secrets namespace is not found,
    /// and the reason says where the agent looks.
    #[test]
    fn a_secret_outside_the_secrets_namespace_says_where_secrets_are_read() {
        let proxy = proxy_with(Arc::new(SecretStore::new()));
        let b = broken_rules(
            &proxy,
            &SecretSource::Kubernetes {
                namespace: "ward-secrets".into(),
            },
        );
        assert!(
            b[0].reason.ends_with(
                "secret app/intercept-ca not found: the agent reads Secrets only from namespace ward-secrets (--policy-secrets-namespace)"
            ),
            "{b:?}"
        );
        let b = broken_rules(&proxy, &SecretSource::Dir("/certs".into()));
        assert!(b[0].reason.ends_with("not found"), "{b:?}");
    }
}
