//! Per-connection budgets for HTTP/2 frames that cost the server work without asking
//! for any response the client pays for: PRIORITY, WINDOW_UPDATE, PING and SETTINGS.
//! hyper and h2 have no limit for these, so the frames are counted on the connection's
//! bytes: a stream wrapper follows the frame headers both ways (9 bytes each; payloads
//! are skipped, never copied or parsed). Past a budget the client gets GOAWAY with
//! `ENHANCE_YOUR_CALM` and the connection is closed, as Envoy does with
//! `max_inbound_priority_frames_per_stream` and
//! `max_inbound_window_update_frames_per_data_frame_sent`:
//!
//! - PRIORITY: at most `priority_per_stream * (1 + streams opened)`;
//! - WINDOW_UPDATE: at most `5 + 2 * (streams opened + window_updates_per_data_frame *
//!   DATA frames sent)`;
//! - PING and SETTINGS (not acknowledgements): at most `control + streams opened + DATA
//!   frames sent + seconds since the connection started`, so keep-alive pings and the
//!   bandwidth probes clients send as data arrives stay well inside.
//!
//! Rapid resets, CONTINUATION floods and oversized header lists are bounded by h2 itself
//! (`max_pending_accept_reset_streams`, `max_local_error_reset_streams`, the header list
//! size).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::detect::H2_PREFACE;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;
/// RFC 9113 section 7.
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The budgets (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub priority_per_stream: u32,
    pub window_updates_per_data_frame: u32,
    pub control: u32,
}

/// Follows a byte stream's frame headers (9 bytes each), skipping payloads.
#[derive(Debug, Default)]
struct Frames {
    /// Bytes of the client preface still to skip (inbound only).
    preface: usize,
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
}

impl Frames {
    /// Calls `on_frame(type, flags, stream)` for every frame header completed in `b`;
    /// stops (returning true) as soon as it returns true.
    fn feed(&mut self, mut b: &[u8], mut on_frame: impl FnMut(u8, u8, u32) -> bool) -> bool {
        if self.preface > 0 {
            let n = self.preface.min(b.len());
            self.preface -= n;
            b = &b[n..];
        }
        while !b.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(b.len());
                self.skip -= n;
                b = &b[n..];
                continue;
            }
            let n = (9 - self.head_len).min(b.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&b[..n]);
            self.head_len += n;
            b = &b[n..];
            if self.head_len < 9 {
                break;
            }
            self.head_len = 0;
            let h = self.head;
            self.skip = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if on_frame(h[3], h[4], stream) {
                return true;
            }
        }
        false
    }

    /// Whether the stream is between frames (a frame of our own may be written).
    fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.skip == 0
    }
}

/// The counts of one connection and the budgets they are held to.
#[derive(Debug)]
pub struct FrameCounter {
    budgets: Budgets,
    started: Instant,
    inbound: Frames,
    outbound: Frames,
    streams: u64,
    last_stream: u32,
    data_sent: u64,
    priority: u64,
    window_updates: u64,
    control: u64,
}

impl FrameCounter {
    /// A counter for a connection whose inbound bytes start with the client preface.
    pub fn new(budgets: Budgets) -> FrameCounter {
        FrameCounter {
            budgets,
            started: Instant::now(),
            inbound: Frames {
                preface: H2_PREFACE.len(),
                ..Frames::default()
            },
            outbound: Frames::default(),
            streams: 0,
            last_stream: 0,
            data_sent: 0,
            priority: 0,
            window_updates: 0,
            control: 0,
        }
    }

    /// Counts the client's bytes; returns which budget they exceeded, if any.
    pub fn inbound(&mut self, b: &[u8]) -> Option<&'static str> {
        let mut over = None;
        let Self {
            budgets,
            started,
            inbound,
            streams,
            last_stream,
            data_sent,
            priority,
            window_updates,
            control,
            ..
        } = self;
        inbound.feed(b, |kind, flags, stream| {
            over = match kind {
                HEADERS => {
                    if stream % 2 == 1 && stream > *last_stream {
                        *last_stream = stream;
                        *streams += 1;
                    }
                    None
                }
                PRIORITY => {
                    *priority += 1;
                    let max = u64::from(budgets.priority_per_stream) * (1 + *streams);
                    (*priority > max).then_some("PRIORITY")
                }
                WINDOW_UPDATE => {
                    *window_updates += 1;
                    let per_data = u64::from(budgets.window_updates_per_data_frame);
                    let max = 5 + 2 * (*streams + per_data * *data_sent);
                    (*window_updates > max).then_some("WINDOW_UPDATE")
                }
                PING | SETTINGS if flags & ACK == 0 => {
                    *control += 1;
                    let max = u64::from(budgets.control) + *streams + *data_sent;
                    // the age allowance costs a clock read: only when the rest is spent
                    (*control > max && *control > max + started.elapsed().as_secs())
                        .then_some("PING and SETTINGS")
                }
                _ => None,
            };
            over.is_some()
        });
        over
    }

    /// Counts the server's bytes (DATA frames sent).
    pub fn outbound(&mut self, b: &[u8]) {
        let data_sent = &mut self.data_sent;
        self.outbound.feed(b, |kind, _, _| {
            if kind == DATA {
                *data_sent += 1;
            }
            false
        });
    }

    /// The GOAWAY frame sent when a budget is exceeded.
    fn goaway(&self) -> [u8; 17] {
        let mut f = [0u8; 17];
        f[2] = 8;
        f[3] = GOAWAY;
        f[9..13].copy_from_slice(&self.last_stream.to_be_bytes());
        f[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        f
    }
}

/// A server-side HTTP/2 connection's stream with a [`FrameCounter`] on it.
#[derive(Debug)]
pub struct Budgeted<S> {
    inner: S,
    counter: FrameCounter,
    /// Set when a budget was exceeded: the reason.
    calm: Option<&'static str>,
}

impl<S> Budgeted<S> {
    pub fn new(inner: S, budgets: Budgets) -> Budgeted<S> {
        Budgeted {
            inner,
            counter: FrameCounter::new(budgets),
            calm: None,
        }
    }
}

fn flood(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("HTTP/2 {why} frames beyond the budget: GOAWAY ENHANCE_YOUR_CALM"),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Budgeted<S> {
    /// Sends GOAWAY ENHANCE_YOUR_CALM when the server is between frames and the socket
    /// takes it at once (a client that does not read gets no GOAWAY, only the close),
    /// then shuts the write side.
    fn send_goaway(&mut self, cx: &mut Context<'_>) {
        if !self.counter.outbound.at_boundary() {
            return;
        }
        let goaway = self.counter.goaway();
        let mut sent = 0;
        while sent < goaway.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &goaway[sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => sent += n,
                _ => return,
            }
        }
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
        let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(why) = self.calm {
            return Poll::Ready(Err(flood(why)));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            if let Some(why) = this.counter.inbound(&buf.filled()[before..]) {
                tracing::info!("closing an HTTP/2 connection: {why} frames beyond the budget");
                this.calm = Some(why);
                // none of these bytes reach the server
                buf.set_filled(before);
                this.send_goaway(cx);
                return Poll::Ready(Err(flood(why)));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(why) = self.calm {
            return Poll::Ready(Err(flood(why)));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counter.outbound(&buf[..n]);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(why) = self.calm {
            return Poll::Ready(Err(flood(why)));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let mut left = n;
            for b in bufs {
                let take = left.min(b.len());
                self.counter.outbound(&b[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGETS: Budgets = Budgets {
        priority_per_stream: 100,
        window_updates_per_data_frame: 10,
        control: 100,
    };

    fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    fn counter() -> FrameCounter {
        let mut c = FrameCounter::new(BUDGETS);
        assert_eq!(c.inbound(H2_PREFACE), None);
        c
    }

    #[test]
    fn priority_budget_grows_with_streams() {
        let mut c = counter();
        for _ in 0..100 {
            assert_eq!(c.inbound(&frame(PRIORITY, 0, 1, 5)), None);
        }
        assert_eq!(c.inbound(&frame(PRIORITY, 0, 1, 5)), Some("PRIORITY"));
        let mut c = counter();
        assert_eq!(c.inbound(&frame(HEADERS, 4, 1, 10)), None);
        for _ in 0..200 {
            assert_eq!(c.inbound(&frame(PRIORITY, 0, 1, 5)), None);
        }
        assert!(c.inbound(&frame(PRIORITY, 0, 1, 5)).is_some());
    }

    #[test]
    fn window_updates_are_paid_for_by_data_sent() {
        let mut c = counter();
        for _ in 0..5 {
            assert_eq!(c.inbound(&frame(WINDOW_UPDATE, 0, 0, 4)), None);
        }
        assert_eq!(
            c.inbound(&frame(WINDOW_UPDATE, 0, 0, 4)),
            Some("WINDOW_UPDATE")
        );
        let mut c = counter();
        // one DATA frame sent, split across writes
        let data = frame(DATA, 0, 1, 1000);
        c.outbound(&data[..4]);
        c.outbound(&data[4..700]);
        c.outbound(&data[700..]);
        for _ in 0..25 {
            assert_eq!(c.inbound(&frame(WINDOW_UPDATE, 0, 0, 4)), None);
        }
        assert!(c.inbound(&frame(WINDOW_UPDATE, 0, 0, 4)).is_some());
    }

    #[test]
    fn pings_and_settings_share_a_budget_and_acks_are_free() {
        let mut c = counter();
        for i in 0..100 {
            let kind = if i % 2 == 0 { PING } else { SETTINGS };
            assert_eq!(c.inbound(&frame(kind, 0, 0, 8)), None);
            assert_eq!(c.inbound(&frame(kind, ACK, 0, 0)), None);
        }
        assert_eq!(c.inbound(&frame(PING, 0, 0, 8)), Some("PING and SETTINGS"));
    }

    #[test]
    fn frames_split_byte_by_byte_are_counted_alike() {
        let mut c = counter();
        let mut all = Vec::new();
        for _ in 0..101 {
            all.extend(frame(PRIORITY, 0, 3, 5));
        }
        let over: Vec<_> = all.chunks(1).filter_map(|b| c.inbound(b)).collect();
        assert_eq!(over, ["PRIORITY"]);
    }

    #[test]
    fn goaway_names_the_last_stream_and_the_code() {
        let mut c = counter();
        c.inbound(&frame(HEADERS, 4, 7, 3));
        c.inbound(&frame(HEADERS, 4, 5, 3));
        let g = c.goaway();
        assert_eq!(&g[..9], &[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        assert_eq!(&g[9..13], &7u32.to_be_bytes());
        assert_eq!(&g[13..], &ENHANCE_YOUR_CALM.to_be_bytes());
    }
}
