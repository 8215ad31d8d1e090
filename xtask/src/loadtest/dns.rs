//! DNS: dnsperf against one upstream (dnsmasq answering 100 names from `--host-record`)
//! directly, through `ward dns-proxy` (standalone, one worker thread, a DNS rule
//! `*.bench.test` and toFQDNs learning on, audit lines to /dev/null), and through dnsmasq
//! as a forwarder without cache: queries per second, queries per CPU-second of the
//! subject, and latency percentiles at a fixed rate. Two more targets explain the
//! latency: Ward with busy polling (its CPU does not sleep between a query and its answer,
//! nor for 2 ms after), and a relay that only passes datagrams, blocking and busy-polling
//! (the floors: what the extra hop costs on this machine, sleeping and not).
//!
//! The added latency comes twice: from the rounds (each round's median minus direct's in
//! the same round), and from paired runs (a 1-second direct run, then 1 second through
//! the target, repeated), which take the machine's drift between rounds out.
//!
//! Two placements. `split` (the main one): the upstream on the load's CPU, the subjects on
//! the other. There direct never crosses CPUs and every proxied query crosses four times,
//! each crossing waking an idle vCPU. `shared`: the upstream on the subjects' CPU, so that
//! direct and proxied queries cross twice alike and what is added is the subject's own
//! work; latency only.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use super::parse;
use super::{output, ratio, Ctx, Netns, Proc, LOAD_CPU, SUBJECT_CPU};
use crate::Result;

/// Ward's histogram of its own time per query (receipt to reply, minus the upstream wait).
const PROCESSING: &str = "ward_dns_processing_seconds";
/// Ward's busy-polling window in the `ward busy-poll` target, microseconds: longer than
/// the latency run's gap between queries, so its CPU does not sleep during that run.
const BUSY_POLL_US: &str = "2000";
/// The TTL of the upstream's answers, seconds: an ordinary one (a TTL of 0 would have an
/// FQDN proxy hand every answer over again before releasing it, see `run`).
const UPSTREAM_TTL: u32 = 30;
/// The targets of a placement, in the order they run in each round.
const TARGETS: [&str; 6] = [
    "direct",
    "ward",
    "ward busy-poll",
    "dnsmasq",
    "relay",
    "relay busy-poll",
];
/// With `--ward-base PATH`: that binary, without and with busy polling, after the others.
const BASE_TARGETS: [&str; 2] = ["ward base", "ward base busy-poll"];

/// The targets of this run, in the order they run in each round.
fn targets(base: bool) -> Vec<&'static str> {
    let mut t = TARGETS.to_vec();
    if base {
        t.extend(BASE_TARGETS);
    }
    t
}

/// The Ward targets (their processing time is reported).
fn wards(base: bool) -> Vec<&'static str> {
    targets(base)
        .into_iter()
        .filter(|n| n.starts_with("ward"))
        .collect()
}

/// Where the upstream runs, and the ports of one placement's processes.
struct Placement {
    name: &'static str,
    upstream_cpu: &'static str,
    /// Ports from here on: upstream, dnsmasq forwarder, ward, ward's metrics, ward
    /// busy-poll, its metrics, relay, relay busy-poll; with `--ward-base`, ward base and
    /// its metrics, ward base busy-poll and its metrics.
    base: u16,
    /// Throughput runs too (else latency only).
    throughput: bool,
}

const PLACEMENTS: [Placement; 2] = [
    Placement {
        name: "split",
        upstream_cpu: LOAD_CPU,
        base: 5301,
        throughput: true,
    },
    Placement {
        name: "shared",
        upstream_cpu: SUBJECT_CPU,
        base: 5321,
        throughput: false,
    },
];

/// One running target: its port, its process (for direct: the upstream) and Ward's
/// metrics port.
struct Target {
    name: &'static str,
    port: u16,
    proc: Proc,
    /// Whether `proc` is the subject whose CPU time counts (not for direct).
    subject: bool,
    metrics: Option<u16>,
}

/// Rate of the latency run (queries per second), well below every target's capacity, so
/// that queries rarely wait behind each other: the figure is one query's path.
const LATENCY_QPS: &str = "1000";

/// Paired latency runs: per target and placement this many pairs of a 1-second direct run
/// and, right after it, a 1-second run through the target. The machine's drift between
/// rounds (tens of microseconds on this shared VM) moves both runs of a pair alike, so
/// the median of the pairs' differences is the added latency with the drift taken out.
const PAIRS: u32 = 9;

struct Row {
    placement: &'static str,
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
fn processing_buckets(ctx: &mut Ctx, ns: &Netns, port: u16) -> Result<Vec<(f64, f64)>> {
    let out = output(
        ctx,
        ns.cmd(LOAD_CPU, "curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]),
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
    placement: &Placement,
    t: &Target,
    queries: &Path,
) -> Result<Row> {
    let (secs, lat_secs, _) = durations(ctx.quick);
    let (mut completed, mut lost, mut qps, mut cpu) = (0, 0, f64::NAN, None);
    if placement.throughput {
        let subject = t.subject.then_some(&t.proc);
        let before = subject.map(Proc::cpu_seconds).transpose()?;
        let out = output(
            ctx,
            dnsperf(ns, t.port, queries).args(["-l", &secs.to_string(), "-q", "100", "-c", "4"]),
        )?;
        let after = subject.map(Proc::cpu_seconds).transpose()?;
        (completed, lost, qps) =
            parse::dnsperf(&out).ok_or_else(|| format!("cannot read dnsperf's output: {out}"))?;
        cpu = before.zip(after).map(|(b, a)| a - b);
    }
    let hist_before = match t.metrics {
        Some(m) => Some(processing_buckets(ctx, ns, m)?),
        None => None,
    };
    let mut lat = latencies(ctx, ns, t.port, queries, lat_secs)?;
    let processing = match (hist_before, t.metrics) {
        (Some(before), Some(m)) => {
            let after = processing_buckets(ctx, ns, m)?;
            let p = |q| parse::histogram_percentile(&before, &after, q).map(|s| s * 1e6);
            p(50.0).zip(p(90.0))
        }
        _ => None,
    };
    let pct = |v: &mut Vec<f64>, p| parse::percentile(v, p).unwrap_or(f64::NAN);
    Ok(Row {
        placement: placement.name,
        name: t.name,
        completed,
        lost,
        qps,
        cpu,
        p50: pct(&mut lat, 50.0),
        p90: pct(&mut lat, 90.0),
        p99: pct(&mut lat, 99.0),
        processing,
    })
}

/// Starts a placement's upstream and subjects and waits until each answers.
fn start(
    ctx: &mut Ctx,
    ns: &Netns,
    p: &Placement,
    records: &[String],
    queries: &Path,
) -> Result<Vec<Target>> {
    let work = ctx.work.clone();
    let b = p.base;
    let (up, fwd, ward, ward_m, busy, busy_m, relay, relay_busy) =
        (b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7);
    let log = |n: &str| work.join(format!("{}-{n}.log", p.name));
    let upstream = Proc::spawn(
        ctx,
        "dnsmasq upstream",
        &mut dnsmasq(ns, &work, p.upstream_cpu, up, records),
        &log("upstream"),
    )?;
    let fwd_args = [
        "--cache-size=0".to_string(),
        format!("--server=127.0.0.1#{up}"),
    ];
    let forwarder = Proc::spawn(
        ctx,
        "dnsmasq forwarder",
        &mut dnsmasq(ns, &work, SUBJECT_CPU, fwd, &fwd_args),
        &log("forwarder"),
    )?;
    let cluster = work.join("dns-cluster.yaml");
    let policy = work.join(format!("dns-policy-{up}.yaml"));
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
    - ports: [{{port: \"{up}\", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: \"*.bench.test\"}}]
  - toFQDNs: [{{matchPattern: \"*.bench.test\"}}]
"
        ),
    )?;
    let ward_bin = ctx.ward.display().to_string();
    let ward_cmd = |bin: &str, port: u16, metrics: u16, extra: &[&str]| {
        let mut c = ns.cmd(SUBJECT_CPU, bin);
        c.args(["dns-proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{up}")])
            .arg("--cluster")
            .arg(&cluster)
            .arg("--policies")
            .arg(&policy)
            .args(["--endpoint", "bench/client", "--threads", "1"])
            .args(["--audit-log", "/dev/null"])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(extra);
        c
    };
    let w = Proc::spawn(
        ctx,
        "ward dns-proxy",
        &mut ward_cmd(&ward_bin, ward, ward_m, &[]),
        &log("ward"),
    )?;
    let wb = Proc::spawn(
        ctx,
        "ward dns-proxy --busy-poll-us",
        &mut ward_cmd(&ward_bin, busy, busy_m, &["--busy-poll-us", BUSY_POLL_US]),
        &log("ward-busy-poll"),
    )?;
    let xtask = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let relay_cmd = |port: u16, extra: &[&str]| {
        let mut c = ns.cmd(SUBJECT_CPU, &xtask.display().to_string());
        c.args([
            "udp-relay",
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{up}"),
        ])
        .args(extra);
        c
    };
    let r = Proc::spawn(ctx, "udp relay", &mut relay_cmd(relay, &[]), &log("relay"))?;
    let rb = Proc::spawn(
        ctx,
        "udp relay --busy-poll-us",
        &mut relay_cmd(relay_busy, &["--busy-poll-us", BUSY_POLL_US]),
        &log("relay-busy-poll"),
    )?;
    let mut procs = vec![
        (upstream, up, "upstream", None),
        (w, ward, "ward", Some(ward_m)),
        (wb, busy, "ward-busy-poll", Some(busy_m)),
        (forwarder, fwd, "forwarder", None),
        (r, relay, "relay", None),
        (rb, relay_busy, "relay-busy-poll", None),
    ];
    if let Some(base) = ctx.ward_base.clone() {
        let base = base.display().to_string();
        let (bw, bw_m, bb, bb_m) = (b + 8, b + 9, b + 10, b + 11);
        let w = Proc::spawn(
            ctx,
            "ward base dns-proxy",
            &mut ward_cmd(&base, bw, bw_m, &[]),
            &log("ward-base"),
        )?;
        let wb = Proc::spawn(
            ctx,
            "ward base dns-proxy --busy-poll-us",
            &mut ward_cmd(&base, bb, bb_m, &["--busy-poll-us", BUSY_POLL_US]),
            &log("ward-base-busy-poll"),
        )?;
        procs.push((w, bw, "ward-base", Some(bw_m)));
        procs.push((wb, bb, "ward-base-busy-poll", Some(bb_m)));
    }
    let mut targets = Vec::new();
    for (name, (mut proc, port, log_name, metrics)) in targets_of(ctx).into_iter().zip(procs) {
        wait_dns(ctx, ns, port, queries).or_else(|e| {
            proc.alive(&log(log_name))?;
            Err(e)
        })?;
        targets.push(Target {
            name,
            port,
            proc,
            subject: name != "direct",
            metrics,
        });
    }
    Ok(targets)
}

pub fn run(ctx: &mut Ctx) -> Result<String> {
    let ns = Netns::new("dns")?;
    let queries = ctx.work.join("queries");
    let mut records = Vec::new();
    let mut qtext = String::new();
    for i in 1..=100 {
        records.push(format!("--host-record=h{i}.bench.test,192.0.2.{i}"));
        let _ = writeln!(qtext, "h{i}.bench.test A");
    }
    std::fs::write(&queries, qtext).map_err(|e| format!("{}: {e}", queries.display()))?;
    records.push("--cache-size=1000".into());
    // Answers with a TTL, as real ones carry: dnsmasq gives its own records a TTL of 0 by
    // default, which would make every IP an FQDN proxy learns expire at once, so that it
    // hands each answer over again before releasing it.
    records.push(format!("--local-ttl={UPSTREAM_TTL}"));
    let mut running = Vec::new();
    for p in &PLACEMENTS {
        running.push(start(ctx, &ns, p, &records, &queries)?);
    }
    eprintln!(
        "loadtest dns: {} in placements split, shared",
        targets_of(ctx).join(", ")
    );
    let rounds = durations(ctx.quick).2;
    let mut all = Vec::new();
    for _ in 0..rounds {
        for (p, targets) in PLACEMENTS.iter().zip(&running) {
            for t in targets {
                all.push(measure(ctx, &ns, p, t, &queries)?);
            }
        }
    }
    eprintln!("loadtest dns: paired latency runs, direct then each target");
    let pairs = if ctx.quick { 1 } else { PAIRS };
    let mut pair_diffs = Vec::new();
    for (p, targets) in PLACEMENTS.iter().zip(&running) {
        pair_diffs.push((p.name, paired(ctx, &ns, targets, &queries, pairs)?));
    }
    Ok(report(
        &all,
        &pair_diffs,
        ctx.quick,
        ctx.ward_base.as_deref(),
    ))
}

fn targets_of(ctx: &Ctx) -> Vec<&'static str> {
    targets(ctx.ward_base.is_some())
}

/// One latency run of `secs` seconds at [`LATENCY_QPS`]: the answers' latencies (us).
fn latencies(ctx: &mut Ctx, ns: &Netns, port: u16, queries: &Path, secs: u64) -> Result<Vec<f64>> {
    let out = output(
        ctx,
        dnsperf(ns, port, queries).args([
            "-l",
            &secs.to_string(),
            "-Q",
            LATENCY_QPS,
            "-q",
            "10",
            "-v",
        ]),
    )?;
    Ok(parse::dnsperf_latencies(&out))
}

/// Per target but direct, the differences of the pairs' median latencies (target minus
/// the direct run just before it), pair by pair (see [`PAIRS`]).
fn paired(
    ctx: &mut Ctx,
    ns: &Netns,
    targets: &[Target],
    queries: &Path,
    pairs: u32,
) -> Result<Vec<(&'static str, Vec<f64>)>> {
    let Some((direct, others)) = targets.split_first() else {
        return Ok(Vec::new());
    };
    let mut diffs: Vec<(&'static str, Vec<f64>)> =
        others.iter().map(|t| (t.name, Vec::new())).collect();
    let p50 = |mut v: Vec<f64>| parse::percentile(&mut v, 50.0);
    for _ in 0..pairs {
        for (t, (_, d)) in others.iter().zip(&mut diffs) {
            let base = p50(latencies(ctx, ns, direct.port, queries, 1)?);
            let through = p50(latencies(ctx, ns, t.port, queries, 1)?);
            if let (Some(b), Some(x)) = (base, through) {
                d.push(x - b);
            }
        }
    }
    Ok(diffs)
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

/// Per target of the split placement, the round with the median key, and every round's key.
fn median<'a>(all: &'a [Row], name: &str) -> Option<(&'a Row, Vec<f64>)> {
    let mut rs: Vec<&Row> = all
        .iter()
        .filter(|r| r.placement == "split" && r.name == name)
        .collect();
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

/// A figure of `name` in `placement` in every round, in round order.
fn per_round(all: &[Row], placement: &str, name: &str, f: impl Fn(&Row) -> f64) -> Vec<f64> {
    all.iter()
        .filter(|r| r.placement == placement && r.name == name)
        .map(f)
        .collect()
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|k| format!("{k:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per round, `name`'s median latency minus direct's, in `placement`.
fn added(all: &[Row], placement: &str, name: &str) -> Vec<f64> {
    per_round(all, placement, name, |r| r.p50)
        .iter()
        .zip(per_round(all, placement, "direct", |r| r.p50))
        .map(|(t, d)| t - d)
        .collect()
}

/// One placement's paired runs: per target, the pairs' differences (us).
type Paired = (&'static str, Vec<(&'static str, Vec<f64>)>);

fn report(all: &[Row], pairs: &[Paired], quick: bool, base: Option<&Path>) -> String {
    let (secs, lat_secs, rounds) = durations(quick);
    let names = targets(base.is_some());
    let picked: Vec<(&Row, Vec<f64>)> = names.iter().filter_map(|n| median(all, n)).collect();
    let mut s = String::from("## DNS proxy\n\n");
    let _ = writeln!(
        s,
        "Upstream: dnsmasq answering 100 names from `--host-record`, TTL {UPSTREAM_TTL} s \
         (`--local-ttl`). Subjects on CPU \
         {SUBJECT_CPU}: `ward dns-proxy` (standalone, `--threads 1`, DNS rule `*.bench.test`, \
         toFQDNs learning on, audit to /dev/null); the same with `--busy-poll-us {BUSY_POLL_US}` \
         (`ward busy-poll`: after each query its thread polls instead of sleeping for 2 ms, longer \
         than the latency run's gap between queries); dnsmasq as a forwarder with \
         `--cache-size=0`; `relay`, the floor: `cargo xtask udp-relay`, a blocking relay that only \
         passes each datagram on and the answer back, one at a time (what the extra hop and its \
         wake-ups cost on this machine, with no work of its own); `relay busy-poll`, the floor of \
         `ward busy-poll`: the same relay with `--busy-poll-us {BUSY_POLL_US}` (it spins on \
         non-blocking reads while a query is out and for 2 ms after each datagram). dnsperf on CPU \
         {LOAD_CPU}: throughput with 100 outstanding queries for {secs} s; latency from a second \
         run at {LATENCY_QPS} queries/s for {lat_secs} s (`-v`, every NOERROR answer), the same \
         for every target. {rounds} round(s), targets in turn. Throughput columns: per target the \
         round with the median queries per CPU-second (direct: median qps), that figure for every \
         round. Latency columns: the median over rounds of each round's percentile. Ward's \
         processing time: its own time per query (from the query's receipt to the reply's send, \
         minus the wait for the upstream; histogram `{PROCESSING}` scraped before and after the \
         latency run), median over rounds.\n\n\
         Two placements of the upstream. **split**: upstream on CPU {LOAD_CPU} with \
         dnsperf. A direct query never leaves CPU {LOAD_CPU}; a proxied one crosses \
         between the CPUs four times, and each crossing wakes a halted vCPU (an \
         inter-processor interrupt through the hypervisor). **shared**: upstream on CPU \
         {SUBJECT_CPU} with the subjects (latency only). Direct and proxied queries both \
         cross twice; what a subject adds is its own work and two same-CPU switches.\n"
    );
    if let Some(base) = base {
        let _ = writeln!(
            s,
            "`ward base` and `ward base busy-poll`: the same two with another build, `{}` \
             (`--ward-base`), measured in the same rounds, after the others.\n",
            base.display()
        );
    }
    s.push_str("### split: throughput and latency\n\n| target | completed | lost | qps | subject CPU s | queries per CPU-s | p50 | p90 | p99 | every round (q/CPU-s or qps) | p50 every round |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (r, keys) in &picked {
        let lat = |f: fn(&Row) -> f64| mid(per_round(all, "split", r.name, f));
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
            list(&per_round(all, "split", r.name, |r| r.p50)),
        );
    }
    s.push_str("\n### shared: latency\n\n| target | p50 | p90 | p99 | p50 every round | added p50 over direct |\n|---|---|---|---|---|---|\n");
    for &name in &names {
        let lat = |f: fn(&Row) -> f64| mid(per_round(all, "shared", name, f));
        let _ = writeln!(
            s,
            "| {name} | {:.0} us | {:.0} us | {:.0} us | {} | {} |",
            lat(|r| r.p50),
            lat(|r| r.p90),
            lat(|r| r.p99),
            list(&per_round(all, "shared", name, |r| r.p50)),
            if name == "direct" {
                "-".to_string()
            } else {
                format!("{:.0} us", mid(added(all, "shared", name)))
            },
        );
    }
    s.push('\n');
    for placement in ["split", "shared"] {
        for name in wards(base.is_some()) {
            let proc50 = per_round(all, placement, name, |r| {
                r.processing.map_or(f64::NAN, |p| p.0)
            });
            let proc90 = per_round(all, placement, name, |r| {
                r.processing.map_or(f64::NAN, |p| p.1)
            });
            let _ = writeln!(
                s,
                "{placement}, {name}: processing time per query (latency run) p50 {:.1} us, \
                 p90 {:.1} us (every round p50: {}).",
                mid(proc50.clone()),
                mid(proc90),
                proc50
                    .iter()
                    .map(|k| format!("{k:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let row = |n: &str| picked.iter().find(|(r, _)| r.name == n).map(|(r, _)| *r);
    let (Some(d), Some(w), Some(b), Some(m)) = (
        row("direct"),
        row("ward"),
        row("ward busy-poll"),
        row("dnsmasq"),
    ) else {
        s.push_str(&paired_text(pairs));
        return s;
    };
    let added_in = |placement: &str| {
        names[1..]
            .iter()
            .map(|n| {
                let a = added(all, placement, n);
                format!("{n} {:.0} us ({})", mid(a.clone()), list(&a))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let _ = writeln!(
        s,
        "\nRatios (same run, split): queries per CPU-second ward/dnsmasq {}, ward \
         busy-poll/dnsmasq {}; qps ward/direct {}, dnsmasq/direct {}, ward/dnsmasq {}.\n\n\
         Median latency added over direct (median over rounds of each round's p50 minus \
         direct's; every round in brackets). split: {}. shared: {}.\n",
        ratio(w.per_cpu(), m.per_cpu()),
        ratio(b.per_cpu(), m.per_cpu()),
        ratio(w.qps, d.qps),
        ratio(m.qps, d.qps),
        ratio(w.qps, m.qps),
        added_in("split"),
        added_in("shared"),
    );
    if let (Some(bw), Some(bb)) = (row("ward base"), row("ward base busy-poll")) {
        let _ = writeln!(
            s,
            "Ratios to the base build (same run, split): queries per CPU-second ward \
             base/dnsmasq {}, ward base busy-poll/dnsmasq {}; ward/ward base {}, ward \
             busy-poll/ward base busy-poll {}.\n",
            ratio(bw.per_cpu(), m.per_cpu()),
            ratio(bb.per_cpu(), m.per_cpu()),
            ratio(w.per_cpu(), bw.per_cpu()),
            ratio(b.per_cpu(), bb.per_cpu()),
        );
    }
    s.push_str(&paired_text(pairs));
    s
}

/// The paired latency paragraph (see [`PAIRS`]).
fn paired_text(pairs: &[Paired]) -> String {
    let mut s = String::new();
    let n = pairs
        .first()
        .and_then(|(_, t)| t.first())
        .map_or(0, |(_, d)| d.len());
    let _ = write!(
        s,
        "Median latency added over direct, paired ({n} pair(s) per target: a 1 s direct run \
         at {LATENCY_QPS} queries/s, then right after it 1 s through the target; the median \
         of the pairs' differences of p50, the middle half of them in brackets; drift between \
         rounds moves both runs of a pair alike)."
    );
    for (placement, targets) in pairs {
        let figures: Vec<String> = targets
            .iter()
            .map(|(name, d)| {
                let mut d = d.clone();
                let mut q = |p| parse::percentile(&mut d, p).unwrap_or(f64::NAN);
                let (lo, mid, hi) = (q(25.0), q(50.0), q(75.0));
                format!("{name} {mid:.0} us ({lo:.0} to {hi:.0})")
            })
            .collect();
        let _ = write!(s, " {placement}: {}.", figures.join("; "));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_figures_are_median_and_middle_half_of_the_differences() {
        let pairs: Vec<Paired> = vec![
            (
                "split",
                vec![
                    ("ward", vec![70.0, 40.0, 45.0, 50.0, 42.0, 48.0, 44.0, 90.0]),
                    ("relay", vec![20.0]),
                ],
            ),
            ("shared", vec![("ward", vec![-3.0, 5.0, 1.0])]),
        ];
        let text = report(&[], &pairs, false, None);
        assert!(
            text.contains("paired (8 pair(s) per target"),
            "pair count: {text}"
        );
        // sorted: 40 42 44 45 48 50 70 90 -> nearest-rank p25 42, p50 45, p75 50
        assert!(
            text.contains("split: ward 45 us (42 to 50); relay 20 us (20 to 20)."),
            "{text}"
        );
        assert!(text.contains("shared: ward 1 us (-3 to 5)."), "{text}");
    }

    #[test]
    fn a_base_ward_gets_its_rows_and_ratios() {
        let row = |placement, name, completed, cpu: Option<f64>, p50| Row {
            placement,
            name,
            completed,
            lost: 0,
            qps: completed as f64 / 5.0,
            cpu,
            p50,
            p90: p50,
            p99: p50,
            processing: name.starts_with("ward").then_some((2.0, 3.0)),
        };
        let mut all = Vec::new();
        for (name, completed, cpu, p50) in [
            ("direct", 1000, None, 20.0),
            ("ward", 600, Some(5.0), 60.0),
            ("ward busy-poll", 600, Some(5.0), 50.0),
            ("dnsmasq", 400, Some(5.0), 70.0),
            ("relay", 100, Some(1.0), 55.0),
            ("relay busy-poll", 200, Some(5.0), 45.0),
            ("ward base", 300, Some(5.0), 90.0),
            ("ward base busy-poll", 300, Some(5.0), 80.0),
        ] {
            all.push(row("split", name, completed, cpu, p50));
            all.push(row("shared", name, 0, None, p50));
        }
        let text = report(&all, &[], false, Some(Path::new("/tmp/ward-main")));
        assert!(text.contains("`/tmp/ward-main`"), "{text}");
        assert!(text.contains("| ward base busy-poll | 300 |"), "{text}");
        assert!(
            text.contains(
                "ward base/dnsmasq 0.75, ward base busy-poll/dnsmasq 0.75; ward/ward base 2.00, \
                 ward busy-poll/ward base busy-poll 2.00."
            ),
            "{text}"
        );
        assert!(text.contains("ward base busy-poll 60 us (60)"), "{text}");
        assert!(text.contains("split, ward base: processing time"), "{text}");
        // Without a base: no such rows.
        let plain: Vec<Row> = all
            .into_iter()
            .filter(|r| !r.name.starts_with("ward base"))
            .collect();
        assert!(!report(&plain, &[], false, None).contains("ward base"));
    }
}
