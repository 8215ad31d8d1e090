//! The queries in hand: at most `concurrency_limit` at once, and at most
//! `client_concurrency_limit` of one client IP. A query past either gets `SERVFAIL` at
//! once ([`crate::proxy::Proxy::serve_with`]), so a flood to a zone that never answers
//! holds a bounded number of sockets and futures, and one client cannot take every place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

/// Which limit a query met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    Global,
    Client,
}

/// The count of queries in hand, in total and per client.
#[derive(Debug)]
pub struct InHand {
    global: usize,
    per_client: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only clients with a query in hand (none kept when there is no per-client limit).
    clients: HashMap<IpAddr, usize>,
}

impl InHand {
    /// Limits of `global` queries and `per_client` of one client; 0: no such limit.
    pub fn new(global: usize, per_client: usize) -> InHand {
        InHand {
            global,
            per_client,
            counts: Mutex::default(),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a query of `client`, given back when dropped (also when the query's
    /// handling is dropped half-way), or the limit it met.
    pub fn take(&self, client: IpAddr) -> Result<Place<'_>, Over> {
        if self.global == 0 && self.per_client == 0 {
            return Ok(Place {
                hand: self,
                client: None,
            });
        }
        let mut c = self.counts();
        if self.global > 0 && c.total >= self.global {
            return Err(Over::Global);
        }
        if self.per_client > 0 {
            let mine = c.clients.entry(client).or_insert(0);
            if *mine >= self.per_client {
                return Err(Over::Client);
            }
            *mine += 1;
        }
        c.total += 1;
        Ok(Place {
            hand: self,
            client: Some(client),
        })
    }

    /// Queries in hand now (with a limit set; 0 without).
    pub fn total(&self) -> usize {
        self.counts().total
    }

    /// Clients with a query in hand now (with a per-client limit; 0 without).
    pub fn clients(&self) -> usize {
        self.counts().clients.len()
    }

    /// The limit `over` names.
    pub fn limit(&self, over: Over) -> usize {
        match over {
            Over::Global => self.global,
            Over::Client => self.per_client,
        }
    }
}

/// One query's place in hand.
#[derive(Debug)]
pub struct Place<'a> {
    hand: &'a InHand,
    /// None: not counted (no limits).
    client: Option<IpAddr>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client else { return };
        let mut c = self.hand.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.clients.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.clients.remove(&client);
            }
        }
        // A burst of many clients leaves a large empty table: give it back.
        if c.clients.is_empty() && c.clients.capacity() > 64 {
            c.clients = HashMap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn global_and_per_client_limits() {
        let hand = InHand::new(3, 2);
        let a = ip("10.0.0.1");
        let b = ip("10.0.0.2");
        let p1 = hand.take(a).unwrap();
        let p2 = hand.take(a).unwrap();
        assert_eq!(hand.take(a).unwrap_err(), Over::Client);
        let p3 = hand.take(b).unwrap();
        assert_eq!(hand.take(b).unwrap_err(), Over::Global);
        assert_eq!((hand.total(), hand.clients()), (3, 2));
        drop(p1);
        assert_eq!(hand.take(a).map(|_| ()), Ok(()), "a place came back");
        drop((p2, p3));
        assert_eq!((hand.total(), hand.clients()), (0, 0), "all given back");
    }

    #[test]
    fn no_limits_count_nothing() {
        let hand = InHand::new(0, 0);
        let places: Vec<_> = (0..10_000)
            .map(|_| hand.take(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(hand.total(), 0);
        drop(places);
        // Only a global limit: clients are not kept.
        let hand = InHand::new(2, 0);
        let _p = hand.take(ip("10.0.0.1")).unwrap();
        let _q = hand.take(ip("10.0.0.1")).unwrap();
        assert_eq!(hand.take(ip("10.0.0.2")).unwrap_err(), Over::Global);
        assert_eq!(hand.clients(), 0);
    }

    #[test]
    fn the_client_table_shrinks_after_a_burst() {
        let hand = InHand::new(0, 1);
        let places: Vec<_> = (0..5000u32)
            .map(|i| hand.take(IpAddr::from(i.to_be_bytes())).unwrap())
            .collect();
        assert_eq!(hand.clients(), 5000);
        drop(places);
        assert_eq!(hand.counts().clients.capacity(), 0);
    }
}
