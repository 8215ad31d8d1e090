//! Drop events: the consumer of the `EVENTS` ring buffer (aya's [`RingBuf`]).
//!
//! [`DropEvents`] drains what is queued, synchronously; [`AsyncDropEvents`] waits for the
//! kernel's notification (the ring buffer's fd turns readable when a record is committed
//! while the consumer is caught up) on tokio's [`AsyncFd`], so a reader task sleeps
//! until there is something to read instead of polling. The ring buffer is pinned: a
//! new agent process opens it where the last one stopped reading (aya reads both
//! positions from the shared pages when it maps them).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{MapData, RingBuf};
use redirect_bpf_common::DropEvent;
use tokio::io::unix::AsyncFd;

/// The `EVENTS` ring buffer, read synchronously.
pub struct DropEvents {
    ring: RingBuf<MapData>,
}

impl DropEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> DropEvents {
        DropEvents { ring }
    }

    /// Every committed event, oldest first; their space goes back to the kernel.
    /// Records that do not decode as a [`DropEvent`] (none the programs write) are
    /// skipped.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(ev) = decode_event(&item) {
                out.push(ev);
            }
        }
        out
    }

    /// Registers the ring buffer with the current tokio runtime's reactor (so it must be
    /// called inside one; it panics otherwise, as tokio's registration does).
    pub fn into_async(self) -> io::Result<AsyncDropEvents> {
        // SAFETY: the fd is the ring buffer map's own, owned by `self.ring` (its
        // `MapData`), so it stays open and the same for as long as the `AsyncFd` holds
        // `self`, and `as_raw_fd` always returns it.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE) };
        Ok(AsyncDropEvents {
            fd: fd.map_err(|e| e.into_parts().1)?,
        })
    }
}

impl AsRawFd for DropEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// The `EVENTS` ring buffer, read when the kernel says it has something.
pub struct AsyncDropEvents {
    fd: AsyncFd<DropEvents>,
}

impl AsyncDropEvents {
    /// Waits until at least one event is queued and returns every queued one.
    pub async fn next_batch(&mut self) -> io::Result<Vec<DropEvent>> {
        loop {
            let mut ready = self.fd.readable_mut().await?;
            let batch = ready.get_inner_mut().drain();
            // Only clears the readiness this guard saw: a notification that came after
            // the drain keeps the fd ready, so no record is left waiting.
            ready.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

fn decode_event(b: &[u8]) -> Option<DropEvent> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?)) };
    let arr4 = |o: usize| -> Option<[u8; 4]> { b.get(o..o + 4)?.try_into().ok() };
    let arr2 = |o: usize| -> Option<[u8; 2]> { b.get(o..o + 2)?.try_into().ok() };
    let arr16 = |o: usize| -> Option<[u8; 16]> { b.get(o..o + 16)?.try_into().ok() };
    Some(DropEvent {
        reason: u32_at(0)?,
        ifindex: u32_at(4)?,
        src_identity: u32_at(8)?,
        dst_identity: u32_at(12)?,
        saddr: arr4(16)?,
        daddr: arr4(20)?,
        sport: arr2(24)?,
        dport: arr2(26)?,
        protocol: *b.get(28)?,
        direction: *b.get(29)?,
        family: *b.get(30)?,
        _pad: 0,
        cookie: u32_at(32)?,
        saddr6: arr16(36)?,
        daddr6: arr16(52)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_records_do_not_decode() {
        let full = [0u8; 68];
        assert!(decode_event(&full).is_some());
        assert!(decode_event(&full[..67]).is_none());
        assert!(decode_event(&[]).is_none());
    }

    #[test]
    fn fields_decode_from_their_offsets() {
        let mut b = [0u8; 68];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[16..20].copy_from_slice(&[10, 0, 0, 1]);
        b[26..28].copy_from_slice(&80u16.to_be_bytes());
        b[28] = 6;
        b[30] = 4;
        b[52..68].copy_from_slice(&[0xfd; 16]);
        let ev = decode_event(&b).unwrap_or_default();
        assert_eq!(ev.reason, 7);
        assert_eq!(ev.saddr, [10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes(ev.dport), 80);
        assert_eq!((ev.protocol, ev.family), (6, 4));
        assert_eq!(ev.daddr6, [0xfd; 16]);
    }
}
