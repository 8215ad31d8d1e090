//! A hand-built HTTP/2 client for what real clients would never send: raw frames
//! (PRIORITY, WINDOW_UPDATE, PING and SETTINGS floods; HEADERS with chosen header lists,
//! HPACK literals without Huffman coding) and a frame reader for the server's answers.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// `ENHANCE_YOUR_CALM` (RFC 9113 section 7).
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The client preface and an empty SETTINGS frame.
pub fn preface() -> Vec<u8> {
    let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    v.extend(frame(SETTINGS, 0, 0, &[]));
    v
}

pub fn priority(stream: u32, depends_on: u32) -> Vec<u8> {
    let mut p = depends_on.to_be_bytes().to_vec();
    p.push(16);
    frame(PRIORITY, 0, stream, &p)
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn ping(data: u64) -> Vec<u8> {
    frame(PING, 0, 0, &data.to_be_bytes())
}

/// HPACK "literal header field without indexing, new name", no Huffman coding: any
/// bytes, in the order given, duplicates included.
pub fn hpack(headers: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        int7(&mut out, name.len());
        out.extend_from_slice(name);
        int7(&mut out, value.len());
        out.extend_from_slice(value);
    }
    out
}

fn int7(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// A HEADERS frame carrying `headers` (pseudo-headers included by the caller).
pub fn headers(stream: u32, headers: &[(&[u8], &[u8])], end_stream: bool) -> Vec<u8> {
    let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
    frame(HEADERS, flags, stream, &hpack(headers))
}

/// A frame as read back.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// GOAWAY's error code.
    pub fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8).then(|| {
            u32::from_be_bytes([
                self.payload[4],
                self.payload[5],
                self.payload[6],
                self.payload[7],
            ])
        })
    }

    /// The `:status` of a response HEADERS frame, when the server sent it as HPACK's
    /// static-table index (200, 204, 206, 304, 400, 404, 500) or as a literal.
    pub fn status(&self) -> Option<u16> {
        if self.kind != HEADERS {
            return None;
        }
        let first = *self.payload.first()?;
        match first {
            0x88 => Some(200),
            0x89 => Some(204),
            0x8a => Some(206),
            0x8b => Some(304),
            0x8c => Some(400),
            0x8d => Some(404),
            0x8e => Some(500),
            // literal with indexed name :status (index 8..14), value not Huffman coded
            b if (b & 0xc0 == 0x40 && (8..=14).contains(&(b & 0x3f)))
                || (b & 0xf0 == 0x00 && (8..=14).contains(&(b & 0x0f))) =>
            {
                let len = usize::from(*self.payload.get(1)? & 0x7f);
                let huffman = self.payload.get(1)? & 0x80 != 0;
                if huffman {
                    return None;
                }
                std::str::from_utf8(self.payload.get(2..2 + len)?)
                    .ok()?
                    .parse()
                    .ok()
            }
            _ => None,
        }
    }
}

/// Reads the next frame, or None at EOF, on an error, or after `wait`.
pub async fn read_frame<R: AsyncRead + Unpin>(s: &mut R, wait: Duration) -> Option<Frame> {
    let mut head = [0u8; 9];
    tokio::time::timeout(wait, s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    tokio::time::timeout(wait, s.read_exact(&mut payload))
        .await
        .ok()?
        .ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// Reads frames until one satisfies `want` (returned), EOF, or the deadline.
pub async fn read_until<R: AsyncRead + Unpin>(
    s: &mut R,
    deadline: Duration,
    mut want: impl FnMut(&Frame) -> bool,
) -> Option<Frame> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let f = read_frame(s, left).await?;
        if want(&f) {
            return Some(f);
        }
    }
}

/// Connects and sends the preface.
pub async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&preface()).await.expect("preface");
    s
}
