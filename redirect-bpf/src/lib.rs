//! Ward's datapath in user space.
//!
//! - [`loader::Datapath`] loads the eBPF object (built by `cargo xtask build-ebpf` and
//!   embedded at build time), pins its maps under a bpffs root (default
//!   [`loader::DEFAULT_ROOT`]), attaches the programs to pod veths, and reads and writes
//!   the maps.
//! - [`compile::endpoint_entries`] turns policy-model's compiled endpoint policy into
//!   policy map entries. Policy semantics stay in policy-model: the datapath executes.
//! - [`classes`] groups the peer identities that the node's policies treat alike, so that
//!   the policy map holds an entry per class, not per identity.
//! - [`events`] reads the drop events of the `EVENTS` ring buffer, synchronously or on
//!   tokio.
//! - [`pinned`] finds maps an earlier agent pinned with another definition (a map grown
//!   in a new release), so that the loader replaces them and carries their entries over.
//! - [`routing`] installs the ip rule and local route that deliver redirected packets
//!   to the proxies.
//! - [`netlink`] is the node's network namespace through rtnetlink: route lookups
//!   (which veth leads to a pod), links, and a stream of route and link changes.

pub mod classes;
pub mod compile;
pub mod events;
pub mod loader;
pub mod netlink;
pub mod pinned;
pub mod routing;

use std::io;
use std::path::{Path, PathBuf};

pub use classes::PeerClasses;
pub use compile::{endpoint_entries, EndpointEntries, PolicyEntry, PolicyEntryKey, ProxyPorts};
pub use events::{AsyncDropEvents, DropEvents};
pub use loader::{ConntrackFlow, ConntrackView, Datapath, MapSizes, DEFAULT_ROOT};
pub use pinned::ReplacedMap;
pub use redirect_bpf_common as common;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this build carries no eBPF object: run `cargo xtask build-ebpf`, then rebuild")]
    ObjectMissing,
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("reading the eBPF object's maps: {0}")]
    Object(String),
    #[error("pinned map {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("the eBPF object has no program {0}")]
    NoSuchProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    NoSuchMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("link: {0}")]
    Link(String),
    #[error("map: {0}")]
    Map(Box<aya::maps::MapError>),
    #[error("no interface {0}: {1}")]
    NoSuchInterface(String, nix::Error),
    #[error("mounting bpffs on /sys/fs/bpf: {0}")]
    Mount(nix::Error),
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(nix::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl Error {
    /// Whether a map operation failed only because the key was not there (a removal
    /// that has nothing to do).
    pub fn is_not_found(&self) -> bool {
        let Error::Map(e) = self else {
            return false;
        };
        match &**e {
            aya::maps::MapError::KeyNotFound => true,
            // a hash map's delete of an absent key
            aya::maps::MapError::SyscallError(s) => {
                s.io_error.raw_os_error() == Some(nix::libc::ENOENT)
            }
            _ => false,
        }
    }

    fn io(path: &Path, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn program(name: &'static str, source: aya::programs::ProgramError) -> Error {
        Error::Program {
            name,
            source: Box::new(source),
        }
    }

    fn map(source: aya::maps::MapError) -> Error {
        Error::Map(Box::new(source))
    }
}
