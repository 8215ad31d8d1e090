//! The floor of the DNS comparison: a relay that does nothing but pass each datagram to
//! the upstream and the answer back, one at a time, on blocking sockets. It pays the same
//! hops and wake-ups as any forwarder that sleeps while it waits, and nothing else, so the
//! latency it adds over direct is what the machine charges for the extra hop.

use std::net::{SocketAddr, UdpSocket};

use crate::Result;

/// `xtask udp-relay LISTEN UPSTREAM`: relays until a socket fails.
pub fn run(args: &[String]) -> Result {
    let addr = |i: usize| -> Result<SocketAddr> {
        let a = args
            .get(i)
            .ok_or("usage: xtask udp-relay LISTEN UPSTREAM")?;
        a.parse().map_err(|e| format!("{a}: {e}"))
    };
    let (listen, upstream) = (addr(0)?, addr(1)?);
    let io = |what: &str, e: std::io::Error| format!("udp-relay: {what}: {e}");
    let l = UdpSocket::bind(listen).map_err(|e| io("bind", e))?;
    let any: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let u = UdpSocket::bind(any).map_err(|e| io("bind", e))?;
    u.connect(upstream).map_err(|e| io("connect", e))?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = l.recv_from(&mut buf).map_err(|e| io("recv", e))?;
        u.send(buf.get(..n).unwrap_or_default())
            .map_err(|e| io("send", e))?;
        let n = u.recv(&mut buf).map_err(|e| io("recv", e))?;
        l.send_to(buf.get(..n).unwrap_or_default(), client)
            .map_err(|e| io("reply", e))?;
    }
}
