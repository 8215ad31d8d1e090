//! Busy polling: after each query the event loop keeps polling its sockets, without
//! sleeping, for a configured window. On a virtual machine an idle CPU halts, and waking
//! it for the next datagram costs tens of microseconds per hop (the host must schedule
//! the vCPU again); a proxy that never lets its CPU go idle within the window answers
//! without those wake-ups, at the price of the CPU time spent polling. It is HAProxy's
//! `busy-polling`, bounded by a window instead of forever. Off by default.
//!
//! How, on two levels. The UDP query path reads its sockets itself while the window is
//! open ([`BusyPoll::recv`]): a non-blocking receive, and if nothing was waiting the task
//! wakes itself and lets the runtime run the others, without parking the thread. A
//! datagram is read as soon as it arrives, not after the runtime's `epoll_wait` saw it
//! and woke the task that waits for it (each step a microsecond or so before the next
//! `sendto`, which the partner's halted vCPU turns into several). Everything else (TCP,
//! timers, the metrics endpoint) is kept polling by a task that yields while the window
//! is open ([`BusyPoll::run`]): tokio runs a yielded task only after polling the I/O
//! driver without a timeout (`epoll_wait(.., 0)`), so the thread polls instead of
//! parking. When the window closes both go back to waiting until the next query opens
//! it again. It needs a current-thread runtime: with several workers the one that spins
//! may not hold the I/O driver, so the wake-ups it is meant to save happen anyway
//! (`ward dns-proxy` refuses the combination).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
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
    /// Turns spent polling, by the yielding task and by receives: how busy polling
    /// shows (tests, profiles).
    polls: AtomicU64,
    /// Datagrams read by [`BusyPoll::recv`] (not waited for through the runtime).
    caught: AtomicU64,
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
                caught: AtomicU64::new(0),
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

    /// How many turns were spent polling so far.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// How many datagrams [`BusyPoll::recv`] has read so far.
    pub fn caught(&self) -> u64 {
        self.caught.load(Ordering::Relaxed)
    }

    /// Whether the window is open: a query came less than a window ago.
    pub fn open(&self) -> bool {
        let last = self.last.load(Ordering::SeqCst);
        let window = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        last != NEVER && self.now().saturating_sub(last) < window
    }

    /// Receives with `now` while the window is open: `now` is a non-blocking receive that
    /// makes the system call whatever the runtime last saw of the socket (tokio's own
    /// `try_recv` answers from its readiness cache, which only `epoll_wait` fills). When
    /// nothing is waiting the task wakes itself and returns to the runtime, which runs
    /// its other tasks and polls its driver every few dozen turns but does not park.
    /// `None` once the window is closed with nothing received: then wait on the socket
    /// through the runtime.
    pub async fn recv<T>(&self, mut now: impl FnMut() -> io::Result<T>) -> Option<io::Result<T>> {
        loop {
            match now() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => {
                    if r.is_ok() {
                        self.caught.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some(r);
                }
            }
            if !self.open() {
                return None;
            }
            self.polls.fetch_add(1, Ordering::Relaxed);
            Spin(false).await;
        }
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

/// Pending once, with the task woken at once: back to the runtime's run queue, not to
/// its I/O driver (as `yield_now`, which waits for the driver's next poll).
struct Spin(bool);

impl Future for Spin {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
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

    /// A receive that succeeds on its `n`th try.
    fn ready_on(n: u32) -> impl FnMut() -> io::Result<u32> {
        let mut tries = 0;
        move || {
            tries += 1;
            if tries < n {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(tries)
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn recv_tries_while_the_window_is_open_and_lets_other_tasks_run() {
        let b = BusyPoll::new(Duration::from_secs(60)).expect("a window");
        b.touch();
        // Another task on this thread runs meanwhile, a timer's included: the runtime
        // keeps running its tasks and its driver while the receive spins.
        let slept = tokio::spawn(tokio::time::sleep(Duration::from_millis(20)));
        let mut n = 0u32;
        let mut tries = ready_on(u32::MAX);
        let got = b
            .recv(|| {
                n += 1;
                if slept.is_finished() {
                    Ok(n)
                } else {
                    tries()
                }
            })
            .await;
        assert!(matches!(got, Some(Ok(n)) if n > 1), "{got:?}");
        assert!(b.polls() > 0);
        assert_eq!(b.caught(), 1);
        // Ready at once: no turn spent.
        let polls = b.polls();
        assert_eq!(b.recv(ready_on(1)).await.map(|r| r.ok()), Some(Some(1)));
        assert_eq!(b.polls(), polls);
        // Errors other than "nothing yet" end the receive.
        let got = b
            .recv(|| Err::<(), _>(io::ErrorKind::ConnectionRefused.into()))
            .await;
        assert!(matches!(got, Some(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused));
        assert_eq!(b.caught(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn recv_gives_up_once_the_window_closes() {
        let b = BusyPoll::new(Duration::from_millis(30)).expect("a window");
        // Never opened: one try, then back to waiting on the runtime.
        assert!(b.recv(ready_on(u32::MAX)).await.is_none());
        assert_eq!(b.polls(), 0);
        let opened = Instant::now();
        b.touch();
        assert!(b.recv(ready_on(u32::MAX)).await.is_none());
        assert!(opened.elapsed() >= Duration::from_millis(30));
        assert!(b.polls() > 0);
        assert_eq!(b.caught(), 0);
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
