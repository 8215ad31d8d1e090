//! The floor of the DNS comparison: a relay that does nothing but pass each datagram to
//! the upstream and the answer back, one at a time. Blocking, it pays the same hops and
//! wake-ups as any forwarder that sleeps while it waits, and nothing else, so the latency
//! it adds over direct is what the machine charges for the extra hop. With
//! `--busy-poll-us` it spins on non-blocking reads while a query is out and for that long
//! after each datagram (as `ward dns-proxy --busy-poll-us` does after each query), then
//! sleeps again: the floor of a busy-polling forwarder.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::Result;

const USAGE: &str = "usage: xtask udp-relay LISTEN UPSTREAM [--busy-poll-us US]";

/// `xtask udp-relay LISTEN UPSTREAM [--busy-poll-us US]`: relays until a socket fails.
pub fn run(args: &[String]) -> Result {
    let addr = |i: usize| -> Result<SocketAddr> {
        let a = args.get(i).ok_or(USAGE)?;
        a.parse().map_err(|e| format!("{a}: {e}"))
    };
    let (listen, upstream) = (addr(0)?, addr(1)?);
    let window = match args.get(2..) {
        None | Some([]) => Duration::ZERO,
        Some([flag, us]) if flag == "--busy-poll-us" => Duration::from_micros(
            us.parse()
                .map_err(|e| format!("--busy-poll-us {us}: {e}"))?,
        ),
        Some(_) => return Err(USAGE.into()),
    };
    let io = |what: &str, e: io::Error| format!("udp-relay: {what}: {e}");
    let l = UdpSocket::bind(listen).map_err(|e| io("bind", e))?;
    let any: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let u = UdpSocket::bind(any).map_err(|e| io("bind", e))?;
    u.connect(upstream).map_err(|e| io("connect", e))?;
    relay(&l, &u, window).map_err(|e| format!("udp-relay: {e}"))
}

/// Passes each datagram of `l` to `u`'s peer and its answer back, one at a time.
fn relay(l: &UdpSocket, u: &UdpSocket, window: Duration) -> io::Result<()> {
    if !window.is_zero() {
        l.set_nonblocking(true)?;
        u.set_nonblocking(true)?;
    }
    let mut buf = vec![0u8; 65_535];
    let mut poll = Poller::new(window);
    loop {
        let (n, client) = poll.wait(l, |b| l.recv_from(b), &mut buf)?;
        u.send(buf.get(..n).unwrap_or_default())?;
        let n = poll.wait(u, |b| u.recv(b), &mut buf)?;
        l.send_to(buf.get(..n).unwrap_or_default(), client)?;
    }
}

/// Reads either blocking, or spinning on non-blocking reads until `window` after the last
/// datagram read.
struct Poller {
    window: Duration,
    until: Instant,
}

impl Poller {
    fn new(window: Duration) -> Poller {
        Poller {
            window,
            until: Instant::now(),
        }
    }

    fn touch(&mut self) {
        self.until = Instant::now() + self.window;
    }

    /// Reads one datagram. Busy polling, both sockets stay non-blocking; a socket turns
    /// blocking only for the read that sleeps after the window closed.
    fn wait<T>(
        &mut self,
        sock: &UdpSocket,
        mut read: impl FnMut(&mut [u8]) -> io::Result<T>,
        buf: &mut [u8],
    ) -> io::Result<T> {
        if self.window.is_zero() {
            return read(buf);
        }
        loop {
            match read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.until {
                        sock.set_nonblocking(false)?;
                        let r = read(buf);
                        sock.set_nonblocking(true)?;
                        self.touch();
                        return r;
                    }
                    std::hint::spin_loop();
                }
                r => {
                    self.touch();
                    return r;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// An upstream on loopback that answers each datagram with its bytes reversed.
    fn upstream() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind upstream");
        let addr = s.local_addr().expect("upstream address");
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut a = buf[..n].to_vec();
                a.reverse();
                let _ = s.send_to(&a, from);
            }
        });
        addr
    }

    /// Starts a relay on a thread named `name`; returns its address.
    fn start(name: &str, window: Duration) -> SocketAddr {
        let l = UdpSocket::bind("127.0.0.1:0").expect("bind relay");
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind relay upstream side");
        u.connect(upstream()).expect("connect");
        let addr = l.local_addr().expect("relay address");
        thread::Builder::new()
            .name(name.into())
            .spawn(move || relay(&l, &u, window))
            .expect("spawn relay");
        addr
    }

    fn ask(relay: SocketAddr, q: &[u8]) -> Vec<u8> {
        let c = UdpSocket::bind("127.0.0.1:0").expect("bind client");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.send_to(q, relay).expect("send");
        let mut buf = [0u8; 512];
        let n = c.recv(&mut buf).expect("answer within 5 s");
        buf[..n].to_vec()
    }

    /// The scheduler state of this process's thread named `name` (R running, S asleep).
    fn state(name: &str) -> Option<char> {
        for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                return stat.rsplit(") ").next()?.chars().next();
            }
        }
        None
    }

    fn sleeps_within(name: &str, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if state(name) == Some('S') {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn blocking_relay_passes_answers_back() {
        let r = start("relay-block", Duration::ZERO);
        assert_eq!(ask(r, b"abc"), b"cba");
        assert_eq!(ask(r, b"0123"), b"3210");
        assert!(sleeps_within("relay-block", Duration::from_secs(5)));
    }

    #[test]
    fn busy_relay_answers_then_sleeps_and_wakes_again() {
        let r = start("relay-busy", Duration::from_millis(20));
        assert_eq!(ask(r, b"abc"), b"cba");
        // Spinning shows as running; after the window it blocks (asleep) ...
        assert!(
            sleeps_within("relay-busy", Duration::from_secs(5)),
            "the busy relay never went back to sleep"
        );
        // ... and a datagram still wakes it.
        assert_eq!(ask(r, b"xyz1"), b"1zyx");
        assert!(sleeps_within("relay-busy", Duration::from_secs(5)));
    }
}
