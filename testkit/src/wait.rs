//! Waiting on a condition with a deadline, never sleeping and hoping.

use std::thread;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long to wait for a condition and how often to look again: every `pause` at
/// first, each pause doubling up to `max_pause` (equal by default: a fixed rhythm).
#[derive(Clone, Copy, Debug)]
pub struct Poll {
    within: Duration,
    pause: Duration,
    max_pause: Duration,
}

impl Poll {
    /// Gives up after `within`; looks every 20 ms.
    pub fn within(within: Duration) -> Poll {
        let pause = Duration::from_millis(20);
        Poll {
            within,
            pause,
            max_pause: pause,
        }
    }

    /// Looks every `pause` (a short one when the wait itself is measured).
    pub fn every(self, pause: Duration) -> Poll {
        Poll {
            pause,
            max_pause: pause,
            ..self
        }
    }

    /// Looks after `first`, then after twice as long each time, up to `max`.
    pub fn backoff(self, first: Duration, max: Duration) -> Poll {
        Poll {
            pause: first,
            max_pause: max,
            ..self
        }
    }

    /// Waits until `cond` holds; returns how long that took, or fails naming `what`.
    pub fn until(&self, what: &str, mut cond: impl FnMut() -> bool) -> Result<Duration> {
        self.try_until(what, || Ok::<bool, Error>(cond()))
    }

    /// Like [`Poll::until`], for a test: panics with the timeout's message.
    pub fn expect(&self, what: &str, cond: impl FnMut() -> bool) -> Duration {
        self.until(what, cond).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until `cond` returns `Ok(true)`; an error from `cond` ends the wait at once
    /// and is returned, as is the timeout (converted into the caller's error type).
    pub fn try_until<E: From<Error>>(
        &self,
        what: &str,
        mut cond: impl FnMut() -> Result<bool, E>,
    ) -> Result<Duration, E> {
        let start = Instant::now();
        let mut pause = self.pause;
        loop {
            if cond()? {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= self.within {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    within: self.within,
                }
                .into());
            }
            thread::sleep(pause);
            pause = (pause * 2).min(self.max_pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_comes_true_ends_the_wait_with_its_duration() {
        let mut n = 0;
        let took = Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(1))
            .until("the third look", || {
                n += 1;
                n == 3
            });
        assert!(
            matches!(took, Ok(d) if d < Duration::from_secs(5)),
            "{took:?}"
        );
        assert_eq!(n, 3);
    }

    #[test]
    fn a_condition_that_never_holds_times_out_naming_it() {
        let e = Poll::within(Duration::from_millis(30))
            .until("nothing", || false)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("timed out after 30ms waiting for nothing")
        );
    }

    #[test]
    fn an_error_from_the_condition_ends_the_wait_at_once() {
        #[derive(Debug, PartialEq)]
        enum E {
            Broken,
            Wait(String),
        }
        impl From<Error> for E {
            fn from(e: Error) -> E {
                E::Wait(e.to_string())
            }
        }
        let mut looks = 0;
        let r = Poll::within(Duration::from_secs(5)).try_until("x", || {
            looks += 1;
            Err::<bool, E>(E::Broken)
        });
        assert_eq!(r, Err(E::Broken));
        assert_eq!(looks, 1);
    }

    #[test]
    fn backoff_doubles_the_pause_up_to_its_limit() {
        let mut at = Vec::new();
        let start = Instant::now();
        let _ = Poll::within(Duration::from_millis(100))
            .backoff(Duration::from_millis(5), Duration::from_millis(20))
            .until("the limit", || {
                at.push(start.elapsed());
                false
            });
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // 5, 10, 20, 20, ...: never shorter than the pause due, never past the limit by much
        for (i, g) in gaps.iter().enumerate() {
            let due = Duration::from_millis(5 * (1 << i.min(2)));
            assert!(*g >= due, "gap {i} {g:?} < {due:?}");
        }
        assert!(gaps.len() >= 4, "{gaps:?}");
    }
}
