//! The Kubernetes source: kube-rs watchers of Namespaces, Pods, Nodes, NetworkPolicies,
//! CiliumNetworkPolicies, CiliumClusterwideNetworkPolicies, AdminNetworkPolicies and
//! BaselineAdminNetworkPolicies feed one reconciler (`state`), which delivers the same
//! full `Snapshot` as the files source.
//!
//! - A kind whose CRD is not installed (404) is reported once and counts as empty; its
//!   watcher keeps retrying with backoff, so the watch starts when the CRD appears.
//! - kube's watcher lists again after `410 Gone` and reconnects dropped streams; errors
//!   back off exponentially (`default_backoff`).
//! - The first snapshot is delivered only after every kind finished its initial list.
//! - Changes are debounced: a burst of events becomes one snapshot.
//! - The leader (a Lease) writes the `Valid` condition of CNPs/CCNPs (`status`).

pub mod crd;
pub mod state;
pub mod status;

#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod tests;

use std::time::Duration;

use ::kube::api::{Api, DynamicObject};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::Client;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::source::{BoxFuture, Error, Snapshot, Source};
use state::{Applied, State, Update, WatchKind};
use status::{StatusConfig, StatusWant};

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// The kinds to watch (all of them in production; tests pick).
    pub kinds: Vec<WatchKind>,
    /// Quiet time after a change before a snapshot is delivered.
    pub debounce: Duration,
    /// Longest a burst of changes may delay a snapshot.
    pub max_delay: Duration,
    /// Write the `Valid` condition (when leader); off for tools and tests.
    pub status: Option<StatusConfig>,
}

impl Default for KubeOptions {
    fn default() -> KubeOptions {
        KubeOptions {
            kinds: WatchKind::ALL.to_vec(),
            debounce: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            status: Some(StatusConfig::from_env()),
        }
    }
}

/// Cluster state and policies from the Kubernetes API (`ward agent --source kubernetes`).
pub struct KubeSource {
    rx: mpsc::Receiver<(WatchKind, Update)>,
    state: State,
    options: KubeOptions,
    delivered: bool,
    status_tx: Option<watch::Sender<Vec<StatusWant>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts watching with the default options. Must be called inside a tokio runtime.
    pub fn new(client: Client) -> KubeSource {
        KubeSource::with_options(client, KubeOptions::default())
    }

    pub fn with_options(client: Client, options: KubeOptions) -> KubeSource {
        let (tx, rx) = mpsc::channel(1024);
        let mut tasks = Vec::new();
        for kind in &options.kinds {
            tasks.push(tokio::spawn(watch_kind(client.clone(), *kind, tx.clone())));
        }
        let status_tx = options.status.clone().map(|cfg| {
            let (stx, srx) = watch::channel(Vec::new());
            tasks.push(tokio::spawn(status::run(client.clone(), cfg, srx)));
            stx
        });
        KubeSource {
            rx,
            state: State::new(&options.kinds),
            options,
            delivered: false,
            status_tx,
            tasks,
        }
    }

    /// Whether every watched kind finished its initial list.
    #[cfg(test)]
    pub fn ready(&self) -> bool {
        self.state.ready()
    }

    /// Applies one update; true when a snapshot is due.
    fn apply(&mut self, kind: WatchKind, update: Update) -> bool {
        if let Update::Failed(e) = &update {
            tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying with backoff");
        }
        match self.state.apply(kind, update) {
            Applied::Changed => true,
            Applied::Unchanged => false,
            Applied::NewlyMissing => {
                tracing::warn!(
                    kind = kind.name(),
                    "the API server does not serve this kind (CRD not installed); skipped until it appears"
                );
                true
            }
        }
    }

    async fn next_snapshot(&mut self) -> Result<Snapshot, Error> {
        loop {
            let mut due = false;
            // wait for something to do
            let (kind, update) = self.rx.recv().await.ok_or(Error::WatchesStopped)?;
            due |= self.apply(kind, update);
            if !self.state.ready() {
                continue;
            }
            if !due && self.delivered {
                continue;
            }
            // debounce: until quiet for `debounce`, at most `max_delay`
            let deadline = tokio::time::Instant::now() + self.options.max_delay;
            loop {
                let quiet = tokio::time::Instant::now() + self.options.debounce;
                match tokio::time::timeout_at(quiet.min(deadline), self.rx.recv()).await {
                    Ok(Some((kind, update))) => {
                        self.apply(kind, update);
                    }
                    Ok(None) => return Err(Error::WatchesStopped),
                    Err(_) => break,
                }
            }
            if !self.state.ready() {
                continue;
            }
            self.delivered = true;
            if let Some(tx) = &self.status_tx {
                tx.send_replace(status::wanted(self.state.policies()));
            }
            return Ok(self.state.snapshot());
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Source for KubeSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Snapshot, Error>> {
        Box::pin(self.next_snapshot())
    }
}

/// Whether a watcher error means "this kind is not served" (its CRD is missing).
fn is_missing(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            ::kube::Error::Api(r) => Some(r.code),
            _ => None,
        },
        watcher::Error::WatchError(r) => Some(r.code),
        watcher::Error::NoResourceVersion => None,
    };
    api == Some(404)
}

/// Watches one kind until the receiver is gone.
async fn watch_kind(client: Client, kind: WatchKind, tx: mpsc::Sender<(WatchKind, Update)>) {
    let ar = kind.api_resource();
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(item) = stream.next().await {
        let update = match item {
            Ok(ev) => Update::Event(ev),
            Err(e) if is_missing(&e) => Update::Missing,
            Err(e) => Update::Failed(e.to_string()),
        };
        if tx.send((kind, update)).await.is_err() {
            return;
        }
    }
}
