//! The `ward` command line as a user runs it: exit codes, output lines and formats.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(args)
        .output()
        .expect("ward runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The conformance cases of the repository (`conformance/cases`).
fn cases() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/cases")
}

/// A scratch folder unique to this test process and name, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ward-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CASE: &str = r#"
format: netpol-oracle/v1
id: "900"
name: cli-case
semantics: cilium
cluster:
  namespaces: [{name: app}]
  pods:
    - {namespace: app, name: client, labels: {role: client}, ip: 10.0.0.1}
    - {namespace: app, name: server, labels: {role: server}, ip: 10.0.0.2}
    - {namespace: app, name: other, labels: {role: other}, ip: 10.0.0.3}
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server-http, namespace: app}
    spec:
      endpointSelector: {matchLabels: {role: server}}
      ingress:
        - fromEndpoints: [{matchLabels: {role: client}}]
          toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{method: GET, path: "/public/.*"}]}
probes:
  - {from: app/client, to: app/server, port: 80, protocol: TCP, expect: allow, http: {method: GET, path: /public/a}}
  - {from: app/client, to: app/server, port: 80, protocol: TCP, expect: deny, http: {method: GET, path: /admin}}
  - {from: app/other, to: app/server, port: 80, protocol: TCP, expect: deny}
"#;

#[test]
fn conformance_passes_the_cases() {
    let o = ward(&["conformance", "run", cases().to_str().expect("utf-8 path")]);
    assert!(all_passed(&o) >= 600);
}

/// The probes a conformance run passed, after checking that it failed none.
fn all_passed(o: &Output) -> usize {
    let out = stdout(o);
    let last = out.lines().last().unwrap_or_default();
    assert!(o.status.success(), "{out}");
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    last.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count")
}

/// The lab is its own binary (`ward-lab`): the `ward` the DaemonSet ships has no `lab`
/// command and carries none of the lab's code.
#[test]
fn ward_has_no_lab() {
    let o = ward(&["lab"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unrecognized subcommand 'lab'"), "{err}");
    let help = stdout(&ward(&["--help"]));
    assert!(help.contains("  conformance "), "{help}");
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("lab ")),
        "{help}"
    );
    // the run directory every lab makes (lab/src/topology.rs)
    let bin = std::fs::read(env!("CARGO_BIN_EXE_ward")).expect("the ward binary");
    assert!(
        !bin.windows(13).any(|w| w == b"/run/ward-lab"),
        "lab code is linked into ward"
    );
}

/// A lab scenario folder (deploy/lab) is one case for `ward conformance run`.
#[test]
fn conformance_runs_the_lab_scenario_folder() {
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab");
    let o = ward(&["conformance", "run", lab.to_str().expect("utf-8 path")]);
    assert!(all_passed(&o) >= 38);
}

#[test]
fn conformance_reports_a_failing_probe_with_its_explanation() {
    let s = Scratch::new("failing");
    let ok = s.file("ok.yaml", CASE);
    let o = ward(&["conformance", "run", &ok]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert_eq!(stdout(&o).trim(), "3 passed, 0 failed");

    // flip one expectation: the run must fail and explain the observed verdict
    let bad = s.file(
        "bad.yaml",
        &CASE
            .replace("path: /admin}}", "path: /admin}, note: flipped}")
            .replace("expect: deny, http", "expect: allow, http"),
    );
    let o = ward(&["conformance", "run", &bad]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("probe 1: app/client -> app/server TCP/80 HTTP GET /admin: expected allow, got DENIED at L7"), "{out}");
    assert!(out.contains("CiliumNetworkPolicy app/server-http"), "{out}");
    assert_eq!(out.lines().last(), Some("2 passed, 1 failed"));

    let o = ward(&["conformance", "run", "--format", "json", &bad]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["failed"], 1);
    assert_eq!(v["passed"], 2);
    assert_eq!(v["cases"][0]["probes"][1]["passed"], false);
}

fn lint_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-model/tests/lint")
}

#[test]
fn policy_lint_exits_1_on_errors_and_0_on_the_clean_set() {
    let fixtures = lint_fixtures();
    let cluster = fixtures.join("cluster.yaml").display().to_string();
    let clean = fixtures.join("clean").display().to_string();
    let o = ward(&["policy", "lint", &clean, "--cluster", &cluster]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert_eq!(stdout(&o).trim(), "0 errors, 0 warnings in 1 files");

    // a warning alone does not fail the run; an error does
    let or = fixtures.join("or-peers.yaml").display().to_string();
    let o = ward(&["policy", "lint", &or]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "{or}:14: warning [or-peers] NetworkPolicy shop/api-from-web: spec.ingress[0].from[1]:"
        )),
        "{out}"
    );
    assert!(out.contains("\n  fix: "), "{out}");
    let dns = fixtures
        .join("egress-without-dns.yaml")
        .display()
        .to_string();
    let o = ward(&["policy", "lint", &dns, "-o", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["errors"], 1);
    let f = &v["findings"][0];
    assert_eq!(f["check"], "egress-without-dns");
    assert_eq!(f["severity"], "error");
    assert_eq!(f["line"], 9);
    assert_eq!(f["path"], "spec.policyTypes");
    assert_eq!(f["object"], "NetworkPolicy shop/default-deny-egress");
    assert!(f["fix"].as_str().is_some_and(|x| x.contains("53")), "{f}");
}

#[test]
fn conformance_run_passes_the_calico_cases() {
    let dir = cases().with_file_name("cases-calico");
    let o = ward(&[
        "conformance",
        "run",
        &dir.display().to_string(),
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(o.status.success(), "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["passed"].as_u64().unwrap_or_default() >= 100, "{v}");
}

#[test]
fn policy_check_reports_errors_with_file_line_object_and_path() {
    let s = Scratch::new("check");
    let good = s.file(
        "good.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: a}\nspec: {podSelector: {}}\n",
    );
    let o = ward(&["policy", "check", &good]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), "1 objects valid in 1 files");

    let bad = s.file(
        "bad.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ok, namespace: a}\nspec: {podSelector: {}}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: a}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules: {http: [{path: \"/x\"}]}\n",
    );
    let o = ward(&["policy", "check", &bad]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("{bad}:6: CiliumNetworkPolicy a/web: spec.ingress[0].toPorts[0].rules.http: L7 rules can only apply to TCP")),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap_or_default()
            .contains("1 of 2 objects invalid"),
        "{out}"
    );
}

#[test]
fn policy_trace_explains_allow_and_deny() {
    let s = Scratch::new("trace");
    let case = s.file("case.yaml", CASE);
    let trace = |extra: &[&str]| {
        let mut args = vec![
            "policy",
            "trace",
            "--cluster",
            &case,
            "--policies",
            &case,
            "--to",
            "app/server",
            "--port",
            "80",
        ];
        args.extend_from_slice(extra);
        ward(&args)
    };
    let o = trace(&[
        "--from",
        "app/client",
        "--http-method",
        "GET",
        "--http-path",
        "/public/x",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.starts_with("app/client -> app/server: ALLOWED"),
        "{out}"
    );
    assert!(
        out.contains("spec.ingress[0].toPorts[0].rules.http[0]"),
        "{out}"
    );

    let o = trace(&["--from", "app/other"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("ingress of app/server: denied at L3: default deny: selected by CiliumNetworkPolicy app/server-http"), "{out}");

    let o = trace(&[
        "--from",
        "10.0.0.1",
        "--http-path",
        "/admin",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["allowed"], false);
    assert_eq!(v["layer"], "L7");
    assert_eq!(v["from"], "app/client", "an IP resolves to its pod");

    let o = trace(&["--from", "nope/nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown endpoint nope/nope"));
}
