//! The Secrets of one namespace (`--policy-secrets-namespace`, default
//! `ward-secrets`), watched with kube-rs and published to the proxy's secret store. The
//! agent's RBAC (deploy/rbac.yaml) allows reading Secrets in that namespace only, so a
//! policy cannot make the agent read any other Secret.

use std::collections::HashMap;
use std::sync::Arc;

use ::kube::api::Api;
use ::kube::runtime::{watcher, WatchStreamExt};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use policy_model::tls::SecretRef;
use proxy::tls::{SecretData, SecretStore};
use tokio::sync::watch;

/// The keys of a Secret as files would hold them: `data` (base64-decoded by
/// k8s-openapi) and `stringData`.
fn secret_data(s: &Secret) -> SecretData {
    let mut keys: SecretData = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        keys.insert(k.clone(), v.clone().into_bytes());
    }
    keys
}

/// Keeps `store` equal to the Secrets of `namespace`, telling `changed` the store's
/// generation after the first complete list and each change. A failing watch is retried with backoff, keeping what
/// was published.
pub async fn watch(
    client: ::kube::Client,
    namespace: String,
    store: Arc<SecretStore>,
    changed: watch::Sender<u64>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut known: HashMap<String, SecretData> = HashMap::new();
    let mut listing: Option<HashMap<String, SecretData>> = None;
    let mut first = true;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => {
                listing = Some(HashMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(s)) => {
                if let (Some(l), Some(name)) = (listing.as_mut(), s.metadata.name.clone()) {
                    l.insert(name, secret_data(&s));
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => known = listing.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(s)) => {
                if let Some(name) = s.metadata.name.clone() {
                    known.insert(name, secret_data(&s));
                }
            }
            Ok(watcher::Event::Delete(s)) => {
                if let Some(name) = &s.metadata.name {
                    known.remove(name);
                }
            }
            Err(e) => {
                tracing::warn!(namespace, error = %e, "watching TLS secrets failed; retrying with backoff");
                continue;
            }
        }
        let secrets: HashMap<SecretRef, SecretData> = known
            .iter()
            .map(|(name, data)| {
                (
                    SecretRef {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    },
                    data.clone(),
                )
            })
            .collect();
        let n = secrets.len();
        if store.publish(secrets) {
            tracing::info!(namespace, secrets = n, "TLS secrets changed");
            changed.send_replace(store.generation());
        } else if first {
            changed.send_replace(store.generation());
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::source::kube::fake_api::FakeApi;

    const SECRETS: &str = "/api/v1/secrets";

    fn secret(ns: &str, name: &str, key: &str, value: &str) -> serde_json::Value {
        let s = Secret {
            metadata: ::kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                key.to_string(),
                k8s_openapi::ByteString(value.as_bytes().to_vec()),
            )])),
            ..Default::default()
        };
        let mut v = serde_json::to_value(s).unwrap();
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Secret");
        v
    }

    async fn next_change(rx: &mut watch::Receiver<u64>) {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a change within 10 s")
            .unwrap();
    }

    /// Secrets of the secrets namespace only, with changes and deletions applied (the
    /// real kube-rs watcher against an in-test API server: no API server runs here).
    #[tokio::test]
    async fn kubernetes_secrets_are_watched_in_one_namespace_only() {
        let fake = FakeApi::start(&[SECRETS]).await;
        fake.apply(SECRETS, secret("ward-secrets", "token", "value", "one"));
        fake.apply(SECRETS, secret("other", "stolen", "value", "no"));
        let store = Arc::new(SecretStore::new());
        let (tx, mut rx) = watch::channel(0);
        let task = tokio::spawn(watch(
            fake.client(),
            "ward-secrets".into(),
            store.clone(),
            tx,
        ));
        let r = |ns: &str, name: &str| SecretRef {
            namespace: ns.into(),
            name: name.into(),
        };
        let value = |ns, name| {
            policy_model::tls::Secrets::value(store.as_ref(), &r(ns, name)).map(|v| v.to_string())
        };
        next_change(&mut rx).await;
        assert_eq!(value("ward-secrets", "token").as_deref(), Some("one"));
        assert_eq!(value("other", "stolen"), None);
        assert_eq!(store.load().len(), 1);
        fake.apply(SECRETS, secret("ward-secrets", "token", "value", "two"));
        next_change(&mut rx).await;
        assert_eq!(value("ward-secrets", "token").as_deref(), Some("two"));
        fake.delete(SECRETS, Some("ward-secrets"), "token");
        next_change(&mut rx).await;
        assert_eq!(value("ward-secrets", "token"), None);
        let scopes = fake.scopes(SECRETS);
        assert!(!scopes.is_empty());
        assert!(
            scopes.iter().all(|s| s.as_deref() == Some("ward-secrets")),
            "every list and watch is scoped to the secrets namespace: {scopes:?}"
        );
        task.abort();
    }
}
