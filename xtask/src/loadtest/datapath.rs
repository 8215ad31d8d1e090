//! Datapath: what Ward's TC programs cost, two ways. `BPF_PROG_TEST_RUN` times the loaded
//! programs on request and response packets with the maps of the `allow` and `allow+1k`
//! scenarios (robust against the shared machine's noise), and, with how often each
//! program runs per TCP_RR transaction, gives the time they add per transaction. Then
//! wall clock: iperf3 throughput and a TCP_RR rate between two pod namespaces through a
//! node namespace, with no program, with the programs and an allow policy, with 1,000
//! more policy entries, and redirected through a transparent relay, in many short rounds
//! whose order rotates; each round's ratios are to its own `none`. The lab and the
//! measurements live in `redirect-bpf/examples/datapath_load.rs` (it needs the loader);
//! this reads its `PROG`, `HOOKS` and `RESULT` lines and writes the tables.

use std::fmt::Write as _;
use std::process::Command;

use super::parse::percentile;
use super::{output, Ctx};

use crate::{build_ebpf, cargo, root, run as run_cmd, Result};

/// The scenarios of `datapath_load`, in the report's order.
const SCENARIOS: [&str; 4] = ["none", "allow", "allow+1k", "redirect"];

/// `RESULT <round> <scenario> <Mbit/s> <transactions/s>`.
struct Row {
    round: u32,
    name: String,
    mbps: f64,
    rr: f64,
}

/// `PROG <scenario> <case> <median ns> <least ns>`.
struct Prog {
    scenario: String,
    case: String,
    median: f64,
    least: f64,
}

/// `HOOKS <round> <scenario> <ward_from_pod runs> <ward_to_pod runs>` per transaction.
struct Hooks {
    from_pod: f64,
    to_pod: f64,
}

struct Lines {
    rows: Vec<Row>,
    progs: Vec<Prog>,
    hooks: Vec<Hooks>,
}

fn parse(out: &str) -> Lines {
    let mut l = Lines {
        rows: Vec::new(),
        progs: Vec::new(),
        hooks: Vec::new(),
    };
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["RESULT", round, name, mbps, rr] => {
                if let (Ok(round), Ok(mbps), Ok(rr)) = (round.parse(), mbps.parse(), rr.parse()) {
                    l.rows.push(Row {
                        round,
                        name: name.to_string(),
                        mbps,
                        rr,
                    });
                }
            }
            ["PROG", scenario, case, median, least] => {
                if let (Ok(median), Ok(least)) = (median.parse(), least.parse()) {
                    l.progs.push(Prog {
                        scenario: scenario.to_string(),
                        case: case.to_string(),
                        median,
                        least,
                    });
                }
            }
            ["HOOKS", _, _, from_pod, to_pod] => {
                if let (Ok(from_pod), Ok(to_pod)) = (from_pod.parse(), to_pod.parse()) {
                    l.hooks.push(Hooks { from_pod, to_pod });
                }
            }
            _ => {}
        }
    }
    l
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    percentile(&mut v, 50.0)
}

/// The time the programs add per TCP_RR transaction, in us: the runs of each program per
/// transaction times its mean cost over the request and the response (`pick` chooses the
/// median or the least of the test runs).
fn added_us(progs: &[Prog], scenario: &str, hooks: &Hooks, pick: fn(&Prog) -> f64) -> Option<f64> {
    let ns = |case: &str| {
        progs
            .iter()
            .find(|p| p.scenario == scenario && p.case == case)
            .map(pick)
    };
    let from = (ns("request_from_pod")? + ns("response_from_pod")?) / 2.0;
    let to = (ns("request_to_pod")? + ns("response_to_pod")?) / 2.0;
    Some((hooks.from_pod * from + hooks.to_pod * to) / 1000.0)
}

pub fn run(ctx: &mut Ctx) -> Result<String> {
    let (secs, rounds) = if ctx.quick { (1, 2) } else { (2, 8) };
    build_ebpf()?;
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "redirect-bpf",
        "--example",
        "datapath_load",
    ]))?;
    eprintln!(
        "loadtest datapath: test runs, then {rounds} rounds of none, allow, allow+1k, redirect"
    );
    let exe = root().join("target/release/examples/datapath_load");
    let out = output(
        ctx,
        Command::new(&exe).args([secs.to_string(), rounds.to_string()]),
    )?;
    let l = parse(&out);
    if !l.rows.iter().any(|r| r.name == "none") {
        return Err(format!("no `none` result from datapath_load: {out}"));
    }
    let hooks = Hooks {
        from_pod: median(l.hooks.iter().map(|h| h.from_pod).collect()).unwrap_or(f64::NAN),
        to_pod: median(l.hooks.iter().map(|h| h.to_pod).collect()).unwrap_or(f64::NAN),
    };

    let mut s = String::from("## Datapath\n\n");
    let _ = writeln!(
        s,
        "Two pod namespaces (10.77.1.2, 10.77.2.2) behind veths into a node namespace that \
         routes between them; both endpoints default-deny both ways with allow entries for \
         the test ports, so every packet goes through policy and conntrack.\n\n\
         ### What the programs cost per packet (BPF_PROG_TEST_RUN)\n\n\
         The loaded programs run by `BPF_PROG_TEST_RUN` in the node namespace on \
         Ethernet/IPv4/TCP frames of the TCP_RR case (1 byte of payload): the request \
         pod1:40000 -> pod2:7000 and its response, after a SYN through `ward_from_pod` \
         opened the flow (both are conntrack hits: the request on its own key, the response \
         on the reverse key); the maps as in `allow` and in `allow+1k`. Each cell: the \
         kernel's mean ns per run over 200,000 runs, median of 5 such calls (least in \
         brackets); the kernel stops its clock while the thread is rescheduled. `new flow`: \
         a SYN from a new port (policy lookups of both endpoints, conntrack created), one \
         run each, median of 2,000. `empty program` (`r0 = 0; exit`) is the floor of the \
         test run itself.\n"
    );
    s.push_str("| maps | empty program | request, ward_from_pod | request, ward_to_pod | response, ward_from_pod | response, ward_to_pod | new flow, ward_from_pod | added us per transaction |\n|---|---|---|---|---|---|---|---|\n");
    for scenario in ["allow", "allow+1k"] {
        let cell = |case: &str| {
            l.progs
                .iter()
                .find(|p| p.scenario == scenario && p.case == case)
                .map_or("-".to_string(), |p| {
                    format!("{:.0} ({:.0})", p.median, p.least)
                })
        };
        let added = |pick: fn(&Prog) -> f64| {
            added_us(&l.progs, scenario, &hooks, pick).map_or("-".into(), |v| format!("{v:.2}"))
        };
        let _ = writeln!(
            s,
            "| {scenario} | {} | {} | {} | {} | {} | {} | {} ({}) |",
            cell("empty_program"),
            cell("request_from_pod"),
            cell("request_to_pod"),
            cell("response_from_pod"),
            cell("response_to_pod"),
            cell("new_flow_from_pod"),
            added(|p| p.median),
            added(|p| p.least),
        );
    }
    let _ = writeln!(
        s,
        "\nRuns per TCP_RR transaction, counted from the host-side veths' packet counters \
         during the TCP_RR measurements (rx = tc ingress = `ward_from_pod`, tx = tc egress = \
         `ward_to_pod`, both veths; median over the rounds): `ward_from_pod` {:.2}, \
         `ward_to_pod` {:.2}. Added us per transaction = runs x the program's mean over \
         request and response, summed over both programs; it leaves out the hook's own \
         dispatch (tcx), which the wall-clock rows below include.\n",
        hooks.from_pod, hooks.to_pod
    );

    let _ = writeln!(
        s,
        "### Wall clock\n\n\
         Scenarios: `none` (no program), `allow` (the programs on both pod veths), \
         `allow+1k` (1,000 more policy entries), `redirect` (pod1's egress to the test ports \
         redirected by `sk_assign` to a transparent listener in the node namespace, a plain \
         relay of two copying threads per connection whose upstream sockets carry the \
         egress proxy's mark: the datapath's L7 path with no L7 work). {rounds} rounds of \
         {secs} s per measure, the order of the scenarios rotated each round (programs \
         attached and the entries written before each scenario, removed after). iperf3: one \
         TCP stream, client on CPU 0, server on CPU 1. TCP_RR: one connection, 1 byte each \
         way, client thread on CPU 0, server thread on CPU 1 (netperf is in Debian non-free; \
         the example measures TCP_RR itself). Each measure's median over the rounds, and \
         the median over the rounds of the ratio to the same round's `none` (the ratio \
         that the machine's drift between rounds does not move).\n"
    );
    s.push_str("| scenario | iperf3 Mbit/s | median of round ratios | TCP_RR trans/s | median of round ratios | us per transaction | added us (median of rounds) |\n|---|---|---|---|---|---|---|\n");
    for name in SCENARIOS {
        let mine: Vec<&Row> = l.rows.iter().filter(|r| r.name == name).collect();
        let base = |round: u32| l.rows.iter().find(|r| r.round == round && r.name == "none");
        let Some(mbps) = median(mine.iter().map(|r| r.mbps).collect()) else {
            continue;
        };
        let rr = median(mine.iter().map(|r| r.rr).collect()).unwrap_or(f64::NAN);
        let round_ratio = |f: fn(&Row) -> f64| {
            median(
                mine.iter()
                    .filter_map(|r| Some(f(r) / f(base(r.round)?)))
                    .filter(|v| v.is_finite())
                    .collect(),
            )
            .map_or("-".to_string(), |v| format!("{v:.2}"))
        };
        let added = median(
            mine.iter()
                .filter_map(|r| Some(1e6 / r.rr - 1e6 / base(r.round)?.rr))
                .filter(|v| v.is_finite())
                .collect(),
        );
        let _ = writeln!(
            s,
            "| {name} | {mbps:.0} | {} | {rr:.0} | {} | {:.1} | {} |",
            round_ratio(|r| r.mbps),
            round_ratio(|r| r.rr),
            1e6 / rr,
            added.map_or("-".to_string(), |v| format!("{v:.2}")),
        );
    }
    s.push_str("\nEvery round (round scenario: Mbit/s, trans/s): ");
    let each: Vec<String> = l
        .rows
        .iter()
        .map(|r| format!("{} {} {:.0}, {:.0}", r.round, r.name, r.mbps, r.rr))
        .collect();
    s.push_str(&each.join("; "));
    s.push_str("\n\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let l = parse(
            "noise\nRESULT 0 none 25000 40000\nRESULT 1 allow+1k 24000 39000\nRESULT x y\n\
             PROG allow request_from_pod 120 100\nHOOKS 0 allow 2.01 1.99\n",
        );
        assert_eq!(l.rows.len(), 2);
        assert_eq!(l.rows[1].round, 1);
        assert_eq!(l.rows[1].name, "allow+1k");
        assert_eq!(l.rows[1].mbps, 24000.0);
        assert_eq!(l.rows[1].rr, 39000.0);
        assert_eq!(l.progs[0].case, "request_from_pod");
        assert_eq!((l.progs[0].median, l.progs[0].least), (120.0, 100.0));
        assert_eq!(l.hooks[0].from_pod, 2.01);
    }

    #[test]
    fn added_per_transaction() {
        let progs: Vec<Prog> = [
            ("request_from_pod", 100.0),
            ("response_from_pod", 300.0),
            ("request_to_pod", 50.0),
            ("response_to_pod", 150.0),
        ]
        .iter()
        .map(|(case, ns)| Prog {
            scenario: "allow".into(),
            case: case.to_string(),
            median: *ns,
            least: *ns / 2.0,
        })
        .collect();
        let hooks = Hooks {
            from_pod: 2.0,
            to_pod: 2.0,
        };
        // 2 x 200 + 2 x 100 ns
        let us = added_us(&progs, "allow", &hooks, |p| p.median).unwrap();
        assert!((us - 0.6).abs() < 1e-9);
        assert!(added_us(&progs, "allow+1k", &hooks, |p| p.median).is_none());
    }
}
