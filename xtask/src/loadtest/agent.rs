//! The real `ward agent` as the load tests that measure it run it (`scale`, `fqdn`): on a
//! generated files source, pinned to the subject CPU, its pins and state of the run's own.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Netns, SUBJECT_CPU};
use crate::Result;

/// The agent's admin port inside its namespace.
pub const ADMIN: u16 = 9890;

/// Copies the generated source (`cluster.yaml`, `policies.yaml`) of `src` into `dir/src`
/// (the run changes its copy) and returns that folder.
pub fn copy_source(src: &Path, dir: &Path) -> Result<PathBuf> {
    let source = dir.join("src");
    std::fs::create_dir_all(&source).map_err(|e| format!("{}: {e}", source.display()))?;
    for f in ["cluster.yaml", "policies.yaml"] {
        std::fs::copy(src.join(f), source.join(f)).map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(source)
}

/// `ward agent` for node `node-1` of `source` in `ns`, with its pins under `pins` and its
/// state under `dir/state`, admin on [`ADMIN`], no audit log.
pub fn command(ward: &Path, ns: &Netns, source: &Path, pins: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", SUBJECT_CPU])
        .arg(ward)
        .args([
            "agent",
            "--netns",
            ns.name(),
            "--node",
            "node-1",
            "--source-dir",
        ])
        .arg(source)
        .arg("--bpf-root")
        .arg(pins)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args([
            "--admin",
            &format!("127.0.0.1:{ADMIN}"),
            "--audit-log",
            "none",
        ]);
    cmd
}

/// A folder removed on drop (the agent's pins).
pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
