//! The open files limit (`RLIMIT_NOFILE`). Each upstream DNS query in flight holds a UDP
//! socket, up to the DNS proxy's `concurrency_limit` (1,024 by default) of them, and the
//! HTTP proxy two per connection: the usual soft limit of 1,024 is below what a busy node
//! needs, while the hard limit (what the service manager or the container runtime allows)
//! is usually far above it. So `ward agent` and `ward dns-proxy` raise the soft limit to
//! the hard one at start, and say in the log when they cannot, or when even the hard limit
//! is below what the DNS proxy's limits let it hold.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Files a process needs besides its upstream DNS sockets (listeners, kept upstream
/// sockets, the HTTP proxy's and the endpoints' connections, maps, logs): the margin
/// [`wanted`] adds.
pub const BESIDES_DNS: u64 = 256;

/// What became of the limit at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenFiles {
    /// Raised from the soft limit to the hard one.
    Raised { from: u64, to: u64 },
    /// The soft limit was the hard one already.
    AtHard(u64),
    /// The soft limit could not be raised.
    Failed { soft: u64, hard: u64, error: String },
    /// The limit could not be read.
    Unknown(String),
}

impl OpenFiles {
    /// The soft limit in force now, when known.
    pub fn limit(&self) -> Option<u64> {
        match self {
            OpenFiles::Raised { to, .. } => Some(*to),
            OpenFiles::AtHard(l) => Some(*l),
            OpenFiles::Failed { soft, .. } => Some(*soft),
            OpenFiles::Unknown(_) => None,
        }
    }
}

/// The open files a process whose DNS proxy takes at most `concurrency_limit` queries in
/// hand may need: a socket per query, plus [`BESIDES_DNS`]. None when the limit is off
/// (0: nothing bounds it).
pub fn wanted(concurrency_limit: usize) -> Option<u64> {
    let in_hand = u64::try_from(concurrency_limit).ok()?;
    (in_hand > 0).then(|| in_hand + BESIDES_DNS)
}

/// Raises the soft limit of open files to the hard one and logs what came of it: a
/// warning when it cannot, or when the limit in force stays below `wanted`.
pub fn raise(wanted: Option<u64>) -> OpenFiles {
    let outcome = match getrlimit(Resource::RLIMIT_NOFILE) {
        Err(e) => OpenFiles::Unknown(e.to_string()),
        Ok((soft, hard)) if soft >= hard => OpenFiles::AtHard(soft),
        Ok((soft, hard)) => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => OpenFiles::Raised {
                from: soft,
                to: hard,
            },
            Err(e) => OpenFiles::Failed {
                soft,
                hard,
                error: e.to_string(),
            },
        },
    };
    log(&outcome, wanted);
    outcome
}

/// The log line of `outcome`, and a warning when the limit is below `wanted`.
fn log(outcome: &OpenFiles, wanted: Option<u64>) {
    match outcome {
        OpenFiles::Raised { from, to } => {
            tracing::info!(from, to, "open files limit raised to the hard limit")
        }
        OpenFiles::AtHard(limit) => tracing::debug!(limit, "open files limit at the hard limit"),
        OpenFiles::Failed { soft, hard, error } => tracing::warn!(
            soft,
            hard,
            error = error.as_str(),
            "cannot raise the open files limit to the hard limit; it stays at the soft limit"
        ),
        OpenFiles::Unknown(error) => tracing::warn!(
            error = error.as_str(),
            "cannot read the open files limit; it stays as it is"
        ),
    }
    if let (Some(limit), Some(wanted)) = (outcome.limit(), wanted) {
        if limit < wanted {
            tracing::warn!(
                limit,
                wanted,
                "the open files limit is below what the DNS proxy's concurrency limit lets \
                 it hold (a socket per upstream query in flight): past it queries fail with \
                 SERVFAIL (too many open files); raise the hard limit (LimitNOFILE=, ulimit \
                 -Hn, the container runtime's nofile) or lower concurrency_limit"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dns_proxy_wants_a_file_per_query_in_hand() {
        let default = dns_proxy::Config::default().concurrency_limit;
        assert_eq!(wanted(default), Some(1024 + BESIDES_DNS));
        assert_eq!(wanted(0), None, "no limit: nothing to compare with");
    }

    #[test]
    fn the_limit_in_force() {
        assert_eq!(OpenFiles::Raised { from: 1, to: 9 }.limit(), Some(9));
        let failed = OpenFiles::Failed {
            soft: 3,
            hard: 9,
            error: "EPERM".into(),
        };
        assert_eq!(failed.limit(), Some(3));
        assert_eq!(OpenFiles::Unknown("?".into()).limit(), None);
    }
}
