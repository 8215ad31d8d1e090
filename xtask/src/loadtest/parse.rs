//! Reading the tools' outputs: /proc/PID/stat and status, wrk, h2load, dnsperf, and the
//! numbers of the agent's JSON status.

/// utime + stime (fields 14 and 15 of /proc/PID/stat), in clock ticks. The command name
/// (field 2) may hold spaces, so fields are counted after its closing parenthesis.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, index 11
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A memory line of /proc/PID/status (`VmRSS:   12345 kB`), in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<f64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The first number under `"key":` in a JSON text (the agent's status is flat enough for
/// that: every key it is asked for is unique).
pub fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What a load generator reports for one run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Load {
    pub requests: u64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Failed requests, errors, and answers other than the expected status.
    pub errors: u64,
}

/// `1.23ms`, `456.00us`, `1.01s` -> microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let (num, unit) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * unit)
}

/// `wrk --latency` output.
pub fn wrk(out: &str) -> Option<Load> {
    let mut l = Load::default();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            [n, "requests", "in", ..] => l.requests = n.parse().ok()?,
            ["Requests/sec:", v] => l.per_second = v.parse().ok()?,
            ["50%", v] => l.p50_us = duration_us(v)?,
            ["99%", v] => l.p99_us = duration_us(v)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => l.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                l.errors += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    (l.requests > 0).then_some(l)
}

/// The line the load tests' wrk script prints when wrk is done: `LATENCY_US p50 p99
/// p99.9` (microseconds, from wrk's own histogram; `--latency` stops at the 99th).
pub fn wrk_script_latency(out: &str) -> Option<(f64, f64, f64)> {
    out.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["LATENCY_US", a, b, c] => Some((a.parse().ok()?, b.parse().ok()?, c.parse().ok()?)),
            _ => None,
        }
    })
}

/// h2load's summary (`finished in`, `requests:`, `status codes:`) and the durations of
/// its `--log-file` (one request a line: start, status, duration in microseconds).
pub fn h2load(out: &str, log: &str) -> Option<Load> {
    let mut l = Load::default();
    let mut ok2xx = 0;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["finished", "in", _, rps, "req/s,", ..] => l.per_second = rps.parse().ok()?,
            ["requests:", ..] => {
                let n = |name: &str| {
                    w.windows(2)
                        .find(|p| p[1].trim_end_matches(',') == name)
                        .and_then(|p| p[0].parse::<u64>().ok())
                };
                l.requests = n("done")?;
                l.errors += n("failed")? + n("errored")? + n("timeout")?;
            }
            ["status", "codes:", n, "2xx,", ..] => ok2xx = n.parse().ok()?,
            _ => {}
        }
    }
    l.errors += l.requests.saturating_sub(ok2xx);
    let mut lat: Vec<f64> = log
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    (l.p50_us, l.p99_us) = (percentile(&mut lat, 50.0)?, percentile(&mut lat, 99.0)?);
    (l.requests > 0).then_some(l)
}

/// The `p`th percentile (nearest rank) of `v`.
pub fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// dnsperf's summary: (queries completed, queries lost, queries per second).
pub fn dnsperf(out: &str) -> Option<(u64, u64, f64)> {
    let mut r = (None, 0, None);
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Queries", "completed:", n, ..] => r.0 = n.parse().ok(),
            ["Queries", "lost:", n, ..] => r.1 = n.parse().ok()?,
            ["Queries", "per", "second:", q] => r.2 = q.parse().ok(),
            _ => {}
        }
    }
    Some((r.0?, r.1, r.2?))
}

/// Latencies (microseconds) of the NOERROR answers in `dnsperf -v` output.
pub fn dnsperf_latencies(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with("> NOERROR"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect()
}

/// The cumulative buckets `(upper bound, count)` of Prometheus histogram `name` in a text
/// exposition, in the exposition's order (ascending `le`, `+Inf` last).
pub fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.split_whitespace().last()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The `p`th percentile of the observations between two scrapes of one histogram
/// (`before`, `after` from [`histogram_buckets`]), interpolated linearly inside the bucket
/// that holds it (the first bucket starts at 0). None without observations, or when the
/// percentile falls in the `+Inf` bucket.
pub fn histogram_percentile(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let b = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = p / 100.0 * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, n) in delta {
        if n >= rank {
            if le.is_infinite() {
                return None;
            }
            let inside = n - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lo + (le - lo) * frac);
        }
        (lo, below) = (le, n);
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_fields_after_a_command_name_with_spaces() {
        let stat = "4242 (tokio rt) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 3 0 100";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn the_wrk_scripts_percentiles() {
        let out = "Requests/sec:  15005.37\nTransfer/sec:      2.09MB\nLATENCY_US 612 2890 9850\n";
        assert_eq!(wrk_script_latency(out), Some((612.0, 2890.0, 9850.0)));
        assert_eq!(wrk_script_latency("LATENCY_US 1 2\n"), None);
        assert_eq!(wrk_script_latency("Requests/sec: 1\n"), None);
    }

    #[test]
    fn wrk_summary() {
        let out = "Running 2s test @ http://127.0.0.1:9001/api/v1/svc49/items
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  310.00us   9.00ms   90.00%
  Latency Distribution
     50%    2.05ms
     75%    2.20ms
     90%    2.40ms
     99%    3.10ms
  61234 requests in 2.00s, 9.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  30617.00
Transfer/sec:      4.50MB
";
        let l = wrk(out).unwrap();
        assert_eq!(l.requests, 61234);
        assert_eq!(l.per_second, 30617.0);
        assert!((l.p50_us - 2050.0).abs() < 1e-6);
        assert!((l.p99_us - 3100.0).abs() < 1e-6);
        assert_eq!(l.errors, 7);
        assert!(wrk("garbage").is_none());
    }

    #[test]
    fn h2load_summary_and_log() {
        let out = "finished in 2.00s, 25000.50 req/s, 1.20MB/s
requests: 50001 total, 50065 started, 50001 done, 50000 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 50000 2xx, 0 3xx, 0 4xx, 0 5xx
";
        let log = "1.0\t200\t100\n1.1\t200\t300\n1.2\t200\t200\n1.3\t200\t5000\n";
        let l = h2load(out, log).unwrap();
        assert_eq!(l.requests, 50001);
        assert_eq!(l.per_second, 25000.5);
        assert_eq!(l.errors, 2);
        assert_eq!(l.p50_us, 200.0);
        assert_eq!(l.p99_us, 5000.0);
    }

    #[test]
    fn dnsperf_summary_and_latencies() {
        let out = "  Queries sent:         1000
  Queries completed:    998 (99.80%)
  Queries lost:         2 (0.20%)
  Queries per second:   4990.123
";
        assert_eq!(dnsperf(out), Some((998, 2, 4990.123)));
        let v = "> NOERROR h1.bench.test A 0.000123\n> NOERROR h2.bench.test A 0.000200\n> SERVFAIL x A 1.0\n";
        let lat: Vec<f64> = dnsperf_latencies(v).iter().map(|x| x.round()).collect();
        assert_eq!(lat, vec![123.0, 200.0]);
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).rev().collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn histogram_median_between_scrapes() {
        let text = |a: u32, b: u32, c: u32| {
            format!(
                "# TYPE ward_dns_processing_seconds histogram\n\
                 ward_dns_processing_seconds_bucket{{le=\"0.00001\"}} {a}\n\
                 ward_dns_processing_seconds_bucket{{le=\"0.00002\"}} {b}\n\
                 ward_dns_processing_seconds_bucket{{le=\"+Inf\"}} {c}\n\
                 ward_dns_processing_seconds_sum 0.1\n\
                 ward_dns_processing_seconds_count {c}\n\
                 ward_dns_upstream_seconds_bucket{{transport=\"udp\",le=\"0.00001\"}} 99\n"
            )
        };
        let before = histogram_buckets(&text(5, 5, 5), "ward_dns_processing_seconds");
        assert_eq!(before.len(), 3);
        // 10 new observations: 2 under 10 us, 8 in (10, 20] us
        let after = histogram_buckets(&text(7, 15, 15), "ward_dns_processing_seconds");
        let p50 = histogram_percentile(&before, &after, 50.0).unwrap();
        // rank 5: the 3rd of 8 in (10, 20] -> 10 + 10 * 3/8
        assert!((p50 - 0.000_013_75).abs() < 1e-12, "{p50}");
        assert_eq!(histogram_percentile(&after, &after, 50.0), None);
        let tail = histogram_buckets(&text(0, 0, 4), "ward_dns_processing_seconds");
        assert_eq!(histogram_percentile(&[], &tail, 50.0), None);
    }

    #[test]
    fn reads_proc_status_and_the_agents_status() {
        let status = "Name:\tward\nVmHWM:\t  204800 kB\nVmRSS:\t   102400 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(102_400.0));
        assert_eq!(status_kib(status, "VmHWM"), Some(204_800.0));
        assert_eq!(status_kib(status, "VmSwap"), None);
        let json = r#"{"node":"node-1","ready":true,"policy_generation":7,"last_push_ms":12.5,"endpoints":400,"map_entries":{"ipcache":20080,"endpoints":400,"policy":131540}}"#;
        assert_eq!(json_number(json, "policy_generation"), Some(7.0));
        assert_eq!(json_number(json, "last_push_ms"), Some(12.5));
        assert_eq!(json_number(json, "endpoints"), Some(400.0));
        assert_eq!(json_number(json, "policy"), Some(131_540.0));
        assert_eq!(json_number(json, "missing"), None);
    }
}
