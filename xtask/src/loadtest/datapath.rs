//! Datapath: iperf3 throughput and a TCP_RR rate between two pod namespaces through a
//! node namespace, with no program, with Ward's TC programs and an allow policy, with
//! 1,000 more policy entries, and redirected through a transparent relay. The lab and the measurements live in
//! `redirect-bpf/examples/datapath_load.rs` (it needs the loader); this reads its
//! `RESULT` lines and writes the ratios.

use std::fmt::Write as _;
use std::process::Command;

use super::parse::percentile;
use super::{output, ratio, Ctx};

const SCENARIOS: [&str; 4] = ["none", "allow", "allow+1k", "redirect"];
use crate::{build_ebpf, cargo, root, run as run_cmd, Result};

struct Row {
    name: String,
    mbps: f64,
    rr: f64,
}

/// Reads `RESULT <scenario> <Mbit/s> <transactions/s>` lines.
fn rows(out: &str) -> Vec<Row> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["RESULT", name, mbps, rr] => Some(Row {
                    name: name.to_string(),
                    mbps: mbps.parse().ok()?,
                    rr: rr.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

pub fn run(ctx: &mut Ctx) -> Result<String> {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    build_ebpf()?;
    run_cmd(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "redirect-bpf",
        "--example",
        "datapath_load",
    ]))?;
    eprintln!("loadtest datapath: none, allow, allow+1k, redirect");
    let exe = root().join("target/release/examples/datapath_load");
    let out = output(
        ctx,
        Command::new(&exe).args([secs.to_string(), rounds.to_string()]),
    )?;
    let all = rows(&out);
    // the median of the rounds, per scenario and measure
    let rows: Vec<Row> = SCENARIOS
        .iter()
        .filter_map(|name| {
            let of = |f: fn(&Row) -> f64| {
                let mut v: Vec<f64> = all.iter().filter(|r| r.name == *name).map(f).collect();
                percentile(&mut v, 50.0)
            };
            Some(Row {
                name: name.to_string(),
                mbps: of(|r| r.mbps)?,
                rr: of(|r| r.rr)?,
            })
        })
        .collect();
    let base = rows
        .iter()
        .find(|r| r.name == "none")
        .ok_or_else(|| format!("no `none` result from datapath_load: {out}"))?;
    let mut s = String::from("## Datapath\n\n");
    let _ = writeln!(
        s,
        "Two pod namespaces (10.77.1.2, 10.77.2.2) behind veths into a node namespace that \
         routes between them. Scenarios in one run: `none` (no program), `allow` (Ward's TC \
         programs on both pod veths, both endpoints default-deny both ways, allow entries \
         for the test ports: every packet goes through policy and conntrack), `allow+1k` \
         (1,000 more policy entries), `redirect` (pod1's egress to the test ports \
         redirected by `sk_assign` to a transparent listener in the node namespace, a plain \
         relay of two copying threads per connection whose upstream sockets carry the \
         egress proxy's mark: the datapath's L7 path with no L7 work), repeated in turn for {rounds} round(s) (programs \
         detached and attached again between rounds); the table shows each measure's \
         median over the rounds, every round is listed below it. iperf3: one TCP stream for \
         {secs} s, client on CPU 0, server on CPU 1. TCP_RR: one connection, 1 byte each way, {secs} s, client \
         thread on CPU 0, server thread on CPU 1 (netperf is in Debian non-free; the \
         example measures TCP_RR itself).\n"
    );
    s.push_str("| scenario | iperf3 Mbit/s | ratio | TCP_RR trans/s | ratio | us per transaction | added us |\n|---|---|---|---|---|---|---|\n");
    for r in &rows {
        let us = if r.rr > 0.0 { 1e6 / r.rr } else { f64::NAN };
        let base_us = if base.rr > 0.0 {
            1e6 / base.rr
        } else {
            f64::NAN
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {:.0} | {} | {:.1} | {:.2} |",
            r.name,
            r.mbps,
            ratio(r.mbps, base.mbps),
            r.rr,
            ratio(r.rr, base.rr),
            us,
            us - base_us
        );
    }
    s.push_str("\nEvery round (scenario: Mbit/s, trans/s): ");
    let each: Vec<String> = all
        .iter()
        .map(|r| format!("{} {:.0}, {:.0}", r.name, r.mbps, r.rr))
        .collect();
    s.push_str(&each.join("; "));
    s.push_str("\n\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn result_lines() {
        let r = super::rows(
            "noise\nRESULT none 25000 40000\nRESULT allow+1k 24000 39000\nRESULT x y\n",
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].name, "allow+1k");
        assert_eq!(r[1].mbps, 24000.0);
        assert_eq!(r[1].rr, 39000.0);
    }
}
