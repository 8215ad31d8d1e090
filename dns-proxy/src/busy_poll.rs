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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// `last` before the first query: the window has never opened.
const NEVER: u64 = u64::MAX;

/// How many receives poll their sockets at once ([`BusyPoll::recv`]): enough for the
/// listeners (one per family on a node) and a query's upstream socket. The others wait
/// on the runtime, whose driver the polling task ([`BusyPoll::run`]) keeps polling while
/// the window is open. A loaded proxy would otherwise make a failing system call per
/// query in flight each turn; it has work anyway, so its CPU does not halt.
const SPINNERS: usize = 4;

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
    /// Receives polling now, at most [`SPINNERS`].
    spinning: AtomicUsize,
    /// Receives waiting on the runtime for want of a place to poll.
    waiting: AtomicUsize,
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
                spinning: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
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
    /// its other tasks but does not park.
    ///
    /// `Err` when nothing was received and the window is closed, or [`SPINNERS`]
    /// receives are polling already: then wait on the socket through the runtime, holding
    /// the [`Wait`]. While a receive waits for want of a place, the polling ones yield
    /// to the runtime's driver each turn (`epoll_wait(.., 0)`), so it is served as soon
    /// as its datagram comes; otherwise they leave the driver to its usual rhythm (every
    /// few dozen turns), as nothing they are waiting for depends on it.
    pub async fn recv<T>(
        &self,
        mut now: impl FnMut() -> io::Result<T>,
    ) -> Result<io::Result<T>, Wait<'_>> {
        let mut turn = None;
        loop {
            match now() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => {
                    if r.is_ok() {
                        self.caught.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(r);
                }
            }
            if !self.open() {
                return Err(Wait::NONE);
            }
            if turn.is_none() {
                turn = Some(Spinner::take(&self.spinning).ok_or_else(|| {
                    self.waiting.fetch_add(1, Ordering::AcqRel);
                    Wait(Some(&self.waiting))
                })?);
            }
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.waiting.load(Ordering::Acquire) > 0 {
                tokio::task::yield_now().await;
            } else {
                Spin(false).await;
            }
        }
    }

    /// How many receives are polling now.
    pub fn spinning(&self) -> usize {
        self.spinning.load(Ordering::Relaxed)
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

/// [`BusyPoll::recv`] when busy polling is on; without it, straight to waiting on the
/// runtime.
pub async fn recv<T>(
    busy: Option<&BusyPoll>,
    now: impl FnMut() -> io::Result<T>,
) -> Result<io::Result<T>, Wait<'_>> {
    match busy {
        Some(b) => b.recv(now).await,
        None => Err(Wait::NONE),
    }
}

/// A receive that waits on the runtime after [`BusyPoll::recv`]; counted, while held,
/// when it waits for want of a place to poll. Hold it until the datagram is read.
#[must_use = "held while the receive waits"]
#[derive(Debug)]
pub struct Wait<'a>(Option<&'a AtomicUsize>);

impl Wait<'_> {
    /// Not counted: busy polling is off, or its window closed.
    pub const NONE: Wait<'static> = Wait(None);
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One of the [`SPINNERS`] places of a polling receive; given back on drop, also when
/// the receive is dropped half-way.
struct Spinner<'a>(&'a AtomicUsize);

impl<'a> Spinner<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Spinner<'a>> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < SPINNERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Spinner(count))
    }
}

impl Drop for Spinner<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        assert!(matches!(got, Ok(Ok(n)) if n > 1), "{got:?}");
        assert!(b.polls() > 0);
        assert_eq!(b.caught(), 1);
        // Ready at once: no turn spent.
        let polls = b.polls();
        assert_eq!(
            b.recv(ready_on(1)).await.ok().map(|r| r.ok()),
            Some(Some(1))
        );
        assert_eq!(b.polls(), polls);
        // Errors other than "nothing yet" end the receive.
        let got = b
            .recv(|| Err::<(), _>(io::ErrorKind::ConnectionRefused.into()))
            .await;
        assert!(matches!(got, Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused));
        assert_eq!(b.caught(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn recv_gives_up_once_the_window_closes() {
        let b = BusyPoll::new(Duration::from_millis(30)).expect("a window");
        // Never opened: one try, then back to waiting on the runtime.
        assert!(b.recv(ready_on(u32::MAX)).await.is_err());
        assert_eq!(b.polls(), 0);
        let opened = Instant::now();
        b.touch();
        let wait = b
            .recv(ready_on(u32::MAX))
            .await
            .expect_err("nothing received");
        // Waiting because the window closed does not count as waiting for a place.
        assert!(wait.0.is_none());
        assert_eq!(b.waiting.load(Ordering::SeqCst), 0);
        assert!(opened.elapsed() >= Duration::from_millis(30));
        assert!(b.polls() > 0);
        assert_eq!(b.caught(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_a_few_receives_poll_at_once() {
        let b = BusyPoll::new(Duration::from_secs(60)).expect("a window");
        b.touch();
        let spinners: Vec<_> = (0..SPINNERS)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.recv(ready_on(u32::MAX)).await.is_ok() })
            })
            .collect();
        until("every place taken", || b.spinning() == SPINNERS).await;
        // One more tries once and goes to wait on the runtime, counted while it waits:
        // the polling ones then let the driver poll each turn.
        let mut tries = 0;
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            b.recv(|| {
                tries += 1;
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            }),
        )
        .await
        .expect("polled with every place taken");
        let wait = got.expect_err("no place to poll");
        assert_eq!(tries, 1);
        assert_eq!(b.waiting.load(Ordering::SeqCst), 1);
        let polls = b.polls();
        until("the pollers turning", || b.polls() > polls + 10).await;
        drop(wait);
        assert_eq!(b.waiting.load(Ordering::SeqCst), 0);
        // A receive dropped half-way gives its place back.
        spinners[0].abort();
        until("a place given back", || b.spinning() == SPINNERS - 1).await;
        let mut tries = 0;
        let got = b
            .recv(|| {
                tries += 1;
                if tries < 3 {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(tries)
                }
            })
            .await;
        assert_eq!(got.ok().map(|r| r.ok()), Some(Some(3)));
        assert_eq!(b.spinning(), SPINNERS - 1);
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
