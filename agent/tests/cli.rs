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
fn conformance_passes_the_shared_tls_cases() {
    let dir = cases().with_file_name("cases-tls");
    let o = ward(&["conformance", "run", dir.to_str().expect("utf-8 path")]);
    let out = stdout(&o);
    let last = out.lines().last().unwrap_or_default();
    assert!(o.status.success(), "{out}");
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let passed: usize = last
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    assert!(passed >= 66, "{last}");
}

/// `--sni` and `--tls`: the verdict says whether the session is spliced, intercepted or
/// reset, and names the rule.
#[test]
fn policy_trace_explains_tls_sessions() {
    let cases = cases().with_file_name("cases-tls");
    let case = |n: &str| cases.join(n).display().to_string();
    let trace = |file: &str, extra: &[&str]| {
        let mut args = vec![
            "policy",
            "trace",
            "--cluster",
            file,
            "--policies",
            file,
            "--from",
            "cilium-test/client",
            "--to",
            "external:saas",
            "--port",
            "443",
        ];
        args.extend_from_slice(extra);
        ward(&args)
    };
    let sni = case("301-cnp-servernames-exact.yaml");
    let o = trace(&sni, &["--sni", "api.saas.example"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("(proxied, TLS spliced)"), "{out}");
    assert!(
        out.contains(
            "admitted by CiliumNetworkPolicy cilium-test/l4-sni-rule spec.egress[0].toPorts[0]"
        ),
        "{out}"
    );

    let o = trace(&sni, &["--sni", "www.saas.example", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(v["sides"][0]["tls"], "reset");
    assert_eq!(v["sides"][0]["rule"], "spec.egress[0].toPorts[0]");

    let o = trace(&sni, &["--tls"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("TLS without SNI: no SNI"), "{out}");

    let intercept = case("308-cnp-tls-intercept-http-get-only.yaml");
    let o = trace(
        &intercept,
        &[
            "--sni",
            "api.saas.example",
            "--http-method",
            "DELETE",
            "--http-path",
            "/v1/items",
        ],
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("(proxied, TLS intercepted)"), "{out}");
    assert!(
        out.contains("HTTPS: HTTP DELETE /v1/items: no HTTP rule"),
        "{out}"
    );
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

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

/// `ward policy show ARGS` on the lab's default scenario (deploy/lab).
fn show_lab(args: &[&str]) -> Output {
    let (cluster, policies) = (repo("deploy/lab/cluster.yaml"), repo("deploy/lab/policies"));
    let mut all = vec!["policy", "show"];
    all.extend_from_slice(args);
    all.extend(["--cluster", &cluster, "--policies", &policies]);
    ward(&all)
}

#[test]
fn policy_show_lists_isolation_policies_and_rules_of_a_pod() {
    let o = show_lab(&["production/api"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    for line in [
        "production/api (identity 257; labels app=api, tier=backend)",
        "  ingress: isolated (default deny) by NetworkPolicy production/default-deny-all, CiliumNetworkPolicy production/api-l7, CiliumNetworkPolicy production/allow-prometheus-scrape",
        "    NetworkPolicy production/default-deny-all [namespace, default deny]: no rules (allows nothing)",
        "      allow TCP/8080 from endpoints {any:app=frontend, k8s:io.kubernetes.pod.namespace=production} = production/frontend  (spec.ingress[0].toPorts[0])",
        "        spec.ingress[0].toPorts[0].rules.http[0]: method=GET path=/v1/.*",
        "      allow UDP/53, TCP/53 to endpoints {any:io.kubernetes.pod.namespace=kube-system, any:k8s-app=kube-dns} = kube-system/coredns  (spec.egress[0].toPorts[0])",
        "        spec.egress[0].toPorts[0].rules.dns[1]: matchName: api.payments.example.",
        "      allow any to cidr 192.0.2.0/24 except 192.0.2.254/32  (spec.egress[2])",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
    }
    // a bare pod name is in -n's namespace
    assert_eq!(stdout(&show_lab(&["api", "-n", "production"])), out);
}

#[test]
fn policy_show_selects_pods_by_label_like_np_viewer() {
    let o = show_lab(&["-n", "production", "-l", "app=api", "-o", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["endpoint"], "production/api");
    assert_eq!(v[0]["ingress"]["isolated"], true);
    assert_eq!(
        v[0]["ingress"]["policies"][1]["policy"],
        "CiliumNetworkPolicy production/api-l7"
    );
    let o = show_lab(&[
        "-n",
        "production",
        "-l",
        "tier in (web, backend)",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let pods: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        pods,
        vec![
            "production/frontend",
            "production/api",
            "production/payments"
        ]
    );
    // bad input: exit 2 with the reason
    for (args, words) in [
        (
            vec!["-n", "production", "-l", "a b"],
            vec!["-l", "not a label key"],
        ),
        (vec!["production/nope"], vec!["no pod production/nope"]),
        (vec!["-n", "nowhere"], vec!["no pod matches", "nowhere"]),
    ] {
        let o = show_lab(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        for w in words {
            assert!(err.contains(w), "{args:?}: {w} not in {err}");
        }
    }
    let o = ward(&["policy", "show", "production/api"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--cluster FILE --policies"),
        "no source named"
    );
}

/// The conformance case of the three tiers: ANP, then NetworkPolicy, then BANP.
#[test]
fn policy_show_lists_policies_in_tier_order() {
    let case = cases()
        .join("049-anp-np-banp-deny.yaml")
        .display()
        .to_string();
    let o = ward(&[
        "policy",
        "show",
        "network-policy-conformance-gryffindor/harry-potter-0",
        "--cluster",
        &case,
        "--policies",
        &case,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    let heads: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("    ") && !l.starts_with("     "))
        .collect();
    assert_eq!(
        heads,
        vec![
            "    AdminNetworkPolicy pass-example [admin (priority 10)]",
            "    NetworkPolicy network-policy-conformance-gryffindor/allow-gress-from-to-slytherin-to-gryffindor [namespace, default deny]",
            "    BaselineAdminNetworkPolicy default [baseline]",
            "    AdminNetworkPolicy pass-example [admin (priority 10)]",
            "    NetworkPolicy network-policy-conformance-gryffindor/allow-gress-from-to-slytherin-to-gryffindor [namespace, default deny]",
            "    BaselineAdminNetworkPolicy default [baseline]",
        ],
        "{out}"
    );
}

#[test]
fn policy_show_draws_the_allowed_peers() {
    let o = show_lab(&["production/api", "--graph", "dot"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dot = stdout(&o);
    assert!(dot.starts_with("digraph ward {"), "{dot}");
    for edge in [
        r#"  "production/frontend" -> "production/api" [label="TCP/8080 +L7"];"#,
        r#"  "production/api" -> "kube-system/coredns" [label="UDP/53, TCP/53 +L7"];"#,
        r#"  "production/api" -> "cidr 192.0.2.0/24 except 192.0.2.254/32" [label="any"];"#,
    ] {
        assert!(dot.lines().any(|l| l == edge), "{edge} not in:\n{dot}");
    }
    assert!(
        !dot.contains("analytics/"),
        "no edge the rules do not allow: {dot}"
    );
    // a pod no policy isolates: everything, from and to `any`
    let o = show_lab(&["ingress-nginx/controller", "--graph", "dot"]);
    let dot = stdout(&o);
    assert!(
        dot.contains(r#""any" -> "ingress-nginx/controller" [label="all (not isolated)"]"#),
        "{dot}"
    );
    // SVG needs graphviz (cargo xtask test installs it); without it the error says so
    let o = show_lab(&["production/api", "--graph", "svg"]);
    let have_dot = Command::new("dot").arg("-V").output().is_ok();
    if have_dot {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let svg = stdout(&o);
        assert!(
            svg.contains("<svg") && svg.contains("production/frontend"),
            "{svg}"
        );
    } else {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("graphviz"), "{err}");
    }
}

/// An empty or missing admin token file stops `ward agent` before it does anything,
/// naming the file and the reason: never an admin listener left open by mistake.
#[test]
fn agent_refuses_to_start_with_an_empty_or_missing_admin_token_file() {
    let s = Scratch::new("admin-token");
    let empty = s.file("token", " \n");
    let missing = s.0.join("missing").display().to_string();
    let src = s.0.display().to_string();
    for (file, reason) in [(&empty, "empty"), (&missing, "No such file")] {
        let o = ward(&[
            "agent",
            "--node",
            "n1",
            "--source-dir",
            &src,
            "--admin-token-file",
            file,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains(&format!("admin token file {file}")) && err.contains(reason),
            "{err}"
        );
    }
}
