//! TLS secret material for the HTTP proxy (`terminatingTLS`, `originatingTLS`,
//! `headerMatches` with `secret`): read from a certificates directory
//! (`DIR/NAMESPACE/NAME/KEY`, the shape of Cilium's `/var/run/cilium/certs` and of
//! mounted Secrets, [`dir`]) or watched in one namespace of the Kubernetes API
//! ([`kube`]), and published to the proxy's [`SecretStore`], where a changed secret
//! applies to the next connection. And the rules whose material is missing or unusable
//! ([`broken`]): in the status, the event stream and the log.

pub mod broken;
pub mod dir;
pub mod kube;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proxy::tls::SecretStore;
use tokio::sync::watch;

/// Where the files source finds secrets when no `--certificates-dir` is given.
pub const DEFAULT_DIR: &str = "/var/run/ward/certs";
/// The only namespace whose Secrets the Kubernetes source reads.
pub const DEFAULT_NAMESPACE: &str = "ward-secrets";
/// How long the agent waits for the first complete read of the secrets before it
/// serves (rules whose secrets have not arrived fail closed until they do).
pub const FIRST_READ: Duration = Duration::from_secs(5);

/// Where the proxy's secrets come from (the agent's settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// `DIR/NAMESPACE/NAME/KEY`, watched.
    Dir(PathBuf),
    /// The Secrets of one namespace, watched.
    Kubernetes { namespace: String },
}

impl SecretSource {
    /// Why a policy's secret reference cannot be found, beyond "not found": the
    /// Kubernetes source reads one namespace only.
    pub fn hint(&self, secret_namespace: &str) -> Option<String> {
        match self {
            SecretSource::Kubernetes { namespace } if namespace != secret_namespace => Some(format!(
                "the agent reads Secrets only from namespace {namespace} (--policy-secrets-namespace)"
            )),
            _ => None,
        }
    }
}

/// A secret source ready to run: the Kubernetes one with its client.
pub enum Feed {
    Dir(dir::DirWatch),
    Kubernetes {
        client: ::kube::Client,
        namespace: String,
    },
}

impl Feed {
    /// Keeps `store` equal to the source's secrets from a task of its own; the
    /// receiver learns the store's generation after each change. Returns after the
    /// first complete read, or after [`FIRST_READ`] (said in the log).
    pub async fn start(self, store: Arc<SecretStore>) -> watch::Receiver<u64> {
        let what = match &self {
            Feed::Dir(d) => d.dir.display().to_string(),
            Feed::Kubernetes { namespace, .. } => format!("Secrets of namespace {namespace}"),
        };
        let (tx, mut rx) = watch::channel(store.generation());
        match self {
            Feed::Dir(d) => {
                tokio::spawn(d.run(store.clone(), tx));
            }
            Feed::Kubernetes { client, namespace } => {
                tokio::spawn(kube::watch(client, namespace, store.clone(), tx));
            }
        }
        match tokio::time::timeout(FIRST_READ, rx.changed()).await {
            Ok(_) => tracing::info!(
                from = what,
                secrets = store.load().len(),
                "TLS secrets read"
            ),
            Err(_) => tracing::warn!(
                from = what,
                "TLS secrets not read yet; rules that need them fail closed until they are"
            ),
        }
        rx
    }
}
