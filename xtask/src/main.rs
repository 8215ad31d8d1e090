//! Project automation: `cargo xtask <task>`.
//!
//! Every task installs what it needs when it is missing, so that a newcomer on a fresh
//! machine (and CI) runs the same two commands the README shows.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test            format check, clippy (-D warnings), all tests, and the conformance suite
  demo            the main job for now: conformance over the shared cases and a trace example
  fuzz [SECONDS]  run the policy fuzz target (default 60 s) with cargo-fuzz on nightly
  bench           run the criterion benchmarks
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo(),
        Some("fuzz") => fuzz(args.get(1).map(String::as_str)),
        Some("bench") => bench(),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The shared conformance cases sit beside the checkout (`../shared`), on developer
/// machines and in CI alike.
fn shared_cases() -> Option<PathBuf> {
    let p = root().join("../shared/conformance/cases");
    p.is_dir().then_some(p)
}

fn run(cmd: &mut Command) -> Result {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// rustfmt and clippy are rustup components; a minimal toolchain may lack them.
fn ensure_components() -> Result {
    for (probe, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if !succeeds(cargo().args([probe, "--version"])) {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// Debian packages the tests drive as real peers (clients, servers, tools).
const TEST_PACKAGES: &[&str] = &["curl", "nghttp2-client"];

/// Installs missing Debian packages non-interactively.
fn ensure_debs(packages: &[&str]) -> Result {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing))
}

fn installed(p: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", p])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn test() -> Result {
    ensure_components()?;
    ensure_debs(TEST_PACKAGES)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace", "--all-targets"]))?;
    // Benchmarks must at least run once, so that a broken bench fails here and not later.
    run(cargo().args(["bench", "--workspace", "--", "--test"]))?;
    match shared_cases() {
        Some(cases) => run(cargo()
            .args(["run", "--quiet", "--release", "--bin", "ward", "--"])
            .args(["conformance", "run"])
            .arg(cases))?,
        None => return Err("../shared/conformance/cases is missing".into()),
    }
    Ok(())
}

fn demo() -> Result {
    let cases = shared_cases().ok_or("../shared/conformance/cases is missing")?;
    run(cargo().args(["build", "--quiet", "--release", "--bin", "ward"]))?;
    let ward = root().join("target/release/ward");
    run(Command::new(&ward).args(["conformance", "run"]).arg(&cases))?;
    let case = cases.join("069-cnp-l7-http-get-root.yaml");
    for (path, method) in [("/", "GET"), ("/private", "GET")] {
        run(Command::new(&ward)
            .args(["policy", "trace", "--cluster"])
            .arg(&case)
            .arg("--policies")
            .arg(&case)
            .args([
                "--from",
                "cilium-test/client2",
                "--to",
                "cilium-test/echo-same-node",
            ])
            .args([
                "--port",
                "8080",
                "--http-method",
                method,
                "--http-path",
                path,
            ]))?;
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !succeeds(cargo().args(["fuzz", "--version"])) {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn fuzz(seconds: Option<&str>) -> Result {
    let seconds: u64 = seconds
        .unwrap_or("60")
        .parse()
        .map_err(|e| format!("SECONDS: {e}"))?;
    ensure_cargo_fuzz()?;
    run(Command::new("cargo")
        .args(["+nightly", "fuzz", "run", "policy"])
        .arg("--")
        .arg(format!("-max_total_time={seconds}")))
}

fn bench() -> Result {
    run(cargo().args(["bench", "--workspace"]))
}
