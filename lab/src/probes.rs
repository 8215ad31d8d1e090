//! Executing a scenario's probes for real, with real clients inside the source
//! namespace: curl (HTTP/1.1, h2c), dig (DNS over UDP and TCP) and `ward-lab probe` (TCP
//! and UDP echo, gRPC, raw SCTP, TLS sessions with an exact SNI). Every client has a deadline; probes run concurrently.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use policy_model::conformance::Expect;
use policy_model::{Model, Protocol, Verdict};

use scenario::{Client, LabProbe};

use testkit::nsenter;

use crate::topology::LabState;

/// Probes in flight at once.
const PARALLEL: usize = 8;
/// Connect deadline (a denied TCP connect is decided by this).
const CONNECT_SECS: &str = "2";
/// Whole-request deadline.
const REQUEST_SECS: &str = "4";

/// What a probe saw.
#[derive(Clone, Debug)]
pub struct Observed {
    pub allowed: bool,
    pub detail: String,
}

/// One executed probe.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub probe: LabProbe,
    pub observed: Observed,
    pub passed: bool,
    /// Why, as the policy model explains the verdict.
    pub why: String,
    /// The agent's own drop or audit record of the probe's flow, in a few words.
    pub record: Option<String>,
    /// Whether the policy model sends the flow through a proxy (on either side).
    pub proxied: bool,
}

/// Runs every probe (concurrently) and explains each with `model` and, when agents run,
/// the audit or drop record the agents wrote for it.
pub fn run_all(state: &LabState, probes: &[LabProbe], model: Option<&Model>) -> Vec<Outcome> {
    let mut outcomes = run_probes(state, probes, model);
    if state.agents {
        // the audit queue is written a moment after the answer: read again until every
        // probe that needs a record has one, or the deadline passes
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let records = agent_records(state);
            for o in &mut outcomes {
                o.record = record_for(state, &o.probe, o.observed.allowed, &records);
            }
            if !outcomes.iter().any(lacks_audit) || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for o in outcomes.iter_mut().filter(|o| lacks_audit(o)) {
            o.passed = false;
            o.observed
                .detail
                .push_str("; no audit record of it in the agents' event stream");
        }
    }
    outcomes
}

/// A TLS session the proxy answered (the model redirects it, and it completed, was reset,
/// or got an HTTP answer inside) whose audit record is missing: every session through the
/// proxy is audited, and that record is what `ward observe` shows for it.
fn lacks_audit(o: &Outcome) -> bool {
    let answered =
        !o.observed.detail.starts_with("connect:") && !o.observed.detail.contains("timed out");
    o.proxied && o.probe.probe.tls.is_some() && answered && o.record.is_none()
}

/// Every event the agents have (`/v1/events?follow=false`): drops and audit records.
pub fn agent_records(state: &LabState) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for n in &state.nodes {
        if let Ok((200, body)) =
            crate::lifecycle::admin_get(state, &n.netns, "/v1/events?follow=false")
        {
            out.extend(
                body.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()),
            );
        }
    }
    out
}

/// The last record about a probe's flow, in a few words. Probes of the same flow run
/// concurrently, so a record whose verdict agrees with what the probe saw is preferred.
fn record_for(
    state: &LabState,
    lp: &LabProbe,
    allowed: bool,
    records: &[serde_json::Value],
) -> Option<String> {
    let agrees = |r: &serde_json::Value| {
        let v = match r["type"].as_str() {
            Some("http") => r["Verdict"].as_str(),
            Some("dns") => r["verdict"].as_str(),
            _ => Some("denied"),
        };
        v.is_some_and(|v| v.eq_ignore_ascii_case("forwarded") == allowed)
    };
    let about: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| describe_record(state, lp, r).is_some())
        .collect();
    let pick = about
        .iter()
        .rev()
        .find(|r| agrees(r))
        .or_else(|| about.last())?;
    describe_record(state, lp, pick)
}

/// A record in a few words, when it is about the probe's flow.
fn describe_record(state: &LabState, lp: &LabProbe, r: &serde_json::Value) -> Option<String> {
    let p = &lp.probe;
    let from = state.endpoint(&p.from)?.addr(lp.ipv6)?.to_string();
    let to = state.endpoint(&p.to)?.addr(lp.ipv6)?.to_string();
    let proto = match p.protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
        _ => 0,
    };
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    match r["type"].as_str()? {
        "drop" => (s(&r["source"]["ip"]) == from
            && s(&r["destination"]["ip"]) == to
            && r["destination"]["port"].as_u64() == Some(u64::from(p.port))
            && r["protocol"].as_u64() == Some(proto))
        .then(|| format!("dropped at {} ({})", s(&r["direction"]), s(&r["reason"]))),
        // a TLS session decided as a whole (spliced or reset): no HTTP in the record
        "http" if r.get("HTTP").is_none() => {
            let sni = p.tls.as_ref()?.sni.as_deref().map(str::to_ascii_lowercase);
            let tls = &r["TLS"];
            (s(&r["SourceEndpoint"]["IP"]) == from
                && s(&r["DestinationEndpoint"]["IP"]) == to
                && r["DestinationEndpoint"]["Port"].as_u64() == Some(u64::from(p.port))
                && tls["SNI"].as_str().map(str::to_string) == sni)
                .then(|| {
                    let by = match s(&tls["Rule"]["Policy"]) {
                        p if p.is_empty() => s(&r["Info"]),
                        p => p,
                    };
                    format!("TLS {} {} {by}", s(&tls["Mode"]), s(&r["Verdict"]))
                })
        }
        "http" => {
            let h = p.http.as_ref()?;
            let path = s(&r["HTTP"]["Path"]);
            (s(&r["SourceEndpoint"]["IP"]) == from
                && s(&r["DestinationEndpoint"]["IP"]) == to
                && r["DestinationEndpoint"]["Port"].as_u64() == Some(u64::from(p.port))
                && s(&r["HTTP"]["Method"]) == h.method
                && (path == h.path || path.starts_with(&format!("{}?", h.path))))
            .then(|| {
                let by = r["AllowedBy"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| s(&x["Policy"]))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .filter(|b| !b.is_empty())
                    .unwrap_or_else(|| s(&r["Info"]));
                format!("HTTP {} {} {by}", s(&r["Verdict"]), r["HTTP"]["Code"])
            })
        }
        "dns" => {
            let q = p
                .dns
                .as_ref()?
                .query
                .trim_end_matches('.')
                .to_ascii_lowercase();
            // `ip:port`, `[ip6]:port` for IPv6
            let client = s(&r["client"]).parse::<SocketAddr>().ok()?;
            (client.ip().to_string() == from
                && s(&r["qname"]).trim_end_matches('.').to_ascii_lowercase() == q)
                .then(|| {
                    let by = r["policy"]
                        .as_str()
                        .map_or_else(|| s(&r["reason"]), str::to_string);
                    format!("DNS {} {} {by}", s(&r["verdict"]), s(&r["rcode"]))
                })
        }
        _ => None,
    }
}

fn run_probes(state: &LabState, probes: &[LabProbe], model: Option<&Model>) -> Vec<Outcome> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; probes.len()]);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(probes.len()) {
            s.spawn(|| loop {
                let i = {
                    let Ok(mut n) = next.lock() else { return };
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(lp) = probes.get(i) else { return };
                let observed = execute(state, lp);
                let passed = observed.allowed == (lp.probe.expect == Expect::Allow);
                let (why, proxied) = explain(model, lp);
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(Outcome {
                        probe: lp.clone(),
                        observed,
                        passed,
                        why,
                        record: None,
                        proxied,
                    });
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// The model's words for a probe, and whether it sends the flow through a proxy.
fn explain(model: Option<&Model>, lp: &LabProbe) -> (String, bool) {
    let Some(model) = model else {
        return (String::new(), false);
    };
    match lp.probe.verdict(model) {
        Ok(v) => (why(&v), v.sides.iter().any(|s| s.proxied)),
        Err(e) => (format!("model: {e}"), false),
    }
}

/// The deciding policy of a verdict, in a few words.
pub fn why(v: &Verdict) -> String {
    if let Some(s) = v.sides.iter().find(|s| !s.allowed) {
        let by = match &s.policy {
            Some(p) => p.clone(),
            None => compact_reason(&s.reason),
        };
        return format!("{} {}: {by}", s.endpoint, s.direction);
    }
    let policies: Vec<String> = v
        .sides
        .iter()
        .filter_map(|s| {
            s.policy
                .as_ref()
                .map(|p| format!("{} {}: {p}", s.endpoint, s.direction))
        })
        .collect();
    if policies.is_empty() {
        "no policy selects either side".into()
    } else {
        policies.join("; ")
    }
}

/// "default deny: selected by A, B and no rule allows ..." -> "default deny (A +1)".
fn compact_reason(reason: &str) -> String {
    let Some(rest) = reason.strip_prefix("default deny: selected by ") else {
        return reason.to_string();
    };
    let selectors = rest.split(" and no rule").next().unwrap_or(rest);
    let mut names = selectors.split(", ");
    let first = names.next().unwrap_or_default();
    match names.count() {
        0 => format!("default deny ({first})"),
        n => format!("default deny ({first} +{n})"),
    }
}

fn denied(detail: impl Into<String>) -> Observed {
    Observed {
        allowed: false,
        detail: detail.into(),
    }
}

/// Executes one probe.
pub fn execute(state: &LabState, lp: &LabProbe) -> Observed {
    let p = &lp.probe;
    let (Some(from), Some(to)) = (state.endpoint(&p.from), state.endpoint(&p.to)) else {
        return denied(format!("unknown endpoint in {} -> {}", p.from, p.to));
    };
    let (Some(from_ip), Some(to_ip)) = (from.addr(lp.ipv6), to.addr(lp.ipv6)) else {
        return denied(format!("no IPv6 address in {} -> {}", p.from, p.to));
    };
    // A probe from an external speaks from that external's address.
    let bind = p.from.starts_with("external:").then(|| from_ip.to_string());
    let lab = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "ward-lab".into());
    let target = SocketAddr::new(to_ip, p.port).to_string();
    let mut cmd;
    let kind;
    match (p.protocol, &p.dns, &p.http, lp.client) {
        (Protocol::Tcp | Protocol::Udp, Some(dns), _, _) => {
            kind = Kind::Dig;
            cmd = timeout(nsenter(&from.netns, "dig"));
            cmd.arg(format!("@{to_ip}"))
                .args(["-p", &p.port.to_string(), "+time=2", "+tries=1"]);
            if p.protocol == Protocol::Tcp {
                cmd.arg("+tcp");
            }
            if let Some(b) = &bind {
                cmd.args(["-b", b]);
            }
            cmd.arg(&dns.query).arg("A");
        }
        (Protocol::Tcp, None, http, _) if p.tls.is_some() => {
            kind = Kind::Lab;
            cmd = timeout(nsenter(&from.netns, &lab));
            cmd.args(["probe", "tls", &target, "--ca"])
                .arg(crate::pki::Layout::of(&state.run_dir).client_bundle);
            if let Some(sni) = p.tls.as_ref().and_then(|t| t.sni.as_ref()) {
                cmd.args(["--sni", sni]);
            }
            if let Some(h) = http {
                if lp.client == Client::Grpc {
                    cmd.args(["--grpc", "--path", &h.path]);
                } else {
                    cmd.args(["--method", &h.method, "--path", &h.path]);
                }
                for (k, v) in &h.headers {
                    cmd.arg("--header").arg(format!("{k}: {v}"));
                }
            }
            if let Some(b) = &bind {
                cmd.args(["--bind", b]);
            }
        }
        (Protocol::Tcp, None, http, Client::Grpc) => {
            kind = Kind::Lab;
            cmd = timeout(nsenter(&from.netns, &lab));
            cmd.args(["probe", "grpc", &target]);
            if let Some(h) = http {
                cmd.args(["--path", &h.path]);
                for (k, v) in &h.headers {
                    cmd.arg("--header").arg(format!("{k}: {v}"));
                }
            }
            if let Some(b) = &bind {
                cmd.args(["--bind", b]);
            }
        }
        (Protocol::Tcp, None, Some(http), client) => {
            kind = Kind::Curl;
            cmd = timeout(nsenter(&from.netns, "curl"));
            cmd.args(["-sS", "--connect-timeout", CONNECT_SECS, "-m", REQUEST_SECS])
                .args(["-w", "\n%{http_code}", "-X", &http.method]);
            if lp.ipv6 {
                // `[` `]` of the IPv6 address are not a glob.
                cmd.arg("--globoff");
            }
            if client == Client::H2c {
                cmd.arg("--http2-prior-knowledge");
            }
            for (k, v) in &http.headers {
                cmd.arg("-H").arg(format!("{k}: {v}"));
            }
            if let Some(b) = &bind {
                cmd.args(["--interface", b]);
            }
            let path = if http.path.starts_with('/') {
                http.path.clone()
            } else {
                format!("/{}", http.path)
            };
            cmd.arg(format!("http://{target}{path}"));
        }
        (Protocol::Tcp | Protocol::Udp | Protocol::Sctp, None, _, _) => {
            kind = Kind::Lab;
            let k = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                _ => "sctp",
            };
            cmd = timeout(nsenter(&from.netns, &lab));
            cmd.args(["probe", k, &target]);
            if p.protocol == Protocol::Sctp {
                cmd.arg("--sctp-log")
                    .arg(crate::lifecycle::sctp_log(state, &to.netns));
            }
            if let Some(b) = &bind {
                cmd.args(["--bind", b]);
            }
        }
        (proto, _, _, _) => return denied(format!("the lab cannot probe {proto}")),
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return denied(format!("cannot run the client: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match kind {
        Kind::Lab => match stdout.trim().split_once(' ') {
            Some(("allow", d)) => Observed {
                allowed: true,
                detail: d.to_string(),
            },
            Some(("deny", d)) => denied(d),
            _ => denied(format!("client failed: {stderr}")),
        },
        Kind::Curl => curl_outcome(&stdout, &stderr, out.status.code(), &from_ip.to_string()),
        Kind::Dig => dig_outcome(&stdout),
    }
}

enum Kind {
    Curl,
    Dig,
    Lab,
}

/// Every client runs under coreutils `timeout`, a last line of defence behind the
/// clients' own deadlines.
fn timeout(inner: Command) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", "8"])
        .arg(inner.get_program())
        .args(inner.get_args());
    c
}

fn curl_outcome(stdout: &str, stderr: &str, exit: Option<i32>, source: &str) -> Observed {
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout));
    let code = code.trim();
    match code {
        "200" => {
            // the server echoes the client address it saw: the proxy keeps the source?
            let seen = body.rsplit(" from ").next().unwrap_or("").trim();
            let detail = if seen.is_empty() || seen == source {
                "HTTP 200".to_string()
            } else {
                format!("HTTP 200 (server saw {seen})")
            };
            Observed {
                allowed: true,
                detail,
            }
        }
        "000" | "" => denied(match exit {
            Some(7) => "connection refused".to_string(),
            Some(28) => "timed out (curl)".to_string(),
            Some(52) => "empty reply".to_string(),
            Some(56) => "connection reset".to_string(),
            _ => short(stderr),
        }),
        other => denied(format!("HTTP {other} {}", short(body))),
    }
}

fn dig_outcome(stdout: &str) -> Observed {
    let status = stdout
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or(s).trim().to_string());
    match status.as_deref() {
        Some("NOERROR") => {
            let answers = stdout
                .lines()
                .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last())
                .collect::<Vec<_>>()
                .join(" ");
            Observed {
                allowed: true,
                detail: if answers.is_empty() {
                    "NOERROR".into()
                } else {
                    format!("NOERROR {answers}")
                },
            }
        }
        Some("NXDOMAIN") => Observed {
            allowed: true,
            detail: "NXDOMAIN".into(),
        },
        Some(s) => denied(s.to_string()),
        None => denied(
            stdout
                .lines()
                .find(|l| l.contains("timed out") || l.contains("no servers"))
                .map_or("no answer", |l| l.trim_start_matches(";; ").trim()),
        ),
    }
}

fn short(s: &str) -> String {
    let s = s.trim().replace(['\r', '\n'], " ");
    let s = s.trim_start_matches("curl: ");
    if s.len() > 60 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(59).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s.to_string()
    }
}

/// Where the explanations of [`table`] wrap.
const WRAP: usize = 100;

/// The table `ward-lab check` prints: one line per probe (result, probe, expected,
/// observed), then indented lines saying why: the policy model's explanation and the
/// agent's own record of the flow, wrapped so that the table stays readable in a terminal.
pub fn table(outcomes: &[Outcome]) -> String {
    let rows: Vec<[String; 4]> = outcomes
        .iter()
        .map(|o| {
            let expect = match o.probe.probe.expect {
                Expect::Allow => "allow",
                Expect::Deny => "deny",
            };
            let mut probe = o.probe.probe.describe();
            match o.probe.client {
                Client::H2c => probe.push_str(" (h2c)"),
                // a gRPC call is always a POST of /package.Service/Method
                Client::Grpc => {
                    probe = probe.replacen(" HTTPS POST ", " gRPC ", 1).replacen(
                        " HTTP POST ",
                        " gRPC ",
                        1,
                    )
                }
                Client::Default => {}
            }
            if o.probe.ipv6 {
                probe.push_str(" (IPv6)");
            }
            [
                if o.passed { "ok" } else { "FAIL" }.to_string(),
                probe,
                expect.to_string(),
                format!(
                    "{} ({})",
                    if o.observed.allowed { "allow" } else { "deny" },
                    o.observed.detail
                ),
            ]
        })
        .collect();
    let header = [
        String::new(),
        "PROBE".to_string(),
        "EXPECTED".to_string(),
        "OBSERVED".to_string(),
    ];
    let mut widths = [0usize; 4];
    for r in std::iter::once(&header).chain(rows.iter()) {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |r: &[String; 4]| {
        let mut line = String::new();
        for (c, w) in r.iter().zip(widths) {
            line.push_str(&format!("{c:<w$}  "));
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = line(&header);
    for (r, o) in rows.iter().zip(outcomes) {
        out.push_str(&line(r));
        let explanations = [("model", Some(&o.why)), ("agent", o.record.as_ref())];
        for (label, text) in explanations {
            match text {
                Some(t) if !t.is_empty() => {
                    out.push_str(&wrapped(widths[0] + 2, &format!("{label}: "), t, WRAP));
                }
                _ => {}
            }
        }
    }
    out
}

/// `text` after `label` indented by `margin`, wrapped at spaces to lines of at most
/// `width` characters where words allow; continuation lines are aligned under the text.
fn wrapped(margin: usize, label: &str, text: &str, width: usize) -> String {
    let indent = margin + label.chars().count();
    let mut out = format!("{}{label}", " ".repeat(margin));
    let mut col = indent;
    for (i, word) in text.split(' ').enumerate() {
        let len = word.chars().count();
        if i > 0 {
            if col + 1 + len > width {
                out.push('\n');
                out.push_str(&" ".repeat(indent));
                col = indent;
            } else {
                out.push(' ');
                col += 1;
            }
        }
        out.push_str(word);
        col += len;
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use policy_model::conformance::Probe;

    #[test]
    fn dig_statuses_become_verdicts() {
        let ok = ";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n\n;; ANSWER SECTION:\na.example.\t30\tIN\tA\t203.0.113.10\n\n";
        let o = dig_outcome(ok);
        assert!(o.allowed);
        assert_eq!(o.detail, "NOERROR 203.0.113.10");
        assert!(dig_outcome(";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 2\n").allowed);
        let refused = dig_outcome(";; ->>HEADER<<- opcode: QUERY, status: REFUSED, id: 3\n");
        assert!(!refused.allowed);
        assert_eq!(refused.detail, "REFUSED");
        let silent = dig_outcome(";; communications error to 10.0.0.1#53: timed out\n");
        assert!(!silent.allowed);
        assert!(silent.detail.contains("timed out"), "{}", silent.detail);
    }

    #[test]
    fn curl_results_become_verdicts() {
        let o = curl_outcome("GET / from 10.0.0.1\n\n200", "", Some(0), "10.0.0.1");
        assert!(o.allowed);
        assert_eq!(o.detail, "HTTP 200");
        let o = curl_outcome("GET / from 172.18.0.2\n\n200", "", Some(0), "10.0.0.1");
        assert_eq!(o.detail, "HTTP 200 (server saw 172.18.0.2)");
        let o = curl_outcome("Access denied\r\n\n403", "", Some(0), "10.0.0.1");
        assert!(!o.allowed);
        assert_eq!(o.detail, "HTTP 403 Access denied");
        let o = curl_outcome(
            "\n000",
            "curl: (28) Connection timed out",
            Some(28),
            "10.0.0.1",
        );
        assert!(!o.allowed);
        assert!(o.detail.starts_with("timed out"), "{}", o.detail);
        assert_eq!(
            curl_outcome("\n000", "", Some(7), "x").detail,
            "connection refused"
        );
    }

    /// A TLS session the model sends through the proxy and the proxy answered must have its
    /// audit record; one the datapath passes alone, or one that never connected, need not.
    #[test]
    fn a_proxied_tls_session_without_its_audit_record_is_flagged() {
        let tls: Probe = serde_yaml::from_str(
            "{from: a/c, to: 'external:saas', port: 443, expect: allow, tls: {sni: api.saas.example}}",
        )
        .unwrap();
        let plain: Probe =
            serde_yaml::from_str("{from: a/c, to: a/s, port: 80, expect: allow}").unwrap();
        let outcome = |probe: &Probe, detail: &str, proxied: bool, record: Option<&str>| Outcome {
            probe: LabProbe {
                probe: probe.clone(),
                client: Client::Default,
                ipv6: false,
            },
            observed: Observed {
                allowed: true,
                detail: detail.into(),
            },
            passed: true,
            why: String::new(),
            record: record.map(str::to_string),
            proxied,
        };
        let done = "TLS handshake completed";
        assert!(lacks_audit(&outcome(&tls, done, true, None)));
        assert!(!lacks_audit(&outcome(
            &tls,
            done,
            true,
            Some("TLS splice Forwarded")
        )));
        assert!(
            !lacks_audit(&outcome(&tls, done, false, None)),
            "not redirected"
        );
        assert!(!lacks_audit(&outcome(
            &tls,
            "timed out after 2.0 s",
            true,
            None
        )));
        assert!(!lacks_audit(&outcome(&tls, "connect: refused", true, None)));
        assert!(
            !lacks_audit(&outcome(&plain, "echoed", true, None)),
            "not TLS"
        );
    }

    #[test]
    fn default_deny_reasons_are_compacted() {
        assert_eq!(
            compact_reason("default deny: selected by NetworkPolicy x/a, CiliumNetworkPolicy x/b and no rule allows TCP/80 to identity 2 (World)"),
            "default deny (NetworkPolicy x/a +1)"
        );
        assert_eq!(compact_reason("denied by rule"), "denied by rule");
    }

    #[test]
    fn table_rows_are_followed_by_wrapped_explanations() {
        let probe: Probe = serde_yaml::from_str(
            "{from: prod/frontend, to: prod/api, port: 8080, expect: deny, http: {method: GET, path: /admin}}",
        )
        .unwrap();
        let long = "ingress of prod/api: no HTTP rule of CiliumNetworkPolicy prod/api-l7 \
                    spec.ingress[0].toPorts[0].rules matches, and this sentence goes on and on";
        let outcomes = vec![
            Outcome {
                probe: LabProbe {
                    probe: probe.clone(),
                    client: Client::H2c,
                    ipv6: false,
                },
                observed: denied("HTTP 403 Access denied"),
                passed: true,
                why: "prod/api ingress: CiliumNetworkPolicy prod/api-l7".into(),
                record: Some(format!("HTTP Denied 403 {long}")),
                proxied: true,
            },
            Outcome {
                probe: LabProbe {
                    probe,
                    client: Client::Default,
                    ipv6: true,
                },
                observed: Observed {
                    allowed: true,
                    detail: "HTTP 200".into(),
                },
                passed: false,
                why: String::new(),
                record: None,
                proxied: false,
            },
        ];
        let t = table(&outcomes);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("      PROBE"), "{t}");
        assert!(
            lines[0].contains("EXPECTED") && lines[0].contains("OBSERVED"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("ok    prod/frontend -> prod/api"),
            "{t}"
        );
        assert!(lines[1].contains("(h2c)") && lines[1].contains("deny (HTTP 403 Access denied)"));
        assert_eq!(
            lines[2],
            "      model: prod/api ingress: CiliumNetworkPolicy prod/api-l7"
        );
        assert!(
            lines[3].starts_with("      agent: HTTP Denied 403 ingress of prod/api"),
            "{t}"
        );
        assert!(
            lines[4].starts_with("             spec.ingress"),
            "continuation aligned: {t}"
        );
        assert!(t.contains("on and on"), "nothing lost: {t}");
        assert!(lines[5].starts_with("FAIL  prod/frontend"), "{t}");
        assert!(lines[5].contains("/admin (IPv6)"), "{t}");
        assert_eq!(
            lines.len(),
            6,
            "no explanation lines when there is none: {t}"
        );
        for l in &lines[2..5] {
            assert!(l.chars().count() <= WRAP, "{l:?} longer than {WRAP}");
        }
    }
}
