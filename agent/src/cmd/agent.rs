//! `ward agent`: enters the node's network namespace, starts the runtime, and runs the
//! agent (`agent::app`) on the source its settings name.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agent::app::config::{self, Args, SourceKind};
use agent::source::{FilesSource, Source};
use anyhow::{bail, Context, Result};

pub fn run(a: Args) -> Result<ExitCode> {
    // Before any thread starts: setns changes only the calling thread.
    if let Some(ns) = &a.netns {
        enter_netns(ns)?;
    }
    let s = config::settings(a)?;
    config::warn_private_bpffs(&s.bpf_root);
    std::fs::create_dir_all(&s.state_dir)
        .with_context(|| format!("cannot create {}", s.state_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let r = rt.block_on(async {
        let source: Box<dyn Source> = match (s.source, &s.source_dir) {
            (SourceKind::Files, Some(dir)) => Box::new(FilesSource::new(dir).with_rescan(s.rescan)),
            (SourceKind::Files, None) => bail!("the files source needs --source-dir"),
            (SourceKind::Kubernetes, _) => {
                let client = ::kube::Client::try_default().await.context(
                    "cannot reach the Kubernetes API server (in-cluster config or KUBECONFIG)",
                )?;
                Box::new(agent::source::kube::KubeSource::new(client))
            }
        };
        Ok(agent::app::run(s, source).await?)
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    r.map(|()| ExitCode::SUCCESS)
}

fn enter_netns(ns: &str) -> Result<()> {
    let path = if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        Path::new("/var/run/netns").join(ns)
    };
    let f = std::fs::File::open(&path)
        .with_context(|| format!("--netns: cannot open {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("--netns: cannot enter {}", path.display()))?;
    Ok(())
}
