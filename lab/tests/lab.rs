//! `ward-lab` end to end: real namespaces, real agents, real clients. Root only (CI runs
//! as root). The tests of this file run one at a time (`down --all` removes every lab).
//! `WARD_LAB_TEST_NO_AGENT=1` runs them without agents (mechanics only: expectations
//! that need enforcement are then skipped).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

const CASE: &str = r#"
format: netpol-oracle/v1
id: lab-small
name: lab-small
semantics: kubernetes
cluster:
  namespaces:
  - {name: x, labels: {ns: x}}
  - {name: y, labels: {ns: y}}
  nodes:
  - {name: node-1, ip: 172.18.0.2}
  - {name: node-2, ip: 172.18.0.3}
  pods:
  - {namespace: x, name: a, labels: {pod: a}, ip: 10.1.0.10, ips: ["fd00:1::10"], node: node-1, ports: [{port: 80, protocol: TCP}]}
  - {namespace: x, name: b, labels: {pod: b}, ip: 10.1.0.11, ips: ["fd00:1::11"], node: node-2, ports: [{port: 80, protocol: TCP}]}
  - {namespace: y, name: c, labels: {pod: c}, ip: 10.2.0.10, ips: ["fd00:2::10"], node: node-1, ports: []}
  externals:
  - {name: ext, ip: 203.0.113.10}
policies:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: b-from-a, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: b}}
    ingress:
    - from: [{podSelector: {matchLabels: {pod: a}}}]
      ports: [{port: 80, protocol: TCP}]
probes:
- {from: x/a, to: x/b, port: 80, protocol: TCP, expect: allow, http: {method: GET, path: /hello}}
- {from: x/a, to: external:ext, port: 443, protocol: TCP, expect: allow}
- {from: x/b, to: x/a, port: 80, protocol: UDP, expect: allow}
- {from: y/c, to: x/b, port: 80, protocol: TCP, expect: deny}
- {from: y/c, to: x/b, port: 80, protocol: UDP, expect: deny}
- {from: x/a, to: x/b, port: 80, protocol: TCP, expect: allow, http: {method: GET, path: /hello6}, family: ipv6}
- {from: y/c, to: x/b, port: 80, protocol: TCP, expect: deny, family: ipv6}
"#;

fn no_agent() -> bool {
    std::env::var_os("WARD_LAB_TEST_NO_AGENT").is_some()
}

fn require_root() {
    testkit::require_root("lab tests", "network namespaces");
}

/// `ward-lab ARGS`. Its agents run the `ward` that cargo built beside it
/// (`cargo test --workspace` builds both).
fn ward_lab(args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    if no_agent() && matches!(args.first(), Some(&"up") | Some(&"run-case")) {
        all.push("--no-agent");
    }
    lab_command().args(&all).output().expect("ward-lab runs")
}

fn lab_command() -> Command {
    let lab = Path::new(env!("CARGO_BIN_EXE_ward-lab"));
    if !no_agent() {
        require_fresh(&lab.with_file_name("ward"));
    }
    Command::new(lab)
}

/// `cargo test -p lab` builds ward-lab but not the `ward` beside it: a missing or stale
/// one (older than a source file it is built from, or than the eBPF object it embeds)
/// would test old agent code, so it stops the test instead.
fn require_fresh(ward: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let build = "build it first (`cargo build -p agent --bin ward`; `cargo test --workspace` does)";
    let built = fs::metadata(ward)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {build}", ward.display()));
    let mut sources = vec![repo.join("target/bpf/bpfel-unknown-none/release/ward-redirect")];
    for dir in [
        "agent/src",
        "policy-model/src",
        "proxy/src",
        "dns-proxy/src",
        "redirect-bpf/src",
        "redirect-bpf/common/src",
        "lab/scenario/src",
    ] {
        files_under(&repo.join(dir), &mut sources);
    }
    for f in sources {
        let changed = fs::metadata(&f).and_then(|m| m.modified());
        if changed.is_ok_and(|c| c > built) {
            panic!("{} is older than {}: {build}", ward.display(), f.display());
        }
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A scratch folder unique to this process and test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ward-lab-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A lab that is brought down on drop (also when an assertion fails).
struct Up(String);

impl Up {
    fn new(case: &Path) -> Up {
        let o = ward_lab(&["up", case.to_str().unwrap()]);
        assert!(o.status.success(), "ward-lab up failed:\n{}", text(&o));
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(id.starts_with("wl") && id.len() == 10, "lab id {id:?}");
        Up(id)
    }

    fn run_dir(&self) -> PathBuf {
        Path::new("/run/ward-lab").join(&self.0)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(self.run_dir().join("state.json")).unwrap())
            .unwrap()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = ward_lab(&["down", "--id", &self.0]);
    }
}

fn namespaces_of(id: &str) -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{id}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn processes_naming(id: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(id))
                .unwrap_or(false)
        })
        .collect()
}

fn pins_of(id: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(&format!("ward-lab-{id}")))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_gone(id: &str) {
    assert!(
        namespaces_of(id).is_empty(),
        "namespaces left: {:?}",
        namespaces_of(id)
    );
    assert!(
        processes_naming(id).is_empty(),
        "processes left: {:?}",
        processes_naming(id)
    );
    assert!(pins_of(id).is_empty(), "pins left: {:?}", pins_of(id));
    assert!(
        !Path::new("/run/ward-lab").join(id).exists(),
        "run directory left"
    );
}

#[test]
fn up_check_exec_down_leaves_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = Scratch::new("lifecycle");
    let case = dir.0.join("case.yaml");
    fs::write(&case, CASE).unwrap();
    let root_before = root_namespace();
    let lab = Up::new(&case);
    let id = lab.0.clone();
    assert_eq!(
        root_namespace(),
        root_before,
        "the machine's own namespace got an interface, address, route or rule"
    );

    // namespaces: fabric, world, 2 nodes, 3 pods; a server per pod, world; an agent per node
    assert_eq!(namespaces_of(&id).len(), 7, "{:?}", namespaces_of(&id));
    let state = lab.state();
    let pids = state["pids"].as_array().unwrap().len();
    assert_eq!(pids, if no_agent() { 3 } else { 5 }, "{state}");

    // exec runs in the pod: it sees its own address on eth0
    let o = ward_lab(&[
        "exec", "--id", &id, "x/b", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("10.1.0.11/32"), "{}", text(&o));
    // dual-stack: its IPv6 address too, and the neighbour on the other node answers it
    let o = ward_lab(&[
        "exec", "--id", &id, "x/b", "--", "ip", "-6", "-o", "addr", "show", "dev", "eth0",
    ]);
    assert!(text(&o).contains("fd00:1::11/128"), "{}", text(&o));
    // and the pod's server answers the pod's neighbour over the lab network
    let o = ward_lab(&[
        "exec",
        "--id",
        &id,
        "x/a",
        "--",
        "curl",
        "-sS",
        "-m",
        "3",
        "http://10.1.0.11/where",
    ]);
    assert!(
        text(&o).contains("GET /where from 10.1.0.10"),
        "{}",
        text(&o)
    );
    let o = ward_lab(&[
        "exec",
        "--id",
        &id,
        "x/a",
        "--",
        "curl",
        "-sS",
        "-g",
        "-m",
        "3",
        "http://[fd00:1::11]/where",
    ]);
    assert!(
        text(&o).contains("GET /where from fd00:1::10"),
        "IPv6 across nodes: {}",
        text(&o)
    );

    let o = ward_lab(&["check", "--id", &id]);
    let out = text(&o);
    assert!(
        out.contains("PROBE") && out.contains("EXPECTED") && out.contains("OBSERVED"),
        "{out}"
    );
    assert!(out.contains("x/a -> x/b TCP/80 HTTP GET /hello"), "{out}");
    assert!(
        out.contains("x/a -> x/b TCP/80 HTTP GET /hello6 (IPv6)"),
        "{out}"
    );
    if !no_agent() {
        assert!(o.status.success(), "check failed:\n{out}");
        assert!(out.contains("7 passed, 0 failed"), "{out}");
        assert!(
            out.contains("NetworkPolicy x/b-from-a"),
            "the deciding policy is named: {out}"
        );
    }

    // a wrong expectation is caught: flip the first probe to `deny`
    let scenario = lab.run_dir().join("scenario.yaml");
    let s = fs::read_to_string(&scenario).unwrap();
    let flipped = s.replacen("expect: allow", "expect: deny", 1);
    assert_ne!(s, flipped);
    fs::write(&scenario, flipped).unwrap();
    let o = ward_lab(&["check", "--id", &id]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FAIL"), "{}", text(&o));

    let o = ward_lab(&["down", "--id", &id]);
    assert!(o.status.success(), "{}", text(&o));
    assert_gone(&id);
}

/// The machine's interfaces, addresses, routes and rules (v4 and v6), as `ip` prints them.
fn root_namespace() -> String {
    let mut out = String::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-o", "addr", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["-4", "rule", "show"],
        &["-6", "rule", "show"],
    ] {
        let o = Command::new("ip").args(args).output().unwrap();
        // link statistics and lifetimes change by themselves; names and addresses do not
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let line: String = line
                .split_whitespace()
                .take_while(|w| !matches!(*w, "valid_lft" | "link/ether" | "qlen"))
                .collect::<Vec<_>>()
                .join(" ");
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn two_labs_of_one_scenario_run_side_by_side() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = Scratch::new("twins");
    let case = dir.0.join("case.yaml");
    fs::write(&case, CASE).unwrap();
    // the same addresses and names in both: nothing may collide
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Up::new(&case));
        let b = s.spawn(|| Up::new(&case));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.0, b.0);
    if !no_agent() {
        for lab in [&a, &b] {
            let o = ward_lab(&["check", "--id", &lab.0]);
            assert!(o.status.success(), "lab {}:\n{}", lab.0, text(&o));
        }
    }
    let (ida, idb) = (a.0.clone(), b.0.clone());
    drop(a);
    assert_gone(&ida);
    assert!(
        !namespaces_of(&idb).is_empty(),
        "bringing one lab down left the other alone"
    );
    drop(b);
    assert_gone(&idb);
}

#[test]
fn an_interrupted_run_removes_its_lab() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = Scratch::new("interrupt");
    let case = dir.0.join("case.yaml");
    fs::write(&case, CASE).unwrap();
    let mut args = vec![case.to_str().unwrap().to_string()];
    if no_agent() {
        args.push("--no-agent".into());
    }
    let before: Vec<PathBuf> = lab_run_dirs();
    let mut child = lab_command()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until its lab has servers running, then interrupt it
    let mut fresh = None;
    testkit::Poll::within(std::time::Duration::from_secs(60)).expect("the lab to come up", || {
        fresh = lab_run_dirs().into_iter().find(|d| {
            !before.contains(d)
                && fs::read_to_string(d.join("state.json"))
                    .map(|s| s.contains("\"pids\": [\n"))
                    .unwrap_or(false)
        });
        fresh.is_some()
    });
    let run_dir = fresh.unwrap();
    let id = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted runs exit 130");
    assert_gone(&id);
}

fn lab_run_dirs() -> Vec<PathBuf> {
    fs::read_dir("/run/ward-lab")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn down_all_cleans_up_after_a_crash() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = Scratch::new("crash");
    let case = dir.0.join("case.yaml");
    fs::write(&case, CASE).unwrap();
    let lab = Up::new(&case);
    let id = lab.0.clone();
    let state = lab.state();
    // the crash: every agent dies with SIGKILL, the state file is lost; namespaces, servers
    // and pins stay behind
    for n in state["nodes"].as_array().unwrap() {
        if let Some(pid) = n["agent_pid"].as_u64() {
            assert!(Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap()
                .success());
        }
    }
    fs::remove_file(lab.run_dir().join("state.json")).unwrap();
    assert!(!namespaces_of(&id).is_empty());

    let o = ward_lab(&["down", "--all"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_gone(&id);
}

#[test]
fn run_case_executes_a_folder_of_cases() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = Scratch::new("cases");
    fs::write(dir.0.join("small.yaml"), CASE).unwrap();
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/cases");
    for f in [
        "002-np-default-deny-all.yaml",
        "073-cnp-tofqdns-matchname.yaml",
    ] {
        fs::copy(cases.join(f), dir.0.join(f)).unwrap();
    }
    let before = lab_namespaces();
    let o = ward_lab(&["run-case", dir.0.to_str().unwrap()]);
    let out = text(&o);
    let last = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.ends_with(" failed"), "last line {last:?}:\n{out}");
    if !no_agent() {
        assert!(o.status.success(), "{out}");
        assert!(last.ends_with(" 0 failed"), "{out}");
    }
    assert!(out.contains("small.yaml (7 probes"), "{out}");
    let left: Vec<String> = lab_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

fn lab_namespaces() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("wl"))
                .collect()
        })
        .unwrap_or_default()
}
