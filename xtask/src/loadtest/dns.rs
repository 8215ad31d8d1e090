//! DNS: dnsperf against one upstream (dnsmasq answering 100 names from `--host-record`)
//! directly, through `ward dns-proxy` (standalone, one worker thread, a DNS rule
//! `*.bench.test` and toFQDNs learning on, audit lines to /dev/null), and through dnsmasq
//! as a forwarder without cache: queries per second, queries per CPU-second of the
//! subject, and latency percentiles at a fixed rate.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use super::parse;
use super::{output, ratio, Ctx, Netns, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::Result;

const UPSTREAM: u16 = 5301;
const FORWARDER: u16 = 5302;
const WARD: u16 = 5303;
/// Ward's Prometheus endpoint (its processing-time histogram).
const WARD_METRICS: u16 = 5304;
/// Ward's histogram of its own time per query (receipt to reply, minus the upstream wait).
const PROCESSING: &str = "ward_dns_processing_seconds";
/// Rate of the latency run (queries per second), well below every target's capacity, so
/// that queries rarely wait behind each other: the figure is one query's path.
const LATENCY_QPS: &str = "1000";

struct Row {
    name: &'static str,
    completed: u64,
    lost: u64,
    qps: f64,
    cpu: Option<f64>,
    p50: f64,
    p90: f64,
    p99: f64,
    /// Ward's own processing time per query in the latency run (p50, p90), microseconds.
    processing: Option<(f64, f64)>,
}

impl Row {
    fn per_cpu(&self) -> f64 {
        match self.cpu {
            Some(c) if c > 0.0 => self.completed as f64 / c,
            _ => f64::NAN,
        }
    }
}

fn dnsmasq(ns: &Netns, work: &Path, cpu: &str, port: u16, extra: &[String]) -> Command {
    let mut c = ns.cmd(cpu, "dnsmasq");
    c.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--user=root",
        "--log-facility=/dev/null",
        "--no-resolv",
    ])
    .arg(format!("--pid-file={}/dnsmasq-{port}.pid", work.display()))
    .arg(format!("--port={port}"))
    .args(extra);
    c
}

fn dnsperf(ns: &Netns, port: u16, queries: &Path) -> Command {
    let mut c = ns.cmd(LOAD_CPU, "dnsperf");
    c.args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries);
    c
}

fn wait_dns(ctx: &mut Ctx, ns: &Netns, port: u16, queries: &Path) -> Result {
    super::wait_until(&format!("DNS answers on port {port}"), || {
        output(ctx, dnsperf(ns, port, queries).args(["-n", "1", "-t", "1"]))
            .ok()
            .and_then(|o| parse::dnsperf(&o))
            .is_some_and(|(done, lost, _)| done == 100 && lost == 0)
    })?;
    // the readiness probes are not part of the measured commands
    ctx.commands.retain(|c| !c.contains(" -n 1 -t 1"));
    Ok(())
}

/// The buckets of Ward's processing-time histogram, scraped from its metrics endpoint.
fn processing_buckets(ctx: &mut Ctx, ns: &Netns) -> Result<Vec<(f64, f64)>> {
    let out = output(
        ctx,
        ns.cmd(LOAD_CPU, "curl")
            .args(["-sf", &format!("http://127.0.0.1:{WARD_METRICS}/metrics")]),
    )?;
    let b = parse::histogram_buckets(&out, PROCESSING);
    if b.is_empty() {
        return Err(format!("no {PROCESSING} in ward's metrics: {out}"));
    }
    Ok(b)
}

fn measure(
    ctx: &mut Ctx,
    ns: &Netns,
    name: &'static str,
    port: u16,
    subject: Option<&Proc>,
    queries: &Path,
) -> Result<Row> {
    let is_ward = port == WARD;
    let (secs, lat_secs, _) = durations(ctx.quick);
    let before = subject.map(Proc::cpu_seconds).transpose()?;
    let out = output(
        ctx,
        dnsperf(ns, port, queries).args(["-l", &secs.to_string(), "-q", "100", "-c", "4"]),
    )?;
    let after = subject.map(Proc::cpu_seconds).transpose()?;
    let (completed, lost, qps) =
        parse::dnsperf(&out).ok_or_else(|| format!("cannot read dnsperf's output: {out}"))?;
    let hist_before = if is_ward {
        Some(processing_buckets(ctx, ns)?)
    } else {
        None
    };
    let out = output(
        ctx,
        dnsperf(ns, port, queries).args([
            "-l",
            &lat_secs.to_string(),
            "-Q",
            LATENCY_QPS,
            "-q",
            "10",
            "-v",
        ]),
    )?;
    let processing = match hist_before {
        Some(before) => {
            let after = processing_buckets(ctx, ns)?;
            let p = |q| parse::histogram_percentile(&before, &after, q).map(|s| s * 1e6);
            p(50.0).zip(p(90.0))
        }
        None => None,
    };
    let mut lat = parse::dnsperf_latencies(&out);
    let pct = |v: &mut Vec<f64>, p| parse::percentile(v, p).unwrap_or(f64::NAN);
    Ok(Row {
        name,
        completed,
        lost,
        qps,
        cpu: before.zip(after).map(|(b, a)| a - b),
        p50: pct(&mut lat, 50.0),
        p90: pct(&mut lat, 90.0),
        p99: pct(&mut lat, 99.0),
        processing,
    })
}

pub fn run(ctx: &mut Ctx) -> Result<String> {
    let ns = Netns::new("dns")?;
    let work = ctx.work.clone();
    let queries = ctx.work.join("queries");
    let mut records = Vec::new();
    let mut qtext = String::new();
    for i in 1..=100 {
        records.push(format!("--host-record=h{i}.bench.test,192.0.2.{i}"));
        let _ = writeln!(qtext, "h{i}.bench.test A");
    }
    std::fs::write(&queries, qtext).map_err(|e| format!("{}: {e}", queries.display()))?;
    records.push("--cache-size=1000".into());
    let log = |n: &str| ctx.work.join(format!("{n}.log"));
    let (up_log, fwd_log, ward_log) = (log("upstream"), log("forwarder"), log("ward-dns"));
    let mut upstream = Proc::spawn(
        ctx,
        "dnsmasq upstream",
        &mut dnsmasq(&ns, &work, LOAD_CPU, UPSTREAM, &records),
        &up_log,
    )?;
    let fwd_args = [
        "--cache-size=0".to_string(),
        format!("--server=127.0.0.1#{UPSTREAM}"),
    ];
    let mut forwarder = Proc::spawn(
        ctx,
        "dnsmasq forwarder",
        &mut dnsmasq(&ns, &work, SUBJECT_CPU, FORWARDER, &fwd_args),
        &fwd_log,
    )?;
    let cluster = ctx.work.join("dns-cluster.yaml");
    let policy = ctx.work.join("dns-policy.yaml");
    let write =
        |p: &Path, t: String| std::fs::write(p, t).map_err(|e| format!("{}: {e}", p.display()));
    write(
        &cluster,
        "namespaces: [{name: bench}]\npods: [{namespace: bench, name: client, labels: {app: client}, ip: 10.0.9.10}]\n".into(),
    )?;
    write(
        &policy,
        format!(
            "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-dns, namespace: bench}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [127.0.0.1/32]
    toPorts:
    - ports: [{{port: \"{UPSTREAM}\", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: \"*.bench.test\"}}]
  - toFQDNs: [{{matchPattern: \"*.bench.test\"}}]
"
        ),
    )?;
    let mut ward_cmd = ns.cmd(SUBJECT_CPU, &ctx.ward.display().to_string());
    ward_cmd
        .args(["dns-proxy", "--listen", &format!("127.0.0.1:{WARD}")])
        .args(["--upstream", &format!("127.0.0.1:{UPSTREAM}")])
        .arg("--cluster")
        .arg(&cluster)
        .arg("--policies")
        .arg(&policy)
        .args(["--endpoint", "bench/client", "--threads", "1"])
        .args(["--audit-log", "/dev/null"])
        .args(["--metrics", &format!("127.0.0.1:{WARD_METRICS}")]);
    let mut ward = Proc::spawn(ctx, "ward dns-proxy", &mut ward_cmd, &ward_log)?;
    for (port, p, l) in [
        (UPSTREAM, &mut upstream, &up_log),
        (FORWARDER, &mut forwarder, &fwd_log),
        (WARD, &mut ward, &ward_log),
    ] {
        wait_dns(ctx, &ns, port, &queries).or_else(|e| {
            p.alive(l)?;
            Err(e)
        })?;
    }
    eprintln!("loadtest dns: direct, ward, dnsmasq");
    let rounds = durations(ctx.quick).2;
    let mut all = Vec::new();
    for _ in 0..rounds {
        all.push(measure(ctx, &ns, "direct", UPSTREAM, None, &queries)?);
        all.push(measure(ctx, &ns, "ward", WARD, Some(&ward), &queries)?);
        all.push(measure(
            ctx,
            &ns,
            "dnsmasq",
            FORWARDER,
            Some(&forwarder),
            &queries,
        )?);
    }
    Ok(report(&all, ctx.quick))
}

/// (throughput seconds, latency seconds, rounds)
fn durations(quick: bool) -> (u64, u64, u32) {
    if quick {
        (2, 1, 1)
    } else {
        (5, 5, 3)
    }
}

/// The figure a round is ranked by: queries per subject CPU-second, or qps for direct.
fn key(r: &Row) -> f64 {
    if r.cpu.is_some() {
        r.per_cpu()
    } else {
        r.qps
    }
}

/// Per target, the round with the median key, and every round's key.
fn median<'a>(all: &'a [Row], name: &str) -> Option<(&'a Row, Vec<f64>)> {
    let mut rs: Vec<&Row> = all.iter().filter(|r| r.name == name).collect();
    let keys = rs.iter().map(|r| key(r)).collect();
    rs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    rs.get(rs.len().saturating_sub(1) / 2).map(|r| (*r, keys))
}

/// The median of some figures (the lower middle one of an even count); NaN when empty.
fn mid(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

/// A figure of `name` in every round, in round order.
fn per_round(all: &[Row], name: &str, f: impl Fn(&Row) -> f64) -> Vec<f64> {
    all.iter().filter(|r| r.name == name).map(f).collect()
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|k| format!("{k:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The latency `name` adds over direct, per round (both measured in the same round).
fn added(all: &[Row], name: &str) -> Vec<f64> {
    per_round(all, name, |r| r.p50)
        .iter()
        .zip(per_round(all, "direct", |r| r.p50))
        .map(|(t, d)| t - d)
        .collect()
}

fn report(all: &[Row], quick: bool) -> String {
    let (secs, lat_secs, rounds) = durations(quick);
    let picked: Vec<(&Row, Vec<f64>)> = ["direct", "ward", "dnsmasq"]
        .iter()
        .filter_map(|n| median(all, n))
        .collect();
    let mut s = String::from("## DNS proxy\n\n");
    let _ = writeln!(
        s,
        "Upstream: dnsmasq (CPU {LOAD_CPU}) answering 100 names from `--host-record`. \
         Subjects on CPU {SUBJECT_CPU}: `ward dns-proxy` (standalone, `--threads 1`, DNS \
         rule `*.bench.test`, toFQDNs learning on, audit to /dev/null) and dnsmasq as a \
         forwarder with `--cache-size=0`. dnsperf on CPU {LOAD_CPU}: throughput with 100 \
         outstanding queries for {secs} s; latency from a second run at {LATENCY_QPS} \
         queries/s for {lat_secs} s (`-v`, every NOERROR answer), the same for every \
         target. {rounds} round(s), targets in turn. Throughput columns: per target the \
         round with the median queries per CPU-second (direct: median qps), that figure \
         for every round. Latency columns: the median over rounds of each round's \
         percentile. Ward's processing time: its own time per query (from the query's \
         receipt to the reply's send, minus the wait for the upstream; histogram \
         `{PROCESSING}` scraped before and after the latency run), median over rounds.\n"
    );
    s.push_str("| target | completed | lost | qps | subject CPU s | queries per CPU-s | p50 | p90 | p99 | every round (q/CPU-s or qps) | p50 every round |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (r, keys) in &picked {
        let lat = |f: fn(&Row) -> f64| mid(per_round(all, r.name, f));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {:.0} us | {:.0} us | {:.0} us | {} | {} |",
            r.name,
            r.completed,
            r.lost,
            r.qps,
            r.cpu
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            if r.cpu.is_some() {
                format!("{:.0}", r.per_cpu())
            } else {
                "-".into()
            },
            lat(|r| r.p50),
            lat(|r| r.p90),
            lat(|r| r.p99),
            list(keys),
            list(&per_round(all, r.name, |r| r.p50)),
        );
    }
    let proc50 = per_round(all, "ward", |r| r.processing.map_or(f64::NAN, |p| p.0));
    let proc90 = per_round(all, "ward", |r| r.processing.map_or(f64::NAN, |p| p.1));
    let _ = writeln!(
        s,
        "\nWard's processing time per query (latency run): p50 {:.1} us, p90 {:.1} us \
         (every round p50: {}).",
        mid(proc50.clone()),
        mid(proc90),
        proc50
            .iter()
            .map(|k| format!("{k:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let [_, (w, _), (m, _)] = picked.as_slice() else {
        return s;
    };
    let d = picked[0].0;
    let (aw, am) = (added(all, "ward"), added(all, "dnsmasq"));
    let _ = writeln!(
        s,
        "\nRatios (same run): ward/dnsmasq queries per CPU-second {}; qps ward/direct {}, \
         dnsmasq/direct {}, ward/dnsmasq {}. Median latency added over direct (median over \
         rounds of each round's p50 minus direct's): ward {:.0} us, dnsmasq {:.0} us \
         (every round: ward {}; dnsmasq {}).\n",
        ratio(w.per_cpu(), m.per_cpu()),
        ratio(w.qps, d.qps),
        ratio(m.qps, d.qps),
        ratio(w.qps, m.qps),
        mid(aw.clone()),
        mid(am.clone()),
        list(&aw),
        list(&am),
    );
    s
}
