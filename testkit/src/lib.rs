//! Network namespaces for Ward's tests, load tests and lab.
//!
//! Every kernel test, the agent's end-to-end tests, the datapath load example, `cargo xtask
//! loadtest` and `ward-lab` build the same things: namespaces with unique names that are
//! deleted whatever happens ([`Netns`]), veth pairs, addresses and routes inside them, a
//! command or a closure run in a namespace, and waits on a condition with a deadline
//! ([`Poll`]). They are here once. Everything runs `ip` (iproute2) and `nsenter`
//! (util-linux) on namespaces the caller made; the machine's own namespace is never
//! touched.
//!
//! Only tests, xtask and the lab depend on this crate: it is never linked into `ward`.

mod netns;
mod wait;

use std::process::{Command, ExitStatus};
use std::time::Duration;

pub use netns::{
    addr, create, delete, ip, ip_netns_exec, link_pod, local_delivery, nsenter, run_in, spawn_in,
    sysctl, veth, Netns, Subnet,
};
pub use wait::Poll;

/// Why a set-up step failed: the command and what it said, or what a wait waited for.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("cannot start {command}: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("timed out after {within:?} waiting for {what}")]
    Timeout { what: String, within: Duration },
}

/// The message, so that a test's `.expect("...")` on a set-up step prints the command and
/// what it said.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `cmd` to its end; fails with its standard error when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// Runs `cmd` to its end and returns its standard output; fails with its standard error
/// when it does not succeed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| Error::Start {
        command: format!("{cmd:?}"),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `TAG-PID`: a name no other process on the machine uses, for namespaces, bpffs roots and
/// scratch folders. Within one process the tags must differ (a second namespace of the
/// same name is refused by [`Netns::new`], never shared).
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Stops a test that needs root with a message saying why: `what` need root (`needs`).
pub fn require_root(what: &str, needs: &str) {
    assert!(
        is_root(),
        "{what} need root ({needs}): run them as root, as CI does"
    );
}
