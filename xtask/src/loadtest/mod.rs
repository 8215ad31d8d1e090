//! `cargo xtask loadtest [proxy|datapath|dns|all] [--quick]`: Ward's proxies and datapath
//! against their peers, each in network namespaces this harness creates (names carry the
//! PID; deleted afterwards, also on error), with one report, `loadtests/REPORT.md`
//! (a run of some parts: `loadtests/REPORT-PART.md`; `--quick`: short runs for a smoke
//! test, reported to `target/loadtest/REPORT-quick.md` so that the measured figures stay;
//! [`report_path`]). `cargo xtask loadtest scale [--pods N,N] [--ward-base PATH]` measures
//! the agent against cluster size ([`scale`]); `all` does not include it.
//!
//! Pinning: the subject (a proxy, or the receiving pod) runs on CPU 1, load generators
//! and backends on CPU 0. On a 2-core machine shared with other work the absolute figures
//! move from run to run; the ratios between subjects measured in the same run are what
//! the report is for.

mod agent;
mod datapath;
mod dns;
mod e2e;
mod fqdn;
pub mod fqdn_dns;
mod parse;
mod proxy;
pub mod relay;
mod scale;
mod tls;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{cargo, ensure_debs, root, run, Result};

/// Debian packages the load tests drive (netperf is in non-free: TCP_RR is measured by
/// the datapath example itself).
pub const LOADTEST_PACKAGES: &[&str] = &[
    "haproxy",
    "nginx-light",
    "wrk",
    "nghttp2-client",
    "iperf3",
    "dnsperf",
    "dnsmasq-base",
    "curl",
    "openssl",
    "gnuplot-nox",
    "iproute2",
    "iptables",
    "dnsutils",
    "util-linux",
];

/// CPU of the measured subject and CPU of the load generators and backends.
pub const SUBJECT_CPU: &str = "1";
pub const LOAD_CPU: &str = "0";

/// Options of one run.
pub struct Opts {
    pub quick: bool,
    pub proxy: bool,
    pub datapath: bool,
    pub dns: bool,
    /// HTTPS interception and SNI splice (not part of `all`).
    pub tls: bool,
    /// Another `ward` binary measured beside the one built (`--ward-base PATH`): the DNS
    /// part runs it as `ward base` and `ward base busy-poll`, so that a change and the
    /// build before it are compared in one run.
    pub ward_base: Option<PathBuf>,
    /// The scale part and its options (not part of `all`).
    pub scale: Option<scale::ScaleOpts>,
    /// `--ward PATH`: a `ward` built beforehand, measured instead of building the `dist`
    /// profile (alone, it names the scale part).
    pub ward: Option<PathBuf>,
    /// The proxy part's sweep (`--rules`, `--conns`, `--proto`, `--size`, `--full`; any
    /// of them names the proxy part).
    pub sweep: proxy::SweepOpts,
    /// The FQDN part and its options (not part of `all`).
    pub fqdn: Option<fqdn::FqdnOpts>,
    /// The end-to-end part on a two-node lab and its options (not part of `all`; with it,
    /// `--rules` and `--conns` are its own).
    pub e2e: Option<e2e::E2eOpts>,
}

impl Opts {
    pub fn parse(args: &[String]) -> Result<Opts> {
        let mut o = Opts {
            quick: false,
            proxy: false,
            datapath: false,
            dns: false,
            tls: false,
            ward_base: None,
            scale: None,
            ward: None,
            sweep: proxy::SweepOpts::default(),
            fqdn: None,
            e2e: None,
        };
        // whether `proxy` was named, or only implied by a sweep option
        let mut proxy_named = false;
        let mut args = args.iter();
        while let Some(a) = args.next() {
            let value = proxy::SweepOpts::takes_value(a)
                .then(|| args.next())
                .flatten();
            if o.sweep.parse_flag(a, value)? {
                o.proxy = true;
                continue;
            }
            match a.as_str() {
                "--quick" => o.quick = true,
                "--ward-base" => {
                    let path = args
                        .next()
                        .ok_or("loadtest: --ward-base needs the path of a ward binary")?;
                    o.ward_base = Some(PathBuf::from(path));
                }
                "scale" => o.scale = Some(o.scale.take().unwrap_or_default()),
                "--pods" => {
                    let list = args.next().ok_or("--pods needs a list (2000,20000)")?;
                    let pods = list
                        .split(',')
                        .map(|n| n.trim().parse::<usize>())
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| format!("--pods {list}: {e}"))?;
                    o.scale.get_or_insert_with(Default::default).pods = pods;
                }
                "--ward" => {
                    let path = args.next().ok_or("--ward needs a path to a ward binary")?;
                    o.ward = Some(PathBuf::from(path));
                }
                "fqdn" => o.fqdn = Some(o.fqdn.take().unwrap_or_default()),
                "--secs" => {
                    let n = args.next().ok_or("--secs needs a number of seconds")?;
                    o.fqdn.get_or_insert_with(Default::default).secs =
                        n.parse().map_err(|e| format!("--secs {n}: {e}"))?;
                }
                "--rss-limit-mib" => {
                    let n = args.next().ok_or("--rss-limit-mib needs a number of MiB")?;
                    o.fqdn.get_or_insert_with(Default::default).rss_limit_mib =
                        n.parse().map_err(|e| format!("--rss-limit-mib {n}: {e}"))?;
                }
                "--clients" => {
                    let n = args.next().ok_or("--clients needs a number of endpoints")?;
                    o.fqdn.get_or_insert_with(Default::default).clients =
                        n.parse().map_err(|e| format!("--clients {n}: {e}"))?;
                }
                "proxy" => (o.proxy, proxy_named) = (true, true),
                "e2e" => o.e2e = Some(o.e2e.take().unwrap_or_default()),
                "datapath" => o.datapath = true,
                "dns" => o.dns = true,
                "tls" => o.tls = true,
                "all" => (o.proxy, proxy_named, o.datapath, o.dns) = (true, true, true, true),
                other => {
                    return Err(format!(
                        "loadtest: unknown argument {other:?} (see `cargo xtask` for the parts \
                         and their options)"
                    ))
                }
            }
        }
        // With `e2e` and no `proxy`, the sweep's `--rules` and `--conns` are the e2e part's.
        if let Some(e) = &mut o.e2e {
            if !proxy_named {
                let s = std::mem::take(&mut o.sweep);
                if s.protos.is_some() || s.sizes.is_some() || s.full {
                    return Err(
                        "loadtest e2e: takes --rules and --conns (HTTP/1.1, small body only)"
                            .into(),
                    );
                }
                (e.rules, e.conns) = (s.rules, s.conns);
                o.proxy = false;
            }
        }
        // `--ward` alone names the scale part (with `fqdn`, it is the FQDN part's)
        if o.ward.is_some()
            && o.fqdn.is_none()
            && o.e2e.is_none()
            && !(o.proxy || o.datapath || o.dns || o.tls)
        {
            o.scale.get_or_insert_with(Default::default);
        }
        if !(o.proxy
            || o.datapath
            || o.dns
            || o.tls
            || o.scale.is_some()
            || o.fqdn.is_some()
            || o.e2e.is_some())
        {
            (o.proxy, o.datapath, o.dns) = (true, true, true);
        }
        // One base build for every part that compares with one (dns, scale, fqdn).
        if let Some(scale) = &mut o.scale {
            scale.ward_base = o.ward_base.clone();
            scale.ward = o.ward.clone();
        }
        if let Some(fqdn) = &mut o.fqdn {
            fqdn.ward_base = o.ward_base.clone();
            fqdn.ward = o.ward.clone();
        }
        Ok(o)
    }
}

/// Where a run's report goes, from the repository's root: `loadtests/REPORT.md` for a run
/// of every part, `loadtests/REPORT-PART.md` for a run of some (`REPORT-dns.md`,
/// `REPORT-proxy-dns.md`), so that a partial run does not replace the full run's report
/// and each report holds one run; `--quick` runs to `target/loadtest/REPORT-quick.md`,
/// so that the measured figures stay.
pub fn report_path(opts: &Opts) -> PathBuf {
    if opts.quick {
        return PathBuf::from("target/loadtest/REPORT-quick.md");
    }
    let parts: Vec<&str> = [
        (opts.proxy, "proxy"),
        (opts.datapath, "datapath"),
        (opts.dns, "dns"),
        (opts.tls, "tls"),
        (opts.scale.is_some(), "scale"),
        (opts.fqdn.is_some(), "fqdn"),
        (opts.e2e.is_some(), "e2e"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    if parts == ["proxy", "datapath", "dns"] {
        PathBuf::from("loadtests/REPORT.md")
    } else {
        PathBuf::from(format!("loadtests/REPORT-{}.md", parts.join("-")))
    }
}

/// What every scenario needs: the release `ward`, a scratch folder, the command log.
pub struct Ctx {
    pub ward: PathBuf,
    /// `--ward-base`: a second `ward` measured beside `ward` (DNS part).
    pub ward_base: Option<PathBuf>,
    pub work: PathBuf,
    pub quick: bool,
    /// Commands as the report shows them (paths relative to the checkout, scratch files
    /// under `$WORK`), each once.
    pub commands: Vec<String>,
}

impl Ctx {
    pub fn log(&mut self, cmd: &Command) {
        let mut s = cmd.get_program().to_string_lossy().into_owned();
        for a in cmd.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        let s = s
            .replace(&self.work.display().to_string(), "$WORK")
            .replace(&format!("{}/", root().display()), "");
        // each distinct command once, in the order first run
        if !self.commands.contains(&s) {
            self.commands.push(s);
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A network namespace of this run with loopback up; deleted on drop.
pub struct Netns(testkit::Netns);

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        testkit::Netns::new(testkit::unique(&format!("ward-lt-{tag}")))
            .map(Netns)
            .map_err(|e| e.to_string())
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// `prog args` inside the namespace, pinned to `cpu`.
    pub fn cmd(&self, cpu: &str, prog: &str) -> Command {
        let mut c = self.0.exec("taskset");
        c.args(["-c", cpu, prog]);
        c
    }

    /// Waits until something accepts TCP connections on 127.0.0.1:`port` in the namespace.
    pub fn wait_tcp(&self, port: u16) -> Result {
        wait_until(
            &format!("127.0.0.1:{port} accepting in {}", self.0.name()),
            || {
                self.0
                    .run(|| std::net::TcpStream::connect(("127.0.0.1", port)))
                    .is_ok()
            },
        )
    }
}

/// A process of this run, killed by its PID on drop. `ip netns exec` and `taskset` exec
/// the program, so the child's PID is the program's (and its /proc stat is the one read).
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    pub fn spawn(ctx: &mut Ctx, what: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        ctx.log(cmd);
        let err = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        Ok(Proc {
            child,
            what: what.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited (a bad configuration, a port in use).
    pub fn alive(&mut self, log: &Path) -> Result {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            _ => Err(format!(
                "{} exited: {}",
                self.what,
                std::fs::read_to_string(log).unwrap_or_default().trim()
            )),
        }
    }

    /// User + system CPU seconds of the process (all threads) so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        pid_cpu_seconds(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of process `pid` (all threads) so far.
pub fn pid_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse::stat_cpu_ticks(&stat)
        .map(|t| t as f64 / clock_ticks() as f64)
        .ok_or_else(|| format!("{path}: no utime/stime fields"))
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// Runs `cmd` (logged) and returns its standard output; fails with its standard error.
pub fn output(ctx: &mut Ctx, cmd: &mut Command) -> Result<String> {
    ctx.log(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Polls `f` every 20 ms for up to 20 s.
pub fn wait_until(what: &str, f: impl FnMut() -> bool) -> Result {
    testkit::Poll::within(Duration::from_secs(20))
        .until(what, f)
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn sh_line(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "- date: {}", sh_line("date -u +%Y-%m-%dT%H:%M:%SZ"));
    let _ = writeln!(
        s,
        "- machine: {} CPUs ({}), kernel {}",
        sh_line("nproc"),
        sh_line("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'"),
        sh_line("uname -r")
    );
    let _ = writeln!(
        s,
        "- load average at start: {}",
        sh_line("cut -d' ' -f1-3 /proc/loadavg")
    );
    let _ = writeln!(
        s,
        "- tools: {}; {}; {}; {}; {}; {}",
        sh_line("haproxy -v | head -1 | cut -d' ' -f1-3"),
        sh_line("nginx -v 2>&1"),
        sh_line("wrk -v 2>&1 | head -1"),
        sh_line("h2load --version"),
        sh_line("iperf3 -v | head -1"),
        sh_line("dpkg-query -W -f='dnsperf ${Version}' dnsperf"),
    );
    s
}

/// The task.
pub fn loadtest(args: &[String]) -> Result {
    let opts = Opts::parse(args)?;
    if !sh_line("id -u").eq("0") {
        return Err("loadtest needs root (network namespaces, BPF, pinning)".into());
    }
    if let Some(base) = &opts.ward_base {
        if !base.is_file() {
            return Err(format!("--ward-base {}: no such file", base.display()));
        }
    }
    ensure_debs(LOADTEST_PACKAGES)?;
    // The datapath part drives its own example, not `ward`.
    // The build the image ships (`profile.dist`: release with fat LTO).
    let agent_parts = opts.scale.is_some() || opts.fqdn.is_some();
    if agent_parts {
        // the agent loads the eBPF object embedded at build time
        crate::build_ebpf()?;
    }
    // `--ward PATH` measures a build made beforehand
    let prebuilt = opts.ward.clone();
    if prebuilt.is_none() && (opts.proxy || opts.dns || opts.tls || agent_parts) {
        run(cargo().args(["build", "--profile", "dist", "--bin", "ward"]))?;
    }
    let work = std::env::temp_dir().join(format!("ward-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut ctx = Ctx {
        ward: prebuilt.unwrap_or_else(|| root().join("target/dist/ward")),
        ward_base: opts.ward_base.clone(),
        work,
        quick: opts.quick,
        commands: Vec::new(),
    };
    let mut report = String::from("# Load test report\n\n");
    let _ = writeln!(
        report,
        "Written by `cargo xtask loadtest{}`. Subjects (proxies, the receiving pod) pinned \
         to CPU {SUBJECT_CPU}, load generators and backends to CPU {LOAD_CPU}; every \
         process runs in network namespaces made for this run. The machine is shared with \
         other builds: absolute numbers are noisy, ratios measured in the same run are what \
         to compare.\n",
        args.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    report.push_str(&machine());
    report.push('\n');
    if opts.proxy {
        let report_dir = root().join(report_path(&opts));
        let chart_dir = report_dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(chart_dir).map_err(|e| format!("{}: {e}", chart_dir.display()))?;
        report.push_str(&proxy::run(&mut ctx, &opts.sweep, chart_dir)?);
    }
    if opts.dns {
        report.push_str(&dns::run(&mut ctx)?);
    }
    if opts.datapath {
        report.push_str(&datapath::run(&mut ctx)?);
    }
    if opts.tls {
        report.push_str(&tls::run(&mut ctx)?);
    }
    if let Some(o) = &opts.scale {
        report.push_str(&scale::run_scale(&mut ctx, o)?);
    }
    if let Some(o) = &opts.fqdn {
        report.push_str(&fqdn::run_fqdn(&mut ctx, o)?);
    }
    if let Some(o) = &opts.e2e {
        // the lab's agents run `--ward PATH` (its ward-lab beside it), else the release
        // build of both
        let (lab, ward) = match &opts.ward {
            Some(w) => {
                let lab = w.with_file_name("ward-lab");
                if !lab.is_file() {
                    return Err(format!(
                        "--ward {}: the e2e part needs ward-lab beside it ({})",
                        w.display(),
                        lab.display()
                    ));
                }
                (lab, w.clone())
            }
            None => {
                let lab = crate::build_lab("loadtest e2e")?;
                let ward = lab.with_file_name("ward");
                (lab, ward)
            }
        };
        let report_dir = root().join(report_path(&opts));
        let chart_dir = report_dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(chart_dir).map_err(|e| format!("{}: {e}", chart_dir.display()))?;
        report.push_str(&e2e::run(&mut ctx, o, &lab, &ward, chart_dir)?);
    }
    let _ = writeln!(
        report,
        "load average at the end: {}\n",
        sh_line("cut -d' ' -f1-3 /proc/loadavg")
    );
    report.push_str("## Commands\n\n```\n");
    for c in &ctx.commands {
        let _ = writeln!(report, "{c}");
    }
    report.push_str("```\n");
    let path = root().join(report_path(&opts));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
    print!("{report}");
    eprintln!("loadtest: report written to {}", path.display());
    Ok(())
}

/// Runs gnuplot on a script (the charts of the proxy sweep and the e2e test).
pub(super) fn gnuplot(script: &str) -> Result {
    let mut child = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start gnuplot: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("gnuplot: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("gnuplot: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The load tests' namespace (root): commands run pinned inside it, and wait_tcp sees
    /// a listener on the namespace's own loopback.
    #[test]
    fn commands_and_tcp_waits_run_in_the_namespace() {
        testkit::require_root("the load tests' namespace test", "network namespaces");
        let ns = Netns::new("selftest").expect("namespace");
        let out = ns
            .cmd(LOAD_CPU, "ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip runs");
        let links = String::from_utf8_lossy(&out.stdout);
        assert_eq!(links.lines().count(), 1, "only the namespace's lo: {links}");
        let listener =
            ns.0.run(|| std::net::TcpListener::bind("127.0.0.1:0"))
                .expect("listener");
        let port = listener.local_addr().expect("port").port();
        assert_eq!(ns.wait_tcp(port), Ok(()));
    }

    fn path_of(args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let opts = Opts::parse(&args).expect("valid arguments");
        report_path(&opts).display().to_string()
    }

    #[test]
    fn a_partial_run_does_not_replace_the_full_report() {
        assert_eq!(path_of(&[]), "loadtests/REPORT.md");
        assert_eq!(path_of(&["all"]), "loadtests/REPORT.md");
        assert_eq!(
            path_of(&["dns", "proxy", "datapath"]),
            "loadtests/REPORT.md"
        );
        assert_eq!(path_of(&["dns"]), "loadtests/REPORT-dns.md");
        assert_eq!(path_of(&["dns", "proxy"]), "loadtests/REPORT-proxy-dns.md");
        assert_eq!(path_of(&["datapath"]), "loadtests/REPORT-datapath.md");
        assert_eq!(path_of(&["tls"]), "loadtests/REPORT-tls.md");
        assert_eq!(
            path_of(&["all", "tls"]),
            "loadtests/REPORT-proxy-datapath-dns-tls.md"
        );
        assert_eq!(
            path_of(&["dns", "--quick"]),
            "target/loadtest/REPORT-quick.md"
        );
        assert_eq!(path_of(&["scale"]), "loadtests/REPORT-scale.md");
        assert_eq!(
            path_of(&["all", "scale"]),
            "loadtests/REPORT-proxy-datapath-dns-scale.md"
        );
    }

    #[test]
    fn scale_takes_its_sizes_and_a_base_build_to_compare() {
        let parse = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            Opts::parse(&args)
        };
        let o = parse(&["scale"]).expect("valid");
        assert_eq!(o.scale, Some(scale::ScaleOpts::default()));
        assert!(!(o.proxy || o.dns || o.datapath), "scale alone");
        let o = parse(&[
            "scale",
            "--pods",
            "1000,5000",
            "--ward-base",
            "/w/base-ward",
        ])
        .expect("valid");
        let s = o.scale.expect("scale");
        assert_eq!(s.pods, vec![1000, 5000]);
        assert_eq!(s.ward_base, Some(PathBuf::from("/w/base-ward")));
        assert!(parse(&["scale", "--pods", "many"]).is_err());
        assert!(parse(&["scale", "--ward-base"]).is_err());
        let o = parse(&["scale", "--ward", "/w/ward"]).expect("valid");
        assert_eq!(o.scale.expect("scale").ward, Some(PathBuf::from("/w/ward")));
        let o = parse(&["--ward", "/w/ward"]).expect("valid");
        assert!(
            o.scale.is_some() && !o.proxy,
            "--ward alone is the scale part"
        );
        let o = parse(&["proxy", "--ward", "/w/ward"]).expect("valid");
        assert!(o.scale.is_none() && o.proxy);
        assert_eq!(o.ward, Some(PathBuf::from("/w/ward")));
    }

    #[test]
    fn sweep_options_name_the_proxy_part() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Opts::parse(&args(&["--rules", "2,50", "--proto", "h1", "--quick"])).unwrap();
        assert!(o.proxy && !o.dns && !o.datapath && o.quick);
        assert_eq!(o.sweep.rules, Some(vec![2, 50]));
        assert_eq!(
            report_path(&Opts::parse(&args(&["--full"])).unwrap())
                .display()
                .to_string(),
            "loadtests/REPORT-proxy.md"
        );
        assert!(Opts::parse(&args(&["--conns", "many"])).is_err());
    }

    #[test]
    fn fqdn_takes_its_length_and_the_builds_to_compare() {
        let parse = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            Opts::parse(&args)
        };
        let o = parse(&["fqdn"]).expect("valid");
        assert_eq!(o.fqdn, Some(fqdn::FqdnOpts::default()));
        assert!(o.scale.is_none() && !(o.proxy || o.dns || o.datapath));
        assert_eq!(
            report_path(&o).display().to_string(),
            "loadtests/REPORT-fqdn.md"
        );
        let o = parse(&[
            "fqdn",
            "--secs",
            "60",
            "--clients",
            "10",
            "--ward",
            "/w/a",
            "--ward-base",
            "/w/b",
        ])
        .expect("valid");
        assert!(o.scale.is_none(), "--ward is the FQDN part's");
        let f = o.fqdn.expect("fqdn");
        assert_eq!((f.secs, f.clients), (60, 10));
        assert_eq!(f.ward, Some(PathBuf::from("/w/a")));
        assert_eq!(f.ward_base, Some(PathBuf::from("/w/b")));
        assert!(parse(&["fqdn", "--secs", "long"]).is_err());
    }

    #[test]
    fn e2e_takes_the_rules_and_connections_unless_proxy_is_named() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Opts::parse(&args(&["e2e", "--rules", "10,100", "--conns", "1,64"])).unwrap();
        let e = o.e2e.clone().expect("e2e");
        assert_eq!(e.rules, Some(vec![10, 100]));
        assert_eq!(e.conns, Some(vec![1, 64]));
        assert!(!(o.proxy || o.dns || o.datapath) && o.scale.is_none());
        assert_eq!(
            report_path(&o).display().to_string(),
            "loadtests/REPORT-e2e.md"
        );
        // the options may come first
        let o = Opts::parse(&args(&["--conns", "16", "e2e"])).unwrap();
        assert_eq!(o.e2e.expect("e2e").conns, Some(vec![16]));
        assert!(!o.proxy);
        // with proxy named, the sweep keeps them
        let o = Opts::parse(&args(&["e2e", "proxy", "--rules", "2"])).unwrap();
        assert_eq!(o.e2e.expect("e2e").rules, None);
        assert!(o.proxy && o.sweep.rules == Some(vec![2]));
        // --ward is the lab's ward, not the scale part
        let o = Opts::parse(&args(&["e2e", "--ward", "/w/ward"])).unwrap();
        assert!(o.scale.is_none() && o.e2e.is_some());
        assert!(Opts::parse(&args(&["e2e", "--proto", "h2"])).is_err());
        assert!(Opts::parse(&args(&["e2e", "--conns", "some"])).is_err());
        assert!(Opts::parse(&args(&["all"])).unwrap().e2e.is_none());
        assert_eq!(
            path_of(&["e2e", "--quick"]),
            "target/loadtest/REPORT-quick.md"
        );
    }

    #[test]
    fn a_base_ward_is_taken_with_its_path() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Opts::parse(&args(&["dns", "--ward-base", "/tmp/ward-main"])).unwrap();
        assert_eq!(o.ward_base, Some(PathBuf::from("/tmp/ward-main")));
        assert!(o.dns && !o.proxy);
        assert_eq!(
            report_path(&o).display().to_string(),
            "loadtests/REPORT-dns.md"
        );
        assert!(Opts::parse(&args(&["dns", "--ward-base"])).is_err());
        assert_eq!(Opts::parse(&args(&["dns"])).unwrap().ward_base, None);
    }
}
