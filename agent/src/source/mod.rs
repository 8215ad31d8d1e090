//! Sources of cluster state and policies. A source delivers full snapshots; the agent
//! diffs them through the policy store. [`files`] (a directory of YAML) is the embedded
//! default; [`kube`] watches the Kubernetes API and delivers the same [`Snapshot`].

pub mod files;
pub mod kube;

use policy_model::api::Object;
use policy_model::{Cluster, PolicyError};

pub use files::FilesSource;

/// Why a source has no snapshot. The agent logs it, keeps what is in force, and asks
/// again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{dir}: {source}")]
    Files {
        dir: std::path::PathBuf,
        source: crate::inputs::Error,
    },
    #[error("{dir}: the read stopped: {reason}")]
    ReadTask {
        dir: std::path::PathBuf,
        reason: String,
    },
    #[error("every Kubernetes watch stopped")]
    WatchesStopped,
}

/// Everything a source knows at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cluster: Cluster,
    pub objects: Vec<Object>,
    /// Input problems that name no valid object (YAML errors, unknown kinds, bad cluster
    /// files). Invalid objects are in `objects` and report through the store.
    pub errors: Vec<PolicyError>,
}

/// A boxed future, so that `Source` stays object safe.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where the agent learns cluster state and policies. The files source and the
/// Kubernetes source (issue 7) both implement it; the agent loop sees only this trait.
pub trait Source: Send {
    /// A short name for logs and status: "files", "kubernetes".
    fn name(&self) -> &'static str;

    /// Waits for the next full snapshot. The first call returns the initial state once
    /// the source has synced; later calls return when something changed. On an error the
    /// agent logs it, keeps what is in force, and calls again.
    fn next(&mut self) -> BoxFuture<'_, Result<Snapshot, Error>>;
}
