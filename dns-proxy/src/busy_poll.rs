//! Busy polling: after each query the event loop keeps polling its sockets, without
//! sleeping, for a configured window. On a virtual machine an idle CPU halts, and waking
//! it for the next datagram costs tens of microseconds per hop (the host must schedule
//! the vCPU again); a proxy that never lets its CPU go idle within the window answers
//! without those wake-ups, at the price of the CPU time spent polling. It is HAProxy's
//! `busy-polling`, bounded by a window instead of forever. Off by default.
//!
//! How: a task that yields while the window is open. Tokio runs a yielded task only
//! after polling the I/O driver without a timeout (`epoll_wait(.., 0)`), so while the
//! task spins the runtime's thread polls the sockets instead of parking. When the window
//! closes the task sleeps until the next query opens it again. It needs a current-thread
//! runtime: with several workers the one that spins may not hold the I/O driver, so the
//! wake-ups it is meant to save happen anyway (`ward dns-proxy` refuses the combination).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// `last` before the first query: the window has never opened.
const NEVER: u64 = u64::MAX;

/// The polling window, shared by the query path (which opens it) and the polling task.
#[derive(Debug)]
pub struct BusyPoll {
    window: Duration,
    base: Instant,
    /// Nanoseconds since `base` of the last query.
    last: AtomicU64,
    asleep: AtomicBool,
    wake: Notify,
    /// Times the task yielded to poll: how busy polling shows (tests, profiles).
    polls: AtomicU64,
}

impl BusyPoll {
    /// A window of `window` after each query; zero turns busy polling off.
    pub fn new(window: Duration) -> Option<Arc<BusyPoll>> {
        (!window.is_zero()).then(|| {
            Arc::new(BusyPoll {
                window,
                base: Instant::now(),
                last: AtomicU64::new(NEVER),
                asleep: AtomicBool::new(false),
                wake: Notify::new(),
                polls: AtomicU64::new(0),
            })
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A query arrived: (re)opens the window.
    pub fn touch(&self) {
        self.last.store(self.now(), Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// How many times the task has polled so far.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    fn open(&self) -> bool {
        let last = self.last.load(Ordering::SeqCst);
        let window = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        last != NEVER && self.now().saturating_sub(last) < window
    }

    /// Polls while the window is open, sleeps while it is closed; runs until the
    /// runtime stops. Spawn it on the runtime whose sockets should be polled.
    pub async fn run(self: Arc<Self>) {
        loop {
            while self.open() {
                self.polls.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            self.asleep.store(true, Ordering::SeqCst);
            // No query is missed: one that comes after `asleep` is set sees it and
            // notifies (a permit is stored if the task is not waiting yet); one before is
            // seen by `open()` (all four accesses are SeqCst).
            if !self.open() {
                self.wake.notified().await;
            }
            self.asleep.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `cond` holds, yielding to the runtime in between.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn zero_window_is_off() {
        assert!(BusyPoll::new(Duration::ZERO).is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn polls_while_the_window_is_open_and_sleeps_after() {
        let window = Duration::from_millis(50);
        let b = BusyPoll::new(window).expect("a window");
        tokio::spawn(b.clone().run());
        // Nothing opened the window yet: the task goes to sleep and stays asleep.
        until("the poller to sleep", || b.asleep.load(Ordering::SeqCst)).await;
        let idle = b.polls();
        tokio::time::sleep(window * 3).await;
        assert_eq!(b.polls(), idle, "polled with the window closed");

        // A query opens it: the task polls, also while this task sleeps on a timer (the
        // runtime's thread keeps running instead of parking).
        b.touch();
        until("polling after a query", || b.polls() > idle + 10).await;
        // ... and sleeps again once the window has passed.
        until("the poller to sleep again", || {
            b.asleep.load(Ordering::SeqCst) && !b.open()
        })
        .await;
        let after = b.polls();
        tokio::time::sleep(window * 3).await;
        assert_eq!(b.polls(), after, "polled after the window closed");
    }
}
