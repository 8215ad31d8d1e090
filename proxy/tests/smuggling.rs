//! A request-smuggling and normalisation corpus: generated mutations of CL/TE framing,
//! header-name and header-value bytes, line endings, chunk syntax, request lines,
//! authorities and path encodings, each carrying a smuggled request. Every mutation goes
//! through the proxy to a raw-socket upstream that logs every byte it receives; the log
//! is then read by a strict parser (httparse heads, strict framing) and by lenient ones
//! (bare LF, obs-fold, trimmed and case-folded names, underscores read as dashes, TE
//! found anywhere in the value, first or last Content-Length, TE or CL winning, loose
//! chunk sizes, a Tomcat-like path resolution). Under every reading, the upstream must
//! see exactly the requests the proxy allowed, no more, none outside `/public/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use proxy::{AuditLog, Config, FixedListener, Metrics, Mode, PolicyStore, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// GET and POST under `/public/` only.
const CORPUS_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: "GET|POST", path: "/public/.*"}
"#;

// ---------------------------------------------------------------- the mutations

struct Mutation {
    id: usize,
    what: String,
    bytes: Vec<u8>,
}

/// A request that smuggles `GET /admin/m{id}` (and a `/public/` one that would only
/// count as a second request) behind `framing` headers and `body`.
fn smuggle(id: usize, what: String, head_extra: &str, body: &str) -> Mutation {
    let next = format!("GET /public/next-m{id} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    let bytes = format!("POST /public/m{id} HTTP/1.1\r\nHost: web\r\n{head_extra}\r\n{body}{next}")
        .into_bytes();
    Mutation { id, what, bytes }
}

fn smuggled_chunked(id: usize) -> String {
    format!("0\r\n\r\nGET /admin/m{id} HTTP/1.1\r\nHost: web\r\nX: ")
}

fn corpus() -> Vec<Mutation> {
    let mut out = Vec::new();
    let mut id = 0;
    let mut next_id = || {
        id += 1;
        id
    };

    // CL.TE and TE.CL with every spelling of Transfer-Encoding
    let te_names = [
        "Transfer-Encoding",
        "transfer-encoding",
        "TRANSFER-ENCODING",
        "Transfer_Encoding",
        "Transfer-Encoding ",
        " Transfer-Encoding",
        "\tTransfer-Encoding",
        "Transfer-Encoding\t",
        "Transfer-Encodings",
        "Transfer-Encoding\x0b",
        "X-Transfer-Encoding",
        "Transfer\x00Encoding",
    ];
    let seps = [":", ": ", ":\t", ":  ", ":\x0b", ":\x0c", " :"];
    let te_values = [
        "chunked",
        "Chunked",
        "CHUNKED",
        " chunked",
        "chunked ",
        "\tchunked",
        "chunked\t",
        "\x0bchunked",
        "chunked\x0b",
        "\x0cchunked",
        "xchunked",
        "chunkedx",
        "chunk",
        "chunked, identity",
        "identity, chunked",
        "identity,chunked",
        "chunked,chunked",
        "chunked, chunked",
        "gzip, chunked",
        "\"chunked\"",
        "chunked;q=1",
        "ch\u{00fc}nked",
        "chunked\r\n X-Fold: 1",
        "x\r\n chunked",
        "identity",
        "",
    ];
    let cls = ["", "Content-Length: 4\r\n", "Content-Length: 70\r\n"];
    for name in te_names {
        for value in te_values {
            for cl in cls {
                let id = next_id();
                let te = format!("{name}: {value}\r\n");
                out.push(smuggle(
                    id,
                    format!("TE name {name:?} value {value:?} with {cl:?}"),
                    &format!("{cl}{te}"),
                    &smuggled_chunked(id),
                ));
                let id = next_id();
                out.push(smuggle(
                    id,
                    format!("TE after CL reversed: {name:?} {value:?} {cl:?}"),
                    &format!("{te}{cl}"),
                    &smuggled_chunked(id),
                ));
            }
        }
    }
    for sep in seps {
        for value in ["chunked", " chunked", "identity, chunked"] {
            for cl in cls {
                let id = next_id();
                out.push(smuggle(
                    id,
                    format!("TE separator {sep:?} {value:?} {cl:?}"),
                    &format!("{cl}Transfer-Encoding{sep}{value}\r\n"),
                    &smuggled_chunked(id),
                ));
            }
        }
    }
    // two TE headers, TE + CL in every order
    for (a, b) in [
        ("chunked", "identity"),
        ("identity", "chunked"),
        ("chunked", "chunked"),
        ("chunked", "x"),
    ] {
        for cl in cls {
            let id = next_id();
            out.push(smuggle(
                id,
                format!("two TE {a} {b} {cl:?}"),
                &format!("Transfer-Encoding: {a}\r\n{cl}Transfer-Encoding: {b}\r\n"),
                &smuggled_chunked(id),
            ));
        }
    }

    // Content-Length spellings, the body ending where one reading says and a smuggled
    // request where another does
    let cl_values = [
        "5",
        "05",
        "005",
        "+5",
        "-5",
        " 5",
        "5 ",
        "5\t",
        "5,5",
        "5, 5",
        "5,6",
        "5 6",
        "0x5",
        "5.0",
        "5a",
        "1e1",
        "99999999999999999999999",
        "\x0b5",
        "",
    ];
    let cl_names = [
        "Content-Length",
        "content-length",
        "Content_Length",
        "Content-Length ",
        " Content-Length",
        "Content-Lengthx",
    ];
    for name in cl_names {
        for value in cl_values {
            let id = next_id();
            out.push(smuggle(
                id,
                format!("CL {name:?}: {value:?}"),
                &format!("{name}: {value}\r\n"),
                &format!("hello0\r\n\r\nGET /admin/m{id} HTTP/1.1\r\nHost: web\r\n\r\n"),
            ));
        }
    }
    for (a, b) in [("5", "5"), ("5", "6"), ("6", "5"), ("5", "0"), ("0", "5")] {
        let id = next_id();
        out.push(smuggle(
            id,
            format!("two CL {a} {b}"),
            &format!("Content-Length: {a}\r\nContent-Length: {b}\r\n"),
            &format!("hello0\r\n\r\nGET /admin/m{id} HTTP/1.1\r\nHost: web\r\n\r\n"),
        ));
    }

    // chunk syntax
    let chunk_bodies = [
        "5\r\nhello\r\n0\r\n\r\n",
        "5 \r\nhello\r\n0\r\n\r\n",
        "5;a=b\r\nhello\r\n0\r\n\r\n",
        "5;a=\"x\r\ny\"\r\nhello\r\n0\r\n\r\n",
        "05\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "5\nhello\n0\n\n",
        "5\rhello\r0\r\r",
        "-5\r\nhello\r\n0\r\n\r\n",
        "+5\r\nhello\r\n0\r\n\r\n",
        "fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX0\r\n\r\n",
        "5\r\nhello\r\n0\r\nContent-Length: 99\r\n\r\n",
        "5\r\nhello\r\n0\r\nTransfer-Encoding: x\r\n\r\n",
        "5\r\nhello\r\n000\r\n\r\n",
        "5\r\nhello\r\n0;x\r\n\r\n",
        "5\r\nhello\r\n0\r\n\r",
        "2\r\nhello\r\n0\r\n\r\n",
        "a\r\nhello\r\n0\r\n\r\n",
        "\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    for body in chunk_bodies {
        let id = next_id();
        out.push(smuggle(
            id,
            format!("chunk body {body:?}"),
            "Transfer-Encoding: chunked\r\n",
            &format!("{body}GET /admin/m{id} HTTP/1.1\r\nHost: web\r\n\r\n"),
        ));
    }

    // every byte in a header name and in a header value, and line-ending tricks
    for b in 0u8..=255 {
        let c = b as char;
        let id = next_id();
        let mut m = smuggle(id, format!("name byte {b:#04x}"), "", "");
        let head = format!("POST /public/m{id} HTTP/1.1\r\nHost: web\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(b"X-A");
        bytes.push(b);
        bytes.extend_from_slice(b"B: 1\r\nContent-Length: 0\r\n\r\n");
        bytes.extend_from_slice(
            format!("GET /public/next-m{id} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        m.bytes = bytes;
        out.push(m);
        let _ = c;
        let id = next_id();
        let mut m = smuggle(id, format!("value byte {b:#04x}"), "", "");
        let mut bytes = format!("POST /public/m{id} HTTP/1.1\r\nHost: web\r\nX-A: a").into_bytes();
        bytes.push(b);
        bytes.extend_from_slice(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n");
        bytes.extend_from_slice(smuggled_chunked(id).as_bytes());
        bytes.extend_from_slice(
            format!("GET /public/next-m{id} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        m.bytes = bytes;
        out.push(m);
    }
    for eol in ["\n", "\r", "\r\r\n", "\n\r", "\r\n\t", "\r\n "] {
        for extra in [
            "Transfer-Encoding: chunked\r\n",
            "Content-Length: 4\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        ] {
            let id = next_id();
            let mut m = smuggle(id, format!("eol {eol:?} before {extra:?}"), "", "");
            m.bytes = format!(
                "POST /public/m{id} HTTP/1.1\r\nHost: web\r\nX-A: 1{eol}{extra}\r\n{}GET /public/next-m{id} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
                smuggled_chunked(id)
            )
            .into_bytes();
            out.push(m);
        }
    }

    // request lines and authorities
    let lines = [
        "GET /public/m{id} HTTP/1.1",
        "GET  /public/m{id} HTTP/1.1",
        "GET /public/m{id}  HTTP/1.1",
        "GET /public/m{id} HTTP/1.1 x",
        "GET /public/m{id} HTTP/1.0",
        "GET /public/m{id} HTTP/0.9",
        "GET /public/m{id} HTTP/2.0",
        "GET /public/m{id}",
        "get /public/m{id} HTTP/1.1",
        "GET\t/public/m{id}\tHTTP/1.1",
        "GET /public/m{id}\x00 HTTP/1.1",
        "GET http://web/public/m{id} HTTP/1.1",
        "GET http://web/admin/m{id} HTTP/1.1",
        "GET http://admin@web/public/m{id} HTTP/1.1",
        "GET https://web/public/m{id} HTTP/1.1",
        "GET //web/public/m{id} HTTP/1.1",
        "GET * HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "CONNECT web:80 HTTP/1.1",
        "GET /public/m{id} HTTP/1.1\r\nHost: web\r\n\r\nGET /admin/m{id} HTTP/1.1",
    ];
    for line in lines {
        for host in [
            "Host: web\r\n",
            "",
            "Host: web\r\nHost: admin\r\n",
            "Host: web/admin\r\n",
            "Host: \r\n",
        ] {
            let id = next_id();
            let line = line.replace("{id}", &id.to_string());
            let mut m = smuggle(id, format!("line {line:?} {host:?}"), "", "");
            m.bytes = format!(
                "{line}\r\n{host}\r\nGET /public/next-m{id} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
            )
            .into_bytes();
            out.push(m);
        }
    }

    // path encodings: whatever reaches the upstream must resolve under /public/
    let paths = [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public/..%2fadmin",
        "/public/..%2Fadmin",
        "/public/..%5cadmin",
        "/public/..\\admin",
        "/public\\..\\admin",
        "/public/..;/admin",
        "/public/..;x=1/admin",
        "/public/.;/../admin",
        "/public/%2e%2e;/admin",
        "/public/..%3b/admin",
        "/public/%252e%252e/admin",
        "/public/%c0%ae%c0%ae/admin",
        "/public/.%00./admin",
        "/public//../admin",
        "/public/./../admin",
        "/public/x/../../admin",
        "/public/x/..",
        "/public/..",
        "/public/.",
        "/public/%2e",
        "//admin",
        "///public/../admin",
        "/public%2f..%2fadmin",
        "/public/x#/../../admin",
        "/public/x?/../../admin",
        "/public/x?a=..%2f..%2fadmin",
        "/public/x%23/../../admin",
        "/public/x%3f/../../admin",
        "/public/ x",
        "/public/x%20HTTP/1.1%0d%0aX:",
        "/public/\u{00e9}",
        "/PUBLIC/../admin",
        "/public/...",
        "/public/..../admin",
        "/public/;/../admin",
        "/admin;/public/x",
        "/admin/..;/public/x",
        "/public/%2e%2e%2f%2e%2e/admin",
    ];
    for path in paths {
        for method in ["GET", "POST"] {
            let id = next_id();
            let mut m = smuggle(id, format!("path {method} {path:?}"), "", "");
            m.bytes = format!(
                "{method} {path}?m={id} HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\nGET /public/next-m{id} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
            )
            .into_bytes();
            out.push(m);
        }
    }
    out
}

// ---------------------------------------------------------------- the upstream

/// Per upstream connection: the bytes received and whether it has ended.
type Logs = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;

/// A raw-socket upstream: logs every byte of every connection, answers each request its
/// strict reading finds with `200` and an empty body.
struct RawUpstream {
    addr: SocketAddr,
    /// Per connection: the bytes and whether it has ended.
    logs: Logs,
}

async fn raw_upstream() -> RawUpstream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let logs: Logs = Arc::default();
    let all = logs.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let logs = all.clone();
            let i = {
                let mut g = logs.lock().unwrap();
                g.push((Vec::new(), false));
                g.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut answered = 0;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let complete = {
                        let mut g = logs.lock().unwrap();
                        g[i].0.extend_from_slice(&buf[..n]);
                        parse_all(&g[i].0, &STRICT).complete
                    };
                    while answered < complete {
                        answered += 1;
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
                logs.lock().unwrap()[i].1 = true;
            });
        }
    });
    RawUpstream { addr, logs }
}

// ---------------------------------------------------------------- the readers

/// How a reader frames requests.
#[derive(Debug)]
struct Reading {
    name: &'static str,
    strict: bool,
    /// the last Content-Length counts (else the first)
    cl_last: bool,
    /// chunked wins over Content-Length (else Content-Length wins)
    te_wins: bool,
    /// `_` in a header name reads as `-` (CGI, some WSGI stacks)
    underscore_is_dash: bool,
}

const STRICT: Reading = Reading {
    name: "strict",
    strict: true,
    cl_last: false,
    te_wins: true,
    underscore_is_dash: false,
};

const READINGS: [Reading; 5] = [
    STRICT,
    Reading {
        name: "lenient, first CL, TE wins",
        strict: false,
        cl_last: false,
        te_wins: true,
        underscore_is_dash: false,
    },
    Reading {
        name: "lenient, last CL, CL wins",
        strict: false,
        cl_last: true,
        te_wins: false,
        underscore_is_dash: false,
    },
    Reading {
        name: "lenient, underscores as dashes, TE wins",
        strict: false,
        cl_last: true,
        te_wins: true,
        underscore_is_dash: true,
    },
    Reading {
        name: "lenient, underscores as dashes, first CL wins",
        strict: false,
        cl_last: false,
        te_wins: false,
        underscore_is_dash: true,
    },
];

#[derive(Debug, Default)]
struct Parsed {
    /// (method, target) of every request head read, complete or not
    heads: Vec<(String, String)>,
    /// requests read to the end of their body
    complete: usize,
    /// why reading stopped before the end of the bytes
    error: Option<String>,
}

fn parse_all(mut b: &[u8], r: &Reading) -> Parsed {
    let mut out = Parsed::default();
    while !b.is_empty() {
        let head = if r.strict {
            strict_head(b)
        } else {
            lenient_head(b, r)
        };
        let (used, method, target, framing) = match head {
            Ok(Some(h)) => h,
            Ok(None) => return out,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        };
        out.heads.push((method, target));
        b = &b[used..];
        let body = match framing {
            Framing::Length(n) => usize::try_from(n).ok().filter(|n| *n <= b.len()),
            Framing::Chunked => chunked_len(b, r.strict),
        };
        match body {
            Some(n) => {
                b = &b[n..];
                out.complete += 1;
            }
            None => return out,
        }
    }
    out
}

enum Framing {
    Length(u64),
    Chunked,
}

type Head = Option<(usize, String, String, Framing)>;

fn strict_head(b: &[u8]) -> Result<Head, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("strict head: {e}")),
    };
    let mut cl = Vec::new();
    let mut te = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(h.value);
        }
    }
    let framing = if !te.is_empty() {
        if te.len() > 1 || !te[0].eq_ignore_ascii_case(b"chunked") || !cl.is_empty() {
            return Err(format!("strict framing: TE {te:?} CL {cl:?}"));
        }
        Framing::Chunked
    } else if let Some(v) = cl.first() {
        if cl.len() > 1 || v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
            return Err(format!("strict framing: CL {cl:?}"));
        }
        Framing::Length(
            std::str::from_utf8(v)
                .unwrap()
                .parse()
                .map_err(|e| format!("CL: {e}"))?,
        )
    } else {
        Framing::Length(0)
    };
    Ok(Some((
        used,
        req.method.unwrap_or("").to_string(),
        req.path.unwrap_or("").to_string(),
        framing,
    )))
}

/// Lines end at LF (a CR before it dropped); a line starting with SP or HT continues
/// the previous header; names are trimmed and case-folded.
fn lenient_head(b: &[u8], r: &Reading) -> Result<Head, String> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut pos = 0;
    let used = loop {
        let Some(nl) = b[pos..].iter().position(|&c| c == b'\n') else {
            return Ok(None);
        };
        let mut line = &b[pos..pos + nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        pos += nl + 1;
        if line.is_empty() {
            if lines.is_empty() {
                continue; // blank lines before a request
            }
            break pos;
        }
        lines.push(line);
    };
    let request_line = String::from_utf8_lossy(lines[0]).into_owned();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in &lines[1..] {
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(String::from_utf8_lossy(line).trim());
            }
            continue;
        }
        let text = String::from_utf8_lossy(line);
        let Some((name, value)) = text.split_once(':') else {
            continue;
        };
        let mut name = name.trim().to_ascii_lowercase();
        if r.underscore_is_dash {
            name = name.replace('_', "-");
        }
        headers.push((name, value.trim().to_string()));
    }
    let te = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let cls: Vec<u64> = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .filter_map(|(_, v)| {
            let v = v.trim_start_matches('+');
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .collect();
    let cl = if r.cl_last { cls.last() } else { cls.first() }.copied();
    let framing = match (te, cl) {
        (true, Some(_)) if r.te_wins => Framing::Chunked,
        (_, Some(n)) => Framing::Length(n),
        (true, None) => Framing::Chunked,
        (false, None) => Framing::Length(0),
    };
    Ok(Some((used, method, target, framing)))
}

/// The length of a chunked body with its trailers, or None when incomplete/unreadable.
fn chunked_len(b: &[u8], strict: bool) -> Option<usize> {
    let mut pos = 0;
    loop {
        let nl = b[pos..].iter().position(|&c| c == b'\n')?;
        let mut line = &b[pos..pos + nl];
        if strict {
            line = line.strip_suffix(b"\r")?;
        } else if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let size_text = String::from_utf8_lossy(line);
        let size_text = size_text
            .split([';', ' ', '\t'])
            .next()
            .unwrap_or("")
            .to_string();
        if strict && (size_text.is_empty() || !size_text.bytes().all(|c| c.is_ascii_hexdigit())) {
            return None;
        }
        let size = usize::from_str_radix(size_text.trim(), 16).ok()?;
        pos += nl + 1;
        if size == 0 {
            // trailers up to an empty line
            loop {
                let nl = b[pos..].iter().position(|&c| c == b'\n')?;
                let line = &b[pos..pos + nl];
                pos += nl + 1;
                if line.is_empty() || line == b"\r" {
                    return Some(pos);
                }
            }
        }
        pos = pos.checked_add(size)?;
        if strict {
            if b.get(pos..pos + 2)? != b"\r\n" {
                return None;
            }
            pos += 2;
        } else {
            if b.get(pos) == Some(&b'\r') {
                pos += 1;
            }
            if b.get(pos) != Some(&b'\n') {
                return None;
            }
            pos += 1;
        }
    }
}

/// The path as a lenient servlet container resolves it: `\\` as `/`, percent-decoded
/// once (overlong UTF-8 dots `%c0%ae` read as `.`), `;` parameters cut from each segment,
/// dot segments removed.
fn resolved_path(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let path = match path.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => path,
    };
    let p = percent_decode(&path.to_ascii_lowercase().replace("%c0%ae", ".")).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mutation id in a target or a message (`/m12`, `-m12`, `m=12`).
fn mutation_id(s: &str) -> Option<usize> {
    for pat in ["-m", "/m", "m="] {
        for (i, _) in s.match_indices(pat) {
            let digits: String = s[i + pat.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

// ---------------------------------------------------------------- the run

async fn run_one(addr: SocketAddr, m: &Mutation) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s.write_all(&m.bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mutation_smuggles_a_request_past_the_policy() {
    let corpus = corpus();
    assert!(corpus.len() > 1500, "{} mutations", corpus.len());
    let up = raw_upstream().await;
    let metrics = Metrics::new();
    let (audit, mut records) = AuditLog::channel(1 << 16, proxy::DroppedCounter::new());
    let config = Config {
        header_read_timeout_ms: 1000,
        idle_timeout_ms: 1000,
        ..Config::default()
    };
    let proxy = Proxy::new(
        config,
        Arc::new(PolicyStore::new(model(CORPUS_POLICY))),
        Mode::Standalone {
            endpoint: "default/web".into(),
            direction: policy_model::Direction::Ingress,
            port: Some(80),
        },
        audit,
        metrics,
    );
    let listener = FixedListener::bind("127.0.0.1:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    let addr = proxy::Listener::local_addr(&listener).unwrap();
    let p = proxy.clone();
    let serving = tokio::spawn(async move { p.serve(listener).await });

    let started = std::time::Instant::now();
    let corpus = Arc::new(corpus);
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..corpus.len() {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let corpus = corpus.clone();
        tasks.push(tokio::spawn(async move {
            let r = run_one(addr, &corpus[i]).await;
            drop(permit);
            r
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    // stop the proxy: its pooled upstream connections close, the upstream sees EOF
    serving.abort();
    let _ = serving.await;
    drop(proxy);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !up.logs.lock().unwrap().iter().all(|(_, done)| *done) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream connections still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // what the proxy allowed (every allowed request names its rule), by target: those
    // it forwarded must all arrive; those whose forwarding failed (the client's body
    // broke off) may
    let mut forwarded: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    while let Ok(e) = records.try_recv() {
        let proxy::AuditEvent::Http(r) = e else {
            panic!("the HTTP proxy queued a {} event", e.kind())
        };
        if r.allowed_by.is_empty() {
            continue;
        }
        let into = if r.verdict == proxy::Verdict::Forwarded {
            &mut forwarded
        } else {
            &mut failed
        };
        *into.entry(r.http.path.clone()).or_default() += 1;
    }
    let allowed_total: usize = forwarded.values().sum();
    let logs = up.logs.lock().unwrap().clone();
    let mut failures = Vec::new();
    for reading in &READINGS {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (bytes, _) in &logs {
            let parsed = parse_all(bytes, reading);
            if let Some(e) = &parsed.error {
                failures.push(format!(
                    "{}: unreadable upstream bytes ({e}): {:?}",
                    reading.name,
                    String::from_utf8_lossy(bytes)
                ));
            }
            for (method, target) in parsed.heads {
                let resolved = resolved_path(&target);
                if !matches!(method.as_str(), "GET" | "POST")
                    || !(resolved == "/public" || resolved.starts_with("/public/"))
                {
                    failures.push(format!(
                        "{}: forbidden request upstream: {method} {target} (resolves to {resolved})",
                        reading.name
                    ));
                }
                *seen.entry(target).or_default() += 1;
            }
        }
        let mut diff = Vec::new();
        for (t, n) in &seen {
            let most = forwarded.get(t).unwrap_or(&0) + failed.get(t).unwrap_or(&0);
            if *n > most {
                diff.push(format!("{t}: upstream read {n}, the proxy allowed {most}"));
            }
        }
        for (t, n) in &forwarded {
            let got = seen.get(t).unwrap_or(&0);
            if got < n {
                diff.push(format!("{t}: upstream read {got}, the proxy forwarded {n}"));
            }
        }
        for d in diff {
            failures.push(format!("{}: {d}", reading.name));
        }
    }
    for f in &failures {
        // name the mutation behind each failure
        let id = mutation_id(f);
        if let Some(m) = id.and_then(|id| corpus.iter().find(|m| m.id == id)) {
            eprintln!("{f}\n  mutation {}: {}", m.id, m.what);
        } else {
            eprintln!("{f}");
        }
    }
    eprintln!(
        "{} mutations in {:?}; {} requests allowed and read upstream; {} answers",
        corpus.len(),
        started.elapsed(),
        allowed_total,
        answers.iter().filter(|a| !a.is_empty()).count()
    );
    assert!(failures.is_empty(), "{} failures", failures.len());
    assert!(
        allowed_total > 500,
        "too few requests got through to test anything"
    );
}
