//! `cargo xtask soak [--minutes N] [--report PATH]`: the default lab scenario
//! (`deploy/lab`: two nodes, real agents on the kernel datapath) for N minutes (default 5)
//! under churn, every probe checked again and again, the agents sampled once a second.
//!
//! Churn, written into the agents' source directory as a user's tooling would:
//!
//! - policy: every few seconds the CNP `soak/soak-churn` changes: the port its pods admit
//!   from the cluster moves, and its egress names a label value never used before (a new
//!   selector each time, so a model or a cache that keeps what it no longer needs grows);
//! - pods: every few seconds a pod of the namespace `soak` on `node-1` is added and the
//!   oldest one removed (new identities, endpoints, ipcache entries, peer classes).
//!
//! Neither touches what the scenario's probes exercise, so every `ward-lab check` must
//! pass throughout. Samples: RSS (VmRSS), open descriptors and CPU of each agent. The run
//! fails on a wrong verdict, an agent that exits or panics, or RSS or descriptors that
//! grow from the first part of the run to the last beyond noise. The report goes to
//! `target/soak/REPORT-soak.md` (or `--report PATH`).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_yaml::{Mapping, Value};

use crate::{build_lab, root, Result};

/// Where `ward-lab` keeps its labs.
const LAB_ROOT: &str = "/run/ward-lab";
const POLICY_EVERY: Duration = Duration::from_secs(3);
const PODS_EVERY: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Churn pods alive at once.
const PODS_AT_ONCE: u32 = 3;
/// The node the churn pods run on (the scenario's first).
const CHURN_NODE: &str = "node-1";
/// What RSS may grow from the first fifth of the run to the last: a share and MiB.
const RSS_GROWTH: (f64, f64) = (0.25, 16.0);
/// Descriptors the agents may hold more at the end.
const FD_GROWTH: f64 = 8.0;

struct Opts {
    minutes: f64,
    report: PathBuf,
}

fn opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        minutes: 5.0,
        report: root().join("target/soak/REPORT-soak.md"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => {
                let v = it.next().ok_or("soak: --minutes needs a number")?;
                o.minutes = v
                    .parse::<f64>()
                    .ok()
                    .filter(|m| *m > 0.0)
                    .ok_or_else(|| format!("soak: --minutes {v}: not a positive number"))?;
            }
            "--report" => {
                o.report = PathBuf::from(it.next().ok_or("soak: --report needs a path")?);
            }
            other => {
                return Err(format!(
                    "soak: unknown argument {other} (--minutes N, --report PATH)"
                ))
            }
        }
    }
    Ok(o)
}

/// One sample of one agent.
#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    rss_mib: f64,
    fds: f64,
    cpu_s: f64,
}

struct Agent {
    node: String,
    pid: u32,
    samples: Vec<Sample>,
    gone: bool,
}

/// What the checker saw.
#[derive(Default)]
struct Checks {
    runs: u32,
    failed: u32,
    /// The probe lines of the first failing runs.
    failures: Vec<String>,
}

/// Takes the lab down when dropped.
struct Lab {
    bin: PathBuf,
    id: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["down", "--id", &self.id])
            .status();
    }
}

pub fn run(args: &[String]) -> Result {
    let o = opts(args)?;
    let bin = build_lab("soak")?;
    let up = Command::new(&bin)
        .arg("up")
        .arg(root().join("deploy/lab"))
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot start ward-lab up: {e}"))?;
    let id = String::from_utf8_lossy(&up.stdout).trim().to_string();
    if !up.status.success() || id.is_empty() {
        return Err(format!(
            "ward-lab up failed:\n{}",
            String::from_utf8_lossy(&up.stderr)
        ));
    }
    let lab = Lab { bin, id };
    let run_dir = Path::new(LAB_ROOT).join(&lab.id);
    let mut agents = agents(&run_dir)?;
    let source = run_dir.join("source");
    let base = read_yaml(&source.join("cluster.yaml"))?;
    eprintln!(
        "soak: lab {} up, {} agents; {:.0} minutes of churn",
        lab.id,
        agents.len(),
        o.minutes
    );

    // The checker: every probe, again and again, on its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(Mutex::new(Checks::default()));
    let checker = {
        let (stop, checks, bin, id) = (
            stop.clone(),
            checks.clone(),
            lab.bin.clone(),
            lab.id.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                check_once(&bin, &id, &checks);
            }
        })
    };

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(o.minutes * 60.0);
    let (mut policy_changes, mut pod_changes) = (0u32, 0u32);
    let (mut next_policy, mut next_pods, mut next_sample) = (start, start, start);
    let mut failure = None;
    while Instant::now() < end && failure.is_none() {
        let now = Instant::now();
        if now >= next_policy {
            write_atomic(&source, "soak-policy.yaml", &churn_policy(policy_changes))?;
            policy_changes += 1;
            next_policy += POLICY_EVERY;
        }
        if now >= next_pods {
            let cluster = churn_cluster(&base, pod_changes)?;
            write_atomic(&source, "cluster.yaml", &cluster)?;
            pod_changes += 1;
            next_pods += PODS_EVERY;
        }
        if now >= next_sample {
            for a in &mut agents {
                match sample(a.pid, start) {
                    Some(s) => a.samples.push(s),
                    None => {
                        a.gone = true;
                        failure = Some(format!("the agent of {} (PID {}) exited", a.node, a.pid));
                    }
                }
            }
            next_sample += SAMPLE_EVERY;
        }
        let wake = next_policy.min(next_pods).min(next_sample);
        if let Some(d) = wake.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Back to the scenario as it was: the last check must pass on it too.
    let _ = fs::remove_file(source.join("soak-policy.yaml"));
    write_atomic(&source, "cluster.yaml", &to_yaml(&base)?)?;
    checker
        .join()
        .map_err(|_| "soak: the checker thread panicked")?;
    thread::sleep(Duration::from_secs(2));
    check_once(&lab.bin, &lab.id, &checks);

    let panics = panics(&run_dir);
    let checks = checks.lock().map_err(|_| "soak: checker lock")?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let verdicts = judge(&agents, &checks, &panics, failure);
    let report = report(
        &agents,
        &checks,
        minutes,
        policy_changes,
        pod_changes,
        &verdicts,
    );
    if let Some(dir) = o.report.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::write(&o.report, &report).map_err(|e| format!("{}: {e}", o.report.display()))?;
    eprint!("{report}");
    eprintln!("soak: report written to {}", o.report.display());
    if verdicts.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", verdicts.join("; ")))
    }
}

/// The lab's agents, from its state file.
fn agents(run_dir: &Path) -> Result<Vec<Agent>> {
    let path = run_dir.join("state.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let nodes = state["nodes"].as_array().cloned().unwrap_or_default();
    let agents: Vec<Agent> = nodes
        .iter()
        .filter_map(|n| {
            Some(Agent {
                node: n["name"].as_str()?.to_string(),
                pid: u32::try_from(n["agent_pid"].as_u64()?).ok()?,
                samples: Vec::new(),
                gone: false,
            })
        })
        .collect();
    if agents.is_empty() {
        return Err(format!("{}: no agents", path.display()));
    }
    Ok(agents)
}

/// One `ward-lab check`: every probe of the scenario.
fn check_once(bin: &Path, id: &str, checks: &Mutex<Checks>) {
    let out = Command::new(bin).args(["check", "--id", id]).output();
    let Ok(mut c) = checks.lock() else { return };
    c.runs += 1;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            c.failed += 1;
            if c.failures.len() < 20 {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                c.failures.extend(
                    text.lines()
                        .filter(|l| l.starts_with("FAIL"))
                        .map(str::to_string),
                );
                if !o.stderr.is_empty() {
                    c.failures
                        .push(String::from_utf8_lossy(&o.stderr).trim().to_string());
                }
            }
        }
        Err(e) => {
            c.failed += 1;
            c.failures.push(format!("cannot run ward-lab check: {e}"));
        }
    }
}

/// RSS, open descriptors and CPU time of a process; None once it is gone.
fn sample(pid: u32, start: Instant) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as f64;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command (which may hold spaces): state is field 3; utime 14, stime 15
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(Sample {
        at: start.elapsed().as_secs_f64(),
        rss_mib: rss_kib / 1024.0,
        fds,
        // USER_HZ is 100 on Linux
        cpu_s: ticks / 100.0,
    })
}

fn churn_policy(generation: u32) -> String {
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: soak-churn, namespace: soak}}
spec:
  endpointSelector: {{matchLabels: {{soak: churn}}}}
  ingress:
  - fromEntities: [cluster]
    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]
  egress:
  - toEndpoints: [{{matchLabels: {{soak-gen: \"g{generation}\"}}}}]
    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]
",
        7000 + generation % 50
    )
}

/// The scenario's cluster with the namespace `soak` and its churn pods of step `step`.
fn churn_cluster(base: &Value, step: u32) -> Result<String> {
    let mut doc = base.clone();
    let cluster = doc
        .get_mut("cluster")
        .and_then(Value::as_mapping_mut)
        .ok_or("soak: the lab's cluster.yaml has no cluster mapping")?;
    let mut ns = Mapping::new();
    ns.insert("name".into(), "soak".into());
    let mut labels = Mapping::new();
    labels.insert("purpose".into(), "soak".into());
    ns.insert("labels".into(), Value::Mapping(labels));
    if let Some(Value::Sequence(list)) = cluster.get_mut("namespaces") {
        list.push(Value::Mapping(ns));
    }
    if let Some(Value::Sequence(pods)) = cluster.get_mut("pods") {
        for k in step.saturating_sub(PODS_AT_ONCE - 1)..=step {
            let mut p = Mapping::new();
            p.insert("namespace".into(), "soak".into());
            p.insert("name".into(), format!("churn-{k}").into());
            let mut labels = Mapping::new();
            labels.insert("soak".into(), "churn".into());
            labels.insert("soak-gen".into(), format!("g{k}").into());
            p.insert("labels".into(), Value::Mapping(labels));
            p.insert(
                "ip".into(),
                format!("10.250.{}.{}", (k / 250) % 250, k % 250 + 1).into(),
            );
            p.insert("node".into(), CHURN_NODE.into());
            pods.push(Value::Mapping(p));
        }
    }
    to_yaml(&doc)
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn to_yaml(v: &Value) -> Result<String> {
    serde_yaml::to_string(v).map_err(|e| format!("soak: {e}"))
}

/// Writes `name` in `dir` all at once (a hidden file renamed over it): the agents never
/// read half a file.
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result {
    let tmp = dir.join(format!(".{name}.soak"));
    fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, dir.join(name)).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Lines of the agents' logs that say a thread panicked.
fn panics(run_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(run_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("agent-") && name.ends_with(".log") {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| l.contains("panicked"))
                    .map(|l| format!("{name}: {l}")),
            );
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Least squares slope of `y` over `x`, per hour when `x` is in seconds.
fn slope_per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den * 3600.0
    }
}

/// The first and the last fifth of an agent's samples (after the first one, the start).
fn ends(a: &Agent, f: impl Fn(&Sample) -> f64) -> (f64, f64) {
    let s = a.samples.get(1..).unwrap_or_default();
    let fifth = (s.len() / 5).max(1);
    let first = median(s.iter().take(fifth).map(&f).collect());
    let last = median(s.iter().rev().take(fifth).map(&f).collect());
    (first, last)
}

/// What makes the run fail; empty when it passed.
fn judge(
    agents: &[Agent],
    checks: &Checks,
    panics: &[String],
    failure: Option<String>,
) -> Vec<String> {
    let mut v: Vec<String> = failure.into_iter().collect();
    if checks.failed > 0 {
        v.push(format!(
            "{} of {} checks had a wrong verdict",
            checks.failed, checks.runs
        ));
    }
    if checks.runs < 2 {
        v.push(format!("only {} checks ran", checks.runs));
    }
    if !panics.is_empty() {
        v.push(format!("{} panics in the agents' logs", panics.len()));
    }
    for a in agents.iter().filter(|a| !a.gone) {
        let (r0, r1) = ends(a, |s| s.rss_mib);
        if r1 > r0 * (1.0 + RSS_GROWTH.0) + RSS_GROWTH.1 {
            v.push(format!("{}: RSS grew from {r0:.0} to {r1:.0} MiB", a.node));
        }
        let (f0, f1) = ends(a, |s| s.fds);
        if f1 > f0 + FD_GROWTH {
            v.push(format!(
                "{}: open descriptors grew from {f0:.0} to {f1:.0}",
                a.node
            ));
        }
    }
    v
}

fn report(
    agents: &[Agent],
    checks: &Checks,
    minutes: f64,
    policy_changes: u32,
    pod_changes: u32,
    verdicts: &[String],
) -> String {
    let mut s = String::from("# Soak\n\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask soak`. The default lab scenario (`deploy/lab`) for {minutes:.1} \
         minutes on the release build: the CNP `soak/soak-churn` changed every {} s ({policy_changes} \
         changes, a new egress selector each), a pod of the namespace `soak` on {CHURN_NODE} added \
         and the oldest removed every {} s ({pod_changes} changes, {PODS_AT_ONCE} alive), every \
         probe checked by `ward-lab check` throughout, each agent sampled every {} s.\n",
        POLICY_EVERY.as_secs(),
        PODS_EVERY.as_secs(),
        SAMPLE_EVERY.as_secs()
    );
    let _ = writeln!(
        s,
        "- checks: {} runs, {} with a wrong verdict",
        checks.runs, checks.failed
    );
    for f in checks.failures.iter().take(10) {
        let _ = writeln!(s, "  - {f}");
    }
    s.push_str(
        "\n| agent | samples | RSS MiB first fifth / last fifth | RSS slope MiB/h | open fds first / last | fd slope /h | CPU s | CPU % |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for a in agents {
        let (r0, r1) = ends(a, |x| x.rss_mib);
        let (f0, f1) = ends(a, |x| x.fds);
        let pts = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
            a.samples.iter().skip(1).map(|x| (x.at, f(x))).collect()
        };
        let (cpu, secs) = match (a.samples.first(), a.samples.last()) {
            (Some(x), Some(y)) => (y.cpu_s - x.cpu_s, (y.at - x.at).max(1.0)),
            _ => (0.0, 1.0),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {r0:.1} / {r1:.1} | {:+.1} | {f0:.0} / {f1:.0} | {:+.1} | {cpu:.1} | {:.1} |",
            a.node,
            a.samples.len(),
            slope_per_hour(&pts(|x| x.rss_mib)),
            slope_per_hour(&pts(|x| x.fds)),
            cpu / secs * 100.0
        );
    }
    s.push('\n');
    if verdicts.is_empty() {
        s.push_str("Passed: no wrong verdict, no panic, RSS and descriptors within noise.\n");
    } else {
        let _ = writeln!(s, "FAILED: {}", verdicts.join("; "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_and_ends_read_the_samples() {
        let pts: Vec<(f64, f64)> = (0..60)
            .map(|i| (f64::from(i), 100.0 + f64::from(i) / 60.0))
            .collect();
        // one MiB a minute is 60 an hour
        assert!((slope_per_hour(&pts) - 60.0).abs() < 1e-6);
        let a = Agent {
            node: "n".into(),
            pid: 1,
            samples: (0..11)
                .map(|i| Sample {
                    at: f64::from(i),
                    rss_mib: f64::from(i),
                    fds: 10.0,
                    cpu_s: 0.0,
                })
                .collect(),
            gone: false,
        };
        assert_eq!(ends(&a, |s| s.rss_mib), (2.0, 10.0));
        let checks = Checks {
            runs: 3,
            ..Checks::default()
        };
        // from 2 to 10 MiB: within 25 % + 16 MiB
        assert!(judge(&[a], &checks, &[], None).is_empty());
    }

    #[test]
    fn churn_adds_the_namespace_and_a_window_of_pods() {
        let base: Value = serde_yaml::from_str(
            "cluster:\n  namespaces: [{name: a}]\n  pods: [{namespace: a, name: p, ip: 10.0.0.1}]\n",
        )
        .unwrap_or(Value::Null);
        let text = churn_cluster(&base, 7).unwrap_or_default();
        for want in [
            "name: soak",
            "churn-5",
            "churn-6",
            "churn-7",
            "10.250.0.8",
            "name: p",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(!text.contains("churn-4"), "{text}");
        assert!(churn_policy(3).contains("soak-gen: \"g3\""));
    }
}
