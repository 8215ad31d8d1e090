//! A second reader of HTTP/1 request framing, beside hyper's, for what hyper accepts
//! but the proxy refuses: a request with both `Content-Length` and `Transfer-Encoding`.
//! hyper drops the `Content-Length`, reads the body as chunked and closes the connection
//! afterwards, so the service never sees both headers. This stream wrapper follows the
//! framing of the bytes hyper reads (heads with httparse, as hyper does; bodies by
//! length or chunks) and records which request of the connection was ambiguous; the
//! service answers that request with 400 instead of forwarding it.
//!
//! It also records which request's chunked body it saw to be malformed, so that request
//! is answered 400 before anything of it goes upstream.
//!
//! Whenever the tracker is unsure (a head it cannot parse, an upgrade, a malformed
//! chunk) it stops: hyper's own handling, which is safe, then applies alone.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the stream and the service: the number (1-based) of the first request
/// of the connection that carried both framing headers, of the first whose chunked body
/// was seen to be malformed, and of the first with more than one Content-Length (0: none).
#[derive(Debug, Default)]
pub struct Ambiguous {
    both: AtomicU64,
    bad_chunks: AtomicU64,
    repeated_length: AtomicU64,
}

impl Ambiguous {
    /// Whether request `n` (1-based) of the connection is the ambiguous one.
    pub fn is(&self, n: u64) -> bool {
        n != 0 && self.both.load(Ordering::Acquire) == n
    }

    /// Whether request `n` (1-based) has a malformed chunked body (seen so far: bytes
    /// read with or before the head are known when the request is handled).
    pub fn bad_chunks(&self, n: u64) -> bool {
        n != 0 && self.bad_chunks.load(Ordering::Acquire) == n
    }

    /// Whether request `n` (1-based) carried more than one Content-Length value (several
    /// fields, or a list), which hyper merges into one when they agree.
    pub fn repeated_length(&self, n: u64) -> bool {
        n != 0 && self.repeated_length.load(Ordering::Acquire) == n
    }

    fn mark(slot: &AtomicU64, n: u64) {
        let _ = slot.compare_exchange(0, n, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Off,
}

/// The framing follower (no I/O; fed the bytes the server reads).
#[derive(Debug)]
pub struct Tracker {
    state: State,
    buf: Vec<u8>,
    heads: u64,
    limit: usize,
    ambiguous: Arc<Ambiguous>,
}

impl Tracker {
    pub fn new(limit: usize, ambiguous: Arc<Ambiguous>) -> Tracker {
        Tracker {
            state: State::Head,
            buf: Vec::new(),
            heads: 0,
            limit,
            ambiguous,
        }
    }

    pub fn feed(&mut self, mut input: &[u8]) {
        // body bytes pass without being buffered
        while self.buf.is_empty() && !input.is_empty() {
            match self.state {
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(input.len());
                    input = &input[take..];
                    self.after_body(n - take as u64);
                }
                State::Off => return,
                _ => break,
            }
        }
        if input.is_empty() || self.state == State::Off {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(input);
        let mut pos = 0;
        while pos < buf.len() {
            let data = &buf[pos..];
            let used = match self.state {
                State::Off => break,
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    self.after_body(n - take as u64);
                    take
                }
                State::Head => match self.head(data) {
                    Some(n) => n,
                    None => break,
                },
                State::ChunkSize => match httparse::parse_chunk_size(data) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        self.state = State::Trailers;
                        n
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        self.state = State::ChunkData(size);
                        n
                    }
                    Ok(httparse::Status::Partial) => {
                        if data.len() > 4096 {
                            self.state = State::Off;
                        }
                        break;
                    }
                    Err(_) => {
                        Ambiguous::mark(&self.ambiguous.bad_chunks, self.heads);
                        self.state = State::Off;
                        break;
                    }
                },
                State::ChunkEnd => {
                    if data.starts_with(b"\r\n") {
                        self.state = State::ChunkSize;
                        2
                    } else if data.len() < 2 && data == b"\r" {
                        break;
                    } else {
                        Ambiguous::mark(&self.ambiguous.bad_chunks, self.heads);
                        self.state = State::Off;
                        break;
                    }
                }
                State::Trailers => {
                    if data.starts_with(b"\r\n") {
                        self.state = State::Head;
                        2
                    } else if let Some(i) = find(data, b"\r\n\r\n") {
                        self.state = State::Head;
                        i + 4
                    } else {
                        if data.len() > self.limit {
                            self.state = State::Off;
                        }
                        break;
                    }
                }
            };
            pos += used;
        }
        if self.state != State::Off {
            buf.drain(..pos.min(buf.len()));
            self.buf = buf;
        }
    }

    fn after_body(&mut self, rest: u64) {
        self.state = match (self.state, rest) {
            (State::Body(_), 0) => State::Head,
            (State::Body(_), r) => State::Body(r),
            (State::ChunkData(_), 0) => State::ChunkEnd,
            (State::ChunkData(_), r) => State::ChunkData(r),
            (s, _) => s,
        };
    }

    /// Parses a request head at the start of `data`: the bytes it took, or None when
    /// more are needed or tracking stopped.
    fn head(&mut self, data: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if data.len() > self.limit {
                    self.state = State::Off;
                }
                return None;
            }
            Err(_) => {
                self.state = State::Off;
                return None;
            }
        };
        self.heads += 1;
        let mut cl: Option<&[u8]> = None;
        let mut lengths = 0;
        let mut te = false;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl = Some(h.value);
                lengths += 1 + h.value.iter().filter(|&&c| c == b',').count();
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if lengths > 1 {
            Ambiguous::mark(&self.ambiguous.repeated_length, self.heads);
        }
        if te && cl.is_some() {
            Ambiguous::mark(&self.ambiguous.both, self.heads);
            self.state = State::Off;
            return None;
        }
        self.state = if upgrade {
            State::Off
        } else if te {
            State::ChunkSize
        } else if let Some(v) = cl {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => State::Head,
                Some(len) => State::Body(len),
                None => State::Off,
            }
        } else {
            State::Head
        };
        Some(n)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A stream whose reads feed a [`Tracker`].
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    tracker: Tracker,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, tracker: Tracker) -> Tracked<S> {
        Tracked { inner, tracker }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            this.tracker.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

    fn run(chunks: &[&[u8]]) -> (u64, State, u64) {
        let a = Arc::new(Ambiguous::default());
        let mut t = Tracker::new(65536, a.clone());
        for c in chunks {
            t.feed(c);
        }
        (a.both.load(Ordering::Acquire), t.state, t.heads)
    }

    fn bytewise(all: &[u8]) -> (u64, State, u64) {
        let chunks: Vec<&[u8]> = all.chunks(1).collect();
        run(&chunks)
    }

    const THREE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn finds_the_ambiguous_request_after_bodies_of_both_kinds() {
        assert_eq!(run(&[THREE]), (3, State::Off, 3));
        assert_eq!(bytewise(THREE), (3, State::Off, 3), "split anywhere");
    }

    #[test]
    fn ordinary_requests_are_followed_to_the_next_head() {
        let two =
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(run(&[two]), (0, State::Head, 2));
        assert_eq!(bytewise(two), (0, State::Head, 2));
    }

    #[test]
    fn marks_the_request_whose_chunks_are_malformed() {
        for body in [
            &b"zz\r\n"[..],
            b"3\r\nabcXX",
            b"3\r\nabc\r\nfffffffffffffffffff\r\n",
        ] {
            let a = Arc::new(Ambiguous::default());
            let mut t = Tracker::new(65536, a.clone());
            t.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
            t.feed(body);
            assert!(a.bad_chunks(2), "{body:?}");
            assert!(!a.bad_chunks(1));
        }
    }

    #[test]
    fn marks_repeated_content_lengths() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\nx",
        ] {
            let a = Arc::new(Ambiguous::default());
            let mut t = Tracker::new(65536, a.clone());
            t.feed(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
            t.feed(head);
            assert!(a.repeated_length(2) && !a.repeated_length(1));
        }
    }

    #[test]
    fn stops_when_unsure() {
        assert_eq!(
            run(&[b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"]).1,
            State::Off
        );
        assert_eq!(
            run(&[b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"]).1,
            State::Off
        );
        assert_eq!(
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]).1,
            State::Off
        );
    }
}
