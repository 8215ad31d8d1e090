pub mod agent;
pub mod conformance;
pub mod dns_proxy;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod show;
pub mod status;

use std::num::NonZeroUsize;

/// The worker threads for `--threads` (`None`: the CPUs this process may use, which
/// `available_parallelism` reads from the affinity mask and the cgroup's CPU quota).
pub fn workers(threads: Option<usize>) -> usize {
    threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
        .max(1)
}

/// The runtime for `workers` threads. One thread is a current-thread runtime: everything
/// runs on the main thread, without the multi-thread scheduler's queues, cross-thread
/// wake-ups and task state transitions (a process pinned to one CPU pays for those and
/// gains nothing from them). The choice is logged ("runtime started").
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let (mut b, flavor) = if workers <= 1 {
        (
            tokio::runtime::Builder::new_current_thread(),
            "current-thread",
        )
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        (b, "multi-thread")
    };
    let runtime = b.enable_all().build()?;
    tracing::info!(workers, runtime = flavor, "runtime started");
    Ok(runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_is_a_current_thread_runtime() {
        use tokio::runtime::RuntimeFlavor;
        assert_eq!(workers(Some(3)), 3);
        assert_eq!(workers(Some(0)), 1);
        let available = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(workers(None), available);
        let flavor = |n| runtime(n).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(2), RuntimeFlavor::MultiThread);
    }
}
